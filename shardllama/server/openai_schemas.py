"""The OpenAI-compatible routes' requests: their fields, defaults and validation, and nothing about HTTP
(the fields are listed in :mod:`.openai_api`).  Every mistake raises :class:`ParamError` with a one-line
message and ``param`` naming the field, as OpenAI's error body does."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..chat_template import render_for
from ..errors import ShardllamaError
from ..sampling import MAX_PENALTY, SamplingParams
from ..tokenizer import Tokenizer
from .schemas import RequestError, _kind, cache_salt, finite, logit_bias, show

MAX_STOP_STRINGS = 4


class ParamError(RequestError):
    """A bad request field; ``param`` names it in the error body."""


class ContextLengthExceeded(ParamError):
    """The prompt does not fit in the model's context."""

    code = "context_length_exceeded"


@dataclasses.dataclass(frozen=True)
class Generation:
    """What both routes share, validated."""

    params: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    cache_salt: str | None


def parse_generation(data: dict[str, Any], *, default_max_tokens: int | None, vocab_size: int) -> Generation:
    """``vocab_size``: the model's logits, which ``logit_bias`` ids must lie within."""
    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f'"{name}" must be a number, got {_kind(value)}', name)
        if not finite(value):
            raise ParamError(f'"{name}" must be a finite number, got {show(value)}', name)
        if not (lo < value if lo_open else lo <= value) or value > hi:
            raise ParamError(f'"{name}" must be in {"(" if lo_open else "["}{lo:g}, {hi:g}], got {value}', name)
        return float(value)

    def integer(name: str, lo: int, hi: int = 2**64 - 1) -> int | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f'"{name}" must be an integer, got {_kind(value)}', name)
        if not lo <= value <= hi:
            raise ParamError(f'"{name}" must be in [{lo}, {hi}], got {show(value)}', name)
        return value

    def boolean(name: str) -> bool:
        value = data.get(name)
        if value is not None and not isinstance(value, bool):
            raise ParamError(f'"{name}" must be true or false, got {_kind(value)}', name)
        return bool(value)

    if data.get("model") is not None and not isinstance(data["model"], str):
        raise ParamError(f'"model" must be a string, got {_kind(data["model"])}', "model")
    for name in ("n", "best_of"):
        if integer(name, 1) not in (None, 1):
            raise ParamError(f'"{name}" must be 1: one choice per request is supported', name)
    for name in ("logprobs", "top_logprobs", "suffix"):
        if data.get(name) not in (None, False, 0, {}, ""):
            raise ParamError(f'"{name}" is not supported by this server', name)
    params = SamplingParams(temperature=number("temperature", 1.0, 0, 2), top_k=integer("top_k", 0, 2**31) or 0,
                            top_p=number("top_p", 1.0, 0, 1, lo_open=True), min_p=number("min_p", 0.0, 0, 1),
                            presence_penalty=number("presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
                            frequency_penalty=number("frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
                            logit_bias=logit_bias(data, vocab_size))
    max_tokens = integer("max_tokens", 0, 2**31)
    if max_tokens is None:
        max_tokens = integer("max_completion_tokens", 0, 2**31)
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ParamError(f'"stop" must be a string or a list of strings, got {_kind(stop)}', "stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise ParamError(f'"stop" has {len(stop)} strings, at most {MAX_STOP_STRINGS} are allowed', "stop")
    stream = boolean("stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ParamError(f'"stream_options" must be an object, got {_kind(options)}', "stream_options")
    return Generation(params=params, max_tokens=default_max_tokens if max_tokens is None else max_tokens,
                      stop=tuple(s for s in stop if s), seed=integer("seed", -(2**63)), stream=stream,
                      include_usage=stream and bool((options or {}).get("include_usage")),
                      cache_salt=cache_salt(data))


def prompt_ids(data: dict[str, Any], tokenizer: Tokenizer) -> list[int] | str:
    """``prompt`` as text to encode, or as the token ids it already is."""
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        bad = [i for i in prompt if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ParamError(f'"prompt" holds token id {bad[0]}, outside the vocabulary (size '
                             f'{tokenizer.vocab_size})', "prompt")
        return list(prompt)
    if prompt is None:
        raise ParamError('"prompt" is required (a string)', "prompt")
    raise ParamError(f'"prompt" must be a string, a list of one string or a token array, got {_kind(prompt)}'
                     + (f" of {len(prompt)}" if isinstance(prompt, list) and len(prompt) > 1 else ""), "prompt")


def chat_messages(data: dict[str, Any]) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ParamError(f'"messages" must be a non-empty list of messages, got {_kind(messages)}', "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ParamError(f'"{where}" must be an object, got {_kind(m)}', where)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ParamError(f'"{where}.role" must be a string, got {_kind(role)}', f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ParamError(f'"{where}.content" parts must be {{"type": "text", "text": ...}}: '
                                 "only text is supported", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ParamError(f'"{where}.content" must be a string, got {_kind(content)}', f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> str:
    """``messages`` through the model's chat template, ending with the assistant's turn opened."""
    try:
        return render_for(tokenizer, messages)
    except ShardllamaError as e:  # no template, or the template refused these messages: the request's fault
        hint = ": use /v1/completions" if not tokenizer.chat_template else ""
        raise ParamError(f"{e}{hint}", "messages") from None
