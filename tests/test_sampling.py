"""Sampling properties: greedy is argmax, top-k / top-p / min-p keep the right sets, seeds reproduce; bias and
penalties against hand-computed values, and the order they apply in."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
import numpy as np

from shardllama.errors import UsageError
from shardllama.sampling import (SamplingParams, apply_presence_frequency_, apply_repetition_penalty_, choose,
                                 logits_to_probs)

logit_vectors = arrays(np.float32, st.integers(2, 60), elements=st.floats(-20, 20, width=32)).map(torch.from_numpy)


@given(logits=logit_vectors, temperature=st.floats(0.05, 3))
def test_greedy_is_argmax(logits, temperature):
    argmax = int(logits.argmax())
    assert choose(logits, [], 0, SamplingParams(temperature=0), None) == (argmax, 1.0)
    token, prob = choose(logits, [], 0, SamplingParams(temperature=temperature, top_k=1), torch.Generator().manual_seed(0))
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
    draw = lambda: [choose(logits, [], 0, params, g)[0] for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]
    assert draw() == draw()


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    g = torch.Generator().manual_seed(1)
    counts = np.bincount([choose(logits, [], 0, SamplingParams(temperature=1.0, top_k=0), g)[0] for _ in range(3000)], minlength=3)
    np.testing.assert_allclose(counts / 3000, [0.7, 0.2, 0.1], atol=0.03)


def test_repetition_penalty_always_makes_repeats_less_likely():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty_(logits.clone(), [0, 1, 1, 1], penalty=2.0, last_n=64)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # positive divided, negative multiplied, each once


def test_repetition_penalty_window():
    logits = torch.tensor([2.0, 2.0, 2.0])
    out = apply_repetition_penalty_(logits.clone(), [0, 1, 2], penalty=2.0, last_n=1)
    assert out.tolist() == [2.0, 2.0, 1.0]  # only the last token is in the window
    assert apply_repetition_penalty_(logits.clone(), [0, 1, 2], 2.0, last_n=-1).tolist() == [1.0, 1.0, 1.0]
    assert apply_repetition_penalty_(logits.clone(), [0, 1, 2], 2.0, last_n=0).tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(repetition_penalty=0), dict(temperature=float("nan")), dict(min_p=-0.1),
                                    dict(min_p=1.5), dict(min_p=float("nan")), dict(presence_penalty=2.5),
                                    dict(frequency_penalty=-2.5), dict(frequency_penalty=float("nan")),
                                    dict(logit_bias={0: 101}), dict(logit_bias={0: float("nan")}),
                                    dict(logit_bias={-1: 1}), dict(logit_bias={"3": 1}), dict(logit_bias=[(1, 1), (1, 2)])])
def test_bad_params_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


@given(logits=logit_vectors, temperature=st.sampled_from([1e-300, 1e-45, 1e-38, 1e-4, 1e300]),
       top_p=st.sampled_from([1e-300, 1e-38, 1e-10, 0.5]), penalty=st.sampled_from([1e-300, 1e-38, 1.0, 1e300]))
def test_extreme_settings_give_a_distribution(logits, temperature, top_p, penalty):
    """Found by the server's fuzzer: tiny top_p, temperature or penalty must not produce NaN."""
    params = SamplingParams(temperature=temperature, top_k=0, top_p=top_p, repetition_penalty=penalty)
    token, prob = choose(logits, [0, 1], 2, params, torch.Generator().manual_seed(0))
    assert 0 <= token < len(logits) and 0 < prob <= 1
    probs = logits_to_probs(logits, params)
    assert bool(torch.isfinite(probs).all()) and abs(float(probs.sum()) - 1) < 1e-5


def test_logit_bias_is_added_and_kept_sorted():
    params = SamplingParams(temperature=1.0, top_k=0, logit_bias={2: -1.5, 0: 0.5})
    assert params.logit_bias == ((0, 0.5), (2, -1.5))
    logits = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.softmax(torch.tensor([1.5, 2.0, 1.5], dtype=torch.float64), -1)
    token, prob = choose(logits, [], 0, params, torch.Generator().manual_seed(0))
    assert prob == pytest.approx(float(expected[token]), rel=1e-12)
    assert logits.tolist() == [1.0, 2.0, 3.0]  # the caller's row is not modified


def test_logit_bias_bans_and_forces_greedy():
    logits = torch.tensor([1.0, 5.0, 3.0])
    assert choose(logits, [], 0, SamplingParams(temperature=0), None) == (1, 1.0)
    assert choose(logits, [], 0, SamplingParams(temperature=0, logit_bias={1: -100}), None) == (2, 1.0)
    assert choose(logits, [], 0, SamplingParams(temperature=0, logit_bias={0: 100}), None) == (0, 1.0)
    probs = logits_to_probs(logits + torch.tensor([0.0, -100.0, 0.0]), SamplingParams(temperature=1.0, top_k=0))
    assert float(probs[1]) < 1e-40  # -100 is a ban in practice
    g = torch.Generator().manual_seed(0)
    banned = SamplingParams(temperature=1.0, top_k=0, logit_bias={1: -100})
    assert 1 not in {choose(logits, [], 0, banned, g)[0] for _ in range(200)}


def test_check_vocab_names_logit_bias():
    SamplingParams(logit_bias={31: 1}).check_vocab(32)
    with pytest.raises(UsageError, match="logit_bias names token 32, outside the vocabulary .size 32."):
        SamplingParams(logit_bias={32: 1, 0: 1}).check_vocab(32)


