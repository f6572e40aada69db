"""The inference server: rllama's HTTP API (``POST /rllama/v1/inference``, JSONL streaming) on aiohttp.

- :mod:`.schemas`: the request fields, defaults and validation;
- :mod:`.scheduler`: the thread that owns the backend and decodes every running request together;
- :mod:`.prompt_cache`: which KV-cache slots hold which token sequences (longest-prefix reuse, LRU);
- :mod:`.prompt_store`: those entries on disk (``--prompt-cache-dir``), so they survive a restart;
- :mod:`.app`: the aiohttp application, its handlers and the exception -> status table;
- :mod:`.access`: the Host-header check, the API key and CORS (``--allowed-hosts``, ``--api-key``,
  ``--cors-origin``).

This module is the entry: :func:`add_server_args` (the ``--inference-server-*`` flags), :func:`serve`
(run the server on an opened model until stopped) and :func:`serve_from_args` (size the KV cache, open
the model, serve).  The model must be opened with one KV-cache slot per concurrent generation plus one
per prompt-cache entry: :func:`plan_slots` says how many fit the prompt cache's memory budget.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import os
import threading
from typing import TYPE_CHECKING, Sequence

from ..errors import UsageError

if TYPE_CHECKING:  # torch is imported when a server starts, not when the CLI builds its parser
    import torch

    from ..config import ModelArgs

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_API_PATH = "/rllama/v1/inference"
DEFAULT_MAX_CONCURRENT = 5
DEFAULT_PROMPT_CACHE_SIZE = 50
DEFAULT_PROMPT_CACHE_MEMORY_MIB = 2048
DEFAULT_MAX_QUEUE = 32
API_KEY_ENV = "SHARDLLAMA_API_KEY"
SHUTDOWN_GRACE_S = 5.0  # how long running responses get to finish when the server stops


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = what
    return parse


def add_server_args(p: argparse.ArgumentParser) -> None:
    """rllama's ``--inference-server-*`` flags, and ours: the cache's memory budget and directory, the queue,
    the access rules (:mod:`.access`)."""
    g = p.add_argument_group("inference server (rllama's HTTP API)")
    g.add_argument("--inference-server-host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    g.add_argument("--inference-server-port", type=_int_at_least(0, "port"), default=DEFAULT_PORT,
                   help=f"port to listen on; 0 = any free port (default {DEFAULT_PORT})")
    g.add_argument("--inference-server-api-path", default=DEFAULT_API_PATH,
                   help=f"path of the inference endpoint (default {DEFAULT_API_PATH})")
    g.add_argument("--inference-server-max-concurrent-inferences", type=_int_at_least(1, "positive integer"),
                   default=DEFAULT_MAX_CONCURRENT,
                   help=f"generations decoded together; more wait in the queue (default {DEFAULT_MAX_CONCURRENT})")
    g.add_argument("--inference-server-max-queue", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a free place; beyond that the server answers 503 "
                        f"(default {DEFAULT_MAX_QUEUE})")
    g.add_argument("--inference-server-prompt-cache-size", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_PROMPT_CACHE_SIZE,
                   help=f"KV states of earlier prompts kept for reuse; 0 = off (default {DEFAULT_PROMPT_CACHE_SIZE})")
    g.add_argument("--inference-server-prompt-cache-memory", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_PROMPT_CACHE_MEMORY_MIB, metavar="MIB",
                   help="memory the prompt cache may take, in MiB: each entry is a full KV-cache slot of "
                        f"--max-seq-len positions (default {DEFAULT_PROMPT_CACHE_MEMORY_MIB})")
    g.add_argument("--prompt-cache-dir", metavar="DIR",
                   help="keep the prompt cache's entries in this directory too (safetensors files), so they "
                        "survive a restart; at most --inference-server-prompt-cache-size of this model's entries, "
                        "least recently used deleted first")
    g.add_argument("--inference-server-exit-after-one-query", action="store_true",
                   help="exit (code 0) after the first inference request has been answered")
    g.add_argument("--allowed-hosts", action="append", metavar="HOST[,HOST...]",
                   help="Host header names the server answers (any port; '*' = any), besides localhost, 127.0.0.1 "
                        "and [::1]. Default: on a loopback bind only those three (against DNS rebinding); on any "
                        "other bind any name")
    g.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port], or '*') call both APIs from a browser; "
                        "repeatable. Default: none (CORS off)")
    g.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route of both APIs (401 otherwise); "
                        f"default: ${API_KEY_ENV} if set (an argument is visible to other users in ps)")


def kv_bytes_per_slot(args: "ModelArgs", dtype: "torch.dtype", max_seq_len: int, n_workers: int | None = 0) -> int:
    """Memory of one KV-cache slot, over all processes: keys and values of every layer and position.
    With workers, a KV head shared by two workers' query groups is held by both (see ``sharding``).
    ``dtype`` is the weights' (an int8 model keeps its cache in f32)."""
    from ..quant import activation_dtype

    kv_heads = args.n_kv_heads
    if n_workers:
        from ..sharding import plan

        kv_heads = sum(len(spec.kv_heads) for spec in plan(args, n_workers))
    return 2 * args.n_layers * max_seq_len * kv_heads * args.head_dim * activation_dtype(dtype).itemsize


