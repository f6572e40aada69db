"""The OpenAI-compatible routes, beside rllama's API and on the same engine (same batch, concurrency
limit, queue and prompt cache):

    GET  /v1/models             the one model, its id from the model file's name
    GET  /v1/models/{id}        that model (404, code model_not_found, for any other id)
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
    min_p               number in [0, 1] (vLLM's and llama.cpp's), default 0 = off
    presence_penalty    number in [-2, 2], default 0: minus this from each generated token's logit
    frequency_penalty   number in [-2, 2], default 0: minus this times the token's count in the output
    logit_bias          {"token id": number in [-100, 100]}: added to the logits (-100 bans, +100 forces);
                        the order of all these is ``sampling``'s
    stop                string or list of up to 4: generation ends before the first of them
    seed                integer: reproducible sampling
    stream              bool: server-sent events, ``data: {chunk}`` ... ``data: [DONE]``
    stream_options      {"include_usage": bool}: a last chunk with the usage
    response_format     {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
                        "strict"}}: the output is JSON under that schema (``structured``)
    tools, tool_choice  function tools (chat): answers with ``tool_calls`` (``structured``)
    cache_salt          string (vLLM's name): shares cached prompt prefixes only with requests of the same
                        salt (``prompt_cache``)
    n, best_of          1 only;  echo  false only;  logprobs, suffix  not supported

Chat renders ``messages`` with the tokenizer's ``chat_template`` (GGUF ``tokenizer.chat_template`` or
tokenizer_config.json) and encodes the result with special tokens parsed; the model's stop ids end the
turn.  Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status of
:data:`.common.ERROR_STATUS`, the type of :data:`ERROR_TYPES` and the exception's ``code`` (e.g.
``context_length_exceeded``, ``model_not_found``, ``server_is_overloaded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable

import torch
from aiohttp import web

from ..stops import StopScanner
from .access import enable_cors, guard_middleware
from ..engine import Failed, Finished, Request, Token
from .common import (STATE, ModelNotFound, ServerState, _message, error_middleware, read_json, ready_middleware,
                     status_for)
from .openai_schemas import ContextLengthExceeded, ParamError, Generation, chat_messages, parse_generation, prompt_ids, render_chat
from . import structured

log = logging.getLogger(__name__)

ROUTES = "GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions"


def create_openai_app(state: ServerState) -> web.Application:
    """The /v1 routes as a sub-application (mounted by ``create_app``), with its own error middleware so
    that every /v1 error, 404 and 405 included, has OpenAI's shape."""
    app = web.Application(middlewares=[_errors, guard_middleware(state.access), ready_middleware()])
    app[STATE] = state
    app.router.add_get("/models", models)
    app.router.add_get("/models/{id:.+}", model)
    app.router.add_post("/completions", completions)
    app.router.add_post("/chat/completions", chat_completions)
    enable_cors(app, state.access)
    return app


