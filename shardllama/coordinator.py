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

Local workers (``endpoint="ipc"``) map their shards from shared memory (``shm``); remote workers
(``endpoint="tcp://HOST:PORT"``, CurveZMQ unless ``insecure``: ``transport``, ``curve``) connect by
themselves and load their own slices.  Starting, admitting, watching and replacing them is the
``pool``'s job; this module runs the passes over it.  After a replacement the KV caches hold nothing valid
(``cache_epoch`` counts that; continuing a sequence across the replacement raises instead of computing
garbage).  Passes and KV transfers too big for one frame go in pieces (``chunked``, ``block_transfer``).

Each worker's KV cache is a pool of ``n_blocks`` blocks of ``block_size`` positions of its own KV heads; the
caller (the engine) allocates blocks and names each row's blocks in a block table, which travels in the
first COMPUTE of each pass (``tensor_frames.StepBlock``).

Latency: a round costs ~150-250 us on top of the compute (ZeroMQ wakes an I/O thread on each side of each
hop; on a VM every wake of a sleeping CPU is expensive), so when every process has a core of its own, both
sides busy-wait up to ``SPIN_US`` before sleeping.
"""

from __future__ import annotations

import os
import subprocess
import uuid
import weakref
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import allreduce, chunked, devices as dev, dist_reduce
from . import protocol as P
from .block_transfer import BlockTransfer
from .config import ModelArgs
from .errors import UsageError
from .fingerprint import fingerprint
from .kernels import gemm
from .launch import CONNECT_TIMEOUT_S, LocalWorkers, default_workers
from .liveness import Deadline
from .model import DTYPES, last_positions
from .kv_cache import BLOCK_SIZE, blocks_for
from .phases import Phases
from .pool import WorkerPool
from .names import EMBEDDING
from .qblocks import BlockWeight
from .quant import activation_dtype, stored
from .sharding import plan
from .shm import Segment, ShardStore, shard_key
from .tensor_frames import StepBlock, TensorFrame
from .transport import Router

__all__ = ["Coordinator", "default_workers"]

SPIN_US = 1000  # busy-wait this long for an answer before sleeping, when every process has a core of its own
WHOLE_PASS_ROWS = 512  # tokens (B * T) up to which a pass is a whole pass (reduction buffers' size)

Weights = Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor]


def _dtype(dtype: torch.dtype | str) -> tuple[torch.dtype, str]:
    name = dtype if isinstance(dtype, str) else {v: k for k, v in DTYPES.items()}.get(dtype)
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name], name


class Coordinator:
    """A :class:`~shardllama.backend.Backend` that runs every layer split over ``n_workers`` processes."""

    n_workers: int
    n_blocks: int
    block_size: int

    def __init__(
        self,
        args: ModelArgs,
        weights: Weights,  # full weights in Meta names, or a function name -> full tensor
        n_workers: int | None = None,  # default: one per physical core
        dtype: torch.dtype | str = torch.float32,
        max_seq_len: int | None = None,
        n_blocks: int | None = None,  # KV-cache blocks; default: one sequence of max_seq_len
        block_size: int = BLOCK_SIZE,  # positions per block
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
        devices: Sequence[str] | None = None,  # each worker's (``devices``: cpu or cuda:K); None: all cpu
        reduce: str | None = None,  # whole passes sum through "shm" or "dist" (torch.distributed); None: dist on GPUs
        block_types: Mapping[str, int] | None = None,  # weights that come as blocks -> their type (``qblocks``)
    ):
        self.args = args
        # Resolved here, on this CPU, so local workers (the same CPU) say nothing more about a fallback.
        self.prefill_precision = gemm.resolve(prefill_precision)
        self.weight_dtype, self.dtype_name = _dtype(dtype)
        self.dtype = activation_dtype(self.weight_dtype)  # of h, the messages and the embedding (int8: f32)
        self.n_workers = default_workers(args) if n_workers is None else n_workers
        self.specs = plan(args, self.n_workers, self.weight_dtype)  # UsageError for a bad N
        self.devices = dev.check_list(devices, self.n_workers)
        reduce = dist_reduce.choose(reduce, dev.is_gpu(self.devices), endpoint == "ipc")
        self.max_seq_len = max_seq_len or args.max_seq_len
        if block_size < 1:
            raise UsageError(f"KV-cache block size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.n_blocks = blocks_for(self.max_seq_len, block_size) if n_blocks is None else n_blocks
        if self.n_blocks < 1:
            raise UsageError(f"the KV cache needs at least one block, got {self.n_blocks}")
        # Rows of one pass piece: as many as the cache holds sequences of the whole context -- what the engine
        # runs at once at most (it refuses fewer blocks); a bigger batch goes in several pieces.
        self.max_rows = min(P.MAX_ROWS, max(1, self.n_blocks // blocks_for(self.max_seq_len, block_size)))
        self.timeout = timeout
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
        self._epoch_seen = 0  # the pool's epoch that the blocks' ``lost`` accounts for
        self.store: ShardStore | None = None
        self.embeddings: torch.Tensor | None = None  # (vocab, dim)
        self._pass = 0  # whole passes so far: numbers the reductions' tickets (never wraps)
        self._reduce_seg: Segment | None = None  # the workers' reduction segment (local workers)
        self._group: dist_reduce.Group | None = None  # or their torch.distributed rendezvous
        self._procs: list[subprocess.Popen] = []  # every process started, for the finalizer
        self._owned: list = []  # what the finalizer releases: the socket, shard store, reduction segment
        self._closed = False
        self.phases = phases if phases is not None else Phases()
        # Also runs at interpreter exit if close() was never called.
        self._finalizer = weakref.finalize(self, _release, self._procs, self._owned)
        try:
            # The largest frame a worker sends is a piece's logits slice (``max_rows`` rows); the rest is cut
            # to fit MAX_FRAME (``chunked``, ``block_transfer``).
            head = P.HEAD_BYTES + self.max_rows * max(len(s.vocab) for s in self.specs) * self.dtype.itemsize
            started = local_workers.take(self.n_workers, threads_per_worker) if local_workers and self.local else None
            self.router = Router(endpoint, max_frame=max(P.MAX_FRAME, head),
                                 keys_dir=Path(keys_dir) if keys_dir is not None else None, insecure=insecure,
                                 ipc_dir=started[0] if started else None)
            self._owned.append(self.router)
            if reduce == "dist" and self.local and self.n_workers > 1 and whole_pass is not False:
                self._group = dist_reduce.Group()
                self._owned.append(self._group)
            self.pool = WorkerPool(self.router, self.n_workers, self._config, local=self.local, timeout=timeout,
                                   connect_timeout=connect_timeout, threads=threads_per_worker, spin_s=self.spin_s,
                                   phases=self.phases, procs=self._procs, together=self._group is not None)
            self.blocks = BlockTransfer(self.pool, args, self.specs, self.dtype, self.n_blocks, block_size)
            # Local workers start before the shards are written: they import torch meanwhile.
            self.pool.start(range(self.n_workers), started[1] if started else None)
            load = weights.__getitem__ if isinstance(weights, Mapping) else weights
            if isinstance(weights, Mapping) and block_types is None:
                block_types = {n: w.qtype for n, w in weights.items() if isinstance(w, BlockWeight)}
            if self.local:
                key = f"anon{uuid.uuid4().hex[:12]}"  # shards of weights that no file names are never reused
                if model_path is not None:
                    key = shard_key(model_path, self.weight_dtype, self.n_workers)
                files = fingerprint(model_path) if keep_shards else None  # what kept shards must match
                self.store = ShardStore.open(args, self.specs, self.weight_dtype, load, key, keep=keep_shards,
                                             info={"model": str(model_path) if model_path else None}, files=files,
                                             phases=self.phases, block_types=block_types)
                self._owned.append(self.store)
                self.embeddings = self.store.embeddings()
                if whole_pass is not False and self._group is None and allreduce.supported():
                    rows = WHOLE_PASS_ROWS if self.n_workers > 1 else 0  # one worker has nothing to add up
                    self._reduce_seg = allreduce.create(key, self.n_workers, rows, args.dim, self.dtype)
                    self._owned.append(self._reduce_seg)
            else:
                self.embeddings = stored(EMBEDDING, load(EMBEDDING), self.weight_dtype)[EMBEDDING].to(self.dtype)
            reduces = self.n_workers == 1 or self._reduce_seg is not None or self._group is not None
            if whole_pass is None:
                whole_pass = reduces
            elif whole_pass and not reduces:
                raise UsageError("whole passes need local workers on x86 (or a single worker)")
            self.whole_pass = whole_pass
            self.pool.admit(range(self.n_workers))
        except BaseException:
            self.close()
            raise

    def _config(self, rank: int) -> P.WorkerConfig:
        """What worker ``rank`` is told to build (CONFIG)."""
        return P.WorkerConfig(
            rank=rank, n_workers=self.n_workers, args=self.args, dtype=self.dtype_name, max_seq_len=self.max_seq_len,
            n_blocks=self.n_blocks, block_size=self.block_size, threads=self.threads_per_worker,
            spin_us=self.spin_s * 1e6,
            segment=self.store.worker_segment(rank) if self.store is not None else None,
            reduce=self._reduce_seg.name if self._reduce_seg is not None and self.whole_pass else None,
            timeout=self.timeout, prefill_precision=self.prefill_precision, device=self.devices[rank],
            dist=self._group.init_method(self.pool.epoch) if self._group is not None and self.whole_pass else None)

    # ---- the Backend interface --------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) long
        start: torch.Tensor,  # (B,) long
        tables: torch.Tensor,  # (B, W) long: block table of each row
        lengths: torch.Tensor | None = None,  # (B,) real tokens per right-padded row
        all_logits: bool = False,
    ) -> torch.Tensor:
        """f32 logits of each row's last real token (B, vocab), or of every token (B, T, vocab)."""
        self._check_open()
        B, T = tokens.shape
        start = torch.as_tensor(start, dtype=torch.long).expand(B)
        tables = self.blocks.check_pass(start, T, tables, self.max_seq_len)  # (B, blocks the pass reaches)
        self._ready()
        width = max(self.args.dim, *(len(s.vocab) for s in self.specs)) if all_logits else self.args.dim
        max_rows = min(self.max_rows, StepBlock.max_rows(tables.shape[1]))
        rows, positions = chunked.piece_shape(B, T, width, self.dtype.itemsize, max_rows)
        if rows < B or positions < T:
            return chunked.forward(self._forward, tokens, start, tables, lengths, all_logits, rows, positions)
        return self._forward(tokens, start, tables, lengths, all_logits)

    def _forward(self, tokens: torch.Tensor, start: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        B, T = tokens.shape
        self.blocks.check_rows(start, tables, T)
        step = self.pool.next_step()
        dim, n_layers = self.args.dim, self.args.n_layers
        # torch.distributed has no row limit: GPU workers never take the star
        if self.whole_pass and (self.n_workers == 1 or self._group is not None or B * T <= WHOLE_PASS_ROWS):
            return self._whole_pass(tokens, start, tables, lengths, all_logits)

        def compute(phase: P.Phase, layer: int, rows: int = T, block: StepBlock | None = None) -> TensorFrame:
            return TensorFrame(P.Kind.COMPUTE, phase, step, layer, B, rows, self.dtype, block)

        # h always lives in the payload of the next message to send: it is never copied to be sent.
        msg, h = compute(P.Phase.ATTN, 0, block=StepBlock(start, tables)).pack(dim)
        torch.index_select(self.embeddings, 0, tokens.reshape(-1), out=h.view(B * T, dim))  # the embedding
        for i in range(n_layers):
            msg, h = self._reduce(h, self._round(msg, i, P.Phase.ATTN, B, T), compute(P.Phase.FFN, i))
            nxt = compute(P.Phase.ATTN if i + 1 < n_layers else P.Phase.HEAD, i + 1)
            msg, h = self._reduce(h, self._round(msg, i, P.Phase.FFN, B, T), nxt)
        if not all_logits:
            last = last_positions(h, lengths)  # (B, dim)
            msg, h = compute(P.Phase.HEAD, n_layers, rows=1).pack(dim)
            h.copy_(last.unsqueeze(1))
        logits = torch.cat(self._round(msg, n_layers, P.Phase.HEAD, B, T if all_logits else 1), dim=-1).float()
        return logits if all_logits else logits.squeeze(1)  # (B, T, vocab) or (B, vocab)

    def _whole_pass(self, tokens: torch.Tensor, start: torch.Tensor, tables: torch.Tensor,
                    lengths: torch.Tensor | None, all_logits: bool) -> torch.Tensor:
        B, T = tokens.shape
        self._pass += 1
        lengths = torch.full((B,), T, dtype=torch.long) if lengths is None else torch.as_tensor(lengths).long()
        block = StepBlock(start, tables, lengths, self._pass)
        msg, h = TensorFrame(P.Kind.COMPUTE, P.Phase.WHOLE, self.pool.step, self.args.n_layers, B, T, self.dtype,
                             block, all_logits).pack(self.args.dim)
        torch.index_select(self.embeddings, 0, tokens.reshape(-1), out=h.view(B * T, -1))
        try:
            parts = self._round(msg, self.args.n_layers, P.Phase.WHOLE, B, T if all_logits else 1)
        except BaseException:
            if self._reduce_seg is not None:  # workers waiting on a failed peer must not wait for the timeout
                allreduce.abort(self._reduce_seg, self._pass)
            raise
        logits = torch.cat(parts, dim=-1).float()  # (B, T or 1, vocab)
        return logits if all_logits else logits.squeeze(1)

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Every worker copies the first ``length`` positions of its cache block ``src`` to ``dst``."""
        self._check_open()
        self._ready()
        self.blocks.copy(int(src), int(dst), int(length))

    def read_blocks(self, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of the sequence with block table ``table``, every KV head: k and v,
        each (n_layers, length, n_kv_heads, head_dim)."""
        self._check_open()
        t = self.blocks.check_table(table, length)
        self._ready()
        return self.blocks.read(t, length)

    def write_blocks(self, table: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of the sequence with block table ``table``: each worker gets
        its ``kv_heads`` of k and v (each (n_layers, length, n_kv_heads, head_dim), as :meth:`read_blocks`
        gives them)."""
        self._check_open()
        self.blocks.check_kv(k, v)
        t = self.blocks.check_table(table, k.shape[1])
        self._ready()
        self.blocks.write(t, k, v)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one position over all workers (a KV head that two workers hold counts twice)."""
        heads = sum(len(s.kv_heads) for s in self.specs)
        return 2 * self.args.n_layers * heads * self.args.head_dim * self.dtype.itemsize

    def close(self) -> None:
        """Stop the workers, close the socket, remove the ipc files and unlink the shards (unless kept)."""
        if self._closed:
            return
        self._closed = True
        try:
            if hasattr(self, "pool"):
                self.pool.stop()
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
        return self.pool.pids

    @property
    def endpoint(self) -> str:
        """Where workers connect (with the port filled in when tcp was given port 0)."""
        return self.router.endpoint

    @property
    def cache_epoch(self) -> int:
        """+1 whenever a worker is replaced: every cached sequence is then invalid."""
        return self.pool.epoch

    @property
    def recovering(self) -> bool:
        """True while a worker is being replaced (read by the server from another thread)."""
        return self.pool.replacing

    def restart_workers(self) -> None:
        """Replace every worker that failed; the KV caches hold nothing valid afterwards."""
        self._check_open()
        self.pool.replace_failed()
        self._note_replacements()

    def restart_worker(self, rank: int) -> None:
        """Replace worker ``rank`` (a local one is killed and started again; a remote one must reconnect)."""
        self._check_open()
        try:
            self.pool.restart(rank)
        finally:
            self._note_replacements()

    def _ready(self) -> None:
        """Before a request: replace every worker that failed or is known to be gone."""
        try:
            self.pool.replace_failed()
        finally:
            self._note_replacements()

    def _note_replacements(self) -> None:
        """After the pool replaced a worker, no block of the cache holds anything valid."""
        if self.pool.epoch != self._epoch_seen:
            self._epoch_seen = self.pool.epoch
            self.blocks.lose_all(self.pool.replaced_why)

    # ---- the hot path -----------------------------------------------------------------------------

    def _round(self, msg: torch.Tensor, layer: int, phase: P.Phase, B: int, T: int) -> list[torch.Tensor]:
        """Send one COMPUTE message to every worker; their answers (B, T, width) in rank order."""
        self.pool.broadcast(msg.numpy())

        def read(rank: int, h: P.Header, frame) -> torch.Tensor:
            width = self.args.dim if phase in (P.Phase.ATTN, P.Phase.FFN) else len(self.specs[rank].vocab)
            got, payload = TensorFrame.unpack(frame, h, width)
            if (got.phase, got.layer) != (phase, layer):
                raise P.BadFrame(f"RESULT for layer {got.layer}, phase {got.phase.name} instead of layer {layer}, "
                                 f"phase {phase.name}")
            if got.block is not None or got.all_logits:
                raise P.BadFrame(f"RESULT with flags {int(h.flags)}")
            if (got.B, got.T, got.dtype) != (B, T, self.dtype):
                raise P.BadFrame(f"RESULT of {got.B}x{got.T} values of {got.dtype}, not {B}x{T} of {self.dtype}")
            return payload

        out: list[torch.Tensor] = [None] * self.n_workers  # type: ignore[list-item]
        for rank, payload in self.pool.gather(P.Kind.RESULT, read, self._deadline(phase)):
            out[rank] = payload
        return out

    def _deadline(self, phase: P.Phase) -> Deadline:
        """The timeout is per layer: in a whole pass the deadline moves on while the workers publish
        reductions (without a reduction segment, a remote single worker gets a pass's worth of layers)."""
        if phase != P.Phase.WHOLE:
            return Deadline(self.timeout)
        if self._reduce_seg is not None:
            flags = self._reduce_seg.tensor("flags")[:, 0]
            return Deadline(self.timeout, progress=lambda: flags.tolist())
        return Deadline(self.timeout * (2 * self.args.n_layers + 1))

    def _reduce(self, h: torch.Tensor, parts: list[torch.Tensor],
                frame: TensorFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """h + the sum of the workers' partials, written into the payload of a new message ``frame``.

        The partials are summed in f32 and rounded once, as the reference's single matmul is."""
        msg, out = frame.pack(h.shape[-1])
        if len(parts) == 1:
            torch.add(h, parts[0], out=out)
        else:
            acc = parts[0].to(torch.float32, copy=True)
            for p in parts[1:]:
                acc += p
            torch.add(h, acc, out=out)  # computed in f32, rounded to h's dtype
        return msg, out

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
