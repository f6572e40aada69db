"""The prompt cache: which KV-cache slots hold which token sequences, reused by longest common prefix.

Pure bookkeeping, no tensors: the scheduler owns the backend and does the copies.  An entry is a slot
whose first ``len(tokens)`` positions hold the keys and values of ``tokens`` — the prompt *and* the text
generated after it, since a finished generation's slot becomes an entry as it is, without a copy.  A new
request reuses the entry sharing the longest token prefix with it (the slot's positions are valid for
any prefix of its tokens), so a repeated prompt, an earlier prompt plus its continuation, or a prompt
that shares only a priming preamble all compute only what is new.  rllama matched exact sequences only.

Entries are kept in least-recently-used order; an entry that is a prefix of another one is redundant (the
longer one answers every lookup it would) and is dropped, so a conversation that grows turn by turn holds
one entry, not one per turn.

**Salts** (a request's ``cache_salt``, vLLM's name): without one, every request shares one cache, so a
request's ``cached_tokens`` tells its client how much of its prompt some earlier request — anyone's — had
sent.  Requests with a salt share cached prefixes only with requests of the same salt.  An entry's key is
its tokens, preceded for a salted request by one negative number made of the salt's hash
(:func:`cache_key`).  Token ids are never negative, so no two keys of different salts (or a salted and an
unsalted one) share even a first element, and the longest-prefix match never crosses salts; a key's
positions are its tokens (:func:`positions`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

Key = tuple[int, ...]


def salt_id(salt: str | None) -> str | None:
    """What the cache keeps of a ``cache_salt``: the first 32 hex digits of its SHA-256 (None: no salt)."""
    return None if salt is None else hashlib.sha256(salt.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def cache_key(tokens: Sequence[int], salt: str | None = None) -> Key:
    """The key of ``tokens`` for requests of the salt id ``salt`` (see the module docstring)."""
    return tuple(tokens) if salt is None else (-1 - int(salt, 16), *tokens)


def split_key(key: Key) -> tuple[str | None, Key]:
    """(salt id or None, tokens) of a key: the inverse of :func:`cache_key`."""
    if key and key[0] < 0:
        return f"{-1 - key[0]:032x}", key[1:]
    return None, key


def positions(key: Sequence[int]) -> int:
    """KV-cache positions a key stands for: its tokens, not its salt."""
    return len(key) - (1 if key and key[0] < 0 else 0)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix of two token sequences (of one type: (1,) != [1])."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual hit: one sequence continues the other, compared at C speed
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slices, O(n log n) in C
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PromptCache:
    """Up to ``capacity`` (slot -> key) entries, least recently used first."""

    def __init__(self, capacity: int):
        assert capacity >= 0, capacity
        self.capacity = capacity
        self._entries: OrderedDict[int, Key] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, slot: int) -> bool:
        return slot in self._entries

    @property
    def slots(self) -> list[int]:
        return list(self._entries)

    def key(self, slot: int) -> Key:
        return self._entries[slot]

    def n_tokens(self) -> int:
        """Positions held by all entries together."""
        return sum(positions(k) for k in self._entries.values())

    def longest_prefix(self, key: Sequence[int], limit: int | None = None) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``key`` (at most ``limit`` of its positions):
        (its slot, the shared positions), or (None, 0).  Ties go to the most recently used entry."""
        n_positions = positions(key)
        salt = len(key) - n_positions  # a salted key's first element: matched, but no position
        limit = n_positions if limit is None else min(limit, n_positions)
        key = tuple(key[: salt + limit])  # entries are tuples: a list never equals one
        best_slot, best = None, 0
        for slot, cached in reversed(self._entries.items()):  # most recent first
            n = common_prefix(cached, key) - salt
            if n > best:
                best_slot, best = slot, n
        return best_slot, best

    def touch(self, slot: int) -> None:
        self._entries.move_to_end(slot)

    def insert(self, slot: int, key: Sequence[int]) -> list[int]:
        """Make ``slot`` the entry of ``key``; returns the slots this frees (possibly ``slot`` itself: no
        positions, a key that an entry already covers, or a cache of capacity 0)."""
        key = tuple(key)
        assert slot not in self._entries, slot
        if not positions(key) or self.capacity == 0:
            return [slot]
        freed = []
        for other, cached in list(self._entries.items()):
            if len(cached) >= len(key) and cached[: len(key)] == key:
                self.touch(other)  # it answers everything this one would, and more
                return [slot]
            if cached == key[: len(cached)]:
                del self._entries[other]
                freed.append(other)
        self._entries[slot] = key
        while len(self._entries) > self.capacity:
            freed.append(self._entries.popitem(last=False)[0])
        return freed

    def remove(self, slot: int) -> None:
        del self._entries[slot]

    def evict(self, keep: int | None = None) -> int | None:
        """Drop the least recently used entry other than ``keep``; its slot, or None if there is none."""
        for slot in self._entries:
            if slot != keep:
                del self._entries[slot]
                return slot
        return None

    def clear(self) -> list[int]:
        """Drop every entry (their KV states are gone); returns their slots."""
        slots = list(self._entries)
        self._entries.clear()
        return slots
