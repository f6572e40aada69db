"""Workers on one host sum their partials through shared memory, without the coordinator.

The star (``coordinator``) costs two ZeroMQ round trips per layer: 61 per token for a 30-layer model,
each ~0.2-0.8 ms of wake-ups and copies, which is most of a small model's token.  In a *whole pass* the
coordinator sends the embedded tokens once; every worker runs all layers and, after each attention and
feed-forward, adds every worker's partial to its own residual stream through this segment:

    part0 (2 halves x capacity*dim)   part1 ...      one buffer per worker, written only by its owner
    flags (N x 8 int64)                              flags[r, 0]: the last ticket worker r published
    abort (8 int64)                                  abort[0]: a pass that must be given up

A reduction: write my partial into my buffer's half ``ticket & 1``, publish ``flags[me] = ticket``, wait
until every flag is >= ticket, then sum all partials in rank order in f32 and add them to h, so every
worker computes bit for bit the same h (as the star's coordinator did).  Two halves are enough: a worker
can overwrite a half only two reductions later, which needs every other worker to have published the
reduction in between, i.e. to have finished reading this one.  Tickets grow across passes (pass number
<< 16 | reduction index) so a flag left over from an abandoned pass never satisfies a newer one.

x86 keeps stores in program order and loads in program order (TSO), which is all the publish/wait pair
needs: the data stores happen before the flag store, the flag load before the data loads.  On the CPU the
copy, the wait and the sum are C++ (``kernels.decode``: one call to publish, one to wait and add, the same
bits); torch's ops do the same where that library is missing, and for GPU tensors.  Elsewhere
(ARM) the coordinator keeps the star.  The coordinator owns the segment (and unlinks it, also when it is
killed, through the resource tracker); workers map it, and only if it is their user's with mode 0600
(``Segment.attach``): partial sums from anyone else's segment would become the model's output.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, TypeVar

import torch

from .kernels import decode
from .segment import Segment, run_tag, segment_name

TICKET_SHIFT = 16  # reductions per pass: 2 per layer, < 65536
FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so workers never write the same line
CHECK_EVERY = 256  # spins between looks at the clock, the abort word and the parent process
T = TypeVar("T")


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def create(key: str, n_workers: int, capacity: int, dim: int, dtype: torch.dtype) -> Segment:
    """The segment for N workers, room for ``capacity`` rows (B * T) of width ``dim`` per reduction."""
    layout = {f"part{r}": (dtype, (2, capacity * dim)) for r in range(n_workers)}
    layout["flags"] = (torch.int64, (n_workers, FLAG_STRIDE))
    layout["abort"] = (torch.int64, (FLAG_STRIDE,))
    seg = Segment.create(segment_name(key, "reduce", run_tag()), layout,
                         # key and owner: `shardllama shards list/clean` see a live run's segment, not an orphan
                         {"kind": "allreduce", "key": key, "owner_pid": os.getpid(), "kept": False,
                          "n_workers": n_workers, "capacity": capacity})
    seg.mark_ready()
    return seg


def ticket(pass_no: int, index: int) -> int:
    return pass_no << TICKET_SHIFT | index


def abort(seg: Segment, pass_no: int) -> None:
    """Tell every worker still waiting in ``pass_no`` to give it up (the coordinator has)."""
    seg.tensor("abort")[0] = pass_no


class Aborted(Exception):
    pass


class AllReduce:
    """One worker's end of the segment."""

    def __init__(self, seg: Segment, rank: int, timeout: float, parent_pid: int | None):
        self.seg = seg
        self.rank = rank
        self.n = seg.manifest["n_workers"]
        self.capacity = seg.manifest["capacity"]
        self.parts = [seg.tensor(f"part{r}") for r in range(self.n)]  # each (2, capacity * dim)
        self.flags_t = seg.tensor("flags")  # (N, FLAG_STRIDE)
        self.flags = self.flags_t.numpy()
        self.abort = seg.tensor("abort").numpy()
        self.timeout = timeout
        self.parent_pid = parent_pid
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (half, numel): every worker's buffer, sliced

    def __call__(self, h: torch.Tensor, part: torch.Tensor, tkt: int) -> torch.Tensor:
        """h + the sum over workers of their ``part`` (each (B, T, dim)), in h's dtype, summed in f32."""
        if self.n == 1:  # nothing to add up; the ticket still tells the coordinator how far this pass got
            self.flags[0, 0] = tkt
            return h + part
        n, half = part.numel(), tkt & 1
        lib = decode.library()
        if lib is not None and h.is_cpu and part.is_cpu:
            # One C++ call to publish, one per CHECK_EVERY looks to wait and sum: the same bits as below.
            parts = self._views.get((half, n)) or self._views.setdefault((half, n), [p[half, :n] for p in self.parts])
            lib.publish(part.contiguous(), parts[self.rank], self.flags_t, self.rank, tkt)
            h = h.contiguous()
            return self._wait(lambda: lib.gather(h, parts, self.flags_t, tkt, CHECK_EVERY), tkt)
        self.parts[self.rank][half, :n].copy_(part.reshape(-1))
        self.flags[self.rank, 0] = tkt  # publish: after the data, TSO keeps the order
        self._wait(lambda: self._look(tkt), tkt)
        acc = self.parts[0][half, :n].to(torch.float32, copy=True)
        for r in range(1, self.n):
            acc += self.parts[r][half, :n]
        return torch.add(h, acc.view(h.shape)).to(h.dtype)

    def _look(self, tkt: int) -> bool | None:
        """True once every worker has published ``tkt``; None after CHECK_EVERY looks."""
        flags = self.flags
        for _ in range(CHECK_EVERY):
            if all(flags[r, 0] >= tkt for r in range(self.n)):
                return True
            os.sched_yield()  # a no-op with a core to spare; lets a peer run when cores are short
        return None

    def _wait(self, attempt: Callable[[], T | None], tkt: int) -> T:
        """What ``attempt`` returns once it is not None, checking between attempts that the pass goes on."""
        pass_no, deadline = tkt >> TICKET_SHIFT, None
        while (done := attempt()) is None:
            if self.abort[0] == pass_no:
                raise Aborted(f"pass {pass_no} was given up")
            now = time.monotonic()
            deadline = deadline or now + self.timeout
            if now > deadline:
                late = [r for r in range(self.n) if self.flags[r, 0] < tkt]
                raise TimeoutError(f"worker {late[0] if late else '?'} sent no partial sum within {self.timeout:.0f} s")
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                raise Aborted("the coordinator is gone")
        return done

    def give_up(self, pass_no: int) -> None:
        """This worker failed in ``pass_no``: its peers must not wait for it."""
        self.abort[0] = pass_no
