"""GGUF files (llama.cpp), architecture ``llama``.

The file is memory-mapped (:mod:`.gguf_header` reads its header); float tensors are returned as copy-on-write
views of it, quantized ones are dequantized one at a time (:mod:`.gguf_dequant`: Q4_0, Q4_1 and Q8_0 in
torch, the rest by ``gguf.quants``): every type gguf.quants can dequantize is read (the K-quants, IQ*, ...).
A split model (``NAME-00001-of-00003.gguf``..., see :mod:`.gguf_split`) is opened from any of its parts and
read from all of them.  GGUF lists dimensions innermost first, but the header's numpy arrays are already
row-major ``(out, in)``, as Meta's are.  llama.cpp's converter has already permuted wq and wk from HF's
rotate-half layout back to Meta's interleaved one, so nothing is permuted here.
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from .. import qblocks
from ..config import ModelArgs
from ..errors import ModelFileError, UnsupportedError, one_line
from ..names import carries_head
from .base import Checkpoint, build_args, check_shapes, layer_table, rename
from .gguf_dequant import dequantize
from .gguf_header import TensorInfo, read_header
from .gguf_split import SPLIT_TENSORS, check_part, check_tensor_total, part_paths

Q = GGMLQuantizationType

# GGUF name -> Meta name, the one mapping for this format.
GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}

# Tensor types we read: floats are viewed in place, the rest dequantized by gguf.quants (dequantizable()).
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether the installed gguf can dequantize ``qtype``.  Asked by dequantizing one zero block rather than
    listed, so each gguf release's new types are read without a change here; gguf has no public query, and
    ``quants.dequantize`` raises NotImplementedError for a type it lacks (Q8_1, Q8_K, the integer types...)."""
    if qtype in FLOAT_TYPES:
        return True
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        gguf_dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Part:
    """One file of a (possibly split) model: the whole model, or one part of a split one."""

    path: Path
    tensors: list[TensorInfo]
    fields: dict[str, Any]  # the metadata as python values (the ``GGUF.*`` header entries too)


def _open_part(path: Path) -> Part:
    try:
        header = read_header(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (ValueError, struct.error, OSError) as e:  # a short or bad file
        raise ModelFileError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
    return Part(path, header.tensors, header.fields)


def _open_parts(path: Path) -> tuple[list[Part], dict[str, Path]]:
    """The files of the model ``path`` is (a part of), first part first, each checked to be the part its name
    says; and the file of each tensor (by GGUF name), which must be in one part only."""
    named = _open_part(path)
    parts = [named if p == path else _open_part(p) for p in part_paths(path, named.fields)]
    first = parts[0]
    if len(parts) > 1:
        for no, part in enumerate(parts, 1):
            check_part(part.path, part.fields, no, len(parts), first.fields.get(SPLIT_TENSORS))
    file_of: dict[str, Path] = {}
    for part in parts:
        for t in part.tensors:
            if t.name in file_of:
                raise ModelFileError(f"{part.path}: tensor {t.name!r} is also in {file_of[t.name]}")
            file_of[t.name] = part.path
    if len(parts) > 1:
        check_tensor_total(first.path, first.fields, len(file_of))
    return parts, file_of


@dataclasses.dataclass(eq=False)
class GGUFCheckpoint(Checkpoint):
    _parts: list[Part] = dataclasses.field(default_factory=list, repr=False)
    _tensors: dict[str, TensorInfo] = dataclasses.field(default_factory=dict, repr=False)  # by Meta name
    _files: dict[str, Path] = dataclasses.field(default_factory=dict, repr=False)  # Meta name -> its part's path

    @classmethod
    def open(cls, path: Path) -> "GGUFCheckpoint":
        parts, file_of = _open_parts(path)
        # From here on ``path`` is the file with the metadata: a split model's first part, whichever was named.
        path, fields = parts[0].path, parts[0].fields
        arch = fields.get("general.architecture")
        if arch != "llama":
            raise UnsupportedError(f"{path}: unsupported architecture {arch!r} (only 'llama')")
        by_name = {t.name: t for part in parts for t in part.tensors}
        for t in by_name.values():
            if not dequantizable(t.tensor_type):
                raise UnsupportedError(f"{file_of[t.name]}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                                       "(gguf.quants cannot dequantize it)")
        # Llama 3.1's rope scaling, as llama.cpp's converter stores it: one divisor per rotary frequency.
        freqs = by_name.pop("rope_freqs.weight", None)
        if freqs is not None and freqs.tensor_type not in (Q.F32, Q.F16):
            raise UnsupportedError(f"{path}: rope_freqs.weight has type {freqs.tensor_type.name} (expected F32)")
        rope_freqs = None if freqs is None else np.asarray(freqs.data, dtype=np.float32).reshape(-1).tolist()
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens:
            vocab = len(tokens)
        elif "token_embd.weight" in by_name:
            vocab = int(by_name["token_embd.weight"].shape[-1])
        else:
            raise ModelFileError(f"{path}: missing tensor 'token_embd.weight'")
        tied = not carries_head(by_name)
        args = build_args(path, lambda: ModelArgs.from_gguf_fields(fields, vocab_size=vocab, tie_embeddings=tied,
                                                                   rope_freqs=rope_freqs))
        table = layer_table(GGUF_NAMES, args.n_layers)
        renamed = rename(path, by_name, table)
        tensors = {meta: by_name[name] for meta, name in renamed.items()}
        # GGUF writes dimensions innermost first: (in, out) -> Meta's (out, in).
        shapes = {meta: tuple(reversed(t.shape)) for meta, t in tensors.items()}
        check_shapes(path, args, shapes, table)
        files = {meta: file_of[name] for meta, name in renamed.items()}
        return cls(args, "gguf", path, path, fields, parts, tensors, files)

    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self._tensors[name]
        try:
            if t.tensor_type in FLOAT_TYPES:
                # The header gives F32/F16 as typed arrays, BF16 as raw bytes (2 per value).
                data = torch.from_numpy(np.asarray(t.data))
                if t.tensor_type == Q.BF16:
                    data = data.view(torch.bfloat16)
                return data.reshape(self.shape(name))
            return dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        except (ValueError, RuntimeError) as e:
            raise ModelFileError(f"{self._files[name]}: cannot read tensor {t.name!r} ({one_line(e)})") from None

    def block_types(self) -> dict[str, int]:
        return {name: int(t.tensor_type) for name, t in self._tensors.items() if t.tensor_type not in FLOAT_TYPES}

    def _blocks(self, name: str) -> qblocks.BlockWeight | None:
        t = self._tensors[name]
        if t.tensor_type in FLOAT_TYPES or len(self.shape(name)) != 2:  # a quantized norm: dequantized to f32
            return None
        try:
            raw = torch.from_numpy(np.asarray(t.data)).reshape(self.shape(name)[0], -1)  # (N, bytes of a row)
            return qblocks.from_bytes(raw, t.tensor_type)
        except (ValueError, RuntimeError) as e:
            raise ModelFileError(f"{self._files[name]}: cannot read tensor {t.name!r} ({one_line(e)})") from None

    def _quant_type(self, name: str) -> str | None:
        t = self._tensors[name].tensor_type
        return None if t in FLOAT_TYPES else t.name

    def _stored_dtype(self, name: str) -> torch.dtype:
        return FLOAT_TYPES.get(self._tensors[name].tensor_type, torch.float32)

    def close(self) -> None:
        self._parts = []
        self._tensors = {}
