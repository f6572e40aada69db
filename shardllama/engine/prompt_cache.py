"""The prompt cache: which KV-cache blocks hold which token sequences, reused by longest common prefix.

Pure bookkeeping, no tensors: the engine owns the backend.  An entry is a block table (``blocks``) whose
first ``len(tokens)`` positions hold the keys and values of ``tokens`` — the prompt *and* the text generated
after it, since a finished generation's blocks become an entry as they are, without a copy.  A new request
reuses the entry sharing the longest token prefix with it (the blocks are valid for any prefix of its
tokens) by sharing its blocks, so a repeated prompt, an earlier prompt plus its continuation, or a prompt
that shares only a priming preamble all compute only what is new.  rllama matched exact sequences only.
The cache holds one reference to each block of each entry (``blocks.BlockPool``) and lets go of them when
the entry is dropped.

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

import dataclasses
import hashlib
import itertools
from collections import OrderedDict
from typing import Sequence

from .blocks import BlockPool

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


@dataclasses.dataclass
class Inserted:
    """What :meth:`PromptCache.insert` did, for the copy on disk."""

    entry: int | None  # the new entry, or None: not kept (empty, covered by another, or no capacity)
    covered_by: Key | None = None  # the entry that already answers everything this one would
    extended: list[Key] = dataclasses.field(default_factory=list)  # entries dropped as prefixes of the new one


@dataclasses.dataclass
class _Entry:
    key: Key
    blocks: list[int]


class PromptCache:
    """Up to ``capacity`` entries (id -> key and blocks of ``pool``), least recently used first."""

    def __init__(self, capacity: int, pool: BlockPool):
        assert capacity >= 0, capacity
        self.capacity, self.pool = capacity, pool
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: int) -> bool:
        return entry in self._entries

    @property
    def entries(self) -> list[int]:
        return list(self._entries)

    def key(self, entry: int) -> Key:
        return self._entries[entry].key

    def blocks(self, entry: int) -> list[int]:
        return self._entries[entry].blocks

    def n_tokens(self) -> int:
        """Positions held by all entries together (a shared prefix counted once per entry)."""
        return sum(positions(e.key) for e in self._entries.values())

    def n_blocks(self) -> int:
        """Blocks held by the entries (each once, however many entries share it)."""
        return len({b for e in self._entries.values() for b in e.blocks})

    def longest_prefix(self, key: Sequence[int], limit: int | None = None) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``key`` (at most ``limit`` of its positions):
        (the entry, the shared positions), or (None, 0).  Ties go to the most recently used entry."""
        n_positions = positions(key)
        salt = len(key) - n_positions  # a salted key's first element: matched, but no position
        limit = n_positions if limit is None else min(limit, n_positions)
        key = tuple(key[: salt + limit])  # entries are tuples: a list never equals one
        best_entry, best = None, 0
        for entry, cached in reversed(self._entries.items()):  # most recent first
            n = common_prefix(cached.key, key) - salt
            if n > best:
                best_entry, best = entry, n
        return best_entry, best

    def touch(self, entry: int) -> None:
        self._entries.move_to_end(entry)

    def insert(self, key: Sequence[int], blocks: list[int]) -> Inserted:
        """Make ``blocks`` (holding the positions of ``key``; the caller's reference to each passes to the
        cache) an entry.  An entry that is a prefix of the new one is dropped; if an entry already covers the
        new one, that one becomes the most recent instead; the least recently used go beyond ``capacity``."""
        key = tuple(key)
        if not positions(key) or self.capacity == 0:
            self.pool.release(blocks)
            return Inserted(None)
        extended = []
        for other, cached in list(self._entries.items()):
            if len(cached.key) >= len(key) and cached.key[: len(key)] == key:
                self.touch(other)  # it answers everything this one would, and more
                self.pool.release(blocks)
                return Inserted(None, covered_by=cached.key)
            if cached.key == key[: len(cached.key)]:
                self._drop(other)
                extended.append(cached.key)
        entry = next(self._ids)
        self._entries[entry] = _Entry(key, blocks)
        while len(self._entries) > self.capacity:
            self.evict()
        return Inserted(entry, extended=extended)

    def evict(self, keep: int | None = None) -> bool:
        """Drop the least recently used entry other than ``keep``; False if there is none."""
        for entry in self._entries:
            if entry != keep:
                self._drop(entry)
                return True
        return False

    def clear(self) -> None:
        """Drop every entry (their KV states are gone)."""
        for entry in list(self._entries):
            self._drop(entry)

    def _drop(self, entry: int) -> None:
        self.pool.release(self._entries.pop(entry).blocks)
