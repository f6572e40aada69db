"""The inference server: rllama's HTTP API (``POST /rllama/v1/inference``, JSONL streaming) and the OpenAI one,
on aiohttp, a thin layer over the engine (``shardllama.engine``), which batches every running request and
keeps the prompt cache.

- :mod:`.config`: :class:`ServerConfig`, the settings, and the KV-cache blocks they ask for;
- :mod:`.schemas`, :mod:`.openai_schemas`: the request fields, defaults and validation;
- :mod:`.app`: the aiohttp application (``create_app``) and rllama's routes; :mod:`.openai_api`: the OpenAI
  routes, mounted under ``/v1``, which run their choices (``n``, lists of prompts) through
  :mod:`.openai_choices` and write log-probabilities in OpenAI's shapes with :mod:`.openai_logprobs`;
  :mod:`.common`: what both share (the state, the exception -> status table, the error middleware, reading
  a JSON body); :mod:`.structured`: the OpenAI routes' ``response_format`` and ``tools`` as grammars
  (``shardllama.grammar``) and the answers as ``tool_calls``;
- :mod:`.access`: the Host-header check, the API key and CORS (``--allowed-hosts``, ``--api-key``,
  ``--cors-origin``);
- :mod:`.metrics`: ``GET /metrics`` (Prometheus), fed by the HTTP layer and the engine's observer.

This module is the entry: :func:`serve` binds the port, loads the model (``load()``, in the calling thread)
and serves until it is stopped.  The HTTP server runs in a thread of its own with its own event loop, from
before the model loads to the end, so ``GET /health`` answers at once (503 "loading", then 200) and every
other route answers 503 with Retry-After until the model is ready.  The model must be opened with the
KV-cache blocks :meth:`ServerConfig.kv_blocks` asks for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
from typing import Callable

from ..errors import UsageError
from .config import ServerConfig

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long running responses get to finish when the server stops
BIND_TIMEOUT_S = 60.0


def serve(config: ServerConfig, load: Callable[[], object]) -> int:
    """Bind ``config``'s port, then ``load()`` the model (a :class:`~shardllama.runtime.Model`, whose ownership
    passes to the server: it is closed on the way out) and serve both APIs on it until SIGINT/SIGTERM, or
    until the first query is answered with ``exit_after_one_query``; returns the exit code (0).

    Prints "listening on ..." once bound and "serving ..." once the model is ready.  The prompt cache takes
    the KV-cache blocks beyond what ``max_concurrent`` sequences need (at most ``prompt_cache_size``
    entries); with ``prompt_cache_dir`` its entries are also kept on disk and loaded from there at start-up
    (``engine.prompt_store``).  A connection that sends no complete request within ``idle_timeout`` seconds
    (default ``app.IDLE_TIMEOUT_S``, 30) is closed.  An error of ``load()`` (or a signal while it runs)
    propagates, after the port is closed.
    """
    from .access import is_loopback
    from .app import IDLE_TIMEOUT_S, ServerState, create_app
    from .common import LOADING, STOPPING

    c = config
    if c.api_key is None and not is_loopback(c.host):
        log.warning("listening on %s without --api-key: whoever can reach it can use the server", c.host)
    state = ServerState(api_path=c.api_path, exit_after_one_query=c.exit_after_one_query, access=c.access(),
                        idle_timeout=IDLE_TIMEOUT_S if c.idle_timeout is None else c.idle_timeout, phase=LOADING,
                        stop=threading.Event())
    http = _HttpThread(create_app(state), state, c.host, c.port)
    where = http.start()
    if not c.quiet:
        print(f"shardllama: listening on {where} (loading the model; GET {where}/health answers 503 until it "
              "is ready)", file=sys.stderr, flush=True)
    try:
        model = load()
        with model:
            try:
                summary = _start_engine(model, c, state)
                if not c.quiet:
                    print(f"shardllama: serving POST {where}{state.api_path} and the OpenAI API at {where}/v1 "
                          f"({summary})", file=sys.stderr, flush=True)
                _wait(state.stop, http)
            finally:
                # Running generations end now (their clients get an error), then the connections close.
                state.phase = STOPPING
                if state.engine is not None:
                    state.engine.close()
    finally:
        state.phase = STOPPING
        http.stop()
    if not c.quiet:
        print("shardllama: server stopped", file=sys.stderr, flush=True)
    return 0


def _start_engine(model, c: ServerConfig, state) -> str:
    """The engine on ``model``, started and put on ``state`` (the server is then ready); a summary line."""
    from ..engine import Engine
    from .common import SERVING

    backend = model.backend
    store = None
    if c.prompt_cache_dir is not None:
        from pathlib import Path

        from ..engine.prompt_store import PromptStore, model_identity

        identity = model_identity(model.path, model.args, exclude=Path(c.prompt_cache_dir))
        store = PromptStore(c.prompt_cache_dir, identity, model.args, model.dtype, backend.max_seq_len)
    try:
        engine = Engine(backend, max_concurrent=c.max_concurrent, max_queue=c.max_queue,
                        cache_size=c.prompt_cache_size, store=store, observer=state.metrics.observe)
    except ValueError as e:
        raise UsageError(f"{e}: open the model with ServerConfig.kv_blocks() blocks") from None
    engine.start()
    state.tokenizer, state.engine, state.max_seq_len = model.tokenizer, engine, backend.max_seq_len
    state.model_name = model.path.stem if model.path.suffix else model.path.name  # x.gguf -> x; a dir: its name
    state.phase = SERVING  # last: the handlers read the fields above once they see it
    per_block = backend.kv_bytes_per_token() * backend.block_size
    spare = engine.stats()["cache_blocks_limit"]
    summary = (f"{c.max_concurrent} concurrent, queue {c.max_queue}, context {backend.max_seq_len}; prompt cache up to "
               f"{engine.cache.capacity} entries in {spare} KV blocks of {per_block / 2**10:.0f} KiB "
               f"({spare * per_block / 2**20:.1f} MiB, taken as used)"
               + (f", kept in {c.prompt_cache_dir}" if engine.store is not None else ""))
    return summary


def _wait(stop: threading.Event, http: "_HttpThread") -> None:
    """Until SIGINT/SIGTERM (handled here while serving, as before the model loaded by whoever had them),
    ``stop`` is set (``exit_after_one_query``) or the HTTP thread ended."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        while not stop.wait(0.5) and http.alive():
            pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class _HttpThread:
    """The aiohttp server in a thread with its own event loop: :meth:`start` binds (UsageError if it cannot)
    and returns the base URL; :meth:`stop` closes the connections (after SHUTDOWN_GRACE_S at most) and joins."""

    def __init__(self, app, state, host: str, port: int):
        self.app, self.state, self.host, self.port = app, state, host, port
        self._bound: concurrent.futures.Future = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="shardllama-http", daemon=True)

    def start(self) -> str:
        self._thread.start()
        try:
            bound = self._bound.result(BIND_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        return f"http://{host}:{bound[1]}"

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._thread.is_alive():
            if self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:
            if not self._bound.done():
                self._bound.set_exception(e)
            else:
                log.exception("the HTTP server failed")
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        self._stop = asyncio.Event()
        idle = self.state.idle_timeout
        # keepalive_timeout closes a connection idle before its first request (aiohttp >= 3.14.4) or between
        # two, also one that sent half a request line or header.  After an answer that left a body unread (an
        # error, a 408), aiohttp reads and drops the rest for lingering_time before it closes: 10 s, at most
        # that limit too.
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S,
                               access_log=None, keepalive_timeout=idle, lingering_time=min(10.0, idle))
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            try:
                await site.start()
            except OSError as e:
                raise UsageError(f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
            self._bound.set_result(runner.addresses[0])
            await self._stop.wait()
        finally:
            await runner.cleanup()
