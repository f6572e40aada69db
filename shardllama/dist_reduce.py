"""Workers sum their partials through ``torch.distributed``: NCCL between GPUs, gloo between CPU workers.

The GPU counterpart of ``allreduce`` (shared memory, CPU only): in a whole pass each worker runs every
layer and, after each attention and feed-forward, adds every worker's partial to its own residual stream
with one ``all_reduce`` -- on the GPUs themselves (NCCL), never through the coordinator and never through
the host.  The same code runs with gloo on CPU tensors, which is how CI tests it (``--reduce dist``); on
CPUs the shared-memory reduction stays the default (no sockets, no extra threads).

Both sum in f32 and give every rank the same bits (a ring all-reduce reduces each chunk on one rank and
passes the result on), so the workers' residual streams cannot drift apart.  The order of the sum is the
library's, not rank order, so results differ from ``allreduce``'s in the last bits of f32 only.

Rendezvous: the coordinator makes a private directory (0700) and names a fresh ``file://`` store in it for
each generation of workers (a restart replaces them all: a process group cannot take in one new rank), so
no port is chosen, raced for or exposed.  The coordinator removes the directory on close.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

import torch

REDUCES = ("shm", "dist")


def choose(reduce: str | None, gpu: bool, local: bool) -> str:
    """How the workers sum (``shm`` / ``dist``; None: dist on GPUs, else shm); UsageError where it cannot be."""
    from .errors import UsageError

    reduce = reduce or ("dist" if gpu else "shm")
    if reduce not in REDUCES or (reduce == "shm" and gpu):
        raise UsageError(f"reduce {reduce!r}: choose " + ("dist for GPU workers" if gpu else " or ".join(REDUCES)))
    if gpu and not local:
        raise UsageError("GPU workers are local workers (remote workers compute on their CPUs)")
    return reduce


class Group:
    """The coordinator's end: where the workers of each generation meet (:meth:`init_method`)."""

    def __init__(self) -> None:
        self.directory: str | None = tempfile.mkdtemp(prefix="shardllama-dist-")

    def init_method(self, generation: int) -> str:
        assert self.directory is not None, "closed"
        return Path(self.directory, f"store-{generation}").as_uri()

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class DistReduce:
    """One worker's end: ``self(h, part, ticket)`` is h + the sum of every worker's part, as
    ``allreduce.AllReduce``'s; the ticket only numbers the call (the collective keeps the order itself)."""

    def __init__(self, init_method: str, rank: int, n_workers: int, device: torch.device, timeout: float):
        import torch.distributed as dist

        self.dist = dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}  # NCCL binds its communicator to our GPU
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=n_workers,
                                timeout=datetime.timedelta(seconds=timeout), **kw)
        self.group = dist.group.WORLD
        self.n = n_workers
        self.rank = rank

    def __call__(self, h: torch.Tensor, part: torch.Tensor, ticket: int) -> torch.Tensor:
        """h + the sum over workers of their ``part`` (each (B, T, dim)), in h's dtype, summed in f32."""
        acc = part.to(torch.float32, copy=True)  # (B, T, dim)
        if self.n > 1:
            self.dist.all_reduce(acc, op=self.dist.ReduceOp.SUM, group=self.group)
        return torch.add(h, acc).to(h.dtype)

    def give_up(self, pass_no: int) -> None:
        """This worker failed mid-pass: its peers wait in the collective until the group's timeout (the
        coordinator, which times out sooner, replaces the whole group)."""

    def close(self) -> None:
        if self.group is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.group = None
