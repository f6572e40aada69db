"""Meta's weight names, which every format is renamed into: how a layer's names are built and read back, and
which weight the output head is.

The rules live here once because the reference model, the sharding plan, the loaders and the weight
conversion (:mod:`.convert`) all apply them; a second copy of either is a second place to get a tied
model wrong.
"""

from __future__ import annotations

import re
from typing import Container

from .config import ModelArgs

EMBEDDING = "tok_embeddings.weight"
HEAD = "output.weight"

_LAYER = re.compile(r"^layers\.\d+\.")  # what layer_prefix puts in front


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


def weight_kind(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``attention.wq.weight`` (the key of per-weight tables)."""
    return _LAYER.sub("", name)


def carries_head(names: Container[str]) -> bool:
    """Whether weights of these names hold an output head of their own; a checkpoint without one ties it to
    the embedding (Meta's and GGUF's tied models ship without it; GGUF names its head as Meta does)."""
    return HEAD in names


def head_source(args: ModelArgs, names: Container[str]) -> str:
    """The weight that is the output head, among ``names`` (a checkpoint's or a weights dict's): the token
    embedding when the model ties them, unless the weights carry a head of their own -- quantized weights
    (int8, blocks) give a tied head its own quantized copy and keep the embedding, a lookup, in float."""
    return EMBEDDING if args.tie_embeddings and not carries_head(names) else HEAD
