"""Token sampling: small pure functions, randomness only from an explicit ``torch.Generator``.

One order, vLLM's, for the CLI and both HTTP APIs alike:

1. ``logit_bias``: each named token's bias added to its logit (OpenAI's; -100 all but bans a token, +100 all
   but forces it);
2. repetition penalty (CTRL's), over the last ``repetition_penalty_last_n`` tokens of prompt and output;
3. presence and frequency penalties (OpenAI's), over the *generated* tokens only:
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``;
4. temperature;
5. min-p: a token stays if its probability is at least ``min_p`` times the most likely token's;
6. top-k;
7. top-p, over what min-p and top-k left, renormalised.

Temperature 0 (or top-k 1) means greedy: the argmax after bias and penalties (steps 1-3), with probability
1 under those settings.  The math is float64 on a copy of the row's logits: any setting a user can type
gives a distribution, never inf - inf or 0 / 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import torch

from .errors import UsageError

MAX_LOGIT_BIAS = 100.0  # OpenAI's range, [-100, 100]
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.2  # rllama's default
    top_k: int = 20  # 0 = no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages repeats; 1 = off
    repetition_penalty_last_n: int = 64  # window of recent tokens the penalty looks at; -1 = all
    min_p: float = 0.0  # in [0, 1]; 0 = off
    presence_penalty: float = 0.0  # in [-2, 2]; > 0 discourages any token already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; > 0 discourages a token by how often it was generated
    # token id -> bias in [-100, 100]; given as a mapping (or pairs), kept as (id, bias) pairs sorted by id
    logit_bias: tuple[tuple[int, float], ...] | Mapping[int, float] = ()
    _bias_ids: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _bias_values: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

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
        if not 0 <= self.min_p <= 1:  # False for NaN too
            raise UsageError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise UsageError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        pairs = _pairs(self.logit_bias)
        for token, bias in pairs:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise UsageError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not abs(bias) <= MAX_LOGIT_BIAS:
                raise UsageError(f"logit_bias of token {token} must be in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {bias!r}")
        pairs.sort()
        for (a, _), (b, _) in zip(pairs, pairs[1:]):
            if a == b:
                raise UsageError(f"logit_bias names token {a} twice")
        object.__setattr__(self, "logit_bias", tuple((token, float(bias)) for token, bias in pairs))
        if pairs:  # built once: each step adds them with one index_add_
            object.__setattr__(self, "_bias_ids", torch.tensor([t for t, _ in pairs], dtype=torch.long))
            object.__setattr__(self, "_bias_values", torch.tensor([b for _, b in pairs], dtype=torch.float64))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def check_vocab(self, vocab_size: int) -> None:
        """UsageError if ``logit_bias`` names a token the model (``vocab_size`` logits) does not have."""
        if self.logit_bias and self.logit_bias[-1][0] >= vocab_size:
            raise UsageError(f"logit_bias names token {self.logit_bias[-1][0]}, outside the vocabulary "
                             f"(size {vocab_size})")


def _pairs(bias: Mapping[int, float] | Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    return list(bias.items() if isinstance(bias, Mapping) else bias)


def apply_logit_bias_(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Add ``params.logit_bias`` to ``logits`` (float64, modified in place)."""
    if params._bias_ids is not None:
        logits.index_add_(0, params._bias_ids, params._bias_values)
    return logits


def apply_repetition_penalty_(logits: torch.Tensor, history: Sequence[int], penalty: float, last_n: int) -> torch.Tensor:
    """CTRL-style penalty over the distinct tokens among the last ``last_n`` of ``history`` (in place).

    A positive logit is divided by the penalty and a negative one multiplied, so the token always
    becomes less likely (dividing a negative logit would make it *more* likely); each distinct token is
    penalised once, however often it occurred.
    """
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    window = history if last_n < 0 else history[-last_n:]
    ids = torch.tensor(sorted(set(window)), dtype=torch.long)
    picked = logits[ids]
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency_(logits: torch.Tensor, generated: Sequence[int], presence: float,
                              frequency: float) -> torch.Tensor:
    """OpenAI's penalties (in place): ``logit -= frequency * count + presence * (count > 0)``, ``count`` being
    how often the token occurs in ``generated`` (the output so far, never the prompt)."""
    if (presence == 0 and frequency == 0) or not generated:
        return logits
    ids, counts = torch.unique(torch.tensor(generated, dtype=torch.long), return_counts=True)
    logits[ids] -= counts.double() * frequency + presence
    return logits


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the next token is drawn from, (vocab,) float64: steps 4-7 of the module's order
    (temperature, min-p, top-k, top-p) on ``logits`` that carry steps 1-3; zero outside what they keep."""
    # In float64, with the maximum shifted to 0 before scaling: any temperature or penalty a user can type
    # (1e-300 included) then gives a distribution, never inf - inf or 0 / 0.
    logits = torch.nan_to_num(logits.double(), nan=-torch.inf, posinf=torch.finfo(torch.float64).max)
    if params.greedy:
        probs = torch.zeros_like(logits)
        probs[int(logits.argmax())] = 1.0
        return probs
    scaled = (logits - logits.max()) / params.temperature  # log(p / p_max)
    if params.min_p > 0:
        # In log space: p >= min_p * p_max holds for tokens whose probability underflows to 0 too.
        keep = scaled >= math.log(params.min_p)
        logits, scaled = torch.where(keep, logits, -torch.inf), torch.where(keep, scaled, -torch.inf)
    if 0 < params.top_k < logits.numel():
        # On the logits themselves (a positive temperature keeps their order): probabilities that
        # underflow to 0, or logits that scaling rounds together, must not tie with the k-th.  Among
        # what min-p kept: min-p's set holds the most likely tokens, so the two masks commute.
        kth = torch.topk(logits, params.top_k).values[-1]
        scaled = torch.where(logits >= kth, scaled, -torch.inf)
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


def choose(logits: torch.Tensor, tokens: Sequence[int], n_prompt: int, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, float]:
    """Bias, penalise, shape and draw, in the module's order: the chosen token id and its probability under
    ``params``.  ``tokens`` is the prompt then what was generated, the generated part starting at
    ``n_prompt``; ``logits`` (vocab,) is not modified."""
    logits = logits.to(torch.float64, copy=True)  # the one copy that steps 1-3 modify in place
    apply_logit_bias_(logits, params)
    apply_repetition_penalty_(logits, tokens, params.repetition_penalty, params.repetition_penalty_last_n)
    apply_presence_frequency_(logits, tokens[n_prompt:], params.presence_penalty, params.frequency_penalty)
    probs = logits_to_probs(logits, params)
    token = int(probs.argmax()) if params.greedy else sample(probs, generator)
    return token, float(probs[token])
