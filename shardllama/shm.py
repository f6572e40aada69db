"""Weight shards in named POSIX shared memory: written once by the coordinator, mapped by the workers.

One segment (:mod:`.segment`) per worker (``shardllama-<key>-...-r<rank>``) plus one for the coordinator's
token embedding (``...-emb``).  With int8 weights a segment also holds each matrix's f32 scales
(``<name>_scale``), with block weights each matrix's type (``<name>_qtype``), and the embedding stays f32
(``quant.stored`` decides what is stored how).

Ownership: the coordinator creates the segments and leaves them registered with Python's resource tracker,
so they are unlinked even when the coordinator is SIGKILLed.  Workers map them with plain ``mmap`` so
their own exit never unlinks anything.  A run's own segments carry its :func:`~.segment.run_tag` (pid and a
random part) in their names: no other run maps them, and no one can plant one under a name it will use.

Kept shards (``keep=True``, ``--keep-shards``) are named by the key alone and unregistered once complete:
they outlive the run, and a later run that also asks for kept shards maps them instead of writing them
again.  /dev/shm is writable by every local user, so the key (the model's path and stat, dtype, N) is a
name, not a proof: a kept set is mapped only if every segment is this user's with mode 0600
(:meth:`~.segment.Segment.attach`) and its manifest records the same identity — the model's files
(:func:`~.fingerprint.fingerprint`: stat plus a hash of sampled blocks), dtype, N, the split plan and the
model's config.  Another user's segments, or a set another process is still writing, are left alone: the run
says so in one warning line and uses private shards.  A run without ``keep`` never looks at kept sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Iterable, Mapping, Sequence

import psutil
import torch

from .config import ModelArgs
from .errors import UsageError
from .convert import Loader, cut
from .model import DTYPES, expected_shapes
from .phases import Phases
from . import qblocks
from .quant import stored
# Segment and SHM_DIR are also imported from here (workers, tests), as before segment.py was split out.
from .segment import (FORMAT_VERSION, PREFIX, SHM_DIR, ForeignSegmentError, Segment, run_tag,  # noqa: F401
                      segment_name)
from .sharding import ShardSpec, shard, worker_weights

log = logging.getLogger(__name__)

EMBED = "emb"  # the coordinator's segment


def shard_key(model_path: str | os.PathLike, dtype: torch.dtype, n_workers: int) -> str:
    """Names one set of shards: the model's files (every part of a split GGUF, every file of a model
    directory) as stat shows them, dtype and N.  Only a name: what a kept set may be trusted for is
    checked against its manifest (see the module docstring)."""
    from .fingerprint import model_files  # here, not at the top: workers import this module too

    path, files = model_files(model_path)
    ident = [str(path), str(dtype), n_workers, FORMAT_VERSION]
    for f in files:
        st = f.stat()
        ident.append([str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]


def shard_identity(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype, files: dict | None) -> dict:
    """What a set of shards was cut from and how, as its manifests record it (JSON's lists, not tuples):
    a kept set is mapped only where this is equal."""
    plan = [{f.name: [v.start, v.stop] if isinstance(v, range) else v for f in dataclasses.fields(s)
             for v in [getattr(s, f.name)]} for s in specs]
    ident = {"files": files, "dtype": str(dtype).removeprefix("torch."), "n_workers": len(specs), "plan": plan,
             "args": args.to_dict(), "version": FORMAT_VERSION}
    return json.loads(json.dumps(ident))


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
        files: dict | None = None,
        phases: Phases | None = None,
        block_types: Mapping[str, int] | None = None,
    ) -> "ShardStore":
        """Cut ``load``'s weights into new segments of this run.  With ``keep`` (``files``: the model's
        :func:`~.fingerprint.fingerprint`), map the kept set of ``key`` if it is ours and of the same
        identity, else write one that outlives the run, or private ones where that cannot be done safely."""
        parts = [EMBED] + [f"r{s.rank}" for s in specs]
        identity = shard_identity(args, specs, dtype, files)
        phases = phases if phases is not None else Phases()
        if keep:
            assert files is not None, "kept shards need the model files' fingerprint"
            with phases("map kept shards"):
                store, keep = _attach_kept(key, parts, identity)
            if store is not None:
                log.info("using kept shards %s (%.1f MB)", key, store.nbytes() / 1e6)
                return store
        name = next((n for n, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))  # --dtype's
        info = dict(info or {}, key=key, owner_pid=os.getpid(), dtype=name,
                    n_workers=len(specs), args=args.to_dict(), version=FORMAT_VERSION, identity=identity)
        with phases("lay out shards"):
            layouts = _layouts(args, specs, dtype, block_types or {})
        try:
            segments = _create(key, parts, layouts, dict(info, kept=keep), None if keep else run_tag())
        except FileExistsError:
            if not keep:
                raise  # a random name taken: not a race we can lose to
            log.warning("kept shards %s: another process started writing them just now; this run uses private "
                        "shards", key)
            keep = False
            segments = _create(key, parts, layouts, dict(info, kept=False), run_tag())
        try:
            _write(args, specs, dtype, load, segments, phases)
            for seg in segments.values():
                seg.mark_ready()
                if keep:
                    seg.keep()
        except BaseException:
            _remove(segments.values())
            raise
        return cls(segments, owned=True, kept=keep)


def _create(key: str, parts: Sequence[str], layouts: dict, info: dict, tag: str | None) -> dict[str, Segment]:
    """New, empty segments for every part, or none (FileExistsError if a name is taken)."""
    segments: dict[str, Segment] = {}
    try:
        for part in parts:
            segments[part] = Segment.create(segment_name(key, part, tag), layouts[part], dict(info, part=part))
    except BaseException:
        _remove(segments.values())
        raise
    return segments


def _remove(segments: Iterable[Segment]) -> None:
    for seg in segments:
        seg.close()
        seg.unlink()


def _layouts(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype,
             block_types: Mapping[str, int]) -> dict[str, dict]:
    """Part -> {tensor name: (dtype, shape)}; computed by storing and cutting meta tensors with ``stored``
    and ``shard`` themselves (int8 adds each matrix's scales, blocks their type; the embedding stays float)."""
    shapes = expected_shapes(args)

    def layout(name: str, src: str, spec: ShardSpec | None) -> dict:
        qtype = block_types.get(src)
        full = torch.empty(shapes[src], device="meta") if qtype is None else qblocks.meta(shapes[src], qtype)
        parts = stored(name, full, dtype)
        return {n: (t.dtype, tuple(t.shape if spec is None else shard(n, t, spec).shape)) for n, t in parts.items()}

    layouts = {EMBED: layout("tok_embeddings.weight", "tok_embeddings.weight", None)}
    sources = worker_weights(args)
    for spec in specs:
        layouts[f"r{spec.rank}"] = {k: v for name, src in sources.items() for k, v in layout(name, src, spec).items()}
    return layouts


def _write(args: ModelArgs, specs: Sequence[ShardSpec], dtype: torch.dtype, load: Loader,
           segments: dict[str, Segment], phases: Phases) -> None:
    """Copy every worker's part of every weight, and the coordinator's embedding, into place
    (``convert.cut``: each checkpoint weight read once and converted whole; ``phases`` times the copies)."""
    for spec, name, part in cut(args, specs, dtype, load, embedding=True, phases=phases):
        seg = segments[EMBED if spec is None else f"r{spec.rank}"]
        laid = seg.manifest["tensors"].get(name)
        if laid is None or laid["shape"] != list(part.shape):  # blocks whose types the layout was not told
            raise UsageError(f"weight {name!r} was not laid out; a loader that gives quantized blocks needs their "
                             "types (block_types=Checkpoint.block_types())")
        with phases("write shards"):
            seg.tensor(name).copy_(part)


def _attach_kept(key: str, parts: Sequence[str], identity: dict) -> tuple[ShardStore | None, bool]:
    """(the kept set of ``key``, mapped, _) if it is this user's, complete and of ``identity``; else (None,
    whether this run may write it).  An incomplete or outdated set of this user's is removed first; another
    user's segments, or a set that a live process is still writing, are left alone (one warning line)."""
    names = {part: segment_name(key, part) for part in parts}
    segments: dict[str, Segment] = {}
    stale = []  # ours to remove if the set is not usable
    try:
        for part, name in names.items():
            try:
                segments[part] = Segment.attach(name)
                stale.append(name)
            except FileNotFoundError:
                pass
            except ValueError:  # ours (the owner is checked first), but not a segment of this format
                stale.append(name)
    except ForeignSegmentError as e:
        _close(segments.values())
        log.warning("ignoring kept shards %s: %s; this run uses private shards", key, e)
        return None, False
    if not stale:
        return None, True
    if len(segments) == len(parts) and all(s.ready and s.manifest.get("identity") == identity
                                           for s in segments.values()):
        return ShardStore(segments, owned=False, kept=True), True
    writers = sorted({s.manifest.get("owner_pid") for s in segments.values() if not s.ready} - {None, os.getpid()})
    _close(segments.values())
    writers = [pid for pid in writers if isinstance(pid, int) and psutil.pid_exists(pid)]
    if writers:
        log.warning("kept shards %s are being written by pid %s; this run uses private shards", key,
                    ", ".join(map(str, writers)))
        return None, False
    log.warning("removing incomplete or outdated kept shards %s", key)
    for name in stale:
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass
    return None, True


def _close(segments: Iterable[Segment]) -> None:
    for seg in segments:
        seg.close()


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
    uid: int = -1  # the segments' owner
    foreign: bool = False  # not this user's (or open to others): never mapped, never removed

    @property
    def writing(self) -> bool:
        """Still being written by a live process."""
        return not self.ready and bool(self.owner_pid) and psutil.pid_exists(self.owner_pid)


def _segment_names() -> Iterable[str]:
    try:
        return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX))
    except FileNotFoundError:
        return []


