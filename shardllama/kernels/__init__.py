"""A C++ matrix-vector kernel for 16-bit weights, for decode steps (``matvec.cpp``).

Decoding reads every weight once per token, so its speed is the rate at which weights stream from memory.
torch's own f16 matrix-vector product stops well short of the memory bandwidth (shared/BENCHMARKS.md);
this kernel widens f16 (or bf16) to f32 with F16C and sums with AVX-512 (or AVX2) FMAs, several weight
rows at a time with software prefetch, and returns what ``F.linear(x, w)`` returns up to the order of
the f32 sums.  :func:`shardllama.model.linear` asks :func:`applies` and calls :func:`matvec`; torch's
path stays the fallback and the test oracle.  :func:`matvec_int8` does the same for int8 weights with a
scale per row (``shardllama.quant``), for prompts as well as decode steps; its oracle is
``quant.reference_linear``.

The library is compiled on first use and cached (``build.py``).  Where it cannot be built or imported
(no compiler or ninja, a compiler error) one warning is logged and :func:`applies` answers False for
the rest of the process; on a CPU without AVX2/F16C/FMA, or not x86-64, the same without the warning.
``SHARDLLAMA_KERNELS=0`` in the environment, read on first use, turns the kernels off (worker processes
inherit it), ``SHARDLLAMA_KERNELS=matvec,blocks`` keeps only the libraries named (of ``LIBRARIES``: this one,
``blocks.py``'s and ``decode.py``'s); :func:`enable` turns them all on or off from code.  Which of the kernel's bit-identical f16/bf16 variants
runs (one for rows of 1024 weights or more, one for shorter rows) is measured once per machine
(``calibrate.py``) or pinned by ``SHARDLLAMA_MATVEC_VARIANT``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from . import build, calibrate

log = logging.getLogger("shardllama.kernels")

# Rows of x per call (a decode step of that many sequences) up to which the kernel beats torch; prefill
# goes to torch.  bf16 stops at 4: torch's bf16 matrix product (oneDNN) wins from 8 rows on.
MAX_ROWS = {torch.float16: 8, torch.bfloat16: 4}

LIBRARIES = ("matvec", "blocks", "decode")  # what SHARDLLAMA_KERNELS may name
_enabled: bool | frozenset[str] | None = None  # None until first use, then SHARDLLAMA_KERNELS decides
_library: ModuleType | bool | None = None  # None: not tried yet; False: unavailable (said once)
_lock = threading.Lock()


def enable(on: bool | None = True) -> None:
    """Use the kernel (True) or torch (False) from now on in this process; None: as SHARDLLAMA_KERNELS says."""
    global _enabled
    _enabled = on


def enabled(name: str = "matvec") -> bool:
    """Whether the library ``name`` (one of LIBRARIES) may be used, as :func:`enable` or SHARDLLAMA_KERNELS said."""
    global _enabled
    if _enabled is None:
        setting = os.environ.get("SHARDLLAMA_KERNELS", "1").strip().lower()
        if setting in ("0", "false", "no", "off", "none"):
            _enabled = False
        elif setting in ("1", "true", "yes", "on", "all", ""):
            _enabled = True
        else:
            _enabled = frozenset(s.strip() for s in setting.split(","))
            if unknown := sorted(_enabled - set(LIBRARIES)):
                log.warning("SHARDLLAMA_KERNELS names %s, not one of %s", ", ".join(unknown), ", ".join(LIBRARIES))
    return name in _enabled if isinstance(_enabled, frozenset) else _enabled


def library() -> ModuleType | None:
    """The compiled extension (built on the first call), or None when it is disabled or unavailable."""
    return loaded_once(sys.modules[__name__], _load, "matvec")


def loaded_once(module: ModuleType, load: Callable[[], ModuleType | bool], name: str) -> ModuleType | None:
    """``module._library``, set by ``load`` on the first call (one thread loads, others wait), or None where
    the library ``name`` is disabled or ``load`` found it unavailable (False: said once, not tried again)."""
    if not enabled(name):
        return None
    if module._library is None:
        with _lock:
            if module._library is None:
                module._library = load()
    return module._library or None


def _load() -> ModuleType | bool:
    try:
        lib = build.load()
    except build.Unsupported as e:
        log.info("f16 matrix-vector kernel not used: %s", e)
        return False
    except Exception as e:  # a failed build must never stop the program: torch computes the same
        log.warning("f16 matrix-vector kernel unavailable, using torch's (slower): %s", e)
        return False
    if lib.best_isa() == 0:
        log.info("f16 matrix-vector kernel not used: the CPU lacks AVX2/F16C/FMA")
        return False
    try:
        lib.set_variant(*calibrate.choose(lib, Path(lib.__file__).parent))
    except ValueError as e:  # a malformed SHARDLLAMA_MATVEC_VARIANT
        log.warning("f16 matrix-vector kernel not used: %s", e)
        return False
    return lib


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`matvec` computes ``F.linear(x, w)``: a 2-D f16/bf16 weight with contiguous rows, x in
    the same dtype with 1..MAX_ROWS rows, no autograd, on the CPU, and a library that loaded."""
    return (
        w.dtype in MAX_ROWS
        and x.dtype == w.dtype
        and w.dim() == 2
        and w.stride(1) == 1
        and x.shape[-1] == w.shape[1]
        and 0 < x.numel() <= MAX_ROWS[w.dtype] * w.shape[1]
        and not (x.requires_grad or w.requires_grad)
        and x.is_cpu  # (is_cpu: a tenth of device.type's cost, which a decode step pays ~200 times)
        and w.is_cpu
        and library() is not None
    )


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for (..., K) x of a few rows: (..., N) in w's dtype, f32 sums.  Only where :func:`applies`
    said so; threads: torch.get_num_threads()."""
    return _library.matvec(x, w)  # type: ignore[union-attr]


def applies_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`matvec_int8` computes ``x @ (q * scale[:, None]).T``: a 2-D int8 weight with contiguous
    rows, f32 scales, f32 x (any number of rows), no autograd, on the CPU, and a library that loaded."""
    return (
        q.dtype == torch.int8
        and x.dtype == torch.float32
        and scale.dtype == torch.float32
        and q.dim() == 2
        and q.stride(1) == 1
        and scale.shape == q.shape[:1]
        and x.shape[-1] == q.shape[1]
        and not x.requires_grad
        and x.device.type == "cpu"
        and q.device.type == "cpu"
        and library() is not None
    )


def matvec_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T`` for f32 x (..., K): (..., N) f32, x rounded to f16 after an exact
    power-of-two scaling per row, f32 sums.  Only where :func:`applies_int8` said so."""
    return _library.matvec_int8(x, q, scale)  # type: ignore[union-attr]
