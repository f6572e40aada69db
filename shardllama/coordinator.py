"""The tensor-parallel backend: one coordinator process, N worker processes, every layer split across them.

The coordinator owns the token embedding, the residual stream and the sums; the workers own their slices
of the layers, their KV caches and their slices of the output head (see ``sharding``).  Per layer there are
exactly two reductions, both through the coordinator (a star; ``protocol`` has the message layout):

    h = embed(tokens)                                   # coordinator
    for each layer:  h = h + sum_w attention_w(h)       # every worker gets h, returns its partial
                     h = h + sum_w feed_forward_w(h)
    logits = concat_w head_w(last_positions(h))         # vocabulary slices

Every worker is sent the same ``h``, so their residual streams cannot drift apart.

That star costs two round trips per layer.  Where the workers can meet in shared memory (local workers on
x86, or a single worker anywhere), a pass is a *whole pass* instead: the coordinator sends the embedded
tokens once, the workers run every layer and sum their partials among themselves (``allreduce``, in the
same order and precision as the star), and each returns its logits slice: one round trip per token.
Prefills of more rows than the reduction buffers hold take the star (their round trips are noise there).

Local workers (``endpoint="ipc"``) are started here with ``python -m workers`` and map their shards from
shared memory (``shm``); remote workers (``endpoint="tcp://HOST:PORT"``, CurveZMQ unless ``insecure``:
``transport``, ``curve``) connect by themselves and load their own slices.  Every frame a peer sends is
checked before use (``protocol``); one that does not fit drops its peer, never the coordinator.

Workers fail.  Before each request the coordinator replaces those known to be gone without a round trip
(a local process that ended, a remote connection ZeroMQ dropped); while it waits on them, every receive
has a deadline and checks, in short slices, that they are alive (``liveness``): a worker that dies or goes
silent for ``timeout`` raises :class:`WorkerError` naming it, and the next request replaces it.  The KV
caches then hold nothing valid (``cache_epoch`` counts that; continuing a sequence across the replacement
raises instead of computing garbage).  Passes and slot transfers too big for one frame go in pieces
(``chunked``, ``slot_transfer``).

Latency: a round costs ~150-250 us on top of the compute (ZeroMQ wakes an I/O thread on each side of each
hop; on a VM every wake of a sleeping CPU is expensive), so when every process has a core of its own, both
sides busy-wait up to ``SPIN_US`` before sleeping.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import zmq

from . import allreduce, chunked
from . import protocol as P
from .config import ModelArgs
from .errors import UsageError, WorkerError
from .fingerprint import fingerprint
from .kernels import gemm
from .launch import CONNECT_TIMEOUT_S, LocalWorkers, default_workers, spawn
from .liveness import Deadline, exit_reason, stop
from .model import DTYPES, last_positions
from .phases import Phases
from .quant import activation_dtype
from .sharding import plan
from .shm import Segment, ShardStore, shard_key
from .slot_transfer import SlotTransfer
from .transport import Router

log = logging.getLogger(__name__)

POLL_SLICE_MS = 50  # while waiting on workers, check that they are alive this often
PING_S = 1.0  # while waiting on a remote worker, check this often that its connection is still up
SPIN_US = 1000  # busy-wait this long for an answer before sleeping, when every process has a core of its own
STOP_GRACE_S = 3.0  # how long close() lets workers exit before killing them
WHOLE_PASS_ROWS = 512  # tokens (B * T) up to which a pass is a whole pass (reduction buffers' size)

Weights = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


_HOST = os.uname().nodename


@dataclasses.dataclass
class _Worker:
    rank: int
    ident: bytes | None = None  # ZeroMQ routing id of its connection
    pid: int | None = None
    host: str | None = None
    proc: subprocess.Popen | None = None  # local workers only

    def name(self) -> str:
        where = f"pid {self.pid}" if self.host in (None, _HOST) else f"pid {self.pid} on {self.host}"
        return f"worker {self.rank} ({where})"


def _dtype(dtype: torch.dtype | str) -> tuple[torch.dtype, str]:
    names = {v: k for k, v in DTYPES.items()}
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype], dtype
    if dtype not in names:
        raise UsageError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return dtype, names[dtype]


class Coordinator(SlotTransfer):
    """A :class:`~shardllama.backend.Backend` that runs every layer split over ``n_workers`` processes."""

    def __init__(
        self,
        args: ModelArgs,
        weights: Weights,  # full weights in Meta names, or a function name -> full tensor
        n_workers: int | None = None,  # default: one per physical core
        dtype: torch.dtype | str = torch.float32,
        max_seq_len: int | None = None,
        n_slots: int = 1,
        keep_shards: bool = False,  # map this user's kept shards or keep new ones (needs model_path)
        model_path: str | os.PathLike | None = None,  # names the shards of this model file
        timeout: float = 60.0,  # seconds a worker may take for one step of one layer
        connect_timeout: float = CONNECT_TIMEOUT_S,  # seconds for workers to start / connect and build their shards
        threads_per_worker: int = 1,
        endpoint: str = "ipc",  # or "tcp://HOST:PORT": wait for N remote workers there
        spin_us: float | None = None,  # busy-wait before sleeping on a receive; None: SPIN_US if cores allow
        whole_pass: bool | None = None,  # workers reduce among themselves; None: wherever they can
        keys_dir: str | os.PathLike | None = None,  # tcp: CurveZMQ keys and authorized_workers (``curve``)
        insecure: bool = False,  # tcp without CurveZMQ: any peer may connect, nothing is encrypted
        phases: Phases | None = None,  # times the start: shards, workers (``shardllama -v``)
        local_workers: LocalWorkers | None = None,  # ipc: workers started already, taken if they fit
        prefill_precision: str | None = None,  # f32 / bf16 (kernels.gemm); None: the process default
    ):
        self.args = args
        # Resolved here, on this CPU, so local workers (the same CPU) say nothing more about a fallback.
        self.prefill_precision = gemm.resolve(prefill_precision)
        self.weight_dtype, self.dtype_name = _dtype(dtype)
        self.dtype = activation_dtype(self.weight_dtype)  # of h, the messages and the embedding (int8: f32)
        self.n_workers = default_workers(args) if n_workers is None else n_workers
        self.specs = plan(args, self.n_workers)  # UsageError for a bad N
        self.max_seq_len = max_seq_len or args.max_seq_len
        self.n_slots = n_slots
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.threads_per_worker = threads_per_worker
        self.local = endpoint == "ipc"
        if spin_us is None:
            # Waking a sleeping process costs ~50-100 us on a VM, per message, four times a round.  Spinning
            # pays off only when no process waits for a core that a spinning one holds.
            cores = len(os.sched_getaffinity(0))
            spin_us = SPIN_US if self.local and self.n_workers * threads_per_worker + 1 <= cores else 0.0
        self.spin_s = spin_us * 1e-6
        if keep_shards and model_path is None:
            raise UsageError("keeping shards needs the model's path (it names them)")
        self.cache_epoch = 0  # +1 whenever a worker is replaced: every cached sequence is then invalid
        self._lost_slots: set[int] = set()  # slots whose cache a replaced worker no longer holds
        self._lost_why = ""  # which worker was replaced, and why
        self.store: ShardStore | None = None
        self.embeddings: torch.Tensor | None = None  # (vocab, dim)
        self._workers = [_Worker(r) for r in range(self.n_workers)]
        self._rank_of: dict[bytes, int] = {}
        self._broken: dict[int, str] = {}  # rank -> why it failed
        self._step = 0
        self._pass = 0  # whole passes so far: numbers the reductions' tickets (never wraps)
        self._reduce_seg: Segment | None = None  # the workers' reduction segment (local workers)
        self._procs: list[subprocess.Popen] = []  # every process started, for the finalizer
        self._owned: list = []  # what the finalizer releases: the socket, shard store, reduction segment
        self._closed = False
        self.phases = phases if phases is not None else Phases()
        # Also runs at interpreter exit if close() was never called.
        self._finalizer = weakref.finalize(self, _release, self._procs, self._owned)
        try:
            # The largest frame a worker sends is a batch's logits slice (one row per slot); the rest is cut
            # to fit MAX_FRAME (``chunked``, ``slot_transfer``).
            head = P.HEADER_BYTES + n_slots * max(len(s.vocab) for s in self.specs) * self.dtype.itemsize
            started = local_workers.take(self.n_workers, threads_per_worker) if local_workers and self.local else None
            self.router = Router(endpoint, max_frame=max(P.MAX_FRAME, head),
                                 keys_dir=Path(keys_dir) if keys_dir is not None else None, insecure=insecure,
                                 ipc_dir=started[0] if started else None)
            self._owned.append(self.router)
            # Local workers start before the shards are written: they import torch meanwhile.
            self._start(range(self.n_workers), started[1] if started else None)
            load = weights.__getitem__ if isinstance(weights, Mapping) else weights
            if self.local:
                key = f"anon{uuid.uuid4().hex[:12]}"  # shards of weights that no file names are never reused
                if model_path is not None:
                    key = shard_key(model_path, self.weight_dtype, self.n_workers)
                files = fingerprint(model_path) if keep_shards else None  # what kept shards must match
                self.store = ShardStore.open(args, self.specs, self.weight_dtype, load, key, keep=keep_shards,
                                             info={"model": str(model_path) if model_path else None}, files=files,
                                             phases=self.phases)
                self._owned.append(self.store)
                self.embeddings = self.store.embeddings()
                if whole_pass is not False and allreduce.supported():
                    rows = WHOLE_PASS_ROWS if self.n_workers > 1 else 0  # one worker has nothing to add up
                    self._reduce_seg = allreduce.create(key, self.n_workers, rows, args.dim, self.dtype)
                    self._owned.append(self._reduce_seg)
            else:
                self.embeddings = load("tok_embeddings.weight").to(self.dtype)
            if whole_pass is None:
                whole_pass = self.n_workers == 1 or self._reduce_seg is not None
            elif whole_pass and not (self.n_workers == 1 or self._reduce_seg is not None):
                raise UsageError("whole passes need local workers on x86 (or a single worker)")
            self.whole_pass = whole_pass
            self._admit(range(self.n_workers))
        except BaseException:
            self.close()
            raise

    # ---- the Backend interface --------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) long
        start: torch.Tensor,  # (B,) long
        slots: torch.Tensor,  # (B,) long
        lengths: torch.Tensor | None = None,  # (B,) real tokens per right-padded row
        all_logits: bool = False,
    ) -> torch.Tensor:
        """f32 logits of each row's last real token (B, vocab), or of every token (B, T, vocab)."""
        self._check_open()
        B, T = tokens.shape
        start = torch.as_tensor(start, dtype=torch.long).expand(B)
        slots = torch.as_tensor(slots, dtype=torch.long).expand(B)
        if int(start.max()) + T > self.max_seq_len:
            raise ValueError(f"position {int(start.max()) + T - 1} is beyond the context "
                             f"({self.max_seq_len} positions)")
        if int(slots.min()) < 0 or int(slots.max()) >= self.n_slots:
            raise ValueError(f"slots {slots.tolist()} outside the cache's {self.n_slots} slots")
        self._ready()
        width = max(self.args.dim, *(len(s.vocab) for s in self.specs)) if all_logits else self.args.dim
        rows, positions = chunked.piece_shape(B, T, width, self.dtype.itemsize, min(P.MAX_ROWS, self.n_slots))
        if rows < B or positions < T:
            return chunked.forward(self._forward, tokens, start, slots, lengths, all_logits, rows, positions)
        return self._forward(tokens, start, slots, lengths, all_logits)

    def _forward(self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor,
                 lengths: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        B, T = tokens.shape
        self._check_slots(start, slots)
        step = self._next_step()
        code, dim, n_layers = P.DTYPE_CODES[self.dtype], self.args.dim, self.args.n_layers
        if self.whole_pass and (self.n_workers == 1 or B * T <= WHOLE_PASS_ROWS):
            return self._whole_pass(tokens, start, slots, lengths, all_logits)

        def header(phase: int, layer: int, flags: int = 0, rows: int = T) -> P.Header:
            return P.Header(P.COMPUTE, phase, flags, code, step, layer, B, rows)

        # h always lives in the payload of the next message to send: it is never copied to be sent.
        msg, h = P.tensor_message(header(P.ATTN, 0, P.NEW_STEP), (B, T, dim), self.dtype, start, slots)
        torch.index_select(self.embeddings, 0, tokens.reshape(-1), out=h.view(B * T, dim))  # the embedding
        for i in range(n_layers):
            msg, h = self._reduce(h, self._round(msg, i, P.ATTN, B, T), header(P.FFN, i))
            msg, h = self._reduce(h, self._round(msg, i, P.FFN, B, T), header(P.ATTN if i + 1 < n_layers else P.HEAD, i + 1))
        if not all_logits:
            last = last_positions(h, lengths)  # (B, dim)
            msg, h = P.tensor_message(header(P.HEAD, n_layers, rows=1), (B, 1, dim), self.dtype)
            h.copy_(last.unsqueeze(1))
        logits = torch.cat(self._round(msg, n_layers, P.HEAD, B, T if all_logits else 1), dim=-1).float()
        return logits if all_logits else logits.squeeze(1)  # (B, T, vocab) or (B, vocab)

    def _whole_pass(self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor,
                    lengths: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        B, T = tokens.shape
        self._pass += 1
        lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
        flags = P.NEW_STEP | (P.ALL_LOGITS if all_logits else 0)
        header = P.Header(P.COMPUTE, P.WHOLE, flags, P.DTYPE_CODES[self.dtype], self._step, self.args.n_layers, B, T)
        msg, h = P.tensor_message(header, (B, T, self.args.dim), self.dtype, start, slots, lengths, self._pass)
        torch.index_select(self.embeddings, 0, tokens.reshape(-1), out=h.view(B * T, -1))
        try:
            parts = self._round(msg, self.args.n_layers, P.WHOLE, B, T if all_logits else 1)
        except BaseException:
            if self._reduce_seg is not None:  # workers waiting on a failed peer must not wait for the timeout
                allreduce.abort(self._reduce_seg, self._pass)
            raise
        logits = torch.cat(parts, dim=-1).float()  # (B, T or 1, vocab)
        return logits if all_logits else logits.squeeze(1)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Every worker copies the first ``length`` positions of its cache slot ``src`` to ``dst``."""
        self._check_open()
        self._ready()
        if length > 0 and src in self._lost_slots:
            raise WorkerError(f"slot {src} was lost when a worker was replaced; start its sequence again")
        self._lost_slots.discard(dst)
        body = P.control(P.COPY_SLOT, {"src": int(src), "dst": int(dst), "length": int(length)}, step=self._next_step())
        for w in self._workers:
            self._send(w, body)
        self._gather(P.ACK)

    def _check_slots(self, start: torch.Tensor, slots: torch.Tensor) -> None:
        """After a worker was replaced, a sequence must start again at position 0 before it continues."""
        if self._lost_slots:
            for s, p in zip(slots.tolist(), start.tolist()):
                if p > 0 and s in self._lost_slots:
                    raise WorkerError(f"the KV cache of slot {s} was lost when {self._lost_why}; "
                                      "start its sequence again from position 0")
            self._lost_slots.difference_update(slots.tolist())

    def close(self) -> None:
        """Stop the workers, close the socket, remove the ipc files and unlink the shards (unless kept)."""
        if self._closed:
            return
        self._closed = True
        try:
            for w in self._workers:
                if w.ident is not None:
                    try:
                        self.router.send(w.ident, P.control(P.STOP), block=False)
                    except zmq.ZMQError:
                        pass
                elif w.proc is not None:
                    w.proc.kill()  # still starting: nothing to say goodbye to
            stop(self._procs, STOP_GRACE_S)
        finally:
            self.embeddings = None  # a view of the shards
            self._finalizer()  # kills what is left, closes the socket, removes the rest

    def __enter__(self) -> "Coordinator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- workers ----------------------------------------------------------------------------------

    @property
    def pids(self) -> list[int | None]:
        return [w.pid for w in self._workers]

    @property
    def endpoint(self) -> str:
        """Where workers connect (with the port filled in when tcp was given port 0)."""
        return self.router.endpoint

    def _ready(self) -> None:
        """Before a request: replace every worker that failed or is known to be gone -- a local one whose
        process ended (its state: no round trip), a remote one whose connection ZeroMQ dropped (a PING to it
        is refused at once; heartbeats drop the connection of a host that went silent)."""
        for w in self._workers:
            if w.rank in self._broken:
                continue
            if w.proc is not None and w.proc.poll() is not None:
                self._fail(w.rank, f"died ({exit_reason(w.proc.returncode)})")
            elif w.proc is None and w.ident is not None and not self._reachable(w):
                self._fail(w.rank, "lost its connection")
            if w.rank in self._broken:
                log.warning("%s %s while idle; replacing it", w.name(), self._broken[w.rank])
        self.restart_workers()

    def restart_workers(self) -> None:
        """Replace every worker that failed; the KV caches hold nothing valid afterwards."""
        for rank in sorted(self._broken):
            self.restart_worker(rank)

    def restart_worker(self, rank: int) -> None:
        """Replace worker ``rank`` (a local one is killed and started again; a remote one must reconnect)."""
        self._check_open()
        w = self._workers[rank]
        if w.proc is not None and w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()
        self._rank_of.pop(w.ident, None)
        self._workers[rank] = _Worker(rank)
        self._lost_why = f"{w.name()} was replaced ({self._broken.get(rank, 'restarted')})"
        self._broken.setdefault(rank, "restarted")
        self.cache_epoch += 1
        self._lost_slots = set(range(self.n_slots))
        self._admit([rank])
        self._broken.pop(rank, None)

    def _start(self, ranks: Iterable[int], started: list[subprocess.Popen] | None = None) -> None:
        """Start the local workers of ``ranks`` (or take those ``started`` already, one per rank)."""
        if not self.local:
            return
        with self.phases("start worker processes"):
            for i, r in enumerate(ranks):
                w = self._workers[r]
                w.proc = started[i] if started else spawn(self.endpoint, r, threads=self.threads_per_worker,
                                                          connect_timeout=self.connect_timeout)
                w.pid = w.proc.pid
                self._procs.append(w.proc)

    def _config(self, rank: int) -> dict:
        return {
            "rank": rank,
            "n_workers": self.n_workers,
            "args": self.args.to_dict(),
            "dtype": self.dtype_name,
            "max_seq_len": self.max_seq_len,
            "n_slots": self.n_slots,
            "threads": self.threads_per_worker,
            "spin_us": self.spin_s * 1e6,
            "segment": self.store.worker_segment(rank) if self.store is not None else None,
            "reduce": self._reduce_seg.name if self._reduce_seg is not None and self.whole_pass else None,
            "timeout": self.timeout,
            "prefill_precision": self.prefill_precision,
        }

    def _admit(self, ranks: Iterable[int]) -> None:
        """Start (local, unless started already) or wait for (remote) the workers of ``ranks`` and hand each
        its shard.  A peer becomes a worker only with a well-formed HELLO (and, over tcp, an authorized
        CurveZMQ key)."""
        ranks = list(ranks)
        self._start([r for r in ranks if self._workers[r].proc is None])
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
                body = P.read_body(buf, header) if header.kind in (P.HELLO, P.READY, P.ERROR) else None
                if rank is None and header.kind == P.HELLO:
                    self._hello(ident, body, unassigned)
                elif rank in ranks and rank not in ready and header.kind in (P.READY, P.ERROR):
                    if header.kind == P.ERROR:
                        why = f"could not build its shard: {body['message'][:500]}"
                        if self.local:
                            raise self._fail(rank, why)
                        self._give_back(rank, unassigned, why)  # else any peer could end the wait with an ERROR
                        continue
                    ready.add(rank)
                    self._broken.pop(rank, None)
                    log.info("%s ready: %.1f MB", self._workers[rank].name(), body["nbytes"] / 1e6)
                    figures.append(Phases.worker_figures(body.get("phases")))
                elif rank in ranks:
                    raise P.BadFrame(f"{header.name()} while it was being admitted")
            except P.BadFrame as e:
                if rank is None:  # a stranger's bad HELLO: it does not become a worker
                    self._turn_away(ident, str(e))
                    continue
                if self.local:
                    raise self._drop(rank, f"sent a malformed message ({e})") from None
                self._give_back(rank, unassigned, f"sent a malformed message ({e})")
        return figures

    def _give_back(self, rank: int, unassigned: list[int], why: str) -> None:
        """Drop a remote worker that failed its admission; its rank goes to the next worker that connects."""
        self._drop(rank, why)
        unassigned.append(rank)
        self._workers[rank] = _Worker(rank)

    def _hello(self, ident: bytes, hello: dict, unassigned: list[int]) -> None:
        rank = hello["rank"]
        if rank is None and not self.local and unassigned:
            rank = unassigned[0]  # a remote worker takes the next free rank
        if rank not in unassigned or (self.local and hello["pid"] != self._workers[rank].pid):
            self._turn_away(ident, f"no rank for worker pid {hello['pid']} on {hello['host'][:100]}")
            return
        unassigned.remove(rank)
        w = self._workers[rank]
        w.ident, w.pid, w.host = ident, hello["pid"], hello["host"][:100]
        self._rank_of[ident] = rank
        self.router.send(ident, P.control(P.CONFIG, self._config(rank)))

    def _turn_away(self, ident: bytes, why: str) -> None:
        if self.router.first_from(ident):
            log.warning("turning away a peer: %s", why)
        try:
            self.router.send(ident, P.control(P.STOP), block=False)
        except zmq.ZMQError:
            pass

    # ---- the hot path -----------------------------------------------------------------------------

    def _round(self, msg: torch.Tensor, layer: int, phase: int, B: int, T: int) -> list[torch.Tensor]:
        """Send one COMPUTE message to every worker; their answers (B, T, width) in rank order."""
        buf = msg.numpy()
        for w in self._workers:
            self._send(w, buf)

        def width(rank: int) -> int:
            return self.args.dim if phase in (P.ATTN, P.FFN) else len(self.specs[rank].vocab)

        def check(rank: int, h: P.Header, frame) -> None:
            if h.flags:
                raise P.BadFrame(f"RESULT with flags {h.flags}")
            P.check_tensor(frame, h, B, T, width(rank), self.dtype)

        out: list[torch.Tensor] = [None] * self.n_workers  # type: ignore[list-item]
        for rank, h, frame in self._gather(P.RESULT, layer, phase, whole=phase == P.WHOLE, check=check):
            out[rank] = P.read_tensor(frame, h, width(rank))
        return out

    def _reduce(
        self, h: torch.Tensor, parts: list[torch.Tensor], header: P.Header
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h + the sum of the workers' partials, written into the payload of a new message with ``header``.

        The partials are summed in f32 and rounded once, as the reference's single matmul is."""
        msg, out = P.tensor_message(header, tuple(h.shape), h.dtype)
        if len(parts) == 1:
            torch.add(h, parts[0], out=out)
        else:
            acc = parts[0].to(torch.float32, copy=True)
            for p in parts[1:]:
                acc += p
            torch.add(h, acc, out=out)  # computed in f32, rounded to h's dtype
        return msg, out

    def _next_step(self) -> int:
        self._step = (self._step + 1) & 0xFFFFFFFF
        return self._step

    def _send(self, w: _Worker, buf) -> None:
        try:
            self.router.send(w.ident, buf)
        except zmq.ZMQError as e:
            raise self._fail(w.rank, f"cannot be reached ({e})") from None

    def _reachable(self, w: _Worker) -> bool:
        """False when ZeroMQ no longer has a connection to ``w`` (a full queue only means it is slow)."""
        try:
            self.router.send(w.ident, P.control(P.PING), block=False)
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH
        return True

    def _gather(self, kind: int, layer: int = 0, phase: int = 0, whole: bool = False,
                check: Callable[[int, P.Header, memoryview], None] | None = None) -> list[tuple[int, P.Header, memoryview]]:
        """One answer of ``kind`` to the current step from every worker, as (rank, header, frame buffer).
        Answers to an abandoned step are dropped; a worker's ERROR raises; an answer that is not what was
        asked for (``check`` raises BadFrame) drops its worker.

        The timeout is per layer: in a whole pass the deadline moves on while the workers publish
        reductions (without a reduction segment, a remote single worker gets a pass's worth of layers)."""
        pending = set(range(self.n_workers))
        answers = []
        if not whole:
            deadline = Deadline(self.timeout)
        elif self._reduce_seg is not None:
            flags = self._reduce_seg.tensor("flags")[:, 0]
            deadline = Deadline(self.timeout, progress=lambda: flags.tolist())
        else:
            deadline = Deadline(self.timeout * (2 * self.args.n_layers + 1))
        while pending:
            ident, h, buf = self._recv(deadline, pending)
            rank = self._rank_of.get(ident)
            if rank not in pending or h.step != self._step:
                continue  # a late answer to a pass given up on
            try:
                if h.kind == P.ERROR:
                    raise WorkerError(f"{self._workers[rank].name()} failed in layer {h.layer} "
                                      f"({P.PHASE_NAMES.get(h.phase, h.phase)}): {P.read_body(buf, h)['message'][:500]}")
                if (h.kind, h.layer, h.phase) != (kind, layer, phase):
                    raise P.BadFrame(f"{h.name()} for layer {h.layer}, phase {h.phase} instead of "
                                     f"{P.KIND_NAMES[kind]} for layer {layer}, phase {phase}")
                if check is not None:
                    check(rank, h, buf)
            except P.BadFrame as e:
                raise self._drop(rank, f"sent a malformed answer ({e})") from None
            pending.discard(rank)
            answers.append((rank, h, buf))
        return answers

    def _recv(
        self, deadline: Deadline, waiting: Iterable[int], starting: bool = False
    ) -> tuple[bytes, P.Header, memoryview]:
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
                    err = self._drop(rank, f"sent a malformed message ({got.error})")
                    if rank in waiting:
                        raise err
                elif got.header is None:
                    self.router.ignore(got, got.error)
                elif rank is not None or (starting and got.header.kind == P.HELLO):
                    return got.ident, got.header, got.buf
                else:
                    self.router.ignore(got, f"a {got.header.name()} message")
            spin = 0.0
            now = time.monotonic()
            for rank in waiting:
                w = self._workers[rank]
                if w.proc is not None and w.proc.poll() is not None:
                    raise self._fail(rank, f"died ({exit_reason(w.proc.returncode)})")
                if w.proc is None and w.ident is not None and now > next_ping and not self._reachable(w):
                    raise self._fail(rank, "lost its connection")  # a remote worker's connection dropped
            if now > next_ping:
                next_ping = now + PING_S
            if deadline.passed(now):
                ranks = sorted(waiting, key=deadline.laggard_key)
                if starting:
                    raise WorkerError(f"workers {ranks} did not start within {self.connect_timeout:.0f} s"
                                      + ("" if self.local else f" (none connected to {self.endpoint} and built "
                                                               "its shard)"))
                raise self._fail(ranks[0], f"did not answer within {self.timeout:.0f} s")

    def _drop(self, rank: int, why: str) -> WorkerError:
        """Stop listening to worker ``rank`` (told to stop; its later frames are a stranger's)."""
        w = self._workers[rank]
        log.warning("dropping %s: %s", w.name(), why)
        try:
            self.router.send(w.ident, P.control(P.STOP), block=False)
        except zmq.ZMQError:
            pass
        self._rank_of.pop(w.ident, None)
        return self._fail(rank, why)

    def _fail(self, rank: int, why: str) -> WorkerError:
        self._broken[rank] = why
        return WorkerError(f"{self._workers[rank].name()} {why}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the coordinator is closed")


def _release(procs: list[subprocess.Popen], owned: list) -> None:
    """Last-resort cleanup (also run by close()): no worker process, socket, socket file or shard outlives
    the coordinator."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    for thing in owned:
        if isinstance(thing, Segment):
            thing.close()
            thing.unlink()
        else:  # Router, ShardStore
            thing.close()
