"""Weight shards in named POSIX shared memory: written once by the coordinator, mapped by the workers.

One segment per worker (``shardllama-<key>-r<rank>``) plus one for the coordinator's token embedding
(``shardllama-<key>-emb``).  A segment is a small header, a JSON manifest (name, dtype, shape, offset of
every tensor) and the tensors, each starting on a 64-byte boundary.  Workers map a segment and wrap each
tensor with ``torch.frombuffer``: no copy, and bf16 needs no numpy dtype.

Ownership: the coordinator creates the segments and leaves them registered with Python's resource tracker,
so they are unlinked even when the coordinator is SIGKILLed.  Workers map them with plain ``mmap`` so
their own exit never unlinks anything.  ``keep=True`` unregisters them once they are complete: they outlive
the run, and a later run with the same key maps them instead of writing them again.  Segments of runs
that did not keep them carry the owner's pid in their name, so two runs never share them by accident.

The key names the model file (resolved path, size, mtime), the dtype, N and the layout version.  With int8
weights a segment also holds each matrix's f32 scales (``<name>_scale``) and the embedding stays f32
(``quant.stored`` decides what is stored how).
Linux only: segments are listed and opened under /dev/shm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import struct
import warnings
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import psutil
import torch

from .config import ModelArgs
from .errors import ModelFileError, UsageError
from .model import expected_shapes
from .quant import stored
from .sharding import ShardSpec, shard, worker_weights

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "shardllama-"
FORMAT_VERSION = 1
MAGIC = b"shllama\0"
HEADER = struct.Struct("<8sIIQ")  # magic, format version, ready flag, manifest length
READY_OFFSET = 12
ALIGN = 64
EMBED = "emb"  # the coordinator's segment

Loader = Callable[[str], torch.Tensor]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def shard_key(model_path: str | os.PathLike, dtype: torch.dtype, n_workers: int) -> str:
    """Identifies one set of shards: the model file (or every file of a model directory), dtype and N."""
    path = Path(model_path).resolve()
    if not path.exists():
        raise ModelFileError(f"{model_path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    ident = [str(path), str(dtype), n_workers, FORMAT_VERSION]
    for f in files:
        st = f.stat()
        ident.append([str(f.relative_to(path)) if f != path else "", st.st_size, st.st_mtime_ns])
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]


def segment_name(key: str, part: str, owner_pid: int | None = None) -> str:
    """Kept segments are named by the key alone; a run's private ones also by its pid."""
    return f"{PREFIX}{key}-{part}" if owner_pid is None else f"{PREFIX}{key}-{owner_pid}-{part}"


class Segment:
    """One shared-memory segment of named tensors."""

    def __init__(self, name: str, buf: memoryview, manifest: dict, owner: shared_memory.SharedMemory | None,
                 mm: mmap.mmap | None):
        self.name = name
        self.buf = buf
        self.manifest = manifest
        self._owner = owner  # the SharedMemory object when this process created the segment
        self._mmap = mm

    @classmethod
    def create(cls, name: str, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], info: dict) -> "Segment":
        """A new segment sized for ``layout``; registered with the resource tracker until :meth:`keep`."""
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
        shm = shared_memory.SharedMemory(name, create=True, size=max(data_start + offset, 1))
        HEADER.pack_into(shm.buf, 0, MAGIC, FORMAT_VERSION, 0, len(text))
        shm.buf[HEADER.size : HEADER.size + len(text)] = text
        return cls(name, shm.buf, manifest, shm, None)

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> "Segment":
        """Map an existing segment without registering it anywhere (so no exit of ours unlinks it)."""
        fd = os.open(SHM_DIR / name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        magic, version, _, length = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != FORMAT_VERSION:
            mm.close()
            raise ValueError(f"{name}: not a shardllama segment of format {FORMAT_VERSION}")
        manifest = json.loads(mm[HEADER.size : HEADER.size + length])
        return cls(name, memoryview(mm), manifest, None, mm)

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


class ShardStore:
    """Every segment of one coordinator: the embedding and one per worker."""

    def __init__(self, segments: dict[str, Segment], owned: bool, kept: bool):
        self.segments = segments  # part ("emb", "r0", ...) -> segment
        self.owned = owned  # created by this process (else attached to kept ones)
        self.kept = kept

    def worker_segment(self, rank: int) -> str:
        return self.segments[f"r{rank}"].name

    def embeddings(self) -> torch.Tensor:
        return self.segments[EMBED].tensor("tok_embeddings.weight")

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments.values())

    def close(self) -> None:
        """Unmap, and unlink what this process created unless it is kept."""
        for seg in self.segments.values():
            seg.close()
            if self.owned and not self.kept:
                seg.unlink()
        self.segments = {}

    @classmethod
    def open(
        cls,
        args: ModelArgs,
        specs: Sequence[ShardSpec],
        dtype: torch.dtype,
        load: Loader,
        key: str,
        keep: bool = False,
        info: Mapping | None = None,
    ) -> "ShardStore":
        """Map the kept shards for ``key`` if complete ones exist; otherwise cut ``load``'s weights into new ones."""
        parts = [EMBED] + [f"r{s.rank}" for s in specs]
        store = _attach_kept(key, parts, args)
        if store is not None:
            log.info("using kept shards %s (%.1f MB)", key, store.nbytes() / 1e6)
            return store
        owner = None if keep else os.getpid()
        info = dict(info or {}, key=key, owner_pid=os.getpid(), kept=keep, dtype=str(dtype).removeprefix("torch."),
                    n_workers=len(specs), args=args.to_dict(), version=FORMAT_VERSION)
        layouts = _layouts(args, specs, dtype)
        segments: dict[str, Segment] = {}
        try:
            for part in parts:
                segments[part] = Segment.create(segment_name(key, part, owner), layouts[part], dict(info, part=part))
            _write(args, specs, dtype, load, segments)
            for seg in segments.values():
                seg.mark_ready()
                if keep:
                    seg.keep()
        except BaseException:
            for seg in segments.values():
                seg.close()
                seg.unlink()
            raise
        return cls(segments, owned=True, kept=keep)


