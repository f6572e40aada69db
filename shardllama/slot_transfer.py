"""Reading a KV-cache slot out of the workers, writing one into them, copying one to another (the prompt
cache, in memory and on disk), and knowing which slots a replaced worker lost.

A slot is moved in chunks that fit a frame (``tensor_frames.slot_chunks``): per chunk, one request to every
worker and one answer from each.  Reading assembles the full KV heads from the workers' ``kv_heads``
ranges (a head held by two workers is taken once, from the lower rank); writing cuts them again, so a
state read with N workers can be written with any other N.
"""

from __future__ import annotations

import torch

from . import protocol as P
from .config import ModelArgs
from .errors import WorkerError
from .pool import WorkerPool
from .sharding import ShardSpec
from .tensor_frames import SlotChunk, slot_chunks


class SlotTransfer:
    """The slot requests of a coordinator's ``pool``, whose caches hold ``n_slots`` slots of ``max_seq_len``
    positions of ``dtype``."""

    def __init__(self, pool: WorkerPool, args: ModelArgs, specs: list[ShardSpec], dtype: torch.dtype, n_slots: int,
                 max_seq_len: int):
        self.pool = pool
        self.args = args
        self.specs = specs
        self.dtype = dtype
        self.n_slots = n_slots
        self.max_seq_len = max_seq_len
        self.lost: set[int] = set()  # slots whose cache a replaced worker no longer holds

    def check_rows(self, start: torch.Tensor, slots: torch.Tensor, why: str) -> None:
        """Before a pass: after a worker was replaced (``why``), a sequence must start again at position 0
        before it continues."""
        if self.lost:
            for s, p in zip(slots.tolist(), start.tolist()):
                if p > 0 and s in self.lost:
                    raise WorkerError(f"the KV cache of slot {s} was lost when {why}; "
                                      "start its sequence again from position 0")
            self.lost.difference_update(slots.tolist())

    def check_range(self, slot: int, length: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} outside the cache's {self.n_slots} slots")
        if not 0 <= length <= self.max_seq_len:
            raise ValueError(f"{length} positions do not fit a slot of {self.max_seq_len}")

    def _check_kept(self, slot: int, length: int) -> None:
        if length > 0 and slot in self.lost:
            raise WorkerError(f"slot {slot} was lost when a worker was replaced; start its sequence again")

    def copy(self, src: int, dst: int, length: int) -> None:
        """Every worker copies the first ``length`` positions of its cache slot ``src`` to ``dst``."""
        self._check_kept(src, length)
        self.lost.discard(dst)
        self.pool.broadcast(P.CopySlot(self.pool.next_step(), src, dst, length).pack())
        self.pool.gather(P.Kind.ACK, lambda rank, h, frame: P.Signal.unpack(frame, h))

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of ``slot``, every KV head: k and v, each (n_layers, length,
        n_kv_heads, head_dim)."""
        self._check_kept(slot, length)
        a = self.args
        k = torch.empty((a.n_layers, length, a.n_kv_heads, a.head_dim), dtype=self.dtype)
        v = torch.empty_like(k)
        for layers, positions in self.chunks(length):
            asked = SlotChunk(P.Kind.READ_SLOT, self.pool.next_step(), slot, layers, positions)
            self.pool.broadcast(asked.pack().numpy())

            def read(rank: int, h: P.Header, frame) -> tuple[torch.Tensor, torch.Tensor]:
                got = SlotChunk.unpack(frame, h)
                want = SlotChunk(P.Kind.SLOT_DATA, asked.step, slot, layers, positions,
                                 len(self.specs[rank].kv_heads), self.dtype)
                if got != want:
                    raise P.BadFrame(f"SLOT_DATA of slot {got.slot}, layers {got.layers}, positions "
                                     f"{got.positions}, {got.heads} KV heads of {got.dtype}, not {want.heads} of "
                                     f"{want.dtype} of the chunk asked for")
                return got.kv(frame, a.head_dim)  # each (layers, T, heads, hd)

            covered = 0  # heads [0, covered) are filled
            L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
            for rank, (part_k, part_v) in sorted(self.pool.gather(P.Kind.SLOT_DATA, read), key=lambda x: x[0]):
                heads = self.specs[rank].kv_heads
                first = max(covered, heads.start) - heads.start
                k[L, T, heads.start + first : heads.stop] = part_k[:, :, first:]
                v[L, T, heads.start + first : heads.stop] = part_v[:, :, first:]
                covered = max(covered, heads.stop)
            assert covered == a.n_kv_heads, (covered, a.n_kv_heads)
        return k, v

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill the first ``k.shape[1]`` positions of ``slot``: each worker gets its ``kv_heads`` of k and v
        (each (n_layers, length, n_kv_heads, head_dim), as :meth:`read` gives them)."""
        for layers, positions in self.chunks(k.shape[1]):
            step = self.pool.next_step()
            L, T = slice(layers.start, layers.stop), slice(positions.start, positions.stop)
            for rank, spec in enumerate(self.specs):
                H = slice(spec.kv_heads.start, spec.kv_heads.stop)
                chunk = SlotChunk(P.Kind.WRITE_SLOT, step, slot, layers, positions, len(spec.kv_heads), self.dtype)
                self.pool.send(rank, chunk.pack(k[L, T, H], v[L, T, H]).numpy())
            self.pool.gather(P.Kind.ACK, lambda rank, h, frame: P.Signal.unpack(frame, h))
        self.lost.discard(slot)

    def check_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """ValueError unless k and v are what :meth:`write` takes."""
        a = self.args
        want = (a.n_layers, k.shape[1] if k.dim() == 4 else -1, a.n_kv_heads, a.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"KV of shapes {tuple(k.shape)} / {tuple(v.shape)} and dtypes {k.dtype} / {v.dtype} do "
                             f"not fit a slot of (layers, positions, kv heads, head dim) = "
                             f"({a.n_layers}, <= {self.max_seq_len}, {a.n_kv_heads}, {a.head_dim}) {self.dtype}")

    def chunks(self, length: int) -> list[tuple[range, range]]:
        heads = max(len(s.kv_heads) for s in self.specs)
        return slot_chunks(self.args.n_layers, length, 2 * heads * self.args.head_dim * self.dtype.itemsize)
