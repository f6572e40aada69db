"""Text of a growing id sequence, decoded piece by piece for streaming, never half a UTF-8 character.

Kept apart from :mod:`.tokenizer`: it needs nothing of a tokenizer but its ``decode``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class StreamDecoder:
    """Text of a growing id sequence, piece by piece, never half a UTF-8 character.

    Each push decodes the last emitted run of tokens (the context) plus the ones not yet emitted, and
    returns what that adds to the context's own text.  The context carries what a token's text depends
    on: SentencePiece drops the space of only the first piece, and byte tokens join into characters.
    Text ending in U+FFFD is held back while the character may still complete.  After ``MAX_HOLD`` tokens
    (a character is at most 4 bytes) the text is let out but for that last U+FFFD, the only one a later
    byte can still turn into a character; so each push decodes a bounded window: O(1) per token.

    All pushes plus ``flush()`` concatenate to ``decode(all ids)`` exactly, for any ids, whenever the
    decoder turns bytes into text as UTF-8 decoding with replacement does (SentencePiece, byte-level BPE).
    HF's ByteFallback decoder turns a whole run of ``<0xNN>`` tokens into U+FFFD when one of them is
    invalid, retroactively: for such runs the count of U+FFFD can differ.
    """

    MAX_HOLD = 8

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._context: list[int] = []
        self._context_text = ""
        self._owed = 0  # trailing characters of _context_text not emitted yet (0, or 1: a U+FFFD)
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self._new_text()
        if not text:  # control tokens, or a leading space SentencePiece may still drop: wait
            if len(self._pending) > self.MAX_HOLD:
                self._pending.clear()  # they rendered as nothing after the context; keep the window bounded
            return ""
        if not text.endswith(REPLACEMENT):
            self._advance(owed=0)
            return text
        if len(self._pending) < self.MAX_HOLD:
            return ""
        self._advance(owed=1)
        return text[:-1]

    def flush(self) -> str:
        text = self._new_text()
        if self._pending:
            self._advance(owed=0)
        self._owed = 0
        return text

    def _new_text(self) -> str:
        return self._decode(self._context + self._pending)[len(self._context_text) - self._owed:]

    def _advance(self, owed: int) -> None:
        self._context, self._pending, self._owed = self._pending, [], owed
        self._context_text = self._decode(self._context)
