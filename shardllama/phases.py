"""Where the start-up time goes: seconds per named phase, from the command to the first token.

The CLI makes one :class:`Phases` that starts at the process's own start and hands it down (``runtime``,
the coordinator, the shard store), which time their parts with ``with phases("name"):``; a phase entered
again adds up (the weights are read one at a time, between their conversions).  Phases are disjoint
stretches of the coordinator's time, so they add up to no more than the total; worker processes time their
own start (:meth:`Phases.worker_figures`) and the coordinator keeps the slowest worker's figures beside its
own (``details``), since they run alongside it.  ``shardllama -v`` prints them (:meth:`lines`).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator, Mapping


def process_start() -> float:
    """When this process started, on :func:`time.perf_counter`'s clock.

    From the kernel's start time of the process (/proc/self/stat, in clock ticks of 10 ms): it counts from
    the fork that became this command, so the interpreter's own start, ``site`` and every import are in;
    what the shell did before the fork is not.  Where there is no /proc: now."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return time.perf_counter() - max(0.0, age)


class Phases:
    """Seconds per phase, in the order the phases were first entered, counted from ``start``."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.seconds: dict[str, float] = {}
        self.details: dict[str, str] = {}  # phase -> what ran alongside it (the workers' own start-up)

    @classmethod
    def from_process_start(cls) -> "Phases":
        return cls(process_start())

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def until_now(self, name: str) -> None:
        """What no phase holds yet, from ``start`` until now, is phase ``name`` (the interpreter's start and
        the imports, around the phases that were timed)."""
        self.add(name, max(0.0, self.elapsed() - sum(self.seconds.values())))

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self.start

    def lines(self, total: float) -> list[str]:
        """One line per phase and its details, what no phase covers, and the ``total``."""
        width = max([len(n) for n in self.seconds] + [len("total to the first token")])
        out = []
        for name, s in self.seconds.items():
            out.append(f"start-up: {name:<{width}} {s:6.2f} s" + (f"  ({self.details[name]})" if name in self.details else ""))
        out.append(f"start-up: {'other':<{width}} {max(0.0, total - sum(self.seconds.values())):6.2f} s")
        out.append(f"start-up: {'total to the first token':<{width}} {total:6.2f} s")
        return out

    @staticmethod
    def worker_figures(figures: object) -> dict[str, float]:
        """A worker's own start-up figures as it sent them (READY's ``phases``), kept only if they are what
        they should be: a few phase names with seconds (any peer can send anything)."""
        if not isinstance(figures, Mapping) or len(figures) > 16:
            return {}
        return {str(k)[:40]: float(v) for k, v in figures.items()
                if isinstance(k, str) and type(v) in (int, float) and 0 <= v < 1e6}
