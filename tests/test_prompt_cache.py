"""The prompt cache's bookkeeping: longest common prefix, subsumed entries, LRU eviction."""

from __future__ import annotations

from hypothesis import given, strategies as st

from shardllama.server.prompt_cache import PromptCache, common_prefix


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_matches_the_obvious_loop(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    assert common_prefix(tuple(a), tuple(b)) == n


def test_longest_prefix_prefers_the_longest_then_the_most_recent():
    cache = PromptCache(4)
    assert cache.insert(0, [1, 2, 3]) == []
    assert cache.insert(1, [1, 2, 9, 9]) == []
    assert cache.longest_prefix([1, 2, 3, 4]) == (0, 3)
    assert cache.longest_prefix([1, 2, 9, 9, 5]) == (1, 4)
    assert cache.longest_prefix([1, 2, 3], limit=2) == (1, 2)  # a tie at 2: the more recent entry
    assert cache.longest_prefix([7]) == (None, 0)
    assert cache.longest_prefix([1, 2, 9], limit=0) == (None, 0)


def test_an_entry_that_another_covers_is_dropped():
    cache = PromptCache(4)
    cache.insert(0, [1, 2])
    assert cache.insert(1, [1, 2, 3]) == [0]  # the longer sequence answers everything [1, 2] did
    assert cache.insert(2, [1, 2]) == [2]  # already covered: its own slot comes back free
    assert cache.slots == [1] and cache.tokens(1) == (1, 2, 3)
    assert cache.insert(3, []) == [3]


def test_lru_eviction_and_capacity():
    cache = PromptCache(2)
    cache.insert(0, [1])
    cache.insert(1, [2])
    cache.touch(0)
    assert cache.insert(2, [3]) == [1]  # 1 was least recently used
    assert cache.evict(keep=0) == 2
    assert cache.evict(keep=0) is None
    assert cache.clear() == [0] and len(cache) == 0
    assert PromptCache(0).insert(5, [1, 2]) == [5]
