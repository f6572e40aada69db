"""Products with GGUF quantized weights computed on the file's own blocks (``blocks.cpp``).

A quantized matrix W (N rows, K columns) is a uint8 tensor ``blocks`` of shape (N, K // bs, ts): bs weights in
ts bytes per block, in ggml's native layout (``ggml-common.h``; the layouts are spelled out in ``blocks.cpp``),
unit stride along the last two dims and any row stride, so a worker's row slice or block-column cut
(``blocks.narrow(1, b0, nb)``) of a shared-memory tensor is used where it lies.  Memory is the file's bytes, and
dequantization is exact: :func:`dequantize` returns what ``gguf.quants.dequantize`` does, bit for bit.

:func:`linear` computes ``x @ W.T`` with f32 x and f32 sums: up to ``MAX_ROWS`` rows of x (a decode step) by a
matrix-vector kernel that decodes each block into AVX-512 registers and multiplies it into every row of x;
more rows (a prompt) by dequantizing tiles of ``TILE_ROWS`` rows and multiplying them with
``shardllama.kernels.gemm`` (at the prefill precision in force) or ``F.linear``, so a prompt never widens a
whole matrix at once.  Where the library is missing (disabled, no compiler, no AVX-512) the same results come
from :func:`reference_linear`, the dequantize-then-``F.linear`` oracle.  On a CPU with AVX-512 BF16 the
library's bf16-pair kernel (x as two bf16 parts, 16 significant bits) is timed against the f32 one once per
process and used for decode steps of up to ``PAIRS_UP_TO`` rows where it is clearly faster (:func:`_pairs_faster`);
``SHARDLLAMA_BLOCKS_KERNEL=f32`` or ``bf16-pairs`` (read on first use) pins the choice, as the tests do.

:func:`quantize` makes Q8_0 / Q4_0 blocks from float weights (``--dtype q8`` / ``q4``), bit-exact with
``gguf.quants.quantize`` (in C++, or vectorized torch without the library).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import build

log = logging.getLogger("shardllama.kernels")

Q = GGMLQuantizationType
SUPPORTED: dict[GGMLQuantizationType, tuple[int, int]] = {
    t: GGML_QUANT_SIZES[t] for t in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL)
}
MAX_ROWS = 8  # rows of x up to which the matrix-vector kernel runs; more go through dequantized tiles
TILE_ROWS = 128  # weight rows dequantized at a time for a prompt (128 x 11008 f32: 5.6 MB of scratch)

_library: ModuleType | bool | None = None  # None: not tried yet; False: unavailable (said once)


def library() -> ModuleType | None:
    """The compiled block kernels (built on first use), or None when kernels are disabled
    (``shardllama.kernels.enable`` / ``SHARDLLAMA_KERNELS``) or unavailable here."""
    from . import loaded_once

    return loaded_once(sys.modules[__name__], _load, "blocks")


def _load() -> ModuleType | bool:
    try:
        lib = build.load(build.BLOCKS)
    except build.Unsupported as e:
        log.info("quantized-block kernels not used: %s", e)
        return False
    except Exception as e:  # a failed build must never stop the program: torch computes the same
        log.warning("quantized-block kernels unavailable, dequantizing in torch (slower): %s", e)
        return False
    if not lib.has_avx512():
        log.info("quantized-block kernels not used: the CPU lacks AVX-512 (F, BW, VL, DQ)")
        return False
    choice = os.environ.get("SHARDLLAMA_BLOCKS_KERNEL", "auto").strip().lower()
    if choice not in ("auto", "f32", "bf16-pairs"):
        log.warning("SHARDLLAMA_BLOCKS_KERNEL=%s is not auto, f32 or bf16-pairs; using auto", choice)
        choice = "auto"
    if lib.has_bf16() and (choice == "bf16-pairs" or choice == "auto" and _pairs_faster(lib)):
        lib.set_pairs_up_to(PAIRS_UP_TO)
    return lib


AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")  # what the library's kernels need (has_avx512)


def why_not_here() -> str | None:
    """None where block products here run in the library; else why they would fall to torch's
    dequantize-then-multiply (~10x slower a decode step).  Judged without building the library: enabled, not
    found unavailable already, an x86-64 CPU with the AVX-512 it needs.  ``--dtype auto`` keeps a GGUF's blocks
    only where this is None."""
    from . import enabled

    if not enabled("blocks"):
        return "the quantized-block kernels are turned off (SHARDLLAMA_KERNELS)"
    if _library is False:
        return "the quantized-block kernels could not be loaded (see the warning)"
    if _library is None and (platform.machine().lower() not in ("x86_64", "amd64")
                             or len(build.cpu_flags(AVX512)) < len(AVX512)):
        return "the kernels that compute on a GGUF's own blocks need AVX-512, which this CPU lacks"
    return None


def runs_here() -> bool:
    """Whether block products here run in the library (:func:`why_not_here` has nothing to say)."""
    return why_not_here() is None


PAIRS_UP_TO = 2  # rows of x up to which the bf16-pair kernel may be chosen
PAIRS_MARGIN = 1.25  # ... where it is at least this much faster than the f32 kernel


def _pairs_faster(lib: ModuleType) -> bool:
    """Whether the bf16-pair kernel (vdpbf16ps) beats the f32 one here by PAIRS_MARGIN, timed on a Q4_K matrix
    that stays in cache (a few ms, once per process).  vdpbf16ps runs at a quarter of the FMA rate on the
    Intel kind of this project and is native on AMD Zen 4/5; the margin keeps a noisy machine from flipping."""
    import time

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (256, 8, 144), dtype=torch.uint8, generator=g)
    blocks[:, :, :4] = (torch.rand(256, 8, 2, generator=g) * 0.01).half().view(torch.uint8)
    x = torch.randn(1, 8 * 256, generator=g)
    best = {}
    for variant in (0, 2, 0, 2):
        t0 = time.perf_counter()
        for _ in range(5):
            lib.matvec(x, blocks, int(Q.Q4_K), variant)
        best[variant] = min(best.get(variant, float("inf")), time.perf_counter() - t0)
    log.debug("quantized-block kernels: f32 %.3f ms, bf16 pairs %.3f ms", best[0] * 200, best[2] * 200)
    return best[2] * PAIRS_MARGIN < best[0]


def _check(blocks: torch.Tensor, qtype: int) -> tuple[int, int]:
    """(bs, ts) of ``qtype`` after checking that ``blocks`` is laid out as the module says."""
    try:
        bs, ts = SUPPORTED[Q(qtype)]
    except (ValueError, KeyError):
        raise ValueError(f"quantized blocks: type {qtype} is not one of "
                         f"{', '.join(t.name for t in SUPPORTED)}") from None
    if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[2] != ts:
        raise ValueError(f"quantized blocks: {Q(qtype).name} wants uint8 (N, K/{bs}, {ts}), got "
                         f"{blocks.dtype} {tuple(blocks.shape)}")
    if blocks.shape[1] > 1 and blocks.stride(1) != ts or blocks.stride(2) != 1:
        raise ValueError(f"quantized blocks: the blocks of a row must be contiguous, got strides {blocks.stride()}")
    return bs, ts


def torch_dequantize(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """:func:`dequantize` without the library: ``shardllama.loading.gguf_dequant`` (torch or gguf's numpy)."""
    bs, ts = _check(blocks, qtype)
    N, nb, _ = blocks.shape
    raw = blocks.contiguous().view(N, nb * ts).numpy()
    from ..loading import gguf_dequant  # here: the loaders import shardllama.qblocks, which imports this module

    return gguf_dequant.dequantize(raw, Q(qtype)).reshape(N, nb * bs)


def dequantize(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """(N, nb, ts) uint8 blocks -> (N, nb * bs) f32 weights, bit-exact with ``gguf.quants.dequantize``."""
    _check(blocks, qtype)
    lib = library()
    if lib is None:
        return torch_dequantize(blocks, qtype)
    return lib.dequantize(blocks, int(qtype))


def reference_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """``F.linear(x, W)`` with W dequantized in torch (the oracle, and the path without the library)."""
    w = torch_dequantize(blocks, qtype)
    return F.linear(x.float(), w).to(x.dtype)


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from . import gemm

    return gemm.linear(x, w) if gemm.applies(x, w) else F.linear(x, w)


def linear(x: torch.Tensor, blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """``x @ W.T`` for (..., K) x: (..., N) in x's dtype, computed in f32 (x widened to f32, f32 sums)."""
    bs, _ = _check(blocks, qtype)
    N, nb, _ = blocks.shape
    if x.shape[-1] != nb * bs:
        raise ValueError(f"quantized linear: x has {x.shape[-1]} columns, the weight {nb * bs}")
    lib = library()
    if lib is None or x.device.type != "cpu" or x.requires_grad:
        lib = None
        if N <= TILE_ROWS:
            return reference_linear(x, blocks, qtype)
    xf = x.float()
    rows = xf.numel() // max(1, x.shape[-1])
    if lib is not None and rows <= MAX_ROWS:
        return lib.matvec(xf, blocks, int(qtype)).to(x.dtype)
    # a prompt (or any product without the library): TILE_ROWS weight rows dequantized at a time
    x2 = xf.reshape(rows, -1)
    y = torch.empty(rows, N, dtype=torch.float32)
    scratch = torch.empty(min(N, TILE_ROWS), nb * bs, dtype=torch.float32) if lib is not None else None
    for i in range(0, N, TILE_ROWS):
        n = min(TILE_ROWS, N - i)
        if lib is not None:
            w = lib.dequantize(blocks[i:i + n], int(qtype), scratch[:n])
        else:
            w = torch_dequantize(blocks[i:i + n], qtype)
        y[:, i:i + n] = _gemm(x2, w)
    return y.view(*x.shape[:-1], N).to(x.dtype)


# ---- quantizing (Q8_0, Q4_0), bit-exact with gguf.quants.quantize ----------------------------------------


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(n, 1) f32 -> (n, 2) uint8: the value rounded to f16, little-endian."""
    return d.half().view(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # gguf: d = max|b| / 127; q = round-half-away(b / d) (as b * (1/d)); stored d is f16(d)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = b * inv
    a = v.abs()
    fl = a.floor()
    q = (fl + (2 * (a - fl)).floor()) * v.sign()
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # gguf: the value of largest magnitude (the first such) / -8 is d; q = trunc(b / d + 8.5) clipped to 0..15
    imax = b.abs().argmax(dim=1, keepdim=True)
    d = b.gather(1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = (b * inv + 8.5).trunc().clamp_(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], dim=1)


_QUANTIZERS = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0}
_QUANT_CHUNK = 1 << 16  # blocks per step: bounded temporaries (a few MB) whatever the matrix
# (the torch versions above are the path without the library, and the C++ quantize's oracle in the tests)


def quantize(w: torch.Tensor, qtype: int) -> torch.Tensor:
    """(N, K) float weights -> (N, K // 32, ts) uint8 blocks of Q8_0 or Q4_0, the bytes
    ``gguf.quants.quantize`` writes."""
    fn = _QUANTIZERS.get(Q(qtype)) if qtype in set(SUPPORTED) else None
    if fn is None:
        raise ValueError(f"quantize: only {', '.join(t.name for t in _QUANTIZERS)}, not {Q(qtype).name}")
    bs, ts = SUPPORTED[Q(qtype)]
    if w.dim() != 2 or w.shape[1] % bs:
        raise ValueError(f"quantize: {Q(qtype).name} wants (N, K) with K a multiple of {bs}, got {tuple(w.shape)}")
    N, K = w.shape
    w = w.detach()
    lib = library()
    if lib is not None:  # f32, f16 or bf16 rows, widened 32 values at a time
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16) or w.stride(-1) != 1:
            w = w.float().contiguous()
        return lib.quantize(w, int(qtype))
    flat = w.reshape(-1, bs)
    out = torch.empty(flat.shape[0], ts, dtype=torch.uint8)
    for i in range(0, flat.shape[0], _QUANT_CHUNK):
        out[i:i + _QUANT_CHUNK] = fn(flat[i:i + _QUANT_CHUNK].float())
    return out.view(N, K // bs, ts)
