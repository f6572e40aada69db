"""Open a model for generation: checkpoint + tokenizer + backend, the one place the CLI and the server
turn flags into a running engine."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

import psutil
import torch

from .backend import Backend, LocalBackend
from .config import ModelArgs
from .errors import ModelFileError, UsageError
from .loading import Checkpoint, open_checkpoint, load_weights
from .model import DTYPES, expected_shapes
from .kv_cache import BLOCK_SIZE
from .phases import Phases
from . import qblocks
from .quant import INT8, activation_dtype, source_dtype
from .tokenizer import Tokenizer
from .tokenizer_files import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Model:
    args: ModelArgs
    tokenizer: Tokenizer
    backend: Backend
    path: Path
    dtype: torch.dtype

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype, n_workers: int = 0) -> int:
    """KV-cache memory of one position over all processes: keys and values of every layer.  With workers,
    a KV head shared by two workers' query groups is held by both (``sharding``); an int8 model keeps its
    cache in f32.  Known from the checkpoint's header, so the server sizes its cache before loading."""
    kv_heads = args.n_kv_heads
    if n_workers:
        from .sharding import plan

        kv_heads = sum(len(spec.kv_heads) for spec in plan(args, n_workers, dtype))
    return 2 * args.n_layers * kv_heads * args.head_dim * activation_dtype(dtype).itemsize


DEFAULT_CONTEXT = 4096  # --max-seq-len when not given: the model's trained context, at most this


def resolve_dtype(name: str, native: torch.dtype, quant_types: Sequence[str] = (),
                  args: ModelArgs | None = None) -> torch.dtype:
    """``auto`` keeps a float checkpoint's own precision and a quantized one's blocks (GGUF Q4_K, Q8_0...:
    ``gguf``, computed in place, shardllama.qblocks) where this CPU runs the block kernels; where it does not
    (no AVX-512: torch's dequantize-then-multiply is all there is, ~10x slower) :func:`widened_dtype` of
    ``args``.  ``int8``, ``q8`` and ``q4`` are quantized at load time (shardllama.quant, shardllama.qblocks),
    whatever the checkpoint holds."""
    if name == "auto":
        if quant_types:
            return qblocks.GGUF if qblocks.kernel.why_not_here() is None else widened_dtype(args)
        return native if native in DTYPES.values() else torch.float32
    if name == "gguf" and not quant_types:
        raise UsageError("--dtype gguf keeps a GGUF file's quantized blocks, and this model holds none; "
                         "--dtype q8 or q4 quantizes it")
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}") from None


WIDEN_SHARE = 0.6  # of the memory available now, at most, that a quantized model widened to f16 may take


def f16_bytes(args: ModelArgs) -> int:
    """The model's weights in f16."""
    return 2 * sum(math.prod(shape) for shape in expected_shapes(args).values())


def widened_dtype(args: ModelArgs | None) -> torch.dtype:
    """What ``auto`` makes of a quantized model where the block kernels cannot run: f16, whose numbers are the
    file's nearly exactly (the demo's greedy text is llama.cpp's; int8 rows change it from the first words),
    unless f16 would take more than WIDEN_SHARE of the memory available; int8 (half that) then, and where even
    int8 would, the blocks as they are (slow, but at the file's size)."""
    if args is None:
        return torch.float16
    room = WIDEN_SHARE * psutil.virtual_memory().available
    return torch.float16 if f16_bytes(args) <= room else INT8 if f16_bytes(args) // 2 <= room else qblocks.GGUF