def list_kept() -> list[ShardSetInfo]:
    """Every set of shardllama segments in /dev/shm: kept ones, live runs' ones, orphans of runs that died, and
    other users' (``foreign``; those this user cannot read are grouped by the key in their name)."""
    groups: dict[tuple, ShardSetInfo] = {}
    for name in _segment_names():
        try:
            seg = Segment.attach(name, trusted=False)
        except ForeignSegmentError:  # another user's, unreadable: what its name and stat say
            try:
                st = os.lstat(SHM_DIR / name)
            except FileNotFoundError:
                continue
            key = name[len(PREFIX):].split("-")[0]
            g = groups.setdefault((key, None, None, st.st_uid), ShardSetInfo(
                key=key, segments=[], nbytes=0, kept=False, orphaned=False, ready=False, owner_pid=None,
                model=None, dtype=None, n_workers=None, uid=st.st_uid, foreign=True))
            g.segments.append(name)
            g.nbytes += st.st_size
            continue
        except (OSError, ValueError):
            continue  # vanished meanwhile, or not a segment of ours
        m, ready, size, uid, foreign = seg.manifest, seg.ready, seg.nbytes(), seg.uid, seg.foreign
        seg.close()
        kept = bool(m.get("kept"))
        pid = m.get("owner_pid") if isinstance(m.get("owner_pid"), int) else None
        key = str(m.get("key", "?"))
        g = groups.setdefault((key, kept, pid, uid), ShardSetInfo(
            key=key, segments=[], nbytes=0, kept=kept, ready=True, owner_pid=pid,
            orphaned=not kept and not (pid and psutil.pid_exists(pid)),
            model=m.get("model"), dtype=m.get("dtype"), n_workers=m.get("n_workers"), uid=uid,
        ))
        g.segments.append(name)
        g.nbytes += size
        g.ready &= ready
        g.foreign |= foreign
    return list(groups.values())


