"""Cached prefixes: the prompt cache (``prompt_cache``) over the engine's KV blocks (``blocks``), mirrored on
disk by a :class:`~.prompt_store.PromptStore` when there is one.  The engine's loop asks three things of it:
the longest cached prefix of a new prompt, as a block table of the new sequence's own (:meth:`start`); to
keep a finished sequence's blocks (:meth:`keep`); and, once at start-up, to load what the disk holds
(:meth:`restore`).  All on the engine's thread."""

from __future__ import annotations

import logging

from ..backend import Backend
from ..kv_cache import blocks_for
from .blocks import BlockPool, Tables
from .prompt_cache import Key, PromptCache, positions
from .prompt_store import PromptStore, StoreError

log = logging.getLogger(__name__)


class Prefixes:
    def __init__(self, backend: Backend, pool: BlockPool, capacity: int, store: PromptStore | None):
        self.backend, self.pool = backend, pool
        self.cache = PromptCache(capacity, pool)
        self.tables = Tables(pool, make_room=self.cache.evict)
        self.store = store if capacity > 0 else None
        if store is not None and self.store is None:
            log.warning("--prompt-cache-dir %s: the prompt cache has no room (size or memory 0); not used", store.dir)
        self.loaded = self.saved = 0  # entries read from the store at start-up, handed to it to write

    def start(self, key: Key) -> tuple[list[int], int]:
        """A block table for a new sequence of cache key ``key`` and how many of its positions it holds already:
        the longest cached prefix's whole blocks shared, a partial last block copied.  At least the last token is
        always left to feed: its logits are the first prediction."""
        entry, n = self.cache.longest_prefix(key, limit=positions(key) - 1)
        if entry is None:
            return [], 0
        table = self.tables.start_from(self.cache.blocks(entry), n, self.backend.copy_block)
        self.cache.touch(entry)
        if self.store is not None:
            self.store.touch(self.cache.key(entry))
        return table, n

    def keep(self, key: Key, table: list[int], save: bool = True) -> None:
        """Hand ``table`` (holding the positions of ``key``; the caller's references pass to the cache) to the
        prompt cache and mirror the change on disk: a new entry is written (``save``), entries it extends are
        deleted, an entry that covers it is marked used."""
        done = self.cache.insert(key, table)
        if self.store is None or not positions(key):
            return
        if done.entry is None:
            if done.covered_by is not None:
                self.store.touch(done.covered_by)
            return
        if not save:
            self.store.forget(done.extended)
            return
        try:
            k, v = self.backend.read_blocks(table, positions(key))
        except Exception as e:
            log.warning("prompt cache: cannot read the blocks of a new entry to save it: %s", e)
            return
        self.store.save(key, k, v, replaces=done.extended)
        self.saved += 1

    def restore(self, reserve: int, lost) -> None:
        """Load the entries saved on disk into free blocks (least recently used first, so the in-memory LRU order
        is the directory's), leaving ``reserve`` blocks free for the running sequences; ``lost()`` says whether a
        failure was the backend losing its caches (then loading stops)."""
        for entry in reversed(self.store.open(keep=self.cache.capacity)):
            try:
                k, v = self.store.load(entry)
            except StoreError as e:
                log.warning("prompt cache: skipping %s", e)
                continue
            if self.pool.n_free - blocks_for(k.shape[1], self.pool.block_size) < reserve:
                log.info("prompt cache: the KV cache is full; %s and older entries not loaded", entry.path)
                break
            table: list[int] = []
            try:
                self.tables.grow(table, k.shape[1])
                self.backend.write_blocks(table, k, v)
            except Exception as e:
                self.tables.release(table)
                log.warning("prompt cache: cannot load %s into the KV cache: %s", entry.path, e)
                if lost():
                    return
                continue
            self.keep(entry.key, table, save=False)
            self.loaded += 1
        if self.loaded:
            log.info("prompt cache: %d entries loaded from %s", self.loaded, self.store.dir)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()  # what is queued gets written
