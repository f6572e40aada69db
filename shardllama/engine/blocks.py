"""Which blocks of the KV cache hold what: a free list and reference counts, no tensors.

The backend's KV cache is a pool of ``n_blocks`` blocks of ``block_size`` positions (``kv_cache.KVCache``);
a sequence's keys and values live in the blocks its *block table* names, in order (position ``p`` in block
``table[p // block_size]``).  This module only counts: the engine asks for blocks as a sequence grows, a
prompt-cache entry keeps the blocks of a finished sequence, and a new sequence that starts with a cached
prefix *shares* that entry's full blocks (one more reference each) instead of copying them.  A block
returns to the free list when its last holder lets go.

The lowest free block is handed out first: a lone sequence gets consecutive blocks, which the model reads
as one slice instead of gathering (``model.attention``), and the pool's memory — touched page by page,
``kv_cache._lazy_zeros`` — stays as small as what is held.

Only whole blocks are shared.  A prefix that ends inside a block needs that block's first positions in a
block of the new sequence's own (it will write the positions after them), so a cache hit copies at most
one partial block (:meth:`Tables.start_from`), never the prefix.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

from ..errors import ShardllamaError
from ..kv_cache import blocks_for


class OutOfBlocks(ShardllamaError):
    """Every KV-cache block is held (an engine sizing bug: running sequences always fit)."""


def blocks_needed(max_concurrent: int, max_seq_len: int, block_size: int) -> int:
    """KV-cache blocks that ``max_concurrent`` sequences of ``max_seq_len`` positions can hold at most: a
    backend with fewer cannot run them; every block beyond these is room for the prompt cache."""
    return max_concurrent * blocks_for(max_seq_len, block_size)


class BlockPool:
    """``n_blocks`` blocks, each free or held by one or more references."""

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs blocks of positions, got {n_blocks} blocks of {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(n_blocks))  # a heap: the lowest free block first
        self._refs = [0] * n_blocks

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_held(self) -> int:
        return self.n_blocks - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.n_blocks} KV-cache blocks are in use")
        block = heapq.heappop(self._free)
        self._refs[block] = 1
        return block

    def share(self, blocks: Sequence[int]) -> None:
        """One more reference to each of ``blocks`` (held already)."""
        for b in blocks:
            assert self._refs[b] > 0, (b, self._refs[b])
            self._refs[b] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks``; those nobody holds any more are free again."""
        for b in blocks:
            assert self._refs[b] > 0, (b, self._refs[b])
            self._refs[b] -= 1
            if self._refs[b] == 0:
                heapq.heappush(self._free, b)

    def refs(self, block: int) -> int:
        return self._refs[block]


class Tables:
    """Block tables of sequences over one pool; ``make_room`` frees blocks (the prompt cache's LRU entries)
    when the pool runs dry, and says whether it could."""

    def __init__(self, pool: BlockPool, make_room: Callable[[], bool] = lambda: False):
        self.pool, self.make_room = pool, make_room

    def grow(self, table: list[int], positions: int) -> None:
        """Extend ``table`` in place to hold at least ``positions`` positions."""
        while len(table) * self.pool.block_size < positions:
            while not self.pool.n_free:
                if not self.make_room():
                    raise OutOfBlocks(f"all {self.pool.n_blocks} KV-cache blocks are in use")
            table.append(self.pool.allocate())

    def start_from(self, cached: Sequence[int], n: int, copy: Callable[[int, int, int], None]) -> list[int]:
        """A new table whose first ``n`` positions are those of the table ``cached``: its whole blocks shared,
        a partial last block copied (``copy(src, dst, length)``, the backend's ``copy_block``)."""
        bs = self.pool.block_size
        whole, part = divmod(n, bs)
        table = list(cached[:whole])
        self.pool.share(table)
        if part:
            src = cached[whole]
            self.pool.share([src])  # held while a block is found: making room may evict the entry it is of
            try:
                self.grow(table, n)
                copy(src, table[-1], part)
            except BaseException:
                self.pool.release(table)
                raise
            finally:
                self.pool.release([src])
        return table

    def release(self, table: list[int], keep: int = 0) -> None:
        """Drop ``table``'s blocks after its first ``keep`` positions (all of them by default), in place."""
        n = blocks_for(keep, self.pool.block_size)
        self.pool.release(table[n:])
        del table[n:]
