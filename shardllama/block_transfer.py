"""Reading a sequence's cached positions out of the workers' block pools, writing them in, copying a block
(the prompt cache, in memory and on disk), and knowing which blocks a replaced worker lost.

Positions move in chunks that fit a frame (``tensor_frames.kv_chunks``): per chunk, one request to every
worker and one answer from each, naming the blocks that hold the chunk's positions.  Reading assembles the
full KV heads from the workers' ``kv_heads`` ranges (a head held by two workers is taken once, from the lower
rank); writing cuts them again, so a state read with N workers can be written with any other N.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import protocol as P
from .config import ModelArgs
from .errors import WorkerError
from .kv_cache import blocks_for, check_copy, check_table, check_tables
from .pool import WorkerPool
from .sharding import ShardSpec
from .tensor_frames import BlockChunk, kv_chunks


class BlockTransfer:
    """The block requests of a coordinator's ``pool``, whose caches hold ``n_blocks`` blocks of ``block_size``
    positions of ``dtype``."""

    def __init__(self, pool: WorkerPool, args: ModelArgs, specs: list[ShardSpec], dtype: torch.dtype, n_blocks: int,
                 block_size: int):
        self.pool = pool
        self.args = args
        self.specs = specs
        self.dtype = dtype
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.lost = torch.zeros(n_blocks, dtype=torch.bool)  # blocks whose contents a replaced worker lost
        self.any_lost = False  # (the hot path looks at this only)
        self.why = ""  # the replacement that lost them

    def lose_all(self, why: str) -> None:
        """A worker was replaced (``why``): no block holds anything valid."""
        self.lost[:] = True
        self.any_lost = True
        self.why = why

    def _found(self, blocks: Sequence[int] | torch.Tensor) -> None:
        """``blocks`` were written from the start of their sequence: valid again."""
        self.lost[torch.as_tensor(blocks, dtype=torch.long)] = False
        self.any_lost = bool(self.lost.any())

    def _check_kept(self, blocks: Sequence[int] | torch.Tensor, what: str) -> None:
        if bool(self.lost[torch.as_tensor(blocks, dtype=torch.long)].any()):
            raise WorkerError(f"the KV cache of {what} was lost when {self.why}; start its sequence again from "
                              "position 0")

    def check_rows(self, start: torch.Tensor, tables: torch.Tensor, T: int) -> None:
        """Before a pass of ``T`` tokens a row: after a worker was replaced, a row may continue its sequence
        (start > 0) only if the blocks holding its positions before ``start`` were written since; the blocks
        the pass writes are valid after it."""
        if not self.any_lost:
            return
        for b, p in enumerate(start.tolist()):
            if p > 0:
                self._check_kept(tables[b, : blocks_for(p, self.block_size)], f"row {b}'s first {p} positions")
        for b, p in enumerate(start.tolist()):
            self._found(tables[b, : blocks_for(p + T, self.block_size)])

    def check_pass(self, start: torch.Tensor, T: int, tables: torch.Tensor, max_seq_len: int) -> torch.Tensor:
        """The block tables (B, W) of a pass of T tokens a row from ``start`` (B,), cut to the blocks the pass
        reaches (the rest is never read: the wire carries only what it uses); ValueError unless the positions
        lie in the context and the tables cover them with blocks of the cache."""
        tables = torch.as_tensor(tables, dtype=torch.long)
        B, end = len(start), int(start.max()) + T
        if int(start.min()) < 0 or end > max_seq_len:
            raise ValueError(f"positions {int(start.min())}..{end - 1} are outside the context ({max_seq_len} "
                             "positions)")
        need = blocks_for(end, self.block_size)
        if tables.dim() != 2 or len(tables) != B or tables.shape[1] < need:
            raise ValueError(f"block tables of shape {tuple(tables.shape)} for {B} rows reaching position {end - 1} "
                             f"(at least {need} blocks of {self.block_size} a row)")
        check_tables(tables, self.n_blocks)
        return tables[:, :need]

    def check_table(self, table: Sequence[int], length: int) -> torch.Tensor:
        """``table`` as a tensor; ValueError unless it holds ``length`` positions in blocks of the cache."""
        return check_table(table, length, self.n_blocks, self.block_size)

    def copy(self, src: int, dst: int, length: int) -> None:
        """Every worker copies the first ``length`` positions of its cache block ``src`` to ``dst``."""
        check_copy(src, dst, length, self.n_blocks, self.block_size)
        if length > 0:
            self._check_kept([src], f"block {src}")
        self.pool.broadcast(P.CopyBlock(self.pool.next_step(), src, dst, length).pack())
        self.pool.gather(P.Kind.ACK, lambda rank, h, frame: P.Signal.unpack(frame, h))
        if self.any_lost:
            self._found([dst])

    def _chunk(self, kind: P.Kind, step: int, table: torch.Tensor, layers: range, positions: range, heads: int = 0,
               dtype: torch.dtype | None = None) -> BlockChunk:
        bs = self.block_size
        blocks = tuple(table[positions.start // bs : blocks_for(positions.stop, bs)].tolist())
        return BlockChunk(kind, step, blocks, positions.start % bs, len(positions), layers, heads, dtype)

    def read(self, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of the sequence with block table ``table``, every KV head: k and v,
        each (n_layers, length, n_kv_heads, head_dim)."""
        if length > 0:
            self._check_kept(table[: blocks_for(length, self.block_size)], "that sequence")
        a = self.args
        k = torch.empty((a.n_layers, length, a.n_kv_heads, a.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        for layers, positions in self.chunks(length):
            asked = self._chunk(P.Kind.READ_BLOCKS, self.pool.next_step(), table, layers, positions)
            self.pool.broadcast(asked.pack().numpy())

            def read(rank: int, h: P.Header, frame) -> tuple[torch.Tensor, torch.Tensor]:
                got = BlockChunk.unpack(frame, h)
                want = self._chunk(P.Kind.BLOCK_DATA, asked.step, table, layers, positions,
                                   len(self.specs[rank].kv_heads), self.dtype)
                if got != want:
                    raise P.BadFrame(f"BLOCK_DATA of blocks {list(got.blocks)} from {got.offset}, layers {got.layers}, "
                                     f"{got.positions} positions, {got.heads} KV heads of {got.dtype}, not the chunk "
                                     f"asked for ({want.heads} heads of {want.dtype})")
                return got.kv(frame, a.head_dim)  # each (layers, T, heads, hd)

            covered = 0  # heads [0, covered) are filled
            L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
            for rank, (part_k, part_v) in sorted(self.pool.gather(P.Kind.BLOCK_DATA, read), key=lambda x: x[0]):
                heads = self.specs[rank].kv_heads
                first = max(covered, heads.start) - heads.start
                k[L, T, heads.start + first : heads.stop] = part_k[:, :, first:]
                v[L, T, heads.start + first : heads.stop] = part_v[:, :, first:]
                covered = max(covered, heads.stop)
            assert covered == a.n_kv_heads, (covered, a.n_kv_heads)
        return k, v

    def write(self, table: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of the sequence with block table ``table``: each worker gets
        its ``kv_heads`` of k and v (each (n_layers, length, n_kv_heads, head_dim), as :meth:`read` gives
        them)."""
        for layers, positions in self.chunks(k.shape[1]):
            step = self.pool.next_step()
            L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
            for rank, spec in enumerate(self.specs):
                H = slice(spec.kv_heads.start, spec.kv_heads.stop)
                chunk = self._chunk(P.Kind.WRITE_BLOCKS, step, table, layers, positions, len(spec.kv_heads),
                                    self.dtype)
                self.pool.send(rank, chunk.pack(k[L, T, H], v[L, T, H]).numpy())
            self.pool.gather(P.Kind.ACK, lambda rank, h, frame: P.Signal.unpack(frame, h))
        if self.any_lost:
            self._found(table[: blocks_for(k.shape[1], self.block_size)])

    def check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """ValueError unless k and v are what :meth:`write` takes."""
        a = self.args
        want = (a.n_layers, k.shape[1] if k.dim() == 4 else -1, a.n_kv_heads, a.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KV of shapes {tuple(k.shape)} / {tuple(v.shape)} and dtypes {k.dtype} / {v.dtype} do "
                             f"not fit a cache of (layers, positions, kv heads, head dim) = "
                             f"({a.n_layers}, *, {a.n_kv_heads}, {a.head_dim}) {self.dtype}")

    def chunks(self, length: int) -> list[tuple[range, range]]:
        """The (layers, positions) chunks of ``length`` positions; a chunk's positions, wherever they start in
        a block, take at most MAX_CHUNK_BLOCKS blocks."""
        heads = max(len(s.kv_heads) for s in self.specs)
        return kv_chunks(self.args.n_layers, length, 2 * heads * self.args.head_dim * self.dtype.itemsize,
                         (P.MAX_CHUNK_BLOCKS - 1) * self.block_size)
