"""The HTTP layer (aiohttp): rllama's inference API on top of the engine, and nothing more.

``create_app`` builds the application; the tokenizer and the engine live on its state (``app[STATE]``),
never in module globals.  Handlers parse and validate (``schemas``), tokenize, hand a request to the engine
and stream its events back as JSONL; every exception type maps to an HTTP status in one table
(:data:`ERROR_STATUS`), answered as ``{"error": "<one line>"}``.  Every request of both APIs first passes
the access rules (:mod:`.access`: Host header, API key), and every body is read by :func:`read_json`
(declared application/json, arrived within :data:`IDLE_TIMEOUT_S`).

Response lines (``Content-Type: text/jsonl``), one per generated token, written as soon as it exists::

    {"<text to append>": {"p": 0.93, "id": 1234}}
    {"": {"p": 0.71, "id": 0, "is_end_token": true, "prompt_tokens": 7, "cached_tokens": 0, ...}}

The key is the text the token adds to the generated text, from the tokenizer's stream decoder, so the keys
concatenate to exactly the generated text.  A token that ends inside a UTF-8 character (one byte of a
multi-byte emoji) still gets its line, with the key ``""``: the character appears whole in the line of the
token that completes it.  Control tokens (the end token) add no text: their key is ``""`` too, their id
says which they were.  ``is_end_token`` is there, true, only on the end token that stopped the generation.
The last line also carries the request's counts: ``prompt_tokens``, ``cached_tokens`` (reused from the
prompt cache), ``computed_tokens`` (fed through the model) and ``generated``.

With ``no_token_sampling`` each line instead maps every vocabulary token's text (as ``token_text`` prints
it; tokens that print alike share an entry, their probabilities added) to ``{"p": <the model's own
probability>}`` — temperature 1, no top-k/top-p/penalty, summing to 1 — with ``"is_end_token": true`` on the
end tokens and ``"chosen": true, "id": ...`` on the token the generation continued with (sampled with the
request's settings, as rllama did).

With ``top_probs: N`` (ours) the token's entry (the chosen one's, with ``no_token_sampling``) also carries
``"top_probs": [{"id", "text", "p"}, ...]``: the N most likely tokens under the model's own distribution
(temperature 1, no filter or penalty: the exponentials of the OpenAI API's log-probabilities), most likely
first, ``text`` as ``token_text`` prints it.

A generation that fails after its first line ends with a line ``{"error": "..."}``; before it, the request
gets the error status.  A client that disconnects stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
from typing import Any

import torch
from aiohttp import web

from ..engine import Failed, Finished, Request, Token
from ..errors import PromptTooLongError
from .access import enable_cors, guard_middleware
from .common import (DEFAULT_STATS_PATH, IDLE_TIMEOUT_S, RETRY_AFTER_S, STATE, ServerState, error_middleware,
                     error_response, read_json, ready_middleware, _message)
from .openai_api import create_openai_app
from .schemas import RequestError, request_from_dict

__all__ = ["IDLE_TIMEOUT_S", "ServerState", "create_app"]

log = logging.getLogger(__name__)


def create_app(state: ServerState, *, stats_path: str = DEFAULT_STATS_PATH) -> web.Application:
    """rllama's routes, ``GET /health``, ``GET /metrics`` (a registry of this app's own) and the OpenAI API
    under /v1."""
    from .metrics import Metrics, metrics, metrics_middleware

    if state.metrics is None:
        state.metrics = Metrics(state)
    app = web.Application(middlewares=[metrics_middleware(), _errors, guard_middleware(state.access),
                                       ready_middleware()], client_max_size=state.max_body_bytes)
    app[STATE] = state
    app.router.add_post(state.api_path, inference)
    app.router.add_get(stats_path, stats)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    enable_cors(app, state.access)
    app.add_subapp("/v1", create_openai_app(state))
    return app


# ---- handlers ----------------------------------------------------------------------------------------


async def inference(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = request_from_dict(await read_json(request, required="prompt"), vocab_size=state.vocab_size)
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, state.tokenizer.encode, req.prompt)
    max_len = min(req.max_seq_len, state.max_seq_len)
    if not ids:
        raise RequestError('"prompt" is empty and the model adds no BOS token: nothing to continue from')
    if len(ids) > max_len:
        limit = "max_seq_len" if req.max_seq_len <= state.max_seq_len else "the server's --max-seq-len"
        raise PromptTooLongError(f'"prompt" is {len(ids)} tokens, longer than {limit} {max_len}')
    queue: asyncio.Queue = asyncio.Queue()
    job = Request(
        prompt=ids, params=req.sampling(), emit=functools.partial(loop.call_soon_threadsafe, queue.put_nowait),
        max_new_tokens=req.max_new_tokens, max_len=max_len,
        stop_ids=state.tokenizer.stop_ids if req.stop_at_end_token else frozenset(),
        full_distribution=req.no_token_sampling, logprobs=req.top_probs,
        generator=torch.Generator().manual_seed(req.seed if req.seed is not None else secrets.randbits(63)),
        cache_salt=req.cache_salt,
    )
    state.engine.submit(job)
    try:
        return await _stream(request, state, job, queue, req.no_token_sampling)
    finally:
        state.engine.cancel(job)  # a no-op unless the client went away
        state.request_done()


async def _stream(request: web.Request, state: ServerState, job: Request, queue: asyncio.Queue,
                  full: bool) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    decoder = state.tokenizer.stream()
    loop = asyncio.get_running_loop()
    try:
        while True:
            event = await queue.get()
            if isinstance(event, Failed):
                if response is None:
                    raise event.error
                log.warning("generation failed mid-stream: %s", event.error)
                await response.write(_json_line({"error": _message(event.error)}))
                break
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": _content_type(request)})
                await response.prepare(request)
            if isinstance(event, Finished):
                break
            assert isinstance(event, Token), event
            if full:
                line = await loop.run_in_executor(None, _distribution_line, state, event)
            else:
                text = decoder.push(event.id) + (decoder.flush() if event.last else "")
                line = _token_line(state, text, event)
            await response.write(line)
            if event.last:
                break
        await response.write_eof()
    except ConnectionResetError:  # the client went away; the caller cancels the job
        log.info("client %s went away mid-stream", request.remote)
    return response


async def health(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}`` when requests are served; else 503 ``{"status": "loading" | "recovering" |
    "stopping", "reason": ...}`` with Retry-After.  Needs no API key."""
    problem = request.app[STATE].unavailable()
    if problem is None:
        return web.json_response({"status": "ok"})
    status = getattr(problem, "status", "stopping")  # the engine's ServerClosing: stopping
    return web.json_response({"status": status, "reason": _message(problem)}, status=503,
                             headers={"Retry-After": str(getattr(problem, "retry_after", RETRY_AFTER_S))})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"max_seq_len": state.max_seq_len, **state.engine.stats()})