def test_presence_and_frequency_penalties():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = apply_presence_frequency_(logits.clone(), [0, 2, 2, 2], presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0 - 0.25 - 0.5, 1.0, 1.0 - 0.75 - 0.5, 1.0]
    out = apply_presence_frequency_(logits.clone(), [1], presence=-2.0, frequency=0.0)
    assert out.tolist() == [1.0, 3.0, 1.0, 1.0]  # a negative penalty encourages


def test_frequency_counts_only_generated_tokens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    params = SamplingParams(temperature=0, frequency_penalty=2.0)
    # token 0 fills the prompt, so it is not penalised: greedy stays on it
    assert choose(logits, [0, 0, 0, 0], 4, params, None)[0] == 0
    # generated once: 2 - 2 = 0 < 1, token 1 wins
    assert choose(logits, [0, 0, 0, 0], 3, params, None)[0] == 1
    params = SamplingParams(temperature=0, presence_penalty=2.0)
    assert choose(logits, [0, 0, 0, 0], 4, params, None)[0] == 0
    assert choose(logits, [0, 0, 0, 0], 2, params, None)[0] == 1  # presence: once, however often


def test_min_p_keeps_tokens_within_min_p_of_the_most_likely():
    p = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04], dtype=torch.float64)
    probs = logits_to_probs(p.log(), SamplingParams(temperature=1.0, top_k=0, min_p=0.2))
    assert (probs > 0).tolist() == [True, True, True, False, False]  # p >= 0.2 * 0.5 = 0.1
    torch.testing.assert_close(probs[:3], p[:3] / 0.9)
    # min_p looks at the distribution after temperature: at T = 2, p / p_max = sqrt of it at T = 1
    probs = logits_to_probs(p.log(), SamplingParams(temperature=2.0, top_k=0, min_p=0.3))
    assert (probs > 0).tolist() == [True, True, True, True, False]  # sqrt(0.06 / 0.5) = 0.35, sqrt(0.08) = 0.28
    one = logits_to_probs(p.log(), SamplingParams(temperature=1.0, top_k=0, min_p=1.0))
    assert one.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


@settings(max_examples=100)
@given(logits=logit_vectors, min_p=st.floats(0.0, 1.0), temperature=st.floats(0.1, 3))
def test_min_p_property(logits, min_p, temperature):
    full = torch.softmax(logits.double() / temperature, -1)
    kept = logits_to_probs(logits, SamplingParams(temperature=temperature, top_k=0, min_p=min_p)) > 0
    assert kept[int(logits.argmax())]
    margin = 1e-9 * float(full.max())
    assert bool((full[kept] >= min_p * full.max() - margin).all())
    assert bool((full[~kept] <= min_p * full.max() + margin).all())


def test_the_order():
    """bias -> repetition -> presence/frequency -> temperature -> min-p -> top-k -> top-p, hand-computed."""
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, -1.0])
    params = SamplingParams(temperature=2.0, top_k=3, top_p=0.6, min_p=0.3, repetition_penalty=2.0,
                            presence_penalty=0.5, frequency_penalty=0.5, logit_bias={3: 2.0, 4: 1.5})
    # bias: [4, 3, 2, 3, 0.5]; repetition over the prompt and output (tokens 0 and 4): [2, 3, 2, 3, 0.25]
    # (bias first: token 4 was positive after it, so it is divided); presence/frequency over the output
    # [4, 4] only: token 4 loses 0.5 + 2 * 0.5 -> [2, 3, 2, 3, -1.25]
    history, n_prompt = [0, 4, 4], 1
    shaped = torch.tensor([2.0, 3.0, 2.0, 3.0, -1.25], dtype=torch.float64)
    # temperature 2 -> log(p / p_max) = [-0.5, 0, -0.5, 0, -2.125]; min-p 0.3 (log -1.20) drops token 4;
    # top-k 3: the k-th logit ties tokens 0 and 2, and ties at the k-th stay: tokens 0 to 3.
    expected = torch.softmax(shaped[:4] / 2, -1)  # [a, b, a, b], b = e^0.5 a
    # top-p 0.6: sorted [b, b, a, a]; mass before the second b is b = 0.311 < 0.6, before the first a is 0.622
    b = float(expected[1])
    assert b < 0.6 < 2 * b
    g = torch.Generator().manual_seed(0)
    seen = {}
    for _ in range(300):
        token, prob = choose(logits, history, n_prompt, params, g)
        seen[token] = prob
    assert set(seen) == {1, 3} and all(p == pytest.approx(0.5, rel=1e-12) for p in seen.values())
    # greedy honours bias and penalties too: argmax of shaped is token 1 (the first of the tied 3s)
    assert choose(logits, history, n_prompt, dataclasses.replace(params, temperature=0), None) == (1, 1.0)


def test_bias_then_repetition_then_presence():
    """Each other order gives another number: repetition first -> [-1, 0] (p = 0.27); presence before
    repetition -> [0, 0] (p = 0.5)."""
    params = SamplingParams(temperature=1.0, top_k=0, logit_bias={0: 2.0}, repetition_penalty=2.0,
                            presence_penalty=1.0)
    # bias [1, 0]; repetition (token 0 is positive: halved) [0.5, 0]; presence [-0.5, 0]
    token, prob = choose(torch.tensor([-1.0, 0.0]), [0], 0, params, torch.Generator().manual_seed(0))
    expected = torch.softmax(torch.tensor([-0.5, 0.0], dtype=torch.float64), -1)
    assert prob == pytest.approx(float(expected[token]), rel=1e-12)
