"""Choosing the f16/bf16 kernel variant for this machine: by measuring, once, not by a constant.

The matrix-vector kernel can take 1, 2 or 4 weight rows per step, with or without a software prefetch
(``matvec.cpp``).  All variants give bit-identical results; which one streams fastest depends on the CPU
(Zen 5: one row with prefetch; Sapphire Rapids: four rows without, ~10% faster) and on the length of the rows
(Zen 3: four rows with prefetch on 4096 weights, 16.8 GB/s, but one row with prefetch on a 135M model's 576,
11.2 against 6.6), so the first process on a machine times a few on a working set beyond the last-level cache,
one thread as a worker runs, for long rows and for short ones (``SHAPES``), and writes the winners beside the
compiled library (``variant.json``, ~2-4 s, once per machine like the build itself, under
the build lock so that workers starting together measure once).  Later processes read it back, after checking that the file is this user's, that no
one else may write it, that it is small and names this CPU and a variant the library has; anything else is
measured afresh.

``SHARDLLAMA_MATVEC_VARIANT`` pins the variant (``ROWSxPREFETCH``: ``4x0`` is four rows without prefetch,
``1x4096`` one row with 4 KiB of prefetch, the kernel's variant before calibration existed); ``auto``, the
default, calibrates.  Tests pin it, so that what they run never depends on the CPU they land on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from types import ModuleType

import torch

from .. import owned
from . import build

log = logging.getLogger("shardllama.kernels")

ENV = "SHARDLLAMA_MATVEC_VARIANT"
FILE = "variant.json"
# What is measured: (rows per step, prefetch bytes).  DEFAULT, the kernel's only variant before calibration
# (best on Zen 5), is kept unless another is MARGIN faster.
CANDIDATES = ((1, 4096), (1, 0), (2, 4096), (4, 0), (4, 4096))
# The row lengths measured, each choosing the variant for its class (matvec.cpp's short_k, 1024, lies between
# them): the fastest differs (Zen 3: four rows + prefetch on 4096-weight rows, one row + prefetch on 576).
SHAPES = {"long": 4096, "short": 576}
DEFAULT = CANDIDATES[0]
MARGIN = 1.03
MAX_PREFETCH = 1 << 20
_PATTERN = re.compile(r"(\d)x(\d{1,7})")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), part of what a stored calibration must match."""
    return build.cpuinfo("model name") or "unknown"


def parse(text: str, lib: ModuleType) -> tuple[int, int]:
    """``ROWSxPREFETCH`` as (rows, prefetch bytes); ValueError naming the variable unless this library has it."""
    m = _PATTERN.fullmatch(text.strip())
    rows = lib.variant_rows()
    if m is None or int(m[1]) not in rows or int(m[2]) > MAX_PREFETCH:
        raise ValueError(f"{ENV}={text!r}: expected auto or ROWSxPREFETCH with ROWS one of "
                         f"{', '.join(map(str, rows))} and PREFETCH bytes up to {MAX_PREFETCH} (e.g. 4x0, 1x4096)")
    return int(m[1]), int(m[2])


def choose(lib: ModuleType, directory: Path) -> tuple[int, int, int, int]:
    """The variants for this process, (rows, prefetch) for long rows then for short ones (``lib.short_k``):
    pinned by the environment (one for both), stored for this CPU, or measured now."""
    pinned = os.environ.get(ENV, "auto")
    if pinned.strip().lower() != "auto":
        return parse(pinned, lib) * 2
    path = Path(directory) / FILE
    stored = read(path, lib)
    if stored is not None:
        return stored
    with build.locked(Path(directory) / "build.lock"):
        stored = read(path, lib)  # measured by another process while this one waited
        if stored is not None:
            return stored
        rates = {key: measure(lib, k=k) for key, k in SHAPES.items()}
        best = {key: _best(r) for key, r in rates.items()}
        write(path, best, rates)
        for key, r in rates.items():
            log.info("matvec variant for this CPU, %s rows: %s (%s)", key, _name(best[key]),
                     ", ".join(f"{_name(v)} {g:.1f} GB/s" for v, g in r.items()))
        return best["long"] + best["short"]


