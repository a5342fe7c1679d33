"""All protobuf conversion for the scheduler: its own API (from the gateway) and its calls to
drafters and verifiers."""

from __future__ import annotations

from typing import Sequence

from scheduler.session import Commit
from specmesh.records import DraftChunk, DraftRequest, SparseDistribution, SpeculationStats, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, drafter_pb2, scheduler_pb2, verifier_pb2


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        seed=params.seed or 0, has_seed=params.seed is not None,
    )


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    top_p = message.top_p if 0.0 < message.top_p < 1.0 else 1.0
    return SamplingParams(temperature=message.temperature, top_p=top_p, top_k=message.top_k,
                          seed=message.seed if message.has_seed else None)


def _distribution_to_proto(dist: SparseDistribution) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=dist.token_ids, probs=dist.probs)


def _distribution_from_proto(message: common_pb2.SparseDistribution) -> SparseDistribution:
    return SparseDistribution(tuple(message.token_ids), tuple(message.probs))


def verify_request(items: Sequence[VerifyItem], prompt_lengths: dict[str, int]) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(items=[
        verifier_pb2.VerifyItem(
            session_id=item.session_id,
            num_cached_tokens=item.num_cached_tokens,
            new_tokens=item.new_tokens,
            draft_tokens=item.draft_tokens,
            draft_distributions=[_distribution_to_proto(d) for d in item.draft_distributions],
            sampling=sampling_to_proto(item.params),
            num_generated_tokens=item.committed_length - prompt_lengths.get(item.session_id, 0),
            want_logprobs=item.want_logprobs,
            trace_context=item.trace_context,
        )
        for item in items
    ])


def verify_results(response: verifier_pb2.VerifyResponse) -> list[VerifyResult]:
    results = []
    for r in response.results:
        if r.status == common_pb2.SESSION_STATUS_OK:
            results.append(VerifyResult(
                session_id=r.session_id, accepted_count=r.accepted_count, next_token=r.next_token,
                logprobs=tuple(lp.logprob for lp in r.logprobs), num_cached_tokens=r.num_cached_tokens,
            ))
        elif r.status == common_pb2.SESSION_STATUS_CACHE_MISS:
            results.append(VerifyResult(session_id=r.session_id, cache_miss=True))
        else:
            raise VerifierRefused(r.session_id, r.status, r.error_message)
    return results


class VerifierRefused(Exception):
    """The verifier refused one session outright (invalid or over capacity)."""

    def __init__(self, session_id: str, status: int, message: str) -> None:
        super().__init__(f"verifier refused session {session_id}: {common_pb2.SessionStatus.Name(status)} {message}")
        self.status = status


def draft_sync(request: DraftRequest, num_generated: int) -> drafter_pb2.DraftSync:
    return drafter_pb2.DraftSync(
        session_id=request.session_id, num_cached_tokens=request.num_cached_tokens,
        new_tokens=request.new_tokens, num_tokens=request.num_draft_tokens,
        sampling=sampling_to_proto(request.params), num_generated_tokens=num_generated,
        trace_context=request.trace_context,
    )


def draft_batch_request(requests: Sequence[DraftRequest], sequence: int,
                        num_generated: Sequence[int]) -> drafter_pb2.DraftRequest:
    """A round's syncs as one message (answered by one chunk holding `batch`)."""
    return drafter_pb2.DraftRequest(sequence=sequence, sync_batch=drafter_pb2.DraftSyncBatch(
        syncs=[draft_sync(r, n) for r, n in zip(requests, num_generated)]))


def draft_batch_chunks(answer: drafter_pb2.DraftChunk, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
    """The chunks answering a batch, one per request in order. A malformed answer (wrong size or
    session order) is a drafter fault: no drafts this round, full history next time."""
    if len(answer.batch) != len(requests) or any(
            part.session_id != request.session_id for part, request in zip(answer.batch, requests)):
        return [DraftChunk(r.session_id, r.num_cached_tokens + len(r.new_tokens), cache_miss=True) for r in requests]
    return [draft_chunk((part,)) for part in answer.batch]


def draft_chunk(parts: Sequence[drafter_pb2.DraftChunk]) -> DraftChunk:
    """Join the chunks answering one sync (several may continue each other until `last`)."""
    first = parts[0]
    if any(p.status == common_pb2.SESSION_STATUS_CACHE_MISS for p in parts):
        return DraftChunk(first.session_id, first.base_length, cache_miss=True)
    if any(p.status not in (common_pb2.SESSION_STATUS_OK, common_pb2.SESSION_STATUS_UNSPECIFIED) for p in parts):
        # An invalid or over-capacity answer: draft nothing this round, resend history next.
        return DraftChunk(first.session_id, first.base_length, cache_miss=True)
    tokens = tuple(t for p in parts for t in p.tokens)
    return DraftChunk(
        session_id=first.session_id,
        base_length=first.base_length,
        tokens=tokens,
        confidences=tuple(c for p in parts for c in p.confidences),
        distributions=tuple(_distribution_from_proto(d) for p in parts for d in p.distributions),
        # A safe lower bound whatever kind of drafter answered: it holds at least the committed
        # prefix it drafted from, and keeps whatever of its drafts the next sync confirms.
        num_cached_tokens=first.base_length,
    )


def stats_to_proto(stats: SpeculationStats) -> common_pb2.SpeculationStats:
    return common_pb2.SpeculationStats(drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
                                       rounds=stats.rounds)


def schedule_response(commit: Commit, stats: SpeculationStats) -> scheduler_pb2.ScheduleResponse:
    return scheduler_pb2.ScheduleResponse(
        token_ids=commit.token_ids,
        logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(commit.token_ids, commit.logprobs)],
        finish_reason=commit.finish_reason or "",
        speculation=stats_to_proto(stats),
    )
