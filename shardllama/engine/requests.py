"""A generation request as the engine runs it (:class:`Request`), and the events it sends back.

The contract between the engine and its clients (CLI, interactive mode, HTTP handlers): a client builds a
Request with an ``emit`` callback; the engine calls it, from the thread that runs the engine, with one
:class:`Token` per generated token (the last one flagged ``last`` and carrying the request's
:class:`Stats`), or :class:`Finished` when there was nothing to generate, or :class:`Failed`.  A request
with ``prompt_logprobs`` first gets one :class:`PromptLogprobs`.  A cancelled request gets no further event.

Log-probabilities (:class:`Logprobs`) are the raw log-softmax of the model's logits: before the logit bias,
penalties, temperature, top-k/top-p/min-p and any grammar mask (vLLM's default), so they say what the model
thinks of a token whatever the request's sampling settings.

``n`` > 1 choices of one prompt are one request with ``followers``: the engine admits them together, feeds
the prompt once, and when it is done each follower starts from the leader's KV blocks (shared, the partial
last block copied) and samples from the same logits with its own generator (and its own ``constraint``).  :meth:`~.loop.Engine.submit` may refuse a request (:class:`QueueFull`,
:class:`ServerClosing`); :meth:`~.loop.Engine.stats` reports the :class:`Counters`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..errors import ShardllamaError
from ..sampling import SamplingParams
from .prompt_cache import Key, cache_key, salt_id


@dataclasses.dataclass(frozen=True)
class Stats:
    """Counts and timings of one request (the CLI's summary line, the server's usage fields)."""

    prompt_tokens: int  # tokens in the prompt
    cached_tokens: int  # of them, reused from the prompt cache
    computed_tokens: int  # prompt (and, after a lost cache, generated) tokens fed through the model
    generated: int
    prefill_s: float = 0.0  # forward passes that fed the prompt (and sampled the first token)
    first_token_s: float = 0.0  # from admission to the first token: time to first token
    decode_s: float = 0.0  # forward passes after the first token

    @property
    def ms_per_token(self) -> float:
        """Decode time per token, counting the passes after the first token."""
        steps = self.generated - 1
        return 1000 * self.decode_s / steps if steps > 0 else float("nan")

    @property
    def prefill_tok_s(self) -> float:
        fed = self.prompt_tokens - self.cached_tokens
        return fed / self.prefill_s if self.prefill_s > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class Logprobs:
    """One position's raw log-probabilities: the token there and, most likely first, the ``top`` tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob)


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    prob: float  # under the request's sampling settings
    is_end: bool  # a stop id that ended the generation
    last: bool  # nothing follows this event
    probs: torch.Tensor | None = None  # (vocab,) the model's own distribution, for no_token_sampling
    stats: Stats | None = None  # on the last token
    logprobs: Logprobs | None = None  # with the request's ``logprobs``


@dataclasses.dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens' log-probabilities, each given the tokens before it; the first token has none."""

    entries: tuple[Logprobs | None, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The request ended without a token (max_new_tokens 0)."""

    stats: Stats


@dataclasses.dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Token | PromptLogprobs | Finished | Failed


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    max_new_tokens: int
    max_len: int  # positions the sequence may use; the last generated token is emitted, never fed
    stop_ids: frozenset[int] = frozenset()  # tokens that end the generation
    full_distribution: bool = False
    generator: torch.Generator | None = None
    cache_salt: str | None = None  # shares cached prefixes only with requests of the same salt (``prompt_cache``)
    logprobs: int | None = None  # each Token's Logprobs with this many top tokens (0: the chosen one only)
    prompt_logprobs: bool = False  # a PromptLogprobs event (the prompt is then fed whole, not from the cache)
    constraint: object | None = None  # a grammar.Constraint: masks each step's logits, accepts the drawn token
    followers: list["Request"] = dataclasses.field(default_factory=list)  # more choices of the same prompt
    # State, owned by the engine:
    tokens: list[int] = dataclasses.field(default_factory=list)  # the prompt, then what was generated
    n_cached: int = 0  # tokens[:n_cached] have their keys and values in the blocks of ``table``
    table: list[int] = dataclasses.field(default_factory=list)  # block table: KV-cache blocks, in order
    budget: int = 0
    generated: int = 0
    cached_tokens: int = 0
    computed_tokens: int = 0
    retries: int = 0
    admitted_at: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    cancelled: bool = False
    done: bool = False
    prompt_entries: list[Logprobs | None] = dataclasses.field(default_factory=list)  # PromptLogprobs so far

    @property
    def size(self) -> int:
        """Run places the request takes: itself and its followers."""
        return 1 + len(self.followers)

    @property
    def pending(self) -> int:
        """Tokens the cache lacks."""
        return len(self.tokens) - self.n_cached

    def key(self, tokens: list[int]) -> Key:
        """The prompt cache's key for ``tokens`` of this request."""
        return cache_key(tokens, salt_id(self.cache_salt))

    def stats(self) -> Stats:
        return Stats(len(self.prompt), self.cached_tokens, self.computed_tokens, self.generated,
                     self.prefill_s, self.first_token_s, self.decode_s)


class QueueFull(ShardllamaError):
    """Every run place is taken and the waiting queue is full (HTTP 503)."""

    code = "server_is_overloaded"  # OpenAI's error code (the server's error bodies carry it)


class ServerClosing(ShardllamaError):
    """The engine is shutting down (HTTP 503)."""

    code = "server_shutting_down"


@dataclasses.dataclass
class Counters:
    requests: int = 0  # admitted to run
    completed: int = 0  # ran to their end
    cancelled: int = 0  # client went away
    failed: int = 0
    rejected: int = 0  # queue full
    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache
    cache_hits: int = 0  # requests that reused at least one token
    generated: int = 0
    decode_passes: int = 0
    decode_rows: int = 0
    max_decode_batch: int = 0
    prefill_passes: int = 0
    prefill_rows: int = 0  # prompts (chunks) fed by those passes: more rows than passes = batched prefills
    max_prefill_batch: int = 0