def _best(rates: dict[tuple[int, int], float]) -> tuple[int, int]:
    best = max(rates, key=rates.get)
    return DEFAULT if rates[best] < MARGIN * rates[DEFAULT] else best  # within the noise: the one needing no reason


def read(path: Path, lib: ModuleType) -> tuple[int, int, int, int] | None:
    """The stored variants (as :func:`choose`), or None (logged) when the file is missing, foreign, malformed,
    for another CPU or without a variant measured now."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.info("%s: unreadable (%s); measuring again", path, e.strerror)
        return None
    why = owned.problem(st) or (f"{st.st_size} bytes, more than a calibration holds" if st.st_size > 65536 else None)
    if why is None:
        try:
            data = json.loads(path.read_text())
            if data.get("cpu") != cpu_model():
                why = f"measured on another CPU ({data.get('cpu')!r})"
            elif missing := [f"{key} {_name(v)}" for key in SHAPES for v in CANDIDATES if v[0] in lib.variant_rows()
                             and not (isinstance(r := data.get("gb_s", {}).get(key), dict) and _name(v) in r)]:
                why = f"{', '.join(missing)} not measured (a newer set of variants)"
            else:
                return parse(str(data["variant"]["long"]), lib) + parse(str(data["variant"]["short"]), lib)
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, RecursionError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
    log.info("%s not used: %s; measuring again", path, why)
    return None


def write(path: Path, best: dict[str, tuple[int, int]], rates: dict[str, dict[tuple[int, int], float]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    body = {"cpu": cpu_model(), "variant": {key: _name(v) for key, v in best.items()},
            "gb_s": {key: {_name(v): round(g, 2) for v, g in r.items()} for key, r in rates.items()},
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        tmp.replace(path)
    except OSError as e:  # a read-only cache: the next process measures again
        log.info("could not store the matvec calibration in %s: %s", path, e.strerror)
        tmp.unlink(missing_ok=True)


def measure(lib: ModuleType, working_set: int | None = None, rounds: int = 4, k: int = 4096
            ) -> dict[tuple[int, int], float]:
    """GB/s of each candidate this library has, on one thread, through f16 matrices of ``k`` columns adding up
    to ``working_set`` bytes (default: twice the last-level cache, 256 MiB to 1 GiB, so that every pass streams
    from memory as a decode step does).  The candidates take turns ``rounds`` times; each keeps its fastest
    pass, timed in this thread's CPU time: on a busy machine another process taking the core slows no one."""
    working_set = working_set or default_working_set()
    N, K = 2752 * 4096 // k, k  # 11 M weights, a quarter of LLaMA-7B's w1 as each of four workers holds it
    copies = max(2, working_set // (N * K * 2))
    weights = torch.full((copies, N, K), 0.01, dtype=torch.float16)
    x = torch.full((1, K), 0.5, dtype=torch.float16)
    variants = [v for v in CANDIDATES if v[0] in lib.variant_rows()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the product runs in this thread, so its CPU time is the product's
    try:
        for v in variants:
            lib.matvec(x, weights[0], v[1], -1, v[0])  # warm-up
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(rounds):
            for v in variants:
                t0 = time.thread_time()
                for w in weights:
                    lib.matvec(x, w, v[1], -1, v[0])
                best[v] = min(best[v], time.thread_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return {v: weights.numel() * 2 / t / 1e9 for v, t in best.items()}


def default_working_set() -> int:
    return min(max(2 * _llc_bytes(), 256 << 20), 1 << 30)


def _llc_bytes() -> int:
    """The largest cache's size from sysfs (0 where unknown)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            best = max(best, int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[m[2]])
    return best


def _name(v: tuple[int, int]) -> str:
    return f"{v[0]}x{v[1]}"
