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
MAX_LOGPROBS = 20  # top tokens per position (OpenAI's chat limit; its completions allow 5, vLLM 20)


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
        return _integer(data, name, lo, hi)

    def boolean(name: str) -> bool:
        value = data.get(name)
        if value is not None and not isinstance(value, bool):
            raise ParamError(f'"{name}" must be true or false, got {_kind(value)}', name)
        return bool(value)

    if data.get("model") is not None and not isinstance(data["model"], str):
        raise ParamError(f'"model" must be a string, got {_kind(data["model"])}', "model")
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


@dataclasses.dataclass(frozen=True)
class Choices:
    """How many choices of each prompt, and what log-probabilities they report."""

    n: int
    logprobs: int | None  # top tokens per position (0: the chosen token only); None: no log-probabilities
    echo: bool  # completions: the prompt's text (and, with logprobs, its tokens' log-probabilities) first


def parse_choices(data: dict[str, Any], *, chat: bool) -> Choices:
    """``n``, ``best_of``, ``suffix`` and the log-probability fields: chat's ``logprobs: bool`` with
    ``top_logprobs: 0..20``, or completions' ``logprobs: 0..20`` with ``echo``."""
    n = _integer(data, "n", 1, 2**31) or 1
    best_of = _integer(data, "best_of", 1, 2**31)
    if best_of not in (None, n):
        raise ParamError(f'"best_of" must equal "n" ({n}): choices are not ranked, got {best_of}', "best_of")
    if data.get("suffix") is not None:
        raise ParamError('"suffix" is not supported: the model only continues text (no fill-in-the-middle)',
                         "suffix")
    echo = data.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ParamError(f'"echo" must be true or false, got {_kind(echo)}', "echo")
    if chat:
        if echo:
            raise ParamError('"echo" is a /v1/completions field: chat does not echo the prompt', "echo")
        wanted = data.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ParamError(f'"logprobs" must be true or false, got {_kind(wanted)}', "logprobs")
        top = _integer(data, "top_logprobs", 0, MAX_LOGPROBS)
        if top is not None and not wanted:
            raise ParamError('"top_logprobs" needs "logprobs": true', "top_logprobs")
        return Choices(n, (top or 0) if wanted else None, False)
    if data.get("top_logprobs") is not None:
        raise ParamError('"top_logprobs" is a chat field: /v1/completions takes "logprobs": N', "top_logprobs")
    logprobs = None if data.get("logprobs") is False else _integer(data, "logprobs", 0, MAX_LOGPROBS)
    return Choices(n, logprobs, bool(echo))


def _integer(data: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(f'"{name}" must be an integer, got {_kind(value)}', name)
    if not lo <= value <= hi:
        raise ParamError(f'"{name}" must be in [{lo}, {hi}], got {show(value)}', name)
    return value


def prompt_list(data: dict[str, Any], tokenizer: Tokenizer) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each text to encode or the token ids it already is: a string, a token
    array, or a non-empty list of strings and token arrays."""
    prompt = data.get("prompt")
    if prompt is None:
        raise ParamError('"prompt" is required (a string)', "prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [_one_prompt(prompt, "prompt", tokenizer)]
    if not isinstance(prompt, list) or not prompt:
        got = "an empty array" if prompt == [] else _kind(prompt)
        raise ParamError(f'"prompt" must be a string, a token array or a list of them, got {got}', "prompt")
    return [_one_prompt(p, f"prompt[{i}]", tokenizer) for i, p in enumerate(prompt)]


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in value))


def _one_prompt(prompt: Any, where: str, tokenizer: Tokenizer) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if not _is_ids(prompt):
        raise ParamError(f'"{where}" must be a string or a non-empty token array, got {_kind(prompt)}', where)
    bad = [i for i in prompt if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise ParamError(f'"{where}" holds token id {show(bad[0])}, outside the vocabulary (size '
                         f'{tokenizer.vocab_size})', where)
    return list(prompt)


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
