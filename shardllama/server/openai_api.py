"""The OpenAI-compatible routes, beside rllama's API and on the same scheduler (same batch, concurrency
limit, queue and prompt cache):

    GET  /v1/models             the one model, its id from the model file's name
    POST /v1/completions        prompt -> text
    POST /v1/chat/completions   messages -> the model's chat template -> text

Request fields (others are ignored, as servers beside OpenAI's do; ``null`` means the default)::

    prompt              string, a list of one string, a token array or a list of one token array
    messages            [{"role": str, "content": str or [{"type": "text", "text": str}, ...]}, ...]
    max_tokens          integer >= 0; default 16 for completions (as OpenAI), the context for chat
                        (``max_completion_tokens`` is its newer name)
    temperature         number in [0, 2], default 1.0 (0 = greedy)
    top_p               number in (0, 1], default 1.0
    top_k               integer >= 0 (ours, as llama.cpp's), default 0 = off
    stop                string or list of up to 4: generation ends before the first of them
    seed                integer: reproducible sampling
    stream              bool: server-sent events, ``data: {chunk}`` ... ``data: [DONE]``
    stream_options      {"include_usage": bool}: a last chunk with the usage
    n, best_of          1 only;  echo  false only;  logprobs, logit_bias, suffix  not supported

Chat renders ``messages`` with the tokenizer's ``chat_template`` (GGUF ``tokenizer.chat_template`` or
tokenizer_config.json) and encodes the result with special tokens parsed; the model's stop ids end the
turn.  Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status of
:data:`.app.ERROR_STATUS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import secrets
import time
from typing import Any, AsyncIterator, Callable

import torch
from aiohttp import web

from ..chat_template import render_for
from ..errors import ShardllamaError
from ..sampling import SamplingParams
from ..stops import StopScanner
from ..tokenizer import Tokenizer
from .app import STATE, ServerState, _message, error_middleware, status_for
from .jobs import Failed, Finished, Job, Token
from .schemas import RequestError, _kind, check_content_type, parse_json_object

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
ROUTES = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


class ParamError(RequestError):
    """A bad request field; ``param`` names it in the error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def create_openai_app(state: ServerState) -> web.Application:
    """The /v1 routes as a sub-application (mounted by ``create_app``), with its own error middleware so
    that every /v1 error, 404 and 405 included, has OpenAI's shape."""
    app = web.Application(middlewares=[_errors])
    app[STATE] = state
    app.router.add_get("/models", models)
    app.router.add_post("/completions", completions)
    app.router.add_post("/chat/completions", chat_completions)
    return app


# ---- requests -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """What both routes share, validated."""

    params: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _parse_common(data: dict[str, Any], *, default_max_tokens: int | None) -> Generation:
    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamError(f'"{name}" must be a finite number, got {_kind(value)}', name)
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
            raise ParamError(f'"{name}" must be in [{lo}, {hi}], got {value}', name)
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
    for name in ("logprobs", "top_logprobs", "logit_bias", "suffix"):
        if data.get(name) not in (None, False, 0, {}, ""):
            raise ParamError(f'"{name}" is not supported by this server', name)
    params = SamplingParams(temperature=number("temperature", 1.0, 0, 2), top_k=integer("top_k", 0, 2**31) or 0,
                            top_p=number("top_p", 1.0, 0, 1, lo_open=True))
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
                      include_usage=stream and bool((options or {}).get("include_usage")))


def _prompt_ids(data: dict[str, Any], tokenizer: Tokenizer) -> list[int] | str:
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


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
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


