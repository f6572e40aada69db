"""Log-probabilities, ``echo``, ``n`` choices and lists of prompts on the OpenAI routes, driven by the official
``openai`` client against a real server in a subprocess (the demo model in f32, a small context), checked
against rllama's API on the same server and against a teacher-forced forward of the reference model."""

from __future__ import annotations

import collections
import math

import openai
import pytest
import torch

from shardllama.model import Transformer
from shardllama.server.openai_schemas import render_chat

from .helpers import seq_cache
from .test_server import openai_client, serving

PROMPT = "The meaning of life is"
CONTEXT = 96


@pytest.fixture(scope="module")
def server(demo_gguf):
    yield from serving(demo_gguf, workers=0, max_seq_len=CONTEXT, max_concurrent=3, max_queue=3,
                       cache=4)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, 120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    return demo_model[1]


@pytest.fixture(scope="module")
def teacher_forced(demo_model):
    """(T, vocab) float64 log-softmax of the reference model's logits at every position of ``ids``."""
    args, _, weights = demo_model
    reference = Transformer(args, weights, max_seq_len=CONTEXT)

    def forward(ids: list[int]) -> torch.Tensor:
        logits = reference.forward(torch.tensor([ids]), seq_cache(reference), all_logits=True)[0]
        return torch.log_softmax(logits.double(), dim=-1)

    return forward


def unique_texts(tokenizer) -> set[str]:
    """Token texts that one token only prints as (no_token_sampling adds up the others)."""
    counts = collections.Counter(tokenizer.token_text(i) for i in range(tokenizer.vocab_size))
    return {t for t, k in counts.items() if k == 1}


# ---- log-probabilities ------------------------------------------------------------------------------------


def test_chat_top_logprobs_are_rllamas_probabilities(server, client, model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4,
                                       logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(bytes(e.bytes).decode("utf-8", "backslashreplace") == e.token for e in content)
    rendered = render_chat(tokenizer, messages)
    lines = server.generate(prompt=rendered, temperature=0, max_new_tokens=len(content), no_token_sampling=True,
                            top_probs=5)
    unique = unique_texts(tokenizer)
    for entry, line in zip(content, lines, strict=True):
        chosen = [e for e in line.values() if e.get("chosen")][0]
        assert tokenizer.token_text(chosen["id"]) == entry.token  # greedy: the same token
        assert len(entry.top_logprobs) == 5 and entry.top_logprobs[0].token == entry.token
        assert math.exp(entry.logprob) == pytest.approx(line[entry.token]["p"], abs=1e-4)
        for top, mine in zip(entry.top_logprobs, chosen["top_probs"], strict=True):
            assert (top.token, math.exp(top.logprob)) == (mine["text"], pytest.approx(mine["p"], abs=1e-4))
            if top.token in unique:
                assert math.exp(top.logprob) == pytest.approx(line[top.token]["p"], abs=1e-4)


def test_rllama_top_probs_on_plain_token_lines(server, tokenizer):
    lines = server.generate(prompt=PROMPT, temperature=0, max_new_tokens=3, top_probs=3)
    for line in lines:
        [(text, entry)] = line.items()
        top = entry["top_probs"]
        assert [t["id"] for t in top][0] == entry["id"] and len(top) == 3
        assert [t["p"] for t in top] == sorted((t["p"] for t in top), reverse=True)
        assert all(t["text"] == tokenizer.token_text(t["id"]) for t in top)
    assert "top_probs" not in next(iter(server.generate(prompt=PROMPT, max_new_tokens=1)[0].values()))
    assert server.post({"prompt": PROMPT, "top_probs": 21}).status_code == 400


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_logprobs_equal_a_teacher_forced_forward(client, model, tokenizer, teacher_forced, as_ids):
    """lm-eval's log-likelihood request: echo, max_tokens 0, logprobs 1."""
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=model, prompt=ids if as_ids else PROMPT, echo=True, max_tokens=0,
                                  logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text == tokenizer.decode(ids) and c.finish_reason == "length"
    lp = c.logprobs
    ref = teacher_forced(ids)
    assert lp.tokens == [tokenizer.token_text(i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i in range(1, len(ids)):
        [(text, value)] = lp.top_logprobs[i].items()
        assert text == tokenizer.token_text(int(ref[i - 1].argmax())) and value == pytest.approx(float(ref[i - 1].max()), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_echo_with_generated_tokens(client, model, tokenizer, teacher_forced):
    ids = tokenizer.encode(PROMPT)
    r = client.completions.create(model=model, prompt=PROMPT, echo=True, max_tokens=2, logprobs=2, temperature=0)
    c = r.choices[0]
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    assert c.text == PROMPT + plain
    assert len(c.logprobs.tokens) == len(ids) + 2
    ref = teacher_forced(ids)
    assert c.logprobs.token_logprobs[len(ids)] == pytest.approx(float(ref[-1].max()), abs=1e-4)  # greedy
    assert c.logprobs.text_offset[len(ids)] == len(PROMPT)
    no_lp = client.completions.create(model=model, prompt=PROMPT, echo=True, max_tokens=0)
    assert no_lp.choices[0].text == PROMPT and no_lp.choices[0].logprobs is None


def test_logprobs_stream_as_they_do_in_one_body(client, model):
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=5,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, len(e.top_logprobs)) for e in streamed] == [(e.token, 2) for e in whole.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole.choices[0].logprobs.content],
                                                          abs=1e-4)

    kw = dict(model=model, prompt=PROMPT, temperature=0, max_tokens=3, logprobs=1, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset


# ---- n choices and lists of prompts -----------------------------------------------------------------------


def test_n_choices_with_a_seed_are_reproducible_and_differ(client, model):
    def chat(seed):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a story."}],
                                           n=3, seed=seed, temperature=1.0, max_tokens=8)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.message.content for c in r.choices], r.usage

    first, usage = chat(11)
    assert chat(11)[0] == first and len(set(first)) > 1
    one = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a story."}],
                                         seed=11, temperature=1.0, max_tokens=8)
    assert one.choices[0].message.content == first[0]  # choice 0 uses the seed itself
    assert usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once

    def complete():
        r = client.completions.create(model=model, prompt=PROMPT, n=3, best_of=3, seed=5, temperature=1.0,
                                      max_tokens=6)
        return [c.text for c in r.choices]

    texts = complete()
    assert complete() == texts and len(set(texts)) > 1


