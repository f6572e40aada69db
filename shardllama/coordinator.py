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
shared memory (``shm``); remote workers (``endpoint="tcp://HOST:PORT"``) connect by themselves and load
their own slices.  Every receive has a deadline and checks, in short slices, that local workers are still
alive: a dead or silent worker raises :class:`WorkerError` naming it; the next forward (or
``restart_worker``) replaces it, and the KV caches then hold nothing valid (``cache_epoch`` counts that;
continuing a sequence across the replacement raises instead of computing garbage).

Latency: a round costs ~150-250 us on top of the compute (ZeroMQ wakes an I/O thread on each side of each
hop; on a VM every wake of a sleeping CPU is expensive), so when every process has a core of its own, both
sides busy-wait up to ``SPIN_US`` before sleeping.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Callable, Iterable, Mapping

import psutil
import torch
import zmq

from . import allreduce
from . import protocol as P
from .config import ModelArgs
from .errors import UsageError, WorkerError
from .fingerprint import fingerprint
from .model import DTYPES, last_positions
from .quant import activation_dtype
from .sharding import plan
from .shm import Segment, ShardStore, shard_key

log = logging.getLogger(__name__)

POLL_SLICE_MS = 50  # while waiting on workers, check that they are alive this often
PING_S = 1.0  # while waiting on a remote worker, check this often that its connection is still up
SPIN_US = 1000  # busy-wait this long for an answer before sleeping, when every process has a core of its own
STOP_GRACE_S = 3.0  # how long close() lets workers exit before killing them
WHOLE_PASS_ROWS = 512  # tokens (B * T) up to which a pass is a whole pass (reduction buffers' size)

Weights = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


def default_workers(args: ModelArgs | None = None) -> int:
    """One worker per physical core (at most one per attention head)."""
    n = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return min(n, args.n_heads) if args is not None else n


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


