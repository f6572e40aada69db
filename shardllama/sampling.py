"""Token sampling: small pure functions, randomness only from an explicit ``torch.Generator``.

The order is the usual one (transformers, llama.cpp): repetition penalty on the raw logits, then
temperature, then top-k, then top-p.  Temperature 0 (or top-k 1) means greedy: the argmax, with
probability 1 under those settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from .errors import UsageError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.2  # rllama's default
    top_k: int = 20  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages repeats; 1 = off
    repetition_penalty_last_n: int = 64  # window of recent tokens the penalty looks at; -1 = all

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_penalty_last_n < -1:
            raise UsageError(f"repetition_penalty_last_n must be >= -1, got {self.repetition_penalty_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], penalty: float, last_n: int) -> torch.Tensor:
    """CTRL-style penalty over the distinct tokens among the last ``last_n`` of ``history``.

    A positive logit is divided by the penalty and a negative one multiplied, so the token always
    becomes less likely (dividing a negative logit would make it *more* likely); each distinct token is
    penalised once, however often it occurred.
    """
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    window = history if last_n < 0 else history[-last_n:]
    ids = torch.tensor(sorted(set(window)), dtype=torch.long)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the next token is drawn from, (vocab,) float64, zero outside top-k / top-p."""
    # In float64, with the maximum shifted to 0 before scaling: any temperature or penalty a user can type
    # (1e-300 included) then gives a distribution, never inf - inf or 0 / 0.
    logits = torch.nan_to_num(logits.double(), nan=-torch.inf, posinf=torch.finfo(torch.float64).max)
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[int(logits.argmax())] = 1.0
        return probs
    if 0 < params.top_k < logits.numel():
        # On the logits themselves (a positive temperature keeps their order): probabilities that
        # underflow to 0 must not tie with the k-th.
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = torch.where(logits >= kth, logits, -torch.inf)
    scaled = (logits - logits.max()) / params.temperature
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < p.
        keep_sorted = (cumulative - sorted_probs) < params.top_p * cumulative[-1]
        keep_sorted[0] = True  # the most likely token always stays, however small top_p is
        keep = torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from ``probs``; a one-hot distribution needs no randomness."""
    return int(torch.multinomial(probs, 1, generator=generator))


def choose(logits: torch.Tensor, history: Sequence[int], params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, float]:
    """Penalise, shape and draw: the chosen token id and its probability under ``params``."""
    logits = apply_repetition_penalty(logits.double(), history, params.repetition_penalty, params.repetition_penalty_last_n)
    probs = logits_to_probs(logits, params)
    token = int(probs.argmax()) if params.greedy else sample(probs, generator)
    return token, float(probs[token])
