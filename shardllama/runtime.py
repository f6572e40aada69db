"""Open a model for generation: checkpoint + tokenizer + backend, the one place the CLI and the server
turn flags into a running engine."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import torch

from .backend import Backend, LocalBackend
from .config import ModelArgs
from .errors import UsageError
from .loading import open_checkpoint, load_weights
from .model import DTYPES
from .quant import source_dtype
from .tokenizer import Tokenizer, load_tokenizer

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


def resolve_dtype(name: str, native: torch.dtype) -> torch.dtype:
    """``auto`` keeps the checkpoint's own precision (dequantized GGUF types become f32); ``int8`` is
    quantized at load time (shardllama.quant), whatever the checkpoint holds."""
    if name == "auto":
        return native if native in DTYPES.values() else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}") from None


def open_model(
    model_path: str | Path | None,
    *,
    param_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: str = "auto",
    max_seq_len: int = 1024,
    n_slots: int = 1,
    workers: int | None = None,
    keep_shards: bool = False,
    listen: str | None = None,
    worker_timeout: float = 60.0,
    threads_per_worker: int = 1,
    progress: bool = False,
) -> Model:
    """Load a model and start its backend.

    ``workers`` N >= 1 runs the tensor-parallel engine on N worker processes (default: one per physical
    core); 0 runs the single-process reference model.  ``listen`` (tcp://HOST:PORT) waits for N remote
    workers (``shardllama worker --connect``) instead of starting local ones.
    """
    if model_path is None:
        from .demo import demo_model_path

        model_path = demo_model_path(progress=progress)
    if max_seq_len < 1:
        raise UsageError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    with open_checkpoint(model_path, param_path) as ckpt:
        tok_path = tokenizer_path if tokenizer_path is not None else ckpt.tokenizer_path
        if tok_path is None:
            raise UsageError(f"{model_path}: no tokenizer found beside the model; pass --tokenizer-path")
        tokenizer = load_tokenizer(tok_path, gguf_fields=ckpt.gguf_fields if tokenizer_path is None else None)
        torch_dtype = resolve_dtype(dtype, ckpt.native_dtype)
        args = ckpt.args
        if workers == 0:
            weights = load_weights(ckpt, torch_dtype, progress=progress)
            backend: Backend = LocalBackend(args, weights, max_seq_len=max_seq_len, n_slots=n_slots)
        else:
            from .coordinator import Coordinator

            # Shards are written one weight at a time straight from the (memory-mapped) checkpoint.
            load = _progress_loader(ckpt, source_dtype(torch_dtype), progress)  # int8: floats, quantized there
            backend = Coordinator(
                args, load, n_workers=workers, dtype=torch_dtype, max_seq_len=max_seq_len, n_slots=n_slots,
                keep_shards=keep_shards, model_path=model_path, timeout=worker_timeout,
                threads_per_worker=threads_per_worker, endpoint=listen or "ipc",
            )
    return Model(args=args, tokenizer=tokenizer, backend=backend, path=Path(model_path), dtype=torch_dtype)


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
