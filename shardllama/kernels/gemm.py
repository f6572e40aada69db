"""Prefill matrix products (many rows of x) with f16 or f32 weights, through oneDNN, at a chosen precision.

**f32** (the default): exact.  torch's own f16 ``F.linear`` on a CPU without native f16 arithmetic runs at
~30 GFLOP/s a core, and its f32 one goes through MKL at ~90 here.  oneDNN's f32 GEMM
(``mkldnn._linear_pointwise``, the op inductor uses) runs at about twice MKL's rate, so an f16 weight is
widened to f32 in a scratch buffer that lives as long as the thread (one copy at memory speed, no
allocation per call) and multiplied there: the exact f16 weights with f32 activations and f32 sums, more
precise than f16 activations (llama.cpp) or bf16 ones.

**bf16**: activations and weights rounded to bf16 (the weights into a bf16 scratch buffer, through an f32
chunk that stays in cache: twice as fast as torch's direct f16 -> bf16 copy), products summed in f32 by
oneDNN's bf16 GEMM, the result rounded to bf16 once and returned in x's dtype.  For CPUs whose matrix
units multiply bf16 (AMX-BF16) or whose vector units do it faster than f32 (AVX-512 BF16 on AMD Zen 4/5).
On Intel without AMX it is *slower* than f32: ``vdpbf16ps`` issues on one port where f32 FMAs issue on
two, so it does the same multiply-adds per cycle, and the weights must first be reordered into pairs.
Measured on a 2-core Sapphire/Emerald Rapids VM whose AMX is hidden (AVX-512 BF16 only), one thread, 128
rows of 7B shard shapes, oneDNN 3.12 (``tools/bench_prefill.py``): the bare f32 product 70-109 GFLOP/s, the
bf16 one 49-72; this module's f16-weight path 73-79 at f32, 49-57 at bf16.

Where the CPU has neither AVX-512 BF16 nor AMX-BF16 (oneDNN would emulate bf16), a bf16 request falls
back to f32 with one note on stderr (:func:`resolve`).

Which precision a product uses: :func:`using` sets it for the calling thread (the reference model and a
worker's shard wrap each pass in it); outside, the process default, which ``SHARDLLAMA_PREFILL_PRECISION``
(``f32`` / ``bf16``) decides on first use, or :func:`set_default` from code, as ``SHARDLLAMA_KERNELS``
does for the matrix-vector kernel.  A bf16 model (weights and activations already bf16) goes to torch's
own bf16 product whatever the setting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import UsageError
from . import build

log = logging.getLogger("shardllama.kernels")

MIN_ROWS = 9  # fewer rows are a decode step: the matrix-vector kernel (or torch) streams the weights once
PRECISIONS = ("f32", "bf16")
ENV = "SHARDLLAMA_PREFILL_PRECISION"
_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
_CHUNK_BYTES = 1 << 20  # f16 -> f32 -> bf16 a block of rows at a time, the f32 block in L2

_thread = threading.local()  # .precision: this thread's (``using``); .f32 / .bf16: scratch buffers
_available: bool | None = None
_bf16: bool | None = None
_default: str | None = None  # None until first use: then the environment decides
_noted = False  # the fallback note is said once per process


def available() -> bool:
    """Whether this torch has oneDNN's linear op (checked once, on a tiny product)."""
    global _available
    if _available is None:
        try:
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            _available = bool(torch.equal(_onednn(x, w), F.linear(x, w)))
        except Exception:  # no oneDNN in this build, or the op changed: torch's F.linear stays
            _available = False
    return _available


def bf16_supported() -> bool:
    """Whether bf16 prefill runs natively here: the CPU multiplies bf16 (``avx512_bf16`` or ``amx_bf16`` in
    /proc/cpuinfo) and this torch's oneDNN takes bf16 (checked once)."""
    global _bf16
    if _bf16 is None:
        _bf16 = bool(build.cpu_flags(("avx512_bf16", "amx_bf16"))) and available()
        if _bf16:
            try:
                x, w = torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(4, 3, dtype=torch.bfloat16)
                _bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() and bool(torch.equal(_onednn(x, w), x @ w.T))
            except Exception:
                _bf16 = False
    return _bf16