class Coordinator:
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
        connect_timeout: float = 120.0,  # seconds for workers to start / connect and build their shards
        threads_per_worker: int = 1,
        endpoint: str = "ipc",  # or "tcp://HOST:PORT": wait for N remote workers there
        spin_us: float | None = None,  # busy-wait before sleeping on a receive; None: SPIN_US if cores allow
        whole_pass: bool | None = None,  # workers reduce among themselves; None: wherever they can
    ):
        self.args = args
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
        if not self.local and not endpoint.startswith("tcp://"):
            raise UsageError(f"endpoint must be 'ipc' or tcp://HOST:PORT, got {endpoint!r}")
        if keep_shards and model_path is None:
            raise UsageError("keeping shards needs the model's path (it names them)")
        self.cache_epoch = 0  # +1 whenever a worker is replaced: every cached sequence is then invalid
        self._lost_slots: set[int] = set()  # slots whose cache a replaced worker no longer holds
        self.store: ShardStore | None = None
        self.embeddings: torch.Tensor | None = None  # (vocab, dim)
        self._workers = [_Worker(r) for r in range(self.n_workers)]
        self._rank_of: dict[bytes, int] = {}
        self._broken: set[int] = set()
        self._step = 0
        self._pass = 0  # whole passes so far: numbers the reductions' tickets (never wraps)
        self._reduce_seg: Segment | None = None  # the workers' reduction segment (local workers)
        self._procs: list[subprocess.Popen] = []  # every process started, for the finalizer
        self._ipc_dir: str | None = None
        self._owned: list = []  # what the finalizer releases: ipc directory, shard store
        self._closed = False
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        # Also runs at interpreter exit if close() was never called.
        self._finalizer = weakref.finalize(self, _release, self._procs, self.ctx, self.sock, self._owned)
        try:
            load = weights.__getitem__ if isinstance(weights, Mapping) else weights
            self._bind(endpoint)
            if self.local:
                key = f"anon{uuid.uuid4().hex[:12]}"  # shards of weights that no file names are never reused
                if model_path is not None:
                    key = shard_key(model_path, self.weight_dtype, self.n_workers)
                files = fingerprint(model_path) if keep_shards else None  # what kept shards must match
                self.store = ShardStore.open(args, self.specs, self.weight_dtype, load, key, keep=keep_shards,
                                             info={"model": str(model_path) if model_path else None}, files=files)
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
        if self._broken:
            self.restart_workers()
        self._check_slots(start, slots)
        self._step = step = (self._step + 1) & 0xFFFFFFFF
        code, dim, n_layers = P.DTYPE_CODES[self.dtype], self.args.dim, self.args.n_layers
        if self.whole_pass and (self.n_workers == 1 or B * T <= WHOLE_PASS_ROWS):
            return self._whole_pass(tokens, start, slots, lengths, all_logits)

        def header(phase: int, layer: int, flags: int = 0, rows: int = T) -> P.Header:
            return P.Header(P.COMPUTE, phase, flags, code, step, layer, B, rows)

        # h always lives in the payload of the next message to send: it is never copied to be sent.
        msg, h = P.tensor_message(header(P.ATTN, 0, P.NEW_STEP), (B, T, dim), self.dtype, start, slots)
        torch.index_select(self.embeddings, 0, tokens.reshape(-1), out=h.view(B * T, dim))  # the embedding
        for i in range(n_layers):
            msg, h = self._reduce(h, self._round(msg, i, P.ATTN), header(P.FFN, i))
            msg, h = self._reduce(h, self._round(msg, i, P.FFN), header(P.ATTN if i + 1 < n_layers else P.HEAD, i + 1))
        if not all_logits:
            last = last_positions(h, lengths)  # (B, dim)
            msg, h = P.tensor_message(header(P.HEAD, n_layers, rows=1), (B, 1, dim), self.dtype)
            h.copy_(last.unsqueeze(1))
        logits = torch.cat(self._round(msg, n_layers, P.HEAD), dim=-1).float()  # (B, T or 1, vocab)
        return logits if all_logits else logits.squeeze(1)

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
            parts = self._round(msg, self.args.n_layers, P.WHOLE)
        except BaseException:
            if self._reduce_seg is not None:  # workers waiting on a failed peer must not wait for the timeout
                allreduce.abort(self._reduce_seg, self._pass)
            raise
        logits = torch.cat(parts, dim=-1).float()  # (B, T or 1, vocab)
        return logits if all_logits else logits.squeeze(1)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Every worker copies the first ``length`` positions of its cache slot ``src`` to ``dst``."""
        self._check_open()
        if self._broken:
            self.restart_workers()
        if length > 0 and src in self._lost_slots:
            raise WorkerError(f"slot {src} was lost when a worker was replaced; start its sequence again")
        self._lost_slots.discard(dst)
        self._step = (self._step + 1) & 0xFFFFFFFF
        body = P.control(P.COPY_SLOT, {"src": int(src), "dst": int(dst), "length": int(length)}, step=self._step)
        for w in self._workers:
            self._send(w, body)
        self._gather(P.ACK)

    def read_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of ``slot``, every KV head: k and v, each (n_layers, length,
        n_kv_heads, head_dim), assembled from the workers' ``kv_heads`` ranges (a head that two workers
        hold is taken once, from the lower rank)."""
        a = self.args
        self._check_slot_io(slot, length)
        if length > 0 and slot in self._lost_slots:
            raise WorkerError(f"slot {slot} was lost when a worker was replaced; start its sequence again")
        k = torch.empty((a.n_layers, length, a.n_kv_heads, a.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        if length == 0:
            return k, v
        self._step = (self._step + 1) & 0xFFFFFFFF
        request = P.slot_request(self._step, slot, length)
        for w in self._workers:
            self._send(w, request)
        covered = 0  # heads [0, covered) are filled
        for rank, h, frame in sorted(self._gather(P.SLOT_DATA, slot, P.SLOT_IO), key=lambda answer: answer[0]):
            heads = self.specs[rank].kv_heads
            assert h.B == len(heads) and h.T == length, (h, heads)
            part_k, part_v = P.read_slot_payload(frame, h, a.n_layers, a.head_dim)  # (n_layers, length, B, hd)
            first = max(covered, heads.start) - heads.start
            k[:, :, heads.start + first : heads.stop] = part_k[:, :, first:]
            v[:, :, heads.start + first : heads.stop] = part_v[:, :, first:]
            covered = max(covered, heads.stop)
        assert covered == a.n_kv_heads, (covered, a.n_kv_heads)
        return k, v

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of ``slot``: each worker gets its ``kv_heads`` of k and v
        (each (n_layers, length, n_kv_heads, head_dim), as :meth:`read_slot` gives them)."""
        a = self.args
        want = (a.n_layers, k.shape[1] if k.dim() == 4 else -1, a.n_kv_heads, a.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KV of shapes {tuple(k.shape)} / {tuple(v.shape)} and dtypes {k.dtype} / {v.dtype} do "
                             f"not fit a slot of (layers, positions, kv heads, head dim) = "
                             f"({a.n_layers}, <= {self.max_seq_len}, {a.n_kv_heads}, {a.head_dim}) {self.dtype}")
        self._check_slot_io(slot, k.shape[1])
        self._step = (self._step + 1) & 0xFFFFFFFF
        for w, spec in zip(self._workers, self.specs):
            heads = slice(spec.kv_heads.start, spec.kv_heads.stop)
            self._send(w, P.slot_message(P.WRITE_SLOT, self._step, slot, k[:, :, heads], v[:, :, heads]).numpy())
        self._gather(P.ACK)
        self._lost_slots.discard(slot)

    def _check_slot_io(self, slot: int, length: int) -> None:
        self._check_open()
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside the cache's {self.n_slots} slots")
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"{length} positions do not fit a slot of {self.max_seq_len}")
        if self._broken:
            self.restart_workers()

    def _check_slots(self, start: torch.Tensor, slots: torch.Tensor) -> None:
        """After a worker was replaced, a sequence must start again at position 0 before it continues."""
        if self._lost_slots:
            for s, p in zip(slots.tolist(), start.tolist()):
                if p > 0 and s in self._lost_slots:
                    raise WorkerError(f"the KV cache of slot {s} was lost when a worker was replaced; "
                                      "start its sequence again from position 0")
            self._lost_slots.difference_update(slots.tolist())

    def close(self) -> None:
        """Stop the workers, close the sockets, remove the ipc files and unlink the shards (unless kept)."""
        if self._closed:
            return
        self._closed = True
        try:
            for w in self._workers:
                if w.ident is not None:
                    try:
                        self.sock.send_multipart([w.ident, P.control(P.STOP)], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                elif w.proc is not None:
                    w.proc.kill()  # still starting: nothing to say goodbye to
            _stop(self._procs, STOP_GRACE_S)
        finally:
            self.embeddings = None  # a view of the shards
            self._finalizer()  # kills what is left, closes the sockets, removes the rest

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
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

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
        self._broken.add(rank)
        self.cache_epoch += 1
        self._lost_slots = set(range(self.n_slots))
        self._admit([rank])
        self._broken.discard(rank)

    def _bind(self, endpoint: str) -> None:
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished worker fails, not drops
        if not self.local:  # drop the connection of a remote host that vanished without closing it
            self.sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
            self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if self.local:
            self._ipc_dir = tempfile.mkdtemp(prefix="shardllama-")  # 0700: only this user reaches the socket
            self._owned.append(self._ipc_dir)
            endpoint = f"ipc://{self._ipc_dir}/workers"
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise UsageError(f"cannot listen on {endpoint}: {e}") from None

    def _spawn(self, rank: int) -> subprocess.Popen:
        env = dict(os.environ)
        # The child imports `workers` and `shardllama` from wherever this process did, never from its current
        # directory (-P: a `workers` folder there must not shadow ours).
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = str(self.threads_per_worker)
        cmd = [sys.executable, "-P", "-m", "workers", "--connect", self.endpoint, "--rank", str(rank),
               "--parent-pid", str(os.getpid()), "--threads", str(self.threads_per_worker),
               "--connect-timeout", str(self.connect_timeout),
               "--log-level", logging.getLevelName(logging.getLogger("shardllama").getEffectiveLevel())]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        self._procs.append(proc)
        return proc

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
        }

    def _admit(self, ranks: Iterable[int]) -> None:
        """Start (local) or wait for (remote) the workers of ``ranks`` and hand each its shard."""
        ranks = list(ranks)
        for r in ranks:
            w = self._workers[r]
            if self.local:
                w.proc = self._spawn(r)
                w.pid = w.proc.pid
        unassigned = list(ranks)
        ready: set[int] = set()
        deadline = _Deadline(self.connect_timeout)
        while len(ready) < len(ranks):
            ident, header, buf = self._recv(deadline, ranks, starting=True)
            if header.kind == P.HELLO:
                hello = P.read_control(buf)
                rank = hello.get("rank")
                if rank is None and not self.local and unassigned:
                    rank = unassigned[0]  # a remote worker takes the next free rank
                if rank not in unassigned or (self.local and hello.get("pid") != self._workers[rank].pid):
                    log.warning("turning away worker pid %s on %s: no rank for it", hello.get("pid"), hello.get("host"))
                    self.sock.send_multipart([ident, P.control(P.STOP)])
                    continue
                unassigned.remove(rank)
                w = self._workers[rank]
                w.ident, w.pid, w.host = ident, hello["pid"], hello["host"]
                self._rank_of[ident] = rank
                self.sock.send_multipart([ident, P.control(P.CONFIG, self._config(rank))])
            elif header.kind in (P.READY, P.ERROR) and self._rank_of.get(ident) in ranks:
                rank = self._rank_of[ident]
                if header.kind == P.ERROR:
                    self._broken.add(rank)
                    raise WorkerError(f"{self._workers[rank].name()} could not build its shard: "
                                      f"{P.read_control(buf)['message']}")
                ready.add(rank)
                log.info("%s ready: %.1f MB", self._workers[rank].name(), P.read_control(buf)["nbytes"] / 1e6)

    # ---- the hot path -----------------------------------------------------------------------------

    def _round(self, msg: torch.Tensor, layer: int, phase: int) -> list[torch.Tensor]:
        """Send one COMPUTE message to every worker; their answers (B, T, width) in rank order."""
        buf = msg.numpy()
        for w in self._workers:
            self._send(w, buf)
        out: list[torch.Tensor] = [None] * self.n_workers  # type: ignore[list-item]
        for rank, h, frame in self._gather(P.RESULT, layer, phase, whole=phase == P.WHOLE):
            width = self.args.dim if phase in (P.ATTN, P.FFN) else len(self.specs[rank].vocab)
            out[rank] = P.read_tensor(frame, h, width)
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

    def _send(self, w: _Worker, buf) -> None:
        try:
            self.sock.send_multipart([w.ident, buf], copy=False)
        except zmq.ZMQError as e:
            raise self._fail(w.rank, f"cannot be reached ({e})") from None

    def _gather(self, kind: int, layer: int = 0, phase: int = 0,
                whole: bool = False) -> list[tuple[int, P.Header, memoryview]]:
        """One answer of ``kind`` to the current step from every worker, as (rank, header, frame buffer).
        Answers to an abandoned step are dropped; a worker's ERROR raises.

        The timeout is per layer: in a whole pass the deadline moves on while the workers publish
        reductions (without a reduction segment, a remote single worker gets a pass's worth of layers)."""
        pending = set(range(self.n_workers))
        answers = []
        if not whole:
            deadline = _Deadline(self.timeout)
        elif self._reduce_seg is not None:
            flags = self._reduce_seg.tensor("flags")[:, 0]
            deadline = _Deadline(self.timeout, progress=lambda: flags.tolist())
        else:
            deadline = _Deadline(self.timeout * (2 * self.args.n_layers + 1))
        while pending:
            ident, h, buf = self._recv(deadline, pending)
            rank = self._rank_of.get(ident)
            if rank not in pending or h.step != self._step:
                continue  # a late answer to a pass given up on
            if h.kind == P.ERROR:
                raise WorkerError(f"{self._workers[rank].name()} failed in layer {h.layer} "
                                  f"({P.PHASE_NAMES.get(h.phase, h.phase)}): {P.read_control(buf)['message']}")
            assert h.kind == kind and h.layer == layer and h.phase == phase, (h, kind, layer, phase)
            pending.discard(rank)
            answers.append((rank, h, buf))
        return answers

    def _recv(
        self, deadline: "_Deadline", waiting: Iterable[int], starting: bool = False
    ) -> tuple[bytes, P.Header, memoryview]:
        """The next message (routing id, header, frame buffer), polling in slices; WorkerError when a worker
        we wait on dies or the deadline passes."""
        if self.spin_s and _spin(self.sock, self.spin_s):
            frames = self.sock.recv_multipart(copy=False)
            if len(frames) == 2 and len(frames[1]) >= P.HEADER_BYTES:
                return frames[0].bytes, P.Header.unpack(frames[1].buffer), frames[1].buffer
        next_ping = time.monotonic() + PING_S
        while True:
            if self._poller.poll(POLL_SLICE_MS):
                frames = self.sock.recv_multipart(copy=False)
                if len(frames) == 2 and len(frames[1]) >= P.HEADER_BYTES:
                    return frames[0].bytes, P.Header.unpack(frames[1].buffer), frames[1].buffer
                continue  # not one of ours
            now = time.monotonic()
            for rank in waiting:
                w = self._workers[rank]
                if w.proc is not None and w.proc.poll() is not None:
                    raise self._fail(rank, f"died ({_exit_reason(w.proc.returncode)})")
                if w.proc is None and w.ident is not None and now > next_ping:
                    try:  # a remote worker whose connection dropped is no longer routable
                        self.sock.send_multipart([w.ident, P.control(P.PING)], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        raise self._fail(rank, "lost its connection") from None
            if now > next_ping:
                next_ping = now + PING_S
            if deadline.passed(now):
                ranks = sorted(waiting, key=deadline.laggard_key)
                if starting:
                    raise WorkerError(f"workers {ranks} did not start within {self.connect_timeout:.0f} s"
                                      + ("" if self.local else f" (nothing connected to {self.endpoint})"))
                raise self._fail(ranks[0], f"did not answer within {self.timeout:.0f} s")

    def _fail(self, rank: int, why: str) -> WorkerError:
        self._broken.add(rank)
        return WorkerError(f"{self._workers[rank].name()} {why}")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the coordinator is closed")


class _Deadline:
    """``seconds`` from now, moved on whenever ``progress()`` (e.g. the workers' published tickets) changes."""

    def __init__(self, seconds: float, progress: Callable[[], list] | None = None):
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.progress = progress
        self.seen = progress() if progress is not None else None

    def passed(self, now: float) -> bool:
        if now <= self.at:
            return False
        if self.progress is not None and (seen := self.progress()) != self.seen:
            self.seen, self.at = seen, now + self.seconds
            return False
        return True

    def laggard_key(self, rank: int) -> tuple:
        """Sorts the worker that fell behind first: the one with the oldest published ticket."""
        return (self.seen[rank] if self.seen is not None else 0, rank)


def _spin(sock: zmq.Socket, seconds: float) -> bool:
    """Busy-wait up to ``seconds`` for a message on ``sock``; True when one is there."""
    end = time.perf_counter() + seconds
    while not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        if time.perf_counter() > end:
            return False
    return True


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """Wait up to ``grace`` seconds for processes to exit, then kill the rest."""
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _release(procs: list[subprocess.Popen], ctx: zmq.Context, sock: zmq.Socket, owned: list) -> None:
    """Last-resort cleanup (also run by close()): no worker process, socket, socket file or shard outlives
    the coordinator."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    sock.close(linger=0)
    ctx.term()
    for thing in owned:
        if isinstance(thing, ShardStore):
            thing.close()
        elif isinstance(thing, Segment):
            thing.close()
            thing.unlink()
        else:
            shutil.rmtree(thing, ignore_errors=True)