def test_n_choices_stream_with_their_indices(client, model):
    chunks = list(client.completions.create(model=model, prompt=PROMPT, n=2, seed=3, temperature=1.0, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        texts[c.choices[0].index] += c.choices[0].text
    whole = client.completions.create(model=model, prompt=PROMPT, n=2, seed=3, temperature=1.0, max_tokens=5)
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10


def test_a_list_of_prompts_gets_one_choice_each_as_if_alone(client, model, tokenizer):
    prompts = [PROMPT, "Once upon a time", tokenizer.encode("The capital of France is")]
    alone = [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=6).choices[0].text
             for p in prompts]
    r = client.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=6)
    assert [(c.index, c.text) for c in r.choices] == list(enumerate(alone))
    assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p) if isinstance(p, str) else p) for p in prompts)
    r = client.completions.create(model=model, prompt=prompts[:2], n=2, temperature=0, max_tokens=6)
    assert [(c.index, c.text) for c in r.choices] == [(0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]


def test_cached_prompt_tokens_are_reported(client, model):
    prompt = "A long prompt that the prompt cache keeps: " + "one two three four five six seven eight " * 4
    kw = dict(model=model, prompt=prompt, temperature=0, max_tokens=1, extra_body={"cache_salt": "cached-test"})
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 16
    chat = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=1, temperature=0)
    client.chat.completions.create(**chat)
    assert client.chat.completions.create(**chat).usage.prompt_tokens_details.cached_tokens > 16


@pytest.mark.parametrize("route, kwargs, param", [
    ("completions", {"n": 4}, "n"),  # more than max_concurrent (3)
    ("chat", {"n": 4}, "n"),
    ("completions", {"n": 2, "prompt": [PROMPT] * 4}, "prompt"),  # 8 choices > 3 running + 3 queued
    ("completions", {"n": 2, "best_of": 3}, "best_of"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"prompt": [PROMPT, 7.5]}, "prompt[1]"),
    ("completions", {"prompt": []}, "prompt"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"extra_body": {"echo": True}}, "echo"),
])
def test_bad_choice_fields_get_400s_naming_them(client, model, route, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        if route == "chat":
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], **kwargs)
        else:
            client.completions.create(model=model, **{"prompt": PROMPT, **kwargs})
    assert e.value.body["param"] == param and param.split("[")[0] in e.value.body["message"]