def check(name: str, source: str = "--prefill-precision") -> str:
    """``name`` if it is a precision, else a UsageError naming ``source`` (the flag or variable it came from)."""
    if name not in PRECISIONS:
        raise UsageError(f"{source} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def set_default(name: str | None) -> None:
    """The precision of products outside :func:`using`, from now on in this process; None: as the
    environment says (read again on next use)."""
    global _default
    _default = None if name is None else check(name)


def default() -> str:
    """The process default, as requested (``SHARDLLAMA_PREFILL_PRECISION``, read on first use; f32 if unset)."""
    global _default
    if _default is None:
        _default = check(os.environ.get(ENV, "f32").strip().lower() or "f32", ENV)
    return _default


def resolve(name: str | None) -> str:
    """The precision that a request for ``name`` (None: the process default) runs at: bf16 only where
    :func:`bf16_supported`, else f32, saying so on stderr once per process."""
    global _noted
    name = default() if name is None else check(name)
    if name == "bf16" and not bf16_supported():
        if not _noted:
            _noted = True
            log.warning("bf16 prefill needs a CPU with AVX-512 BF16 or AMX-BF16 (and oneDNN); this one has "
                        "neither, so prompts are computed in f32")
        return "f32"
    return name


def precision() -> str:
    """The precision of prefill products in this thread now."""
    return getattr(_thread, "precision", None) or resolve(None)


@contextlib.contextmanager
def using(name: str | None) -> Iterator[str]:
    """Prefill products in this thread at ``resolve(name)`` within the block (nested blocks restore)."""
    before = getattr(_thread, "precision", None)
    _thread.precision = resolve(name)
    try:
        yield _thread.precision
    finally:
        _thread.precision = before


def _onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (
        w.dtype in (torch.float16, torch.float32)
        and x.dtype == w.dtype
        and w.dim() == 2
        and min(w.shape) > 0  # a worker with no FFN units of a tiny model: torch handles empty products
        and x.numel() >= MIN_ROWS * w.shape[1]
        and x.device.type == "cpu"
        and not (x.requires_grad or w.requires_grad)
        and available()
    )


def _scratch(dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """This thread's buffer of ``dtype`` viewed as ``shape`` (grown to the largest weight seen, never shrunk)."""
    key, n = str(dtype).removeprefix("torch."), shape.numel()
    buf = getattr(_thread, key, None)
    if buf is None or buf.numel() < n:
        with torch.inference_mode(False):  # a normal tensor can be written in and out of inference mode
            buf = torch.empty(n, dtype=dtype)
        setattr(_thread, key, buf)
    return buf[:n].view(shape)


def _as(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` in ``dtype``: itself if it already is (and contiguous), else a copy in the scratch buffer."""
    if w.dtype == dtype and w.is_contiguous():
        return w
    out = _scratch(dtype, w.shape)
    if w.dtype != torch.float16 or dtype != torch.bfloat16:
        return out.copy_(w)
    rows = max(1, _CHUNK_BYTES // (4 * w.shape[1]))  # f16 -> bf16 through f32 blocks that stay in cache
    block = torch.empty(rows, w.shape[1], dtype=torch.float32)
    for i in range(0, w.shape[0], rows):
        part = block[: min(rows, w.shape[0] - i)]
        out[i : i + rows].copy_(part.copy_(w[i : i + rows]))
    return out


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for (..., K) x and an f16/f32 (N, K) w, in x's dtype, computed at :func:`precision`
    (f32: f32 inputs and sums; bf16: inputs rounded to bf16, f32 sums, the result rounded to bf16)."""
    dtype = _DTYPES[precision()]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()  # (rows, K)
    return _onednn(x2, _as(w, dtype)).to(x.dtype).view(*x.shape[:-1], w.shape[0])


def release() -> None:
    """Free this thread's scratch buffers."""
    _thread.float32 = _thread.bfloat16 = None
