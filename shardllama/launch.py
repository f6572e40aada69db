"""Local worker processes (children of the coordinator, ``python -m workers``), started early.

A worker spends most of its start importing torch, as long as the coordinator's own imports (~1-2 s a
process on a small VM, CPU the workers would otherwise take from each other and from the coordinator).  So
the command starts its workers by :class:`LocalWorkers` right after its own imports, by forking itself:
each child already holds torch and the worker's modules, and runs ``workers.worker.main`` as ``python -m
workers`` would, while the coordinator reads the model's header and writes the shards.  A worker started
before its coordinator listens needs nothing special: ZeroMQ retries the connection until the socket
exists, and a local worker waits for its CONFIG as long as its parent lives (``workers.worker``).

Forking is safe only from a process with a single thread of its own: before any ZeroMQ context, torch
thread pool or Python thread exists (numpy's OpenBLAS pool shuts itself down across a fork).  Where that
cannot be said (a Python thread runs) or ``workers`` would not come from beside this package, and for
every worker the coordinator starts itself (replacements), :func:`spawn` starts ``python -m workers``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import psutil

CONNECT_TIMEOUT_S = 120.0  # seconds for workers to start / connect and build their shards


def default_workers(args=None, dtype=None) -> int:
    """One worker per physical core, at most as many as the plan of ``args`` (a ModelArgs) with weights of
    ``dtype`` can give work (one per attention head; with quantized blocks, whole blocks each)."""
    n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if args is None:
        return n
    from .sharding import max_workers

    return min(n, max_workers(args, dtype))


def spawn(endpoint: str, rank: int, *, threads: int, connect_timeout: float) -> subprocess.Popen:
    """Worker ``rank``, connecting to ``endpoint`` (its parent's), with ``threads`` torch threads."""
    env = dict(os.environ)
    # The child imports `workers` and `shardllama` from wherever this process did, never from its current
    # directory (-P: a `workers` folder there must not shadow ours).
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-P", "-m", "workers", *_worker_argv(endpoint, rank, threads, connect_timeout)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def _worker_argv(endpoint: str, rank: int, threads: int, connect_timeout: float) -> list[str]:
    return ["--connect", endpoint, "--rank", str(rank), "--parent-pid", str(os.getpid()), "--threads", str(threads),
            "--connect-timeout", str(connect_timeout),
            "--log-level", _level_name(logging.getLogger("shardllama").getEffectiveLevel())]


def _level_name(level: int) -> str:
    """The coordinator's log level as the worker's --log-level takes it (a name, or the number)."""
    name = logging.getLevelName(level)
    return name if isinstance(name, str) and not name.startswith("Level ") else str(level)


class Forked:
    """A forked child, with the part of :class:`subprocess.Popen` the coordinator uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: what Popen says then
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _fork(argv: list[str], threads: int) -> Forked:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:  # the child: become what `python -m workers` would be
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the command turns it into an exception)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        for handler in logging.root.handlers[:]:  # the worker sets up its own logging
            logging.root.removeHandler(handler)
        from workers.worker import main

        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _forkable() -> bool:
    """Whether this process may fork its workers: one Python thread, and `workers` (imported here, with
    torch, so that every child has them) from beside this package."""
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return False
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))  # never a `workers` folder in the current directory
    try:
        import workers.worker
    except ImportError:
        return False
    finally:
        sys.path.remove(str(root))
    return Path(workers.worker.__file__).resolve().parents[1] == root


class LocalWorkers:
    """``n`` workers started now, before their coordinator exists, at an ipc endpoint in a fresh directory
    only this user can enter: forked from this process where it may (see the module's docstring), else
    spawned.  A Coordinator :meth:`take` s them (and the directory, where it listens); :meth:`close` ends
    what was not taken."""

    def __init__(self, n: int, *, threads: int = 1, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.threads = threads
        self.directory: str | None = tempfile.mkdtemp(prefix="shardllama-")  # 0700
        self.endpoint = f"ipc://{self.directory}/workers"
        self.procs: list[subprocess.Popen | Forked] = []
        fork = _forkable()
        try:
            for rank in range(n):
                if fork:
                    self.procs.append(_fork(_worker_argv(self.endpoint, rank, threads, connect_timeout), threads))
                else:
                    self.procs.append(spawn(self.endpoint, rank, threads=threads, connect_timeout=connect_timeout))
        except BaseException:
            self.close()
            raise

    def take(self, n: int, threads: int) -> tuple[str, list[subprocess.Popen | Forked]] | None:
        """(the directory, workers 0..n-1) for a coordinator of ``n`` workers with ``threads`` threads each,
        which owns them from now on; None if these do not fit it (it starts its own).  Any others end."""
        if self.directory is None or n > len(self.procs) or threads != self.threads:
            return None
        taken, directory = self.procs[:n], self.directory
        self.procs, self.directory = self.procs[n:], None
        self.close()
        return directory, taken

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> "LocalWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
