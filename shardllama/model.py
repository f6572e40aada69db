"""The LLaMA model math, once, in plain torch.

Weights use Meta's names and Meta's rotary layout (the two halves of each rotary pair are adjacent,
``(x[2i], x[2i+1])``); other formats are converted at the loading edge.  Every layer function takes its
weights explicitly and works on whatever number of heads / FFN units those weights hold, so a worker that
owns a slice of a layer calls the very same function on its slice and the partial outputs add up to the
reference's (``attention`` and ``feed_forward`` end with a row-split projection, so the sum over workers is
the full result).  The reference :class:`Transformer` never knows about workers; it is the test oracle.

The KV cache is a pool of fixed-size *blocks* (``BLOCK_SIZE`` positions each); a sequence is a *block table*,
the ids of its blocks in order, so position ``p`` lives in block ``table[p // block_size]`` at offset
``p % block_size``.  Memory then follows the tokens held, and two sequences with a common prefix can share
its blocks.  One forward pass takes a batch of rows, each row ``b`` holding ``T`` new tokens for the
sequence whose table is ``tables[b]``, starting at position ``start[b]``; rows shorter than ``T`` are
right-padded and name their real length in ``lengths`` (padding writes cache entries past the row's end,
in the row's own blocks, which the causal mask hides and the next real token overwrites).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from . import kernels, quant
from .kernels import decode, gemm
from .config import ModelArgs
from .kv_cache import BLOCK_SIZE, KVCache, blocks_for, check_tables, contiguous_tables, flat_index
from .names import head_source, layer_prefix
from .qblocks import GGUF, Q4, Q8, BlockWeight
from .quant import Int8Weight, linear_weight

# Weight dtypes.  int8 quantizes the matrices and keeps everything else in f32 (shardllama.quant); gguf keeps a
# quantized file's blocks, q8 / q4 quantize to Q8_0 / Q4_0 blocks (shardllama.qblocks).
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8, "gguf": GGUF,
          "q8": Q8, "q4": Q4}
Linear = torch.Tensor | Int8Weight | BlockWeight  # a matrix that linear() multiplies by


# ---- the pieces ----------------------------------------------------------------------------------------


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    """``x @ w.T`` (F.linear).  A decode step (a few rows of x) with f16/bf16 weights goes to a C++ kernel
    that streams the weights near memory bandwidth (shardllama.kernels); more rows with f16/f32 weights to
    oneDNN's GEMM at the prefill precision in force (kernels.gemm: f32, or bf16 where the CPU has it); int8
    and block weights to quant.linear; the rest, and machines without the kernels, to torch."""
    if isinstance(w, (Int8Weight, BlockWeight)):
        return quant.linear(x, w)
    if kernels.applies(x, w):
        return kernels.matvec(x, w)
    if gemm.applies(x, w):  # prefill: oneDNN's GEMM, f32 on the exact (widened) weights or bf16
        return gemm.linear(x, w)
    return F.linear(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in f32 whatever the weight dtype, as Meta and HF do; scale in the model dtype.  torch's fused
    # op computes x * rsqrt(mean(x^2) + eps) in one call: a decode step runs this 2 x layers times, and the
    # five separate ops cost 6 us more each (demo model, one thread).
    # A decode step's few rows: one C++ call (kernels.decode), rounded the same way.
    if decode.elementwise_applies(x, weight):
        return decode.rms_norm(x, weight, eps)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * weight


def rope_tables(args: ModelArgs, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, f32, each (max_seq_len, head_dim // 2); a scaled
    rope divides each frequency by its factor (shardllama.rope)."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if args.rope_freq_factors is not None:
        freqs = freqs / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (a, b) of x (B, T, H, hd) by the angles whose cos + i sin is cis (B, T, 1, hd/2):
    (a + ib)(cos + i sin) in f32, i.e. (a cos - b sin, a sin + b cos), as Meta's code does.  One complex
    product instead of ten real ops: 18 -> 7 us a call at decode sizes."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2)
    return torch.view_as_real(pairs * cis).flatten(-2).type_as(x)


@dataclasses.dataclass
class Step:
    """Everything about one forward pass that is the same for every layer (computed once per pass)."""

    positions: torch.Tensor  # (B, T) long: absolute position of each token
    cis: torch.Tensor  # (B, T, 1, hd/2) complex64: cos + i sin of each rotary angle
    kv_len: int  # keys to attend over: max position + 1
    mask: torch.Tensor | None  # (B, 1, T, kv_len) bool, None when every row sees every key
    # Where keys and values live in the cache flattened to (n_blocks * block_size, hkv, hd):
    first: int | None  # B == 1 on consecutive blocks: flat index of position 0; the cache is sliced, not gathered
    write_at: torch.Tensor | None  # otherwise (B, T) long: flat index of each new token
    read_at: torch.Tensor | None  # and (B, kv_len) long: flat index of each row's keys
    # One token a row (T == 1, B <= decode.MAX_ROWS), for kernels.decode.attend: each row's flat index (B,), its
    # keys' (B, kv_len), how many of those it attends to (B,), and its cis as (B, hd/2, 2) f32
    one: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def make(cls, start: torch.Tensor, n_tokens: int, tables: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
             block_size: int) -> "Step":
        start = start.long()
        tables = tables.long()
        positions = start[:, None] + torch.arange(n_tokens)  # (B, T)
        kv_len = int(positions.max()) + 1
        cos, sin = rope
        if kv_len > cos.shape[0]:
            raise ValueError(f"position {kv_len - 1} is beyond the rotary table ({cos.shape[0]} positions)")
        if blocks_for(kv_len, block_size) > tables.shape[1]:
            raise ValueError(f"position {kv_len - 1} is beyond block tables of {tables.shape[1]} blocks "
                             f"of {block_size}")
        mask = None
        # T == 1 and equal starts: every row attends to all kv_len keys, no mask needed.
        if n_tokens > 1 or bool((start != start[0]).any()):
            mask = torch.arange(kv_len)[None, None, None, :] <= positions[:, None, :, None]
        # A lone sequence whose blocks are consecutive (what a lowest-free-first allocator gives it) is a slice
        # of the flattened cache: decode then reads its keys in place, as from one preallocated slot.
        first, write_at, read_at = None, None, None
        used = tables[0, : blocks_for(kv_len, block_size)].tolist() if len(tables) == 1 else None
        if used is not None and used == list(range(used[0], used[0] + len(used))):
            first = used[0] * block_size
        else:
            write_at = flat_index(tables, positions, block_size)
            # Keys past a row's own end are masked; clamping them to its last position keeps the gather inside
            # the row's blocks (trailing table entries are never read).
            keys = torch.minimum(torch.arange(kv_len)[None, :], positions[:, -1:])  # (B, kv_len)
            read_at = flat_index(tables, keys, block_size)
        cis = torch.complex(cos[positions], sin[positions]).unsqueeze(2)
        one = None
        if n_tokens == 1 and len(start) <= decode.MAX_ROWS:
            if first is not None:
                one = (torch.tensor([first + kv_len - 1]), torch.arange(first, first + kv_len)[None], torch.tensor([kv_len]))
            else:
                one = (write_at[:, 0].contiguous(), read_at.contiguous(), positions[:, 0] + 1)
            one += (torch.view_as_real(cis[:, 0, 0]).contiguous(),)
        return cls(positions=positions, cis=cis, kv_len=kv_len, mask=mask, first=first, write_at=write_at,
                   read_at=read_at, one=one)


def attention(
    x: torch.Tensor,  # (B, T, dim), already normalised
    wq: Linear,  # (hq * hd, dim)
    wk: Linear,  # (hkv * hd, dim)
    wv: Linear,  # (hkv * hd, dim)
    wo: Linear,  # (dim, hq * hd)
    cache_k: torch.Tensor,  # (n_blocks, block_size, hkv, hd): this layer's cache
    cache_v: torch.Tensor,
    step: Step,
    head_dim: int,
    kv_of_q: torch.Tensor | None = None,  # (hq,) long: local KV head of each local query head
) -> torch.Tensor:
    """Attention over the heads these weights hold; returns their (B, T, dim) contribution.

    Query head i uses KV head ``i // (hq / hkv)`` unless ``kv_of_q`` says otherwise: a worker whose
    query heads start mid-group (9 heads, 3 KV heads, 2 workers) passes its own mapping.
    """
    B, T, _ = x.shape
    q = linear(x, wq).view(B, T, -1, head_dim)
    k = linear(x, wk).view(B, T, -1, head_dim)
    v = linear(x, wv).view(B, T, -1, head_dim)
    if step.one is not None and decode.attention_applies(q, cache_k):  # one token a row: rope, cache, attention in C++
        out = decode.attend(q, k, v, cache_k, cache_v, *step.one, kv_of_q)
        return linear(out.view(B, T, -1), wo)
    q = apply_rope(q, step.cis)
    k = apply_rope(k, step.cis)

    flat_k, flat_v = cache_k.flatten(0, 1), cache_v.flatten(0, 1)  # (n_blocks * block_size, hkv, hd), views
    if step.first is not None:
        p0 = step.first + int(step.positions[0, 0])
        flat_k[p0 : p0 + T] = k[0]
        flat_v[p0 : p0 + T] = v[0]
        keys = flat_k[step.first : step.first + step.kv_len].unsqueeze(0)  # (1, L, hkv, hd), a view
        values = flat_v[step.first : step.first + step.kv_len].unsqueeze(0)
    else:
        flat_k[step.write_at] = k
        flat_v[step.write_at] = v
        keys = flat_k[step.read_at]  # (B, L, hkv, hd), gathered
        values = flat_v[step.read_at]

    if kv_of_q is not None:  # one KV head per query head, picked by the mapping
        keys, values = keys.index_select(2, kv_of_q), values.index_select(2, kv_of_q)
    # Grouped attention by hand: torch's CPU SDPA with enable_gqa costs ~8 ms a call at decode sizes.
    # f16 batched products run a generic loop on the CPU (7x slower than f32 at 2048 keys), so f16 is
    # widened to f32 for the two products; bf16 has oneDNN's.
    wide = torch.float32 if q.dtype == torch.float16 else q.dtype
    hkv = keys.shape[2]
    qg = q.view(B, T, hkv, -1, head_dim).permute(0, 2, 3, 1, 4).to(wide)  # (B, hkv, rep, T, hd)
    k_t = keys.permute(0, 2, 3, 1).unsqueeze(2).to(wide)  # (B, hkv, 1, hd, L)
    scores = torch.matmul(qg, k_t).float() * head_dim**-0.5  # (B, hkv, rep, T, L)
    if step.mask is not None:
        scores = scores.masked_fill(~step.mask.unsqueeze(1), -torch.inf)  # mask (B, 1, 1, T, L)
    probs = torch.softmax(scores, dim=-1).to(wide)
    out = torch.matmul(probs, values.transpose(1, 2).unsqueeze(2).to(wide))  # (B, hkv, rep, T, hd)
    out = out.permute(0, 3, 1, 2, 4).reshape(B, T, -1).to(q.dtype)  # (B, T, hq * hd), heads in order
    return linear(out, wo)


def feed_forward(x: torch.Tensor, w1: Linear, w2: Linear, w3: Linear) -> torch.Tensor:
    """SwiGLU over the hidden units these weights hold; returns their (B, T, dim) contribution."""
    gate, up = linear(x, w1), linear(x, w3)
    if decode.elementwise_applies(gate, up):  # a decode step's few rows: one C++ call
        return linear(decode.silu_mul(gate, up), w2)
    return linear(F.silu(gate) * up, w2)


def output_head(h: torch.Tensor, norm: torch.Tensor, output: Linear, eps: float) -> torch.Tensor:
    """Final norm and the vocabulary projection (of the rows ``output`` holds): (..., dim) -> (..., vocab).

    Always at f32 prefill precision: generation reads one row of logits (no GEMM), so the head's precision
    shows only in the logits of every position (teacher-forced scoring), which bf16 would round to steps of
    1/16 at a logit of 10."""
    with gemm.using("f32"):
        return linear(rms_norm(h, norm, eps), output)


class Layer(NamedTuple):
    attention_norm: torch.Tensor
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: torch.Tensor
    w1: Linear
    w2: Linear
    w3: Linear

    @classmethod
    def from_weights(cls, weights: Mapping[str, torch.Tensor], i: int) -> "Layer":
        p = layer_prefix(i)
        return cls(
            attention_norm=weights[p + "attention_norm.weight"],
            wq=linear_weight(weights, p + "attention.wq.weight"),
            wk=linear_weight(weights, p + "attention.wk.weight"),
            wv=linear_weight(weights, p + "attention.wv.weight"),
            wo=linear_weight(weights, p + "attention.wo.weight"),
            ffn_norm=weights[p + "ffn_norm.weight"],
            w1=linear_weight(weights, p + "feed_forward.w1.weight"),
            w2=linear_weight(weights, p + "feed_forward.w2.weight"),
            w3=linear_weight(weights, p + "feed_forward.w3.weight"),
        )


def last_positions(h: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, T, dim) -> (B, dim): each row's last real token."""
    if lengths is None:
        return h[:, -1]
    return h[torch.arange(h.shape[0]), lengths.long() - 1]


