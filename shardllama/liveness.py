"""How the coordinator tells a slow worker from a dead or silent one.

A worker is *dead* when its process ended (local workers: the process state, no message needed) or its
connection is gone (remote workers: ZeroMQ drops a connection that closed, or whose heartbeats stopped,
and a message to it is then refused at once).  It is *silent* when it sends nothing for ``timeout``
seconds while the coordinator waits on it: :class:`Deadline` measures that from the last sign of progress.
In a whole pass the workers publish a ticket after every reduction (``allreduce``); only the slowest
worker's ticket counts as progress -- the others are waiting on it -- so a stopped worker is named one
``timeout`` after it stopped, not one after its peers' last ticket.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Callable


class Deadline:
    """``seconds`` from now, moved on whenever the least of ``progress()`` (the workers' tickets) grows.
    Call :meth:`passed` often (every poll slice): progress is noticed when it is looked at."""

    def __init__(self, seconds: float, progress: Callable[[], list[int]] | None = None):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.progress = progress
        self.seen = progress() if progress is not None else None

    def passed(self, now: float) -> bool:
        if self.progress is not None:
            seen = self.progress()
            if min(seen) != min(self.seen):
                self.at = now + self.seconds
            self.seen = seen
        return now > self.at

    def laggard_key(self, rank: int) -> tuple:
        """Sorts the worker that fell behind first: the one with the oldest published ticket."""
        return (self.seen[rank] if self.seen is not None else 0, rank)


def exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """Wait up to ``grace`` seconds for processes to exit, then kill the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
