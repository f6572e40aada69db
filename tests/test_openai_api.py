"""The OpenAI-compatible routes, driven by the official ``openai`` client against a real server in a
subprocess (the demo model, its own chat template, a small context), checked against rllama's API on the
same server: both run on one engine, so greedy text must agree token for token.
"""

from __future__ import annotations

import json
import types

import openai
import pytest
import requests
from hypothesis import given, settings, strategies as st

from shardllama.server.openai_schemas import ParamError, render_chat

from .test_server import JSON, JSON_VALUES, LONE_SURROGATES, NOT_JSON, gguf_tokenizer, openai_client, serving

PROMPT = "The meaning of life is"


@pytest.fixture(scope="module")
def server(demo_gguf):
    yield from serving(demo_gguf, workers=0, max_seq_len=96, max_concurrent=2, max_queue=2,
                       cache=2)


@pytest.fixture(scope="module")
def tokenizer(demo_gguf):
    return gguf_tokenizer(demo_gguf)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, 60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def rllama_text(server, prompt: str, n: int) -> str:
    lines = server.generate(prompt=prompt, temperature=0, max_new_tokens=n)
    return "".join(next(iter(line)) for line in lines)


def test_models_lists_the_demo_model(client, demo_gguf):
    models = client.models.list().data
    assert [m.id for m in models] == [demo_gguf.stem]


def test_completion_greedy_equals_rllama_streaming_or_not(server, client, model, tokenizer):
    expected = rllama_text(server, PROMPT, 8)
    r = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode(PROMPT))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)

    chunks = list(client.completions.create(model=model, prompt=[PROMPT], temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_token_array_prompt_and_default_max_tokens(client, model, tokenizer):
    ids = tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=model, prompt=PROMPT, temperature=0)
    by_ids = client.completions.create(model=model, prompt=ids, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.usage.completion_tokens == 16  # OpenAI's default max_tokens


def test_stop_strings_cut_the_text(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=16).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    r = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=16,
                                  stop=["never appears", stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 16
    chunks = list(client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=16,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproduces_sampling(client, model):
    def sample(seed):
        return client.completions.create(model=model, prompt=PROMPT, temperature=1.0, max_tokens=12,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_chat_uses_the_models_template_streaming_or_not(server, client, model, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = render_chat(tokenizer, messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    expected = rllama_text(server, rendered, 12)  # the end token adds no text
    r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered, special=True))
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 12 else "stop")

    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_chat_ends_the_turn_at_the_end_token(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                       temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 80
    assert "<|im_end|>" not in r.choices[0].message.content


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"suffix": "x"}, "suffix"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [PROMPT, {"text": PROMPT}]}, "prompt[1]"),
    ({"n": 3}, "n"),  # more than the server's max_concurrent (2)
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x " * 200}, "prompt"),  # longer than the context
    ({"extra_body": {"seed": "1"}}, "seed"),
])
def test_bad_completion_requests_get_openai_400s(client, model, kwargs, param):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, **kwargs)
    assert e.value.status_code == 400
    body = e.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert body["code"] == ("context_length_exceeded" if "longer than the context" in body["message"] else None)
    assert param.split("[")[0] in body["message"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
])
def test_bad_chat_requests_get_openai_400s(client, model, messages, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages)
    assert e.value.body["param"] == param


def test_error_shape_on_raw_http(server):
    r = requests.post(server.base + "/v1/completions", data=b"{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for headers in ({}, {"Content-Type": "text/plain"}):  # a body not declared JSON: OpenAI's shape too
        r = requests.post(server.base + "/v1/chat/completions", data=b'{"messages": []}', headers=headers, timeout=10)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
    r = requests.get(server.base + "/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.post(server.base + "/v1/embeddings", json={}, timeout=10)
    assert r.status_code == 404 and "/v1/chat/completions" in r.json()["error"]["message"]


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"prompt": ["a\\udfff"]}', "prompt[0]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    ("/v1/completions", b'{"prompt": "x", "seed": -1' + b"0" * 400 + b"}", "seed"),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", None),
])
def test_what_crashed_the_server_is_a_400(server, route, body, param):
    # Once 500s: a lone surrogate reached the tokenizer, a huge integer float(), a 5000-digit one json.loads.
    r = requests.post(server.base + route, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_both_apis_share_one_engine(server, client, model):
    before = server.wait_idle()["requests"]
    client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=2)
    assert server.wait_idle()["requests"] == before + 1


def test_missing_template_is_a_400_naming_the_model():
    tok = types.SimpleNamespace(chat_template=None, source="/models/tiny.gguf")
    with pytest.raises(ParamError, match="/models/tiny.gguf: the model has no chat template.*/v1/completions"):
        render_chat(tok, [{"role": "user", "content": "hi"}])


OPENAI_FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
                 "stream_options", "n", "echo", "logprobs", "model", "top_logprobs", "best_of", "suffix"]
CHOICE_FIELDS = {  # values the server mostly accepts, edges included, so that many bodies run choices
    "n": st.integers(0, 4), "best_of": st.integers(0, 4), "logprobs": st.booleans() | st.integers(-1, 21),
    "top_logprobs": st.integers(-1, 21), "echo": st.booleans(), "suffix": st.none() | st.text(max_size=3),
    "seed": st.integers(-(2**63), 2**64 - 1), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
PROMPTS = st.text(max_size=20) | st.lists(st.text(max_size=8) | st.lists(st.integers(-1, 50000), max_size=4),
                                          max_size=3)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                           "content": st.text(max_size=10) | LONE_SURROGATES | JSON_VALUES}),
                    max_size=3)
OPENAI_BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20) | JSON_VALUES, "max_tokens": st.integers(0, 3)},
                          optional={f: JSON_VALUES for f in OPENAI_FIELDS[3:]}),
    st.fixed_dictionaries({"messages": MESSAGES | JSON_VALUES, "max_tokens": st.integers(0, 3)},
                          optional={"stop": JSON_VALUES, "stream": st.booleans(), "temperature": JSON_VALUES}),
    st.dictionaries(st.sampled_from(OPENAI_FIELDS), JSON_VALUES, max_size=5),
    st.fixed_dictionaries({"prompt": PROMPTS, "max_tokens": st.integers(0, 3)}, optional=CHOICE_FIELDS),
    st.fixed_dictionaries({"messages": MESSAGES, "max_tokens": st.integers(0, 3)}, optional=CHOICE_FIELDS),
)


@settings(settings.get_profile("server"), max_examples=60)
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=OPENAI_BODIES,
       ctype=st.sampled_from(JSON * 3 + NOT_JSON))
def test_fuzzed_bodies_never_get_a_5xx(server, route, body, ctype):
    body.setdefault("max_tokens", 2)
    # json.dumps writes NaN / Infinity as Python does, and lone surrogates as "\\ud800": the server must
    # refuse them too, not crash.
    headers = {"Content-Type": ctype} if ctype else {}
    with requests.post(server.base + route, data=json.dumps(body), headers=headers, stream=True, timeout=60) as r:
        assert r.status_code < 500, r.content[:300]
        assert r.status_code == 415 if ctype not in JSON else r.status_code != 415
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    server.wait_idle()
    assert server.proc.poll() is None
