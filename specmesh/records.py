"""Typed records exchanged between scheduler, drafter and verifier.

They mirror the protobuf messages in proto/specmesh/v1; each service converts in its own
convert.py. Core logic speaks only these types, so it runs in-process without gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.sampling_params import SamplingParams


@dataclass(frozen=True)
class SparseDistribution:
    """An exact distribution over a few tokens: the drafter's top-k-truncated q.

    probs sum to 1 (up to float error); tokens absent from token_ids have probability 0.
    """

    token_ids: tuple[int, ...]
    probs: tuple[float, ...]

    def prob_of(self, token_id: int) -> float:
        for tid, p in zip(self.token_ids, self.probs):
            if tid == token_id:
                return p
        return 0.0


@dataclass(frozen=True)
class DraftRequest:
    """Ask a drafter to continue session_id by num_draft_tokens tokens.

    The drafter must already hold num_cached_tokens tokens of the session (else CACHE_MISS);
    new_tokens are the committed tokens after those. Holding fewer is a miss; holding more
    means the extra were drafts that were not accepted, and they are rolled back.
    """

    session_id: str
    num_cached_tokens: int
    new_tokens: tuple[int, ...]
    num_draft_tokens: int
    params: SamplingParams
    # W3C trace-context headers of the scheduler's round span (empty: tracing off); never
    # part of equality, it only says where the drafter's span belongs.
    trace_context: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DraftChunk:
    """Drafted tokens continuing the committed sequence of length base_length.

    num_cached_tokens is how many positions the drafter holds after drafting (the committed
    tokens plus all drafts but the last); the scheduler's next belief is the part of that
    which verification confirms.
    """

    session_id: str
    base_length: int
    tokens: tuple[int, ...] = ()
    confidences: tuple[float, ...] = ()
    distributions: tuple[SparseDistribution, ...] = ()
    num_cached_tokens: int = 0
    cache_miss: bool = False


@dataclass(frozen=True)
class VerifyItem:
    """One session's share of a verify batch.

    new_tokens are committed tokens the verifier has not processed yet (at least the last
    committed one, whose logits predict the first draft token).
    """

    session_id: str
    num_cached_tokens: int
    new_tokens: tuple[int, ...]
    draft_tokens: tuple[int, ...]
    draft_distributions: tuple[SparseDistribution, ...]
    params: SamplingParams
    want_logprobs: bool = False
    # W3C trace-context headers of the scheduler's round span (empty: tracing off); the
    # verifier links its batch span to it. Never part of equality.
    trace_context: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def committed_length(self) -> int:
        return self.num_cached_tokens + len(self.new_tokens)


@dataclass(frozen=True)
class VerifyResult:
    """accepted_count drafts were accepted, then next_token (a correction or a bonus token)."""

    session_id: str
    accepted_count: int = 0
    next_token: int = -1
    # Log-probability under the verifier's model (no temperature) of each committed token:
    # the accepted drafts then next_token. Empty unless asked for.
    logprobs: tuple[float, ...] = ()
    num_cached_tokens: int = 0
    cache_miss: bool = False


@dataclass
class SpeculationStats:
    """Per-request counters returned to the client."""

    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
