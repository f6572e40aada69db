"""The small operations of a decode step in one C++ call each (``decode.cpp``): per-token overhead.

A decode step of a small model is dominated not by its matrix products but by the ~57 torch operations per
layer around them, each a few microseconds of dispatch for a few hundred numbers (issue 12).  This library
does each group of them in one call: :func:`rms_norm`, :func:`silu_mul`, a token's :func:`attend` (rotary
embedding, cache write, grouped attention; a token in each of up to ``MAX_ROWS`` rows), and the two halves of a shared-memory reduction
(:func:`publish`, :func:`gather`, used by ``shardllama.allreduce``).

Each rounds where the torch code it replaces rounds (``shardllama.model``), so the only differences are in the
order of f32 sums; :func:`gather` is bit-identical to allreduce's torch sum.  The ``*_applies`` functions say
when a call comes here: on the CPU, for up to ``MAX_ROWS`` rows (a decode step; prompts stay in torch, whose
vectorised ops win there), in f32/f16 (bf16 too for the elementwise ones).  Every engine asks the same
question for the same shapes, so the reference, the star and the whole pass keep computing the same bits.
Where the library is missing (``SHARDLLAMA_KERNELS=0``, no compiler, not x86-64) torch computes it all, as
before; the tests compare the two.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

import torch

from . import build, loaded_once

log = logging.getLogger("shardllama.kernels")

MAX_ROWS = 8  # rows of activations up to which the elementwise ops come here
ELEMENTWISE = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION = (torch.float32, torch.float16)

_library: ModuleType | bool | None = None  # None: not tried yet; False: unavailable (said once)


def library() -> ModuleType | None:
    """The compiled library (built on first use), or None where kernels are disabled or unavailable."""
    return loaded_once(sys.modules[__name__], _load, "decode")


def _load() -> ModuleType | bool:
    try:
        return build.load(build.DECODE)
    except build.Unsupported as e:
        log.info("decode-step kernels not used: %s", e)
    except Exception as e:  # a failed build must never stop the program: torch computes the same
        log.warning("decode-step kernels unavailable, using torch's ops (slower): %s", e)
    return False


def elementwise_applies(x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` (other: the weight) or :func:`silu_mul` (other: b) computes it here."""
    return (x.dtype in ELEMENTWISE and other.dtype == x.dtype and x.is_cpu and other.is_cpu and x.dim() >= 1
            and 0 < x.numel() <= MAX_ROWS * x.shape[-1] and x.is_contiguous() and other.is_contiguous()
            and library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x.float(), eps=eps).type_as(x) * weight``; where :func:`elementwise_applies`."""
    return _library.rms_norm(x, weight, eps)  # type: ignore[union-attr]


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.silu(a) * b`` (a and b of one shape); where :func:`elementwise_applies`."""
    return _library.silu_mul(a, b)  # type: ignore[union-attr]


def attention_applies(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether :func:`attend` computes the attention of q ((B, 1, heads, hd): one token a row) here."""
    return (q.dtype in ATTENTION and q.shape[1] == 1 and q.shape[0] <= MAX_ROWS and q.is_cpu and cache_k.is_cpu
            and cache_k.dtype == q.dtype and cache_k.is_contiguous() and library() is not None)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
           write_at: torch.Tensor, read_at: torch.Tensor, n_keys: torch.Tensor, cis: torch.Tensor,
           kv_of_q: torch.Tensor | None) -> torch.Tensor:
    """One token in each of B rows (q (B, 1, hq, hd), k and v (B, 1, hkv, hd)): q and k rotated by ``cis``
    ((B, hd/2, 2) f32 cos, sin), row b's k and v written to flat row ``write_at[b]`` of the caches (n_blocks,
    block_size, hkv, hd), and softmax(q k^T / sqrt(hd)) v over its flat rows ``read_at[b, :n_keys[b]]`` per query
    head, whose KV head is ``kv_of_q[i]`` or ``i // (hq / hkv)``.  Returns (B, hq * hd) in q's dtype; where
    :func:`attention_applies` (``model.Step.one`` holds write_at, read_at, n_keys and cis)."""
    B = q.shape[0]
    empty = torch.empty(0, dtype=torch.long)
    return _library.attend(q.reshape(B, -1).contiguous(), k.reshape(B, -1).contiguous(),  # type: ignore[union-attr]
                           v.reshape(B, -1).contiguous(), cache_k, cache_v, cis, write_at, read_at, n_keys,
                           empty if kv_of_q is None else kv_of_q)
