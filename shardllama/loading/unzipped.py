"""A ``consolidated.NN.pth`` that was unzipped into a directory (rllama's layout).

Such a directory holds ``data.pkl`` (the pickled state dict) and ``data/<key>``, one raw file per storage.
The pickle is read with the standard library's unpickler, restricted to the few globals a state dict of
plain tensors needs; storages are memory-mapped from ``data/<key>``, so nothing is read until used.  A key
is a file name inside ``data/`` and nothing else: the pickle is as untrusted as the weights, and a key like
``../../x`` or ``/etc/shadow`` would otherwise map any file the user can read into the model.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError, UnsupportedError, one_line

# What torch.save writes for each storage type (the legacy typed-storage class names carry the dtype).
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def find_pickle_dir(directory: Path) -> Path | None:
    """The folder holding ``data.pkl``: ``directory`` itself or its single subfolder that has one."""
    if (directory / "data.pkl").is_file():
        return directory
    if not directory.is_dir():
        return None
    inner = [d for d in sorted(directory.iterdir()) if d.is_dir() and (d / "data.pkl").is_file()]
    return inner[0] if len(inner) == 1 else None


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    # The other arguments (requires_grad, backward hooks, metadata) mean nothing for inference weights.
    return storage.as_strided(size, stride, offset)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, root: Path):
        super().__init__(file)
        self.root = root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain tensors are allowed)")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        # ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _, numel = pid
        key = str(key)
        if key not in self.storages:
            file = self._storage_file(key)
            need = int(numel) * storage_type.dtype.itemsize
            if not file.is_file() or file.stat().st_size < need:
                raise ModelFileError(f"{file}: missing or shorter than the {need} bytes data.pkl expects")
            # shared=False maps the file privately: pages are read on first use, writes stay in memory.
            self.storages[key] = torch.from_file(str(file), shared=False, size=int(numel), dtype=storage_type.dtype)
        return self.storages[key]

    def _storage_file(self, key: str) -> Path:
        """``data/<key>``, refusing a key that names (or, through a link, resolves to) anything outside it."""
        data = self.root / "data"
        file = data / key
        plain = key not in ("", ".", "..") and "/" not in key and "\\" not in key and "\0" not in key
        if not plain or file.resolve().parent != data.resolve():
            raise ModelFileError(f"{self.root / 'data.pkl'}: storage key {key!r} points outside {data}")
        return file


def load_unzipped(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict of an unzipped torch checkpoint, every tensor a view of a memory-mapped file."""
    root = find_pickle_dir(directory)
    if root is None:
        raise ModelFileError(f"{directory}: no data.pkl in it (or in a single subfolder)")
    byteorder = root / "byteorder"
    if byteorder.is_file() and byteorder.read_text().strip() not in ("", "little"):
        raise UnsupportedError(f"{directory}: big-endian checkpoints are not supported")
    try:
        with open(root / "data.pkl", "rb") as f:
            state = _Unpickler(f, root).load()
    except ModelFileError:
        raise
    except Exception as e:  # a corrupt pickle raises anything from EOFError to KeyError
        raise ModelFileError(f"{root / 'data.pkl'}: cannot unpickle ({one_line(e)})") from None
    return state
