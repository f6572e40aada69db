"""The OpenAI-compatible routes, beside rllama's API and on the same engine (same batch, concurrency
limit, queue and prompt cache):

    GET  /v1/models             the one model, its id from the model file's name
    GET  /v1/models/{id}        that model (404, code model_not_found, for any other id)
    POST /v1/completions        prompt -> text
    POST /v1/chat/completions   messages -> the model's chat template -> text

Request fields (``null`` means the default)::

    prompt              string, token array, or a list of strings and token arrays (each prompt gets ``n``
                        choices, choice index = prompt index * n + j; all are submitted together, so they batch)
    messages            [{"role": str, "content": str or [{"type": "text", "text": str}, ...]}, ...]
    max_tokens          integer >= 0; default 16 for completions (as OpenAI), the context for chat
                        (``max_completion_tokens`` is its newer name); 0 with ``echo``: only the prompt
    temperature         number in [0, 2], default 1.0 (0 = greedy)
    top_p               number in (0, 1], default 1.0
    top_k               integer >= 0 (ours, as llama.cpp's), default 0 = off
    min_p               number in [0, 1] (vLLM's and llama.cpp's), default 0 = off
    presence_penalty    number in [-2, 2], default 0: minus this from each generated token's logit
    frequency_penalty   number in [-2, 2], default 0: minus this times the token's count in the output
    logit_bias          {"token id": number in [-100, 100]}: added to the logits (-100 bans, +100 forces);
                        the order of all these is ``sampling``'s
    stop                string or list of up to 4: generation ends before the first of them
    seed                integer: reproducible sampling; choice i > 0 uses a seed derived from it and i
    n                   integer >= 1, default 1: choices per prompt, sharing the prompt's KV blocks (fed once);
                        at most the server's max_concurrent
    best_of             equal to ``n`` or absent (choices are not ranked)
    logprobs            chat: bool; completions: integer 0..20 (top tokens per position; OpenAI allows 5)
    top_logprobs        chat: integer 0..20, with ``logprobs: true``
    echo                completions: bool, the prompt's text first (with ``logprobs``: its tokens' too)
    stream              bool: server-sent events, ``data: {chunk}`` ... ``data: [DONE]``
    stream_options      {"include_usage": bool}: a last chunk with the usage
    response_format     {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
                        "strict"}}: the output is JSON under that schema (``structured``)
    tools, tool_choice  function tools (chat): answers with ``tool_calls`` (``structured``)
    cache_salt          string (vLLM's name): shares cached prompt prefixes only with requests of the same
                        salt (``prompt_cache``)

Log-probabilities are the raw log-softmax of the model's logits, before temperature, penalties and filters
(vLLM's default); their shapes are :mod:`.openai_logprobs`'.  ``usage`` counts each prompt's tokens once and
every choice's generated tokens; ``usage.prompt_tokens_details.cached_tokens`` is what the prompt cache
supplied.  ``suffix`` and the legacy ``functions`` / ``function_call`` are refused (400 naming them).  Fields that have no meaning for
this server are accepted and ignored: ``user``, ``metadata``, ``store``, ``service_tier``,
``parallel_tool_calls``, ``modalities``, ``prediction``, ``reasoning_effort``, ``audio``, ``web_search_options``;
``model`` must be a string and is not checked against the model's id (there is one model).

Chat renders ``messages`` with the tokenizer's ``chat_template`` (GGUF ``tokenizer.chat_template`` or
tokenizer_config.json) and encodes the result with special tokens parsed; the model's stop ids end the
turn.  Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the status of
:data:`.common.ERROR_STATUS`, the type of :data:`ERROR_TYPES` and the exception's ``code`` (e.g.
``context_length_exceeded``, ``model_not_found``, ``server_is_overloaded``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator, Callable

from aiohttp import web

from .access import enable_cors, guard_middleware
from . import structured
from .common import (STATE, ModelNotFound, ServerState, _message, error_middleware, read_json, ready_middleware,
                     status_for)
from .openai_choices import Choice, Piece, Run, collect
from .openai_logprobs import chat_content, completion_logprobs, echo_of, prompt_items
from .openai_schemas import (ContextLengthExceeded, ParamError, Generation, parse_choices, parse_generation,
                             prompt_list)

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


# ---- responses -----------------------------------------------------------------------------------------


async def _respond(request: web.Request, state: ServerState, run: Run, gen: Generation, head: dict,
                   whole: Callable[[list[Choice], dict], dict], chunk: Callable[[Piece], dict | None],
                   opening: list[dict] = ()) -> web.StreamResponse:
    """Runs the choices and answers with one JSON body (``whole(choices, usage)``) or with server-sent events:
    the ``opening`` chunks, then ``chunk(piece)`` for each piece (None: nothing to send), then the usage
    chunk (``head`` with no choices) if asked for.  The response starts with the first engine event, so a request that fails before it
    gets an error status."""
    response: web.StreamResponse | None = None

    async def start() -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                        "Cache-Control": "no-cache"})
        await r.prepare(request)
        for first in opening:
            await r.write(_event(first))
        return r

    try:
        run.submit()
        async with contextlib.aclosing(run.pieces()) as pieces:
            if not gen.stream:
                await collect(pieces)
                return web.json_response(whole(run.choices, run.usage()), dumps=_dumps)
            try:
                async for piece in pieces:
                    if response is None:
                        response = await start()
                    if (body := chunk(piece)) is not None:
                        await response.write(_event(body))
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
            if response is None:  # nothing came (cannot happen: every choice ends with a piece)
                response = await start()
            if gen.include_usage:
                await response.write(_event({**head, "choices": [], "usage": run.usage()}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
    except ConnectionResetError:  # the client went away; leaving pieces() cancelled the choices
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
    choices = parse_choices(data, chat=False)
    st = await _structured(state, data, gen, chat=False)  # response_format: structured.py
    texts = prompt_list(data, state.tokenizer)
    prompts = [await _encode(state, p, bos=None, param="prompt" if len(texts) == 1 else f"prompt[{i}]")
               for i, p in enumerate(texts)]
    run = Run(state, prompts, gen, choices, st)
    tok = state.tokenizer
    echoes = [echo_of(tok, ids, t if isinstance(t, str) else None) if choices.echo else ("", [])
              for ids, t in zip(prompts, texts)]
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}

    def logprobs(c: Choice, items: list, prompt_entries: tuple | None) -> dict | None:
        if choices.logprobs is None:
            return None
        echo, offsets = echoes[c.prompt]
        shown = prompt_items(prompts[c.prompt], prompt_entries, offsets) if prompt_entries is not None else []
        return completion_logprobs(tok, shown + [(i, lp, len(echo) + o) for i, lp, o in items])

    def whole(cs: list[Choice], usage: dict) -> dict:
        return {**head, "usage": usage, "choices": [
            {"text": echoes[c.prompt][0] + c.text, "index": c.index,
             "logprobs": logprobs(c, c.items, c.prompt_entries), "finish_reason": c.finish_reason} for c in cs]}

    def chunk(piece: Piece) -> dict | None:
        c = piece.choice
        text = (echoes[c.prompt][0] if piece.prompt_entries is not None else "") + piece.text
        if not (text or piece.items or piece.prompt_entries is not None or piece.finish_reason):
            return None
        shown = piece.items or piece.prompt_entries is not None
        return {**head, "choices": [{"text": text, "index": c.index, "finish_reason": piece.finish_reason,
                                     "logprobs": logprobs(c, piece.items, piece.prompt_entries) if shown else None}]}

    # With echo but no log-probabilities the engine sends no prompt event: the prompt opens the stream.
    opening = ([{**head, "choices": [{"text": echoes[c.prompt][0], "index": c.index, "logprobs": None,
                                      "finish_reason": None}]} for c in run.choices]
               if choices.echo and choices.logprobs is None else [])
    return await _respond(request, state, run, gen, head, whole, chunk, opening)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    data = await read_json(request, required="messages")
    gen = parse_generation(data, default_max_tokens=None, vocab_size=state.vocab_size)
    choices = parse_choices(data, chat=True)
    st = await _structured(state, data, gen, chat=True)  # response_format, tools: structured.py
    text = structured.render(state.tokenizer, data, st)
    bos_text = state.tokenizer.token_text(state.tokenizer.bos_id) if state.tokenizer.bos_id is not None else ""
    # The template writes BOS itself when the model wants one; add it only where it did not (as llama.cpp).
    bos = state.tokenizer.add_bos and not (bos_text and text.startswith(bos_text))
    ids = await _encode(state, text, bos=bos, param="messages")
    run = Run(state, [ids], gen, choices, st)
    deltas = [structured.Deltas(st) for _ in run.choices]  # per choice: text, or a tool call held to the end
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": state.model_name}

    def logprobs(items: list) -> dict | None:
        return None if choices.logprobs is None else {"content": chat_content(state.tokenizer, items)}

    def delta(index: int, fields: dict, items: list | None, finish_reason: str | None) -> dict:
        return {**head, "choices": [{"index": index, "delta": fields, "finish_reason": finish_reason,
                                     "logprobs": None if items is None else logprobs(items)}]}

    def whole(cs: list[Choice], usage: dict) -> dict:
        answers = [structured.message(st, c.text, c.finish_reason) for c in cs]  # text or tool_calls
        return {**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": c.index, "message": message, "logprobs": logprobs(c.items), "finish_reason": finish_reason}
            for c, (message, finish_reason) in zip(cs, answers)]}

    def chunk(piece: Piece) -> dict | None:
        fields, _ = deltas[piece.choice.index](piece.text, None)
        finish_reason = None
        if piece.finish_reason:
            last, finish_reason = deltas[piece.choice.index](None, piece.finish_reason)
            fields = {**fields, **last}
        if not (fields or piece.items or finish_reason):
            return None
        return delta(piece.choice.index, fields, piece.items if piece.items else None, finish_reason)

    opening = [delta(c.index, {"role": "assistant", "content": ""}, None, None) for c in run.choices]
    return await _respond(request, state, run, gen, head, whole, chunk, opening)


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
