"""int8 weights: quantized once at load time, one f32 scale per output row.

A linear weight ``w`` (N, K) is stored as ``q = round(w / scale[:, None])`` in int8 with
``scale = absmax(row) / 127`` (symmetric: no zero point, so a row's largest weight is exactly +-127 and a
zero stays zero), and ``w ≈ q * scale[:, None]``.  Every matrix that :func:`shardllama.model.linear`
multiplies by is quantized: wq, wk, wv, wo, w1, w2, w3 of every layer and the output head.  What is not
a product stays float, in f32 (:data:`ACTIVATIONS`): the norms (a few thousand numbers that scale every
activation) and the token embedding, which is gathered a row per token, never streamed through, so
quantizing it would save memory but no time, and a tied output head gets its own int8 copy instead.

Activations, the KV cache and the residual stream of an int8 model are f32.  The kernel rounds x to f16 on
the way in (after an exact power-of-two scaling, see ``kernels/matvec.cpp``) because that doubled its rate
on w2-shaped matrices; that relative 2^-11 per activation is far below the weights' own rounding (half a
step is 1/254 of the row's largest weight, a few percent of a typical one).

Sharding needs nothing new: a weight cut by output rows takes its rows' scales along (a scale is one
number per row), and one cut by input columns (wo, w2) keeps the whole row's scale on every worker,
because ``scale * sum(partials) = sum(scale * partial)``.  ``sharding.plan_entry`` derives the scales'
cut from the weight's, so the table stays one table.  Weights are quantized whole, before any cut, so every
worker holds exactly the reference's numbers.

In a weights dict the pair is two tensors, ``<name>`` (int8) and ``<name>_scale`` (f32): flat tensors
are what shared memory, the loaders and :func:`shardllama.sharding.shard` handle.  :func:`linear_weight`
pairs them into an :class:`Int8Weight` for the model.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from . import kernels, qblocks
from .errors import ModelFileError
from .qblocks import BlockWeight

INT8 = torch.int8
ACTIVATIONS = torch.float32  # the float dtype of everything but the quantized matrices
SCALE_SUFFIX = "_scale"  # "layers.0.attention.wq.weight" -> "layers.0.attention.wq.weight_scale"
QMAX = 127  # symmetric: -128 is never used, so -q never overflows


class Int8Weight(NamedTuple):
    """A linear weight quantized per output row: ``w ≈ q * scale[:, None]``."""

    q: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) f32


def quantize(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 of a float (N, K) weight; rows of zeros get scale 0 (and stay exactly zero).

    Row by row independent, so quantizing a block of rows gives that block of the whole's result.
    Works on meta tensors too (shared memory is laid out from them)."""
    assert w.dim() == 2 and w.is_floating_point(), (w.dtype, w.shape)
    if w.device.type == "meta":  # shapes only: torch's meta kernels for abs/round import torch._dynamo (1.5 s)
        return Int8Weight(torch.empty(w.shape, dtype=INT8, device="meta"), torch.empty(w.shape[:1], device="meta"))
    wf = w.float()
    scale = wf.abs().amax(dim=1) / QMAX  # (N,)
    # A zero row divides by 1 instead of 0: q = 0 and scale = 0 give back exact zeros.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.div(wf, divisor[:, None]).round_().clamp_(-QMAX, QMAX).to(INT8)  # (N, K); in place: one f32 copy
    return Int8Weight(q, scale)


def dequantize(w: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight an Int8Weight stands for: (N, K) in ``dtype``."""
    return (w.q.float() * w.scale[:, None]).to(dtype)


def reference_linear(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """``x @ dequantize(w).T`` in x's dtype with torch alone: the fallback and the test oracle."""
    return F.linear(x, dequantize(w, x.dtype))


def linear(x: torch.Tensor, w: Int8Weight | BlockWeight) -> torch.Tensor:
    """``x @ w.T`` for an int8 weight and f32 x (..., K) -> (..., N) f32.

    The C++ kernel for any number of rows: a decode step streams the int8 rows near memory bandwidth, and
    a prompt goes through the same kernel in blocks of 8 rows, which at 16 and 64 rows measured ~20x
    faster than dequantizing per call and 1.2-1.8x faster than torch._weight_int8pack_mm with bf16
    activations (tools/results/int8.md).  Where the kernel is unavailable, :func:`reference_linear`.
    Block weights: :func:`qblocks.linear`."""
    if isinstance(w, BlockWeight):
        return qblocks.linear(x, w)
    if kernels.applies_int8(x, w.q, w.scale):
        return kernels.matvec_int8(x, w.q, w.scale)
    return reference_linear(x, w)


# ---- weights as stored ---------------------------------------------------------------------------------


def is_quantized(name: str, ndim: int) -> bool:
    """Whether int8 models store weight ``name`` as int8: every matrix but the token embedding (a lookup)."""
    return ndim == 2 and name != "tok_embeddings.weight"


def stored(name: str, full: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors that hold the full float weight ``name`` in a model of weight dtype ``dtype``.

    Float dtypes: ``{name: full in dtype}``.  int8: ``{name: q, name_scale: scale}`` for the matrices that
    :func:`is_quantized` names, ``{name: full in f32}`` for the rest.  Block dtypes: :func:`qblocks.stored`
    (``full`` may then be a :class:`~shardllama.qblocks.BlockWeight`, a quantized file's own blocks)."""
    if dtype in qblocks.DTYPES:
        return qblocks.stored(name, full, dtype, is_quantized(name, len(full.shape)))
    if dtype != INT8:
        return {name: full.to(dtype)}
    if not full.is_floating_point():
        raise ModelFileError(f"weight {name!r} is {full.dtype}: int8 weights are quantized from float ones")
    if not is_quantized(name, full.dim()):
        return {name: full.to(ACTIVATIONS)}
    w = quantize(full)
    if full.device.type != "meta" and not bool(torch.isfinite(w.scale).all()):
        raise ModelFileError(f"weight {name!r} holds infinities or NaNs; it cannot be quantized to int8")
    return {name: w.q, name + SCALE_SUFFIX: w.scale}


def linear_weight(weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | Int8Weight | BlockWeight:
    """``weights[name]``, or for an int8 weight the Int8Weight of it and its scale, for blocks the BlockWeight
    of them and their type."""
    w = weights[name]
    if w.dtype == qblocks.GGUF:
        return qblocks.linear_weight(weights, name)
    if w.dtype != INT8:
        return w
    scale = weights.get(name + SCALE_SUFFIX)
    if scale is None:
        raise ModelFileError(f"weight {name!r} is int8 but has no {name + SCALE_SUFFIX!r}")
    return Int8Weight(w, scale)


def activation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of activations, KV cache, norms and embedding in a model whose weights are ``dtype``."""
    return ACTIVATIONS if is_weight_quantized(dtype) else dtype


def source_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to load checkpoint weights in for a model of weight dtype ``dtype`` (int8, q8, q4: f32,
    quantized from there, so nothing is rounded twice; gguf: as stored, quantized matrices as their blocks)."""
    return torch.float32 if dtype == INT8 or dtype in qblocks.TARGET else dtype


def is_weight_quantized(dtype: torch.dtype) -> bool:
    """Whether a model of weight dtype ``dtype`` holds its matrices quantized (int8 or blocks): then the
    embedding stays a float lookup and a tied head is a copy of its own."""
    return dtype == INT8 or dtype in qblocks.DTYPES
