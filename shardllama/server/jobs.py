"""A generation request as the scheduler runs it (:class:`Job`), and the events it sends back.

The contract between the HTTP handlers and the scheduler thread: a handler builds a Job with an ``emit``
callback; the scheduler calls it, from its own thread, with one :class:`Token` per generated token (the
last one flagged ``last`` and carrying the job's counts), or :class:`Finished` when there was nothing to
generate, or :class:`Failed`.  A cancelled job gets no further event.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..engine import Sequence
from ..sampling import SamplingParams
from .prompt_cache import Key, cache_key, salt_id


@dataclasses.dataclass(frozen=True)
class JobStats:
    prompt_tokens: int  # tokens in the prompt
    cached_tokens: int  # of them, reused from the prompt cache
    computed_tokens: int  # prompt (and, after a lost cache, generated) tokens fed through the model
    generated: int


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    prob: float  # under the request's sampling settings
    is_end: bool  # a stop id that ended the generation
    last: bool  # nothing follows this event
    probs: torch.Tensor | None = None  # (vocab,) the model's own distribution, for no_token_sampling
    stats: JobStats | None = None  # on the last token


@dataclasses.dataclass(frozen=True)
class Finished:
    """The job ended without a token (max_new_tokens 0)."""

    stats: JobStats


@dataclasses.dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Token | Finished | Failed


@dataclasses.dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    max_new_tokens: int
    max_len: int  # positions the sequence may use; the last generated token is emitted, never fed
    stop_ids: frozenset[int] = frozenset()  # tokens that end the generation
    full_distribution: bool = False
    generator: torch.Generator | None = None
    cache_salt: str | None = None  # shares cached prefixes only with jobs of the same salt (``prompt_cache``)
    # State, owned by the scheduler thread:
    seq: Sequence | None = None
    budget: int = 0
    generated: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    retries: int = 0
    cancelled: bool = False
    done: bool = False

    @property
    def pending(self) -> int:
        """Tokens the slot lacks."""
        return len(self.seq.tokens) - self.seq.n_cached

    def key(self, tokens: list[int]) -> Key:
        """The prompt cache's key for ``tokens`` of this job."""
        return cache_key(tokens, salt_id(self.cache_salt))

    def stats(self) -> JobStats:
        return JobStats(len(self.prompt), self.cached_tokens, self.computed_tokens, self.generated)
