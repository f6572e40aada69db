"""Stop strings: generated text in, text safe to show out.

A stop string can arrive split over several tokens, so the tail that could be the start of one is held
back until it is clearly not; the text before a stop string is let out and the stop string never is.
Interactive mode and the OpenAI API both end a turn this way.
"""

from __future__ import annotations

from collections.abc import Collection


class StopScanner:
    """Generated text in, text safe to print out: holds back a tail that may begin a stop string."""

    def __init__(self, stops: Collection[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # the whole turn so far
        self.printed = 0  # text[:printed] has been let out
        self.stop_at: int | None = None  # where the stop string begins, once found

    def push(self, piece: str) -> str:
        """Append ``piece``; return what may be printed now ("" after a stop string)."""
        if self.stop_at is not None:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(s, self.printed) for s in self.stops) if i >= 0]
        if hits:
            self.stop_at = min(hits)
            return self._release(self.stop_at)
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def finish(self) -> str:
        """The held-back tail, at the end of a turn that no stop string ended."""
        return self._release(len(self.text) if self.stop_at is None else self.stop_at)

    def _release(self, end: int) -> str:
        out, self.printed = self.text[self.printed:end], max(self.printed, end)
        return out
