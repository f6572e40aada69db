"""The engine: one batched loop that owns the backend and runs every admitted request together.

The backend is synchronous and not thread-safe, so one thread makes every call to it: the server starts
:meth:`Engine.start` (a thread of its own; HTTP handlers :meth:`~Engine.submit` requests and get their
events through ``loop.call_soon_threadsafe``), the CLI and interactive mode drive it from their own thread
with :meth:`Engine.run` (a batch of one).  Either way the same rounds run:

At most ``max_concurrent`` requests run at once; up to ``max_queue`` more wait in FIFO order; beyond that
:meth:`submit` raises :class:`QueueFull` (HTTP 503).  One round of the loop:

1. admit waiting requests: each starts with the prompt cache's longest matching prefix, sharing that
   entry's KV blocks (``blocks.Tables.start_from``), so only the rest of the prompt is fed;
2. one decode pass for every request with exactly one token to feed: a single ``backend.forward`` with B
   rows, each row its own block table and position; then each row samples its next token;
3. one prefill pass for every request with more to feed (new prompts, admitted together or still being
   fed): right-padded rows with their ``lengths``, each at most ``prefill_chunk`` tokens a round so a long
   prompt does not stall the others' decoding; a row's last chunk samples its first token.  Every pass
   streams all the weights once, so B prompts in one pass cost about one pass while they are short
   (memory-bound); for long ones the padding is real compute, so the pass is cut to the width that wastes
   at most ``PAD_SLACK`` positions or an eighth of the pass (``batching.prefill_width``) and longer rows go
   on next round.

A request's blocks go to the prompt cache when it ends (finished, stopped, or its client went away): its
cached positions stay valid for whoever continues them (with the same ``cache_salt``, if it had one).  The
cache gives blocks back, least recently used entry first, when a running sequence needs one.  With a
:class:`~.prompt_store.PromptStore` (``--prompt-cache-dir``) each new entry is also written to disk (read
from its blocks here, written by the store's thread), and before serving anything the loop loads the
entries saved there.

When the backend's ``cache_epoch`` changes (a worker was replaced, every block's contents are gone) the
cache is emptied and the running requests are fed again from position 0 — their tokens are known, so
their streams go on.  (The entries on disk stay; they come back at the next start.)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Iterator

import torch

from ..backend import Backend
from ..errors import ShardllamaError, UsageError
from ..sampling import choose
from .blocks import BlockPool, blocks_needed
from .prefixes import Prefixes
from .prompt_store import PromptStore
from . import logprobs
from .batching import prefill_rows, prefill_width, table_rows
from .requests import Counters, Event, Failed, Finished, PromptLogprobs, QueueFull, Request, ServerClosing, Token

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens fed per request per round
MAX_RETRIES = 2  # times a request is fed again from position 0 after its cache was lost, before it fails


class Engine:
    """Runs requests on ``backend``; see the module docstring."""

    def __init__(self, backend: Backend, *, max_concurrent: int = 1, max_queue: int = 0, cache_size: int = 0,
                 prefill_chunk: int = PREFILL_CHUNK, store: PromptStore | None = None,
                 observer: Callable[[str, float, int], None] | None = None):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        need = blocks_needed(max_concurrent, backend.max_seq_len, backend.block_size)
        if backend.n_blocks < need:
            raise ValueError(f"the backend has {backend.n_blocks} KV-cache blocks, fewer than the {need} that "
                             f"{max_concurrent} sequence(s) of {backend.max_seq_len} positions may need")
        self.backend = backend
        self.max_concurrent = max_concurrent
        self.max_queue = max(0, max_queue)
        self.prefill_chunk = prefill_chunk
        self.pool = BlockPool(backend.n_blocks, backend.block_size)
        self._reserve = need  # blocks the running sequences may hold; the rest is the prompt cache's
        self.prefixes = Prefixes(backend, self.pool, max(0, cache_size) if backend.n_blocks > need else 0, store)
        self.cache, self.tables = self.prefixes.cache, self.prefixes.tables
        self._epoch = backend.cache_epoch
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._cache_info = (0, 0, 0)  # entries, tokens, blocks: what stats() reports from other threads
        self.counters = Counters()
        # observer(kind, seconds, n_tokens): "prefill"/"decode" after each pass, "first_token" (the server's metrics)
        self.observer = observer

    # ---- clients ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a thread of its own (the server); :meth:`close` stops it."""
        assert self._thread is None, "the engine runs already"
        self._thread = threading.Thread(target=self._run, name="shardllama-engine", daemon=True)
        self._thread.start()

    def run(self, request: Request) -> Iterator[Event]:
        """Run ``request`` in this thread (the CLI, interactive mode): its events, until the last one.
        Stopping the iteration early cancels it; its blocks go to the prompt cache at once."""
        assert self._thread is None, "run() drives the loop itself; the engine has a thread"
        events: collections.deque[Event] = collections.deque()
        request.emit = events.append
        self.submit(request)
        try:
            while True:
                if not events:
                    self.step()
                while events:
                    event = events.popleft()
                    yield event
                    if isinstance(event, (Finished, Failed)) or (isinstance(event, Token) and event.last):
                        return
        finally:
            if not request.done:
                self.cancel(request)
                self._drop_cancelled()

    def submit(self, request: Request) -> None:
        """Queue ``request`` (with its followers); QueueFull when max_concurrent run and max_queue wait already."""
        if request.size > self.max_concurrent:
            raise UsageError(f"{request.size} choices of one prompt run together, more than the "
                             f"{self.max_concurrent} generations the server runs at once")
        with self._cond:
            if self._closing:
                raise ServerClosing("the server is shutting down")
            waiting = sum(r.size for r in self._waiting)
            if len(self._active) + waiting + request.size > self.max_concurrent + self.max_queue:
                self.counters.rejected += 1
                raise QueueFull(f"the server is busy: {len(self._active)} generations running and "
                                f"{len(self._waiting)} waiting (at most {self.max_queue}); try again later")
            self._waiting.append(request)
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Stop ``request`` (its client went away): out of the queue now, out of its run place before the
        next pass.  Harmless on a finished request."""
        with self._cond:
            if request.done:
                return
            request.cancelled = True
            try:
                self._waiting.remove(request)
                for r in (request, *request.followers):
                    r.done = True
                self.counters.cancelled += 1
            except ValueError:
                pass
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            c = dataclasses.asdict(self.counters)
            c.update(cache_loaded=self.prefixes.loaded, cache_saved=self.prefixes.saved)
            entries, tokens, blocks = self._cache_info
            per_block = self.backend.kv_bytes_per_token() * self.pool.block_size
            c.update(
                running=len(self._active), waiting=len(self._waiting), max_concurrent=self.max_concurrent,
                max_queue=self.max_queue, cache_entries=entries, cache_capacity=self.cache.capacity,
                cache_tokens=tokens, kv_block_size=self.pool.block_size, kv_blocks=self.pool.n_blocks,
                kv_bytes_per_block=per_block, cache_blocks=blocks, cache_bytes_used=blocks * per_block,
                cache_blocks_limit=self.pool.n_blocks - self._reserve if self.cache.capacity else 0,
            )
            return c

    def close(self) -> None:
        """Stop the loop after its current pass; every request still queued or running gets Failed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.prefixes.close()
        with self._cond:
            requests = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
        for r in requests:
            r.done = True
            self._emit(r, Failed(ServerClosing("the server is shutting down")))

    # ---- the loop ----------------------------------------------------------------------------------

    @property
    def store(self) -> PromptStore | None:
        return self.prefixes.store

    def _run(self) -> None:
        if self.store is not None:
            try:
                self.prefixes.restore(self._reserve, lost=self._check_epoch)
            except Exception:
                log.exception("prompt cache: loading %s failed", self.store.dir)
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closing:
                    return
            self.step()

    def step(self) -> None:
        """One round: admit what fits, drop the cancelled, one decode pass, one prefill pass."""
        with self._cond:
            admitted = []
            while self._waiting and len(self._active) + self._waiting[0].size <= self.max_concurrent:
                request = self._waiting.popleft()
                self._active.append(request)
                admitted.append(request)
        try:
            for request in admitted:
                self._start(request)
            self._drop_cancelled()
            decoding = [r for r in self._active if r.pending == 1]
            if decoding:
                self._decode(decoding)
            prefilling = [r for r in self._active if r.pending > 1 and not r.done]
            if prefilling:
                self._prefill(prefilling)
        except Exception as e:  # a bug: fail what runs, keep serving
            log.exception("engine round failed")
            for request in list(self._active):
                self._fail(request, e)
        with self._cond:
            self._cache_info = (len(self.cache), self.cache.n_tokens(), self.cache.n_blocks())

    def _start(self, r: Request) -> None:
        self._check_epoch()
        self.counters.requests += 1
        r.admitted_at = time.perf_counter()
        r.tokens = list(r.prompt)
        r.budget = min(min(r.max_len, self.backend.max_seq_len) - len(r.prompt) + 1, r.max_new_tokens)
        if not r.prompt:
            self._fail(r, UsageError("the prompt is empty and the model adds no BOS token: nothing to continue from"))
            return
        if (r.budget <= 0 and not r.prompt_logprobs) or r.cancelled:
            self.counters.completed += not r.cancelled
            self._end(r, Finished(r.stats()), keep=False)
            return
        try:
            # Prompt log-probabilities need the logits of every prompt position: such a prompt is fed whole.
            r.table, n = self.prefixes.start(r.key(r.prompt)) if not r.prompt_logprobs else ([], 0)
        except Exception as e:
            if not self._check_epoch():  # else the copy found its source lost: start from scratch
                self._fail(r, e)
                return
            n = 0
        r.n_cached = r.cached_tokens = n
        self.counters.prompt_tokens += len(r.prompt)
        self.counters.cached_tokens += n
        self.counters.cache_hits += n > 0

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._active if r.cancelled]:
            self.counters.cancelled += 1
            self._end(r, None)

    def _decode(self, requests: list[Request]) -> None:
        for r in requests:
            self.tables.grow(r.table, r.n_cached + 1)
        tokens = torch.tensor([[r.tokens[-1]] for r in requests])  # (B, 1)
        start = torch.tensor([r.n_cached for r in requests])  # (B,)
        logits = self._forward(requests, tokens, start)  # (B, vocab)
        if logits is None:
            return
        c = self.counters
        c.decode_passes += 1
        c.decode_rows += len(requests)
        c.max_decode_batch = max(c.max_decode_batch, len(requests))
        for r, row in zip(requests, logits):
            if r.n_cached < len(r.prompt):  # a prompt token (the one a cache hit leaves to feed)
                r.computed_tokens += 1
                c.computed_tokens += 1
            r.n_cached += 1
            if r.generated:
                self._sample(r, row)
            else:
                self._prompt_done(r, row)

    def _prefill(self, requests: list[Request]) -> None:
        """One forward pass feeding the next chunk of every request's prompt, rows right-padded to one width."""
        T = prefill_width([min(r.pending, self.prefill_chunk) for r in requests],
                          min(self.backend.max_seq_len - r.n_cached for r in requests))
        for r in requests:
            self.tables.grow(r.table, r.n_cached + T)  # the padding lands in the row's own blocks
        tokens, counts, lengths = prefill_rows(requests, T)
        start = torch.tensor([r.n_cached for r in requests])  # (B,)
        every = any(r.prompt_logprobs for r in requests)
        logits = self._forward(requests, tokens, start, lengths, every)  # (B, vocab), or (B, T, vocab) if every
        if logits is None:
            return
        c = self.counters
        c.prefill_passes += 1
        c.prefill_rows += len(requests)
        c.max_prefill_batch = max(c.max_prefill_batch, len(requests))
        for r, n, row in zip(requests, counts, logits):
            if every:
                if r.prompt_logprobs and not r.generated:  # positions n_cached.. predict the prompt's tokens after them
                    following = r.prompt[r.n_cached + 1: r.n_cached + 1 + n]
                    r.prompt_entries += logprobs.of_positions(row, following, r.logprobs or 0)
                row = row[n - 1]
            c.computed_tokens += n
            r.computed_tokens += n
            r.n_cached += n
            if r.pending == 0:
                (self._sample if r.generated else self._prompt_done)(r, row)

    def _forward(self, requests: list[Request], tokens, start, lengths=None, every=False) -> torch.Tensor | None:
        """backend.forward for these requests' rows; None if it failed (they are then failed or, if their
        cache was lost to a worker replacement, set to be fed again from position 0)."""
        tables = table_rows(requests)
        t0 = time.perf_counter()
        try:
            logits = self.backend.forward(tokens, start, tables, lengths, every)
        except Exception as e:
            if self._check_epoch():  # a worker was replaced: every sequence must be fed again
                for r in requests:
                    r.retries += 1
                    if r.retries > MAX_RETRIES:
                        self._fail(r, e)
                return None
            if not isinstance(e, ShardllamaError):
                log.exception("forward pass failed")
            for r in requests:
                self._fail(r, e)
            return None
        dt = time.perf_counter() - t0
        log.debug("forward B=%d T=%d: %.1f ms", tokens.shape[0], tokens.shape[1], 1000 * dt)
        if self.observer is not None:
            self.observer("decode" if tokens.shape[1] == 1 else "prefill", dt, tokens.numel())
        for r in requests:
            if r.generated:
                r.decode_s += dt
            else:
                r.prefill_s += dt
        self._check_epoch(fed=requests)  # a replacement before this pass: its rows, fed from 0, stay valid
        return logits

    def _check_epoch(self, fed: list[Request] = ()) -> bool:
        """If the backend lost its KV caches since we last looked: empty the prompt cache and make every
        running request feed its tokens again from position 0, in blocks of its own -- but those of ``fed``, a
        pass that succeeded on the new workers (the backend refuses a row continuing lost blocks, so theirs
        started at 0).  True if that happened."""
        epoch = self.backend.cache_epoch
        if epoch == self._epoch:
            return False
        log.warning("the KV caches were lost (a worker was replaced): prompt cache emptied, "
                    "%d running generation(s) recomputed", len(self._active))
        self._epoch = epoch
        self.cache.clear()
        for r in self._active:
            if r in fed:
                continue
            self.tables.release(r.table)
            r.n_cached = 0
            r.prompt_entries = []
        return True

    def _prompt_done(self, r: Request, logits: torch.Tensor) -> None:
        """``r``'s prompt is in the cache and ``logits`` predict what follows it: its prompt log-probabilities
        go out, its followers start from its blocks, and each samples its first token."""
        group = [r]
        for f in r.followers:
            f.tokens, f.n_cached, f.budget = list(r.tokens), r.n_cached, r.budget
            f.admitted_at, f.prefill_s, f.cached_tokens = r.admitted_at, r.prefill_s, r.cached_tokens
            try:
                f.table = self.tables.start_from(r.table, r.n_cached, self.backend.copy_block)
            except Exception as e:
                self._fail(f, e)
                continue
            self.counters.requests += 1
            with self._cond:
                self._active.append(f)
            group.append(f)
        r.followers = []
        if r.prompt_logprobs:
            entries = PromptLogprobs((None, *r.prompt_entries))
            r.prompt_entries = []
            for member in group:
                self._emit(member, entries)
        for member in group:
            if member.budget <= 0:  # only the prompt's log-probabilities were asked for
                self.counters.completed += 1
                self._end(member, Finished(member.stats()))
            else:
                self._sample(member, logits)

    def _sample(self, r: Request, logits: torch.Tensor) -> None:
        if r.constraint is not None and not r.constraint.mask(masked := logits.clone()):  # grammar.py
            log.warning("a request's grammar allows no next token (%s): it ends", r.constraint.error)
            self.counters.completed += 1
            return self._end(r, Finished(r.stats()))
        token, prob = choose(logits if r.constraint is None else masked, r.tokens, len(r.prompt), r.params, r.generator)
        # In f64: f32 probabilities of a 50k vocabulary sum to 1 only within ~1e-5.
        probs = torch.softmax(logits.double(), dim=-1) if r.full_distribution else None
        r.tokens.append(token)
        r.generated += 1
        if r.generated == 1:
            r.first_token_s = time.perf_counter() - r.admitted_at
            if self.observer is not None:
                self.observer("first_token", r.first_token_s, len(r.prompt))
        self.counters.generated += 1
        is_end = token in r.stop_ids or (r.constraint is not None and r.constraint.accept(token))
        last = is_end or r.generated >= r.budget
        if last:
            self.counters.completed += 1
        lp = logprobs.of_row(logits, token, r.logprobs) if r.logprobs is not None else None
        event = Token(token, prob, is_end, last, probs, r.stats() if last else None, lp)
        if last:
            self._end(r, event)
        else:
            self._emit(r, event)

    def _fail(self, r: Request, error: BaseException) -> None:
        self.counters.failed += 1
        self._end(r, Failed(error), keep=False)

    def _end(self, r: Request, event: Event | None, keep: bool = True) -> None:
        """Take ``r`` out of its run place, send its last event, and give its blocks to the prompt cache
        (``keep``: their contents are valid) or back to the pool."""
        with self._cond:
            if r in self._active:
                self._active.remove(r)
            r.done = True
        if keep and r.n_cached > 0:
            self.tables.release(r.table, keep=r.n_cached)
            self.prefixes.keep(r.key(r.tokens[: r.n_cached]), r.table)
        else:
            self.tables.release(r.table)
        r.table = []
        for f in r.followers:  # ended before its prompt was done: so do the choices that were to share it
            f.done = True
            if event is not None:
                self._emit(f, event)
        r.followers = []
        if event is not None:
            self._emit(r, event)

    def _emit(self, r: Request, event: Event) -> None:
        try:
            r.emit(event)
        except Exception:  # the event loop is gone (server shutting down): nobody to tell
            r.cancelled = True