@dataclasses.dataclass
class Prepared:
    """A checkpoint opened from its headers, its tokenizer loaded and the flags checked against them: what
    :func:`start` needs, before a single weight is read.  Prompt checks belong here (``tokenizer``,
    ``max_seq_len``), so a bad prompt costs no load."""

    checkpoint: Checkpoint
    tokenizer: Tokenizer
    dtype: torch.dtype
    max_seq_len: int
    path: Path
    notes: list[str]  # what was chosen for the user (dtype, context): the CLI says them unless -q

    @property
    def args(self) -> ModelArgs:
        return self.checkpoint.args

    def kv_bytes_per_token(self, n_workers: int = 0) -> int:
        """What the backend :func:`start` makes will hold per KV-cache position (:func:`kv_bytes_per_token`)."""
        return kv_bytes_per_token(self.args, self.dtype, n_workers)

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def prepare(
    model_path: str | Path | None,
    *,
    param_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: str = "auto",
    max_seq_len: int | None = None,
    rope_override: Mapping[str, float] | None = None,
    progress: bool = False,
) -> Prepared:
    """Open the checkpoint's headers and its tokenizer, resolve ``dtype`` and ``max_seq_len`` (None: the
    trained context, at most :data:`DEFAULT_CONTEXT`) and check that tokenizer and model fit together."""
    if model_path is None:
        from .demo import demo_model_path

        model_path = demo_model_path(progress=progress)
    if max_seq_len is not None and max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    ckpt = open_checkpoint(model_path, param_path, rope_override=rope_override)
    try:
        tok_path = tokenizer_path if tokenizer_path is not None else ckpt.tokenizer_path
        if tok_path is None:
            raise ModelFileError(f"{model_path}: no tokenizer found beside the model (tokenizer.model or "
                                 "tokenizer.json); pass --tokenizer-path")
        tokenizer = load_tokenizer(tok_path, gguf_fields=ckpt.gguf_fields if tokenizer_path is None else None)
        args = ckpt.args
        if tokenizer.vocab_size > args.vocab_size:
            raise ModelFileError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                                 f"{model_path} has only {args.vocab_size} embedding rows; they do not belong together")
        notes = []
        torch_dtype = resolve_dtype(dtype, ckpt.native_dtype, ckpt.quant_types, ckpt.args)
        why = qblocks.kernel.why_not_here() if dtype == "auto" and ckpt.quant_types else None
        if why is not None:
            size = f"{f16_bytes(args) / 1e9:.1f} GB"
            what = {torch.float16: f"widened to f16 ({size})",
                    INT8: f"converted to int8 rows (f16 would take {size}, too much of the memory available)"}
            notes.append(f"{Path(model_path).name}: {'/'.join(ckpt.quant_types)} weights "
                         + what.get(torch_dtype, f"kept as blocks and dequantized as they are used, ~10x slower "
                                                 f"(f16 would take {size}, int8 half that: too much of the memory "
                                                 "available)")
                         + f": {why} (pass --dtype gguf, int8 or f16 to choose)")
        elif dtype == "auto" and ckpt.quant_types:
            own = [q for q in ckpt.quant_types if qblocks.has_kernel(q)]
            other = [q for q in ckpt.quant_types if q not in own]
            notes.append(f"{Path(model_path).name}: {'/'.join(own) or 'no'} weights computed as stored"
                         + (f", {'/'.join(other)} requantized to Q8_0" if other else "")
                         + " (--dtype int8, f16 or f32 converts them instead)")
        trained = args.max_seq_len
        if max_seq_len is None:
            max_seq_len = min(trained, DEFAULT_CONTEXT)
        elif max_seq_len > trained:
            notes.append(f"--max-seq-len {max_seq_len} is beyond the {trained} tokens the model was trained on"
                         + ("" if args.rope_scaling else " (and it has no rope scaling)")
                         + ": expect worse text past that")
        return Prepared(ckpt, tokenizer, torch_dtype, max_seq_len, Path(model_path), notes)
    except BaseException:
        ckpt.close()
        raise