def plan_slots(bytes_per_slot: int, *, max_concurrent: int, prompt_cache_size: int, cache_memory: int) -> int:
    """KV-cache slots to open the model with: one per concurrent generation, plus as many prompt-cache
    entries as ``prompt_cache_size`` asks and ``cache_memory`` (bytes) holds."""
    fit = cache_memory // bytes_per_slot if bytes_per_slot > 0 else prompt_cache_size
    return max_concurrent + min(prompt_cache_size, fit)


def serve(model, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_path: str = DEFAULT_API_PATH,
          max_concurrent: int = DEFAULT_MAX_CONCURRENT, prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE,
          exit_after_one_query: bool = False, max_queue: int = DEFAULT_MAX_QUEUE, quiet: bool = False,
          prompt_cache_dir: str | None = None, allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = (),
          api_key: str | None = None, idle_timeout: float | None = None) -> int:
    """Serve rllama's API for ``model`` (a :class:`~shardllama.runtime.Model`) until SIGINT/SIGTERM, or until
    the first query is answered with ``exit_after_one_query``; returns the exit code (0).

    The prompt cache uses the backend's slots beyond the first ``max_concurrent`` (at most
    ``prompt_cache_size`` of them); with ``prompt_cache_dir`` its entries are also kept on disk and loaded
    from there at start-up (:mod:`.prompt_store`).  ``allowed_hosts``, ``cors_origins`` and ``api_key`` are
    the access rules of :mod:`.access`.  A connection that sends no complete request within ``idle_timeout``
    seconds (default ``app.IDLE_TIMEOUT_S``, 30) is closed.  The caller keeps ownership of the model.
    """
    from .access import Access, is_loopback
    from .app import IDLE_TIMEOUT_S, ServerState, create_app
    from .scheduler import Scheduler

    if not api_path.startswith("/"):
        raise UsageError(f"--inference-server-api-path must start with '/', got {api_path!r}")
    if not 0 <= port <= 65535:
        raise UsageError(f"--inference-server-port must be in 0..65535, got {port}")
    if max_concurrent < 1:
        raise UsageError(f"--inference-server-max-concurrent-inferences must be >= 1, got {max_concurrent}")
    if idle_timeout is not None and not idle_timeout > 0:
        raise UsageError(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
    access = Access.build(host, allowed_hosts=allowed_hosts, api_key=api_key, cors_origins=cors_origins)
    if api_key is None and not is_loopback(host):
        log.warning("listening on %s without --api-key: whoever can reach it can use the server", host)
    backend = model.backend
    if backend.n_slots < max_concurrent:
        raise UsageError(f"the model was opened with {backend.n_slots} KV-cache slot(s), fewer than "
                         f"--inference-server-max-concurrent-inferences {max_concurrent}")
    per_slot = kv_bytes_per_slot(model.args, model.dtype, backend.max_seq_len, getattr(backend, "n_workers", 0))
    store = None
    if prompt_cache_dir is not None:
        from pathlib import Path

        from .prompt_store import PromptStore, model_identity

        identity = model_identity(model.path, model.args, exclude=Path(prompt_cache_dir))
        store = PromptStore(prompt_cache_dir, identity, model.args, model.dtype, backend.max_seq_len)
    scheduler = Scheduler(backend, max_concurrent=max_concurrent, max_queue=max_queue,
                          cache_size=prompt_cache_size, bytes_per_slot=per_slot, store=store)
    cache = scheduler.cache.capacity
    if cache < prompt_cache_size:
        log.info("prompt cache: %d of %d entries fit in the KV cache's spare slots", cache, prompt_cache_size)
    name = model.path.stem if model.path.suffix else model.path.name  # x.gguf -> x; a directory: its name
    state = ServerState(tokenizer=model.tokenizer, scheduler=scheduler, max_seq_len=backend.max_seq_len,
                        api_path=api_path, model_name=name, exit_after_one_query=exit_after_one_query,
                        access=access, idle_timeout=IDLE_TIMEOUT_S if idle_timeout is None else idle_timeout)
    summary = (f"{max_concurrent} concurrent, queue {max_queue}, context {backend.max_seq_len}; prompt cache "
               f"{cache} entries x {per_slot / 2**20:.1f} MiB = {cache * per_slot / 2**20:.0f} MiB of KV cache"
               + (f", kept in {prompt_cache_dir}" if scheduler.store is not None else ""))
    try:
        return asyncio.run(_run(create_app(state), state, host, port, summary, quiet))
    finally:
        scheduler.close()


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
        await loop.run_in_executor(None, state.scheduler.close)
    finally:
        await runner.cleanup()
    if not quiet:
        print("shardllama: server stopped", file=sys.stderr, flush=True)
    return 0


def serve_from_args(args: argparse.Namespace) -> int:
    """``shardllama serve`` / ``--inference-server``: size the KV cache for the server, open the model with
    the flags of ``cli.add_model_args``, serve with those of :func:`add_server_args`."""
    from ..cli import prepare_from_args, start_from_args
    from ..coordinator import default_workers

    from .access import Access

    quiet = getattr(args, "quiet", False)
    progress = not quiet and sys.stderr.isatty()
    access = dict(allowed_hosts=[h for entry in args.allowed_hosts or () for h in entry.split(",") if h.strip()],
                  cors_origins=args.cors_origin or (),
                  api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None)
    Access.build(args.inference_server_host, **access)  # a bad value fails now, not after the model loads
    with prepare_from_args(args, progress=progress) as prepared:
        n_workers = args.workers if args.workers is not None else default_workers(prepared.args)
        per_slot = kv_bytes_per_slot(prepared.args, prepared.dtype, prepared.max_seq_len, n_workers)
        max_concurrent = args.inference_server_max_concurrent_inferences
        n_slots = plan_slots(per_slot, max_concurrent=max_concurrent,
                             prompt_cache_size=args.inference_server_prompt_cache_size,
                             cache_memory=args.inference_server_prompt_cache_memory << 20)
        model = start_from_args(args, prepared, n_slots=n_slots, progress=progress)
    with model:
        return serve(model, host=args.inference_server_host, port=args.inference_server_port,
                     api_path=args.inference_server_api_path, max_concurrent=max_concurrent,
                     prompt_cache_size=args.inference_server_prompt_cache_size,
                     exit_after_one_query=args.inference_server_exit_after_one_query,
                     max_queue=args.inference_server_max_queue, quiet=quiet, prompt_cache_dir=args.prompt_cache_dir,
                     **access)
