"""Passes cut into pieces whose messages fit a frame (``protocol.MAX_PAYLOAD``).

A piece is a run of rows and a run of positions.  Rows are independent sequences.  Feeding a prompt in
runs of positions computes what feeding it at once does (chunked prefill): each run attends to the keys
that the runs before it left in the cache.  A right-padded row whose real tokens end in an earlier run is
padding in the later ones, as it was in the whole pass (padding also lands in the cache, never read); its
logits are those of the run that holds its last real token.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import protocol as P

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", bool], torch.Tensor]


def piece_shape(B: int, T: int, width: int, itemsize: int, max_rows: int) -> tuple[int, int]:
    """(rows, positions) of the largest piece of a (B, T) pass whose messages carry at most MAX_PAYLOAD bytes
    when a position of a row takes ``width`` values of ``itemsize`` bytes."""
    per_position = width * itemsize
    rows = max(1, min(B, max_rows, P.MAX_PAYLOAD // per_position))
    return rows, max(1, min(T, P.MAX_PAYLOAD // (rows * per_position)))


def forward(fwd: Forward, tokens: torch.Tensor, start: torch.Tensor, tables: torch.Tensor,
            lengths: torch.Tensor | None, all_logits: bool, rows: int, positions: int) -> torch.Tensor:
    """``fwd(tokens, start, tables, lengths, all_logits)`` over pieces of at most ``rows`` x ``positions``,
    joined: (B, vocab), or (B, T, vocab) with ``all_logits``.  Each piece carries its rows' block tables
    (B, W): a run of positions continues in the blocks the runs before it filled."""
    B, T = tokens.shape
    if B > rows:
        return torch.cat([forward(fwd, tokens[i : i + rows], start[i : i + rows], tables[i : i + rows],
                                  None if lengths is None else lengths[i : i + rows], all_logits, rows, positions)
                          for i in range(0, B, rows)])
    if T <= positions:
        return fwd(tokens, start, tables, lengths, all_logits)
    real = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths).long()  # (B,)
    pieces, out = [], None
    for s in range(0, T, positions):
        t = min(positions, T - s)
        here = (real - s).clamp(1, t)  # (B,) real tokens of each row in this run (at least one: its logits are unused)
        logits = fwd(tokens[:, s : s + t], start + s, tables, here if bool((here < t).any()) else None, all_logits)
        if all_logits:
            pieces.append(logits)  # (B, t, vocab)
            continue
        ends_here = (real - 1 >= s) & (real - 1 < s + t)  # (B,) rows whose last real token is in this run
        out = logits if out is None else torch.where(ends_here[:, None], logits, out)  # (B, vocab)
    return torch.cat(pieces, dim=1) if all_logits else out
