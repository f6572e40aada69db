"""The wire format's checks: whatever bytes a peer sends, reading them raises BadFrame or gives what the
protocol promises -- never another exception (which would reach the coordinator as a traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardllama import protocol as P


def frame(kind: int, body: bytes = b"", **fields) -> bytes:
    head = bytearray(P.HEADER_BYTES)
    P.HEADER.pack_into(head, 0, *P.Header(kind, **fields))
    return bytes(head) + body


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(sorted(P.KIND_NAMES)))
def test_any_bytes_parse_or_raise_badframe(junk, kind):
    for buf in (junk, frame(kind, junk), frame(kind) + junk[:8]):
        try:
            h = P.parse(buf, P.FROM_WORKER)
        except P.BadFrame:
            continue
        for check in (lambda: P.read_body(buf, h), lambda: P.check_tensor(buf, h, 2, 3, 4, torch.float32),
                      lambda: P.read_slot_range(buf, h, 2, 16),
                      lambda: P.read_slot_payload(buf, h, range(0, 2), 4, torch.float16)):
            try:
                check()
            except P.BadFrame:
                pass


@pytest.mark.parametrize("body, why", [
    (b"not json", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[]", "a JSON list"), (b"3", "a JSON int"),
    (b"[" * 5000 + b"]" * 5000, "not JSON"),  # deeper than the parser's recursion limit
    (b" " * (P.MAX_BODY + 1), "at most"),
    (b"{}", "'pid' is missing"), (b'{"pid": "1", "rank": null, "host": "h"}', "'pid' is of type str"),
    (b'{"pid": true, "rank": null, "host": "h"}', "'pid' is of type bool"),
    (b'{"pid": 1e400, "rank": null, "host": "h"}', "'pid' is of type float"),
    (b'{"pid": 100000000000000000000000, "rank": null, "host": "h"}', "'pid' is out of range"),
    (b'{"pid": 1, "rank": "0", "host": "h"}', "'rank' is of type str, not int or null"),
    (b'{"pid": 1, "rank": null, "host": 7}', "'host' is of type int"),
])
def test_malformed_hellos_are_named(body, why):
    with pytest.raises(P.BadFrame, match="HELLO") as e:
        P.read_body(frame(P.HELLO, body), P.parse(frame(P.HELLO, body), P.FROM_WORKER))
    assert why in str(e.value)


def test_well_formed_bodies_and_kinds():
    hello = frame(P.HELLO, json.dumps({"pid": 3, "rank": None, "host": "h", "extra": [1]}).encode())
    assert P.read_body(hello, P.parse(hello, P.FROM_WORKER))["pid"] == 3
    with pytest.raises(P.BadFrame, match="unexpected kind 2"):
        P.parse(frame(P.CONFIG), P.FROM_WORKER)  # a worker never sends CONFIG
    with pytest.raises(P.BadFrame, match="shorter than a header"):
        P.parse(b"\x01" * 31, P.FROM_WORKER)


def test_tensor_frames_must_match_their_header_exactly():
    header = P.Header(P.RESULT, P.ATTN, 0, P.DTYPE_CODES[torch.float16], 1, 0, 2, 3)
    buf, payload = P.tensor_message(header, (2, 3, 4), torch.float16)
    P.check_tensor(buf.numpy(), header, 2, 3, 4, torch.float16)
    for B, T, width, dtype in ((2, 1, 4, torch.float16), (2, 3, 5, torch.float16), (2, 3, 4, torch.float32)):
        with pytest.raises(P.BadFrame):
            P.check_tensor(buf.numpy(), header, B, T, width, dtype)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        P.check_tensor(buf.numpy()[:-2], header, 2, 3, 4, torch.float16)


@given(st.integers(1, 80), st.integers(0, 300), st.integers(1, 3 * P.MAX_PAYLOAD))
def test_slot_chunks_cover_every_cell_once_and_fit_a_frame(n_layers, length, cell_bytes):
    seen = torch.zeros(n_layers, length, dtype=torch.int32)
    for layers, positions in P.slot_chunks(n_layers, length, cell_bytes):
        assert len(layers) * len(positions) * cell_bytes <= max(P.MAX_PAYLOAD, cell_bytes)
        seen[layers.start : layers.stop, positions.start : positions.stop] += 1
    assert bool((seen == 1).all())


def test_slot_chunk_messages_round_trip_and_check_their_range():
    k, v = torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4).half()  # (layers, positions, heads, hd)
    buf = P.slot_message(P.SLOT_DATA, 9, 1, range(1, 3), range(5, 8), k, v).numpy()
    h = P.parse(buf, P.FROM_WORKER)
    assert P.read_slot_range(buf, h, 3, 8) == (range(1, 3), range(5, 8))
    got_k, got_v = P.read_slot_payload(buf, h, range(1, 3), 4, torch.float16)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(P.BadFrame, match="outside a cache"):
        P.read_slot_range(buf, h, 2, 8)  # layers 1-2 of a 2-layer cache
    with pytest.raises(P.BadFrame, match="outside a cache"):
        P.read_slot_range(buf, h, 3, 7)  # positions 5-7 of 7
    with pytest.raises(P.BadFrame, match="dtype"):
        P.read_slot_payload(buf, h, range(1, 3), 4, torch.float32)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        P.read_slot_payload(buf[:-1], h, range(1, 3), 4, torch.float16)
