"""The messages whose payload is a tensor (``protocol`` has the frame layout): COMPUTE / RESULT, the hot
path, and the chunks of cached positions moved between the coordinator and the workers' block pools.

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

from .protocol import (ALIGN, DTYPE_CODES, HEAD_BYTES, MAX_CHUNK_BLOCKS, MAX_PAYLOAD, MAX_STEP_BYTES, PRELUDE, BadFrame,
                       Flag, Header, Kind, Phase, check_kind, check_length, frame_dtype)


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
    """What a COMPUTE that begins a step carries (flag NEW_STEP): where each row starts and its block table;
    in a whole pass also each row's real length and the pass number (the reductions' tickets).  The worker
    checks it against its cache (:meth:`check_within`), builds its ``model.Step`` from it and keeps it for
    the step's later layers."""

    start: torch.Tensor  # (B,) int64
    tables: torch.Tensor  # (B, W) int64: row b's position p lives in block tables[b, p // block_size]
    lengths: torch.Tensor | None = None  # (B,) int64, a whole pass only
    pass_no: int = 0  # a whole pass only

    @staticmethod
    def words(B: int, W: int, whole: bool) -> int:
        return B * (W + 1) + (B + 1 if whole else 0)

    @staticmethod
    def nbytes(B: int, W: int, whole: bool) -> int:
        return _padded(8 * StepBlock.words(B, W, whole))

    @staticmethod
    def max_rows(W: int) -> int:
        """Rows whose step block of tables W wide fits MAX_STEP_BYTES (at least 1)."""
        return max(1, (MAX_STEP_BYTES // 8 - 1) // (W + 2))

    def pack_into(self, block: torch.Tensor) -> None:
        """Write into ``block``, the uint8 bytes of the frame it goes to (:meth:`nbytes` of them)."""
        B, W = self.tables.shape
        whole = self.lengths is not None
        words = block[: 8 * self.words(B, W, whole)].view(torch.int64)
        assert len(self.start) == B, (self.start, self.tables)
        words[:B] = self.start
        words[B : B * (W + 1)].view(B, W).copy_(self.tables)
        if whole:
            assert len(self.lengths) == B, (self.start, self.lengths)
            words[B * (W + 1) : -1] = self.lengths
            words[-1] = self.pass_no

    @classmethod
    def unpack(cls, buf: Any, B: int, W: int, whole: bool) -> "StepBlock":
        """The block after the head of ``buf`` (copies: it outlives the frame); the frame's length is checked
        already."""
        words = _view(buf, HEAD_BYTES, (cls.words(B, W, whole),), torch.int64).clone()
        start, tables = words[:B], words[B : B * (W + 1)].view(B, W)
        if whole:
            return cls(start, tables, words[B * (W + 1) : -1], int(words[-1]))
        return cls(start, tables)

    def check_within(self, n_blocks: int, max_seq_len: int, T: int) -> None:
        """BadFrame unless every row's T positions lie inside the context and its table names blocks of a
        pool of ``n_blocks`` (a row's table must cover its positions: ``model.Step.make`` checks that)."""
        start, tables = self.start, self.tables
        if len(start) and not (0 <= int(start.min()) and int(start.max()) + T <= max_seq_len):
            raise BadFrame(f"COMPUTE of rows starting at {start.tolist()} with {T} tokens, beyond a context of "
                           f"{max_seq_len} positions")
        if tables.numel() and not (0 <= int(tables.min()) and int(tables.max()) < n_blocks):
            raise BadFrame(f"COMPUTE whose block tables name blocks outside the cache's {n_blocks}")
        if self.lengths is not None and len(self.lengths) and not (
                1 <= int(self.lengths.min()) and int(self.lengths.max()) <= T):
            raise BadFrame(f"COMPUTE of real lengths {self.lengths.tolist()}, not between 1 and {T}")


_FIELDS = struct.Struct("<IIII")  # a TensorFrame's: layer, B, T, W (0 without a step block)
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
        if self.block is None:
            return HEAD_BYTES
        return HEAD_BYTES + StepBlock.nbytes(self.B, self.block.tables.shape[1], self.phase == Phase.WHOLE)

    def pack(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A new frame (uint8, sent as is) and a view of its (B, T, width) payload to write the tensor into."""
        flags = (Flag.NEW_STEP if self.block is not None else 0) | (Flag.ALL_LOGITS if self.all_logits else 0)
        offset = self._offset()
        buf = torch.empty(offset + self.B * self.T * width * self.dtype.itemsize, dtype=torch.uint8)
        mem = buf.numpy()
        PRELUDE.pack_into(mem, 0, self.kind, self.phase, flags, DTYPE_CODES[self.dtype], self.step)
        W = self.block.tables.shape[1] if self.block is not None else 0
        _FIELDS.pack_into(mem, PRELUDE.size, self.layer, self.B, self.T, W)
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
        layer, B, T, W = _FIELDS.unpack_from(buf, PRELUDE.size)
        flags = int(header.flags)  # (an IntFlag's & takes microseconds)
        new_step, whole = bool(flags & _NEW_STEP), header.phase == _WHOLE
        offset = HEAD_BYTES
        if new_step:
            if W == 0 or StepBlock.nbytes(B, W, whole) > MAX_STEP_BYTES:
                raise BadFrame(f"COMPUTE with a step block of {B} rows of block tables {W} wide (at most "
                               f"{MAX_STEP_BYTES} bytes)")
            offset += StepBlock.nbytes(B, W, whole)
        elif W:
            raise BadFrame(f"{header.kind.name} with block tables {W} wide but no step block")
        check_length(buf, header, offset + B * T * width * dtype.itemsize)
        block = StepBlock.unpack(buf, B, W, whole) if new_step else None
        msg = cls(header.kind, header.phase, header.step, layer, B, T, dtype, block,
                  bool(flags & _ALL_LOGITS))
        return msg, _view(buf, offset, (B, T, width), dtype)


@dataclasses.dataclass(frozen=True)
class BlockChunk:
    """``positions`` cached positions of ``layers`` of one sequence, in the blocks ``blocks``: position ``p`` of
    the chunk lives in block ``blocks[(offset + p) // block_size]`` at ``(offset + p) % block_size``.
    READ_BLOCKS asks for it (no payload, ``heads`` 0); BLOCK_DATA answers and WRITE_BLOCKS fills it, with a
    payload (2, layers, T, heads, head_dim): keys then values of the sender's / receiver's ``heads`` KV heads
    in ``dtype``."""

    kind: Kind
    step: int
    blocks: tuple[int, ...]
    offset: int
    positions: int
    layers: range
    heads: int = 0
    dtype: torch.dtype | None = None
    FIELDS: ClassVar = struct.Struct("<IIIIII")  # first layer, layers, offset, positions, heads, blocks

    def _ids_bytes(self) -> int:
        return _padded(8 * len(self.blocks))

    def pack(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """The frame (uint8); BLOCK_DATA and WRITE_BLOCKS copy k and v (each (layers, T, heads, head_dim)) in."""
        fields = self.FIELDS.pack(self.layers.start, len(self.layers), self.offset, self.positions, self.heads,
                                  len(self.blocks))
        code = DTYPE_CODES[self.dtype] if self.dtype is not None else 0
        offset = HEAD_BYTES + self._ids_bytes()
        payload = 0 if self.kind == Kind.READ_BLOCKS else 2 * _numel(k.shape) * k.element_size()
        buf = torch.zeros(offset + payload, dtype=torch.uint8)
        buf[:HEAD_BYTES] = torch.frombuffer(Header(self.kind, Phase.KV_IO, dtype=code, step=self.step).pack(fields),
                                            dtype=torch.uint8)
        buf[HEAD_BYTES : HEAD_BYTES + 8 * len(self.blocks)].view(torch.int64)[:] = torch.tensor(self.blocks)
        if self.kind == Kind.READ_BLOCKS:
            return buf
        assert k is not None and v is not None and k.dtype == v.dtype == self.dtype, (k, v, self.dtype)
        assert k.shape[:3] == (len(self.layers), self.positions, self.heads), (k.shape, self)
        both = buf[offset:].view(k.dtype).view(2, *k.shape)
        both[0].copy_(k)
        both[1].copy_(v)
        return buf

    @classmethod
    def unpack(cls, buf: Any, header: Header | None = None) -> "BlockChunk":
        """The chunk's fields and block ids (its payload: :meth:`kv`)."""
        header = check_kind(buf, header, frozenset({Kind.READ_BLOCKS, Kind.BLOCK_DATA, Kind.WRITE_BLOCKS}))
        layer0, n_layers, offset, T, heads, n_ids = cls.FIELDS.unpack_from(buf, PRELUDE.size)
        if not 1 <= n_ids <= MAX_CHUNK_BLOCKS:
            raise BadFrame(f"{header.kind.name} naming {n_ids} blocks (1 to {MAX_CHUNK_BLOCKS})")
        ids_end = HEAD_BYTES + _padded(8 * n_ids)
        dtype = None
        if header.kind == Kind.READ_BLOCKS:
            check_length(buf, header, ids_end)
        else:
            dtype = frame_dtype(header)
            if memoryview(buf).nbytes < ids_end:
                raise BadFrame(f"{header.kind.name} of {memoryview(buf).nbytes} bytes, shorter than its block ids")
        blocks = tuple(memoryview(buf).cast("B")[HEAD_BYTES : HEAD_BYTES + 8 * n_ids].cast("q").tolist())
        return cls(header.kind, header.step, blocks, offset, T, range(layer0, layer0 + n_layers), heads, dtype)

    def check_within(self, n_blocks: int, block_size: int, n_layers: int) -> None:
        """BadFrame unless the chunk lies inside a pool of ``n_blocks`` blocks of ``block_size`` positions of
        ``n_layers`` layers, and names exactly the blocks its positions take."""
        name = self.kind.name
        if not (0 < len(self.layers) and self.layers.stop <= n_layers):
            raise BadFrame(f"{name} of layers {self.layers.start}+{len(self.layers)}: outside a cache of "
                           f"{n_layers} layers")
        if not (self.offset < block_size and self.positions > 0
                and len(self.blocks) == -(-(self.offset + self.positions) // block_size)):
            raise BadFrame(f"{name} of {self.positions} positions from offset {self.offset} in {len(self.blocks)} "
                           f"blocks of {block_size}")
        if not (0 <= min(self.blocks) and max(self.blocks) < n_blocks):
            raise BadFrame(f"{name} of blocks {list(self.blocks)}, outside the cache's {n_blocks}")

    def kv(self, buf: Any, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v (each (layers, T, heads, head_dim)) of a BLOCK_DATA / WRITE_BLOCKS frame, viewing it (no
        copy)."""
        assert self.dtype is not None, self.kind
        shape = (2, len(self.layers), self.positions, self.heads, head_dim)
        offset = HEAD_BYTES + self._ids_bytes()
        want = offset + _numel(shape) * self.dtype.itemsize
        if memoryview(buf).nbytes != want:
            raise BadFrame(f"{self.kind.name} of {memoryview(buf).nbytes} bytes, not {want}")
        both = _view(buf, offset, shape, self.dtype)
        return both[0], both[1]


def kv_chunks(n_layers: int, length: int, cell_bytes: int, max_positions: int) -> list[tuple[range, range]]:
    """(layers, positions) chunks covering ``length`` cached positions, each at most MAX_PAYLOAD bytes when one
    layer's keys and values at one position take ``cell_bytes``, and at most ``max_positions`` positions:
    whole layers by runs of positions, or runs of layers one position at a time where a position of every
    layer is too big."""
    cells = max(1, MAX_PAYLOAD // cell_bytes)
    if cells >= n_layers:
        step = min(cells // n_layers, max_positions)
        return [(range(n_layers), range(p, min(p + step, length))) for p in range(0, length, step)]
    return [(range(l, min(l + cells, n_layers)), range(p, p + 1)) for p in range(length) for l in range(0, n_layers, cells)]
