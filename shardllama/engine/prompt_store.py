"""The prompt cache on disk (``--prompt-cache-dir``): the KV states of cached prompts survive a restart.

One safetensors file per entry, named by a hash of the model, the token ids and the salt:

    tensors   k, v         (n_layers, positions, n_kv_heads, head_dim) in the model's dtype: every KV head
                           (``Backend.read_blocks``), so a file written with N workers loads with any other N
                           or in-process
    metadata  format       "shardllama-prompt-cache"
              version      "1" for an entry without a salt, "2" for one with a salt: a reader that knows
                           no salts skips a salted file rather than serve it to every request
              salt         (version 2 only) the salt's id, ``prompt_cache.salt_id``: a hash, never the salt
              model        hex digest of the model's identity (below)
              model_path   the model file or directory, for people reading the file
              dtype        "f32" | "f16" | "bf16" | "int8" | "gguf" | "q8" | "q4": the weights' (quantized
                           weights keep f32 k and v, which must not be mistaken for an f32 model's)
              tokens       the token ids, a JSON list; their count is the positions
              crc32        of k's bytes then v's: safetensors checks its header and sizes, not the data

**Model identity** is what kept weight shards must match too (:func:`shardllama.fingerprint.fingerprint`):
the resolved model path; the name, size, modification time (ns), inode and owner of each of its files (every
part of a split GGUF, every file of a model directory) and a hash of each file's header and a few sampled
blocks; and the ModelArgs (without max_seq_len, which changes no KV value).  Moving, copying, touching or
rewriting the model invalidates the cache: a false match would continue prompts with another model's keys,
silently; a false mismatch costs one prefill.  The dtype is checked on its own, so the warning can say that
it is the dtype that differs.

**Trust**: a file's KV states become the model's context, and they reveal the prompts they came from.  The
directory is created with mode 0700 and must belong to this user and be writable by no one else (else a
UsageError at start-up); files are written 0600; a file that is not a regular file of this user's, or that
others may write, is skipped with a warning like any foreign file.

**Writing** happens on a thread of its own (the engine only reads the blocks, one round trip), to a
temporary file in the directory and then ``os.replace``, so a crash leaves either the old file or the new
one, never half of one.  At most ``MAX_PENDING`` writes wait; beyond that the engine waits for the disk.
An entry that another one extends (a conversation's earlier turn) is deleted when the longer one is written,
as the in-memory cache drops it; a memory eviction deletes nothing.  The directory holds at most ``keep``
entries of this model (the in-memory cache's capacity), least recently used — by file modification time,
which a cache hit refreshes — deleted first.  Files of other models, other dtypes, other formats, and corrupt
files are skipped with one warning line each and never deleted: they are not this server's to remove.

**Loading** is eager, at start-up, on the engine thread before it serves anything: the ``keep`` most
recent entries go into free KV-cache blocks.  The cost is bounded by the memory the cache may take anyway
(``--inference-server-prompt-cache-memory``), is paid once instead of on the latency of the first request
that matches, and a request that arrives meanwhile simply waits in the queue.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..config import ModelArgs
from ..errors import ShardllamaError, UsageError, one_line
from ..fingerprint import fingerprint
from ..model import DTYPES
from ..quant import activation_dtype
from .prompt_cache import Key, cache_key, split_key

log = logging.getLogger(__name__)

FORMAT = "shardllama-prompt-cache"
VERSIONS = {"1": False, "2": True}  # version -> the entry has a salt
SUFFIX = ".safetensors"
MAX_PENDING = 2  # writes queued before save() waits: each holds a copy of an entry's KV state
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class StoreError(ShardllamaError):
    """A prompt-cache file that cannot be used (corrupt, foreign, another model, does not fit)."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    key: str  # hex digest of ``about``
    path: str
    about: dict  # what the key hashes: path, files, args


def model_identity(model_path: str | os.PathLike, args: ModelArgs, exclude: Path | None = None) -> ModelIdentity:
    """The identity of a model as files on disk (see the module docstring); ``exclude``: a directory inside
    the model's whose files are not the model's (a prompt cache kept beside the weights)."""
    files = fingerprint(model_path, exclude)
    model_args = {k: v for k, v in args.to_dict().items() if k != "max_seq_len"}
    about = {"path": files["path"], "files": files["files"], "args": model_args}
    return ModelIdentity(hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest(), files["path"], about)


@dataclasses.dataclass(frozen=True)
class StoredEntry:
    path: Path
    tokens: tuple[int, ...]
    mtime_ns: int
    salt: str | None = None  # the salt id

    @property
    def key(self) -> Key:
        return cache_key(self.tokens, self.salt)


def _crc(k: torch.Tensor, v: torch.Tensor) -> str:
    crc = zlib.crc32(k.contiguous().view(torch.uint8).numpy())
    return f"{zlib.crc32(v.contiguous().view(torch.uint8).numpy(), crc):08x}"


