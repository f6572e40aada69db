"""Reading a KV-cache slot out of the workers and writing one into them (the prompt cache on disk).

A slot is moved in chunks that fit a frame (``protocol.slot_chunks``): per chunk, one request to every
worker and one answer from each.  Reading assembles the full KV heads from the workers' ``kv_heads``
ranges (a head held by two workers is taken once, from the lower rank); writing cuts them again, so a
state read with N workers can be written with any other N.
"""

from __future__ import annotations

import torch

from . import protocol as P
from .errors import WorkerError


class SlotTransfer:
    """The slot methods of :class:`~shardllama.coordinator.Coordinator` (a mixin: it uses the coordinator's
    args, specs, dtype, n_slots, max_seq_len, _workers, _lost_slots and its _ready, _next_step, _send and
    _gather)."""

    def read_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of ``slot``, every KV head: k and v, each (n_layers, length,
        n_kv_heads, head_dim)."""
        a = self.args
        self._check_slot_io(slot, length)
        if length > 0 and slot in self._lost_slots:
            raise WorkerError(f"slot {slot} was lost when a worker was replaced; start its sequence again")
        k = torch.empty((a.n_layers, length, a.n_kv_heads, a.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        for layers, positions in self._slot_chunks(length):
            step = self._next_step()
            request = P.slot_request(step, slot, layers, positions)
            for w in self._workers:
                self._send(w, request)

            def check(rank: int, h: P.Header, frame, chunk=(layers, positions)) -> None:
                if h.B != len(self.specs[rank].kv_heads):
                    raise P.BadFrame(f"SLOT_DATA of {h.B} KV heads from a worker holding {len(self.specs[rank].kv_heads)}")
                if P.read_slot_range(frame, h, a.n_layers, self.max_seq_len) != chunk:
                    raise P.BadFrame("SLOT_DATA of another chunk than the one asked for")
                P.read_slot_payload(frame, h, chunk[0], a.head_dim, self.dtype)

            covered = 0  # heads [0, covered) are filled
            for rank, h, frame in sorted(self._gather(P.SLOT_DATA, slot, P.SLOT_IO, check=check), key=lambda x: x[0]):
                heads = self.specs[rank].kv_heads
                part_k, part_v = P.read_slot_payload(frame, h, layers, a.head_dim, self.dtype)  # (layers, T, B, hd)
                first = max(covered, heads.start) - heads.start
                L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
                k[L, T, heads.start + first : heads.stop] = part_k[:, :, first:]
                v[L, T, heads.start + first : heads.stop] = part_v[:, :, first:]
                covered = max(covered, heads.stop)
            assert covered == a.n_kv_heads, (covered, a.n_kv_heads)
        return k, v

    def write_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of ``slot``: each worker gets its ``kv_heads`` of k and v
        (each (n_layers, length, n_kv_heads, head_dim), as :meth:`read_slot` gives them)."""
        a = self.args
        want = (a.n_layers, k.shape[1] if k.dim() == 4 else -1, a.n_kv_heads, a.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KV of shapes {tuple(k.shape)} / {tuple(v.shape)} and dtypes {k.dtype} / {v.dtype} do "
                             f"not fit a slot of (layers, positions, kv heads, head dim) = "
                             f"({a.n_layers}, <= {self.max_seq_len}, {a.n_kv_heads}, {a.head_dim}) {self.dtype}")
        self._check_slot_io(slot, k.shape[1])
        for layers, positions in self._slot_chunks(k.shape[1]):
            step = self._next_step()
            L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
            for w, spec in zip(self._workers, self.specs):
                H = slice(spec.kv_heads.start, spec.kv_heads.stop)
                self._send(w, P.slot_message(P.WRITE_SLOT, step, slot, layers, positions, k[L, T, H], v[L, T, H]).numpy())
            self._gather(P.ACK)
        self._lost_slots.discard(slot)

    def _slot_chunks(self, length: int) -> list[tuple[range, range]]:
        heads = max(len(s.kv_heads) for s in self.specs)
        return P.slot_chunks(self.args.n_layers, length, 2 * heads * self.args.head_dim * self.dtype.itemsize)

    def _check_slot_io(self, slot: int, length: int) -> None:
        self._check_open()
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside the cache's {self.n_slots} slots")
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"{length} positions do not fit a slot of {self.max_seq_len}")
        self._ready()
