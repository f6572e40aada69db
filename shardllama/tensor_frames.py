"""The messages whose payload is a tensor (``protocol`` has the frame layout): COMPUTE / RESULT, the hot
path, and the chunks of a KV-cache slot.

A tensor frame is built around its payload: ``pack`` makes the whole frame and returns a view of the payload
for the caller to write the tensor into (the coordinator embeds tokens, sums partials and the worker copies
its answer straight into the next frame); ``unpack`` checks that the frame's length is exactly what its
fields announce and returns a ``torch.frombuffer`` view of the payload (no copy).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, ClassVar, NamedTuple

import torch

from .protocol import (ALIGN, DTYPE_CODES, HEAD_BYTES, MAX_PAYLOAD, PRELUDE, BadFrame, Flag, Header, Kind, Phase,
                       check_kind, check_length, frame_dtype)


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _view(buf: Any, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = _numel(shape)
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=n, offset=offset).view(shape)


@dataclasses.dataclass(frozen=True, eq=False)
class StepBlock:
    """What a COMPUTE that begins a step carries (flag NEW_STEP): where each row starts and which cache slot
    it uses; in a whole pass also each row's real length and the pass number (the reductions' tickets).
    The worker builds its ``model.Step`` from it and keeps it for the step's later layers."""

    start: torch.Tensor  # (B,) int64
    slots: torch.Tensor  # (B,) int64
    lengths: torch.Tensor | None = None  # (B,) int64, a whole pass only
    pass_no: int = 0  # a whole pass only

    @staticmethod
    def nbytes(B: int, whole: bool) -> int:
        return _padded(8 * (3 * B + 1 if whole else 2 * B))

    def pack_into(self, block: torch.Tensor) -> None:
        """Write into ``block``, the uint8 bytes of the frame it goes to (:meth:`nbytes` of them)."""
        B = len(self.start)
        words = block[: 8 * (3 * B + 1 if self.lengths is not None else 2 * B)].view(torch.int64)
        assert len(self.slots) == B, (self.start, self.slots)
        words[:B] = self.start
        words[B : 2 * B] = self.slots
        if self.lengths is not None:
            assert len(self.lengths) == B, (self.start, self.lengths)
            words[2 * B : 3 * B] = self.lengths
            words[3 * B] = self.pass_no

    @classmethod
    def unpack(cls, buf: Any, B: int, whole: bool) -> "StepBlock":
        """The block after the head of ``buf`` (copies: it outlives the frame); the frame's length is checked
        already."""
        words = _view(buf, HEAD_BYTES, (3 * B + 1 if whole else 2 * B,), torch.int64).clone()
        if whole:
            return cls(words[:B], words[B : 2 * B], words[2 * B : 3 * B], int(words[3 * B]))
        return cls(words[:B], words[B : 2 * B])


_FIELDS = struct.Struct("<III")  # a TensorFrame's: layer, B, T
_TENSOR_KINDS = frozenset({Kind.COMPUTE, Kind.RESULT})
# Members looked up once: reading one off its enum class takes ~1 us (a descriptor), too much per frame.
_NEW_STEP, _ALL_LOGITS, _WHOLE = int(Flag.NEW_STEP), int(Flag.ALL_LOGITS), Phase.WHOLE


