"""What a model is, as files on disk, cheaply enough to compute at every start.

Kept weight shards (:mod:`.shm`) and the prompt cache on disk (:mod:`.engine.prompt_store`) reuse state
computed from a model's files and may trust it only while the files are the same.  Hashing whole files
would cost as much as reading them, and kept shards exist to start in seconds, so each file is described by
what ``stat`` says — size, modification time (ns), inode, owner — plus a SHA-256 of its first 64 KiB (a
GGUF's or safetensors' header: metadata and tensor table) and of 16 blocks of 4 KiB spread evenly over the
rest.  A copy, a move, a touch or a rewrite changes the description.  It guards against stale state and
accidents; whoever can write the model file can change the weights anyway.

A model is a file, every part of a split GGUF (``NAME-00001-of-00003.gguf`` ...), or every file of a
directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import ModelFileError
from .loading.gguf_split import named_parts

HEAD = 64 * 1024  # hashed whole: the header of every format we read fits (tensor data starts later)
BLOCK = 4096
SAMPLES = 16


def model_files(model_path: str | os.PathLike, exclude: Path | None = None) -> tuple[Path, list[Path]]:
    """The resolved model path and the files that make the model, sorted; ``exclude``: a directory inside
    a model directory whose files are not the model's (a prompt cache kept beside the weights)."""
    path = Path(model_path).resolve()
    if not path.exists():
        raise ModelFileError(f"{model_path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else named_parts(path)
    if exclude is not None:
        exclude = exclude.resolve()
        files = [f for f in files if exclude not in f.parents]
    return path, files


def fingerprint(model_path: str | os.PathLike, exclude: Path | None = None) -> dict:
    """``{"path": resolved path, "files": [[name, size, mtime_ns, inode, uid, sha256 of samples], ...]}``,
    JSON-ready; names are relative to a model directory, else the file names."""
    path, files = model_files(model_path, exclude)
    listing = []
    for f in files:
        try:
            listing.append([str(f.relative_to(path)) if path.is_dir() else f.name, *_describe(f)])
        except OSError as e:
            raise ModelFileError(f"{f}: cannot read ({e.strerror or e})") from None
    return {"path": str(path), "files": listing}


def _describe(file: Path) -> list:
    fd = os.open(file, os.O_RDONLY)
    try:
        st = os.fstat(fd)  # of the file read, not of whatever the name points to a moment later
        h = hashlib.sha256(os.pread(fd, HEAD, 0))
        rest = st.st_size - HEAD - BLOCK
        if rest > 0:
            for i in range(1, SAMPLES + 1):
                h.update(os.pread(fd, BLOCK, HEAD + rest * i // SAMPLES))
    finally:
        os.close(fd)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_uid, h.hexdigest()]
