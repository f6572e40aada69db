"""One named POSIX shared-memory segment of tensors: what the weight shards (:mod:`.shm`) and the workers'
reduction segment (:mod:`.allreduce`) are made of.

A segment is a small header, a JSON manifest (name, dtype, shape, offset of every tensor, and whatever its
maker adds) and the tensors, each starting on a 64-byte boundary.  Readers map it and wrap each tensor with
``torch.frombuffer``: no copy, and bf16 needs no numpy dtype.

Trust: /dev/shm is writable by every local user, so a name says nothing about who made a segment, and a
segment's bytes become weights or partial sums.  :meth:`Segment.create` makes a new file with mode 0600
(``O_EXCL``: a name that exists, planted or stale, is never reused); :meth:`Segment.attach` maps only a
regular file (``O_NOFOLLOW``) owned by this process's effective uid with no group or other permission bits,
checked with ``fstat`` on the descriptor it maps, so the check and the mapping see the same file.  Anything
else is a :class:`ForeignSegmentError`.  Linux only: segments are opened under /dev/shm.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import stat
import struct
import warnings
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Mapping

import torch

from .errors import ShardllamaError

SHM_DIR = Path("/dev/shm")
PREFIX = "shardllama-"
FORMAT_VERSION = 1
MAGIC = b"shllama\0"
HEADER = struct.Struct("<8sIIQ")  # magic, format version, ready flag, manifest length
READY_OFFSET = 12
ALIGN = 64
MODE = 0o600  # what multiprocessing.shared_memory creates with (its _mode); attach() insists on it


class ForeignSegmentError(ShardllamaError):
    """A segment that this user did not make, or that others may write: never mapped as ours."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def run_tag() -> str:
    """Names one run's private segments: its pid (for people reading /dev/shm) and a random part, so that no
    one can plant a segment under a name the run is about to create."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def segment_name(key: str, part: str, tag: str | None = None) -> str:
    """Kept segments are named by the key alone; a run's private ones also by its :func:`run_tag`."""
    return f"{PREFIX}{key}-{part}" if tag is None else f"{PREFIX}{key}-{tag}-{part}"


def check_owner(name: str, st: os.stat_result) -> None:
    """ForeignSegmentError unless ``st`` is a regular file of this user's that no one else may open."""
    if not stat.S_ISREG(st.st_mode):
        raise ForeignSegmentError(f"{SHM_DIR / name} is not a regular file")
    if st.st_uid != os.geteuid():
        raise ForeignSegmentError(f"{SHM_DIR / name} is owned by uid {st.st_uid}, not by this user "
                                  f"(uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise ForeignSegmentError(f"{SHM_DIR / name} has mode {stat.S_IMODE(st.st_mode):04o}; "
                                  f"shardllama maps only segments of mode {MODE:04o}")


class Segment:
    """One shared-memory segment of named tensors."""

    def __init__(self, name: str, buf: memoryview, manifest: dict, owner: shared_memory.SharedMemory | None,
                 mm: mmap.mmap | None, st: os.stat_result | None = None):
        self.name = name
        self.buf = buf
        self.manifest = manifest
        self._owner = owner  # the SharedMemory object when this process created the segment
        self._mmap = mm
        self.uid = os.geteuid() if st is None else st.st_uid
        self.foreign = False  # set by attach(trusted=False) for a segment check_owner refuses

    @classmethod
    def create(cls, name: str, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], info: dict) -> "Segment":
        """A new segment sized for ``layout``; registered with the resource tracker until :meth:`keep`.
        FileExistsError if the name is taken."""
        tensors, offset = {}, 0
        for tname, (dtype, shape) in layout.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            tensors[tname] = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape), "offset": offset}
            offset = _align(offset + nbytes)
        manifest = dict(info, tensors=tensors)
        # Offsets count from the data start, known only once the manifest's length is.
        text = json.dumps(manifest).encode()
        data_start = _align(HEADER.size + len(text) + 32)
        manifest["data_start"] = data_start
        text = json.dumps(manifest).encode()
        assert HEADER.size + len(text) <= data_start
        assert shared_memory.SharedMemory._mode == MODE  # created 0600 (less with a umask): attach() checks
        shm = shared_memory.SharedMemory(name, create=True, size=max(data_start + offset, 1))
        HEADER.pack_into(shm.buf, 0, MAGIC, FORMAT_VERSION, 0, len(text))
        shm.buf[HEADER.size : HEADER.size + len(text)] = text
        return cls(name, shm.buf, manifest, shm, None)

    @classmethod
    def attach(cls, name: str, writable: bool = False, trusted: bool = True) -> "Segment":
        """Map an existing segment without registering it anywhere (so no exit of ours unlinks it).
        ForeignSegmentError for a segment :func:`check_owner` refuses; ``trusted=False`` (listing only) maps
        one anyway, read-only, marked ``foreign``.  ValueError if it is not a segment of this format."""
        try:
            fd = os.open(SHM_DIR / name, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)
        except PermissionError:
            raise ForeignSegmentError(f"{SHM_DIR / name} is not readable by this user (uid {os.geteuid()})") from None
        except OSError:
            if not os.path.islink(SHM_DIR / name):
                raise
            raise ForeignSegmentError(f"{SHM_DIR / name} is a symbolic link") from None
        try:
            st = os.fstat(fd)
            try:
                check_owner(name, st)
                foreign = False
            except ForeignSegmentError:
                if trusted or writable:
                    raise
                foreign = True
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        try:
            magic, version, _, length = HEADER.unpack_from(mm, 0)
            if magic != MAGIC or version != FORMAT_VERSION or HEADER.size + length > len(mm):
                raise ValueError(f"{name}: not a shardllama segment of format {FORMAT_VERSION}")
            manifest = json.loads(mm[HEADER.size : HEADER.size + length])
            if not isinstance(manifest, dict):
                raise ValueError(f"{name}: its manifest is not a JSON object")
        except (ValueError, struct.error) as e:
            mm.close()
            raise ValueError(f"{name}: not a shardllama segment of format {FORMAT_VERSION}") from e
        seg = cls(name, memoryview(mm), manifest, None, mm, st)
        seg.foreign = foreign
        return seg

    @property
    def ready(self) -> bool:
        return struct.unpack_from("<I", self.buf, READY_OFFSET)[0] == 1

    def mark_ready(self) -> None:
        struct.pack_into("<I", self.buf, READY_OFFSET, 1)

    def keep(self) -> None:
        """Let the segment outlive this process."""
        assert self._owner is not None
        resource_tracker.unregister(self._owner._name, "shared_memory")

    def tensor(self, name: str) -> torch.Tensor:
        """A view of one tensor, sharing the segment's memory."""
        t = self.manifest["tensors"][name]
        dtype, shape = getattr(torch, t["dtype"]), torch.Size(t["shape"])
        if shape.numel() == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self.manifest["data_start"] + t["offset"]
        with warnings.catch_warnings():  # a read-only mapping: the weights are never written through it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.buf, dtype=dtype, count=shape.numel(), offset=offset)
        return flat.view(shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.manifest["tensors"]}

    def nbytes(self) -> int:
        return len(self.buf)

    def close(self) -> None:
        """Unmap; tensors still viewing the segment keep the mapping alive until they are gone."""
        try:
            if self._owner is not None:
                self._owner.close()
            else:
                self.buf.release()
                self._mmap.close()
        except BufferError:
            pass  # views are alive somewhere; the mapping goes with them

    def unlink(self) -> None:
        try:
            if self._owner is not None:
                self._owner.unlink()  # also tells the resource tracker
            else:
                os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass
