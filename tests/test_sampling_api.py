"""min_p, presence/frequency penalties and logit_bias through every front end: the official ``openai`` client
and rllama's API against a real server (the demo model), and the command line in a subprocess.  Greedy
throughout, so no assertion depends on a random draw or on CPU rounding."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from hypothesis import given, settings, strategies as st

from shardllama.loading import open_checkpoint

from .test_cli import run_cli
from .test_server import JSON_VALUES, gguf_tokenizer, openai_client, serving

PROMPT = "The meaning of life is"
REPEATING = "one two one two one two one two"


@pytest.fixture(scope="module")
def server(demo_gguf):
    yield from serving(demo_gguf, workers=0, max_seq_len=96, max_concurrent=2, max_queue=2,
                       cache=2)


@pytest.fixture(scope="module")
def tokenizer(demo_gguf):
    return gguf_tokenizer(demo_gguf)


@pytest.fixture(scope="module")
def vocab_size(demo_gguf):
    with open_checkpoint(demo_gguf) as ckpt:
        return ckpt.args.vocab_size


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, 60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def banana(tokenizer):
    """A token no prompt here makes likely: " banana"'s last piece."""
    return tokenizer.encode(" banana")[-1]


def greedy(client, model, n=12, prompt=PROMPT, **kw) -> str:
    r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=n, **kw)
    return r.choices[0].text


def greedy_ids(server, n=8, prompt=PROMPT, **kw) -> list[int]:
    lines = server.generate(prompt=prompt, temperature=0, max_new_tokens=n, stop_at_end_token=False, **kw)
    return [next(iter(line.values()))["id"] for line in lines]


def test_logit_bias_plus_100_forces_a_token(client, model, tokenizer, banana):
    r = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=3,
                                  logit_bias={str(banana): 100})
    assert r.choices[0].text == tokenizer.decode([banana] * 3) and r.usage.completion_tokens == 3
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                          max_tokens=2, logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == tokenizer.decode([banana] * 2)


def test_logit_bias_minus_100_on_the_greedy_token_changes_the_output(server, client, model):
    first = greedy_ids(server, n=1)[0]
    plain = greedy(client, model, n=4)
    banned = greedy(client, model, n=4, logit_bias={str(first): -100})
    assert banned != plain
    assert greedy_ids(server, n=4, logit_bias={str(first): -100})[0] != first  # and on rllama's API


@pytest.mark.parametrize("bias, fragment", [
    ({"999999": 1}, "999999"), ({"-1": 1}, "-1"), ({"x": 1}, '"x"'), ({"5": 101}, "101"), ({"5": "1"}, "a string"),
    ([5], "an array"),
])
def test_bad_logit_bias_is_a_400_naming_it(client, model, bias, fragment):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1, logit_bias=bias)
    body = e.value.body
    assert e.value.status_code == 400 and body["param"] == "logit_bias" and "logit_bias" in body["message"]
    assert fragment in body["message"]


def test_logit_bias_id_beyond_the_vocabulary(client, model, server, vocab_size):
    with pytest.raises(openai.BadRequestError, match=f"vocabulary"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1, logit_bias={str(vocab_size): 1})
    greedy(client, model, n=1, logit_bias={str(vocab_size - 1): 1})  # the last id is fine
    r = server.post({"prompt": PROMPT, "logit_bias": {str(vocab_size): 1}})
    assert r.status_code == 400 and "logit_bias" in r.text and str(vocab_size) in r.text


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                          ("min_p", "0.1"), ("presence_penalty", True)])
def test_bad_penalties_and_min_p_are_400s_on_both_apis(client, model, server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=1, extra_body={field: value})
    assert e.value.body["param"] == field
    r = server.post({"prompt": PROMPT, field: value})
    assert r.status_code == 400 and field in r.text


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=2.0), dict(presence_penalty=2.0),
                                       dict(frequency_penalty=-2.0), dict(presence_penalty=-2.0)])
def test_penalties_change_the_output(client, model, server, penalties):
    plain = greedy(client, model, n=24, prompt=REPEATING)
    assert greedy(client, model, n=24, prompt=REPEATING, **penalties) != plain
    plain_ids = greedy_ids(server, n=24, prompt=REPEATING)
    assert greedy_ids(server, n=24, prompt=REPEATING, **penalties) != plain_ids


def test_penalties_count_only_the_output(client, model):
    """The prompt's own tokens are not penalised: a repeating prompt's first token stays the greedy one."""
    plain = client.completions.create(model=model, prompt=REPEATING, temperature=0, max_tokens=1)
    penalised = client.completions.create(model=model, prompt=REPEATING, temperature=0, max_tokens=1,
                                          presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].text == plain.choices[0].text


def test_min_p_one_is_greedy(client, model, server):
    plain = greedy(client, model, n=8)
    r = client.completions.create(model=model, prompt=PROMPT, temperature=1.0, max_tokens=8, seed=3,
                                  extra_body={"min_p": 1.0})
    assert r.choices[0].text == plain
    assert greedy_ids(server, n=8) == [next(iter(line.values()))["id"] for line in server.generate(
        prompt=PROMPT, temperature=1.0, top_k=1000, min_p=1.0, max_new_tokens=8, stop_at_end_token=False)]


def test_rllama_api_takes_the_same_fields(server, banana):
    assert greedy_ids(server, n=3, logit_bias={str(banana): 100}) == [banana] * 3
    lines = server.generate(prompt=PROMPT, temperature=0.8, seed=1, max_new_tokens=3, min_p=0.05,
                            presence_penalty=0.5, frequency_penalty=0.5, logit_bias={str(banana): -100})
    assert len(lines) == 3 and banana not in [next(iter(line.values()))["id"] for line in lines]


SAMPLER_FIELDS = ["min_p", "presence_penalty", "frequency_penalty", "logit_bias"]
BIAS = st.dictionaries(st.text(max_size=3) | st.integers(-2, 10**6).map(str), JSON_VALUES | st.floats(-200, 200),
                       max_size=3)


@settings(settings.get_profile("server"), max_examples=30)
@given(route=st.sampled_from(["/v1/completions", "/rllama/v1/inference"]),
       fields=st.dictionaries(st.sampled_from(SAMPLER_FIELDS), JSON_VALUES | BIAS | st.floats(-3, 3), max_size=4))
def test_fuzzed_sampler_fields_never_get_a_5xx(server, route, fields):
    body = {"prompt": PROMPT, "max_tokens": 2, "max_new_tokens": 2, **fields}
    r = requests.post(server.base + route, data=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code in (200, 400), r.content[:300]
    server.wait_idle()
    assert server.proc.poll() is None


def test_cli_flags(demo_gguf, tokenizer, banana, vocab_size):
    common = ["--model-path", demo_gguf, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "3",
              "--dtype", "f32", "--no-echo", "-q"]
    r = run_cli(*common, "--logit-bias", f"{banana}=100", "--min-p", "0.1", "--presence-penalty", "0.5",
                "--frequency-penalty", "0.5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(tokenizer.decode([banana] * 3))
    for flag, value, fragment in [("--logit-bias", "5", "ID=BIAS"), ("--logit-bias", "5=101", "ID=BIAS"),
                                  ("--logit-bias", f"{vocab_size}=1", "vocabulary"), ("--min-p", "2", "[0, 1]"),
                                  ("--presence-penalty", "3", "[-2, 2]"), ("--frequency-penalty", "x", "number")]:
        r = run_cli(*common, flag, value, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and flag in lines[0] and fragment in lines[0], r.stderr
