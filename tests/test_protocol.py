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
from shardllama.tensor_frames import BlockChunk, StepBlock, TensorFrame, kv_chunks

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96)
CONFIG = P.WorkerConfig(rank=1, n_workers=2, args=ARGS, dtype="f32", max_seq_len=16, n_blocks=3, block_size=4, threads=1,
                        spin_us=0.0, segment="seg", reduce=None, timeout=5.0, prefill_precision="f32")


def frame(kind: int, body: bytes = b"", fields: bytes = b"", **prelude) -> bytes:
    return bytes(P.Header(kind, **prelude).pack(fields)) + body


def _compute(block: bool, whole: bool = False) -> TensorFrame:
    step = None
    if block:
        start, tables = torch.tensor([3, 0]), torch.tensor([[1, 0, 2], [2, 2, 2]])
        step = StepBlock(start, tables, torch.tensor([2, 1]), 7) if whole else StepBlock(start, tables)
    phase = P.Phase.WHOLE if whole else P.Phase.FFN
    return TensorFrame(P.Kind.COMPUTE, phase, 9, 1, 2, 3, torch.float16, step, all_logits=whole)


def _packed() -> list[tuple[object, bytes]]:
    """One of each message, packed."""
    k, v = torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4).half()  # (layers, positions, heads, hd)
    data = BlockChunk(P.Kind.BLOCK_DATA, 9, (1, 0), 2, 3, range(0, 2), 2, torch.float16)
    msgs = [P.Hello(3, None, "h"), P.Hello(4, 1, "host"), P.Ready(10, {"map shard": 0.5}),
            P.Error("boom", 4, P.Phase.HEAD, 2), P.CopyBlock(5, 0, 2, 3), P.Signal(P.Kind.ACK, 6),
            P.Signal(P.Kind.STOP), P.Signal(P.Kind.PING), CONFIG]
    read = BlockChunk(P.Kind.READ_BLOCKS, 8, (2,), 0, 4, range(1, 2))
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
        for name in ("start", "tables") + (("lengths",) if whole else ()):
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
    for signal in (P.Signal(P.Kind.ACK, 1).pack() + b"x", P.CopyBlock(1, 0, 1, 2).pack()[:-1] + b"{}"):
        with pytest.raises(P.BadFrame, match="bytes, not 32"):
            (P.Signal if signal[0] == P.Kind.ACK else P.CopyBlock).unpack(signal)


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
                        ({"rank": 2}, "rank 2 among 2"), ({"segment": 5}, "'segment' is of type int"),
                        ({"n_blocks": 0}, "'n_blocks' is 0"), ({"block_size": -1}, "'block_size' is -1"),
                        ({"block_size": 1 << 40}, "not between"), ({"n_blocks": None}, "'n_blocks' is of type")):
        with pytest.raises(P.BadFrame, match=why):
            P.WorkerConfig.unpack(frame(P.Kind.CONFIG, json.dumps({**body, **change}).encode()))


def test_ready_keeps_only_plausible_figures():
    ready = frame(P.Kind.READY, json.dumps({"nbytes": 1, "phases": {"a": -1, "b": 0.5, "c": "x"}}).encode())
    assert P.Ready.unpack(ready) == P.Ready(1, {"b": 0.5})


