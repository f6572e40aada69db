"""The generation loop: token ids in, token ids out, on any :class:`~shardllama.backend.Backend`.

A :class:`Sequence` is the state of one conversation in one KV-cache slot: every token so far and how
many of them the cache already holds.  Generation feeds the tokens the cache lacks (the prompt, or the
user's next line in interactive mode) in one forward pass, then decodes one token per pass.  CLI,
interactive mode and server all call :func:`generate`; text lives a layer up.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Collection, Iterator

import torch

from .backend import Backend
from .errors import PromptTooLongError, UsageError
from .sampling import SamplingParams, choose


@dataclasses.dataclass
class Sequence:
    slot: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    n_cached: int = 0  # tokens[:n_cached] have their keys/values in the slot


@dataclasses.dataclass
class TokenEvent:
    token: int
    prob: float  # probability of this token under the sampling settings
    is_end: bool  # one of the stop ids (end of text / end of turn)


@dataclasses.dataclass
class Stats:
    """Timings of one generate() call, for the CLI's summary line and the benchmarks."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0  # the forward pass over the new prompt tokens
    first_token_s: float = 0.0  # from the call to the first token: time to first token
    generated: int = 0
    decode_s: float = 0.0  # forward passes after the first token

    @property
    def ms_per_token(self) -> float:
        """Decode time per token, counting the passes after the first token."""
        steps = self.generated - 1
        return 1000 * self.decode_s / steps if steps > 0 else float("nan")

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")


def generate(
    backend: Backend,
    seq: Sequence,
    new_tokens: list[int],
    params: SamplingParams,
    *,
    max_new_tokens: int | None = None,
    stop_ids: Collection[int] = (),
    generator: torch.Generator | None = None,
    stats: Stats | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[TokenEvent]:
    """Append ``new_tokens`` to ``seq`` and yield generated tokens until a stop id, ``max_new_tokens``
    or the end of the context.  ``seq`` is updated as it goes, so a caller can continue it later."""
    if max_new_tokens is not None and max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    seq.tokens.extend(new_tokens)
    if len(seq.tokens) > backend.max_seq_len:
        raise PromptTooLongError(
            f"prompt is {len(seq.tokens)} tokens, longer than --max-seq-len {backend.max_seq_len}"
        )
    if not seq.tokens:
        raise UsageError("the prompt is empty and the model adds no BOS token: nothing to continue from")
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(seq.tokens) - seq.n_cached
    budget = backend.max_seq_len - len(seq.tokens) + 1  # the last token is emitted, never fed
    if max_new_tokens is not None:
        budget = min(budget, max_new_tokens)
    if budget <= 0:
        return
    slots = torch.tensor([seq.slot])

    t0 = time.perf_counter()
    logits = _feed(backend, seq, slots)
    stats.prefill_s = time.perf_counter() - t0
    while True:
        if on_logits is not None:
            on_logits(logits[0])
        token, prob = choose(logits[0], seq.tokens, params, generator)
        seq.tokens.append(token)
        stats.generated += 1
        if stats.generated == 1:
            stats.first_token_s = time.perf_counter() - t0
        is_end = token in stop_ids
        yield TokenEvent(token, prob, is_end)
        if is_end or stats.generated >= budget:
            break
        t1 = time.perf_counter()
        logits = _feed(backend, seq, slots)
        stats.decode_s += time.perf_counter() - t1


def _feed(backend: Backend, seq: Sequence, slots: torch.Tensor) -> torch.Tensor:
    """Run the tokens the cache lacks through the model; logits of the last one, (1, vocab)."""
    pending = seq.tokens[seq.n_cached:]
    logits = backend.forward(torch.tensor([pending]), torch.tensor([seq.n_cached]), slots)
    seq.n_cached = len(seq.tokens)
    return logits
