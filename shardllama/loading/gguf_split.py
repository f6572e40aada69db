"""Split GGUF models: which files make one model, and whether they agree.

llama.cpp's ``llama-gguf-split --split`` (and gguf-py's ``GGUFWriter(split_max_tensors=...)``, which
``convert_hf_to_gguf.py --split-max-tensors`` uses) writes ``NAME-00001-of-00003.gguf`` ... : numbered from
1 in the name, from 0 in the metadata.  Every part carries ``split.no`` (u16), ``split.count`` (u16) and
``split.tensors.count`` (i32, the tensors of all parts together); only the first part carries the rest of the
metadata (config, vocabulary), and each tensor sits in exactly one part (the first part holds none when
written with ``--no-tensor-first-split``).

The metadata is what says a file is a part: a file merely *named* like one, whose ``split.count`` is absent
or 1, is a whole model.  The names are what find the other parts, as llama.cpp finds them.  Reading the
parts stays in :mod:`.gguf_file`; this module only works on names and metadata values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ModelFileError

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"

# llama.cpp's llama_split_path: "%s-%05d-of-%05d.gguf" (5 digits at least, more past 99999).
_PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5,})-of-(?P<count>\d{5,})\.gguf$")


def part_name(prefix: str, no: int, count: int) -> str:
    """The file name of part ``no`` (1-based, as in the name) of ``count``."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def _parse(name: str) -> tuple[str, int, int] | None:
    m = _PART_NAME.match(name)
    return (m["prefix"], int(m["no"]), int(m["count"])) if m else None


def _int_field(path: Path, fields: Mapping[str, Any], key: str) -> int:
    value = fields.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFileError(f"{path}: split metadata {key!r} is {value!r}, expected an integer")
    return value


def split_count(path: Path, fields: Mapping[str, Any]) -> int:
    """How many parts the model of this file has (1 for a whole model)."""
    return 1 if fields.get(SPLIT_COUNT) is None else _int_field(path, fields, SPLIT_COUNT)


def part_paths(path: Path, fields: Mapping[str, Any]) -> list[Path]:
    """Every part of the model that ``path`` (any of its parts; ``fields`` its metadata) belongs to, first
    part first; ``[path]`` for a whole model.  A missing part is named."""
    count = split_count(path, fields)
    if count <= 1:
        return [path]
    no = _int_field(path, fields, SPLIT_NO) + 1
    parsed = _parse(path.name)
    if parsed is None or parsed[1:] != (no, count):
        want = part_name("NAME", no, count)
        raise ModelFileError(f"{path}: split part {no} of {count}, but not named {want}, so the other parts cannot be found")
    paths = [path.with_name(part_name(parsed[0], i, count)) for i in range(1, count + 1)]
    for i, p in enumerate(paths, 1):
        if not p.is_file():
            raise ModelFileError(f"{p}: file not found (part {i} of {count} of the split model {path.name})")
    return paths


def check_part(path: Path, fields: Mapping[str, Any], no: int, count: int, total: int) -> None:
    """Part ``no`` (1-based) says it is that part of ``count`` holding ``total`` tensors in all (as the first
    part says): a stray file from another split under a part's name is caught here."""
    for key, want in ((SPLIT_COUNT, count), (SPLIT_NO, no - 1), (SPLIT_TENSORS, total)):
        if fields.get(key) is None:
            raise ModelFileError(f"{path}: split part {no} of {count} without metadata {key!r}")
        got = _int_field(path, fields, key)
        if got != want:
            raise ModelFileError(f"{path}: split metadata {key!r} is {got}, expected {want} (part {no} of {count})")


def check_tensor_total(first: Path, fields: Mapping[str, Any], found: int) -> None:
    """The parts together hold the ``split.tensors.count`` tensors the first part announces."""
    total = _int_field(first, fields, SPLIT_TENSORS)
    if found != total:
        raise ModelFileError(f"{first}: split.tensors.count is {total} but the parts hold {found} tensors")


def model_file(ggufs: Sequence[Path]) -> Path | None:
    """The one model among a directory's ``.gguf`` files: the only file, or the first part (by name) of the
    only split set; None when they are several models."""
    if len(ggufs) == 1:
        return ggufs[0]
    parsed = [_parse(p.name) for p in ggufs]
    if any(p is None for p in parsed) or len({p[0::2] for p in parsed if p is not None}) != 1:
        return None
    return min(ggufs, key=lambda p: _parse(p.name)[1])  # type: ignore[index]  # parsed above


def named_parts(path: Path) -> list[Path]:
    """``path`` and every existing file named as a part of the same split (``[path]`` for a file not named
    like a part), first part first: the files a split model's identity covers, found without reading any
    metadata (a file merely named like a part costs at most a few extra files in the identity)."""
    parsed = _parse(path.name)
    if parsed is None:
        return [path]
    try:
        siblings = [path.with_name(name) for name in os.listdir(path.parent)]
    except OSError:
        return [path]
    same = [p for p in siblings if (q := _parse(p.name)) and (q[0], q[2]) == (parsed[0], parsed[2]) and p.is_file()]
    return sorted(set(same) | {path}, key=lambda p: _parse(p.name)[1])  # type: ignore[index]  # parsed above
