"""Prompt-lookup drafting: propose the tokens that followed the last n-gram earlier in context.

It costs no model at all and shares the verifier's tokenizer by construction, so it is the
drafter that always exists offline. It pays off when output copies input (summaries, code
edits, quoting) and drafts nothing otherwise. q is one-hot on the proposed token, which keeps
verification exact: under sampling a one-hot draft is accepted with probability p(x).
"""

from __future__ import annotations

from typing import Sequence

from specmesh.errors import InvalidRequestError
from specmesh.records import DraftChunk, DraftRequest, SparseDistribution

# Confidence reported per matched n-gram length: longer matches predict continuation better.
# These are priors only; the scheduler calibrates confidence against real acceptance.
_CONFIDENCE_BY_NGRAM = {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.7}


def find_continuation(tokens: Sequence[int], max_ngram: int, min_ngram: int, num_tokens: int) -> tuple[list[int], int]:
    """The up-to-num_tokens tokens that followed the most recent earlier match of the longest
    suffix n-gram (max_ngram down to min_ngram); returns (tokens, n) or ([], 0)."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = list(tokens[length - n:])
        # Most recent occurrence first: recent context predicts best.
        for start in range(length - n - 1, -1, -1):
            if list(tokens[start:start + n]) == suffix:
                follow = list(tokens[start + n:start + n + num_tokens])
                if follow:
                    return follow, n
    return [], 0


class PromptLookupDrafter:
    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_sessions: int = 4096) -> None:
        self.name = f"prompt-lookup(n={min_ngram}..{max_ngram})"
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_sessions = max_sessions
        self._history: dict[str, list[int]] = {}

    @property
    def num_sessions(self) -> int:
        return len(self._history)

    def release(self, session_ids: Sequence[str]) -> int:
        return sum(self._history.pop(sid, None) is not None for sid in session_ids)

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        chunks = []
        for request in requests:
            if request.num_cached_tokens < 0 or request.num_draft_tokens < 0:
                raise InvalidRequestError("num_cached_tokens and num_draft_tokens must be >= 0")
            history = self._history.get(request.session_id)
            base_length = request.num_cached_tokens + len(request.new_tokens)
            if request.num_cached_tokens == 0:
                history = []
            elif history is None or len(history) < request.num_cached_tokens:
                chunks.append(DraftChunk(request.session_id, base_length, cache_miss=True))
                continue
            history = history[: request.num_cached_tokens] + list(request.new_tokens)
            if request.session_id not in self._history and len(self._history) >= self.max_sessions:
                self._history.pop(next(iter(self._history)))  # oldest first
            self._history[request.session_id] = history
            proposal, n = find_continuation(history, self.max_ngram, self.min_ngram, request.num_draft_tokens)
            confidence = _CONFIDENCE_BY_NGRAM.get(n, 0.75)
            chunks.append(
                DraftChunk(
                    session_id=request.session_id,
                    base_length=base_length,
                    tokens=tuple(proposal),
                    confidences=tuple(confidence for _ in proposal),
                    distributions=tuple(SparseDistribution((t,), (1.0,)) for t in proposal),
                    # History is exact for the committed tokens; drafts are never stored.
                    num_cached_tokens=base_length,
                )
            )
        return chunks
