"""The sharding plan: which worker holds which part of every weight, as one table and one slicing function.

Every layer is cut the Megatron way so that each worker's partial output is a plain sum term:

- ``wq`` / ``wk`` / ``wv`` / ``w1`` / ``w3`` are cut by output rows: whole query heads in contiguous ranges,
  the KV heads those query heads use (a KV head sits on two workers when its query group straddles them,
  and on several whenever N > n_kv_heads), and FFN hidden units in contiguous ranges;
- ``wo`` / ``w2`` are cut by input columns with the same ranges, so ``attention`` and ``feed_forward`` of
  ``model.py`` return each worker's contribution to the full result;
- norms are replicated; the output head is cut by vocabulary rows (each worker returns a slice of the
  logits); the token embedding stays with the coordinator, which gathers the rows of the batch;
- int8 weights' per-row scales go with their rows (see :func:`plan_entry`);
- block-quantized weights (``qblocks``) are cut between blocks only: the plan gives wo and w2 column ranges
  of whole blocks (``plan``'s ``dtype``), and a block type's tag goes to every worker.

:data:`PLAN` is the table, :func:`plan` turns ``ModelArgs`` + N into one :class:`ShardSpec` per worker,
:func:`shard` cuts a full tensor for one worker and :func:`unshard` puts the pieces back together.
The shared-memory writer and remote workers both get their slices from ``convert.cut``, which goes through
:func:`shard`; so do the tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import torch

from .config import ModelArgs
from .errors import UsageError
from .model import expected_shapes
from .names import HEAD, head_source, layer_prefix, weight_kind
from .qblocks import QTYPE_SUFFIX, block_weights, column_unit
from .quant import SCALE_SUFFIX


class Split(NamedTuple):
    dim: int | None  # tensor dimension that is cut; None: every worker holds the whole tensor
    axis: str | None  # the ShardSpec range that says which part: "q_heads", "kv_heads", "ffn" or "vocab"


REPLICATED = Split(None, None)
COORDINATOR = Split(None, "coordinator")  # never sent to a worker

# Weight name (without the ``layers.{i}.`` prefix) -> how it is cut.
PLAN: dict[str, Split] = {
    "attention.wq.weight": Split(0, "q_heads"),  # (n_heads * hd, dim)
    "attention.wk.weight": Split(0, "kv_heads"),  # (n_kv_heads * hd, dim)
    "attention.wv.weight": Split(0, "kv_heads"),  # (n_kv_heads * hd, dim)
    "attention.wo.weight": Split(1, "q_heads"),  # (dim, n_heads * hd)
    "feed_forward.w1.weight": Split(0, "ffn"),  # (hidden, dim)
    "feed_forward.w3.weight": Split(0, "ffn"),  # (hidden, dim)
    "feed_forward.w2.weight": Split(1, "ffn"),  # (dim, hidden)
    "attention_norm.weight": REPLICATED,  # (dim,)
    "ffn_norm.weight": REPLICATED,  # (dim,)
    "norm.weight": REPLICATED,  # (dim,) workers apply it before their slice of the head
    "output.weight": Split(0, "vocab"),  # (vocab, dim); with tied embeddings it is cut from tok_embeddings
    "tok_embeddings.weight": COORDINATOR,  # (vocab, dim)
}

# FFN and vocabulary ranges start on multiples of this when every worker still gets at least one block:
# whole cache lines / SIMD widths per worker, and no worker more than one block above another.
ALIGN = (16, 8)


def plan_entry(name: str) -> Split:
    """The table row for a full weight name (``layers.3.attention.wq.weight`` -> ``attention.wq.weight``).

    The per-row scales of an int8 weight (``..._scale``, shardllama.quant) follow from their weight's row:
    cut with it when its output rows are cut, whole on every worker when its input columns are."""
    if name.endswith(SCALE_SUFFIX):
        split = plan_entry(name.removesuffix(SCALE_SUFFIX))
        return REPLICATED if split.dim == 1 else split
    if name.endswith(QTYPE_SUFFIX):
        return REPLICATED
    try:
        return PLAN[weight_kind(name)]
    except KeyError:
        raise KeyError(f"{name!r} is not a weight of the sharding plan") from None


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """What one worker holds.  Ranges count heads (q_heads, kv_heads) or rows (ffn, vocab)."""

    rank: int
    n_workers: int
    head_dim: int
    q_heads: range
    kv_heads: range
    ffn: range
    vocab: range
    kv_of_q: tuple[int, ...]  # local KV head of each local query head

    def rows(self, axis: str) -> range:
        """The rows (or columns) of a full weight that this worker holds along ``axis``."""
        r = getattr(self, axis)
        if axis in ("q_heads", "kv_heads"):
            return range(r.start * self.head_dim, r.stop * self.head_dim)
        return r

    def kv_map(self) -> torch.Tensor | None:
        """``kv_of_q`` for ``model.attention``, or None where the plain grouping already gives it."""
        hq, hkv = len(self.q_heads), len(self.kv_heads)
        if hq % hkv == 0 and self.kv_of_q == tuple(i // (hq // hkv) for i in range(hq)):
            return None  # enable_gqa does it without gathering keys per query head
        return torch.tensor(self.kv_of_q, dtype=torch.long)


def _split(n: int, parts: int, align: Sequence[int] = (1,)) -> list[range]:
    """Cut ``range(n)`` into ``parts`` contiguous ranges whose sizes differ by at most one block."""
    unit = next((a for a in align if n // a >= parts), 1)
    blocks = n // unit
    bounds = [unit * (blocks * k // parts) for k in range(parts + 1)]
    bounds[-1] = n  # a remainder smaller than one block goes to the last worker
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def check_workers(args: ModelArgs, n_workers: int) -> None:
    if not isinstance(n_workers, int) or not 1 <= n_workers <= args.n_heads:
        raise UsageError(
            f"number of workers must be between 1 and the model's {args.n_heads} attention heads, got {n_workers!r}"
        )


def plan(args: ModelArgs, n_workers: int, dtype: torch.dtype | None = None) -> list[ShardSpec]:
    """One ShardSpec per worker: every worker gets at least one query head.  With block-quantized weights
    (``dtype``, :mod:`.qblocks`) the ranges of wo's and w2's columns hold whole blocks."""
    check_workers(args, n_workers)
    heads_unit, ffn_unit = _block_units(args, n_workers, dtype)
    q_ranges = _split(args.n_heads, n_workers, (heads_unit,))
    ffn_ranges = _split(args.hidden_dim, n_workers, (ffn_unit,) if ffn_unit > 1 else ALIGN)
    vocab_ranges = _split(args.vocab_size, n_workers, ALIGN)
    specs = []
    for rank, q in enumerate(q_ranges):
        kv = range(q.start // args.n_rep, (q.stop - 1) // args.n_rep + 1)
        specs.append(ShardSpec(
            rank=rank,
            n_workers=n_workers,
            head_dim=args.head_dim,
            q_heads=q,
            kv_heads=kv,
            ffn=ffn_ranges[rank],
            vocab=vocab_ranges[rank],
            kv_of_q=tuple(h // args.n_rep - kv.start for h in q),
        ))
    return specs


def max_workers(args: ModelArgs, dtype: torch.dtype | None = None) -> int:
    """The most workers ``plan`` can give each some query heads (and, with block-quantized weights, whole
    blocks of wo's and w2's columns)."""
    hd = args.head_dim
    if dtype is None or column_unit(dtype, args.n_heads * hd) == column_unit(dtype, args.hidden_dim) == 1:
        return args.n_heads  # float weights: a worker may hold no FFN unit at all
    heads_unit = math.lcm(column_unit(dtype, args.n_heads * hd), hd) // hd
    return max(1, min(args.n_heads // heads_unit, args.hidden_dim // column_unit(dtype, args.hidden_dim)))


def _block_units(args: ModelArgs, n_workers: int, dtype: torch.dtype | None) -> tuple[int, int]:
    """(query heads, FFN units) that each worker's ranges must be multiples of, for whole blocks; UsageError
    where N workers cannot each get some."""
    if dtype is None:
        return 1, 1
    hd = args.head_dim
    unit = column_unit(dtype, args.n_heads * hd)
    heads_unit = math.lcm(unit, hd) // hd
    ffn_unit = column_unit(dtype, args.hidden_dim)
    if unit == ffn_unit == 1:  # float weights: any cut is whole, and a worker may hold no FFN unit at all
        return 1, 1
    for most, u, what in ((args.n_heads // heads_unit, unit, f"attention.wo ({heads_unit} query heads a block)"),
                          (args.hidden_dim // ffn_unit, ffn_unit, f"feed_forward.w2 ({args.hidden_dim} columns)")):
        if most < n_workers:
            raise UsageError(f"{n_workers} workers cannot each hold whole {u}-weight blocks of {what} with "
                             f"quantized weights; use at most {most} workers")
    return heads_unit, ffn_unit


GLOBAL_WEIGHTS = ("tok_embeddings.weight", "norm.weight", "output.weight")
LAYER_WEIGHTS = tuple(name for name in PLAN if name not in GLOBAL_WEIGHTS)


def worker_weights(args: ModelArgs) -> dict[str, str]:
    """Every weight a worker holds -> the checkpoint weight it is cut from (the head may be tied)."""
    names = {layer_prefix(i) + name: layer_prefix(i) + name for i in range(args.n_layers) for name in LAYER_WEIGHTS}
    names["norm.weight"] = "norm.weight"
    names[HEAD] = head_source(args, expected_shapes(args))
    return names


def shard(name: str, tensor: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This worker's part of the full weight ``name`` (a view where the cut allows; may be empty)."""
    split = plan_entry(name)
    if split is COORDINATOR:
        raise KeyError(f"{name!r} stays with the coordinator; workers hold no part of it")
    if split.dim is None:
        return tensor
    r = _in_tensor(name, tensor, split, spec.rows(split.axis))
    return tensor.narrow(split.dim, r.start, len(r))


