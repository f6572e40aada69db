"""The HTTP layer (aiohttp): rllama's inference API on top of the scheduler, and nothing more.

``create_app`` builds the application; the tokenizer and the scheduler live on its state (``app[STATE]``),
never in module globals.  Handlers parse and validate (``schemas``), tokenize, hand a job to the scheduler
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

A generation that fails after its first line ends with a line ``{"error": "..."}``; before it, the request
gets the error status.  A client that disconnects stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import secrets
from typing import Any, Awaitable, Callable

import torch
from aiohttp import web

from ..errors import PromptTooLongError, ShardllamaError, UsageError, WorkerError
from ..tokenizer import Tokenizer
from .access import Access, HostNotAllowed, Unauthorized, enable_cors, guard_middleware
from .jobs import Failed, Finished, Job, Token
from .scheduler import QueueFull, Scheduler, ServerClosing
from .schemas import (RequestError, UnsupportedMediaType, check_content_type, parse_json_object,
                      request_from_dict)

log = logging.getLogger(__name__)

DEFAULT_STATS_PATH = "/rllama/v1/stats"
MAX_BODY_BYTES = 1 << 20
# A connection that has not sent a complete request within this long is closed: idle before its first
# request or between two (aiohttp's keepalive_timeout), or still sending a body (read_json).
IDLE_TIMEOUT_S = 30.0


class BodyTimeout(RequestError):
    """The request's body did not arrive within IDLE_TIMEOUT_S (HTTP 408, and the connection is closed)."""

    close_connection = True

# Exception type -> HTTP status, first match wins.  The one place errors become codes.
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (HostNotAllowed, 403),
    (BodyTimeout, 408),
    (UnsupportedMediaType, 415),
    (RequestError, 400),
    (PromptTooLongError, 400),
    (UsageError, 400),  # a sampling setting the engine refuses
    (QueueFull, 503),
    (ServerClosing, 503),
    (WorkerError, 503),  # a worker died; the next request gets a replacement
    (ShardllamaError, 500),
)


def status_for(error: BaseException) -> int:
    for kind, status in ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return 500


@dataclasses.dataclass
class ServerState:
    tokenizer: Tokenizer
    scheduler: Scheduler
    max_seq_len: int  # the backend's context: a request's max_seq_len is clamped to it
    api_path: str
    model_name: str = "model"  # what /v1/models and OpenAI responses call it: the model file's stem
    exit_after_one_query: bool = False
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies are refused (400)
    access: Access = Access()  # Host names, API key, CORS origins (``access``)
    idle_timeout: float = IDLE_TIMEOUT_S
    stop: asyncio.Event | None = None  # set to shut the server down (serve() waits on it)
    _vocab_text: list[str] | None = dataclasses.field(default=None, init=False, repr=False)

    def vocab_text(self, n: int) -> list[str]:
        """Printable text of token ids 0..n-1 (ids beyond the tokenizer's vocabulary print as "")."""
        if self._vocab_text is None or len(self._vocab_text) != n:
            self._vocab_text = [self.tokenizer.token_text(i) for i in range(n)]
        return self._vocab_text

    def request_done(self) -> None:
        if self.exit_after_one_query and self.stop is not None:
            log.info("served one query: shutting down (--inference-server-exit-after-one-query)")
            self.stop.set()


STATE = web.AppKey("shardllama", ServerState)


def create_app(state: ServerState, *, stats_path: str = DEFAULT_STATS_PATH) -> web.Application:
    app = web.Application(middlewares=[_errors, guard_middleware(state.access)],
                          client_max_size=state.max_body_bytes)
    app[STATE] = state
    app.router.add_post(state.api_path, inference)
    app.router.add_get(stats_path, stats)
    enable_cors(app, state.access)
    from .openai_api import create_openai_app  # here: it imports this module

    app.add_subapp("/v1", create_openai_app(state))
    return app


# ---- handlers ----------------------------------------------------------------------------------------


