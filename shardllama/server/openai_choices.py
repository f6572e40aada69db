"""One OpenAI request's choices on the engine: ``n`` choices of each prompt, every prompt of a list at once.

Each prompt is one engine request with ``n - 1`` followers (the prompt is fed once; each follower starts
from the leader's KV blocks), and every prompt's group is submitted before any runs, so a list of prompts
batches.  Choice ``i`` of the response is choice ``j`` of prompt ``p`` with ``i = p * n + j`` (OpenAI's
order).  Each choice samples with its own generator: with a ``seed``, choice 0 uses the seed itself (so
``n = 1`` is what it always was) and choice ``i`` a seed derived from the seed and ``i`` (:func:`choice_seed`):
reproducible, and not the same draw ``n`` times.

:meth:`Run.pieces` reads the events of every choice from one queue and yields :class:`Piece`s: the text
each token adds (past the stream decoder and the stop strings), its log-probabilities, the prompt's
log-probabilities (``echo``), and each choice's finish.  The routes (:mod:`.openai_api`) turn pieces into
one JSON body or into server-sent events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
from typing import AsyncIterator

import torch

from ..engine import Failed, Finished, PromptLogprobs, Request, Token
from ..stops import StopScanner
from ..stream_decode import StreamDecoder
from .common import ServerState
from .openai_logprobs import Item
from .openai_schemas import Choices, Generation, ParamError
from .structured import Structured


def choice_seed(seed: int | None, index: int) -> int:
    """The generator seed of choice ``index``: ``seed`` for choice 0, a hash of (seed, index) for the others,
    a random one without a seed."""
    if seed is None:
        return secrets.randbits(63)
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclasses.dataclass(eq=False)
class Choice:
    index: int
    prompt: int  # which prompt of the request it continues
    job: Request
    decoder: StreamDecoder
    stops: StopScanner
    tokens: int = 0  # generated (usage's completion_tokens)
    offset: int = 0  # characters the decoder has let out: the text offset of the next token
    finish_reason: str | None = None
    # What the pieces added, for a response that is not streamed (:func:`collect`):
    text: str = ""
    items: list[Item] = dataclasses.field(default_factory=list)
    prompt_entries: tuple | None = None


@dataclasses.dataclass
class Piece:
    """What one engine event adds to one choice."""

    choice: Choice
    text: str = ""
    items: list[Item] = dataclasses.field(default_factory=list)  # the tokens' log-probabilities
    prompt_entries: tuple | None = None  # the prompt's log-probabilities (PromptLogprobs.entries)
    finish_reason: str | None = None  # on the choice's last piece


class Run:
    """The engine requests of one OpenAI request: built here, submitted by :meth:`submit`, read by
    :meth:`pieces`, cancelled when that ends (finished, failed, or the client gone)."""

    def __init__(self, state: ServerState, prompts: list[list[int]], gen: Generation, choices: Choices,
                 st: Structured | None = None):
        self.state, self.prompts, self.n = state, prompts, choices.n
        engine = state.engine
        if choices.n > engine.max_concurrent:
            raise ParamError(f'"n" is {choices.n}, more than the {engine.max_concurrent} generations this server '
                             "runs at once (its max_concurrent)", "n")
        total, room = len(prompts) * choices.n, engine.max_concurrent + engine.max_queue
        if total > room:
            raise ParamError(f'"prompt" holds {len(prompts)} prompts of {choices.n} choices each: {total} '
                             f"generations, more than the {room} this server runs and queues at once", "prompt")
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices: list[Choice] = []
        self.leaders: list[Request] = []
        for p, ids in enumerate(prompts):
            group = []
            for j in range(choices.n):
                index = p * choices.n + j
                job = Request(
                    prompt=list(ids), params=gen.params, emit=self._emitter(loop, index),
                    max_new_tokens=state.max_seq_len if gen.max_tokens is None else gen.max_tokens,
                    max_len=state.max_seq_len, stop_ids=state.tokenizer.stop_ids,
                    generator=torch.Generator().manual_seed(choice_seed(gen.seed, index)),
                    cache_salt=gen.cache_salt, logprobs=choices.logprobs,
                    prompt_logprobs=choices.echo and choices.logprobs is not None,
                    constraint=st and st.constraint())  # each choice its own grammar state
                group.append(job)
                self.choices.append(Choice(index, p, job, state.tokenizer.stream(), StopScanner(gen.stop)))
            group[0].followers = group[1:]
            self.leaders.append(group[0])

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int):
        put = self._queue.put_nowait
        return lambda event: loop.call_soon_threadsafe(put, (index, event))

    def submit(self) -> None:
        """Every prompt's group onto the engine; if the queue fills part way, none of them (QueueFull)."""
        try:
            for leader in self.leaders:
                self.state.engine.submit(leader)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for c in self.choices:
            self.state.engine.cancel(c.job)  # a no-op once it finished

    async def pieces(self) -> AsyncIterator[Piece]:
        """Pieces of every choice as their events arrive, until each has finished.  A failure raises."""
        live = len(self.choices)
        try:
            while live:
                index, event = await self._queue.get()
                c = self.choices[index]
                if c.finish_reason is not None:  # ended by a stop string: what the engine sent since is moot
                    continue
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, PromptLogprobs):
                    yield Piece(c, prompt_entries=event.entries)
                    continue
                if isinstance(event, Finished):  # max_tokens 0
                    c.finish_reason = "length"
                    live -= 1
                    yield Piece(c, finish_reason="length")
                    continue
                assert isinstance(event, Token), event
                live -= self._token(c, event, piece := Piece(c))
                yield piece
        finally:
            self.cancel()

    def _token(self, c: Choice, event: Token, piece: Piece) -> bool:
        """Fills ``piece`` with what ``event`` adds to ``c``; True when that ends the choice."""
        c.tokens += 1
        text = c.decoder.push(event.id) + (c.decoder.flush() if event.last else "")
        # The end token that closes the turn is not part of the answer (as OpenAI); a grammar's last token is.
        if event.logprobs is not None and event.id not in c.job.stop_ids:
            piece.items.append((event.id, event.logprobs, c.offset))
        c.offset += len(text)
        piece.text = c.stops.push(text)
        if c.stops.stop_at is not None:
            piece.finish_reason = "stop"
            self.state.engine.cancel(c.job)
        elif event.last:
            piece.finish_reason = "stop" if event.is_end else "length"
            piece.text += c.stops.finish()
        c.finish_reason = piece.finish_reason
        return c.finish_reason is not None

    def usage(self) -> dict:
        """Each prompt's tokens counted once, every choice's generated tokens, and the prompt tokens the prompt
        cache supplied (``prompt_tokens_details.cached_tokens``)."""
        prompt = sum(len(ids) for ids in self.prompts)
        completion = sum(c.tokens for c in self.choices)
        cached = sum(leader.cached_tokens for leader in self.leaders)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


async def collect(pieces: AsyncIterator[Piece]) -> None:
    """Every piece into its choice's ``text``, ``items`` and ``prompt_entries`` (a response not streamed)."""
    async for piece in pieces:
        c = piece.choice
        c.text += piece.text
        c.items.extend(piece.items)
        if piece.prompt_entries is not None:
            c.prompt_entries = piece.prompt_entries
