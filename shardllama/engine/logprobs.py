"""Log-probabilities as the API reports them: the raw log-softmax of the model's logits, in float64 (a
sum over a 50k vocabulary in f32 is 1 only within ~1e-5), before any sampling setting touches them."""

from __future__ import annotations

import torch

from .requests import Logprobs


def of_row(logits: torch.Tensor, token: int, top: int) -> Logprobs:
    """``token``'s log-probability under the (vocab,) ``logits``, and the ``top`` most likely tokens."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return Logprobs(token, float(lp[token]), _top(lp, top))


def of_positions(logits: torch.Tensor, tokens: list[int], top: int) -> list[Logprobs]:
    """For (n, vocab) ``logits`` of n consecutive positions: the log-probability of ``tokens[i]`` (the token
    that followed position i) under row i, and row i's ``top`` tokens."""
    lp = torch.log_softmax(logits[: len(tokens)].double(), dim=-1)  # (n, vocab)
    chosen = lp.gather(1, torch.tensor(tokens).view(-1, 1)).view(-1).tolist()
    return [Logprobs(t, c, _top(row, top)) for t, c, row in zip(tokens, chosen, lp)]


def _top(lp: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, ids = torch.topk(lp, min(k, lp.numel()))
    return tuple(zip(ids.tolist(), values.tolist()))
