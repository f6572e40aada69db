"""Hugging Face checkpoints: ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``)
with ``config.json`` beside them.

HF stores wq / wk with each head's rotary pairs split into two halves ("rotate-half"); Meta keeps the two
numbers of a pair adjacent.  :func:`unpermute` undoes the permutation of HF's conversion script, one
weight at a time as it is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelArgs
from ..errors import ModelFileError, UnsupportedError, one_line
from ..names import weight_kind
from .base import Checkpoint, build_args, check_shapes, layer_table, rename

log = logging.getLogger(__name__)

# HF name -> Meta name, the one mapping for this format.
HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# Weights stored in rotate-half layout, and how many heads each holds.
ROTATE_HALF: dict[str, Callable[[ModelArgs], int]] = {
    "attention.wq.weight": lambda a: a.n_heads,
    "attention.wk.weight": lambda a: a.n_kv_heads,
}

INDEX_NAME = "model.safetensors.index.json"

# safetensors' dtype names for the float types a checkpoint may be stored in.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def is_ignored(name: str) -> bool:
    return name.endswith("rotary_emb.inv_freq")  # old transformers saved the rotary frequencies


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows (per head: all first halves, then all second halves) -> Meta interleaved pairs."""
    out_dim, dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(out_dim, dim)


def shard_files(index_path: Path) -> dict[str, Path]:
    """``{HF tensor name: file}`` from a ``model.safetensors.index.json``."""
    directory = index_path.parent
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {str(name): directory / str(file) for name, file in weight_map.items()}
    except FileNotFoundError:
        raise ModelFileError(f"{index_path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{index_path}: not a safetensors index ({one_line(e)})") from None


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")  # memory-maps the file; tensors are read on first use
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


@dataclasses.dataclass(eq=False)
class SafetensorsCheckpoint(Checkpoint):
    _handles: dict[Path, Any] = dataclasses.field(default_factory=dict, repr=False)
    _where: dict[str, tuple[Path, str]] = dataclasses.field(default_factory=dict, repr=False)  # Meta name -> (file, HF name)

    @classmethod
    def open(cls, model_path: Path, files: list[Path], index_path: Path | None, config_path: Path,
             tokenizer_path: Path | None) -> "SafetensorsCheckpoint":
        args = build_args(config_path, lambda: ModelArgs.from_hf_config(config_path))
        listed = shard_files(index_path) if index_path is not None else {}
        if listed:
            files = sorted(set(listed.values()))
        handles = {p: _open(p) for p in files}
        table = layer_table(HF_NAMES, args.n_layers)
        where: dict[str, tuple[Path, str]] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for path, h in handles.items():
            keys = [k for k in h.keys() if not is_ignored(k)]
            if args.tie_embeddings and "lm_head.weight" in keys:
                log.info("%s: ignoring lm_head.weight, the model ties it to the embeddings", path)
                keys.remove("lm_head.weight")
            for meta, hf in rename(path, keys, table).items():
                if meta in where:
                    raise ModelFileError(f"{path}: tensor {hf!r} is also in {where[meta][0].name}")
                if listed and listed.get(hf) != path:
                    raise ModelFileError(f"{path}: holds {hf!r}, which {index_path.name} places elsewhere")
                where[meta] = (path, hf)
                shapes[meta] = tuple(h.get_slice(hf).get_shape())
        for hf, path in listed.items():
            if not is_ignored(hf) and hf in table and table[hf] not in where and not (hf == "lm_head.weight" and args.tie_embeddings):
                raise ModelFileError(f"{path}: missing tensor {hf!r} that {index_path.name} lists")
        check_shapes(files[0] if len(files) == 1 else model_path, args, shapes, table)
        return cls(args, "safetensors", model_path, tokenizer_path, None, handles, where)

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        path, hf = self._where[name]
        try:
            t = self._handles[path].get_tensor(hf)
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{path}: cannot read {hf!r} ({one_line(e)})") from None
        heads = ROTATE_HALF.get(weight_kind(name))
        return unpermute(t, heads(self.args)) if heads else t

    def _stored_dtype(self, name: str) -> torch.dtype:
        path, hf = self._where[name]
        stored = self._handles[path].get_slice(hf).get_dtype()
        if stored not in ST_DTYPES:
            raise UnsupportedError(f"{path}: tensor {hf!r} is stored as {stored}, not a float type")
        return ST_DTYPES[stored]

    def close(self) -> None:
        self._handles = {}