# ---- response lines ------------------------------------------------------------------------------------


def _json_line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _stats_fields(event: Token) -> dict[str, int]:
    s = event.stats
    if s is None:
        return {}
    return dict(prompt_tokens=s.prompt_tokens, cached_tokens=s.cached_tokens, computed_tokens=s.computed_tokens,
                generated=s.generated)


def _top_probs(state: ServerState, event: Token) -> dict[str, list[dict[str, Any]]]:
    """The request's ``top_probs`` most likely tokens under the model's own distribution (the same numbers as
    ``no_token_sampling``'s ``p``), most likely first."""
    if event.logprobs is None:
        return {}
    return {"top_probs": [{"id": i, "text": state.tokenizer.token_text(i), "p": math.exp(lp)}
                          for i, lp in event.logprobs.top]}


def _token_line(state: ServerState, text: str, event: Token) -> bytes:
    entry: dict[str, Any] = {"p": event.prob}
    if event.is_end:
        entry["is_end_token"] = True
    entry["id"] = event.id
    entry.update(_top_probs(state, event))
    entry.update(_stats_fields(event))
    return _json_line({text: entry})


def _distribution_line(state: ServerState, event: Token) -> bytes:
    """Every vocabulary token's text -> its probability (texts that coincide share one entry)."""
    probs = event.probs.tolist()
    texts = state.vocab_text(len(probs))
    out: dict[str, dict[str, Any]] = {}
    for text, p in zip(texts, probs):
        entry = out.get(text)
        if entry is None:
            out[text] = {"p": p}
        else:
            entry["p"] += p
    for i in state.tokenizer.stop_ids:
        if i < len(texts):
            out[texts[i]]["is_end_token"] = True
    out[texts[event.id]].update(chosen=True, id=event.id, **_top_probs(state, event), **_stats_fields(event))
    return _json_line(out)


def _content_type(request: web.Request) -> str:
    """The body is JSONL either way; its label follows the client's Accept (rllama documented both)."""
    accept = request.headers.get("Accept", "")
    if "application/json" in accept and "text/jsonl" not in accept:
        return "application/json; charset=utf-8"
    return "text/jsonl; charset=utf-8"


_errors = error_middleware(lambda status, message, error, headers: error_response(status, message, headers),
                           lambda state: f"the API is POST {state.api_path}")