# ---- generation -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _generate(state: ServerState, ids: list[int], gen: Generation, outcome: Outcome,
                    constraint: object | None = None) -> AsyncIterator[str]:
    """Runs a request on the engine; yields the text each token adds ("" too, so the caller knows the
    generation has started), and fills ``outcome``.  Errors before the first token propagate."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    job = Request(prompt=ids, params=gen.params, emit=functools.partial(loop.call_soon_threadsafe, queue.put_nowait),
              max_new_tokens=state.max_seq_len if gen.max_tokens is None else gen.max_tokens,
              max_len=state.max_seq_len, stop_ids=state.tokenizer.stop_ids,
              generator=torch.Generator().manual_seed(gen.seed if gen.seed is not None else secrets.randbits(63)),
              cache_salt=gen.cache_salt, constraint=constraint)  # structured output: structured.py
    state.engine.submit(job)
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
        state.engine.cancel(job)  # a no-op once it finished; stops it after a stop string or a disconnect


async def _respond(request: web.Request, state: ServerState, ids: list[int], gen: Generation,
                   whole: Callable[[str, Outcome], dict], chunk: Callable[[str | None, Outcome | None], dict],
                   first_chunk: dict | None = None, st: structured.Structured | None = None) -> web.StreamResponse:
    """Runs the generation and answers with one JSON body (``whole``) or with SSE chunks (``chunk(text,
    None)`` per piece of text, ``chunk(None, outcome)`` for the finish)."""
    outcome = Outcome(prompt_tokens=len(ids))
    response: web.StreamResponse | None = None
    try:
        async with contextlib.aclosing(_generate(state, ids, gen, outcome, st and st.constraint())) as pieces:
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
        raise ContextLengthExceeded(f'"{param}" is {len(prompt)} tokens, longer than the context ({state.max_seq_len})', param)
    return prompt


async def _structured(state: ServerState, data: dict, gen: Generation, *, chat: bool) -> structured.Structured | None:
    """response_format / tools compiled to a grammar, in a thread (the first one per tokenizer takes ~0.4 s)."""
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(structured.parse, data, state.tokenizer, gen.stop, chat=chat))


# ---- handlers -------------------------------------------------------------------------------------------


def _model_object(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "shardllama"}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request.app[STATE])]})


async def model(request: web.Request) -> web.Response:
    state, wanted = request.app[STATE], request.match_info["id"]
    if wanted != state.model_name:
        shown = wanted if len(wanted) <= 80 else wanted[:77] + "..."
        raise ModelNotFound(f"the model {shown!r} does not exist: this server serves {state.model_name!r}")
    return web.json_response(_model_object(state))


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    data = await read_json(request, required="prompt")
    gen = parse_generation(data, default_max_tokens=16, vocab_size=state.vocab_size)
    st = await _structured(state, data, gen, chat=False)  # response_format: structured.py
    if data.get("echo") not in (None, False):
        raise ParamError('"echo" must be false: echoing the prompt is not supported', "echo")
    ids = await _encode(state, prompt_ids(data, state.tokenizer), bos=None, param="prompt")
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    def choice(text: str, outcome: Outcome | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": outcome and outcome.finish_reason}

    return await _respond(
        request, state, ids, gen,
        whole=lambda text, o: {**head, "choices": [choice(text, o)], "usage": o.usage()},
        chunk=lambda text, o: {**head, "choices": [choice(text or "", o)]}, st=st)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    data = await read_json(request, required="messages")
    gen = parse_generation(data, default_max_tokens=None, vocab_size=state.vocab_size)
    st = await _structured(state, data, gen, chat=True)  # response_format, tools: structured.py
    text = structured.render(state.tokenizer, data, st)
    bos_text = state.tokenizer.token_text(state.tokenizer.bos_id) if state.tokenizer.bos_id is not None else ""
    # The template writes BOS itself when the model wants one; add it only where it did not (as llama.cpp).
    bos = state.tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
    ids = await _encode(state, text, bos=bos, param="messages")
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": state.model_name}

    def delta(fields: dict, finish_reason: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": fields, "logprobs": None, "finish_reason": finish_reason}]}

    def whole(text: str, o: Outcome) -> dict:
        message, finish_reason = structured.message(st, text, o.finish_reason)  # text or tool_calls
        return {**head, "object": "chat.completion", "usage": o.usage(), "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}]}

    deltas = structured.Deltas(st)  # text, or a tool call held to the end
    return await _respond(request, state, ids, gen, whole=whole,
                          chunk=lambda text, o: delta(*deltas(text, o and o.finish_reason)),
                          first_chunk=delta({"role": "assistant", "content": ""}, None), st=st)


# ---- errors ---------------------------------------------------------------------------------------------


# OpenAI's error ``type`` by status; ``code`` is the exception class's own (``code`` attributes), else null.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               503: "service_unavailable_error"}


def _body(status: int, message: str, error: BaseException | None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": getattr(error, "param", None),
                      "code": getattr(error, "code", None)}}


def _error_body(error: BaseException) -> dict:
    """OpenAI's error shape for ``error`` (also sent as the last event of a stream that failed)."""
    return _body(status_for(error), _message(error), error)


def _error(status: int, message: str, error: BaseException | None, headers: dict[str, str] | None) -> web.Response:
    return web.json_response(_body(status, message, error), status=status, headers=headers)


_errors = error_middleware(_error, lambda state: f"the OpenAI API has {ROUTES}")