def start(
    prepared: Prepared,
    *,
    n_blocks: int | None = None,
    workers: int | None = None,
    keep_shards: bool = False,
    listen: str | None = None,
    worker_timeout: float = 60.0,
    threads_per_worker: int = 1,
    progress: bool = False,
    keys_dir: str | Path | None = None,
    insecure: bool = False,
    phases: Phases | None = None,
    local_workers=None,
    prefill_precision: str | None = None,
    devices: Sequence[str] | None = None,  # one per worker (``shardllama.devices``); None: all cpu
    reduce: str | None = None,  # how workers sum: shm / dist (``dist_reduce``); None: the devices' default
) -> Model:
    """Load the weights of a prepared checkpoint and start its backend (closes the checkpoint).

    ``n_blocks`` KV-cache blocks of ``kv_cache.BLOCK_SIZE`` positions (default: what one sequence of the
    context's length needs, and one more for a cached prefix's partial block: the CLI's and interactive
    mode's); memory is taken as blocks fill, not up front.
    ``workers`` N >= 1 runs the tensor-parallel engine on N worker processes (default: one per physical
    core); 0 runs the single-process reference model.  ``listen`` (tcp://HOST:PORT) waits for N remote
    workers (``shardllama worker --connect``) instead of starting local ones, authenticated by the CurveZMQ
    keys in ``keys_dir`` (``shardllama.curve``) unless ``insecure``.  ``phases`` times the load;
    ``local_workers`` (a :class:`~shardllama.launch.LocalWorkers`) are workers started already.
    ``prefill_precision`` (``f32`` / ``bf16``; None: ``SHARDLLAMA_PREFILL_PRECISION``, else f32) is that of
    the products over many rows, in the reference model or in every worker (``shardllama.kernels.gemm``).
    """
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    p = prepared
    phases = phases if phases is not None else Phases()
    if n_blocks is None:
        n_blocks = -(-p.max_seq_len // BLOCK_SIZE) + 1
    with p.checkpoint as ckpt:
        if workers == 0:
            with phases("read and convert weights"):
                weights = load_weights(ckpt, p.dtype, progress=progress)
            backend: Backend = LocalBackend(p.args, weights, max_seq_len=p.max_seq_len, n_blocks=n_blocks,
                                            prefill_precision=prefill_precision)
        else:
            from .coordinator import Coordinator

            # Shards are written one weight at a time straight from the (memory-mapped) checkpoint.
            load = _progress_loader(ckpt, source_dtype(p.dtype), progress)  # int8: floats, quantized there
            block_types = ckpt.block_types() if p.dtype == qblocks.GGUF else None  # gguf: what comes as blocks
            backend = Coordinator(
                p.args, load, n_workers=workers, dtype=p.dtype, max_seq_len=p.max_seq_len, n_blocks=n_blocks,
                keep_shards=keep_shards, model_path=p.path, timeout=worker_timeout,
                threads_per_worker=threads_per_worker, endpoint=listen or "ipc", keys_dir=keys_dir,
                insecure=insecure, phases=phases, local_workers=local_workers, prefill_precision=prefill_precision,
                devices=devices, reduce=reduce, block_types=block_types,
            )
    return Model(args=p.args, tokenizer=p.tokenizer, backend=backend, path=p.path, dtype=p.dtype)


def open_model(
    model_path: str | Path | None,
    *,
    param_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: str = "auto",
    max_seq_len: int | None = None,
    progress: bool = False,
    **start_kw,
) -> Model:
    """:func:`prepare` then :func:`start`: a running model in one call (tests, benchmarks)."""
    return start(prepare(model_path, param_path=param_path, tokenizer_path=tokenizer_path, dtype=dtype,
                         max_seq_len=max_seq_len, progress=progress), progress=progress, **start_kw)


def _progress_loader(ckpt, dtype: torch.dtype, progress: bool):
    """``name -> tensor`` from the checkpoint, ticking a progress bar (stderr) per weight."""
    if not progress:
        return lambda name: ckpt.load(name, dtype)
    from tqdm import tqdm

    bar = tqdm(total=len(ckpt.names()), desc="writing shards", unit="tensor", file=sys.stderr, leave=False)

    def load(name: str) -> torch.Tensor:
        bar.update(1)
        if bar.n >= bar.total:
            bar.close()
        return ckpt.load(name, dtype)

    return load


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to open and run a model: the model and worker flags (``flags.add_model_args``), built once at the
    command line's edge; nothing below it sees argparse."""

    model_path: Path | None = None  # None: the demo model
    param_path: Path | None = None
    tokenizer_path: Path | None = None
    dtype: str = "auto"
    max_seq_len: int | None = None
    rope_override: Mapping[str, float] | None = None
    prefill_precision: str | None = None
    max_threads: int | None = None
    workers: int | None = None  # None: one per physical core; 0: the reference model in this process
    keep_shards: bool = False
    listen: str | None = None
    worker_timeout: float = 60.0
    keys_dir: Path | None = None
    insecure: bool = False
    quiet: bool = False  # the notes of prepare() are not said
    devices: tuple[str, ...] | None = None  # each worker's (``devices.resolve``); None: all on the CPU
    reduce: str | None = None  # shm / dist (``dist_reduce``); None: the devices' default

    def prepare(self, *, progress: bool = False) -> Prepared:
        return prepare(self.model_path, param_path=self.param_path, tokenizer_path=self.tokenizer_path,
                       dtype=self.dtype, max_seq_len=self.max_seq_len, rope_override=self.rope_override,
                       progress=progress)

    @property
    def threads_per_worker(self) -> int:
        if not self.max_threads or self.workers == 0:
            return 1
        from .launch import default_workers

        return max(1, self.max_threads // (self.workers or default_workers()))

    def early_workers(self, phases: Phases | None = None):
        """The local workers, started now (forked: ``launch``) so that they are ready while this process
        reads the model's header and writes the shards: a context manager giving a LocalWorkers, or None for
        ``workers`` 0 and ``listen``."""
        if self.workers == 0 or self.listen or self.devices:  # GPU workers: spawned, never forked (``devices``)
            return contextlib.nullcontext()
        from .launch import LocalWorkers, default_workers

        with (phases if phases is not None else Phases())("start worker processes"):
            return LocalWorkers(self.workers or default_workers(), threads=self.threads_per_worker)

    def start(self, prepared: Prepared, *, n_blocks: int | None = None, progress: bool = False,
              phases: Phases | None = None, local_workers=None) -> Model:
        """:func:`start` with these settings (``local_workers``: what :meth:`early_workers` gave)."""
        from .kernels import gemm
        from .sharding import check_workers

        if self.workers:
            check_workers(prepared.args, self.workers)  # a usage error, before the notes and the load
        prefill = gemm.resolve(self.prefill_precision)  # a bad $SHARDLLAMA_PREFILL_PRECISION too, before the load
        if not self.quiet:
            for note in prepared.notes:
                log.warning("%s", note)
        if self.workers == 0:
            if self.max_threads:
                torch.set_num_threads(self.max_threads)  # the reference model computes in this process
        else:
            # The coordinator's own work (converting the weights, embedding rows, sums) on one thread: the cores
            # are the workers'.  With two threads on a VM whose other core was busy, every small op waited for the
            # second thread to be scheduled: loading the demo model took 20 s instead of 1 s.
            torch.set_num_threads(1)
        return start(prepared, n_blocks=n_blocks, workers=self.workers, keep_shards=self.keep_shards,
                     listen=self.listen, worker_timeout=self.worker_timeout,
                     threads_per_worker=self.threads_per_worker, progress=progress, keys_dir=self.keys_dir,
                     insecure=self.insecure, phases=phases, local_workers=local_workers, prefill_precision=prefill,
                     devices=self.devices, reduce=self.reduce)

    def open(self, *, progress: bool = False) -> Model:
        """prepare, then start with the default KV cache (interactive mode, chat)."""
        with self.early_workers() as local_workers, self.prepare(progress=progress) as prepared:
            return self.start(prepared, progress=progress, local_workers=local_workers)
