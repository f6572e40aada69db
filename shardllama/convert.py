"""From checkpoint weights to what each holder stores: one path for the reference model and for every worker.

Each checkpoint weight is loaded once, checked against its expected shape, converted whole to the model's
weight dtype (``quant.stored``: int8 quantizes each matrix before any cut, so every worker holds exactly the
reference's numbers) and only then cut (``sharding.shard``).  A weight that several holders take -- the
token embedding of a tied model is also its output head -- is still read once.

:func:`full_weights` gives the reference model's weights (``loading.load_weights``, the tests' int8
models); :func:`cut` gives every worker's slices, which the shared-memory writer copies into its segments
(``shm``) and a remote worker keeps for itself (``workers.shard.cut_weights``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping, Sequence

import torch

from .config import ModelArgs
from .errors import ModelFileError
from .model import expected_shapes
from .names import EMBEDDING, HEAD, head_source
from .phases import Phases
from .quant import is_weight_quantized, stored
from .sharding import ShardSpec, shard, worker_weights

Loader = Callable[[str], torch.Tensor]  # checkpoint weight name -> the full float tensor


def _converted(sources: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, load: Loader,
               phases: Phases) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, the tensors that store it) for every weight of ``sources`` (name -> the checkpoint weight it is
    converted from), loading each checkpoint weight once; ``phases`` times the reads and conversions."""
    users: dict[str, list[str]] = {}
    for name, src in sources.items():
        users.setdefault(src, []).append(name)
    for src, names in users.items():
        with phases("read checkpoint"):
            full = load(src)
        if tuple(full.shape) != shapes[src]:
            raise ModelFileError(f"weight {src!r} has shape {tuple(full.shape)}, expected {shapes[src]}")
        for name in names:
            with phases("convert weights"):
                parts = stored(name, full, dtype)
            yield name, parts
            del parts
        del full  # the next weight is read only once this one is gone


def model_weights(args: ModelArgs, dtype: torch.dtype) -> dict[str, str]:
    """Every weight the reference model holds in weight dtype ``dtype`` -> the checkpoint weight it is
    converted from: the checkpoint's own, and with quantized matrices (int8, blocks) the head (a tied one as
    its own copy)."""
    names = {name: name for name in expected_shapes(args)}
    if is_weight_quantized(dtype):
        names[HEAD] = head_source(args, names)
    return names


def full_weights(args: ModelArgs, dtype: torch.dtype, load: Loader) -> dict[str, torch.Tensor]:
    """The reference model's weights in weight dtype ``dtype`` (int8: the matrices and their
    ``<name>_scale``, norms and embedding in f32), read one at a time so that converted weights never
    coexist with a second full copy."""
    weights: dict[str, torch.Tensor] = {}
    for _, parts in _converted(model_weights(args, dtype), expected_shapes(args), dtype, load, Phases()):
        weights.update(parts)
    return weights


def cut(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype, load: Loader, embedding: bool = False,
        phases: Phases | None = None) -> Iterator[tuple[ShardSpec | None, str, torch.Tensor]]:
    """(spec, name, part) for every tensor that each worker of ``specs`` holds, and with ``embedding`` also
    (None, the token embedding, whole) for the coordinator.  A part is a view of the converted whole: keep
    a copy to let the whole go."""
    sources = worker_weights(args)
    if embedding:
        sources = {EMBEDDING: EMBEDDING, **sources}
    phases = phases if phases is not None else Phases()
    for name, parts in _converted(sources, expected_shapes(args), dtype, load, phases):
        for spec in [None] if name == EMBEDDING else specs:
            for n, t in parts.items():
                yield spec, n, t if spec is None else shard(n, t, spec)
