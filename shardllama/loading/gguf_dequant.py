"""GGUF's legacy block types (Q4_0, Q4_1, Q8_0) dequantized in torch; every other type by ``gguf.quants``.

``gguf.quants`` dequantizes in numpy, one group of rows at a time; for these types, which make up most of the
demo model and of many downloaded files, torch's elementwise ops do the same arithmetic on the whole tensor
at once, on every core: 3-6x faster (the demo model's matrices: 1.7 s -> 0.4 s), and the same f32 numbers
bit for bit, because the operations are the same and in the same order (the f16 scale widened to f32, one
product, Q4_1's one sum).  Each block holds 32 weights (``ggml-common.h``):

    Q4_0  d: f16, qs: 16 bytes   w = d * (q - 8)    q: the low nibbles are weights 0-15, the high ones 16-31
    Q4_1  d, m: f16, qs: 16 bytes  w = d * q + m
    Q8_0  d: f16, qs: 32 x int8  w = d * q
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 at byte ``at`` of every block, widened: (blocks, 1) f32."""
    return blocks[:, at:at + 2].view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(blocks, 16) bytes -> (blocks, 32) f32: the low nibbles, then the high ones."""
    return torch.cat([qs & 0xF, qs >> 4], dim=1).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 2:]).sub_(8).mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 4:]).mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8).float().mul_(_f16(blocks, 0))


IN_TORCH = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q8_0: _q8_0}


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """f32 weights of ``raw``, a tensor's bytes as ``gguf_header`` gives them: (..., bytes per row) ->
    (..., weights per row)."""
    fn = IN_TORCH.get(qtype)
    if fn is None:
        return torch.from_numpy(gguf_dequantize(raw, qtype))
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1, type_size)
    return fn(blocks).reshape(*raw.shape[:-1], -1)
