"""Compiling the kernels' C++ sources once per machine and importing the cached libraries afterwards.

Each source is a :class:`Library` (``MATVEC``: ``matvec.cpp``; ``BLOCKS``: ``blocks.cpp``, the quantized-block
kernels; ``DECODE``: ``decode.cpp``, the small operations of a decode step).  A library lives in
``<cache>/kernels/<name>-<key>/`` (``shardllama_matvec-<key>``, ...), where ``<cache>`` is shardllama's
cache directory (``$SHARDLLAMA_CACHE``, else ``~/.cache/shardllama``; see :func:`shardllama.demo.cache_dir`)
and ``<key>`` hashes the source, its compiler flags, torch's version, the Python ABI, the machine and the CPU
flags the kernels dispatch on: a changed source or another torch builds afresh instead of importing a stale
library.

A finished build leaves a ``built`` file naming the library; later processes import it directly (a few
milliseconds) without ``torch.utils.cpp_extension`` (whose import and ninja run cost more).  Processes that
start at once (the workers of one run) serialise on a ``flock``: one compiles, the others wait and import.
The lock dies with its process, so a build killed half-way (Ctrl-C) never leaves the next run waiting.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from .. import owned

log = logging.getLogger("shardllama.kernels")

SOURCE = Path(__file__).with_name("matvec.cpp")
NAME = "shardllama_matvec"  # the module name compiled into the library (TORCH_EXTENSION_NAME)
# No -march: matvec.cpp picks AVX-512 or AVX2 per function at run time.  -fopenmp makes at::parallel_for
# parallel (without it ATen's header runs it serially); the library then needs libgomp.so.1, which is the
# runtime torch has already loaded, so there is one OpenMP thread pool, not two.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma")  # what the dispatch reads


class Library(NamedTuple):
    """A C++ source compiled into the Python module ``name`` with ``cflags``; ``what`` names it in the log."""

    name: str
    source: Path
    cflags: tuple[str, ...] = CFLAGS
    what: str = "matrix-vector kernel"


MATVEC = Library(NAME, SOURCE)
# -ffp-contract=off: blocks.cpp's dequantization must round each product and sum as numpy does (bit-exact with
# gguf.quants); the kernel's fused multiply-adds are written as FMA intrinsics, which the flag leaves alone.
BLOCKS = Library("shardllama_blocks", SOURCE.with_name("blocks.cpp"), CFLAGS + ("-ffp-contract=off",),
                 "quantized-block kernels")
# -ffp-contract=off: decode.cpp rounds every product and sum where the torch code it replaces does.  AVX2,
# F16C and FMA are what check_cpu asks of every CPU before any library is built or loaded.
DECODE = Library("shardllama_decode", SOURCE.with_name("decode.cpp"),
                 CFLAGS + ("-ffp-contract=off", "-mavx2", "-mf16c", "-mfma"),
                 "decode-step kernels")


def _library(source: Path | Library) -> Library:
    return source if isinstance(source, Library) else MATVEC._replace(source=Path(source))


class Unsupported(RuntimeError):
    """This machine cannot run the kernel (not x86-64, no AVX2/F16C/FMA): torch's path is used."""


class BuildError(RuntimeError):
    """The library could not be compiled or imported (no compiler, no ninja, a compiler error)."""


def cpuinfo(field: str) -> str:
    """The value of ``field`` ("flags", "model name") for the first CPU in /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith(field)), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def cpu_flags(wanted: tuple[str, ...] = _FLAGS) -> list[str]:
    """Which of ``wanted`` (default: the CPU features the kernel dispatches on) /proc/cpuinfo lists (none
    where there is no such file)."""
    have = set(cpuinfo("flags").split())
    return [f for f in wanted if f in have]


def check_cpu() -> None:
    """Raise Unsupported unless this CPU has the AVX2 + F16C + FMA the slower of the two kernels needs."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise Unsupported(f"the kernel is x86-64 only, this is {platform.machine()}")
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512") or not {"f16c", "fma"} <= set(flags):
        raise Unsupported(f"the CPU lacks AVX2/F16C/FMA (torch capability {capability}, flags {' '.join(flags)})")


