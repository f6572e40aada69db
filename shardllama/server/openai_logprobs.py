"""Log-probabilities in the OpenAI API's two shapes, from the engine's :class:`~..engine.Logprobs`.

The numbers are the engine's: the raw log-softmax of the model's logits, before temperature, penalties and
filters (vLLM's default), so they say what the model thinks of a token whatever the request's sampling.

Chat (``logprobs: true``, ``top_logprobs: K``), per generated token::

    {"token": " Paris", "logprob": -0.31, "bytes": [32, 80, 97, 114, 105, 115],
     "top_logprobs": [{"token", "logprob", "bytes"}, ...]}          # K entries, most likely first

Completions (``logprobs: K``), per token, in parallel lists::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob, ...}, ...], "text_offset": [...]}

With ``echo`` the prompt's tokens come first; the first of them has ``null`` for its log-probability and
its top tokens (nothing precedes it).  ``text_offset`` is where the token's text starts in the choice's
text (the echoed prompt included): the length of what the stream decoder had let out before it.  A token's
text is ``token_text`` (a lone byte of a multi-byte character shows as ``"\\xe4"``; its ``bytes`` are the
real ones).  Top tokens whose texts coincide keep the likelier one in the completions' ``{text: logprob}``.
The end token that closes a turn adds no text and is left out, as OpenAI leaves it out.
"""

from __future__ import annotations

import math
from typing import Any

from ..engine import Logprobs
from ..stream_decode import StreamDecoder
from ..tokenizer import Tokenizer

FLOOR = -9999.0  # OpenAI's value for a token too unlikely to have a finite log-probability

Item = tuple[int, "Logprobs | None", int]  # token id, its log-probabilities (None: the first prompt token), text offset


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _chat_entry(tokenizer: Tokenizer, id: int, logprob: float) -> dict[str, Any]:
    return {"token": tokenizer.token_text(id), "logprob": _value(logprob), "bytes": list(tokenizer.token_bytes(id))}


def chat_content(tokenizer: Tokenizer, items: list[Item]) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content`` entries for generated tokens."""
    return [{**_chat_entry(tokenizer, id, lp.logprob),
             "top_logprobs": [_chat_entry(tokenizer, i, v) for i, v in lp.top]}
            for id, lp, _ in items if lp is not None]


def completion_logprobs(tokenizer: Tokenizer, items: list[Item]) -> dict[str, list]:
    """Completions' ``logprobs`` object for ``items`` (echoed prompt tokens first, then generated ones)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for id, lp, offset in items:
        out["tokens"].append(tokenizer.token_text(id))
        out["text_offset"].append(offset)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_value(lp.logprob))
        top: dict[str, float] = {}
        for i, v in lp.top:
            top.setdefault(tokenizer.token_text(i), _value(v))
        out["top_logprobs"].append(top)
    return out


def echo_of(tokenizer: Tokenizer, ids: list[int], text: str | None) -> tuple[str, list[int]]:
    """The echoed prompt (``text`` as sent, else the ids decoded) and each prompt token's text offset."""
    decoder, offsets, decoded = StreamDecoder(tokenizer), [], ""
    for i in ids:
        offsets.append(len(decoded))
        decoded += decoder.push(i)
    decoded += decoder.flush()
    return (decoded if text is None else text), offsets


def prompt_items(ids: list[int], entries: tuple[Logprobs | None, ...], offsets: list[int]) -> list[Item]:
    """The echoed prompt's items: each token with the engine's PromptLogprobs entry for it."""
    return [(i, e, o) for i, e, o in zip(ids, entries, offsets)]
