"""Block-quantized weights (GGUF's Q4_0 ... Q6_K) kept as blocks: stored, cut and multiplied in place.

A GGUF file stores a quantized matrix (N, K) as rows of blocks: ``bs`` weights in ``ts`` bytes (Q4_0: 32 in
18, Q4_K: 256 in 144, see ``gguf.GGML_QUANT_SIZES``).  Three weight dtypes keep matrices that way, one f32
scale-free activation path for everything else (norms, embedding, KV cache, messages: f32, as with int8):

    gguf  (:data:`GGUF`)  every matrix in its file's own type -- the default for a quantized GGUF; a type
                          without a kernel here (Q2_K, Q3_K, IQ2...) is requantized to Q8_0, a float matrix
                          is held in f32
    q8    (:data:`Q8`)    every matrix quantized to Q8_0 at load (any checkpoint)
    q4    (:data:`Q4`)    every matrix quantized to Q4_0 at load (any checkpoint)

They are torch dtypes only as names that travel where a weight dtype does (shard keys, the worker
handshake, the prompt cache): torch has no block dtype, and these three are never used for arithmetic here.

In a weights dict a block matrix is two flat tensors, as int8's are: ``<name>`` (N, K // bs, ts) uint8, the
file's bytes unchanged (so memory is the file's size, and dequantizing them is gguf's dequantization bit for
bit), and ``<name>_qtype``, one int32: its :class:`~gguf.GGMLQuantizationType`.  Cutting by output rows takes
whole rows; cutting by input columns (wo, w2) takes whole blocks (:func:`column_unit` makes the plan cut
there), which ``sharding.shard`` converts from weight columns with :func:`block_weights`.
:func:`linear_weight` pairs the two into a :class:`BlockWeight` for the model.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError
from .kernels import blocks as kernel

Q = GGMLQuantizationType
GGUF = torch.uint8
Q8 = torch.qint8
Q4 = torch.quint4x2
TARGET = {Q8: Q.Q8_0, Q4: Q.Q4_0}  # what q8 / q4 quantize float matrices to
DTYPES = (GGUF, *TARGET)
ACTIVATIONS = torch.float32
QTYPE_SUFFIX = "_qtype"
FALLBACK = Q.Q8_0  # gguf: a quantized type without a kernel is requantized to this


class BlockWeight(NamedTuple):
    """A matrix as blocks: ``blocks`` (N, K // bs, ts) uint8 of type ``qtype`` (a GGMLQuantizationType)."""

    blocks: torch.Tensor
    qtype: int

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix's (N, K), as the float tensor it stands for would have it."""
        n, nb, _ = self.blocks.shape
        return n, nb * block_size(self.qtype)


def has_kernel(name: str) -> bool:
    """Whether GGUF type ``name`` (``Q4_K``) is computed as stored; the other quantized types are requantized."""
    return name in Q.__members__ and Q[name] in kernel.SUPPORTED


def block_size(qtype: int) -> int:
    return GGML_QUANT_SIZES[Q(qtype)][0]


def _weights_by_bytes() -> dict[int, int]:
    """Bytes per block -> weights per block, for every type a block weight can be stored in: one-to-one, so
    a stored (N, K // bs, ts) tensor says its block size by its shape (``sharding.shard`` cuts columns so)."""
    table: dict[int, int] = {}
    for qtype in (*kernel.SUPPORTED, FALLBACK, *TARGET.values()):
        bs, ts = GGML_QUANT_SIZES[Q(qtype)]
        assert table.setdefault(ts, bs) == bs, f"two block sizes of {ts} bytes"
    return table


_WEIGHTS_BY_BYTES = _weights_by_bytes()


def block_weights(ts: int) -> int:
    """Weights in a stored block of ``ts`` bytes."""
    return _WEIGHTS_BY_BYTES[ts]


def from_bytes(raw: torch.Tensor, qtype: int) -> BlockWeight:
    """The BlockWeight of a tensor's bytes as a GGUF file holds them: (N, K // bs * ts) uint8."""
    _, ts = GGML_QUANT_SIZES[Q(qtype)]
    return BlockWeight(raw.reshape(raw.shape[0], -1, ts), int(qtype))


def meta(shape: tuple[int, int], qtype: int) -> BlockWeight:
    """A BlockWeight of ``shape`` and ``qtype`` on the meta device: shapes only (shared-memory layouts)."""
    bs, ts = GGML_QUANT_SIZES[Q(qtype)]
    return BlockWeight(torch.empty((shape[0], shape[1] // bs, ts), dtype=torch.uint8, device="meta"), int(qtype))


def dequantize(w: BlockWeight) -> torch.Tensor:
    """The f32 (N, K) matrix ``w`` stands for (gguf's numbers exactly; any quantized type gguf reads)."""
    if w.blocks.device.type == "meta":
        return torch.empty(w.shape, device="meta")
    if Q(w.qtype) in kernel.SUPPORTED:
        return kernel.dequantize(w.blocks, w.qtype)
    from .loading.gguf_dequant import dequantize as gguf_dequantize

    return gguf_dequantize(w.blocks.flatten(1).numpy(), Q(w.qtype)).reshape(w.shape)


def quantize(w: torch.Tensor, qtype: int, name: str = "a matrix") -> BlockWeight:
    """A float (N, K) matrix (weight ``name``) as blocks of ``qtype`` (Q8_0 or Q4_0); works on meta tensors."""
    bs = block_size(qtype)
    if w.shape[-1] % bs:
        raise ModelFileError(f"weight {name!r} has {w.shape[-1]} columns: not whole {Q(qtype).name} blocks of {bs}")
    if w.device.type == "meta":
        return meta(tuple(w.shape), qtype)
    if not bool(torch.isfinite(w).all()):
        raise ModelFileError(f"weight {name!r} holds infinities or NaNs; it cannot be quantized to {Q(qtype).name}")
    return BlockWeight(kernel.quantize(w, qtype), int(qtype))


def linear(x: torch.Tensor, w: BlockWeight) -> torch.Tensor:
    """``x @ w.T`` for f32 x (..., K): (..., N) f32 (``kernels.blocks``: C++ on the blocks, else torch)."""
    return kernel.linear(x, w.blocks, w.qtype)


def stored(name: str, full: torch.Tensor | BlockWeight, dtype: torch.dtype, matrix: bool) -> dict[str, torch.Tensor]:
    """The tensors that hold weight ``name`` in block dtype ``dtype``: a ``matrix`` (one that is multiplied by,
    ``quant.is_quantized``) as blocks and its qtype, anything else (norms, the embedding: a lookup) in f32."""
    if not matrix:
        return {name: dequantize(full) if isinstance(full, BlockWeight) else full.to(ACTIVATIONS)}
    if isinstance(full, BlockWeight):
        if dtype == GGUF and Q(full.qtype) in kernel.SUPPORTED:
            w = full
        else:  # a type without a kernel, or q8 / q4 of a quantized file: from its f32 numbers
            w = quantize(dequantize(full), TARGET.get(dtype, FALLBACK), name)
    elif dtype == GGUF:  # a float matrix in a quantized file stays exact
        return {name: full.to(ACTIVATIONS)}
    else:
        w = quantize(full, TARGET[dtype], name)
    qtype = torch.tensor([w.qtype], dtype=torch.int32, device=w.blocks.device)
    return {name: w.blocks, name + QTYPE_SUFFIX: qtype}


def linear_weight(weights: Mapping[str, torch.Tensor], name: str) -> BlockWeight:
    """The BlockWeight of ``name`` and its type, checked to be a type with a kernel and blocks of its size
    (the two may come from a shared-memory segment: a worker refuses them while it builds, not mid-pass)."""
    qtype, blocks = weights.get(name + QTYPE_SUFFIX), weights[name]
    if qtype is None or qtype.numel() != 1:
        raise ModelFileError(f"weight {name!r} is blocks but has no {name + QTYPE_SUFFIX!r}")
    q = int(qtype.item())
    if q not in {int(t) for t in kernel.SUPPORTED} or blocks.dim() != 3 or blocks.shape[2] != GGML_QUANT_SIZES[Q(q)][1]:
        raise ModelFileError(f"weight {name!r}: blocks of shape {tuple(blocks.shape)} and type {q} do not go together")
    return BlockWeight(blocks, q)


def column_unit(dtype: torch.dtype, columns: int) -> int:
    """Weights a cut by input columns of a matrix of ``columns`` columns must keep together in ``dtype``: the
    largest block any of its matrices can have there (256 for the K-quants where the width allows them)."""
    if dtype not in DTYPES:
        return 1
    if dtype in TARGET:
        return block_size(TARGET[dtype])
    return 256 if columns % 256 == 0 else 32