def _readers(buf: bytes, h: P.Header) -> list:
    """Every reader a received frame of ``h.kind`` may meet, at either end."""
    chunk = lambda: BlockChunk.unpack(buf, h)  # noqa: E731

    def step_block():
        msg, _ = TensorFrame.unpack(buf, h, 4)
        if msg.block is not None:
            msg.block.check_within(3, 16, msg.T)

    return [lambda: P.Hello.unpack(buf, h), lambda: P.Ready.unpack(buf, h), lambda: P.Error.unpack(buf, h),
            lambda: P.WorkerConfig.unpack(buf, h), lambda: P.CopyBlock.unpack(buf, h), lambda: P.Signal.unpack(buf, h),
            step_block, lambda: chunk().check_within(3, 4, 2),
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


@given(st.integers(1, 80), st.integers(0, 300), st.integers(1, 3 * P.MAX_PAYLOAD), st.integers(1, 50))
def test_kv_chunks_cover_every_cell_once_and_fit_a_frame(n_layers, length, cell_bytes, max_positions):
    seen = torch.zeros(n_layers, length, dtype=torch.int32)
    for layers, positions in kv_chunks(n_layers, length, cell_bytes, max_positions):
        assert len(layers) * len(positions) * cell_bytes <= max(P.MAX_PAYLOAD, cell_bytes)
        assert 0 < len(positions) <= max_positions
        seen[layers.start : layers.stop, positions.start : positions.stop] += 1
    assert bool((seen == 1).all())


def test_block_chunks_round_trip_and_check_their_range():
    k, v = torch.randn(2, 3, 2, 4).half(), torch.randn(2, 3, 2, 4).half()  # (layers, positions, heads, hd)
    sent = BlockChunk(P.Kind.BLOCK_DATA, 9, (4, 1), 3, 3, range(1, 3), 2, torch.float16)  # blocks of 4: 3 | 0 1
    buf = sent.pack(k, v).numpy()
    got = BlockChunk.unpack(buf, P.parse(buf, P.FROM_WORKER))
    assert got == sent
    got.check_within(5, 4, 3)
    got_k, got_v = got.kv(buf, 4)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    with pytest.raises(P.BadFrame, match="outside a cache of 2 layers"):
        got.check_within(5, 4, 2)  # layers 1-2 of a 2-layer cache
    with pytest.raises(P.BadFrame, match="outside the cache's 4"):
        got.check_within(4, 4, 3)  # block 4 of 4
    with pytest.raises(P.BadFrame, match="in 2 blocks of 8"):
        got.check_within(5, 8, 3)  # in blocks of 8 the positions take one block, not two
    with pytest.raises(P.BadFrame, match="in 2 blocks of 2"):
        got.check_within(5, 2, 3)  # offset 3 is beyond a block of 2
    with pytest.raises(P.BadFrame, match="bytes, not"):
        got.kv(buf[:-1], 4)
    with pytest.raises(P.BadFrame, match="bytes, not"):
        got.kv(buf, 5)
    read = BlockChunk(P.Kind.READ_BLOCKS, 1, (0,), 0, 1, range(0, 1)).pack().numpy()
    for n_ids, why in ((0, "naming 0 blocks"), (P.MAX_CHUNK_BLOCKS + 1, "naming 1025 blocks"), (5, "bytes, not")):
        bad = bytearray(read)
        bad[28:32] = n_ids.to_bytes(4, "little")
        with pytest.raises(P.BadFrame, match=why):
            BlockChunk.unpack(bytes(bad))
    with pytest.raises(P.BadFrame, match="shorter than its block ids"):
        BlockChunk.unpack(bytes(sent.pack(k, v).numpy()[:40]))


def test_step_blocks_are_bounded_and_checked_against_the_cache():
    buf, _ = _compute(True).pack(4)  # tables of 2 rows, 3 wide; 3 positions a row
    msg, _ = TensorFrame.unpack(buf.numpy(), None, 4)
    msg.block.check_within(3, 6, 3)
    with pytest.raises(P.BadFrame, match="outside the cache's 2"):
        msg.block.check_within(2, 6, 3)  # block 2 of 2
    with pytest.raises(P.BadFrame, match="beyond a context of 5"):
        msg.block.check_within(3, 5, 3)  # row 0 reaches position 5
    negative = StepBlock(torch.tensor([-1]), torch.tensor([[0]]))
    with pytest.raises(P.BadFrame, match="beyond a context"):
        negative.check_within(3, 6, 1)
    with pytest.raises(P.BadFrame, match="real lengths"):
        StepBlock(torch.tensor([0]), torch.tensor([[0]]), torch.tensor([0]), 1).check_within(3, 6, 2)
    for W, why in ((0, "tables 0 wide"), (P.MAX_STEP_BYTES // 8, "at most")):  # the W field: bytes 20-24
        bad = bytearray(buf.numpy())
        bad[20:24] = W.to_bytes(4, "little")
        with pytest.raises(P.BadFrame, match=why):
            TensorFrame.unpack(bytes(bad), None, 4)
    plain = bytearray(_compute(False).pack(4)[0].numpy())
    plain[20] = 1
    with pytest.raises(P.BadFrame, match="no step block"):
        TensorFrame.unpack(bytes(plain), None, 4)
    assert StepBlock.nbytes(StepBlock.max_rows(100), 100, True) <= P.MAX_STEP_BYTES