@dataclasses.dataclass
class Cleaned:
    """What :func:`clean` did: the segments it removed, and the sets it left, with why."""

    removed: list[str]
    skipped: list[tuple[ShardSetInfo, str]]


def skip_reason(info: ShardSetInfo) -> str | None:
    """Why ``shards clean`` leaves ``info`` alone, or None if it is this user's to remove.  Who owns a set was
    read by ``fstat`` on the opened segment (:meth:`~.segment.Segment.attach`), or, for one this user cannot
    open, ``lstat`` — which only ever makes a set foreign, never ours."""
    if info.foreign:
        if info.uid != os.geteuid():
            return f"owned by uid {info.uid}"
        return "open to other users (mode not 0600): never trusted"
    if info.writing:
        return f"being written by pid {info.owner_pid}"
    if not (info.kept or info.orphaned):
        return f"in use by pid {info.owner_pid}"
    return None


def clean(key: str | None = None) -> Cleaned:
    """Unlink this user's kept shards (those of ``key``, or all) and orphans.  Another user's segments, and
    sets still being written or in use, are never touched: they come back in ``skipped``.  Never asks."""
    removed, skipped = [], []
    for info in list_kept():
        if key not in (None, info.key):
            continue
        reason = skip_reason(info)
        if reason is not None:
            skipped.append((info, reason))
            continue
        for name in info.segments:
            try:
                os.unlink(SHM_DIR / name)
                removed.append(name)
            except FileNotFoundError:
                pass
    return Cleaned(removed, skipped)


def clean_kept(key: str | None = None) -> list[str]:
    """:func:`clean`'s removed segment names."""
    return clean(key).removed
