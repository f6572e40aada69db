"""What both HTTP APIs share: the server's state on the app (``STATE``), the exception -> status table (the one
place errors become codes), the error middleware and how a JSON body is read.  :mod:`.app` (rllama's API)
and :mod:`.openai_api` both build on this module and never on each other."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
    engine: Engine
    max_seq_len: int  # the backend's context: a request's max_seq_len is clamped to it
    api_path: str
    model_name: str = "model"  # what /v1/models and OpenAI responses call it: the model file's stem
    exit_after_one_query: bool = False
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies are refused (400)
    access: Access = Access()  # Host names, API key, CORS origins (``access``)
    idle_timeout: float = IDLE_TIMEOUT_S
    stop: asyncio.Event | None = None  # set to shut the server down (serve() waits on it)
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
            response = respond(status, _message(e), e, getattr(e, "headers", None))
            if getattr(e, "close_connection", False):
                response.force_close()
            return response

    return errors


