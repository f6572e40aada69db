"""Messages between the coordinator and its workers (ZeroMQ, ROUTER at the coordinator, DEALER at each worker).

Every message is one frame (the ROUTER adds the worker's routing id in front), no pickle:

    offset 0    header   <BBBBIIII: kind, phase, flags, dtype code, step id, layer, B, T   (20 bytes)
    offset 32   step     only with flag NEW_STEP: start[B], slots[B] as int64, and in a WHOLE pass also
                         lengths[B] and the pass number; padded to 32 bytes
    then        payload  the raw bytes of one C-contiguous tensor: (B, T, dim) activations or partial
                         sums, (B, T, vocab slice) logits; or, for control messages, UTF-8 JSON

One frame instead of header + payload frames: each extra frame costs a send call (~10 us), more than
copying a decode step's few kilobytes into place.  The payload starts on a 32-byte boundary, so the
receiver computes on a ``torch.frombuffer`` view of the frame without copying.

One forward pass is, per layer, ``COMPUTE(ATTN, h)`` -> ``RESULT(partial)`` from every worker, the
coordinator sums, ``COMPUTE(FFN, h)`` -> ``RESULT``, sums; then ``COMPUTE(HEAD, h)`` -> logits slices.
Step ids let the coordinator drop late answers to a pass it has given up on.

A *whole pass* (phase WHOLE, local workers summing through shared memory: ``allreduce``) is one
``COMPUTE(WHOLE, embedded tokens)`` -> ``RESULT(logits slice)`` per worker: the workers run every layer
and reduce among themselves.

Reading and writing a KV-cache slot (the server's prompt cache on disk) reuse the header with phase
``SLOT_IO``, ``layer`` = the slot, ``B`` = the KV heads in the payload and ``T`` = the positions, followed by a
range block (int64: first position, first layer, layers; padded to 32 bytes):

    READ_SLOT   coordinator -> worker, header and range block (B = 0)
    SLOT_DATA   worker -> coordinator, the answer: payload (2, layers, T, B, head_dim) -- keys then values
                of the worker's own KV heads (its ``kv_heads`` range), in the cache dtype
    WRITE_SLOT  coordinator -> worker, the same payload for the worker's KV heads; answered by ACK

A slot is moved in chunks (:func:`slot_chunks`) that fit a frame, one request and one answer per worker
per chunk; the coordinator assembles the full heads from the workers' ranges (a head held by two workers
is taken once, from the lower rank) and cuts them again to write, so a state read with N workers can be
written with any other N.

Every frame is bounded (``MAX_FRAME``, ZMQ_MAXMSGSIZE on both ends: ZeroMQ drops a peer that announces a
bigger one before reading it) and checked before use: :func:`parse` (length, kind), :func:`read_body`
(JSON object with the fields each kind needs, of the right types), :func:`check_tensor` and the slot
readers (sizes consistent with the frame's length).  What does not fit raises :class:`BadFrame`.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import torch

HEADER = struct.Struct("<BBBBIIII")
ALIGN = 32
HEADER_BYTES = ALIGN
SLOT_RANGE = struct.Struct("<qqq")  # first position, first layer, layers
SLOT_PAYLOAD = HEADER_BYTES + ALIGN  # where a slot chunk's payload starts

# Frame bounds.  A tensor payload is at most MAX_PAYLOAD: bigger passes are cut into pieces (``chunked``)
# and slots moved in chunks.  4 MiB is 256 positions of a 4096-wide model in f32 -- a piece costs one extra
# round of messages, noise next to computing 256 rows -- and keeps what an unauthenticated peer can make
# the coordinator hold small.  The step block of MAX_ROWS rows fits in the slack.  Only the logits of a
# batch (n_slots rows x a vocabulary slice) may be bigger: the coordinator raises its bound to fit them
# (``max_frame``).
MAX_PAYLOAD = 4 << 20
MAX_ROWS = 2048  # rows (B) of one pass piece
MAX_FRAME = MAX_PAYLOAD + (64 << 10)
MAX_BODY = 64 << 10  # a control message's JSON

# kinds
HELLO = 1  # worker -> coordinator: {"pid", "rank" (None for a remote worker), "host"}
CONFIG = 2  # coordinator -> worker: everything it needs to build its shard (see Coordinator._config)
READY = 3  # worker -> coordinator: shard built, cache allocated: {"nbytes"}
COMPUTE = 4  # coordinator -> worker: one phase of one layer
RESULT = 5  # worker -> coordinator: the partial sum (or logits slice)
ERROR = 6  # worker -> coordinator: {"message"}; the worker carries on
COPY_SLOT = 7  # coordinator -> worker: {"src", "dst", "length"}
ACK = 8  # worker -> coordinator: a control request is done
STOP = 9  # coordinator -> worker: exit now
PING = 10  # coordinator -> remote worker, before a request and while waiting: refused at once if it is gone
READ_SLOT = 11  # coordinator -> worker: send a chunk (positions x layers) of cache slot ``layer`` (see above)
SLOT_DATA = 12  # worker -> coordinator: that chunk, keys and values of its KV heads
WRITE_SLOT = 13  # coordinator -> worker: fill a chunk of slot ``layer``; answered by ACK
KIND_NAMES = {HELLO: "HELLO", CONFIG: "CONFIG", READY: "READY", COMPUTE: "COMPUTE", RESULT: "RESULT", ERROR: "ERROR",
              COPY_SLOT: "COPY_SLOT", ACK: "ACK", STOP: "STOP", PING: "PING", READ_SLOT: "READ_SLOT",
              SLOT_DATA: "SLOT_DATA", WRITE_SLOT: "WRITE_SLOT"}
FROM_WORKER = frozenset({HELLO, READY, RESULT, ERROR, ACK, SLOT_DATA})
TO_WORKER = frozenset({CONFIG, COMPUTE, COPY_SLOT, STOP, PING, READ_SLOT, WRITE_SLOT})

# phases of COMPUTE / RESULT
ATTN, FFN, HEAD, WHOLE = 0, 1, 2, 3
SLOT_IO = 4  # of READ_SLOT / SLOT_DATA / WRITE_SLOT (and of a worker's ERROR answering them)
PHASE_NAMES = {ATTN: "attention", FFN: "feed-forward", HEAD: "output head", WHOLE: "whole pass",
               SLOT_IO: "KV-cache slot transfer"}

# flags
NEW_STEP = 1  # the step block (start, slots) follows the header; the worker builds a new model.Step
ALL_LOGITS = 2  # a whole pass returns the logits of every position, not only each row's last real one

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

_INT, _NUM, _STR, _NONE = (int,), (int, float), (str,), (type(None),)
# The fields each control message must carry, with their types (more are allowed).
BODIES: dict[int, dict[str, tuple[type, ...]]] = {
    HELLO: {"pid": _INT, "rank": _INT + _NONE, "host": _STR},
    READY: {"nbytes": _INT},
    ERROR: {"message": _STR},
    COPY_SLOT: {"src": _INT, "dst": _INT, "length": _INT},
    CONFIG: {"rank": _INT, "n_workers": _INT, "args": (dict,), "dtype": _STR, "max_seq_len": _INT, "n_slots": _INT,
             "threads": _INT, "spin_us": _NUM, "segment": _STR + _NONE, "reduce": _STR + _NONE, "timeout": _NUM,
             "prefill_precision": _STR},
}


class BadFrame(Exception):
    """A frame that does not follow this protocol; the message says how, in one line."""


class Header(NamedTuple):
    kind: int
    phase: int = 0
    flags: int = 0
    dtype: int = 0
    step: int = 0
    layer: int = 0
    B: int = 0
    T: int = 0

    @classmethod
    def unpack(cls, buf: Any) -> "Header":
        return cls._make(HEADER.unpack_from(buf, 0))

    def name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")


def parse(buf: Any, kinds: frozenset[int]) -> Header:
    """The header of a received frame, which must be long enough and of one of ``kinds``."""
    n = memoryview(buf).nbytes
    if n < HEADER_BYTES:
        raise BadFrame(f"a frame of {n} bytes, shorter than a header")
    header = Header.unpack(buf)
    if header.kind not in kinds:
        raise BadFrame(f"a message of unexpected kind {header.kind}")
    return header


def _step_words(header: Header) -> int:
    """int64s in the step block: start and slots, and for a whole pass also lengths and the pass number."""
    if not header.flags & NEW_STEP:
        return 0
    return 3 * header.B + 1 if header.phase == WHOLE else 2 * header.B


def _step_bytes(header: Header) -> int:
    return -(-8 * _step_words(header) // ALIGN) * ALIGN


def tensor_message(
    header: Header,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    start: torch.Tensor | None = None,  # (B,) with NEW_STEP
    slots: torch.Tensor | None = None,  # (B,) with NEW_STEP
    lengths: torch.Tensor | None = None,  # (B,) with NEW_STEP in a whole pass
    pass_no: int = 0,  # with NEW_STEP in a whole pass
) -> tuple[torch.Tensor, torch.Tensor]:
    """A new message buffer (uint8, sent as is) and a view of its payload to write the tensor into."""
    n = 1
    for s in shape:
        n *= s
    offset = HEADER_BYTES + _step_bytes(header)
    buf = torch.empty(offset + n * dtype.itemsize, dtype=torch.uint8)
    HEADER.pack_into(buf.numpy(), 0, *header)
    if header.flags & NEW_STEP:
        assert start is not None and slots is not None and len(start) == len(slots) == header.B
        B = header.B
        step = buf[HEADER_BYTES : HEADER_BYTES + 8 * _step_words(header)].view(torch.int64)
        step[:B] = start
        step[B : 2 * B] = slots
        if header.phase == WHOLE:
            assert lengths is not None and len(lengths) == B
            step[2 * B : 3 * B] = lengths
            step[3 * B] = pass_no
    return buf, buf[offset:].view(dtype).view(shape)


def read_tensor(buf: Any, header: Header, width: int) -> torch.Tensor:
    """The payload of a received message as a (B, T, width) tensor viewing the frame (no copy)."""
    dtype = CODE_DTYPES[header.dtype]
    n = header.B * header.T * width
    if n == 0:
        return torch.empty((header.B, header.T, width), dtype=dtype)
    offset = HEADER_BYTES + _step_bytes(header)
    return torch.frombuffer(buf, dtype=dtype, count=n, offset=offset).view(header.B, header.T, width)


def check_tensor(buf: Any, header: Header, B: int, T: int, width: int, dtype: torch.dtype) -> None:
    """A COMPUTE / RESULT frame must carry exactly (B, T, width) values of ``dtype`` (after its step block)."""
    if header.dtype != DTYPE_CODES[dtype] or (header.B, header.T) != (B, T):
        raise BadFrame(f"{header.name()} of {header.B}x{header.T} values of dtype code {header.dtype}, "
                       f"not {B}x{T} of {dtype}")
    want = HEADER_BYTES + _step_bytes(header) + B * T * width * dtype.itemsize
    if memoryview(buf).nbytes != want:
        raise BadFrame(f"{header.name()} of {memoryview(buf).nbytes} bytes, not {want}")


def read_step(buf: Any, header: Header) -> tuple[torch.Tensor, torch.Tensor]:
    """start and slots (each (B,) long) of a NEW_STEP message (copies: they outlive the frame)."""
    both = torch.frombuffer(buf, dtype=torch.int64, count=2 * header.B, offset=HEADER_BYTES).clone()
    return both[: header.B], both[header.B :]


def read_whole(buf: Any, header: Header) -> tuple[torch.Tensor, int]:
    """lengths ((B,) long) and the pass number of a whole pass's NEW_STEP message."""
    words = torch.frombuffer(buf, dtype=torch.int64, count=3 * header.B + 1, offset=HEADER_BYTES)
    return words[2 * header.B : 3 * header.B].clone(), int(words[3 * header.B])


