"""What both HTTP APIs share: the server's state on the app (``STATE``), the exception -> status table (the one
place errors become codes; OpenAI's ``code`` is each exception class's ``code`` attribute), the error
middleware (every 503 with Retry-After), the readiness middleware (503 while loading, recovering or
stopping) and how a JSON body is read.  :mod:`.app` (rllama's API)
and :mod:`.openai_api` both build on this module and never on each other."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..engine import Engine, QueueFull, ServerClosing
from ..errors import PromptTooLongError, ShardllamaError, UsageError, WorkerError
from ..tokenizer import Tokenizer
from .access import Access, HostNotAllowed, Unauthorized
from .schemas import RequestError, UnsupportedMediaType, check_content_type, parse_json_object

log = logging.getLogger(__name__)

DEFAULT_STATS_PATH = "/rllama/v1/stats"
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1  # every 503 says when to try again; an Unavailable error says its own
# A connection that has not sent a complete request within this long is closed: idle before its first
# request or between two (aiohttp's keepalive_timeout), or still sending a body (read_json).
IDLE_TIMEOUT_S = 30.0


class BodyTimeout(RequestError):
    """The request's body did not arrive within IDLE_TIMEOUT_S (HTTP 408, and the connection is closed)."""

    close_connection = True
    code = "request_timeout"


class Unavailable(ShardllamaError):
    """The server takes no requests right now (HTTP 503, ``Retry-After: retry_after``); ``status`` is what
    ``GET /health`` says."""

    status = "unavailable"
    retry_after = 1


class ModelLoading(Unavailable):
    status, code, retry_after = "loading", "model_loading", 5


class Recovering(Unavailable):
    status, code = "recovering", "worker_failed"


class ModelNotFound(ShardllamaError):
    """``GET /v1/models/{id}`` of a model this server does not serve (HTTP 404)."""

    code, param = "model_not_found", "model"


# Exception type -> HTTP status, first match wins.  The one place errors become codes.
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (ModelNotFound, 404),
    (HostNotAllowed, 403),
    (BodyTimeout, 408),
    (UnsupportedMediaType, 415),
    (RequestError, 400),
    (PromptTooLongError, 400),
    (UsageError, 400),  # a sampling setting the engine refuses
    (Unavailable, 503),
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


LOADING, SERVING, STOPPING = "loading", "ok", "stopping"  # ServerState.phase


@dataclasses.dataclass
class ServerState:
    """What the handlers share.  ``serve`` builds it before the model loads (``phase`` LOADING: no tokenizer
    or engine yet, every route but /health and /metrics answers 503) and fills it in when the model is ready."""

    tokenizer: Tokenizer | None = None
    engine: Engine | None = None
    max_seq_len: int = 0  # the backend's context: a request's max_seq_len is clamped to it
    api_path: str = "/rllama/v1/inference"
    model_name: str = "model"  # what /v1/models and OpenAI responses call it: the model file's stem
    exit_after_one_query: bool = False
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies are refused (400)
    access: Access = Access()  # Host names, API key, CORS origins (``access``)
    idle_timeout: float = IDLE_TIMEOUT_S
    stop: threading.Event | None = None  # set to shut the server down (serve() waits on it)
    phase: str = SERVING  # LOADING, SERVING or STOPPING (serve() moves it along)
    metrics: Any = None  # the app's metrics.Metrics, if it has one
    _vocab_text: list[str] | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def vocab_size(self) -> int:
        """Logits per token, the model's vocabulary (the tokenizer's may be smaller): logit_bias ids lie below."""
        return self.engine.backend.args.vocab_size

    def vocab_text(self, n: int) -> list[str]:
        """Printable text of token ids 0..n-1 (ids beyond the tokenizer's vocabulary print as "")."""
        if self._vocab_text is None or len(self._vocab_text) != n:
            self._vocab_text = [self.tokenizer.token_text(i) for i in range(n)]
        return self._vocab_text

    def unavailable(self) -> BaseException | None:
        """Why requests cannot be served now (loading, a worker being replaced, stopping); None if they can."""
        if self.phase == LOADING:
            return ModelLoading("the model is loading: try again shortly (GET /health says when it is ready)")
        if self.phase == STOPPING or self.engine is None:
            return ServerClosing("the server is shutting down")
        if getattr(self.engine.backend, "recovering", False):
            return Recovering("a worker failed and is being replaced: try again shortly")
        return None

    def request_done(self) -> None:
        if self.exit_after_one_query and self.stop is not None:
            log.info("served one query: shutting down (--inference-server-exit-after-one-query)")
            self.stop.set()


STATE = web.AppKey("shardllama", ServerState)


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
            headers = getattr(e, "headers", None)
            if status == 503:  # busy, loading, recovering, stopping: say when to come back
                headers = {**(headers or {}), "Retry-After": str(getattr(e, "retry_after", RETRY_AFTER_S))}
            response = respond(status, _message(e), e, headers)
            if getattr(e, "close_connection", False):
                response.force_close()
            return response

    return errors


UNGATED_PATHS = frozenset({"/health", "/metrics"})  # answered while loading, recovering and stopping too


def ready_middleware():
    """Answers 503 (``state.unavailable()``, with Retry-After) while the server cannot serve: before the
    model is loaded, while a worker is replaced, while stopping.  Checked once per request, in the innermost
    application, inside its error middleware (as ``access.guard_middleware``)."""

    @web.middleware
    async def ready(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.app is request.match_info.apps[-1] and request.path not in UNGATED_PATHS:
            problem = request.app[STATE].unavailable()
            if problem is not None:
                raise problem
        return await handler(request)

    return ready