def cache_key(source: bytes, cflags: tuple[str, ...] = CFLAGS) -> str:
    h = hashlib.sha256(source)
    for part in (torch.__version__, sys.implementation.cache_tag, platform.machine(), " ".join(cpu_flags()), *cflags,
                 *LDFLAGS):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def default_directory(source: Path | Library = MATVEC) -> Path:
    from ..demo import cache_dir

    lib = _library(source)
    return cache_dir() / "kernels" / f"{lib.name}-{cache_key(lib.source.read_bytes(), lib.cflags)}"


def load(source: Path | Library = MATVEC, directory: Path | None = None) -> ModuleType:
    """The compiled library (a Library, or a path: that source as ``matvec.cpp``'s module), built into
    ``directory`` first if it is not there yet.

    Raises Unsupported on a CPU the kernel cannot use, BuildError when compiling or importing fails.
    """
    check_cpu()
    lib = _library(source)
    directory = Path(directory) if directory is not None else default_directory(lib)
    marker = directory / "built"
    if marker.is_file():
        return _import(directory, marker)
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"cannot create {directory} ({e.strerror}); set SHARDLLAMA_CACHE to a writable directory")
    _check_owned(directory, directory=True)
    with locked(directory / "build.lock"):
        if marker.is_file():  # another process built it while this one waited
            return _import(directory, marker)
        module = _compile(lib, directory)
        tmp = marker.with_suffix(f".{os.getpid()}")
        tmp.write_text(Path(module.__file__).name + "\n")
        # What later processes import must be writable by no one else, whatever the umask (002 is common):
        # _import refuses it otherwise.
        for p in (tmp, Path(module.__file__)):
            p.chmod(p.stat().st_mode & ~0o022)
        tmp.replace(marker)
        return module


def _compile(lib: Library, directory: Path) -> ModuleType:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed (pip install ninja); torch.utils.cpp_extension needs it")
    (directory / "lock").unlink(missing_ok=True)  # torch's own baton, left behind by a killed build
    source = lib.source
    log.info("compiling the %s into %s (once per machine, ~10 s)", lib.what, directory)
    t0 = time.perf_counter()
    try:
        # copies: cpp_extension appends to the lists it is given (and CFLAGS is part of the cache key)
        module = cpp_extension.load(lib.name, [str(source)], extra_cflags=list(lib.cflags),
                                    extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)
    except Exception as e:  # cpp_extension raises RuntimeError / CalledProcessError / OSError with the compiler's output
        log.debug("compiling %s failed:\n%s", source, e)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if ": error:" in ln or "fatal error" in ln), lines[0])  # gcc's own words
        raise BuildError(f"compiling {source.name} failed: {first[:300]}") from e
    log.info("compiled the %s in %.1f s", lib.what, time.perf_counter() - t0)
    return module


def _check_owned(path: Path, directory: bool = False) -> None:
    """BuildError unless ``path`` is this user's and no one else may write it: a library is code that runs."""
    try:
        why = owned.problem(path.lstat(), directory)
    except OSError as e:
        why = e.strerror
    if why:
        raise BuildError(f"not importing the kernel from {path}: {why}")


def _import(directory: Path, marker: Path) -> ModuleType:
    """The library the ``built`` marker names, after checking that it and its directory are this user's."""
    name = marker.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise BuildError(f"not importing the kernel: {marker} names {name!r}, not a file of {directory}")
    path = directory / name
    for p, is_dir in ((directory, True), (marker, False), (path, False)):
        _check_owned(p, is_dir)
    try:
        # The stem is the module name: torch names a rebuild within one process NAME_v1, NAME_v2, ...
        spec = importlib.util.spec_from_file_location(path.name.partition(".")[0], path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python extension: {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        raise BuildError(f"cannot import the compiled kernel {path}: {e}") from e
    return module


class locked:
    """An exclusive ``flock`` on ``path`` for the duration of a ``with`` (none where fcntl is missing)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> "locked":
        try:
            import fcntl
        except ImportError:  # Windows: no lock; torch's own baton still guards the build directory
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
