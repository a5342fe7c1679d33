"""Incremental detokenization: turn a growing list of token ids into text deltas.

A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK),
and a tokenizer may merge spaces differently at a boundary, so decoding tokens one at a time is
wrong. We decode a short window that overlaps the already-emitted text and hold back output
while it ends in an incomplete character (the same scheme vLLM and TGI use).
"""

from __future__ import annotations

from typing import Sequence

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # tokens before this are already emitted as text
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: Sequence[int]) -> str:
        """Append tokens; return the newly completed text (possibly empty)."""
        self.token_ids.extend(new_ids)
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_INCOMPLETE):
            delta = full_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is held back (even an incomplete character)."""
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self.token_ids[self._prefix_offset:])
        delta = full_text[len(prefix_text):] if len(full_text) > len(prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        self.text += delta
        return delta
