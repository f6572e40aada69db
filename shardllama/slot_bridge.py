"""Phase 1 of the block-allocated KV cache only: the old slot API over a block backend.

The coordinator still speaks slots to its workers until block tables go on the wire (phase 2), so the CLI's
``engine.generate`` and the server's scheduler, which must run on either backend, keep calling slots; this
presents a :class:`~shardllama.backend.LocalBackend` to them the same way, slot ``s`` being blocks
``s * n .. s * n + n - 1`` (``n`` = blocks of one ``max_seq_len`` sequence).  Deleted with phase 2, when the
engine allocates blocks and both backends take tables.
"""

from __future__ import annotations

import torch

from .backend import LocalBackend
from .model import blocks_for, contiguous_tables


class SlotBackend:
    """``n_blocks // blocks_for(max_seq_len)`` slots of one :class:`LocalBackend`."""

    n_workers = 0
    cache_epoch = 0

    def __init__(self, inner: LocalBackend):
        self.inner = inner
        self.args = inner.args
        self.max_seq_len = inner.max_seq_len
        self.prefill_precision = inner.prefill_precision
        self.blocks_per_slot = blocks_for(inner.max_seq_len, inner.block_size)
        self.n_slots = inner.n_blocks // self.blocks_per_slot

    def _table(self, slot: int) -> list[int]:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside the cache's {self.n_slots} slots")
        return contiguous_tables(torch.tensor([slot]), self.blocks_per_slot)[0].tolist()

    def forward(self, tokens, start, slots, lengths=None, all_logits=False):
        tables = contiguous_tables(torch.as_tensor(slots), self.blocks_per_slot)
        return self.inner.forward(tokens, start, tables, lengths, all_logits)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        bs, n = self.inner.block_size, self.blocks_per_slot
        src_table, dst_table = self._table(src), self._table(dst)
        for j in range(blocks_for(length, bs)):
            self.inner.copy_block(src_table[j], dst_table[j], min(bs, length - j * bs))

    def read_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.read_blocks(self._table(slot), length)

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.inner.write_blocks(self._table(slot), k, v)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
