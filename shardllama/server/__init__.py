"""The inference server: rllama's HTTP API (``POST /rllama/v1/inference``, JSONL streaming) and the OpenAI one,
on aiohttp, a thin layer over the engine (``shardllama.engine``), which batches every running request and
keeps the prompt cache.

- :mod:`.config`: :class:`ServerConfig`, the settings, and the KV-cache blocks they ask for;
- :mod:`.schemas`, :mod:`.openai_schemas`: the request fields, defaults and validation;
- :mod:`.app`: the aiohttp application (``create_app``) and rllama's routes; :mod:`.openai_api`: the OpenAI
  routes, mounted under ``/v1``, which run their choices (``n``, lists of prompts) through
  :mod:`.openai_choices` and write log-probabilities in OpenAI's shapes with :mod:`.openai_logprobs`;
  :mod:`.common`: what both share (the state, the exception -> status table, the error middleware, reading
  a JSON body);
- :mod:`.access`: the Host-header check, the API key and CORS (``--allowed-hosts``, ``--api-key``,
  ``--cors-origin``).

This module is the entry: :func:`serve` runs the server on an opened model until it is stopped.  The model
must be opened with the KV-cache blocks :meth:`ServerConfig.kv_blocks` asks for.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

from ..errors import UsageError
from .config import ServerConfig

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0  # how long running responses get to finish when the server stops


def serve(model, config: ServerConfig) -> int:
    """Serve both APIs for ``model`` (a :class:`~shardllama.runtime.Model`) until SIGINT/SIGTERM, or until the
    first query is answered with ``exit_after_one_query``; returns the exit code (0).

    The prompt cache takes the KV-cache blocks beyond what ``max_concurrent`` sequences need (at most
    ``prompt_cache_size`` entries); with ``prompt_cache_dir`` its entries are also kept on disk and loaded
    from there at start-up (``engine.prompt_store``).  A connection that sends no complete request within
    ``idle_timeout`` seconds (default ``app.IDLE_TIMEOUT_S``, 30) is closed.  The caller keeps ownership of
    the model.
    """
    from ..engine import Engine
    from .access import is_loopback
    from .app import IDLE_TIMEOUT_S, ServerState, create_app

    c = config
    if c.api_key is None and not is_loopback(c.host):
        log.warning("listening on %s without --api-key: whoever can reach it can use the server", c.host)
    backend = model.backend
    store = None
    if c.prompt_cache_dir is not None:
        from pathlib import Path

        from ..engine.prompt_store import PromptStore, model_identity

        identity = model_identity(model.path, model.args, exclude=Path(c.prompt_cache_dir))
        store = PromptStore(c.prompt_cache_dir, identity, model.args, model.dtype, backend.max_seq_len)
    try:
        engine = Engine(backend, max_concurrent=c.max_concurrent, max_queue=c.max_queue,
                        cache_size=c.prompt_cache_size, store=store)
    except ValueError as e:
        raise UsageError(f"{e}: open the model with ServerConfig.kv_blocks() blocks") from None
    engine.start()
    name = model.path.stem if model.path.suffix else model.path.name  # x.gguf -> x; a directory: its name
    state = ServerState(tokenizer=model.tokenizer, engine=engine, max_seq_len=backend.max_seq_len,
                        api_path=c.api_path, model_name=name, exit_after_one_query=c.exit_after_one_query,
                        access=c.access(), idle_timeout=IDLE_TIMEOUT_S if c.idle_timeout is None else c.idle_timeout)
    per_block = backend.kv_bytes_per_token() * backend.block_size
    spare = engine.stats()["cache_blocks_limit"]
    summary = (f"{c.max_concurrent} concurrent, queue {c.max_queue}, context {backend.max_seq_len}; prompt cache up to "
               f"{engine.cache.capacity} entries in {spare} KV blocks of {per_block / 2**10:.0f} KiB "
               f"({spare * per_block / 2**20:.1f} MiB, taken as used)"
               + (f", kept in {c.prompt_cache_dir}" if engine.store is not None else ""))
    try:
        return asyncio.run(_run(create_app(state), state, c.host, c.port, summary, c.quiet))
    finally:
        engine.close()


async def _run(app, state, host: str, port: int, summary: str, quiet: bool) -> int:
    from aiohttp import web

    loop = asyncio.get_running_loop()
    state.stop = asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, state.stop.set)
    # keepalive_timeout closes a connection idle before its first request (aiohttp >= 3.14.4) or between two,
    # also one that sent half a request line or header.  After an answer that left a body unread (an error, a
    # 408), aiohttp reads and drops the rest for lingering_time before it closes: 10 s, at most that limit too.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_S, access_log=None,
                           keepalive_timeout=state.idle_timeout, lingering_time=min(10.0, state.idle_timeout))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        bound = runner.addresses[0]
        where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        if not quiet:
            print(f"shardllama: serving POST http://{where}:{bound[1]}{state.api_path} and the OpenAI API at "
                  f"http://{where}:{bound[1]}/v1 ({summary})", file=sys.stderr, flush=True)
        await state.stop.wait()
        # Running generations end now (their clients get an error line), then the connections close.
        await loop.run_in_executor(None, state.engine.close)
    finally:
        await runner.cleanup()
    if not quiet:
        print("shardllama: server stopped", file=sys.stderr, flush=True)
    return 0
