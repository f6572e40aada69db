"""How the rows of a batched pass are laid out: the width of a prefill pass, its right-padded token rows and
the block tables of its rows.  Pure functions of the requests' state; the loop (``loop``) owns the state."""

from __future__ import annotations

import torch

from .requests import Request

PAD_SLACK = 16  # padded positions a batched prefill may always carry (a guess for CPUs, not a measurement)


def prefill_width(wants: list[int], room: int) -> int:
    """Tokens per row of a batched prefill whose rows want ``wants`` tokens each (>= 1), none of them more
    than ``room`` (the padding also lands in the KV cache, which must have the positions): the widest that
    pads at most ``PAD_SLACK`` positions or an eighth of the pass.  Rows that want more continue next round."""
    capped = [min(w, room) for w in wants]
    for width in sorted(set(capped), reverse=True):
        real = sum(min(w, width) for w in capped)
        if len(capped) * width - real <= max(PAD_SLACK, real // 8):
            return width
    raise AssertionError(wants)  # unreachable: the narrowest width pads nothing


def prefill_rows(requests: list[Request], width: int) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """The next ``width`` tokens to feed of every request, right-padded: (B, width) tokens (padding: token 0,
    never read back), the real count of each row, and those counts as ``lengths`` (None if none is padded)."""
    counts = [min(r.pending, width) for r in requests]
    tokens = torch.zeros((len(requests), width), dtype=torch.long)  # (B, T)
    for row, (r, n) in enumerate(zip(requests, counts)):
        tokens[row, :n] = torch.tensor(r.tokens[r.n_cached: r.n_cached + n])
    return tokens, counts, torch.tensor(counts) if min(counts) < width else None  # lengths: (B,)


def table_rows(requests: list[Request]) -> torch.Tensor:
    """(B, W) block tables of the requests' rows; past a row's own table: block 0, never read."""
    tables = torch.zeros((len(requests), max(len(r.table) for r in requests)), dtype=torch.long)
    for row, r in enumerate(requests):
        tables[row, : len(r.table)] = torch.tensor(r.table)
    return tables
