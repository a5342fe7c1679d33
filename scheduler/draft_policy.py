"""How many tokens to draft and verify for each session this round.

A policy sees only scheduler-side state that is older than the draft it sizes, so the choice
cannot depend on the drafted tokens themselves (DSpark appendix A shows how that can bias
the output).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from scheduler.session import Session


class DraftLengthPolicy(Protocol):
    def draft_lengths(self, sessions: Sequence[Session], context_limit: int) -> dict[str, int]: ...


class FixedDraftLength:
    """Draft and verify k tokens per round (capped per session by its own limits)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"draft length must be >= 0, got {k}")
        self.k = k

    def draft_lengths(self, sessions: Sequence[Session], context_limit: int) -> dict[str, int]:
        return {s.session_id: min(self.k, s.draft_limit(context_limit)) for s in sessions}
