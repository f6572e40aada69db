"""The coordinator's workers: starting them, admitting them, talking to them, noticing when they fail and
replacing them.

Local workers (``endpoint="ipc"``) are started here with ``python -m workers`` (or taken from
``launch.LocalWorkers``, started before the coordinator existed); remote workers connect by themselves.
Either becomes a worker only through the handshake: a well-formed HELLO (over tcp, from an authorized
CurveZMQ key: ``transport``) is answered with its :class:`~shardllama.protocol.WorkerConfig`, and READY
says its shard is built.  Every frame a peer sends is checked before use (``protocol``); one that does not
fit drops its peer, never the coordinator.

Workers fail.  Before each request the pool replaces those known to be gone without a round trip (a local
process that ended, a remote connection ZeroMQ dropped); while it waits on them, every receive has a
deadline and checks, in short slices, that they are alive (``liveness``): a worker that dies or goes silent
for ``timeout`` raises :class:`WorkerError` naming it, and the next request replaces it.  ``epoch`` counts
replacements: the KV caches hold nothing valid after one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from typing import Any, Callable, Iterable, TypeVar

import zmq

from . import protocol as P
from .errors import WorkerError
from .launch import Forked, spawn
from .liveness import Deadline, exit_reason, stop
from .phases import Phases
from .transport import Router

log = logging.getLogger(__name__)

POLL_SLICE_MS = 50  # while waiting on workers, check that they are alive this often
PING_S = 1.0  # while waiting on a remote worker, check this often that its connection is still up
STOP_GRACE_S = 3.0  # how long close() lets workers exit before killing them

_HOST = os.uname().nodename
Answer = TypeVar("Answer")


@dataclasses.dataclass
class Member:
    """One rank of the pool and what is known of the worker that holds it."""

    rank: int
    ident: bytes | None = None  # ZeroMQ routing id of its connection
    pid: int | None = None
    host: str | None = None
    proc: subprocess.Popen | Forked | None = None  # local workers only

    def name(self) -> str:
        where = f"pid {self.pid}" if self.host in (None, _HOST) else f"pid {self.pid} on {self.host}"
        return f"worker {self.rank} ({where})"


class WorkerPool:
    """``n_workers`` workers behind ``router``; ``config(rank)`` is what each is told to build.  The owner
    (the coordinator) releases the processes (``procs``) and the router; :meth:`stop` says goodbye first."""

    def __init__(self, router: Router, n_workers: int, config: Callable[[int], P.WorkerConfig], *, local: bool,
                 timeout: float, connect_timeout: float, threads: int, spin_s: float, phases: Phases,
                 procs: list, together: bool = False):
        self.router = router
        self.n_workers = n_workers
        self.config = config
        self.local = local
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.threads = threads
        self.spin_s = spin_s
        self.phases = phases
        self.procs = procs  # every process started, for the owner's finalizer
        # Workers in one torch.distributed group (``dist_reduce``): a group cannot take in a single new rank,
        # so one failure replaces them all, as a new generation (``epoch``) meeting at a new rendezvous.
        self.together = together
        self.members = [Member(r) for r in range(n_workers)]
        self.epoch = 0  # +1 whenever a worker is replaced
        self.replaced_why = ""  # which worker was replaced last, and why
        self.step = 0  # the current request's step id: answers to any other are late
        self._rank_of: dict[bytes, int] = {}
        self._broken: dict[int, str] = {}  # rank -> why it failed
        self.replacing = False  # while restart() runs (the server's /health reads it from another thread)

    @property
    def pids(self) -> list[int | None]:
        return [w.pid for w in self.members]

    def next_step(self) -> int:
        self.step = (self.step + 1) & 0xFFFFFFFF
        return self.step

    # ---- start and admission ---------------------------------------------------------------------

    def start(self, ranks: Iterable[int], started: list | None = None) -> None:
        """Start the local workers of ``ranks`` (or take those ``started`` already, one per rank)."""
        if not self.local:
            return
        with self.phases("start worker processes"):
            for i, r in enumerate(ranks):
                w = self.members[r]
                w.proc = started[i] if started else spawn(self.router.endpoint, r, threads=self.threads,
                                                          connect_timeout=self.connect_timeout)
                w.pid = w.proc.pid
                self.procs.append(w.proc)

    def admit(self, ranks: Iterable[int]) -> None:
        """Start (local, unless started already) or wait for (remote) the workers of ``ranks`` and hand each
        its shard."""
        ranks = list(ranks)
        self.start([r for r in ranks if self.members[r].proc is None])
        with self.phases("workers ready"):
            figures = self._wait_ready(ranks)
        slowest = max(figures, key=lambda f: sum(f.values()), default=None)
        if slowest:  # they ran alongside the coordinator: beside its phases, not among them
            self.phases.details["workers ready"] = "slowest worker's own: " + ", ".join(
                f"{name} {s:.2f} s" for name, s in slowest.items())

    def _wait_ready(self, ranks: list[int]) -> list[dict[str, float]]:
        """Admit the workers of ``ranks``; each one's own start-up figures (READY's ``phases``)."""
        figures = []
        unassigned = list(ranks)
        ready: set[int] = set()
        deadline = Deadline(self.connect_timeout)
        while len(ready) < len(ranks):
            ident, header, buf = self._recv(deadline, ranks, starting=True)
            rank = self._rank_of.get(ident)
            try:
                if rank is None and header.kind == P.Kind.HELLO:
                    self._hello(ident, P.Hello.unpack(buf, header), unassigned)
                elif rank in ranks and rank not in ready and header.kind == P.Kind.ERROR:
                    why = f"could not build its shard: {P.Error.unpack(buf, header).message[:500]}"
                    if self.local:
                        raise self.fail(rank, why)
                    self._give_back(rank, unassigned, why)  # else any peer could end the wait with an ERROR
                elif rank in ranks and rank not in ready and header.kind == P.Kind.READY:
                    body = P.Ready.unpack(buf, header)
                    ready.add(rank)
                    self._broken.pop(rank, None)
                    log.info("%s ready: %.1f MB", self.members[rank].name(), body.nbytes / 1e6)
                    figures.append(body.phases)
                elif rank in ranks:
                    raise P.BadFrame(f"{header.kind.name} while it was being admitted")
            except P.BadFrame as e:
                if rank is None:  # a stranger's bad HELLO: it does not become a worker
                    self._turn_away(ident, str(e))
                    continue
                if self.local:
                    raise self.drop(rank, f"sent a malformed message ({e})") from None
                self._give_back(rank, unassigned, f"sent a malformed message ({e})")
        return figures

    def _give_back(self, rank: int, unassigned: list[int], why: str) -> None:
        """Drop a remote worker that failed its admission; its rank goes to the next worker that connects."""
        self.drop(rank, why)
        unassigned.append(rank)
        self.members[rank] = Member(rank)

    def _hello(self, ident: bytes, hello: P.Hello, unassigned: list[int]) -> None:
        rank = hello.rank
        if rank is None and not self.local and unassigned:
            rank = unassigned[0]  # a remote worker takes the next free rank
        if rank not in unassigned or (self.local and hello.pid != self.members[rank].pid):
            self._turn_away(ident, f"no rank for worker pid {hello.pid} on {hello.host[:100]}")
            return
        unassigned.remove(rank)
        w = self.members[rank]
        w.ident, w.pid, w.host = ident, hello.pid, hello.host[:100]
        self._rank_of[ident] = rank
        self.router.send(ident, self.config(rank).pack())

    def _turn_away(self, ident: bytes, why: str) -> None:
        if self.router.first_from(ident):
            log.warning("turning away a peer: %s", why)
        try:
            self.router.send(ident, P.Signal(P.Kind.STOP).pack(), block=False)
        except zmq.ZMQError:
            pass

    # ---- liveness and replacement ----------------------------------------------------------------

    def replace_failed(self) -> None:
        """Before a request: replace every worker that failed or is known to be gone -- a local one whose
        process ended (its state: no round trip), a remote one whose connection ZeroMQ dropped (a PING to it
        is refused at once; heartbeats drop the connection of a host that went silent)."""
        for w in self.members:
            if w.rank in self._broken:
                continue
            if w.proc is not None and w.proc.poll() is not None:
                self.fail(w.rank, f"died ({exit_reason(w.proc.returncode)})")
            elif w.proc is None and w.ident is not None and not self._reachable(w):
                self.fail(w.rank, "lost its connection")
            if w.rank in self._broken:
                log.warning("%s %s while idle; replacing it", w.name(), self._broken[w.rank])
        for rank in sorted(self._broken):
            if rank in self._broken:  # (a restart of the whole group replaced the rest too)
                self.restart(rank)

    def restart(self, rank: int) -> None:
        """Replace worker ``rank`` (a local one is killed and started again; a remote one must reconnect)."""
        if self.together:
            return self._restart_all(rank)
        w = self.members[rank]
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        self._rank_of.pop(w.ident, None)
        self.members[rank] = Member(rank)
        self.replaced_why = f"{w.name()} was replaced ({self._broken.get(rank, 'restarted')})"
        self._broken.setdefault(rank, "restarted")
        self.epoch += 1
        self.replacing = True
        try:
            self.admit([rank])
        finally:
            self.replacing = False
        self._broken.pop(rank, None)

    def _restart_all(self, rank: int) -> None:
        why = self._broken.get(rank, "restarted")
        self.replaced_why = f"{self.members[rank].name()} was replaced, and its group with it ({why})"
        for w in self.members:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
            self._rank_of.pop(w.ident, None)
            self._broken.setdefault(w.rank, why)
        self.members = [Member(r) for r in range(self.n_workers)]
        self.epoch += 1
        self.admit(range(self.n_workers))
        self._broken.clear()

    def _reachable(self, w: Member) -> bool:
        """False when ZeroMQ no longer has a connection to ``w`` (a full queue only means it is slow)."""
        try:
            self.router.send(w.ident, P.Signal(P.Kind.PING).pack(), block=False)
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH
        return True

    def drop(self, rank: int, why: str) -> WorkerError:
        """Stop listening to worker ``rank`` (told to stop; its later frames are a stranger's)."""
        w = self.members[rank]
        log.warning("dropping %s: %s", w.name(), why)
        try:
            self.router.send(w.ident, P.Signal(P.Kind.STOP).pack(), block=False)
        except zmq.ZMQError:
            pass
        self._rank_of.pop(w.ident, None)
        return self.fail(rank, why)

    def fail(self, rank: int, why: str) -> WorkerError:
        """Mark worker ``rank`` failed (replaced before the next request); the error to raise."""
        self._broken[rank] = why
        return WorkerError(f"{self.members[rank].name()} {why}")

    def stop(self) -> None:
        """Tell every worker to exit (one still starting is killed) and wait a little for them."""
        for w in self.members:
            if w.ident is not None:
                try:
                    self.router.send(w.ident, P.Signal(P.Kind.STOP).pack(), block=False)
                except zmq.ZMQError:
                    pass
            elif w.proc is not None:
                w.proc.kill()  # still starting: nothing to say goodbye to
        stop(self.procs, STOP_GRACE_S)

    # ---- requests and answers --------------------------------------------------------------------

    def broadcast(self, buf: Any) -> None:
        """One frame to every worker."""
        for w in self.members:
            self.send(w.rank, buf)

    def send(self, rank: int, buf: Any) -> None:
        try:
            self.router.send(self.members[rank].ident, buf)
        except zmq.ZMQError as e:
            raise self.fail(rank, f"cannot be reached ({e})") from None

    def gather(self, kind: P.Kind, read: Callable[[int, P.Header, memoryview], Answer],
               deadline: Deadline | None = None) -> list[tuple[int, Answer]]:
        """One answer of ``kind`` to the current step from every worker, as (rank, ``read(rank, header,
        frame)``) in the order they came.  Answers to an abandoned step are dropped; a worker's ERROR raises;
        an answer that is not what was asked for (``read`` raises BadFrame) drops its worker.  ``deadline``:
        by default ``timeout`` from now."""
        pending = set(range(self.n_workers))
        answers = []
        deadline = deadline or Deadline(self.timeout)
        while pending:
            ident, h, buf = self._recv(deadline, pending)
            rank = self._rank_of.get(ident)
            if rank not in pending or h.step != self.step:
                continue  # a late answer to a pass given up on
            try:
                if h.kind == P.Kind.ERROR:
                    error = P.Error.unpack(buf, h)
                    raise WorkerError(f"{self.members[rank].name()} failed {error.where()}: {error.message[:500]}")
                if h.kind != kind:
                    raise P.BadFrame(f"{h.kind.name} instead of {kind.name}")
                answer = read(rank, h, buf)
            except P.BadFrame as e:
                raise self.drop(rank, f"sent a malformed answer ({e})") from None
            pending.discard(rank)
            answers.append((rank, answer))
        return answers

    def _recv(self, deadline: Deadline, waiting: Iterable[int],
              starting: bool = False) -> tuple[bytes, P.Header, memoryview]:
        """The next frame from a worker (or, while ``starting``, a HELLO from anyone), polling in slices; a
        frame that is not this protocol's drops its peer.  WorkerError when a worker we wait on dies, sends
        such a frame, or the deadline passes."""
        spin = self.spin_s
        next_ping = time.monotonic() + PING_S
        while True:
            if (spin and self.router.spin(spin)) or self.router.wait(POLL_SLICE_MS):
                got = self.router.recv()
                rank = self._rank_of.get(got.ident)
                if got.header is None and rank is not None:
                    err = self.drop(rank, f"sent a malformed message ({got.error})")
                    if rank in waiting:
                        raise err
                elif got.header is None:
                    self.router.ignore(got, got.error)
                elif rank is not None or (starting and got.header.kind == P.Kind.HELLO):
                    return got.ident, got.header, got.buf
                else:
                    self.router.ignore(got, f"a {got.header.kind.name} message")
            spin = 0.0
            now = time.monotonic()
            for rank in waiting:
                w = self.members[rank]
                if w.proc is not None and w.proc.poll() is not None:
                    raise self.fail(rank, f"died ({exit_reason(w.proc.returncode)})")
                if w.proc is None and w.ident is not None and now > next_ping and not self._reachable(w):
                    raise self.fail(rank, "lost its connection")  # a remote worker's connection dropped
            if now > next_ping:
                next_ping = now + PING_S
            if deadline.passed(now):
                ranks = sorted(waiting, key=deadline.laggard_key)
                if starting:
                    raise WorkerError(f"workers {ranks} did not start within {self.connect_timeout:.0f} s"
                                      + ("" if self.local else f" (none connected to {self.router.endpoint} and "
                                                               "built its shard)"))
                raise self.fail(ranks[0], f"did not answer within {self.timeout:.0f} s")
