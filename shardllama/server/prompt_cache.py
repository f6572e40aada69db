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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


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
    """Up to ``capacity`` (slot -> token sequence) entries, least recently used first."""

    def __init__(self, capacity: int):
        assert capacity >= 0, capacity
        self.capacity = capacity
        self._entries: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, slot: int) -> bool:
        return slot in self._entries

    @property
    def slots(self) -> list[int]:
        return list(self._entries)

    def tokens(self, slot: int) -> tuple[int, ...]:
        return self._entries[slot]

    def n_tokens(self) -> int:
        """Positions held by all entries together."""
        return sum(len(t) for t in self._entries.values())

    def longest_prefix(self, tokens: Sequence[int], limit: int | None = None) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``tokens`` (at most ``limit`` tokens of it):
        (its slot, the shared length), or (None, 0).  Ties go to the most recently used entry."""
        limit = len(tokens) if limit is None else min(limit, len(tokens))
        tokens = tuple(tokens[:limit])  # entries are tuples: a list never equals one
        best_slot, best = None, 0
        for slot, cached in reversed(self._entries.items()):  # most recent first
            n = common_prefix(cached, tokens)
            if n > best:
                best_slot, best = slot, n
        return best_slot, best

    def touch(self, slot: int) -> None:
        self._entries.move_to_end(slot)

    def insert(self, slot: int, tokens: Sequence[int]) -> list[int]:
        """Make ``slot`` an entry holding ``tokens``; returns the slots this frees (possibly ``slot`` itself:
        an empty sequence, one that an entry already covers, or a cache of capacity 0)."""
        tokens = tuple(tokens)
        assert slot not in self._entries, slot
        if not tokens or self.capacity == 0:
            return [slot]
        freed = []
        for other, cached in list(self._entries.items()):
            if len(cached) >= len(tokens) and cached[: len(tokens)] == tokens:
                self.touch(other)  # it answers everything this one would, and more
                return [slot]
            if cached == tokens[: len(cached)]:
                del self._entries[other]
                freed.append(other)
        self._entries[slot] = tokens
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
