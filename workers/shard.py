"""A worker's slice of the model: the reference math (``shardllama.model``) on the slices ``sharding`` cut."""

from __future__ import annotations

from typing import Mapping

import torch

from shardllama import allreduce, dist_reduce
from shardllama import protocol as P
from shardllama.config import ModelArgs
from shardllama.convert import Loader, cut
from shardllama.kernels import gemm
from shardllama.model import Layer, Step, attention, feed_forward, last_positions, output_head, rms_norm, rope_tables
from shardllama.kv_cache import KVCache, flat_index
from shardllama.quant import linear_weight
from shardllama.sharding import ShardSpec
from shardllama.tensor_frames import BlockChunk, StepBlock

from . import device as dev


class ShardModel:
    """This worker's slice of the model: the same functions as the reference, on fewer heads / units, with
    the prefill products at the reference's precision (``prefill_precision``, as :class:`Transformer`), on
    ``device`` (``workers.device``: the weights copied there once; activations in and results out on the CPU)."""

    def __init__(self, args: ModelArgs, spec: ShardSpec, weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                 max_seq_len: int, n_blocks: int, block_size: int, prefill_precision: str | None = None,
                 device: torch.device = torch.device("cpu")):
        self.args = args
        self.spec = spec
        self.device = device
        self.prefill_precision = gemm.resolve(prefill_precision)
        weights = dev.place(weights, device, dtype)
        self.layers = [Layer.from_weights(weights, i) for i in range(args.n_layers)]
        self.norm = weights["norm.weight"]  # (dim,)
        self.output = linear_weight(weights, "output.weight")  # (vocab slice, dim)
        self.kv_of_q = spec.kv_map()
        if self.kv_of_q is not None:
            self.kv_of_q = self.kv_of_q.to(device)
        self.max_seq_len = max_seq_len
        # A pool of blocks of this worker's KV heads; the coordinator's block tables say which make up a row.
        self.cache = KVCache(args.n_layers, n_blocks, block_size, len(spec.kv_heads), args.head_dim, dtype, device)
        self.rope = rope_tables(args, max_seq_len)

    def step(self, block: StepBlock, T: int) -> Step:
        """The ``model.Step`` of a pass of ``T`` tokens a row; BadFrame if ``block`` does not fit the cache."""
        block.check_within(self.cache.n_blocks, self.max_seq_len, T)
        return dev.step_to(Step.make(block.start, T, block.tables, self.rope, self.cache.block_size), self.device)

    def chunk_kv(self, chunk: BlockChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``chunk``'s positions (layers, T, heads, hd), gathered (copies); BadFrame if it
        does not fit the cache."""
        at = self._chunk_index(chunk)
        L = slice(chunk.layers.start, chunk.layers.stop)
        return self.cache.k.flatten(1, 2)[L, at], self.cache.v.flatten(1, 2)[L, at]

    def write_chunk(self, chunk: BlockChunk, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill ``chunk``'s positions with k and v (layers, T, heads, hd); BadFrame if they do not fit."""
        cache = self.cache
        if chunk.heads != cache.k.shape[3] or chunk.dtype != cache.k.dtype:
            raise P.BadFrame(f"{chunk.kind.name} of {chunk.heads} KV heads of {chunk.dtype} to a worker holding "
                             f"{cache.k.shape[3]} of {cache.k.dtype}")
        at = self._chunk_index(chunk)
        L = slice(chunk.layers.start, chunk.layers.stop)
        cache.k.flatten(1, 2)[L, at] = k.to(self.device)
        cache.v.flatten(1, 2)[L, at] = v.to(self.device)

    def _chunk_index(self, chunk: BlockChunk) -> torch.Tensor:
        """Where the chunk's positions live in the cache flattened to (n_blocks * block_size, ...): (T,) long."""
        bs = self.cache.block_size
        chunk.check_within(self.cache.n_blocks, bs, self.args.n_layers)
        blocks = torch.tensor(chunk.blocks, dtype=torch.long)[None]  # (1, blocks)
        return flat_index(blocks, chunk.offset + torch.arange(chunk.positions)[None], bs)[0]

    def compute(self, phase: int, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """This worker's term of the layer's sum (B, T, dim), or its logits slice (B, T, vocab slice)."""
        with gemm.using(self.prefill_precision):
            return self._compute(phase, i, h.to(self.device), step)

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
                   reduce: allreduce.AllReduce | dist_reduce.DistReduce | None) -> torch.Tensor:
        """Every layer, summing with the other workers after each phase; this worker's logits slice."""
        h = h.to(self.device)  # (B, T, dim): the embedded tokens, the only copy to the device in a pass
        with gemm.using(self.prefill_precision):
            for i in range(self.args.n_layers):
                for j, phase in enumerate((P.ATTN, P.FFN)):
                    part = self._compute(phase, i, h, step)  # (B, T, dim)
                    h = h + part if reduce is None else reduce(h, part, allreduce.ticket(pass_no, 2 * i + j))
            if not all_logits:
                h = last_positions(h, lengths).unsqueeze(1)  # (B, 1, dim); host indices index a GPU tensor too
            return self._compute(P.HEAD, self.args.n_layers, h, step)


def cut_weights(args: ModelArgs, spec: ShardSpec, load: Loader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This worker's slices in ``dtype``, by the shared-memory writer's own path (``convert.cut``), as
    copies: the full tensors they are cut from are freed one at a time."""
    return {name: part.clone() for _, name, part in cut(args, [spec], dtype, load)}
