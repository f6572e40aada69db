"""A worker's slice of the model: the reference math (``shardllama.model``) on the slices ``sharding`` cut."""

from __future__ import annotations

from typing import Mapping

import torch

from shardllama import allreduce
from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.convert import Loader, cut
from shardllama.kernels import gemm
from shardllama.model import (BLOCK_SIZE, KVCache, Layer, Step, attention, blocks_for, contiguous_tables, feed_forward,
                              last_positions, output_head, rms_norm, rope_tables)
from shardllama.quant import linear_weight
from shardllama.sharding import ShardSpec


class ShardModel:
    """This worker's slice of the model: the same functions as the reference, on fewer heads / units, with
    the prefill products at the reference's precision (``prefill_precision``, as :class:`Transformer`)."""

    def __init__(self, args: ModelArgs, spec: ShardSpec, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 max_seq_len: int, n_slots: int, prefill_precision: str | None = None):
        self.args = args
        self.spec = spec
        self.prefill_precision = gemm.resolve(prefill_precision)
        self.layers = [Layer.from_weights(weights, i) for i in range(args.n_layers)]
        self.norm = weights["norm.weight"]  # (dim,)
        self.output = linear_weight(weights, "output.weight")  # (vocab slice, dim)
        self.kv_of_q = spec.kv_map()
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots
        self.blocks_per_slot = blocks_for(max_seq_len)
        self.cache = KVCache(args.n_layers, n_slots * self.blocks_per_slot, BLOCK_SIZE, len(spec.kv_heads),
                             args.head_dim, dtype)
        self.rope = rope_tables(args, max_seq_len)

    # ---- phase 2: tables on the wire.  Until then the coordinator names slots; slot s is blocks
    # s * blocks_per_slot .. (s + 1) * blocks_per_slot - 1 of this worker's pool.

    def slot_tables(self, slots: torch.Tensor) -> torch.Tensor:
        """The block tables (B, blocks_per_slot) of these slots (B,)."""
        if len(slots) and not (0 <= int(slots.min()) and int(slots.max()) < self.n_slots):
            raise ValueError(f"slots {slots.tolist()} outside the cache's {self.n_slots}")
        return contiguous_tables(slots, self.blocks_per_slot)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``, block by block."""
        bs, n = self.cache.block_size, self.blocks_per_slot
        for j in range(blocks_for(length, bs)):
            self.cache.copy_block(src * n + j, dst * n + j, min(bs, length - j * bs))

    def slot_kv(self, slot: int, layers: range, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of k and v (layers, positions, heads, hd) of a run of a slot's positions."""
        base = slot * self.blocks_per_slot * self.cache.block_size
        L, T = slice(layers.start, layers.stop), slice(base + positions.start, base + positions.stop)
        return self.cache.k.flatten(1, 2)[L, T], self.cache.v.flatten(1, 2)[L, T]

    def compute(self, phase: int, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """This worker's term of the layer's sum (B, T, dim), or its logits slice (B, T, vocab slice)."""
        with gemm.using(self.prefill_precision):
            return self._compute(phase, i, h, step)

    def _compute(self, phase: int, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        eps = self.args.norm_eps
        if phase == P.ATTN:
            L = self.layers[i]
            return attention(rms_norm(h, L.attention_norm, eps), L.wq, L.wk, L.wv, L.wo,
                             self.cache.k[i], self.cache.v[i], step, self.args.head_dim, self.kv_of_q)
        if phase == P.FFN:
            L = self.layers[i]
            return feed_forward(rms_norm(h, L.ffn_norm, eps), L.w1, L.w2, L.w3)
        assert phase == P.HEAD, phase
        return output_head(h, self.norm, self.output, eps)

    def whole_pass(self, h: torch.Tensor, step: Step, lengths: torch.Tensor, all_logits: bool, pass_no: int,
                   reduce: allreduce.AllReduce | None) -> torch.Tensor:
        """Every layer, summing with the other workers after each phase; this worker's logits slice."""
        with gemm.using(self.prefill_precision):
            for i in range(self.args.n_layers):
                for j, phase in enumerate((P.ATTN, P.FFN)):
                    part = self._compute(phase, i, h, step)  # (B, T, dim)
                    h = h + part if reduce is None else reduce(h, part, allreduce.ticket(pass_no, 2 * i + j))
            if not all_logits:
                h = last_positions(h, lengths).unsqueeze(1)  # (B, 1, dim)
            return self._compute(P.HEAD, self.args.n_layers, h, step)


def cut_weights(args: ModelArgs, spec: ShardSpec, load: Loader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This worker's slices in ``dtype``, by the shared-memory writer's own path (``convert.cut``), as
    copies: the full tensors they are cut from are freed one at a time."""
    return {name: part.clone() for _, name, part in cut(args, [spec], dtype, load)}
