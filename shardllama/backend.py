"""What the generation loop runs on: something that turns token ids into logits.

Two implementations: :class:`LocalBackend` (the reference model in this process) and the tensor-parallel
coordinator (``shardllama.coordinator``), which runs the same math split over worker processes.  Both keep
a KV cache of ``n_slots`` sequences; the caller decides which slot each row of a batch uses, and can read a
slot's state out and write it back (the server's prompt cache on disk).
"""

from __future__ import annotations

from typing import Mapping, Protocol

import torch

from .config import ModelArgs
from .model import Transformer


class Backend(Protocol):
    args: ModelArgs
    max_seq_len: int  # positions per slot
    n_slots: int  # sequences the KV cache holds

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) long
        start: torch.Tensor,  # (B,) long: position of each row's first token
        slots: torch.Tensor,  # (B,) long: KV-cache slot of each row
        lengths: torch.Tensor | None = None,  # (B,) real tokens per right-padded row
        all_logits: bool = False,
    ) -> torch.Tensor:
        """f32 logits of each row's last real token (B, vocab), or of all tokens (B, T, vocab)."""
        ...

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` to slot ``dst``."""
        ...

    def read_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` cached positions of ``slot``, every KV head, in the model's dtype: k and v,
        each (n_layers, length, n_kv_heads, head_dim), owning their memory.  The same layout whatever the
        backend (the coordinator assembles it from its workers), so a state read from one fits any other."""
        ...

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of ``slot`` from what :meth:`read_slot` returned."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The reference model, in this process."""

    def __init__(self, args: ModelArgs, weights: Mapping[str, torch.Tensor], max_seq_len: int, n_slots: int = 1,
                 prefill_precision: str | None = None):
        self.args = args
        self.max_seq_len = max_seq_len
        self.n_slots = n_slots
        self.model = Transformer(args, weights, max_seq_len=max_seq_len, prefill_precision=prefill_precision)
        self.prefill_precision = self.model.prefill_precision  # as resolved: f32 where bf16 is unsupported
        self.cache = self.model.new_cache(n_slots)

    def forward(self, tokens, start, slots, lengths=None, all_logits=False):
        return self.model.forward(tokens, self.cache, start, slots, lengths, all_logits)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_slot(src, dst, length)

    def read_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cache.read(slot, length)
        return k.clone(), v.clone()

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(slot, k, v)

    def close(self) -> None:
        self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