def control(kind: int, body: dict | None = None, **fields: int) -> bytes:
    """A header (``fields``: step, layer, phase) followed by a JSON body."""
    head = bytearray(HEADER_BYTES)
    HEADER.pack_into(head, 0, *Header(kind, **fields))
    return bytes(head) + json.dumps(body or {}).encode()


def read_body(buf: Any, header: Header) -> dict:
    """The body of a received control message: a JSON object with the fields ``BODIES`` lists for its kind."""
    raw = bytes(memoryview(buf)[HEADER_BYTES:])
    if len(raw) > MAX_BODY:
        raise BadFrame(f"{header.name()} with a body of {len(raw)} bytes (at most {MAX_BODY})")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadFrame(f"{header.name()} whose body is not JSON") from None
    if not isinstance(body, dict):
        raise BadFrame(f"{header.name()} whose body is a JSON {type(body).__name__}, not an object")
    for key, types in BODIES.get(header.kind, {}).items():
        value = body.get(key, ...)
        if type(value) not in types:  # (bool is an int to Python, not to us)
            raise BadFrame(f"{header.name()} whose {key!r} is {_describe(value)}, not "
                           f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
        if type(value) is int and not -(1 << 63) <= value < 1 << 63:  # ints end up in tensors and logs
            raise BadFrame(f"{header.name()} whose {key!r} is out of range")
    return body


def _describe(value: Any) -> str:
    return "missing" if value is ... else f"of type {type(value).__name__}"


def slot_chunks(n_layers: int, length: int, cell_bytes: int) -> list[tuple[range, range]]:
    """(layers, positions) chunks covering ``length`` positions of a slot, each at most MAX_PAYLOAD bytes when
    one layer's keys and values at one position take ``cell_bytes``: whole layers by runs of positions, or
    runs of layers one position at a time where a position of every layer is too big."""
    cells = max(1, MAX_PAYLOAD // cell_bytes)
    if cells >= n_layers:
        step = cells // n_layers
        return [(range(n_layers), range(p, min(p + step, length))) for p in range(0, length, step)]
    return [(range(l, min(l + cells, n_layers)), range(p, p + 1)) for p in range(length) for l in range(0, n_layers, cells)]


def _slot_header(kind: int, step: int, slot: int, dtype: int, heads: int, layers: range,
                 positions: range) -> torch.Tensor:
    buf = torch.zeros(SLOT_PAYLOAD, dtype=torch.uint8)
    HEADER.pack_into(buf.numpy(), 0, *Header(kind, SLOT_IO, 0, dtype, step, slot, heads, len(positions)))
    SLOT_RANGE.pack_into(buf.numpy(), HEADER_BYTES, positions.start, layers.start, len(layers))
    return buf


def slot_request(step: int, slot: int, layers: range, positions: range) -> bytes:
    """READ_SLOT: ask a worker for ``positions`` of ``layers`` of its cache slot ``slot``."""
    return bytes(_slot_header(READ_SLOT, step, slot, 0, 0, layers, positions).numpy())


def slot_message(kind: int, step: int, slot: int, layers: range, positions: range, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
    """SLOT_DATA or WRITE_SLOT: keys and values, each (layers, positions, heads, head_dim), in one frame (uint8)."""
    n_layers, T, heads, head_dim = k.shape
    assert (n_layers, T) == (len(layers), len(positions)), (k.shape, layers, positions)
    head = _slot_header(kind, step, slot, DTYPE_CODES[k.dtype], heads, layers, positions)
    buf = torch.empty(SLOT_PAYLOAD + 2 * k.numel() * k.element_size(), dtype=torch.uint8)
    buf[:SLOT_PAYLOAD] = head
    payload = buf[SLOT_PAYLOAD:].view(k.dtype).view(2, n_layers, T, heads, head_dim)
    payload[0].copy_(k)
    payload[1].copy_(v)
    return buf


def read_slot_range(buf: Any, header: Header, n_layers: int, max_seq_len: int) -> tuple[range, range]:
    """The (layers, positions) of a slot chunk, which must lie inside a cache of ``n_layers`` x ``max_seq_len``."""
    if memoryview(buf).nbytes < SLOT_PAYLOAD:
        raise BadFrame(f"{header.name()} without its range block")
    first, layer0, count = SLOT_RANGE.unpack_from(buf, HEADER_BYTES)
    if not (0 <= first <= first + header.T <= max_seq_len and 0 <= layer0 < layer0 + count <= n_layers):
        raise BadFrame(f"{header.name()} of positions {first}+{header.T}, layers {layer0}+{count}: outside a "
                       f"cache of {max_seq_len} positions, {n_layers} layers")
    return range(layer0, layer0 + count), range(first, first + header.T)


def read_slot_payload(buf: Any, header: Header, layers: range, head_dim: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v (each (layers, T, B, head_dim)) of a SLOT_DATA / WRITE_SLOT chunk, viewing it (no copy)."""
    if header.dtype != DTYPE_CODES[dtype]:
        raise BadFrame(f"{header.name()} of dtype code {header.dtype}, not {dtype}")
    shape = (2, len(layers), header.T, header.B, head_dim)
    n = 2 * len(layers) * header.T * header.B * head_dim
    if memoryview(buf).nbytes != SLOT_PAYLOAD + n * dtype.itemsize:
        raise BadFrame(f"{header.name()} of {memoryview(buf).nbytes} bytes, not {SLOT_PAYLOAD + n * dtype.itemsize}")
    if n == 0:
        both = torch.empty(shape, dtype=dtype)
    else:
        both = torch.frombuffer(buf, dtype=dtype, count=n, offset=SLOT_PAYLOAD).view(shape)
    return both[0], both[1]