def _in_tensor(name: str, tensor: torch.Tensor, split: Split, r: range) -> range:
    """The range ``r`` of a weight's rows or columns as the indices of ``tensor``'s dimension ``split.dim``:
    the same, but for the columns of blocks (N, K // bs, ts) uint8 (``qblocks``), which are cut between blocks."""
    if split.dim != 1 or tensor.dtype != torch.uint8 or tensor.dim() != 3:
        return r
    bs = block_weights(tensor.shape[2])
    if r.start % bs or r.stop % bs:
        raise UsageError(f"{name}: columns {r.start}..{r.stop} cut inside its blocks of {bs} weights")
    return range(r.start // bs, r.stop // bs)


def unshard(name: str, parts: Sequence[torch.Tensor], specs: Sequence[ShardSpec]) -> torch.Tensor:
    """The full weight from every worker's part; replicated copies (norms, shared KV heads) must agree."""
    assert len(parts) == len(specs), (len(parts), len(specs))
    split = plan_entry(name)
    if split.dim is None:
        assert all(torch.equal(p, parts[0]) for p in parts[1:]), f"replicas of {name} differ"
        return parts[0]
    rows = [_in_tensor(name, parts[0], split, spec.rows(split.axis)) for spec in specs]
    shape = list(parts[0].shape)
    shape[split.dim] = max(r.stop for r in rows)
    full = parts[0].new_empty(shape)
    filled = torch.zeros(shape[split.dim], dtype=torch.bool)
    for part, r in zip(parts, rows):
        assert part.shape[split.dim] == len(r), (name, part.shape, r)
        target = full.narrow(split.dim, r.start, len(r))
        seen = filled[r.start : r.stop]
        if seen.any():  # a replicated KV head: the copies must be the same
            idx = seen.nonzero().squeeze(1)
            assert torch.equal(target.index_select(split.dim, idx), part.index_select(split.dim, idx)), name
        target.copy_(part)
        filled[r.start : r.stop] = True
    assert bool(filled.all()), f"the parts of {name} leave rows uncovered"
    return full