# ---- the reference model -------------------------------------------------------------------------------


class Transformer:
    """Single-process LLaMA: the oracle that the sharded engine must agree with.

    ``prefill_precision`` (``f32`` / ``bf16``; None: the process default, kernels.gemm) is that of the matrix
    products over many rows; bf16 falls back to f32 on a CPU without bf16 arithmetic."""

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], max_seq_len: int | None = None,
                 prefill_precision: str | None = None):
        self.args = args
        self.prefill_precision = gemm.resolve(prefill_precision)
        self.weights = weights
        self.dtype = weights["tok_embeddings.weight"].dtype
        self.max_seq_len = max_seq_len or args.max_seq_len
        self.layers = [Layer.from_weights(weights, i) for i in range(args.n_layers)]
        self.output = linear_weight(weights, head_source(args, weights))  # a tied head may be the embedding
        self.rope = rope_tables(args, self.max_seq_len)

    def new_cache(self, n_blocks: int, block_size: int = BLOCK_SIZE) -> KVCache:
        a = self.args
        return KVCache(a.n_layers, n_blocks, block_size, a.n_kv_heads, a.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) long
        cache: KVCache,
        start: torch.Tensor | int = 0,  # (B,) first position of each row
        tables: torch.Tensor | None = None,  # (B, W) block table of each row; default row b in slot b of
        # the contiguous layout (blocks_for(max_seq_len) blocks a row)
        lengths: torch.Tensor | None = None,  # (B,) real tokens per row; default all T
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits (f32) of each row's last real token (B, vocab), or of every token (B, T, vocab)."""
        B, T = tokens.shape
        start = torch.as_tensor(start).long().expand(B)
        bs = cache.block_size
        if tables is None:
            tables = contiguous_tables(torch.arange(B), blocks_for(self.max_seq_len, bs))
        tables = torch.as_tensor(tables)
        check_tables(tables, cache.n_blocks)
        step = Step.make(start, T, tables, self.rope, bs)
        a = self.args
        h = F.embedding(tokens, self.weights["tok_embeddings.weight"])  # (B, T, dim)
        with gemm.using(self.prefill_precision):
            for i, L in enumerate(self.layers):
                h = h + attention(rms_norm(h, L.attention_norm, a.norm_eps), L.wq, L.wk, L.wv, L.wo,
                                  cache.k[i], cache.v[i], step, a.head_dim)
                h = h + feed_forward(rms_norm(h, L.ffn_norm, a.norm_eps), L.w1, L.w2, L.w3)
            if not all_logits:
                h = last_positions(h, lengths)
            return output_head(h, self.weights["norm.weight"], self.output, a.norm_eps).float()


