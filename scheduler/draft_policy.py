"""How many tokens to draft, and how many of them to verify, for each session each round.

Two decisions per round:
1. `draft_lengths` before drafting: from scheduler-side state only.
2. `verify_lengths` after drafting: how much of each chunk goes into the verify batch. To stay
   lossless, whether draft token j is verified may depend on the tokens before it (and their
   confidences) but never on token j itself (DSpark appendix A): a prefix-closed rule with an
   early stop. Dropping a token never biases the output because its position is then sampled
   from p directly.
Then `observe` gets each round's outcome (for calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from scheduler.session import Session
from specmesh.records import DraftChunk, VerifyItem, VerifyResult

# The policies a scheduler (and the in-process engine) can run: "adaptive" is
# scheduler/budget_policy.py, "fixed" is FixedDraftLength below.
POLICY_NAMES = ("adaptive", "fixed")


def check_policy_name(name: str, label: str = "policy") -> str:
    """name, or ValueError naming the choices (label: how the caller's user spells the setting)."""
    if name not in POLICY_NAMES:
        raise ValueError(f"{label} must be 'adaptive' or 'fixed', got {name!r}")
    return name


@dataclass(frozen=True)
class RoundOutcome:
    chunk: DraftChunk | None
    item: VerifyItem
    result: VerifyResult


class DraftLengthPolicy(Protocol):
    def draft_lengths(self, sessions: Sequence[Session], context_limit: int) -> dict[str, int]: ...

    def verify_lengths(self, sessions: Sequence[Session], chunks: dict[str, DraftChunk],
                       draft_lengths: dict[str, int]) -> dict[str, int]: ...

    async def observe(self, outcomes: Sequence[RoundOutcome]) -> None: ...


class FixedDraftLength:
    """Draft and verify k tokens per round (capped per session by its own limits)."""

    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"draft length must be >= 0, got {k}")
        self.k = k

    def draft_lengths(self, sessions: Sequence[Session], context_limit: int) -> dict[str, int]:
        return {s.session_id: min(self.k, s.draft_limit(context_limit)) for s in sessions}

    def verify_lengths(self, sessions: Sequence[Session], chunks: dict[str, DraftChunk],
                       draft_lengths: dict[str, int]) -> dict[str, int]:
        return dict(draft_lengths)

    async def observe(self, outcomes: Sequence[RoundOutcome]) -> None:
        return None
