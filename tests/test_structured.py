"""Structured output on the OpenAI routes, driven by the official ``openai`` client against a real server
(the demo model, its own chat template — which has no tool syntax — on one engine): ``response_format``
json_schema / json_object and ``tools`` / ``tool_choice``, streamed and not.  Whatever finishes with
``stop`` (or ``tool_calls``) must parse and validate against its schema, for every seed at temperature 1.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from hypothesis import given, settings, strategies as st

from shardllama.server import structured

from .test_server import JSON_VALUES, openai_client, serving

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    "student": {"type": "boolean"}},
    "required": ["name", "age", "student"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(demo_gguf):
    yield from serving(demo_gguf, workers=0, max_seq_len=512, max_concurrent=4, max_queue=4,
                       cache=2)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, 120)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_output_that_stops_validates_for_every_seed(client):
    stopped = 0
    for seed in range(20):
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=1,
            seed=seed, max_tokens=120, response_format=schema_format(PERSON))
        choice = r.choices[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert stopped >= 15  # the schema bounds every field: most answers finish


def test_json_schema_on_completions_streamed(client):
    chunks = list(client.completions.create(model="m", prompt="A person, as JSON:", temperature=1, seed=3,
                                            max_tokens=120, stream=True,
                                            extra_body={"response_format": schema_format(PERSON)}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_parseable_json(client):
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Reply in JSON."}],
                                           temperature=0.7, seed=seed, max_tokens=200,
                                           response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            assert r.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tools_give_tool_calls_whose_arguments_validate(client, tool_choice):
    named = isinstance(tool_choice, dict)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    calls = 0
    for seed in range(5):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                           temperature=1, seed=seed, max_tokens=100)
        choice = r.choices[0]
        assert choice.finish_reason in ("tool_calls", "length")
        if choice.finish_reason == "tool_calls":
            (call,) = choice.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_") and choice.message.content is None
            assert call.function.name == "get_weather" or not named
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            calls += 1
    assert calls >= 3


def test_auto_gives_a_call_or_text_and_none_gives_text(client):
    for seed in range(4):
        r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], temperature=1, seed=seed,
                                           max_tokens=60)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
        else:
            assert not c.message.tool_calls and not c.message.content.startswith("{")
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_and_a_conversation_with_tool_results(client):
    stream = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                            temperature=0, max_tokens=100, stream=True)
    chunks = list(stream)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    args = json.loads(deltas[0].function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    # The call and its result go back in the conversation; the answer is then text.
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": deltas[0].id, "type": "function", "function": {"name": "get_weather",
                                                                  "arguments": deltas[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=10)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_stream_with_response_format(client):
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "A person"}], temperature=0, max_tokens=120,
        response_format=schema_format(PERSON), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("fields, param", [
    ({"response_format": schema_format({"type": "frobnicate"})}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop"),
    ({"tools": [WEATHER], "stop": "x"}, "stop"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": 3}, "tool_choice"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{nope"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_refused_fields_are_400_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", **{"messages": ASK, "max_tokens": 4, **fields})
    assert e.value.body["param"] == param, e.value.body
    assert "\n" not in e.value.body["message"]


def test_tools_are_refused_on_completions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=4, extra_body={"tools": [WEATHER]})
    assert e.value.body["param"] == "tools"


def test_the_prompt_describes_tools_for_a_template_without_tool_syntax():
    tools = [WEATHER]
    st = structured.Structured(None, tuple(tools), "required")

    class Tok:  # a chatml template without "tools", as the demo model's
        chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}<|im_start|>assistant\n")
        bos_id = eos_id = None
        source = "test"

    text = structured.render(Tok(), {"messages": ASK}, st)
    assert text.startswith("<|im_start|>system\nYou can call these tools") and '"name": "get_weather"' in text
    assert "You must call one of them now." in text

    Tok.chat_template = "{{ tools | length }} tools: {{ messages[-1]['content'] }}"  # one that reads tools
    assert structured.render(Tok(), {"messages": ASK}, st) == "1 tools: " + ASK[0]["content"]


SCHEMAS = st.sampled_from([PERSON, {"type": "object"}, {"type": "frobnicate"}, {"enum": []}, {"$ref": "#/x"},
                           {"type": "string", "pattern": "(("}, {"type": "integer", "minimum": 5, "maximum": 1}]) | JSON_VALUES
FORMATS = (st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
    {"name": st.sampled_from(["p", "bad name", ""]) | JSON_VALUES, "schema": SCHEMAS},
    optional={"strict": JSON_VALUES})})
    | st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "xml"]) | JSON_VALUES}) | JSON_VALUES)
TOOLS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function"]) | JSON_VALUES, "function": (
    st.fixed_dictionaries({"name": st.sampled_from(["f", "get_weather", "x y"]) | JSON_VALUES},
                          optional={"parameters": SCHEMAS, "description": JSON_VALUES}) | JSON_VALUES)}),
    max_size=2) | JSON_VALUES
CHOICES = st.sampled_from(["none", "auto", "required", {"type": "function", "function": {"name": "f"}}]) | JSON_VALUES


@settings(max_examples=60, deadline=None)
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       fields=st.fixed_dictionaries({}, optional={"response_format": FORMATS, "tools": TOOLS, "tool_choice": CHOICES,
                                                  "stop": st.sampled_from(["}", ["x"], None]),
                                                  "parallel_tool_calls": JSON_VALUES, "stream": st.booleans()}))
def test_structured_fields_never_5xx(server, route, fields):
    body = {"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    # json.dumps writes NaN and Infinity as JavaScript does (requests' json= refuses them): the server must cope.
    r = requests.post(server.base + route, data=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert "\n" not in r.json()["error"]["message"], r.text


def test_logprobs_cover_every_token_of_a_json_answer(client):
    """The grammar's last token (the closing brace) ends the answer but is part of it: it has its entry."""
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "A person as JSON."}],
                                       response_format=schema_format(PERSON), temperature=0, max_tokens=200,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    content = choice.logprobs.content
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    assert len(content) == r.usage.completion_tokens
