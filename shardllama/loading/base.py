"""What every checkpoint format provides: Meta names, Meta layout, one tensor at a time.

A format module opens its files, renames its tensors into Meta's names through one table, checks the
names and shapes against :func:`shardllama.model.expected_shapes` (so a bad file fails when it is opened,
not halfway through loading) and then only has to implement :meth:`Checkpoint._read`.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .. import qblocks
from ..config import ModelArgs
from ..errors import ModelFileError, ShardllamaError, UsageError, one_line
from ..model import expected_shapes

@dataclasses.dataclass(eq=False)
class Checkpoint(abc.ABC):
    """An open checkpoint; subclasses hold the format's file handles (all memory-mapped)."""

    args: ModelArgs
    format: str  # "meta" | "safetensors" | "gguf"
    path: Path  # the model file or directory the user named
    tokenizer_path: Path | None  # tokenizer.model / tokenizer.json beside the weights, the .gguf itself, or None
    gguf_fields: dict | None = None  # GGUF metadata as plain python values (gguf only)

    def __post_init__(self) -> None:
        self.native_dtype, self.quant_types  # noqa: B018 -- computed from the headers while the files are open, then cached

    @functools.cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return expected_shapes(self.args)

    def names(self) -> list[str]:
        """Meta names of the weights, in model order (every format is checked complete when opened)."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one weight in Meta layout, without reading it."""
        return self._shapes[name]

    @functools.cached_property
    def native_dtype(self) -> torch.dtype:
        """The precision most matrices are stored in (quantized GGUF types count as float32, what they
        dequantize to), without reading them."""
        counts = collections.Counter(self._stored_dtype(n) for n in self._shapes if len(self._shapes[n]) == 2)
        return counts.most_common(1)[0][0]

    @abc.abstractmethod
    def _stored_dtype(self, name: str) -> torch.dtype: ...

    @functools.cached_property
    def quant_types(self) -> list[str]:
        """The quantized types (GGUF's names: ``Q4_K``, ``Q6_K``...) its matrices are stored in; [] for floats."""
        return sorted({q for n, s in self._shapes.items() if len(s) == 2 and (q := self._quant_type(n)) is not None})

    def _quant_type(self, name: str) -> str | None:
        """The quantized type weight ``name`` is stored in, or None for a float one."""
        return None

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor | qblocks.BlockWeight:
        """One full weight in Meta layout, converted to ``dtype``, contiguous; with ``qblocks.GGUF`` a quantized
        weight as its blocks (:meth:`block_types`) and the rest in f32.

        The result owns its memory or, when no conversion was needed, is a copy-on-write view of the
        memory-mapped file: writing to it never touches the file, but while this checkpoint is open a later
        ``load`` of the same name may see the write.  Treat loaded weights as read-only.
        """
        if name not in self._shapes:
            raise KeyError(f"{name!r} is not a weight of this model")
        if dtype == qblocks.GGUF:  # quantized weights as their blocks, the rest in f32
            blocks = self._blocks(name)
            if blocks is not None:
                return blocks
            dtype = torch.float32
        if not dtype.is_floating_point:  # int8 comes from quant.stored, never from a plain cast
            raise UsageError(f"checkpoint weights load as a float dtype, not {dtype}; int8 models quantize them "
                             "(shardllama.loading.load_weights)")
        t = self._read(name, dtype)
        if tuple(t.shape) != self._shapes[name]:
            raise ModelFileError(f"{self.path}: tensor {name!r} has shape {tuple(t.shape)}, expected {self._shapes[name]}")
        return t.to(dtype).contiguous()

    def block_types(self) -> dict[str, int]:
        """Weight name -> its GGUF quantized type, for the weights that ``load(name, qblocks.GGUF)`` gives as
        blocks (without reading them)."""
        return {}

    def _blocks(self, name: str) -> qblocks.BlockWeight | None:
        """Weight ``name`` as the blocks of its quantized type (a view of the file), or None for a float one."""
        return None

    @abc.abstractmethod
    def _read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in Meta layout, in whatever dtype is cheapest (``load`` converts)."""

    def close(self) -> None:
        """Release the file handles.  Tensors already loaded stay valid (they keep their own mapping)."""

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def layer_table(table: Mapping[str, str], n_layers: int) -> dict[str, str]:
    """Expand a ``{format name: Meta name}`` table whose per-layer entries hold ``{i}`` into every layer."""
    out: dict[str, str] = {}
    for src, dst in table.items():
        if "{i}" in src:
            out.update({src.format(i=i): dst.format(i=i) for i in range(n_layers)})
        else:
            out[src] = dst
    return out


def rename(path: Path, names: Iterable[str], table: Mapping[str, str]) -> dict[str, str]:
    """``{Meta name: format name}`` for the tensors of a file; a name not in the table is an error."""
    out: dict[str, str] = {}
    for name in names:
        if name not in table:
            raise ModelFileError(f"{path}: unknown tensor {name!r}")
        out[table[name]] = name
    return out


def check_shapes(path: Path, args: ModelArgs, shapes: Mapping[str, tuple[int, ...]],
                 table: Mapping[str, str] | None = None) -> None:
    """Every weight of ``args`` is present with its expected shape, and nothing else is.

    ``table`` (the format's expanded ``{format name: Meta name}``) lets messages use the file's own names.
    """
    expected = expected_shapes(args)
    own = {meta: src for src, meta in (table or {}).items()}

    def called(name: str) -> str:
        return f"{own[name]!r} ({name})" if name in own and own[name] != name else repr(name)

    for name in shapes:
        if name not in expected:
            raise ModelFileError(f"{path}: unknown tensor {called(name)}")
    for name, want in expected.items():
        if name not in shapes:
            raise ModelFileError(f"{path}: missing tensor {called(name)}")
        if tuple(shapes[name]) != want:
            raise ModelFileError(f"{path}: tensor {called(name)} has shape {tuple(shapes[name])}, expected {want}")


def build_args(path: Path, build: Callable[[], ModelArgs]) -> ModelArgs:
    """Run a ``ModelArgs.from_*`` constructor; whatever it objects to becomes one line naming ``path``."""
    try:
        return build()
    except ShardllamaError as e:
        raise with_path(path, e) from None
    except (TypeError, ValueError, AttributeError) as e:  # e.g. a list or null where a number belongs
        raise ModelFileError(f"{path}: malformed model config ({one_line(e)})") from None


def with_path(path: Path, error: ShardllamaError) -> ShardllamaError:
    """The same error, its message prefixed with the file it is about (unless it names it already)."""
    message = str(error)
    if str(path) in message:
        return error
    return type(error)(f"{path}: {message}")
