"""RoPE scaling: how a checkpoint stretches its rotary embeddings past the context it was trained on.

Every supported kind comes down to one number per rotary frequency, a divisor: frequency ``i`` turns at
``theta ** (-2i / head_dim) / factors[i]``.  That is the form llama.cpp stores in a GGUF's
``rope_freqs.weight`` tensor, and both kinds HF and Meta name reduce to it:

- ``linear`` (position interpolation): every divisor is ``factor``;
- ``llama3`` (Llama 3.1 / 3.2 / 3.3): long wavelengths (beyond ``original context / low_freq_factor``) are
  divided by ``factor``, short ones (below ``original context / high_freq_factor``) kept, and the band in
  between blended smoothly, exactly as Meta's ``apply_scaling`` and transformers' ``_compute_llama3_parameters``.

So :class:`shardllama.config.ModelArgs` carries the divisors (computed once, here) and
:func:`shardllama.model.rope_tables` applies them for the reference model and the workers alike.  Kinds
that change more than the frequencies (yarn's attention temperature, dynamic NTK's length-dependent base,
longrope's per-length tables) are refused by name.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

from .errors import UnsupportedError, UsageError

log = logging.getLogger(__name__)

# Meta's reference code (llama/model.py apply_scaling) when params.json says only use_scaled_rope: true.
LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
# Short names accepted by --rope-scaling, for the HF keys above.
OVERRIDE_KEYS = {"factor": "factor", "low": "low_freq_factor", "high": "high_freq_factor",
                 "original": "original_max_position_embeddings", **{k: k for k in LLAMA3_DEFAULTS}}


def llama3_factors(head_dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: float) -> tuple[float, ...]:
    """The divisor of each rotary frequency under Llama 3.1's scaling (llama.cpp's rope_freqs values)."""
    if not factor > 0 or not 0 < low_freq_factor < high_freq_factor or not original_max_position_embeddings > 0:
        raise UnsupportedError(f"llama3 rope scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                               f"original_max_position_embeddings > 0; got factor {factor}, low_freq_factor "
                               f"{low_freq_factor}, high_freq_factor {high_freq_factor}, original "
                               f"{original_max_position_embeddings}")
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def describe(kind: str, params: Mapping[str, float]) -> str:
    return f"{kind} (" + ", ".join(f"{k} {v:g}" for k, v in params.items()) + ")"


def from_hf(scaling: Mapping[str, Any], head_dim: int, theta: float, where: str) -> tuple[tuple[float, ...] | None, str | None]:
    """HF ``rope_scaling`` / ``rope_parameters``: (divisors, description), or (None, None) for plain rotary."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None, None
    if kind == "linear":
        factor = _number(scaling, "factor", where)
        return (float(factor),) * (head_dim // 2), describe("linear", {"factor": factor})
    if kind == "llama3":
        params = {k: _number(scaling, k, where) for k in LLAMA3_DEFAULTS}
        return llama3_factors(head_dim, theta, **params), describe("llama3", params)
    raise UnsupportedError(f"{where}: rope scaling {kind!r} is not supported (supported: llama3, linear)")


def from_meta(params: Mapping[str, Any], head_dim: int, theta: float, override: Mapping[str, float] | None,
              where: str) -> tuple[tuple[float, ...] | None, str | None]:
    """params.json's ``use_scaled_rope``: Meta's numbers (``rope_scaling_factor`` when given), ``override``
    (from --rope-scaling) on top; says on stderr which were used, since the file does not."""
    if not params.get("use_scaled_rope"):
        if override:
            raise UsageError(f"--rope-scaling: {where} does not use scaled rope (no use_scaled_rope: true)")
        return None, None
    values = dict(LLAMA3_DEFAULTS)
    if params.get("rope_scaling_factor") is not None:
        values["factor"] = _number(params, "rope_scaling_factor", where)
    values.update(override or {})
    desc = describe("llama3", values)
    log.warning("%s: use_scaled_rope with %s%s", where, desc,
                "" if override else " (Meta's values; --rope-scaling overrides them)")
    return llama3_factors(head_dim, theta, **values), desc


def from_gguf(fields: Mapping[str, Any], freqs: list[float] | None, head_dim: int,
              where: str) -> tuple[tuple[float, ...] | None, str | None]:
    """A GGUF's ``rope_freqs.weight`` (the divisors themselves) or ``llama.rope.scaling.*`` keys."""
    kind = fields.get("llama.rope.scaling.type")
    factor = fields.get("llama.rope.scaling.factor")
    if freqs is not None:
        if len(freqs) != head_dim // 2:
            raise UnsupportedError(f"{where}: rope_freqs.weight has {len(freqs)} values, expected {head_dim // 2}")
        if not all(math.isfinite(f) and f > 0 for f in freqs):
            raise UnsupportedError(f"{where}: rope_freqs.weight holds values that are not positive numbers")
        return tuple(float(f) for f in freqs), "rope_freqs.weight"
    if kind in (None, "none") or (kind == "linear" and factor in (None, 0, 1, 0.0, 1.0)):
        return None, None
    if kind == "linear":
        return (float(factor),) * (head_dim // 2), describe("linear", {"factor": float(factor)})
    raise UnsupportedError(f"{where}: rope scaling {kind!r} (llama.rope.scaling.type) is not supported "
                           "(supported: llama3 via rope_freqs.weight, linear)")


def parse_override(text: str) -> dict[str, float]:
    """``--rope-scaling factor=32,low=1,high=4,original=8192`` -> llama3 parameters (HF names)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in OVERRIDE_KEYS:
            raise UsageError(f"--rope-scaling: expected KEY=VALUE with KEY one of factor, low, high, original; got {item!r}")
        try:
            out[OVERRIDE_KEYS[key.strip()]] = float(value)
        except ValueError:
            raise UsageError(f"--rope-scaling: {key.strip()} must be a number, got {value!r}") from None
    if not out:
        raise UsageError("--rope-scaling: give at least one KEY=VALUE (factor, low, high, original)")
    return out


def _number(mapping: Mapping[str, Any], key: str, where: str) -> float:
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedError(f"{where}: rope scaling needs a number for {key!r}, got {value!r}")
    return float(value)
