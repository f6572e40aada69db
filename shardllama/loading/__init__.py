"""Checkpoint loading: Meta ``.pth``, HF safetensors and GGUF, all read into Meta's names and layout.

:func:`open_checkpoint` finds the weights, their config and the tokenizer, and checks every tensor's name
and shape from the file headers (nothing is read yet: all formats are memory-mapped).
:meth:`Checkpoint.load` then gives one weight at a time; :func:`load_weights` gives them all.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping

import torch
from tqdm import tqdm

from ..convert import full_weights
from ..errors import ModelFileError, UsageError
from ..quant import source_dtype
from .base import Checkpoint
from .gguf_file import GGUFCheckpoint
from .gguf_split import model_file as gguf_model_file
from .hf import INDEX_NAME, SafetensorsCheckpoint, shard_files
from .meta import MetaCheckpoint, find_shards, shard_index
from .unzipped import find_pickle_dir

__all__ = ["Checkpoint", "open_checkpoint", "load_weights", "find_tokenizer"]

log = logging.getLogger(__name__)


def open_checkpoint(model_path: str | Path, param_path: str | Path | None = None,
                    rope_override: Mapping[str, float] | None = None) -> Checkpoint:
    """Open the checkpoint in a directory or file; ``param_path`` overrides params.json / config.json;
    ``rope_override`` (--rope-scaling) the llama3 rope numbers a Meta params.json leaves out."""
    path = Path(model_path)
    params = Path(param_path) if param_path is not None else None
    if not path.exists():
        raise ModelFileError(f"{path}: no such file or directory")
    ckpt = _open_directory(path, params, rope_override) if path.is_dir() else _open_file(path, params, rope_override)
    if rope_override and ckpt.format != "meta":
        ckpt.close()
        raise UsageError(f"--rope-scaling: {path} states its own rope scaling; the flag is for Meta params.json "
                         "with use_scaled_rope")
    return ckpt


def load_weights(ckpt: Checkpoint, dtype: torch.dtype, progress: bool = False) -> dict[str, torch.Tensor]:
    """Every weight of the model, read one at a time (converted weights never coexist with a second copy).

    ``torch.int8`` quantizes each matrix as it is read (``convert.full_weights``: int8 plus
    ``<name>_scale``, norms and embedding in f32, and a tied head its own int8 copy)."""
    with tqdm(total=len(ckpt.names()), desc=f"loading {ckpt.path.name}", unit="tensor", file=sys.stderr,
              disable=not progress) as bar:
        def load(name: str) -> torch.Tensor:
            t = ckpt.load(name, source_dtype(dtype))
            bar.update()
            return t

        return full_weights(ckpt.args, dtype, load)


def find_tokenizer(weights_dir: Path) -> Path | None:
    """tokenizer.model or tokenizer.json beside the weights, or tokenizer.model one folder up (Meta's layout,
    where it sits beside the 7B/ folder)."""
    for candidate in (weights_dir / "tokenizer.model", weights_dir / "tokenizer.json", weights_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


# ---- finding the files ---------------------------------------------------------------------------------


def _open_directory(d: Path, params: Path | None, rope: Mapping[str, float] | None) -> Checkpoint:
    if shard_index(d) is not None and find_pickle_dir(d) is not None:  # a consolidated.NN/ folder named itself
        return _open_meta(d, find_shards(d.parent), d.parent, params, rope)
    ggufs = sorted(d.glob("*.gguf"))
    indexes = sorted(d.glob("*.safetensors.index.json"))
    safetensors = sorted(d.glob("*.safetensors"))
    shards = find_shards(d)
    kinds = [kind for kind, found in (("GGUF", ggufs), ("safetensors", safetensors), ("Meta .pth", shards)) if found]
    if len(kinds) > 1:
        raise ModelFileError(f"{d}: holds several checkpoints ({', '.join(kinds)}); name the file to load")
    if ggufs:
        model = gguf_model_file(ggufs)  # the only file, or a split model's first part
        if model is None:
            raise ModelFileError(f"{d}: holds {len(ggufs)} .gguf files; name the one to load")
        return _open_gguf(model, params)
    if safetensors:
        if len(indexes) > 1:
            raise ModelFileError(f"{d}: holds {len(indexes)} safetensors index files; name the one to load")
        if indexes:
            return _open_hf(d, [], indexes[0], d, params)
        if len(safetensors) > 1:
            raise ModelFileError(f"{d}: holds {len(safetensors)} .safetensors files and no {INDEX_NAME}")
        return _open_hf(d, safetensors, None, d, params)
    if shards:
        return _open_meta(d, shards, d, params, rope)
    if find_pickle_dir(d) is not None:  # an unzipped .pth under another name
        return _open_meta(d, [d], d, params, rope)
    raise ModelFileError(f"{d}: no model weights found (*.gguf, *.safetensors or consolidated.NN.pth)")


def _open_file(f: Path, params: Path | None, rope: Mapping[str, float] | None) -> Checkpoint:
    try:
        with open(f, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ModelFileError(f"{f}: cannot read ({e.strerror})") from None
    if f.suffix == ".gguf" or magic == b"GGUF":
        return _open_gguf(f, params)
    if f.name.endswith(".safetensors.index.json"):
        return _open_hf(f, [], f, f.parent, params)
    if f.suffix == ".safetensors":
        index = f.parent / INDEX_NAME
        if index.is_file() and f in shard_files(index).values():  # one shard of a set: load the set
            return _open_hf(f, [], index, f.parent, params)
        return _open_hf(f, [f], None, f.parent, params)
    if f.suffix in (".pth", ".pt") or magic == b"PK\x03\x04":
        shards = find_shards(f.parent) if shard_index(f) is not None else [f]
        return _open_meta(f, shards, f.parent, params, rope)
    raise ModelFileError(f"{f}: not a model file this program reads (.gguf, .safetensors, .pth)")


def _open_gguf(f: Path, params: Path | None) -> Checkpoint:
    if params is not None:
        log.warning("%s: GGUF files carry their own config; ignoring %s", f, params)
    return GGUFCheckpoint.open(f)


def _open_hf(model_path: Path, files: list[Path], index: Path | None, weights_dir: Path, params: Path | None) -> Checkpoint:
    config = params or weights_dir / "config.json"
    if not config.is_file():
        raise ModelFileError(f"{config}: file not found (safetensors checkpoints need config.json beside them)")
    return SafetensorsCheckpoint.open(model_path, files, index, config, find_tokenizer(weights_dir))


def _open_meta(model_path: Path, shards: list[Path], weights_dir: Path, params: Path | None,
               rope: Mapping[str, float] | None) -> Checkpoint:
    params = params or weights_dir / "params.json"
    if not params.is_file():
        raise ModelFileError(f"{params}: file not found (Meta checkpoints need params.json beside them)")
    return MetaCheckpoint.open(model_path, shards, params, find_tokenizer(weights_dir), rope)