class PromptStore:
    """The directory of one server's persisted prompt-cache entries.  ``__init__`` (the caller's thread)
    creates the directory; :meth:`open` scans it; then :meth:`save`, :meth:`touch`, :meth:`forget` queue
    work for the writer thread; :meth:`close` waits for it."""

    def __init__(self, directory: str | os.PathLike, identity: ModelIdentity, args: ModelArgs, dtype: torch.dtype,
                 max_seq_len: int):
        try:
            Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
            # The directory checked, not a link that someone may point elsewhere later.
            self.dir = Path(directory).resolve()
            _check_directory(self.dir, directory)
            probe = self.dir / f".probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UsageError(f"--prompt-cache-dir {directory}: cannot write there ({e.strerror or e})") from None
        self.identity = identity
        self.shape = (args.n_layers, args.n_kv_heads, args.head_dim)
        self.dtype = dtype  # the weights': it names the files' KV states
        self.kv_dtype = activation_dtype(dtype)  # what k and v are
        self.max_seq_len = max_seq_len
        self.keep = 0
        # This model's entries on disk by cache key, least recently used first (the writer thread's after open).
        # Each write or use also sets the file's mtime, strictly increasing, so the order survives a restart.
        self._index: OrderedDict[Key, Path] = OrderedDict()
        self._last_ns = 0
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shardllama-prompt-store")

    # ---- start-up --------------------------------------------------------------------------------------

    def open(self, keep: int) -> list[StoredEntry]:
        """Scan the directory: this model's usable entries, most recently used first, at most ``keep`` of them
        (older ones are deleted); every other file is warned about once and left alone."""
        self.keep = keep
        self._remove_stale_temporaries()
        entries = []
        for path in sorted(self.dir.glob("*" + SUFFIX)):
            try:
                entries.append(self._check(path))
            except StoreError as e:
                log.warning("prompt cache: skipping %s", e)
        entries.sort(key=lambda e: e.mtime_ns, reverse=True)
        for old in entries[keep:]:
            _unlink(old.path)
        entries = entries[:keep]
        self._index = OrderedDict((e.key, e.path) for e in reversed(entries))
        self._last_ns = max((e.mtime_ns for e in entries), default=0)
        return entries

    def _check(self, path: Path) -> StoredEntry:
        """The entry a file holds, from its header alone; StoreError (naming the file) if it is not usable."""
        from safetensors import SafetensorError, safe_open

        try:
            st = path.lstat()
            _check_file(path, st)
            mtime = st.st_mtime_ns
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path}: not a shardllama prompt-cache file")
        salted = VERSIONS.get(meta.get("version"))
        if salted is None:
            raise StoreError(f"{path}: format version {meta.get('version')!r}, this shardllama reads "
                             + " or ".join(map(repr, VERSIONS)))
        salt = meta.get("salt")
        if salted != (salt is not None) or (salted and not re.fullmatch(r"[0-9a-f]{32}", salt)):
            raise StoreError(f"{path}: bad salt {salt!r} for format version {meta.get('version')!r}")
        if meta.get("model") != self.identity.key:
            raise StoreError(f"{path}: saved for another model or another version of its files "
                             f"({meta.get('model_path')}; this server runs {self.identity.path})")
        if meta.get("dtype") != _DTYPE_NAMES.get(self.dtype):
            raise StoreError(f"{path}: saved with {meta.get('dtype')} KV states; this server runs "
                             f"{_DTYPE_NAMES.get(self.dtype)}")
        try:
            tokens = tuple(json.loads(meta["tokens"]))
            if not tokens or not all(type(t) is int and t >= 0 for t in tokens):
                raise ValueError("not a list of token ids")
        except (KeyError, ValueError, TypeError) as e:
            raise StoreError(f"{path}: bad token list ({one_line(e)})") from None
        if len(tokens) > self.max_seq_len:
            raise StoreError(f"{path}: holds {len(tokens)} positions, more than this server's context "
                             f"(--max-seq-len {self.max_seq_len})")
        want = (self.shape[0], len(tokens), *self.shape[1:])
        if set(shapes) != {"k", "v"} or shapes["k"] != want or shapes["v"] != want:
            raise StoreError(f"{path}: tensors {shapes} do not fit this model: k and v of {want}")
        if set(dtypes.values()) != {_SAFETENSORS_DTYPE[self.kv_dtype]}:
            raise StoreError(f"{path}: tensors of dtype {sorted(set(dtypes.values()))}, "
                             f"expected {_SAFETENSORS_DTYPE[self.kv_dtype]}")
        return StoredEntry(path, tokens, mtime, salt)

    def load(self, entry: StoredEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of an entry that :meth:`open` returned, checked again (header and checksum)."""
        from safetensors import SafetensorError, safe_open

        self._check(entry.path)
        try:
            with safe_open(entry.path, "pt") as f:
                crc = (f.metadata() or {}).get("crc32")
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{entry.path}: cannot read ({one_line(e)})") from None
        if crc != _crc(k, v):
            raise StoreError(f"{entry.path}: corrupt (checksum {_crc(k, v)}, the file says {crc})")
        return k, v

    def _remove_stale_temporaries(self) -> None:
        """Temporary files (``.NAME.PID.tmp``) of writers that are gone."""
        for tmp in self.dir.glob(".*.tmp"):
            try:
                pid = int(tmp.name.rsplit(".", 2)[-2])
            except (ValueError, IndexError):
                continue
            if pid != os.getpid() and not _alive(pid) and _mine(tmp):
                _unlink(tmp)

    # ---- while serving (each queues work for the writer thread) -----------------------------------------

    def save(self, key: Sequence[int], k: torch.Tensor, v: torch.Tensor,
             replaces: Iterable[Sequence[int]] = ()) -> None:
        """Write the entry of cache key ``key`` (k and v from ``Backend.read_blocks``) and delete the files of
        ``replaces``, the keys of entries that it extends."""
        self._pending.acquire()
        try:
            self._writer.submit(self._write, tuple(key), k, v, [tuple(t) for t in replaces])
        except RuntimeError:  # closed
            self._pending.release()

    def touch(self, key: Sequence[int]) -> None:
        """An entry was used: it becomes the most recently used file."""
        self._submit(self._touch, tuple(key))

    def forget(self, entries: Iterable[Sequence[int]]) -> None:
        """Delete the files of entries (keys) that another one extends."""
        entries = [tuple(t) for t in entries]
        if entries:
            self._submit(self._forget, entries)

    def close(self) -> None:
        self._writer.shutdown(wait=True)

    def _submit(self, fn, *args) -> None:
        try:
            self._writer.submit(fn, *args)
        except RuntimeError:  # closed
            pass

    # ---- the writer thread ------------------------------------------------------------------------------

    def _name(self, key: Key) -> str:
        salt, tokens = split_key(key)
        digest = hashlib.sha256(self.identity.key.encode())
        digest.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
        if salt is not None:
            digest.update(b"salt:" + salt.encode())
        return digest.hexdigest()[:32] + SUFFIX

    def _write(self, key: Key, k: torch.Tensor, v: torch.Tensor, replaces: list[Key]) -> None:
        from safetensors.torch import save_file

        salt, tokens = split_key(key)
        try:
            path = self.dir / self._name(key)
            tmp = self.dir / f".{path.stem}.{os.getpid()}.tmp"
            k, v = k.contiguous(), v.contiguous()
            assert k.dtype == v.dtype == self.kv_dtype, (k.dtype, v.dtype, self.kv_dtype)
            meta = {"format": FORMAT, "version": "1" if salt is None else "2", "model": self.identity.key,
                    "model_path": self.identity.path, "dtype": _DTYPE_NAMES[self.dtype],
                    "tokens": json.dumps(list(tokens), separators=(",", ":")), "crc32": _crc(k, v)}
            if salt is not None:
                meta["salt"] = salt
            try:
                # Created 0600 before safetensors (re)opens it: KV states reveal the prompts they came from.
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600))
                save_file({"k": k, "v": v}, str(tmp), metadata=meta)
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
            self._index[key] = path
            self._used(key)
            self._forget(replaces)
            self._prune()
        except Exception as e:
            log.warning("prompt cache: cannot save an entry of %d tokens in %s: %s", len(tokens), self.dir, one_line(e))
        finally:
            self._pending.release()

    def _touch(self, key: Key) -> None:
        if key in self._index:
            self._used(key)

    def _used(self, key: Key) -> None:
        """The entry becomes the most recently used, in the index and by its file's mtime."""
        self._index.move_to_end(key)
        self._last_ns = max(time.time_ns(), self._last_ns + 1)
        try:
            os.utime(self._index[key], ns=(self._last_ns, self._last_ns))
        except OSError:
            self._index.pop(key, None)  # someone removed it

    def _forget(self, entries: list[Key]) -> None:
        for key in entries:
            path = self._index.pop(key, None)
            if path is not None:
                _unlink(path)

    def _prune(self) -> None:
        """At most ``keep`` entries of this model, the least recently used deleted first."""
        while len(self._index) > self.keep:
            _unlink(self._index.popitem(last=False)[1])


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _check_directory(path: Path, given: str | os.PathLike) -> None:
    """UsageError unless ``path`` is a directory of this user's that no one else may write."""
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"--prompt-cache-dir {given}: not a directory")
    if st.st_uid != os.geteuid():
        raise UsageError(f"--prompt-cache-dir {given}: owned by uid {st.st_uid}, not by this user (uid "
                         f"{os.geteuid()}); use a directory of your own")
    if st.st_mode & 0o022:
        raise UsageError(f"--prompt-cache-dir {given}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"chmod go-w it or use a directory of your own")


def _check_file(path: Path, st: os.stat_result) -> None:
    """StoreError unless ``st`` (lstat of ``path``) is a regular file of this user's that others cannot write."""
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: not a regular file")
    if st.st_uid != os.geteuid():
        raise StoreError(f"{path}: owned by uid {st.st_uid}, not by this user; not read")
    if st.st_mode & 0o022:
        raise StoreError(f"{path}: writable by others (mode {stat.S_IMODE(st.st_mode):04o}); not read")


def _mine(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.geteuid()
    except OSError:
        return False


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("prompt cache: cannot remove %s: %s", path, e.strerror or e)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