# ---- generation -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _generate(state: ServerState, ids: list[int], gen: Generation, outcome: Outcome) -> AsyncIterator[str]:
    """Runs a job on the scheduler; yields the text each token adds ("" too, so the caller knows the
    generation has started), and fills ``outcome``.  Errors before the first token propagate."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(prompt=ids, params=gen.params, emit=functools.partial(loop.call_soon_threadsafe, queue.put_nowait),
              max_new_tokens=state.max_seq_len if gen.max_tokens is None else gen.max_tokens,
              max_len=state.max_seq_len, stop_ids=state.tokenizer.stop_ids,
              generator=torch.Generator().manual_seed(gen.seed if gen.seed is not None else secrets.randbits(63)))
    state.scheduler.submit(job)
    decoder, stops = state.tokenizer.stream(), StopScanner(gen.stop)
    try:
        while True:
            event = await queue.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return
            assert isinstance(event, Token), event
            outcome.completion_tokens += 1
            text = stops.push(decoder.push(event.id) + (decoder.flush() if event.last else ""))
            if stops.stop_at is not None:
                outcome.finish_reason = "stop"
                yield text
                return
            if event.last:
                outcome.finish_reason = "stop" if event.is_end else "length"
                yield text + stops.finish()
                return
            yield text
    finally:
        state.scheduler.cancel(job)  # a no-op once it finished; stops it after a stop string or a disconnect


async def _respond(request: web.Request, state: ServerState, ids: list[int], gen: Generation,
                   whole: Callable[[str, Outcome], dict], chunk: Callable[[str | None, Outcome | None], dict],
                   first_chunk: dict | None = None) -> web.StreamResponse:
    """Runs the generation and answers with one JSON body (``whole``) or with SSE chunks (``chunk(text,
    None)`` per piece of text, ``chunk(None, outcome)`` for the finish)."""
    outcome = Outcome(prompt_tokens=len(ids))
    response: web.StreamResponse | None = None
    try:
        async with contextlib.aclosing(_generate(state, ids, gen, outcome)) as pieces:
            if not gen.stream:
                text = "".join([piece async for piece in pieces])
                return web.json_response(whole(text, outcome), dumps=_dumps)
            try:
                async for piece in pieces:
                    if response is None:
                        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                               "Cache-Control": "no-cache"})
                        await response.prepare(request)
                        if first_chunk is not None:
                            await response.write(_event(first_chunk))
                    if piece:
                        await response.write(_event(chunk(piece, None)))
            except ConnectionResetError:
                raise
            except Exception as e:
                if response is None:
                    raise
                log.warning("generation failed mid-stream: %s", e)
                await response.write(_event(_error_body(e)))
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            if response is None:  # max_tokens 0: no token, no chunk yet
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
                await response.prepare(request)
                if first_chunk is not None:
                    await response.write(_event(first_chunk))
            await response.write(_event(chunk(None, outcome)))
            if gen.include_usage:
                await response.write(_event({**chunk(None, outcome), "choices": [], "usage": outcome.usage()}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
    except ConnectionResetError:  # the client went away; _generate's exit cancelled the job
        if response is None:
            raise
        log.info("client %s went away mid-stream", request.remote)
        return response
    finally:
        state.request_done()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _event(obj: Any) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()


async def _encode(state: ServerState, prompt: str | list[int], *, bos: bool | None, param: str) -> list[int]:
    if isinstance(prompt, str):
        prompt = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(state.tokenizer.encode, prompt, bos))
    if not prompt:
        raise ParamError(f'"{param}" is empty and the model adds no BOS token: nothing to continue from', param)
    if len(prompt) > state.max_seq_len:
        raise ParamError(f'"{param}" is {len(prompt)} tokens, longer than the context ({state.max_seq_len})', param)
    return prompt


# ---- handlers -------------------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": 0, "owned_by": "shardllama"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_content_type(request.content_type)
    data = parse_json_object(await request.read(), required="prompt")
    gen = _parse_common(data, default_max_tokens=16)
    if data.get("echo") not in (None, False):
        raise ParamError('"echo" must be false: echoing the prompt is not supported', "echo")
    ids = await _encode(state, _prompt_ids(data, state.tokenizer), bos=None, param="prompt")
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    def choice(text: str, outcome: Outcome | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": outcome and outcome.finish_reason}

    return await _respond(
        request, state, ids, gen,
        whole=lambda text, o: {**head, "choices": [choice(text, o)], "usage": o.usage()},
        chunk=lambda text, o: {**head, "choices": [choice(text or "", o)]})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    check_content_type(request.content_type)
    data = parse_json_object(await request.read(), required="messages")
    gen = _parse_common(data, default_max_tokens=None)
    text = render_chat(state.tokenizer, _messages(data))
    bos_text = state.tokenizer.token_text(state.tokenizer.bos_id) if state.tokenizer.bos_id is not None else ""
    # The template writes BOS itself when the model wants one; add it only where it did not (as llama.cpp).
    bos = state.tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
    ids = await _encode(state, text, bos=bos, param="messages")
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": state.model_name}

    def delta(fields: dict, outcome: Outcome | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": fields, "logprobs": None,
                                     "finish_reason": outcome and outcome.finish_reason}]}

    def whole(text: str, o: Outcome) -> dict:
        return {**head, "object": "chat.completion", "usage": o.usage(), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": o.finish_reason}]}

    return await _respond(request, state, ids, gen, whole=whole,
                          chunk=lambda text, o: delta({} if text is None else {"content": text}, o),
                          first_chunk=delta({"role": "assistant", "content": ""}, None))


# ---- errors ---------------------------------------------------------------------------------------------


def _body(status: int, message: str, param: str | None) -> dict:
    kind = "invalid_request_error" if status < 500 else ("server_busy" if status == 503 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error_body(error: BaseException) -> dict:
    """OpenAI's error shape for ``error`` (also sent as the last event of a stream that failed)."""
    return _body(status_for(error), _message(error), getattr(error, "param", None))


def _error(status: int, message: str, error: BaseException | None, headers: dict[str, str] | None) -> web.Response:
    return web.json_response(_body(status, message, getattr(error, "param", None)), status=status, headers=headers)


_errors = error_middleware(_error, lambda state: f"the OpenAI API has {ROUTES}")
