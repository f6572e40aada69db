"""The engine's KV bookkeeping: the block pool and tables (free list, references, shared prefixes) and the
prompt cache (longest common prefix, subsumed entries, LRU eviction, salts), without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from shardllama.engine.blocks import BlockPool, OutOfBlocks, Tables
from shardllama.engine.prompt_cache import PromptCache, cache_key, common_prefix, positions, salt_id, split_key


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_matches_the_obvious_loop(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(tuple(a), tuple(b)) == n


def make(capacity: int, n_blocks: int = 64, block_size: int = 2) -> PromptCache:
    return PromptCache(capacity, BlockPool(n_blocks, block_size))


def put(cache: PromptCache, key):
    """Insert ``key`` with fresh blocks for its positions, as the engine does when a sequence ends."""
    table: list[int] = []
    Tables(cache.pool).grow(table, positions(tuple(key)))
    return cache.insert(key, table)


def test_longest_prefix_prefers_the_longest_then_the_most_recent():
    cache = make(4)
    e0, e1 = put(cache, [1, 2, 3]).entry, put(cache, [1, 2, 9, 9]).entry
    assert cache.longest_prefix([1, 2, 3, 4]) == (e0, 3)
    assert cache.longest_prefix([1, 2, 9, 9, 5]) == (e1, 4)
    assert cache.longest_prefix([1, 2, 3], limit=2) == (e1, 2)  # a tie at 2: the more recent entry
    assert cache.longest_prefix([7]) == (None, 0)
    assert cache.longest_prefix([1, 2, 9], limit=0) == (None, 0)


def test_an_entry_that_another_covers_is_dropped_and_its_blocks_freed():
    cache = make(4)
    first = put(cache, [1, 2])
    longer = put(cache, [1, 2, 3])
    assert longer.extended == [(1, 2)] and first.entry not in cache  # the longer one answers everything
    covered = put(cache, [1, 2])  # already covered: not kept, its blocks free again
    assert covered.entry is None and covered.covered_by == (1, 2, 3)
    assert cache.entries == [longer.entry] and cache.key(longer.entry) == (1, 2, 3)
    assert cache.pool.n_held == 2 == cache.n_blocks()  # three positions in blocks of two
    assert put(cache, []).entry is None and cache.pool.n_held == 2


def test_lru_eviction_capacity_and_clear_give_blocks_back():
    cache = make(2)
    e0, e1 = put(cache, [1]).entry, put(cache, [2]).entry
    cache.touch(e0)
    e2 = put(cache, [3]).entry
    assert cache.entries == [e0, e2] and e1 not in cache  # e1 was least recently used
    assert cache.evict(keep=e0) and cache.entries == [e0]
    assert not cache.evict(keep=e0)
    cache.clear()
    assert len(cache) == 0 and cache.pool.n_held == 0
    zero = make(0)
    assert put(zero, [1, 2]).entry is None and zero.pool.n_held == 0


A, B = salt_id("tenant A"), salt_id("tenant B")


def test_salted_keys_never_share_a_prefix_across_salts():
    assert A != B and len(A) == 32 and salt_id(None) is None
    cache = make(4)
    e0 = put(cache, cache_key([1, 2, 3, 4])).entry  # unsalted
    e1 = put(cache, cache_key([1, 2, 3], A)).entry
    assert cache.longest_prefix(cache_key([1, 2, 3, 9], B)) == (None, 0)  # B matches neither
    assert cache.longest_prefix(cache_key([1, 2, 3, 9])) == (e0, 3)  # no salt: the unsalted entry, not A's
    assert cache.longest_prefix(cache_key([1, 2, 9], A)) == (e1, 2)  # positions, not key elements
    assert cache.longest_prefix(cache_key([1, 2, 3, 4], A), limit=3) == (e1, 3)
    assert cache.longest_prefix(cache_key([7], A)) == (None, 0)  # the salt alone is no match
    assert cache.n_tokens() == 4 + 3


def test_salted_entries_cover_and_extend_within_their_salt_only():
    cache = make(4)
    put(cache, cache_key([1, 2], A))
    assert put(cache, cache_key([1, 2, 3], B)).extended == []  # B's entry does not replace A's
    assert put(cache, cache_key([1, 2, 3], A)).extended == [cache_key([1, 2], A)]  # A's longer entry does
    assert put(cache, cache_key([1], A)).covered_by == cache_key([1, 2, 3], A)
    assert put(cache, cache_key([1])).entry is not None  # an unsalted one is not covered by A's
    assert put(cache, cache_key([], A)).entry is None  # a salt with no token holds no position


@given(st.lists(st.integers(0, 2**31), max_size=8), st.sampled_from([None, A, B]))
def test_split_key_inverts_cache_key(tokens, salt):
    key = cache_key(tokens, salt)
    assert split_key(key) == (salt, tuple(tokens)) and positions(key) == len(tokens)


# ---- blocks ---------------------------------------------------------------------------------------------


def test_the_pool_hands_out_the_lowest_free_block_and_counts_references():
    pool = BlockPool(4, block_size=16)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    pool.share([1])
    pool.release([0, 1])
    assert pool.refs(1) == 1 and pool.n_free == 2 and pool.allocate() == 0  # 0 is free again, 1 still held
    assert pool.allocate() == 3
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_a_shared_prefix_shares_whole_blocks_and_copies_only_a_partial_one():
    pool = BlockPool(16, block_size=4)
    tables = Tables(pool)
    cached: list[int] = []
    tables.grow(cached, 10)  # three blocks: 4 + 4 + 2 positions
    copies = []
    table = tables.start_from(cached, 10, lambda src, dst, n: copies.append((src, dst, n)))
    assert table[:2] == cached[:2] and table[2] != cached[2]  # whole blocks shared, the partial one copied
    assert copies == [(cached[2], table[2], 2)]
    assert [pool.refs(b) for b in cached] == [2, 2, 1]
    assert tables.start_from(cached, 8, lambda *a: copies.append(a)) == cached[:2] and len(copies) == 1
    tables.release(table, keep=5)  # the blocks past position 5 go back
    assert len(table) == 2
    tables.release(table)
    assert table == [] and [pool.refs(b) for b in cached] == [2, 2, 1]  # the second start_from's hold


def test_making_room_evicts_cache_entries_but_never_the_block_being_copied():
    pool = BlockPool(4, block_size=4)
    cache = PromptCache(4, pool)
    tables = Tables(pool, make_room=cache.evict)

    def entry(key) -> int:
        table: list[int] = []
        tables.grow(table, len(key))
        return cache.insert(tuple(key), table).entry

    a = entry(range(6))  # blocks 0 and 1
    b = entry([9])  # block 2
    assert cache.blocks(b) == [2]
    other: list[int] = []
    tables.grow(other, 4)  # block 3: the pool is full
    copies = []
    table = tables.start_from(cache.blocks(a), 6, lambda src, dst, n: copies.append((src, dst, n)))
    # Evicting a (least recently used) freed no block: 0 is shared, 1 is the copy's source.  Then b went.
    assert len(cache) == 0 and table == [0, 2] and copies == [(1, 2, 2)]
    assert pool.n_free == 1 and pool.refs(1) == 0  # the source, let go after the copy
    with pytest.raises(OutOfBlocks):
        tables.grow(table, 13)  # nothing left to evict
