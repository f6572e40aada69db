"""Reference quantizers for the GGUF types gguf-py can dequantize but not quantize (K-quants, IQ4_NL/XS).

Written from the block layouts that ``gguf.quants``' dequantizers (and llama.cpp's ggml-quants.c) read, with
simple rounding: ranges from each block's min/max, scales rounded *up* so no value is clipped.  They need not
make llama.cpp's choices (its search for the best scales), only valid blocks; the tests check that
``gguf.quants.dequantize`` of the bytes comes back within each type's quantization step of the input.

Every quantizer takes rows ``(n, k)`` float32 (``k`` a multiple of the block size) and returns the bytes
``(n, k // block * type_size)`` uint8, as ``gguf.quants.quantize`` does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

QK_K = 256  # values per K-quant super-block

# IQ4_NL's 16 non-linear levels (llama.cpp's kvalues_iq4nl), shared by IQ4_XS.
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    """(n, 1) float -> (n, 2) bytes of the f16 value, and the f16 value back as float32."""
    return x.astype(np.float16).view(np.uint8).reshape(len(x), 2)


def _up_f16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded *up* to f16 (scales stored as f16 must not shrink, or the largest values would clip)."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h).astype(np.float32)


def _scale(step: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block steps (n, m) as f16 ``d`` times integer scales 0..levels (rounded up, never below the
    step): (d (n, 1), scales (n, m) int)."""
    d = _up_f16(step.max(axis=1, keepdims=True) / levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.ceil(step / d), 0)
    return d, np.clip(sc, 0, levels).astype(np.int32)


def _quantize(x: np.ndarray, step: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round((x + offset) / step), clipped to lo..hi; a zero step quantizes to the lowest level above 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.round((x + offset) / step), 0)
    return np.clip(q, lo, hi).astype(np.uint8 if lo >= 0 else np.int32)


def _min_scale_blocks(x: np.ndarray, n_sub: int, bits: int, scale_bits: int) -> tuple:
    """Q2_K/Q4_K/Q5_K's affine sub-blocks, ``y = d*sc*q - dmin*m``: (d, dmin, sc, m, q) with q in 0..2**bits-1."""
    n = len(x)
    sub = x.reshape(n, n_sub, -1)
    lo = np.minimum(sub.min(axis=2), 0)  # the offset is stored as a non-negative min, like llama.cpp's
    step = (sub.max(axis=2) - lo) / (2**bits - 1)
    d, sc = _scale(step, 2**scale_bits - 1)
    dmin, m = _scale(-lo, 2**scale_bits - 1)
    q = _quantize(sub, (d * sc)[..., None], (dmin * m)[..., None], 0, 2**bits - 1)
    return d, dmin, sc, m, q


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's eight 6-bit scales and mins in 12 bytes: bytes 0-3 scales 0-3 (top 2 bits: scales 4-7's
    top bits), 4-7 mins likewise, 8-11 low nibbles of scales 4-7 | mins 4-7 << 4."""
    out = np.empty((len(sc), 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _nibbles(q: np.ndarray, width: int) -> np.ndarray:
    """Values (n, chunks, 2 * width): the first ``width`` of each chunk in the low nibbles, the rest high."""
    q = q.reshape(len(q), -1, 2, width).astype(np.uint8)
    return (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)


def _crumbs(q: np.ndarray, width: int) -> np.ndarray:
    """2-bit fields, 4 per byte: value ``h*4*width + k*width + l`` at bits 2k of byte ``h*width + l``."""
    q = q.reshape(len(q), -1, 4, width).astype(np.uint8) & 3
    return q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)


def q2_k(x: np.ndarray) -> np.ndarray:
    # scales (16: sc | m << 4), qs (64: 2-bit), d, dmin
    n = len(x)
    d, dmin, sc, m, q = _min_scale_blocks(x, 16, 2, 4)
    scales = (sc | (m << 4)).astype(np.uint8)
    return np.concatenate([scales, _crumbs(q, 32).reshape(n, 64), _f16(d), _f16(dmin)], axis=1)


def q3_k(x: np.ndarray) -> np.ndarray:
    # hmask (32), qs (64: low 2 bits), scales (12: 6-bit, biased by 32), d.  q in -4..3 = low + 4*hbit - 4.
    n = len(x)
    sub = x.reshape(n, 16, 16)
    d, sc = _scale(np.abs(sub).max(axis=2) / 3, 31)
    q = _quantize(sub, (d * sc)[..., None], 0, -4, 3).reshape(n, QK_K) + 4
    hmask = np.packbits((q >> 2).reshape(n, 8, 32).astype(np.uint8), axis=1, bitorder="little").reshape(n, 32)
    s = (sc + 32).astype(np.uint8)  # scale i: low nibble in byte i % 8 (nibble i // 8), top 2 bits in 8 + i % 4
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = _crumbs(s >> 4, 4).reshape(n, 4)
    return np.concatenate([hmask, _crumbs(q & 3, 32).reshape(n, 64), low, high, _f16(d)], axis=1)


def q4_k(x: np.ndarray) -> np.ndarray:
    # d, dmin, scales (12), qs (128: sub-blocks 2c, 2c+1 in the low, high nibbles of chunk c)
    n = len(x)
    d, dmin, sc, m, q = _min_scale_blocks(x, 8, 4, 6)
    return np.concatenate([_f16(d), _f16(dmin), _pack_k_scales(sc, m), _nibbles(q, 32).reshape(n, 128)], axis=1)


def q5_k(x: np.ndarray) -> np.ndarray:
    # d, dmin, scales (12), qh (32: bit j = sub-block j's 5th bit), qs (128, as Q4_K)
    n = len(x)
    d, dmin, sc, m, q = _min_scale_blocks(x, 8, 5, 6)
    qh = np.packbits((q >> 4).astype(np.uint8), axis=1, bitorder="little").reshape(n, 32)
    return np.concatenate([_f16(d), _f16(dmin), _pack_k_scales(sc, m), qh, _nibbles(q, 32).reshape(n, 128)], axis=1)


def q6_k(x: np.ndarray) -> np.ndarray:
    # ql (128: low 4 bits), qh (64: high 2 bits), scales (16 int8), d.  q in -32..31, stored + 32.
    n = len(x)
    sub = x.reshape(n, 16, 16)
    d, sc = _scale(np.abs(sub).max(axis=2) / 31, 127)
    q = (_quantize(sub, (d * sc)[..., None], 0, -32, 31) + 32).reshape(n, QK_K)
    ql = _nibbles(q & 0xF, 64).reshape(n, 128)
    qh = _crumbs(q >> 4, 32).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16(d)], axis=1)


def _iq4_index(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    """The nearest of IQ4_LEVELS * step for each value."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(step > 0, x / step, 0)
    return np.abs(v[..., None] - IQ4_LEVELS).argmin(axis=-1).astype(np.uint8)


