"""The wire format's checks: every message packs and unpacks to itself, and whatever bytes a peer sends,
reading them raises BadFrame or gives what the protocol promises -- never another exception (which would
reach the coordinator as a traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.tensor_frames import StepBlock, SlotChunk, TensorFrame, slot_chunks

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96)
CONFIG = P.WorkerConfig(rank=1, n_workers=2, args=ARGS, dtype="f32", max_seq_len=16, n_slots=3, threads=1,
                        spin_us=0.0, segment="seg", reduce=None, timeout=5.0, prefill_precision="f32")


def frame(kind: int, body: bytes = b"", fields: bytes = b"", **prelude) -> bytes:
    return bytes(P.Header(kind, **prelude).pack(fields)) + body


def _compute(block: bool, whole: bool = False) -> TensorFrame:
    step = None
    if block:
        start, slots = torch.tensor([3, 0]), torch.tensor([1, 2])
        step = StepBlock(start, slots, torch.tensor([2, 1]), 7) if whole else StepBlock(start, slots)
    phase = P.Phase.WHOLE if whole else P.Phase.FFN
    return TensorFrame(P.Kind.COMPUTE, phase, 9, 1, 2, 3, torch.float16, step, all_logits=whole)


def _packed() -> list[tuple[object, bytes]]:
    """One of each message, packed."""
    k, v = torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4).half()  # (layers, positions, heads, hd)
    data = SlotChunk(P.Kind.SLOT_DATA, 9, 1, range(0, 2), range(5, 8), 2, torch.float16)
    msgs = [P.Hello(3, None, "h"), P.Hello(4, 1, "host"), P.Ready(10, {"map shard": 0.5}),
            P.Error("boom", 4, P.Phase.HEAD, 2), P.CopySlot(5, 0, 2, 7), P.Signal(P.Kind.ACK, 6),
            P.Signal(P.Kind.STOP), P.Signal(P.Kind.PING), CONFIG]
    read = SlotChunk(P.Kind.READ_SLOT, 8, 2, range(1, 2), range(0, 4))
    return [(m, m.pack()) for m in msgs] + [(read, bytes(read.pack().numpy())), (data, bytes(data.pack(k, v).numpy()))]


def test_every_message_round_trips():
    for msg, buf in _packed():
        assert memoryview(buf).nbytes < P.MAX_FRAME
        assert type(msg).unpack(buf, P.parse(buf, P.FROM_WORKER | P.TO_WORKER)) == msg
        assert type(msg).unpack(buf) == msg  # (parsing the prelude itself)


@pytest.mark.parametrize("block, whole", [(False, False), (True, False), (True, True)])
def test_tensor_frames_round_trip_with_a_payload_view_on_32_bytes(block, whole):
    msg = _compute(block, whole)
    buf, payload = msg.pack(5)
    payload.copy_(torch.arange(30).view(2, 3, 5))
    got, view = TensorFrame.unpack(buf.numpy(), P.parse(buf.numpy(), P.TO_WORKER), 5)
    assert (got.kind, got.phase, got.step, got.layer, got.B, got.T, got.dtype, got.all_logits) == \
        (msg.kind, msg.phase, msg.step, msg.layer, msg.B, msg.T, msg.dtype, msg.all_logits)
    assert (got.block is None) == (msg.block is None)
    if block:
        for name in ("start", "slots") + (("lengths",) if whole else ()):
            assert torch.equal(getattr(got.block, name), getattr(msg.block, name))
        assert got.block.pass_no == msg.block.pass_no
    assert torch.equal(view, payload)
    offset = view.data_ptr() - buf.data_ptr()
    assert offset % P.ALIGN == 0 and offset >= P.HEAD_BYTES  # a view of the frame itself: no copy


def test_tensor_frames_must_be_exactly_what_their_fields_say():
    buf, _ = _compute(False).pack(4)
    buf = buf.numpy()
    TensorFrame.unpack(buf, None, 4)
    for width in (3, 5):
        with pytest.raises(P.BadFrame, match="bytes, not"):
            TensorFrame.unpack(buf, None, width)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        TensorFrame.unpack(buf[:-2], None, 4)
    bad = bytearray(buf)
    bad[3] = 9  # dtype code
    with pytest.raises(P.BadFrame, match="dtype code 9"):
        TensorFrame.unpack(bytes(bad), None, 4)


def test_malformed_preludes():
    with pytest.raises(P.BadFrame, match="unexpected kind 2"):
        P.parse(frame(P.Kind.CONFIG), P.FROM_WORKER)  # a worker never sends CONFIG
    with pytest.raises(P.BadFrame, match="shorter than a header"):
        P.parse(b"\x01" * 31, P.FROM_WORKER)
    with pytest.raises(P.BadFrame, match="unknown phase 9"):
        P.parse(frame(P.Kind.RESULT, phase=9), P.FROM_WORKER)
    with pytest.raises(P.BadFrame, match="flags 4"):
        P.parse(frame(P.Kind.RESULT, flags=4), P.FROM_WORKER)
    with pytest.raises(P.BadFrame, match="HELLO where READY"):
        P.Ready.unpack(P.Hello(1, None, "h").pack(), P.parse(P.Hello(1, None, "h").pack(), P.FROM_WORKER))
    for signal in (P.Signal(P.Kind.ACK, 1).pack() + b"x", P.CopySlot(1, 0, 1, 2).pack()[:-1] + b"{}"):
        with pytest.raises(P.BadFrame, match="bytes, not 32"):
            (P.Signal if signal[0] == P.Kind.ACK else P.CopySlot).unpack(signal)


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
        P.Hello.unpack(frame(P.Kind.HELLO, body))
    assert why in str(e.value)


def test_extra_fields_are_allowed_and_configs_must_make_a_model():
    hello = frame(P.Kind.HELLO, json.dumps({"pid": 3, "rank": None, "host": "h", "extra": [1]}).encode())
    assert P.Hello.unpack(hello) == P.Hello(3, None, "h")
    body = json.loads(CONFIG.pack()[P.HEAD_BYTES:])
    for change, why in (({"args": {**body["args"], "dim": 65}}, "not a model's"),
                        ({"args": {**body["args"], "colour": 1}}, "not a model's"),
                        ({"rank": 2}, "rank 2 among 2"), ({"segment": 5}, "'segment' is of type int")):
        with pytest.raises(P.BadFrame, match=why):
            P.WorkerConfig.unpack(frame(P.Kind.CONFIG, json.dumps({**body, **change}).encode()))


def test_ready_keeps_only_plausible_figures():
    ready = frame(P.Kind.READY, json.dumps({"nbytes": 1, "phases": {"a": -1, "b": 0.5, "c": "x"}}).encode())
    assert P.Ready.unpack(ready) == P.Ready(1, {"b": 0.5})


def _readers(buf: bytes, h: P.Header) -> list:
    """Every reader a received frame of ``h.kind`` may meet, at either end."""
    chunk = lambda: SlotChunk.unpack(buf, h)  # noqa: E731
    return [lambda: P.Hello.unpack(buf, h), lambda: P.Ready.unpack(buf, h), lambda: P.Error.unpack(buf, h),
            lambda: P.WorkerConfig.unpack(buf, h), lambda: P.CopySlot.unpack(buf, h), lambda: P.Signal.unpack(buf, h),
            lambda: TensorFrame.unpack(buf, h, 4), lambda: chunk().check_within(3, 2, 16),
            lambda: chunk().kv(buf, 4) if chunk().dtype is not None else None]


def _read_everything(buf: bytes) -> None:
    try:
        h = P.parse(buf, P.FROM_WORKER | P.TO_WORKER)
    except P.BadFrame:
        return
    for read in _readers(buf, h):
        try:
            read()
        except P.BadFrame:
            pass


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from(sorted(P.Kind)), st.integers(0, 5), st.integers(0, 3))
def test_any_bytes_parse_or_raise_badframe(junk, kind, phase, flags):
    for buf in (junk, frame(kind, junk, phase=phase, flags=flags), frame(kind, phase=phase) + junk[:8],
                frame(kind, junk[24:], junk[:24], phase=phase, flags=flags, dtype=2)):
        _read_everything(buf)


@settings(max_examples=200)
@given(st.data())
def test_truncated_or_damaged_messages_raise_badframe(data):
    """Every well-formed message cut short, lengthened or with a byte changed: read, or BadFrame."""
    computes = (_compute(True, True), _compute(False))
    good = [buf for _, buf in _packed()] + [bytes(m.pack(4)[0].numpy()) for m in computes]
    buf = bytearray(data.draw(st.sampled_from(good)))
    how = data.draw(st.sampled_from(["cut", "grow", "flip"]))
    if how == "cut":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif how == "grow":
        buf += data.draw(st.binary(min_size=1, max_size=40))
    else:
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    _read_everything(bytes(buf))


@given(st.integers(1, 80), st.integers(0, 300), st.integers(1, 3 * P.MAX_PAYLOAD))
def test_slot_chunks_cover_every_cell_once_and_fit_a_frame(n_layers, length, cell_bytes):
    seen = torch.zeros(n_layers, length, dtype=torch.int32)
    for layers, positions in slot_chunks(n_layers, length, cell_bytes):
        assert len(layers) * len(positions) * cell_bytes <= max(P.MAX_PAYLOAD, cell_bytes)
        seen[layers.start : layers.stop, positions.start : positions.stop] += 1
    assert bool((seen == 1).all())


def test_slot_chunks_round_trip_and_check_their_range():
    k, v = torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4).half()  # (layers, positions, heads, hd)
    sent = SlotChunk(P.Kind.SLOT_DATA, 9, 1, range(1, 3), range(5, 8), 2, torch.float16)
    buf = sent.pack(k, v).numpy()
    got = SlotChunk.unpack(buf, P.parse(buf, P.FROM_WORKER))
    assert got == sent
    got.check_within(2, 3, 8)
    got_k, got_v = got.kv(buf, 4)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(P.BadFrame, match="outside a cache"):
        got.check_within(2, 2, 8)  # layers 1-2 of a 2-layer cache
    with pytest.raises(P.BadFrame, match="outside a cache"):
        got.check_within(2, 3, 7)  # positions 5-7 of 7
    with pytest.raises(P.BadFrame, match="slot 1, outside the cache's 1"):
        got.check_within(1, 3, 8)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        got.kv(buf[:-1], 4)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        got.kv(buf, 5)
