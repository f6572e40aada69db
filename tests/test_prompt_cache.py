"""The prompt cache's bookkeeping: longest common prefix, subsumed entries, LRU eviction, salts."""

from __future__ import annotations

from hypothesis import given, strategies as st

from shardllama.server.prompt_cache import PromptCache, cache_key, common_prefix, positions, salt_id, split_key


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
    assert cache.slots == [1] and cache.key(1) == (1, 2, 3)
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


A, B = salt_id("tenant A"), salt_id("tenant B")


def test_salted_keys_never_share_a_prefix_across_salts():
    assert A != B and len(A) == 32 and salt_id(None) is None
    cache = PromptCache(4)
    cache.insert(0, cache_key([1, 2, 3, 4]))  # unsalted
    cache.insert(1, cache_key([1, 2, 3], A))
    assert cache.longest_prefix(cache_key([1, 2, 3, 9], B)) == (None, 0)  # B matches neither
    assert cache.longest_prefix(cache_key([1, 2, 3, 9])) == (0, 3)  # no salt: the unsalted entry, not A's
    assert cache.longest_prefix(cache_key([1, 2, 9], A)) == (1, 2)  # positions, not key elements
    assert cache.longest_prefix(cache_key([1, 2, 3, 4], A), limit=3) == (1, 3)
    assert cache.longest_prefix(cache_key([7], A)) == (None, 0)  # the salt alone is no match
    assert cache.n_tokens() == 4 + 3


def test_salted_entries_cover_and_extend_within_their_salt_only():
    cache = PromptCache(4)
    cache.insert(0, cache_key([1, 2], A))
    assert cache.insert(1, cache_key([1, 2, 3], B)) == []  # B's entry does not replace A's
    assert cache.insert(2, cache_key([1, 2, 3], A)) == [0]  # A's longer entry does
    assert cache.insert(3, cache_key([1], A)) == [3]  # covered by A's entry
    assert cache.insert(4, cache_key([1])) == []  # an unsalted one is not
    assert cache.insert(5, cache_key([], A)) == [5]  # a salt with no token holds no position


@given(st.lists(st.integers(0, 2**31), max_size=8), st.sampled_from([None, A, B]))
def test_split_key_inverts_cache_key(tokens, salt):
    key = cache_key(tokens, salt)
    assert split_key(key) == (salt, tuple(tokens)) and positions(key) == len(tokens)