def iq4_nl(x: np.ndarray) -> np.ndarray:
    # d, qs (16: as Q4_0) over blocks of 32; levels span -127..113, so 113 * d covers the largest magnitude.
    blocks = x.reshape(-1, 32)
    d = _up_f16(np.abs(blocks).max(axis=1, keepdims=True) / 113)
    return np.concatenate([_f16(d), _nibbles(_iq4_index(blocks, d), 16).reshape(-1, 16)], axis=1).reshape(len(x), -1)


def iq4_xs(x: np.ndarray) -> np.ndarray:
    # d, scales_h (u16: 2 bits per sub-block), scales_l (4: nibbles), qs (128: as Q4_0 per 32); scale - 32
    n = len(x)
    sub = x.reshape(n, 8, 32)
    d, sc = _scale(np.abs(sub).max(axis=2) / 113, 31)
    qs = _nibbles(_iq4_index(sub, (d * sc)[..., None]), 16).reshape(n, 128)
    s = (sc + 32).astype(np.uint16)
    scales_h = (((s >> 4) & 3) << (2 * np.arange(8, dtype=np.uint16))).sum(axis=1, dtype=np.uint16)
    scales_l = (s[:, 0::2] & 0xF) | ((s[:, 1::2] & 0xF) << 4)
    return np.concatenate([_f16(d), scales_h.reshape(n, 1).view(np.uint8), scales_l.astype(np.uint8), qs], axis=1)


REFERENCE: dict[Q, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q2_K: q2_k, Q.Q3_K: q3_k, Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k, Q.IQ4_NL: iq4_nl, Q.IQ4_XS: iq4_xs,
}


def quantize(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """``rows`` (n, k) float32 as ``qtype`` bytes: our reference quantizer, else gguf's own."""
    import gguf

    rows = np.ascontiguousarray(rows, np.float32)
    if qtype not in REFERENCE:
        return gguf.quants.quantize(rows, qtype)
    block, type_size = GGML_QUANT_SIZES[qtype]
    n, k = rows.shape
    out = REFERENCE[qtype](rows.reshape(-1, block))
    assert out.dtype == np.uint8 and out.shape == (n * k // block, type_size), (qtype.name, out.shape)
    return out.reshape(n, k // block * type_size)
