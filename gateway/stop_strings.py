"""Stop strings over a stream of text deltas. No gRPC, no tokenizer: plain text in, text out.

A stop string can arrive split across deltas (and across tokens), so text that might be the
start of one is held back until the next delta decides. The match that counts is the one
that completes first in the text (smallest end; on a tie the earliest start), which is what a
reader going character by character would see, so the result does not depend on how the text
was cut into deltas. The stop string itself is never emitted.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.matched: str | None = None  # the stop string that ended the text, once one did
        self._held = ""  # emitted text that could still be the start of a stop string

    @property
    def held_back(self) -> str:
        return self._held

    def feed(self, delta: str) -> str:
        """Add the next piece of text; return what can be emitted now (possibly empty).

        After a match, returns the text before the stop string, then "" forever.
        """
        if self.matched is not None:
            return ""
        if not self.stop:
            return delta
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self.matched = stop
            self._held = ""
            return text[:start]
        keep = self._partial_tail(text)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The text ended: whatever was held back can no longer become a stop string."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self.stop:
            start = text.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string:
        the least we must hold back (nothing before it can start a match)."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
