"""The engine: requests of token ids in, token events out, one batched loop over a backend.

CLI, interactive mode and server are all clients of :class:`Engine` (``loop``): the CLI and interactive
mode run a batch of one in their own thread (:meth:`Engine.run`), the server runs the loop in a thread and
submits from its HTTP handlers.  The prompt cache (``prompt_cache``, on disk ``prompt_store``), prefill
chunking, stop ids and sampling exist here once.  KV memory is handed out in blocks (``blocks``).  Text
lives a layer up: the engine never sees a string.
"""

from __future__ import annotations

from typing import Collection, Iterator

import torch

from ..backend import Backend
from ..sampling import SamplingParams
from .blocks import blocks_needed
from .loop import PREFILL_CHUNK, Engine, QueueFull, ServerClosing
from .requests import Event, Failed, Finished, Logprobs, PromptLogprobs, Request, Stats, Token

__all__ = ["PREFILL_CHUNK", "Engine", "Event", "Failed", "Finished", "Logprobs", "PromptLogprobs", "QueueFull",
           "Request", "ServerClosing", "Stats", "Token", "blocks_needed", "generate"]


def generate(backend: Backend, prompt: list[int], params: SamplingParams, *, max_new_tokens: int | None = None,
             stop_ids: Collection[int] = (), generator: torch.Generator | None = None) -> Iterator[Token]:
    """The tokens of one request on an engine of its own over ``backend`` (tests and tools); until a stop
    id, ``max_new_tokens`` or the end of the context.  A failure raises its error."""
    request = Request(prompt=list(prompt), params=params, emit=lambda event: None,
                      max_new_tokens=backend.max_seq_len if max_new_tokens is None else max_new_tokens,
                      max_len=backend.max_seq_len, stop_ids=frozenset(stop_ids), generator=generator)
    for event in Engine(backend).run(request):
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Token):
            yield event
