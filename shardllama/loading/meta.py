"""Meta's checkpoints as shipped: ``consolidated.NN.pth`` (or unzipped ``consolidated.NN/``) + params.json.

Bigger models come split over several files (13B: 2, 30B: 4, 65B/70B: 8), each holding a slice of every
weight as Meta's model-parallel layers cut it.  :data:`SPLIT_DIM` says how; merging concatenates one
weight at a time, so at most one full weight is ever in memory beyond the memory-mapped files.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import ModelArgs
from ..errors import ModelFileError, one_line
from ..names import carries_head, weight_kind
from .base import Checkpoint, build_args, check_shapes
from .unzipped import find_pickle_dir, load_unzipped

# How Meta's model-parallel checkpoints split each weight across consolidated.NN files: the dimension the
# pieces are concatenated along (ColumnParallelLinear: 0, RowParallelLinear and ParallelEmbedding: 1), or
# None for weights every file holds a full copy of.
SPLIT_DIM: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w2.weight": 1,
    "feed_forward.w3.weight": 0,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
}

IGNORED = {"rope.freqs"}  # old checkpoints store the rotary frequencies; we compute them

SHARD_NAME = re.compile(r"^consolidated\.(\d+)(\.pth)?$")


def shard_index(path: Path) -> int | None:
    m = SHARD_NAME.match(path.name)
    return int(m.group(1)) if m else None


def find_shards(directory: Path) -> list[Path]:
    """``consolidated.NN.pth`` files or unzipped ``consolidated.NN/`` folders, in order (a file wins over a
    folder of the same number); the numbers must run 0..n-1."""
    found: dict[int, Path] = {}
    for p in sorted(directory.iterdir()):
        i = shard_index(p)
        if i is None:
            continue
        if p.is_file() and p.suffix == ".pth":
            found[i] = p
        elif p.is_dir() and find_pickle_dir(p) is not None:
            found.setdefault(i, p)
    missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
    if missing:
        raise ModelFileError(f"{directory}: split checkpoint is missing consolidated.{missing[0]:02d}.pth")
    return [found[i] for i in sorted(found)]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        state = load_unzipped(path)
    else:
        try:
            # mmap: tensors are views of the file, read on first use; weights_only: no arbitrary code.
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except FileNotFoundError:
            raise ModelFileError(f"{path}: file not found") from None
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
            raise ModelFileError(f"{path}: not a readable PyTorch checkpoint ({one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ModelFileError(f"{path}: expected a dict of tensors")
    return {k: v for k, v in state.items() if k not in IGNORED}


@dataclasses.dataclass(eq=False)
class MetaCheckpoint(Checkpoint):
    shard_paths: list[Path] = dataclasses.field(default_factory=list, repr=False)
    _shards: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list, repr=False)

    @classmethod
    def open(cls, model_path: Path, shard_paths: list[Path], params_path: Path, tokenizer_path: Path | None,
             rope_override: Mapping[str, float] | None = None) -> "MetaCheckpoint":
        shards = [_load_shard(p) for p in shard_paths]
        shapes = _merged_shapes(shard_paths, shards)
        vocab = shapes.get("tok_embeddings.weight", (1,))[0]  # used when params.json says -1 (LLaMA-1)
        args = build_args(params_path, lambda: ModelArgs.from_params_json(params_path, vocab_size=vocab,
                                                                                rope_override=rope_override))
        # Meta's tied models (Llama 3.2 1B/3B) may ship without output.weight.
        args = args.replace(tie_embeddings=not carries_head(shapes))
        check_shapes(shard_paths[0] if len(shard_paths) == 1 else model_path, args, shapes)
        return cls(args, "meta", model_path, tokenizer_path, None, shard_paths, shards)

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        parts = [s[name] for s in self._shards]
        dim = SPLIT_DIM.get(weight_kind(name))
        if len(parts) == 1:
            return parts[0]
        if dim is None:
            for p, part in zip(self.shard_paths[1:], parts[1:]):
                if not torch.equal(part, parts[0]):
                    raise ModelFileError(f"{p}: replicated tensor {name!r} differs from {self.shard_paths[0].name}'s")
            return parts[0]
        # Copy each piece into its place in one tensor of the target dtype: no second full-size temporary.
        out = torch.empty(self.shape(name), dtype=dtype)
        offset = 0
        for part in parts:
            out.narrow(dim, offset, part.shape[dim]).copy_(part)
            offset += part.shape[dim]
        return out

    def _stored_dtype(self, name: str) -> torch.dtype:
        return self._shards[0][name].dtype

    def close(self) -> None:
        self._shards = []


def _merged_shapes(paths: list[Path], shards: list[dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """The full shape of every weight once the files' pieces are joined; the files must agree."""
    first = shards[0]
    for p, s in zip(paths[1:], shards[1:]):
        if s.keys() != first.keys():
            odd = sorted(s.keys() ^ first.keys())[0]
            raise ModelFileError(f"{p}: holds a different set of tensors than {paths[0].name} ({odd!r})")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, t in first.items():
        piece = tuple(t.shape)
        for p, s in zip(paths[1:], shards[1:]):  # Meta cuts every weight into equal pieces
            if tuple(s[name].shape) != piece:
                raise ModelFileError(f"{p}: piece of {name!r} has shape {tuple(s[name].shape)}, {paths[0].name}'s has {piece}")
        dim = SPLIT_DIM.get(weight_kind(name))
        if dim is not None and len(shards) > 1:
            if len(piece) <= dim:
                raise ModelFileError(f"{paths[0]}: tensor {name!r} has shape {piece}, cannot be joined on dim {dim}")
            piece = piece[:dim] + (piece[dim] * len(shards),) + piece[dim + 1 :]
        shapes[name] = piece
    return shapes
