"""The engine's batched loop, in process, on the reference model with tiny random weights: batching, the
prompt cache in KV blocks, cancellation, a lost cache, and a batch of one driven by its caller (the CLI)."""

from __future__ import annotations

import threading
import time

import pytest

from shardllama.backend import LocalBackend
from shardllama.config import ModelArgs
from shardllama.engine import Engine, Failed, Finished, QueueFull, Request, Token, generate
from shardllama.engine.batching import prefill_width
from shardllama.errors import WorkerError
from shardllama.model import random_weights
from shardllama.kv_cache import BLOCK_SIZE
from shardllama.sampling import SamplingParams

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
WEIGHTS = random_weights(ARGS, seed=3)
GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 5, 9, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11, 3, 6, 60, 2]]


def backend(n_seqs: int, extra_blocks: int = 0) -> LocalBackend:
    """A backend whose KV cache holds ``n_seqs`` sequences of 32 positions (and ``extra_blocks`` more blocks)."""
    return LocalBackend(ARGS, WEIGHTS, max_seq_len=32, n_blocks=n_seqs * -(-32 // BLOCK_SIZE) + extra_blocks)


def reference(prompt: list[int], n: int) -> list[int]:
    return [e.id for e in generate(backend(1), prompt, GREEDY, max_new_tokens=n)]


class Collector:
    """A job's emit callback: events into a list, an Event set by the last one."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Failed, Finished)) or (isinstance(event, Token) and event.last):
            self.ended.set()

    def tokens(self) -> list[int]:
        assert self.ended.wait(30), "the job never ended"
        assert not any(isinstance(e, Failed) for e in self.events), self.events
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def stats(self):
        return self.events[-1].stats


def job(prompt, n, **kw) -> tuple[Request, Collector]:
    c = Collector()
    return Request(prompt=list(prompt), params=GREEDY, emit=c, max_new_tokens=n, max_len=32, **kw), c


@pytest.fixture
def make_engine():
    """Engines running in a thread of their own, as the server's does."""
    made = []

    def make(b=None, **kw):
        kw = {"max_concurrent": 3, "max_queue": 4, "cache_size": 4, **kw}
        s = Engine(b or backend(kw["max_concurrent"] + kw["cache_size"]), **kw)
        s.start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_batched_greedy_equals_one_at_a_time(make_engine):
    s = make_engine(prefill_chunk=4)  # the 11-token prompt is fed in three chunks
    jobs = [job(p, 10) for p in PROMPTS]
    for j, _ in jobs:
        s.submit(j)
    for (_, c), p in zip(jobs, PROMPTS):
        assert c.tokens() == reference(p, 10)
    st = s.stats()
    assert st["max_decode_batch"] >= 2 and st["completed"] == 3 and st["running"] == 0


def test_prompt_cache_reuses_the_longest_prefix(make_engine):
    s = make_engine()
    first, c1 = job(PROMPTS[0], 6)
    s.submit(first)
    out = c1.tokens()
    assert c1.stats.cached_tokens == 0 and c1.stats.computed_tokens == 4
    # The earlier prompt plus its continuation, plus new tokens: only the new ones (and the one generated
    # token never fed) are computed.
    follow = PROMPTS[0] + out + [3, 4]
    second, c2 = job(follow, 5)
    s.submit(second)
    assert c2.tokens() == reference(follow, 5)
    assert c2.stats.cached_tokens == 4 + 5 and c2.stats.computed_tokens == len(follow) - 9
    # The same prompt again: everything but the last token comes from the cache.
    third, c3 = job(follow, 5)
    s.submit(third)
    assert c3.tokens() == reference(follow, 5)
    assert c3.stats.cached_tokens == len(follow) - 1 and c3.stats.computed_tokens == 1
    assert s.stats()["cache_hits"] == 2


def test_salted_jobs_share_cached_prefixes_only_within_their_salt(make_engine):
    s = make_engine()

    def run(salt):
        j, c = job(PROMPTS[2], 3, cache_salt=salt)
        s.submit(j)
        return c.tokens(), c.stats.cached_tokens

    assert run("tenant A") == (reference(PROMPTS[2], 3), 0)
    assert run("tenant B")[1] == 0  # another client guessing the whole prompt learns nothing from the cache
    assert run(None)[1] == 0  # nor does one without a salt
    assert run("tenant A") == (reference(PROMPTS[2], 3), len(PROMPTS[2]) - 1)  # its own: reused
    assert run(None)[1] == len(PROMPTS[2]) - 1  # requests without a salt share one cache, as before
    assert s.stats()["cache_entries"] == 3


def test_zero_new_tokens_and_end_tokens(make_engine):
    s = make_engine()
    j, c = job(PROMPTS[0], 0)
    s.submit(j)
    assert c.ended.wait(10) and isinstance(c.events[-1], Finished)
    expected = reference(PROMPTS[1], 8)
    j, c = job(PROMPTS[1], 8, stop_ids=frozenset({expected[2]}))
    s.submit(j)
    assert c.tokens() == expected[:3] and c.events[-1].is_end


def test_queue_full_and_cancel(make_engine):
    s = make_engine(Wrapped(backend(1), delay=0.01), max_concurrent=1, max_queue=1, cache_size=0)
    running, c1 = job(PROMPTS[0], 28)
    queued, c2 = job(PROMPTS[1], 5)
    s.submit(running)
    s.submit(queued)
    with pytest.raises(QueueFull, match="busy"):
        s.submit(job(PROMPTS[2], 5)[0])
    s.cancel(queued)  # out of the queue at once
    s.cancel(running)  # out of its place before the next pass
    extra, c3 = job(PROMPTS[2], 3)
    s.submit(extra)  # a free place again
    assert c3.tokens() == reference(PROMPTS[2], 3)
    assert not c1.ended.is_set() and len(c1.events) < 28 and not c2.events  # stopped, told nothing more
    assert s.stats()["cancelled"] == 2 and s.stats()["rejected"] == 1


class Wrapped:
    """A backend that takes ``delay`` seconds a pass, and whose workers are "replaced" during pass number
    ``fail_at``: cache_epoch changes and the pass fails, as the coordinator's does when a continued
    sequence's slot was lost."""

    def __init__(self, inner: LocalBackend, fail_at: int = 0, delay: float = 0.0):
        self.inner, self.fail_at, self.delay, self.calls = inner, fail_at, delay, 0
        self.max_seq_len, self.block_size, self.n_blocks = inner.max_seq_len, inner.block_size, inner.n_blocks
        self.cache_epoch = 0
        self.copies: list[tuple[int, int, int]] = []

    def forward(self, tokens, start, tables, lengths=None, all_logits=False):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls == self.fail_at:
            self.cache_epoch += 1
            self.inner.cache = self.inner.model.new_cache(self.n_blocks)  # everything is gone
            raise WorkerError("the KV cache was lost when a worker was replaced")
        return self.inner.forward(tokens, start, tables, lengths, all_logits)

    def copy_block(self, src, dst, length):
        self.copies.append((src, dst, length))
        self.inner.copy_block(src, dst, length)

    def kv_bytes_per_token(self) -> int:
        return self.inner.kv_bytes_per_token()


def test_a_lost_kv_cache_is_recomputed_and_the_stream_goes_on(make_engine):
    b = Wrapped(backend(6), fail_at=5)
    s = make_engine(b, max_concurrent=2, cache_size=4)
    j, c = job(PROMPTS[0], 10)
    s.submit(j)
    assert c.tokens() == reference(PROMPTS[0], 10)
    assert c.stats.computed_tokens > 4  # the prompt and what was generated so far, fed again


class Replaced(Wrapped):
    """A backend whose workers are "replaced" just before pass number ``replace_at``, as the coordinator's
    ``_ready`` does: every block is lost, a row that continues lost blocks is refused (``WorkerError``), a row
    fed from position 0 computes and the blocks it wrote are valid again (``block_transfer``)."""

    def __init__(self, inner: LocalBackend, replace_at: int):
        super().__init__(inner)
        self.replace_at, self.lost = replace_at, set()

    def forward(self, tokens, start, tables, lengths=None, all_logits=False):
        self.calls += 1
        if self.calls == self.replace_at:
            self.cache_epoch += 1
            self.inner.cache = self.inner.model.new_cache(self.n_blocks)
            self.lost = set(range(self.n_blocks))
        T, size = tokens.shape[1], self.block_size
        for row, p in zip(tables.tolist(), start.tolist()):
            if p > 0 and self.lost & set(row[: -(-p // size)]):
                raise WorkerError("the KV cache was lost when a worker was replaced")
        for row, p in zip(tables.tolist(), start.tolist()):
            self.lost -= set(row[: -(-(p + T) // size)])
        return self.inner.forward(tokens, start, tables, lengths, all_logits)


def test_a_pass_fed_from_0_on_replaced_workers_goes_on(make_engine):
    # Workers replaced while idle are replaced before the next pass; that pass feeds its rows from 0 on the
    # new workers, so they are valid: once they were reset anyway and continued blocks the prompt cache had
    # given back (lost), and the request failed.
    b = Replaced(backend(6), replace_at=0)
    s = make_engine(b, max_concurrent=2, cache_size=4)
    for prompt in PROMPTS:  # the prompt cache holds their blocks: the lowest ones
        j, c = job(prompt, 3)
        s.submit(j)
        assert c.tokens() == reference(prompt, 3)
    b.replace_at = b.calls + 1
    j, c = job([6], 8)  # one token: fed by a decode pass from position 0
    s.submit(j)
    assert c.tokens() == reference([6], 8)
    assert b.cache_epoch == 1 and s.stats()["failed"] == 0


class Gated(Wrapped):
    """A backend whose first pass waits until the test opens the gate, recording (B, T, lengths) of every pass:
    requests submitted meanwhile are all waiting when the loop next admits."""

    def __init__(self, inner: LocalBackend):
        super().__init__(inner)
        self.entered, self.gate, self.passes = threading.Event(), threading.Event(), []

    def forward(self, tokens, start, tables, lengths=None, all_logits=False):
        self.passes.append((tokens.shape[0], tokens.shape[1], None if lengths is None else lengths.tolist()))
        self.entered.set()
        assert self.gate.wait(30)
        return super().forward(tokens, start, tables, lengths, all_logits)


def test_new_prompts_waiting_together_are_prefilled_in_one_pass(make_engine):
    b = Gated(backend(4 + 4))
    s = make_engine(b, max_concurrent=4, cache_size=4, prefill_chunk=8)
    first, c0 = job([2, 4, 6], 3)
    s.submit(first)
    assert b.entered.wait(10)  # the loop is inside the first job's prefill
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # 4, 3 and 11 tokens
    jobs = [job(p, 6) for p in prompts]
    for j, _ in jobs:
        s.submit(j)
    b.gate.set()
    for (_, c), p in zip(jobs, prompts):
        assert c.tokens() == reference(p, 6)  # greedy: the same tokens as alone
    assert c0.tokens() == reference([2, 4, 6], 3)
    # The three prompts in one pass, 8 wide (the chunk; padding the two short rows costs 4 + 5 <= PAD_SLACK
    # positions): rows of 4, 3 and 8 tokens; the long prompt's last 3 follow next round.
    assert (3, 8, [4, 3, 8]) in b.passes, b.passes
    st = s.stats()
    assert st["max_prefill_batch"] == 3 and st["prefill_rows"] > st["prefill_passes"]
    assert st["computed_tokens"] == 3 + 4 + 3 + 11


@pytest.mark.parametrize("wants, room, width", [
    ([5], 64, 5),
    ([4, 3, 8], 64, 8),  # pads 9 <= 16
    ([256, 5], 512, 5),  # 256 would pad 251: the short one goes first, the long one continues alone
    ([100, 90, 80], 512, 100),  # pads 30 <= 270 / 8
    ([200, 20, 20], 512, 20),
    ([40, 40], 10, 10),  # the cache has 10 positions left in one slot: no row may be padded beyond it
])
def test_prefill_width(wants, room, width):
    assert prefill_width(wants, room) == width


# ---- KV blocks -------------------------------------------------------------------------------------------


def test_a_cache_hit_shares_whole_blocks_and_copies_at_most_one(make_engine):
    b = Wrapped(backend(2, extra_blocks=4))
    s = make_engine(b, max_concurrent=2, cache_size=4)
    prompt = [(7 * i) % 90 + 1 for i in range(20)]
    first, c1 = job(prompt, 5)
    s.submit(first)
    out = c1.tokens()
    assert b.copies == []
    # The prompt and its continuation are cached in positions 0..23: block 0 whole, 8 positions of another.
    follow = prompt + out + [3]
    second, c2 = job(follow, 4)
    s.submit(second)
    assert c2.tokens() == reference(follow, 4)
    assert c2.stats.cached_tokens == 24
    assert len(b.copies) == 1 and b.copies[0][2] == 24 - BLOCK_SIZE  # only the partial block was copied
    # A prompt that shares exactly the first block: shared, nothing copied.
    third, c3 = job(prompt[:BLOCK_SIZE] + [5, 5, 5], 3)
    s.submit(third)
    assert c3.tokens() == reference(prompt[:BLOCK_SIZE] + [5, 5, 5], 3)
    assert c3.stats.cached_tokens == BLOCK_SIZE and len(b.copies) == 1


def test_blocks_are_held_in_proportion_to_the_tokens(make_engine):
    s = make_engine(backend(3, extra_blocks=20), max_concurrent=3, cache_size=8)
    j, c = job([1, 2, 3], 4)
    s.submit(j)
    c.tokens()
    s.close()
    assert s.pool.n_held == 1  # 6 positions cached: one block of 16, not a context's worth
    assert s.stats()["cache_blocks"] == 1 and s.stats()["cache_tokens"] == 6


def test_a_full_pool_evicts_the_least_recently_used_entries(make_engine):
    s = make_engine(backend(1, extra_blocks=2), max_concurrent=1, cache_size=10)
    prompts = [[p, p + 1, p + 2] + [p] * 14 for p in range(1, 6)]  # 17 tokens each: two blocks when cached
    for p in prompts:
        j, c = job(p, 3)
        s.submit(j)
        assert c.tokens() == reference(p, 3)
    st = s.stats()
    assert st["cache_entries"] == 2 and st["cache_blocks"] == 4  # the older entries made room for newer ones
    again, c = job(prompts[-1], 3)
    s.submit(again)
    assert c.tokens() == reference(prompts[-1], 3) and c.stats.cached_tokens == 16


def test_too_few_blocks_for_the_running_sequences_is_refused():
    with pytest.raises(ValueError, match="KV-cache blocks"):
        Engine(backend(1), max_concurrent=2)


def test_a_batch_of_one_driven_by_its_caller():
    engine = Engine(backend(1, extra_blocks=1), cache_size=1)
    events = []
    request, _ = job(PROMPTS[2], 6)
    for event in engine.run(request):
        events.append(event)
    assert [e.id for e in events] == reference(PROMPTS[2], 6) and events[-1].last
    assert events[-1].stats.generated == 6 and events[-1].stats.first_token_s > 0
    # Stopping early (a stop string, Ctrl-C) cancels it; what was fed stays cached for the next turn.
    follow, _ = job(request.tokens + [9], 8)
    stream = engine.run(follow)
    next(stream)
    stream.close()
    assert engine.stats()["cancelled"] == 1
    again, _ = job(follow.tokens + [4], 3)
    assert [e.id for e in engine.run(again)] == reference(follow.tokens + [4], 3)
    assert again.cached_tokens == len(follow.tokens) - 1
