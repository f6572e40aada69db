"""Sampling properties: greedy is argmax, top-k / top-p keep the right sets, seeds reproduce."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
import numpy as np

from shardllama.errors import UsageError
from shardllama.sampling import SamplingParams, apply_repetition_penalty, choose, logits_to_probs

logit_vectors = arrays(np.float32, st.integers(2, 60), elements=st.floats(-20, 20, width=32)).map(torch.from_numpy)


@given(logits=logit_vectors, temperature=st.floats(0.05, 3))
def test_greedy_is_argmax(logits, temperature):
    argmax = int(logits.argmax())
    assert choose(logits, [], SamplingParams(temperature=0), None) == (argmax, 1.0)
    token, prob = choose(logits, [], SamplingParams(temperature=temperature, top_k=1), torch.Generator().manual_seed(0))
    assert token == argmax and prob == 1.0


@given(logits=logit_vectors, k=st.integers(2, 70), temperature=st.floats(0.1, 3))  # k = 1 is greedy
def test_top_k_is_softmax_over_the_k_most_likely(logits, k, temperature):
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature, top_k=k, top_p=1.0))
    kth = torch.topk(logits, min(k, len(logits))).values[-1]
    expected = torch.softmax(torch.where(logits >= kth, logits / temperature, -torch.inf), -1)
    torch.testing.assert_close(probs.float(), expected, atol=1e-6, rtol=1e-5)


@settings(max_examples=200)
@given(logits=logit_vectors, p=st.floats(0.01, 1.0), temperature=st.floats(0.2, 3))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p, temperature):
    params = SamplingParams(temperature=temperature, top_k=0, top_p=p)
    full = torch.softmax(logits / temperature, -1)
    kept = logits_to_probs(logits, params) > 0
    mass = float(full[kept].sum())
    assert mass >= p - 1e-5  # reaches p ...
    # ... and is the smallest such set: without its least likely member it would fall short
    least = float(full[kept].min())
    assert mass - least < p + 1e-5
    # the kept set is a top set: everything kept is at least as likely as everything dropped
    if (~kept).any():
        assert float(full[kept].min()) >= float(full[~kept].max())


def test_top_p_example():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.75))
    assert (probs > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[:2].float(), torch.tensor([0.625, 0.375]))


@given(logits=logit_vectors, seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_tokens(logits, seed):
    params = SamplingParams(temperature=1.0, top_k=0)
    draw = lambda: [choose(logits, [], params, g)[0] for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]
    assert draw() == draw()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    g = torch.Generator().manual_seed(1)
    counts = np.bincount([choose(logits, [], SamplingParams(temperature=1.0, top_k=0), g)[0] for _ in range(3000)], minlength=3)
    np.testing.assert_allclose(counts / 3000, [0.7, 0.2, 0.1], atol=0.03)


def test_repetition_penalty_always_makes_repeats_less_likely():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 1, 1], penalty=2.0, last_n=64)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied, each once


def test_repetition_penalty_window():
    logits = torch.tensor([2.0, 2.0, 2.0])
    out = apply_repetition_penalty(logits, [0, 1, 2], penalty=2.0, last_n=1)
    assert out.tolist() == [2.0, 2.0, 1.0]  # only the last token is in the window
    assert apply_repetition_penalty(logits, [0, 1, 2], 2.0, last_n=-1).tolist() == [1.0, 1.0, 1.0]
    assert apply_repetition_penalty(logits, [0, 1, 2], 2.0, last_n=0).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0), dict(temperature=float("nan"))])
def test_bad_params_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


@given(logits=logit_vectors, temperature=st.sampled_from([1e-300, 1e-45, 1e-38, 1e-4, 1e300]),
       top_p=st.sampled_from([1e-300, 1e-38, 1e-10, 0.5]), penalty=st.sampled_from([1e-300, 1e-38, 1.0, 1e300]))
def test_extreme_settings_give_a_distribution(logits, temperature, top_p, penalty):
    """Found by the server's fuzzer: tiny top_p, temperature or penalty must not produce NaN."""
    params = SamplingParams(temperature=temperature, top_k=0, top_p=top_p, repetition_penalty=penalty)
    token, prob = choose(logits, [0, 1], params, torch.Generator().manual_seed(0))
    assert 0 <= token < len(logits) and 0 < prob <= 1
    probs = logits_to_probs(logits, params)
    assert bool(torch.isfinite(probs).all()) and abs(float(probs.sum()) - 1) < 1e-5
