"""Log-probabilities, prompt log-probabilities and ``n`` choices of one prompt, in the engine: on the
reference model with tiny random weights in process, and once through real workers (block copies and
whole-pass logits on the wire)."""

from __future__ import annotations

import math

import pytest
import torch

from shardllama.backend import LocalBackend
from shardllama.coordinator import Coordinator
from shardllama.engine import Engine, Failed, Finished, PromptLogprobs, Request, Token
from shardllama.errors import UsageError
from shardllama.kv_cache import BLOCK_SIZE
from shardllama.sampling import SamplingParams

from .test_engine import ARGS, GREEDY, WEIGHTS, Collector, backend

PROMPT = [4, 8, 15, 16, 23, 42, 11, 3, 6, 60, 2, 9, 33, 17, 18, 19, 20, 21]  # more than one block
WARM = SamplingParams(temperature=0.9, top_k=0)


def teacher_forced(tokens: list[int]) -> torch.Tensor:
    """(T, vocab) float64 log-softmax of the reference model's logits at every position of ``tokens``."""
    b = backend(1)
    tables = torch.arange(b.n_blocks).view(1, -1)
    logits = b.forward(torch.tensor([tokens]), torch.tensor([0]), tables, None, True)[0]
    return torch.log_softmax(logits.double(), dim=-1)


def run(engine: Engine, request: Request) -> list:
    return list(engine.run(request))


def request(prompt, n, params=GREEDY, **kw) -> Request:
    return Request(prompt=list(prompt), params=params, emit=lambda e: None, max_new_tokens=n, max_len=32, **kw)


def test_token_logprobs_are_the_raw_log_softmax_whatever_the_sampling():
    r = request(PROMPT, 4, WARM, logprobs=5, generator=torch.Generator().manual_seed(1))
    events = run(Engine(backend(1)), r)
    tokens = [e for e in events if isinstance(e, Token)]
    ref = teacher_forced(PROMPT + [t.id for t in tokens])
    for i, t in enumerate(tokens):
        row = ref[len(PROMPT) - 1 + i]
        assert t.logprobs.token == t.id
        assert t.logprobs.logprob == pytest.approx(float(row[t.id]), abs=1e-5)
        top_ids = [i for i, _ in t.logprobs.top]
        assert top_ids == row.topk(5).indices.tolist()
        assert [lp for _, lp in t.logprobs.top] == pytest.approx(row.topk(5).values.tolist(), abs=1e-5)
    assert sum(math.exp(lp) for _, lp in tokens[0].logprobs.top) <= 1 + 1e-9


@pytest.mark.parametrize("chunk", [256, 5])  # the prompt in one pass, or in four chunks
def test_prompt_logprobs_equal_a_teacher_forced_forward(chunk):
    b = backend(2, extra_blocks=4)
    engine = Engine(b, cache_size=2, prefill_chunk=chunk)
    run(engine, request(PROMPT[:12], 1))  # the prompt cache now holds a prefix: it must not be used
    events = run(engine, request(PROMPT, 2, logprobs=3, prompt_logprobs=True))
    assert isinstance(events[0], PromptLogprobs)
    entries = events[0].entries
    ref = teacher_forced(PROMPT)
    assert entries[0] is None and len(entries) == len(PROMPT)
    for i, e in enumerate(entries[1:], start=1):
        assert e.token == PROMPT[i]
        assert e.logprob == pytest.approx(float(ref[i - 1, PROMPT[i]]), abs=1e-5)
        assert [t for t, _ in e.top] == ref[i - 1].topk(3).indices.tolist()
    assert events[-1].stats.cached_tokens == 0 and events[-1].stats.computed_tokens == len(PROMPT)


def test_prompt_logprobs_with_no_token_to_generate():
    events = run(Engine(backend(1)), request(PROMPT, 0, prompt_logprobs=True))
    assert [type(e) for e in events] == [PromptLogprobs, Finished]
    assert len(events[0].entries) == len(PROMPT)


def choices(engine: Engine, n: int, params=WARM, **kw) -> tuple[Request, list[Collector]]:
    collectors = [Collector() for _ in range(n)]
    group = [Request(prompt=list(PROMPT), params=params, emit=c, max_new_tokens=6, max_len=32,
                     generator=torch.Generator().manual_seed(100 + i), **kw) for i, c in enumerate(collectors)]
    group[0].followers = group[1:]
    return group[0], collectors


def alone(seed: int) -> list[int]:
    r = request(PROMPT, 6, WARM, generator=torch.Generator().manual_seed(seed))
    return [e.id for e in run(Engine(backend(1)), r) if isinstance(e, Token)]


def test_n_choices_feed_the_prompt_once_and_sample_as_if_alone():
    engine = Engine(backend(3), max_concurrent=3)
    engine.start()
    try:
        leader, collectors = choices(engine, 3)
        engine.submit(leader)
        outs = [c.tokens() for c in collectors]
        assert outs == [alone(100 + i) for i in range(3)]
        assert len({tuple(o) for o in outs}) > 1  # temperature 0.9: the seeds differ
        st = engine.stats()
        assert st["computed_tokens"] == len(PROMPT)  # fed once for the three
        assert st["requests"] == 3 and st["completed"] == 3 and st["running"] == 0
        assert engine.pool.n_held == engine.cache.n_blocks()  # every block is back or in the prompt cache
    finally:
        engine.close()


def test_more_choices_than_run_places_is_refused():
    engine = Engine(backend(2), max_concurrent=2)
    leader, _ = choices(engine, 3)
    with pytest.raises(UsageError, match="3 choices"):
        engine.submit(leader)


def test_choices_that_end_before_the_prompt_is_fed_all_hear_of_it():
    engine = Engine(backend(3), max_concurrent=3)
    leader, collectors = choices(engine, 3)
    leader.prompt = []  # refused when admitted: every choice fails
    engine.submit(leader)
    engine.step()
    assert all(isinstance(c.events[-1], Failed) for c in collectors)


def test_choices_through_workers_equal_the_reference():
    """Two workers: the followers' first blocks are shared and the partial one copied on the workers."""
    with Coordinator(ARGS, WEIGHTS, n_workers=2, max_seq_len=32, n_blocks=3 * -(-32 // BLOCK_SIZE)) as c:
        engine = Engine(c, max_concurrent=3)
        leader, collectors = choices(engine, 3, logprobs=2, prompt_logprobs=True)
        events = []
        for member, col in zip([leader, *leader.followers], collectors):
            member.emit = col
        engine.submit(leader)
        while not all(col.ended.is_set() for col in collectors):
            engine.step()
        for i, col in enumerate(collectors):
            assert [e.id for e in col.events if isinstance(e, Token)] == alone(100 + i)
            prompt_lp = col.events[0]
            assert isinstance(prompt_lp, PromptLogprobs)
            ref = teacher_forced(PROMPT)
            got = [e.logprob for e in prompt_lp.entries[1:]]
            want = [float(ref[i - 1, PROMPT[i]]) for i in range(1, len(PROMPT))]
            assert got == pytest.approx(want, abs=1e-4)
        del events