def _layouts(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype) -> dict[str, dict]:
    """Part -> {tensor name: (dtype, shape)}; computed by storing and cutting meta tensors with ``stored``
    and ``shard`` themselves (int8 adds each matrix's scales; the embedding stays float)."""
    shapes = expected_shapes(args)

    def layout(name: str, src: str, spec: ShardSpec | None) -> dict:
        parts = stored(name, torch.empty(shapes[src], device="meta"), dtype)
        return {n: (t.dtype, tuple(t.shape if spec is None else shard(n, t, spec).shape)) for n, t in parts.items()}

    layouts = {EMBED: layout("tok_embeddings.weight", "tok_embeddings.weight", None)}
    sources = worker_weights(args)
    for spec in specs:
        layouts[f"r{spec.rank}"] = {k: v for name, src in sources.items() for k, v in layout(name, src, spec).items()}
    return layouts


def _write(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype, load: Loader,
           segments: dict[str, Segment]) -> None:
    """Load each checkpoint weight once, convert (or quantize) it whole, and copy every worker's part of it
    into place."""
    shapes = expected_shapes(args)
    users: dict[str, list[str]] = {"tok_embeddings.weight": []}
    for name, src in worker_weights(args).items():
        users.setdefault(src, []).append(name)
    for src, names in users.items():
        full = load(src)
        if tuple(full.shape) != shapes[src]:
            raise ModelFileError(f"weight {src!r} has shape {tuple(full.shape)}, expected {shapes[src]}")
        if src == "tok_embeddings.weight":
            for n, t in stored(src, full, dtype).items():
                segments[EMBED].tensor(n).copy_(t)
        for name in names:
            parts = stored(name, full, dtype)  # quantized before the cut: every worker holds the reference's numbers
            for spec in specs:
                seg = segments[f"r{spec.rank}"]
                for n, t in parts.items():
                    seg.tensor(n).copy_(shard(n, t, spec))
            del parts
        del full


def _attach_kept(key: str, parts: Sequence[str], args: ModelArgs) -> ShardStore | None:
    """The complete kept shards of ``key``, mapped; None (after removing any incomplete ones) if there are none."""
    names = [segment_name(key, p) for p in parts]
    existing = [n for n in names if (SHM_DIR / n).exists()]
    if not existing:
        return None
    segments = {}
    for part, name in zip(parts, names):
        try:
            segments[part] = Segment.attach(name)
        except (OSError, ValueError):
            pass  # missing or unreadable: the set is incomplete
    if len(segments) == len(parts) and all(s.ready and s.manifest.get("args") == args.to_dict()
                                           for s in segments.values()):
        return ShardStore(segments, owned=False, kept=True)
    writers = {s.manifest.get("owner_pid") for s in segments.values() if not s.ready}
    for s in segments.values():
        s.close()
    if any(pid and pid != os.getpid() and psutil.pid_exists(pid) for pid in writers):
        raise UsageError(f"kept shards {key} are being written by pid {sorted(writers)}; try again when it is done")
    log.warning("removing incomplete or mismatched kept shards %s", key)
    for name in existing:
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass
    return None


# ---- listing and removing kept shards (``shardllama shards list / clean``) ------------------------------


@dataclasses.dataclass
class ShardSetInfo:
    key: str
    segments: list[str]
    nbytes: int
    kept: bool  # outlives its run on purpose
    orphaned: bool  # not kept, and the run that made it is gone (should not happen)
    ready: bool  # every segment completely written
    owner_pid: int | None
    model: str | None
    dtype: str | None
    n_workers: int | None


def _segment_names() -> Iterable[str]:
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX))
    except FileNotFoundError:
        return []


def list_kept() -> list[ShardSetInfo]:
    """Every set of shardllama segments in /dev/shm: kept ones, and orphans of runs that died."""
    groups: dict[tuple, ShardSetInfo] = {}
    for name in _segment_names():
        try:
            seg = Segment.attach(name)
        except (OSError, ValueError, json.JSONDecodeError):
            continue  # vanished meanwhile, or not ours
        m, ready, size = seg.manifest, seg.ready, seg.nbytes()
        seg.close()
        kept = bool(m.get("kept"))
        pid = m.get("owner_pid")
        g = groups.setdefault((m.get("key", "?"), kept, pid), ShardSetInfo(
            key=m.get("key", "?"), segments=[], nbytes=0, kept=kept, ready=True, owner_pid=pid,
            orphaned=not kept and not (pid and psutil.pid_exists(pid)),
            model=m.get("model"), dtype=m.get("dtype"), n_workers=m.get("n_workers"),
        ))
        g.segments.append(name)
        g.nbytes += size
        g.ready &= ready
    return list(groups.values())


def clean_kept(key: str | None = None) -> list[str]:
    """Unlink kept shards (those of ``key``, or all) and orphans; returns the names removed."""
    removed = []
    for info in list_kept():
        if (info.kept or info.orphaned) and key in (None, info.key):
            for name in info.segments:
                try:
                    os.unlink(SHM_DIR / name)
                    removed.append(name)
                except FileNotFoundError:
                    pass
    return removed
