"""The server's batching loop, in process, on the reference model with tiny random weights."""

from __future__ import annotations

import threading
import time

import pytest

from shardllama.backend import LocalBackend
from shardllama.model import blocks_for
from shardllama.slot_bridge import SlotBackend
from shardllama.config import ModelArgs
from shardllama.engine import Sequence, generate
from shardllama.errors import WorkerError
from shardllama.model import random_weights
from shardllama.sampling import SamplingParams
from shardllama.server.jobs import Failed, Finished, Job, Token
from shardllama.server.scheduler import QueueFull, Scheduler

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
WEIGHTS = random_weights(ARGS, seed=3)
GREEDY = SamplingParams(temperature=0)
PROMPTS = [[1, 5, 9, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11, 3, 6, 60, 2]]


def backend(n_slots: int) -> SlotBackend:
    return SlotBackend(LocalBackend(ARGS, WEIGHTS, max_seq_len=32, n_blocks=n_slots * blocks_for(32)))


def reference(prompt: list[int], n: int) -> list[int]:
    return [e.token for e in generate(backend(1), Sequence(), prompt, GREEDY, max_new_tokens=n)]


class Collector:
    """A job's emit callback: events into a list, an Event set by the last one."""

    def __init__(self):
        self.events, self.ended = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (Failed, Finished)) or event.last:
            self.ended.set()

    def tokens(self) -> list[int]:
        assert self.ended.wait(30), "the job never ended"
        assert not any(isinstance(e, Failed) for e in self.events), self.events
        return [e.id for e in self.events if isinstance(e, Token)]

    @property
    def stats(self):
        return self.events[-1].stats


def job(prompt, n, **kw) -> tuple[Job, Collector]:
    c = Collector()
    return Job(prompt=list(prompt), params=GREEDY, emit=c, max_new_tokens=n, max_len=32, **kw), c


@pytest.fixture
def make_scheduler():
    made = []

    def make(b=None, **kw):
        kw = {"max_concurrent": 3, "max_queue": 4, "cache_size": 4, **kw}
        s = Scheduler(b or backend(kw["max_concurrent"] + kw["cache_size"]), **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_batched_greedy_equals_one_at_a_time(make_scheduler):
    s = make_scheduler(prefill_chunk=4)  # the 11-token prompt is fed in three chunks
    jobs = [job(p, 10) for p in PROMPTS]
    for j, _ in jobs:
        s.submit(j)
    for (_, c), p in zip(jobs, PROMPTS):
        assert c.tokens() == reference(p, 10)
    st = s.stats()
    assert st["max_decode_batch"] >= 2 and st["completed"] == 3 and st["running"] == 0


def test_prompt_cache_reuses_the_longest_prefix(make_scheduler):
    s = make_scheduler()
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


def test_salted_jobs_share_cached_prefixes_only_within_their_salt(make_scheduler):
    s = make_scheduler()

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


def test_zero_new_tokens_and_end_tokens(make_scheduler):
    s = make_scheduler()
    j, c = job(PROMPTS[0], 0)
    s.submit(j)
    assert c.ended.wait(10) and isinstance(c.events[-1], Finished)
    expected = reference(PROMPTS[1], 8)
    j, c = job(PROMPTS[1], 8, stop_ids=frozenset({expected[2]}))
    s.submit(j)
    assert c.tokens() == expected[:3] and c.events[-1].is_end


def test_queue_full_and_cancel(make_scheduler):
    s = make_scheduler(Wrapped(backend(1), delay=0.01), max_concurrent=1, max_queue=1, cache_size=0)
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

    def __init__(self, inner: SlotBackend, fail_at: int = 0, delay: float = 0.0):
        self.inner, self.fail_at, self.delay, self.calls = inner, fail_at, delay, 0
        self.n_slots, self.max_seq_len, self.cache_epoch = inner.n_slots, inner.max_seq_len, 0

    def forward(self, tokens, start, slots, lengths=None, all_logits=False):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls == self.fail_at:
            self.cache_epoch += 1
            local = self.inner.inner
            local.cache = local.model.new_cache(local.n_blocks)  # everything is gone
            raise WorkerError("the KV cache of slot 0 was lost when a worker was replaced")
        return self.inner.forward(tokens, start, slots, lengths, all_logits)

    def copy_slot(self, src, dst, length):
        self.inner.copy_slot(src, dst, length)


def test_a_lost_kv_cache_is_recomputed_and_the_stream_goes_on(make_scheduler):
    b = Wrapped(backend(6), fail_at=5)
    s = make_scheduler(b, max_concurrent=2, cache_size=4)
    j, c = job(PROMPTS[0], 10)
    s.submit(j)
    assert c.tokens() == reference(PROMPTS[0], 10)
    assert c.stats.computed_tokens > 4  # the prompt and what was generated so far, fed again


class Gated(Wrapped):
    """A backend whose first pass waits until the test opens the gate, recording (B, T, lengths) of every pass:
    requests submitted meanwhile are all waiting when the loop next admits."""

    def __init__(self, inner: SlotBackend):
        super().__init__(inner)
        self.entered, self.gate, self.passes = threading.Event(), threading.Event(), []

    def forward(self, tokens, start, slots, lengths=None, all_logits=False):
        self.passes.append((tokens.shape[0], tokens.shape[1], None if lengths is None else lengths.tolist()))
        self.entered.set()
        assert self.gate.wait(30)
        return super().forward(tokens, start, slots, lengths, all_logits)


def test_new_prompts_waiting_together_are_prefilled_in_one_pass(make_scheduler):
    b = Gated(backend(4 + 4))
    s = make_scheduler(b, max_concurrent=4, cache_size=4, prefill_chunk=8)
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
    from shardllama.server.scheduler import prefill_width

    assert prefill_width(wants, room) == width
