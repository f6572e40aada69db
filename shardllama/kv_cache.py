"""The KV cache as a pool of fixed-size blocks, and the block tables that say which blocks hold a sequence.

A sequence is a *block table*, the ids of its blocks in order: position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size``.  The model reads and writes through tables
(``model.Step``, ``model.attention``); the engine decides which blocks each sequence gets
(``engine.blocks``); the checks here are the ones both backends (in process and across workers) apply.
"""

from __future__ import annotations

import math
import mmap
from typing import Sequence

import torch

# Positions per KV-cache block: small enough that a sequence wastes little of its last block, large enough that
# a block table stays short and a block copy moves whole pages' worth of rows.
BLOCK_SIZE = 16


def contiguous_tables(slots: torch.Tensor, blocks_per_seq: int) -> torch.Tensor:
    """The one-sequence-per-slot layout as block tables: slot s owns blocks s*n .. s*n+n-1; (B,) -> (B, n)."""
    return torch.as_tensor(slots).long()[:, None] * blocks_per_seq + torch.arange(blocks_per_seq)


def blocks_for(n_positions: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold ``n_positions`` positions."""
    return -(-n_positions // block_size)


def flat_index(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Where each position of each row lives in a cache flattened to (n_blocks * block_size, ...):
    tables (B, W), positions (B, N) -> (B, N) long."""
    return tables.gather(1, positions // block_size) * block_size + positions % block_size


def check_tables(tables: torch.Tensor, n_blocks: int) -> None:
    """ValueError unless the block tables (B, W) of a pass name blocks of a cache of ``n_blocks``."""
    if tables.numel() and not (0 <= int(tables.min()) and int(tables.max()) < n_blocks):
        raise ValueError(f"block tables name blocks outside the cache's {n_blocks}")


def check_table(table: Sequence[int] | torch.Tensor, length: int, n_blocks: int, block_size: int) -> torch.Tensor:
    """One sequence's block table as a tensor; ValueError unless it holds ``length`` positions in blocks of a
    cache of ``n_blocks``."""
    t = torch.as_tensor(table, dtype=torch.long).reshape(-1)
    if not 0 <= length <= len(t) * block_size:
        raise ValueError(f"{length} positions do not fit a block table of {len(t)} blocks of {block_size}")
    if len(t) and not (0 <= int(t.min()) and int(t.max()) < n_blocks):
        raise ValueError(f"block table {t.tolist()} names blocks outside the cache's {n_blocks}")
    return t


def check_copy(src: int, dst: int, length: int, n_blocks: int, block_size: int) -> None:
    """ValueError unless copying ``length`` positions from block ``src`` to ``dst`` stays in the cache."""
    if not (0 <= src < n_blocks and 0 <= dst < n_blocks and 0 <= length <= block_size):
        raise ValueError(f"block copy {src} -> {dst} of {length} positions outside a cache of "
                         f"{n_blocks} blocks of {block_size}")


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose memory the kernel supplies page by page on first touch (a private anonymous mapping):
    torch.zeros writes every page up front, ~1 GB a worker for a 7B model's 4096 positions, before the
    first token; this way a cache costs time and memory as its positions fill."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


class KVCache:
    """Keys and values of every layer in ``n_blocks`` blocks of ``block_size`` positions; which blocks make up
    a sequence is the caller's block table.

    Allocated once, lazily zeroed: a block costs memory only once written.  A worker allocates one for its
    own KV heads only.
    """

    def __init__(self, n_layers: int, n_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if block_size < 1:
            raise ValueError(f"KV-cache block size must be >= 1, got {block_size}")
        shape = (n_layers, n_blocks, block_size, n_kv_heads, head_dim)
        if torch.device(device).type != "cpu":  # a GPU's memory is taken up front (no lazy pages there)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
            return
        self.k = _lazy_zeros(shape, dtype)
        self.v = _lazy_zeros(shape, dtype)

    @property
    def n_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def bytes_per_token(self) -> int:
        """Bytes one cached position takes: k and v, every layer, this cache's KV heads."""
        L, _, _, H, hd = self.k.shape
        return 2 * L * H * hd * self.k.element_size()

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of block ``src`` into block ``dst``, every layer."""
        check_copy(src, dst, length, self.n_blocks, self.block_size)
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]

    def _index(self, table: Sequence[int], length: int) -> torch.Tensor:
        """Flat indices (length,) of the first ``length`` positions of the sequence with this block table."""
        t = check_table(table, length, self.n_blocks, self.block_size)
        return flat_index(t[None], torch.arange(length)[None], self.block_size)[0]

    def read(self, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first ``length`` positions of the sequence with block table ``table``: k and v, each
        (n_layers, length, n_kv_heads, hd)."""
        at = self._index(table, length)
        return self.k.flatten(1, 2)[:, at], self.v.flatten(1, 2)[:, at]

    def write(self, table: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of the sequence with block table ``table`` from k and v
        (n_layers, length, n_kv_heads, hd)."""
        room = len(table) * self.block_size
        want = (self.k.shape[0], k.shape[1] if k.dim() == 4 else -1, *self.k.shape[3:])
        if k.dim() != 4 or tuple(k.shape) != want or tuple(v.shape) != want or k.shape[1] > room:
            raise ValueError(f"KV of shapes {tuple(k.shape)} and {tuple(v.shape)} do not fit a block table of "
                             f"(layers, positions <= {room}, kv heads, head dim) = "
                             f"({self.k.shape[0]}, {room}, {self.k.shape[3]}, {self.k.shape[4]})")
        if k.dtype != self.k.dtype or v.dtype != self.k.dtype:
            raise ValueError(f"KV of dtype {k.dtype} / {v.dtype} written to a {self.k.dtype} cache")
        at = self._index(table, k.shape[1])
        self.k.flatten(1, 2)[:, at] = k
        self.v.flatten(1, 2)[:, at] = v