def random_weight(args: ModelArgs, name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """One random weight of a model with these args, the same every call (seeded by ``seed`` and the name),
    so a model of any size can be produced one tensor at a time."""
    shape = expected_shapes(args)[name]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:  # norms: around 1
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
    scale = 1.0 if name == "tok_embeddings.weight" else 0.02
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def random_weights(args: ModelArgs, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Meta names and shapes, for tests and benchmarks."""
    return {name: random_weight(args, name, dtype, seed) for name in expected_shapes(args)}


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight name of a model with these args, and its shape (the loaders check against this)."""
    hd = args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,)}
    if not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    for i in range(args.n_layers):
        p = layer_prefix(i)
        shapes.update({
            p + "attention.wq.weight": (args.n_heads * hd, args.dim),
            p + "attention.wk.weight": (args.n_kv_heads * hd, args.dim),
            p + "attention.wv.weight": (args.n_kv_heads * hd, args.dim),
            p + "attention.wo.weight": (args.dim, args.n_heads * hd),
            p + "feed_forward.w1.weight": (args.hidden_dim, args.dim),
            p + "feed_forward.w2.weight": (args.dim, args.hidden_dim),
            p + "feed_forward.w3.weight": (args.hidden_dim, args.dim),
            p + "attention_norm.weight": (args.dim,),
            p + "ffn_norm.weight": (args.dim,),
        })
    return shapes
