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
``SLOT_IO``, ``layer`` = the slot, ``B`` = the KV heads in the payload and ``T`` = the positions:

    READ_SLOT   coordinator -> worker, the header alone (B = 0)
    SLOT_DATA   worker -> coordinator, the answer: payload (2, n_layers, T, B, head_dim) -- keys then values
                of the worker's own KV heads (its ``kv_heads`` range), in the cache dtype
    WRITE_SLOT  coordinator -> worker, the same payload for the worker's KV heads; answered by ACK

One frame per worker per transfer, sized by the prompt (a 7B f16 model: 0.5 MB a position over all
workers); the coordinator assembles the full heads from the workers' ranges (a head held by two workers
is taken once, from the lower rank) and cuts them again to write, so a state read with N workers can be
written with any other N.
"""

from __future__ import annotations

import json
import struct
from typing import Any, NamedTuple

import torch

HEADER = struct.Struct("<BBBBIIII")
ALIGN = 32
HEADER_BYTES = ALIGN

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
PING = 10  # coordinator -> remote worker while waiting on it: fails at once if its connection is gone
READ_SLOT = 11  # coordinator -> worker: send the first T positions of cache slot ``layer`` (see above)
SLOT_DATA = 12  # worker -> coordinator: those positions, keys and values of its KV heads
WRITE_SLOT = 13  # coordinator -> worker: fill the first T positions of slot ``layer``; answered by ACK

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


def read_control(buf: Any) -> dict:
    return json.loads(bytes(memoryview(buf)[HEADER_BYTES:]) or b"{}")


def slot_request(step: int, slot: int, length: int) -> bytes:
    """READ_SLOT: ask a worker for the first ``length`` positions of its cache slot ``slot``."""
    head = bytearray(HEADER_BYTES)
    HEADER.pack_into(head, 0, *Header(READ_SLOT, SLOT_IO, 0, 0, step, slot, 0, length))
    return bytes(head)


def slot_message(kind: int, step: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SLOT_DATA or WRITE_SLOT: keys and values, each (n_layers, T, heads, head_dim), in one frame (uint8)."""
    n_layers, T, heads, head_dim = k.shape
    header = Header(kind, SLOT_IO, 0, DTYPE_CODES[k.dtype], step, slot, heads, T)
    buf, payload = tensor_message(header, (2, n_layers, T, heads, head_dim), k.dtype)
    payload[0].copy_(k)
    payload[1].copy_(v)
    return buf


def read_slot_payload(buf: Any, header: Header, n_layers: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v (each (n_layers, T, B, head_dim)) of a SLOT_DATA / WRITE_SLOT frame, viewing it (no copy)."""
    dtype = CODE_DTYPES[header.dtype]
    shape = (2, n_layers, header.T, header.B, head_dim)
    n = 2 * n_layers * header.T * header.B * head_dim
    if n == 0:
        both = torch.empty(shape, dtype=dtype)
    else:
        both = torch.frombuffer(buf, dtype=dtype, count=n, offset=HEADER_BYTES).view(shape)
    return both[0], both[1]