class TensorFrame(NamedTuple):
    """COMPUTE (coordinator -> worker: one phase of one layer over ``h``) or RESULT (the worker's partial
    sum or logits slice): a (B, T, width) tensor of ``dtype``; ``width`` is what both ends know (the model's
    dim, a worker's vocabulary slice), so it is not on the wire.

    Immutable like the other messages, but a NamedTuple rather than a frozen dataclass: a decode step makes
    and reads several per layer, and a frozen dataclass takes ~4 us to make, ten times a tuple."""

    kind: Kind
    phase: Phase
    step: int
    layer: int
    B: int
    T: int
    dtype: torch.dtype
    block: StepBlock | None = None  # COMPUTE only: a new step begins
    all_logits: bool = False  # a whole pass's COMPUTE: logits of every position

    def _offset(self) -> int:
        return HEAD_BYTES + (StepBlock.nbytes(self.B, self.phase == Phase.WHOLE) if self.block is not None else 0)

    def pack(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A new frame (uint8, sent as is) and a view of its (B, T, width) payload to write the tensor into."""
        flags = (Flag.NEW_STEP if self.block is not None else 0) | (Flag.ALL_LOGITS if self.all_logits else 0)
        offset = self._offset()
        buf = torch.empty(offset + self.B * self.T * width * self.dtype.itemsize, dtype=torch.uint8)
        mem = buf.numpy()
        PRELUDE.pack_into(mem, 0, self.kind, self.phase, flags, DTYPE_CODES[self.dtype], self.step)
        _FIELDS.pack_into(mem, PRELUDE.size, self.layer, self.B, self.T)
        mem[PRELUDE.size + _FIELDS.size : HEAD_BYTES] = 0
        if self.block is not None:
            assert (self.block.lengths is not None) == (self.phase == Phase.WHOLE), self.phase
            self.block.pack_into(buf[HEAD_BYTES:offset])
        return buf, buf[offset:].view(self.dtype).view(self.B, self.T, width)

    @classmethod
    def unpack(cls, buf: Any, header: Header | None, width: int) -> tuple["TensorFrame", torch.Tensor]:
        """The message and its (B, T, width) payload viewing the frame (no copy); BadFrame unless the frame
        holds exactly that."""
        header = check_kind(buf, header, _TENSOR_KINDS)
        dtype = frame_dtype(header)
        layer, B, T = _FIELDS.unpack_from(buf, PRELUDE.size)
        flags = int(header.flags)  # (an IntFlag's & takes microseconds)
        new_step, whole = bool(flags & _NEW_STEP), header.phase == _WHOLE
        offset = HEAD_BYTES + (StepBlock.nbytes(B, whole) if new_step else 0)
        check_length(buf, header, offset + B * T * width * dtype.itemsize)
        block = StepBlock.unpack(buf, B, whole) if new_step else None
        msg = cls(header.kind, header.phase, header.step, layer, B, T, dtype, block,
                  bool(flags & _ALL_LOGITS))
        return msg, _view(buf, offset, (B, T, width), dtype)


@dataclasses.dataclass(frozen=True)
class SlotChunk:
    """A chunk of KV-cache slot ``slot``: ``positions`` of ``layers``.  READ_SLOT asks for it (no payload,
    ``heads`` 0); SLOT_DATA answers and WRITE_SLOT fills it, with a payload (2, layers, T, heads, head_dim):
    keys then values of the sender's / receiver's ``heads`` KV heads in ``dtype``."""

    kind: Kind
    step: int
    slot: int
    layers: range
    positions: range
    heads: int = 0
    dtype: torch.dtype | None = None
    FIELDS: ClassVar = struct.Struct("<IIIIII")  # slot, first layer, layers, first position, positions, heads

    def pack(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """The frame (uint8); SLOT_DATA and WRITE_SLOT copy k and v (each (layers, T, heads, head_dim)) in."""
        fields = self.FIELDS.pack(self.slot, self.layers.start, len(self.layers), self.positions.start,
                                  len(self.positions), self.heads)
        code = DTYPE_CODES[self.dtype] if self.dtype is not None else 0
        head = torch.frombuffer(Header(self.kind, Phase.SLOT_IO, dtype=code, step=self.step).pack(fields),
                                dtype=torch.uint8)
        if self.kind == Kind.READ_SLOT:
            return head
        assert k is not None and v is not None and k.dtype == v.dtype == self.dtype, (k, v, self.dtype)
        assert k.shape[:3] == (len(self.layers), len(self.positions), self.heads), (k.shape, self)
        buf = torch.empty(HEAD_BYTES + 2 * k.numel() * k.element_size(), dtype=torch.uint8)
        buf[:HEAD_BYTES] = head
        payload = buf[HEAD_BYTES:].view(k.dtype).view(2, *k.shape)
        payload[0].copy_(k)
        payload[1].copy_(v)
        return buf

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "SlotChunk":
        """The chunk's fields (its payload: :meth:`kv`)."""
        header = check_kind(buf, header, frozenset({Kind.READ_SLOT, Kind.SLOT_DATA, Kind.WRITE_SLOT}))
        slot, layer0, n_layers, first, T, heads = cls.FIELDS.unpack_from(buf, PRELUDE.size)
        dtype = None
        if header.kind == Kind.READ_SLOT:
            check_length(buf, header, HEAD_BYTES)
        else:
            dtype = frame_dtype(header)
        return cls(header.kind, header.step, slot, range(layer0, layer0 + n_layers), range(first, first + T), heads,
                   dtype)

    def check_within(self, n_slots: int, n_layers: int, max_seq_len: int) -> None:
        """BadFrame unless the chunk lies inside a cache of ``n_slots`` x ``n_layers`` x ``max_seq_len``."""
        if self.slot >= n_slots:
            raise BadFrame(f"{self.kind.name} of slot {self.slot}, outside the cache's {n_slots}")
        if not (self.positions.stop <= max_seq_len and 0 < len(self.layers) and self.layers.stop <= n_layers):
            raise BadFrame(f"{self.kind.name} of positions {self.positions.start}+{len(self.positions)}, layers "
                           f"{self.layers.start}+{len(self.layers)}: outside a cache of {max_seq_len} positions, "
                           f"{n_layers} layers")

    def kv(self, buf: Any, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v (each (layers, T, heads, head_dim)) of a SLOT_DATA / WRITE_SLOT frame, viewing it (no copy)."""
        assert self.dtype is not None, self.kind
        shape = (2, len(self.layers), len(self.positions), self.heads, head_dim)
        want = HEAD_BYTES + _numel(shape) * self.dtype.itemsize
        if memoryview(buf).nbytes != want:
            raise BadFrame(f"{self.kind.name} of {memoryview(buf).nbytes} bytes, not {want}")
        both = _view(buf, HEAD_BYTES, shape, self.dtype)
        return both[0], both[1]


def slot_chunks(n_layers: int, length: int, cell_bytes: int) -> list[tuple[range, range]]:
    """(layers, positions) chunks covering ``length`` positions of a slot, each at most MAX_PAYLOAD bytes when
    one layer's keys and values at one position take ``cell_bytes``: whole layers by runs of positions, or
    runs of layers one position at a time where a position of every layer is too big."""
    cells = max(1, MAX_PAYLOAD // cell_bytes)
    if cells >= n_layers:
        step = cells // n_layers
        return [(range(n_layers), range(p, min(p + step, length))) for p in range(0, length, step)]
    return [(range(l, min(l + cells, n_layers)), range(p, p + 1)) for p in range(length) for l in range(0, n_layers, cells)]
