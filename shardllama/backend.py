"""What the generation loop runs on: something that turns token ids into logits.

Two implementations: :class:`LocalBackend` (the reference model in this process) and the tensor-parallel
coordinator (``shardllama.coordinator``), which runs the same math split over worker processes.  Both keep
a KV cache of ``n_blocks`` blocks of ``block_size`` positions (``shardllama.kv_cache.KVCache``); the caller
allocates them and names each row's blocks in a block table, and can read a sequence's state out and write
it back (the server's prompt cache on disk).
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch

from .config import ModelArgs
from .model import Transformer
from .kv_cache import BLOCK_SIZE


class Backend(Protocol):
    args: ModelArgs
    max_seq_len: int  # positions a sequence may reach
    block_size: int  # positions per KV-cache block
    n_blocks: int  # blocks the KV cache holds
    n_workers: int  # worker processes; 0 in-process
    cache_epoch: int  # +1 whenever the cache's contents were lost (a worker was replaced)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) long
        start: torch.Tensor,  # (B,) long: position of each row's first token
        tables: torch.Tensor,  # (B, W) long: block table of each row, W >= ceil((start + T) / block_size)
        lengths: torch.Tensor | None = None,  # (B,) real tokens per right-padded row
        all_logits: bool = False,
    ) -> torch.Tensor:
        """f32 logits of each row's last real token (B, vocab), or of all tokens (B, T, vocab)."""
        ...

    def copy_block(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of block ``src`` to block ``dst``."""
        ...

    def read_blocks(self, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` cached positions of the sequence with block table ``table``, every KV head, in
        the model's dtype: k and v, each (n_layers, length, n_kv_heads, head_dim), owning their memory.  The
        same layout whatever the backend and its block size, so a state read from one fits any other."""
        ...

    def write_blocks(self, table: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of the sequence with block table ``table`` from what
        :meth:`read_blocks` returned."""
        ...

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one position of one sequence takes, over all processes."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The reference model, in this process."""

    n_workers = 0
    cache_epoch = 0  # an in-process cache is never lost

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], max_seq_len: int, n_blocks: int,
                 block_size: int = BLOCK_SIZE, prefill_precision: str | None = None):
        self.args = args
        self.max_seq_len = max_seq_len
        self.model = Transformer(args, weights, max_seq_len=max_seq_len, prefill_precision=prefill_precision)
        self.prefill_precision = self.model.prefill_precision  # as resolved: f32 where bf16 is unsupported
        self.cache = self.model.new_cache(n_blocks, block_size)
        self.n_blocks = n_blocks
        self.block_size = block_size

    def forward(self, tokens, start, tables, lengths=None, all_logits=False):
        return self.model.forward(tokens, self.cache, start, tables, lengths, all_logits)

    def copy_block(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_block(src, dst, length)

    def read_blocks(self, table: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read(table, length)  # gathered: copies already

    def write_blocks(self, table: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(table, k, v)

    def kv_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def close(self) -> None:
        self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
