"""One generation session as the scheduler sees it: the committed tokens (the source of truth)
and what the scheduler believes its drafter and verifier have cached. Plain Python; no torch,
no network, so every rule here is unit-testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.records import DraftChunk, DraftRequest, SpeculationStats, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass
class Commit:
    """What one round added to a session."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@dataclass
class Session:
    session_id: str
    prompt_tokens: list[int]
    params: SamplingParams  # always carries a seed (SamplingParams.with_seed)
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    disable_speculation: bool = False
    max_draft_tokens: int | None = None
    want_logprobs: bool = False
    tokens: list[int] = field(default_factory=list)  # prompt + committed output
    verifier_cached: int = 0  # positions we believe the verifier holds
    drafter_cached: int = 0  # positions we believe the drafter holds
    # Positions the drafter has seen: the prefix of its last chunk and the drafts in it. Over
    # the wire drafter_cached is only the chunk's base (a safe lower bound), while the drafter
    # also keeps whichever of its drafts a sync confirms, so what it must really catch up on is
    # what lies beyond both (the adaptive policy times only drafting without catch-up).
    drafter_seen: int = 0
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_tokens)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_tokens)

    @property
    def drafter_cold(self) -> bool:
        """The drafter holds nothing of this new session yet: its first round prefills the
        drafter beside the verifier (SpeculationLoop.run_round), not in a draft call."""
        return self.num_generated == 0 and self.drafter_cached == 0

    @property
    def drafter_unseen(self) -> int:
        """Committed tokens the drafter has neither been sent nor drafted itself: what it must
        catch up on before drafting (1 after a round it drafted for, more after a pause)."""
        return len(self.tokens) - max(self.drafter_cached, self.drafter_seen)

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.num_generated

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def draft_limit(self, context_limit: int) -> int:
        """The most draft tokens worth verifying now: a round commits at most drafts + 1, and
        drafts must fit the verifier's context."""
        if self.disable_speculation:
            return 0
        # remaining - 1 spelled out: the policy asks this of every session twice a round.
        num_tokens = len(self.tokens)
        limit = min(self.max_tokens - (num_tokens - len(self.prompt_tokens)) - 1, context_limit - num_tokens)
        if self.max_draft_tokens is not None:
            limit = min(limit, self.max_draft_tokens)
        return max(limit, 0)

    def draft_request(self, num_draft_tokens: int) -> DraftRequest:
        return DraftRequest(
            session_id=self.session_id,
            num_cached_tokens=self.drafter_cached,
            new_tokens=tuple(self.tokens[self.drafter_cached:]),
            num_draft_tokens=num_draft_tokens,
            params=self.params,
        )

    def verify_item(self, chunk: DraftChunk | None, num_verify: int) -> VerifyItem:
        """The item for this round: the first num_verify tokens of the chunk (if any)."""
        drafts = () if chunk is None or chunk.cache_miss else chunk.tokens[:num_verify]
        dists = () if chunk is None or chunk.cache_miss else chunk.distributions[: len(drafts)]
        return VerifyItem(
            session_id=self.session_id,
            num_cached_tokens=self.verifier_cached,
            new_tokens=tuple(self.tokens[self.verifier_cached:]),
            draft_tokens=tuple(drafts),
            draft_distributions=tuple(dists),
            params=self.params,
            want_logprobs=self.want_logprobs,
        )

    def note_drafter_lost(self) -> None:
        """The drafter lost our state (miss, failure, move): resend the full history next time."""
        self.drafter_cached = 0
        self.drafter_seen = 0

    def commit(self, item: VerifyItem, result: VerifyResult, chunk: DraftChunk | None) -> Commit:
        if result.cache_miss:
            # The verifier lost us (evicted, restarted, replaced): re-prefill next round.
            self.verifier_cached = 0
            if chunk is not None and not chunk.cache_miss:
                self.drafter_cached = min(chunk.num_cached_tokens, len(self.tokens))
            return Commit([], [], None)
        base = len(self.tokens)
        accepted = result.accepted_count
        new_tokens = list(item.draft_tokens[:accepted]) + [result.next_token]
        logprobs = list(result.logprobs)
        self.stats.rounds += 1
        self.stats.drafted_tokens += len(item.draft_tokens)
        self.stats.accepted_tokens += accepted
        for position in range(accepted):
            if position == len(self.stats.accepted_by_position):
                self.stats.accepted_by_position.append(0)
            self.stats.accepted_by_position[position] += 1
        self.verifier_cached = result.num_cached_tokens
        if chunk is not None and not chunk.cache_miss:
            # The drafter holds the committed prefix plus drafts; only confirmed ones stay valid.
            self.drafter_cached = min(chunk.num_cached_tokens, base + accepted)
            self.drafter_seen = chunk.base_length + len(chunk.tokens)
        elif chunk is not None:
            self.note_drafter_lost()
        self.drafter_cached = min(self.drafter_cached, base + accepted)
        # Apply stop tokens and the length limit: the output is a prefix of what was verified.
        finish: str | None = None
        kept: list[int] = []
        for token in new_tokens:
            kept.append(token)
            if token in self.stop_token_ids:
                finish = FINISH_STOP
                break
            if self.num_generated + len(kept) >= self.max_tokens:
                finish = FINISH_LENGTH
                break
        self.tokens.extend(kept)
        self.finish_reason = finish
        return Commit(kept, logprobs[: len(kept)], finish)

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = FINISH_CANCELLED
