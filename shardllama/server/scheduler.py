"""The batching loop: one thread owns the backend and runs every admitted generation together.

The backend is synchronous and not thread-safe, so one scheduler thread makes every call to it.  HTTP
handlers (on the event loop) hand it a :class:`~.jobs.Job` with :meth:`Scheduler.submit` and receive its events
through the job's ``emit`` callback (``loop.call_soon_threadsafe`` onto an asyncio queue).

At most ``max_concurrent`` jobs run at once, each in a KV-cache slot of its own; up to ``max_queue`` more
wait in FIFO order; beyond that :meth:`submit` raises :class:`QueueFull` (HTTP 503).  One round of the
loop:

1. admit waiting jobs into free run places: pick a slot, reusing the prompt cache's longest matching
   prefix (``copy_slot``), so only the rest of the prompt is fed;
2. one decode pass for every job with exactly one token to feed: a single ``backend.forward`` with B rows,
   each row its own slot and position; then each row samples its next token;
3. one prefill pass for every job with more to feed (new prompts, admitted together or still being fed):
   right-padded rows with their ``lengths``, each at most ``prefill_chunk`` tokens a round so a long prompt
   does not stall the others' decoding; a row's last chunk samples its first token.  Every pass streams
   all the weights once, so B prompts in one pass cost about one pass while they are short (memory-bound);
   for long ones the padding is real compute, so the pass is cut to the width that wastes at most
   ``PAD_SLACK`` positions or an eighth of the pass (:func:`prefill_width`) and longer rows go on next round.

A job's slot is handed to the prompt cache when it ends (finished, stopped, or its client went away):
its cached positions stay valid for whoever continues them (with the same ``cache_salt``, if it had one).
With a :class:`~.prompt_store.PromptStore` (``--prompt-cache-dir``) each new entry is also written to disk
(read from its slot here, written by the store's thread), and before serving anything the loop fills free
slots with the entries saved there.

When the backend's ``cache_epoch`` changes (a worker was replaced, every slot's contents are gone) the cache
is emptied and the running jobs are fed again from position 0 — their tokens are known, so their streams
go on.  (The entries on disk stay; they come back at the next start.)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import torch

from ..backend import Backend
from ..engine import Sequence
from ..errors import ShardllamaError
from ..sampling import choose
from .jobs import Event, Failed, Finished, Job, Token
from .prompt_cache import Key, PromptCache, positions
from .prompt_store import PromptStore, StoreError

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens fed per job per round
PAD_SLACK = 16  # padded positions a batched prefill may always carry (a guess for CPUs, not a measurement)
MAX_RETRIES = 2  # times a job is fed again from position 0 after its cache was lost, before it fails


def prefill_width(wants: list[int], room: int) -> int:
    """Tokens per row of a batched prefill whose rows want ``wants`` tokens each (>= 1), none of them more
    than ``room`` (the padding also lands in the KV cache, which must have the positions): the widest that
    pads at most ``PAD_SLACK`` positions or an eighth of the pass.  Rows that want more continue next round."""
    capped = [min(w, room) for w in wants]
    for width in sorted(set(capped), reverse=True):
        real = sum(min(w, width) for w in capped)
        if len(capped) * width - real <= max(PAD_SLACK, real // 8):
            return width
    raise AssertionError(wants)  # unreachable: the narrowest width pads nothing


class QueueFull(ShardllamaError):
    """Every run place is taken and the waiting queue is full (HTTP 503)."""


class ServerClosing(ShardllamaError):
    """The server is shutting down (HTTP 503)."""


@dataclasses.dataclass
class Counters:
    requests: int = 0  # jobs admitted to run
    completed: int = 0  # ran to their end
    cancelled: int = 0  # client went away
    failed: int = 0
    rejected: int = 0  # queue full
    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache
    cache_hits: int = 0  # jobs that reused at least one token
    generated: int = 0
    decode_passes: int = 0
    decode_rows: int = 0
    max_decode_batch: int = 0
    prefill_passes: int = 0
    prefill_rows: int = 0  # prompts (chunks) fed by those passes: more rows than passes = batched prefills
    max_prefill_batch: int = 0
    cache_loaded: int = 0  # entries read from --prompt-cache-dir at start-up
    cache_saved: int = 0  # entries handed to it to write


class Scheduler:
    """Runs jobs on ``backend`` in a thread of its own; see the module docstring."""

    def __init__(self, backend: Backend, *, max_concurrent: int, max_queue: int, cache_size: int,
                 bytes_per_slot: int = 0, prefill_chunk: int = PREFILL_CHUNK, store: PromptStore | None = None):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if backend.n_slots < max_concurrent:
            raise ValueError(f"the backend has {backend.n_slots} KV-cache slots, fewer than "
                             f"max_concurrent {max_concurrent}")
        self.backend = backend
        self.max_concurrent = max_concurrent
        self.max_queue = max(0, max_queue)
        self.prefill_chunk = prefill_chunk
        self.bytes_per_slot = bytes_per_slot
        self.cache = PromptCache(min(max(0, cache_size), backend.n_slots - max_concurrent))
        self.store = store if self.cache.capacity > 0 else None
        if store is not None and self.store is None:
            log.warning("--prompt-cache-dir %s: no prompt-cache entry fits (size or memory 0); not used", store.dir)
        self.n_slots = max_concurrent + self.cache.capacity
        self._free = list(range(self.n_slots - 1, -1, -1))  # popped from the end: low slots first
        self._epoch = getattr(backend, "cache_epoch", 0)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._closing = False
        self._cache_info = (0, 0)  # entries, tokens
        self.counters = Counters()
        self._thread = threading.Thread(target=self._run, name="shardllama-scheduler", daemon=True)
        self._thread.start()

    # ---- the event-loop side ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job``; QueueFull when max_concurrent run and max_queue wait already."""
        with self._cond:
            if self._closing:
                raise ServerClosing("the server is shutting down")
            if len(self._active) + len(self._waiting) >= self.max_concurrent + self.max_queue:
                self.counters.rejected += 1
                raise QueueFull(f"the server is busy: {len(self._active)} generations running and "
                                f"{len(self._waiting)} waiting (at most {self.max_queue}); try again later")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (its client went away): out of the queue now, out of its run place before the next
        pass.  Harmless on a finished job."""
        with self._cond:
            if job.done:
                return
            job.cancelled = True
            try:
                self._waiting.remove(job)
                job.done = True
                self.counters.cancelled += 1
            except ValueError:
                pass
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            c = dataclasses.asdict(self.counters)
            entries, tokens = self._cache_info
            c.update(
                running=len(self._active), waiting=len(self._waiting), max_concurrent=self.max_concurrent,
                max_queue=self.max_queue, cache_entries=entries, cache_capacity=self.cache.capacity,
                cache_tokens=tokens, kv_bytes_per_slot=self.bytes_per_slot,
                cache_bytes_reserved=self.cache.capacity * self.bytes_per_slot,
                cache_bytes_used=tokens * self.bytes_per_slot // max(1, self.backend.max_seq_len),
            )
            return c

    def close(self) -> None:
        """Stop the loop after its current pass; every job still queued or running gets Failed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.store is not None:
            self.store.close()  # what is queued gets written
        with self._cond:
            jobs = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
        for job in jobs:
            job.done = True
            self._emit(job, Failed(ServerClosing("the server is shutting down")))

    # ---- the scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self.store is not None:
            try:
                self._restore()
            except Exception:
                log.exception("prompt cache: loading %s failed", self.store.dir)
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closing:
                    return
                admitted = []
                while self._waiting and len(self._active) < self.max_concurrent:
                    job = self._waiting.popleft()
                    self._active.append(job)
                    admitted.append(job)
            try:
                for job in admitted:
                    self._start(job)
                self._drop_cancelled()
                self._round()
            except Exception as e:  # a bug: fail what runs, keep serving
                log.exception("scheduler round failed")
                for job in list(self._active):
                    self._fail(job, e)
            with self._cond:  # what stats() reports; the cache itself is this thread's alone
                self._cache_info = (len(self.cache), self.cache.n_tokens())

    def _restore(self) -> None:
        """Fill free slots with the entries saved in the prompt-cache directory (least recently used first,
        so the in-memory LRU order is the directory's)."""
        loaded = 0
        for entry in reversed(self.store.open(keep=self.cache.capacity)):
            try:
                k, v = self.store.load(entry)
            except StoreError as e:
                log.warning("prompt cache: skipping %s", e)
                continue
            slot = self._free.pop()
            try:
                self.backend.write_slot(slot, k, v)
            except Exception as e:
                self._free.append(slot)
                log.warning("prompt cache: cannot load %s into the KV cache: %s", entry.path, e)
                if self._check_epoch():
                    return
                continue
            self._add_entry(slot, entry.key, save=False)
            loaded += 1
        self.counters.cache_loaded = loaded
        if loaded:
            log.info("prompt cache: %d entries loaded from %s", loaded, self.store.dir)

    def _add_entry(self, slot: int, key: Key, save: bool = True) -> None:
        """Hand ``slot`` (holding the tokens of ``key``) to the prompt cache and mirror the change on disk: a new
        entry is written (``save``), entries it extends are deleted, an entry that covers it is marked used."""
        before = {s: self.cache.key(s) for s in self.cache.slots} if self.store is not None else {}
        freed = self.cache.insert(slot, key)
        self._free.extend(freed)
        if self.store is None or not positions(key):
            return
        if slot not in self.cache:  # an entry covers it (insert made that one the most recent)
            if self.cache.capacity:
                self.store.touch(self.cache.key(self.cache.slots[-1]))
            return
        key = self.cache.key(slot)
        extended = [before[s] for s in freed if key[: len(before[s])] == before[s]]
        if not save:
            self.store.forget(extended)
            return
        try:
            k, v = self.backend.read_slot(slot, positions(key))
        except Exception as e:
            log.warning("prompt cache: cannot read slot %d to save it: %s", slot, e)
            return
        self.store.save(key, k, v, replaces=extended)
        self.counters.cache_saved += 1

    def _start(self, job: Job) -> None:
        self._check_epoch()
        self.counters.requests += 1
        job.budget = min(job.max_len - len(job.prompt) + 1, job.max_new_tokens)
        if job.budget <= 0 or job.cancelled:
            job.seq = Sequence(slot=-1, tokens=list(job.prompt))
            self.counters.completed += not job.cancelled
            self._end(job, Finished(job.stats()), slot=None)
            return
        try:
            slot, reused = self._slot_for(job.key(job.prompt))
        except Exception as e:
            if not self._check_epoch():  # else the copy found its source lost: start from scratch
                self._fail(job, e, slot=None)
                return
            slot, reused = self._take_slot(), 0
        job.seq = Sequence(slot=slot, tokens=list(job.prompt), n_cached=reused)
        job.cached_tokens = reused
        self.counters.prompt_tokens += len(job.prompt)
        self.counters.cached_tokens += reused
        self.counters.cache_hits += reused > 0

    def _slot_for(self, key: Key) -> tuple[int, int]:
        """A slot for a new sequence (of cache key ``key``) and how many of its tokens it already holds.  At
        least the last token is always fed: its logits are the first prediction."""
        src, n = self.cache.longest_prefix(key, limit=positions(key) - 1)
        if src is None:
            return self._take_slot(), 0
        if not self._free and len(self.cache) == 1:  # the entry's slot is the only one left: take it over
            self.cache.remove(src)
            return src, n
        dst = self._take_slot(keep=src)
        try:
            self.backend.copy_slot(src, dst, n)
        except Exception:
            self._free.append(dst)
            raise
        self.cache.touch(src)
        if self.store is not None:
            self.store.touch(self.cache.key(src))
        return dst, n

    def _take_slot(self, keep: int | None = None) -> int:
        if self._free:
            return self._free.pop()
        slot = self.cache.evict(keep=keep)
        assert slot is not None, (self.n_slots, len(self._active), self.cache.slots)
        return slot

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active if j.cancelled]:
            self.counters.cancelled += 1
            self._end(job, None)

    def _round(self) -> None:
        decoding = [j for j in self._active if j.pending == 1]
        if decoding:
            self._decode(decoding)
        prefilling = [j for j in self._active if j.pending > 1 and not j.done]
        if prefilling:
            self._prefill(prefilling)

    def _decode(self, jobs: list[Job]) -> None:
        tokens = torch.tensor([[j.seq.tokens[-1]] for j in jobs])  # (B, 1)
        start = torch.tensor([j.seq.n_cached for j in jobs])  # (B,)
        slots = torch.tensor([j.seq.slot for j in jobs])  # (B,)
        logits = self._forward(jobs, tokens, start, slots)  # (B, vocab)
        if logits is None:
            return
        c = self.counters
        c.decode_passes += 1
        c.decode_rows += len(jobs)
        c.max_decode_batch = max(c.max_decode_batch, len(jobs))
        for job, row in zip(jobs, logits):
            if job.seq.n_cached < len(job.prompt):  # a prompt token (the one a cache hit leaves to feed)
                job.computed_tokens += 1
                c.computed_tokens += 1
            job.seq.n_cached += 1
            self._sample(job, row)

    def _prefill(self, jobs: list[Job]) -> None:
        """One forward pass feeding the next chunk of every job's prompt, rows right-padded to one width."""
        T = prefill_width([min(j.pending, self.prefill_chunk) for j in jobs],
                          min(self.backend.max_seq_len - j.seq.n_cached for j in jobs))
        counts = [min(j.pending, T) for j in jobs]
        tokens = torch.zeros((len(jobs), T), dtype=torch.long)  # (B, T); padding: token 0, never read back
        for row, (job, n) in enumerate(zip(jobs, counts)):
            tokens[row, :n] = torch.tensor(job.seq.tokens[job.seq.n_cached: job.seq.n_cached + n])
        start = torch.tensor([j.seq.n_cached for j in jobs])  # (B,)
        slots = torch.tensor([j.seq.slot for j in jobs])  # (B,)
        lengths = torch.tensor(counts) if min(counts) < T else None  # (B,)
        logits = self._forward(jobs, tokens, start, slots, lengths)  # (B, vocab)
        if logits is None:
            return
        c = self.counters
        c.prefill_passes += 1
        c.prefill_rows += len(jobs)
        c.max_prefill_batch = max(c.max_prefill_batch, len(jobs))
        for job, n, row in zip(jobs, counts, logits):
            c.computed_tokens += n
            job.computed_tokens += n
            job.seq.n_cached += n
            if job.pending == 0:
                self._sample(job, row)

    def _forward(self, jobs: list[Job], tokens, start, slots, lengths=None) -> torch.Tensor | None:
        """backend.forward for these jobs' rows; None if it failed (the jobs are then failed or, if their
        cache was lost to a worker replacement, set to be fed again from position 0)."""
        t0 = time.perf_counter()
        try:
            logits = self.backend.forward(tokens, start, slots, lengths)
        except Exception as e:
            if self._check_epoch():  # a worker was replaced: every slot must be fed again
                for job in jobs:
                    job.retries += 1
                    if job.retries > MAX_RETRIES:
                        self._fail(job, e)
                return None
            if not isinstance(e, ShardllamaError):
                log.exception("forward pass failed")
            for job in jobs:
                self._fail(job, e)
            return None
        log.debug("forward B=%d T=%d: %.1f ms", tokens.shape[0], tokens.shape[1], 1000 * (time.perf_counter() - t0))
        self._check_epoch()
        return logits

    def _check_epoch(self) -> bool:
        """If the backend lost its KV caches since we last looked: empty the prompt cache and make every
        running job feed its tokens again from position 0.  True if that happened."""
        epoch = getattr(self.backend, "cache_epoch", 0)
        if epoch == self._epoch:
            return False
        log.warning("the KV caches were lost (a worker was replaced): prompt cache emptied, "
                    "%d running generation(s) recomputed", len(self._active))
        self._epoch = epoch
        self._free.extend(self.cache.clear())
        for job in self._active:
            if job.seq is not None:
                job.seq.n_cached = 0
        return True

    def _sample(self, job: Job, logits: torch.Tensor) -> None:
        token, prob = choose(logits, job.seq.tokens, job.params, job.generator)
        # In f64: f32 probabilities of a 50k vocabulary sum to 1 only within ~1e-5.
        probs = torch.softmax(logits.double(), dim=-1) if job.full_distribution else None
        job.seq.tokens.append(token)
        job.generated += 1
        self.counters.generated += 1
        is_end = token in job.stop_ids
        last = is_end or job.generated >= job.budget
        if last:
            self.counters.completed += 1
        event = Token(token, prob, is_end, last, probs, job.stats() if last else None)
        if last:
            self._end(job, event)
        else:
            self._emit(job, event)

    def _fail(self, job: Job, error: BaseException, slot: int | None | bool = True) -> None:
        self.counters.failed += 1
        self._end(job, Failed(error), keep=False, slot=slot)

    def _end(self, job: Job, event: Event | None, keep: bool = True, slot: int | None | bool = True) -> None:
        """Take ``job`` out of its run place, send its last event, and give its slot to the prompt cache
        (``keep``: the slot's contents are valid) or back to the free list."""
        with self._cond:
            if job in self._active:
                self._active.remove(job)
            job.done = True
        if slot is True and job.seq is not None and job.seq.slot >= 0:
            s = job.seq.slot
            if keep:
                self._add_entry(s, job.key(job.seq.tokens[: job.seq.n_cached]))
            else:
                self._free.append(s)
            job.seq.slot = -1
        if event is not None:
            self._emit(job, event)

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except Exception:  # the event loop is gone (server shutting down): nobody to tell
            job.cancelled = True