async def inference(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = request_from_dict(await read_json(request, required="prompt"))
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, state.tokenizer.encode, req.prompt)
    max_len = min(req.max_seq_len, state.max_seq_len)
    if not ids:
        raise RequestError('"prompt" is empty and the model adds no BOS token: nothing to continue from')
    if len(ids) > max_len:
        limit = "max_seq_len" if req.max_seq_len <= state.max_seq_len else "the server's --max-seq-len"
        raise PromptTooLongError(f'"prompt" is {len(ids)} tokens, longer than {limit} {max_len}')
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(
        prompt=ids, params=req.sampling(), emit=functools.partial(loop.call_soon_threadsafe, queue.put_nowait),
        max_new_tokens=req.max_new_tokens, max_len=max_len,
        stop_ids=state.tokenizer.stop_ids if req.stop_at_end_token else frozenset(),
        full_distribution=req.no_token_sampling,
        generator=torch.Generator().manual_seed(req.seed if req.seed is not None else secrets.randbits(63)),
        cache_salt=req.cache_salt,
    )
    state.scheduler.submit(job)
    try:
        return await _stream(request, state, job, queue, req.no_token_sampling)
    finally:
        state.scheduler.cancel(job)  # a no-op unless the client went away
        state.request_done()


async def read_json(request: web.Request, *, required: str) -> dict[str, Any]:
    """The request's body, declared and parsed as a JSON object (``schemas``); ``required`` is the field an
    empty body is told to send.  Every API's POST handler reads its body here."""
    declared = request.content_type if "Content-Type" in request.headers else None
    check_content_type(declared, request.charset)
    timeout = request.app[STATE].idle_timeout
    try:
        async with asyncio.timeout(timeout):  # a body sent a byte at a time must not hold the handler forever
            body = await request.read()
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g} s") from None
    return parse_json_object(body, required=required)


async def _stream(request: web.Request, state: ServerState, job: Job, queue: asyncio.Queue,
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
                line = _token_line(text, event)
            await response.write(line)
            if event.last:
                break
        await response.write_eof()
    except ConnectionResetError:  # the client went away; the caller cancels the job
        log.info("client %s went away mid-stream", request.remote)
    return response


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"max_seq_len": state.max_seq_len, **state.scheduler.stats()})


# ---- response lines ------------------------------------------------------------------------------------


def _json_line(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


def _stats_fields(event: Token) -> dict[str, int]:
    return dataclasses.asdict(event.stats) if event.stats is not None else {}


def _token_line(text: str, event: Token) -> bytes:
    entry: dict[str, Any] = {"p": event.prob}
    if event.is_end:
        entry["is_end_token"] = True
    entry["id"] = event.id
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
    out[texts[event.id]].update(chosen=True, id=event.id, **_stats_fields(event))
    return _json_line(out)


def _content_type(request: web.Request) -> str:
    """The body is JSONL either way; its label follows the client's Accept (rllama documented both)."""
    accept = request.headers.get("Accept", "")
    if "application/json" in accept and "text/jsonl" not in accept:
        return "application/json; charset=utf-8"
    return "text/jsonl; charset=utf-8"


# ---- errors --------------------------------------------------------------------------------------------


def _message(error: BaseException | str) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


Respond = Callable[[int, str, "BaseException | None", "dict[str, str] | None"], web.Response]


def error_middleware(respond: Respond, not_found_hint: Callable[[ServerState], str]):
    """Every failure answered by ``respond(status, message, error, headers)`` with the status of
    ERROR_STATUS: the server never answers with a traceback and never dies of a request.  Each API (rllama's,
    OpenAI's) passes the body shape it answers in."""

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        state = request.app[STATE]
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            limit = state.max_body_bytes
            return respond(400, f"the request body is larger than the limit of {limit} bytes", None, None)
        except web.HTTPMethodNotAllowed as e:
            allowed = ", ".join(sorted(e.allowed_methods))
            return respond(405, f"{request.method} is not allowed on {request.path}; use {allowed}", None,
                           {"Allow": allowed})
        except web.HTTPNotFound:
            return respond(404, f"no such path: {request.path} ({not_found_hint(state)})", None, None)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            told = e.text is not None and not e.text.startswith(f"{e.status}: ")  # more than the default text
            return respond(e.status, _message(e.text) if told else e.reason, None, None)
        except Exception as e:  # (a cancelled handler's CancelledError is no Exception: it goes through)
            status = status_for(e)
            if status >= 500 and not isinstance(e, ShardllamaError):
                log.exception("request to %s failed", request.path)
                return respond(status, f"internal error: {_message(e)}", e, None)
            response = respond(status, _message(e), e, getattr(e, "headers", None))
            if getattr(e, "close_connection", False):
                response.force_close()
            return response

    return errors


_errors = error_middleware(lambda status, message, error, headers: error_response(status, message, headers),
                           lambda state: f"the API is POST {state.api_path}")
