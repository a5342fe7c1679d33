"""All protobuf conversion of the drafter service: stream requests in, chunks and replies out."""

from __future__ import annotations

from drafter.draft_stream import (BadMessage, BatchAnswer, ReleaseMessage, StreamAnswer, StreamMessage,
                                  SyncBatchMessage, SyncMessage)
from drafter.draft_worker import SyncStatus, WorkerStats
from drafter.profiling import DrafterProfile
from specmesh.errors import InvalidRequestError
from specmesh.records import DraftRequest, SparseDistribution
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, drafter_pb2

_STATUS = {
    SyncStatus.OK: common_pb2.SESSION_STATUS_OK,
    SyncStatus.CACHE_MISS: common_pb2.SESSION_STATUS_CACHE_MISS,
    SyncStatus.CAPACITY: common_pb2.SESSION_STATUS_CAPACITY,
    SyncStatus.INVALID: common_pb2.SESSION_STATUS_INVALID,
}


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError for values no sampler accepts."""
    top_p = message.top_p if 0.0 < message.top_p < 1.0 else 1.0  # <= 0 or >= 1: no cut
    params = SamplingParams(temperature=message.temperature, top_p=top_p, top_k=message.top_k,
                            seed=message.seed if message.has_seed else None)
    return params.validate()


def sync_from_proto(sync: drafter_pb2.DraftSync) -> DraftRequest:
    """Raises InvalidRequestError for fields out of range. (num_generated_tokens is not needed:
    draft randomness is keyed by absolute position, see drafter.drafting.draft_uniform.)"""
    if sync.num_cached_tokens < 0:
        raise InvalidRequestError(f"num_cached_tokens must be >= 0, got {sync.num_cached_tokens}")
    if sync.num_tokens < 0:
        raise InvalidRequestError(f"num_tokens must be >= 0, got {sync.num_tokens}")
    return DraftRequest(
        session_id=sync.session_id,
        num_cached_tokens=sync.num_cached_tokens,
        new_tokens=tuple(sync.new_tokens),
        num_draft_tokens=sync.num_tokens,
        params=sampling_from_proto(sync.sampling),
        trace_context=dict(sync.trace_context),
    )


def stream_message_from_proto(message: drafter_pb2.DraftRequest) -> StreamMessage:
    kind = message.WhichOneof("kind")
    if kind == "sync":
        try:
            return SyncMessage(message.sequence, sync_from_proto(message.sync))
        except InvalidRequestError as error:
            return BadMessage(message.sequence, message.sync.session_id, str(error))
    if kind == "sync_batch":
        return SyncBatchMessage(message.sequence, tuple(_batch_entry(message.sequence, sync)
                                                        for sync in message.sync_batch.syncs))
    if kind == "release":
        return ReleaseMessage(message.sequence, message.release.session_id)
    return BadMessage(message.sequence, "", "a DraftRequest must hold a sync, a sync_batch or a release")


def _batch_entry(sequence: int, sync: drafter_pb2.DraftSync) -> DraftRequest | BadMessage:
    try:
        return sync_from_proto(sync)
    except InvalidRequestError as error:
        return BadMessage(sequence, sync.session_id, str(error))


def _distribution_to_proto(dist: SparseDistribution) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=dist.token_ids, probs=dist.probs)


def answer_to_proto(answer: StreamAnswer | BatchAnswer) -> drafter_pb2.DraftChunk:
    if isinstance(answer, BatchAnswer):
        return drafter_pb2.DraftChunk(sequence=answer.sequence, last=True,
                                      batch=[answer_to_proto(one) for one in answer.answers])
    outcome, chunk = answer.outcome, answer.outcome.chunk
    message = drafter_pb2.DraftChunk(
        session_id=chunk.session_id,
        sequence=answer.sequence,
        status=_STATUS[outcome.status],
        base_length=chunk.base_length,
        last=True,
        error_message=outcome.error_message,
    )
    if outcome.status is SyncStatus.OK:
        message.tokens.extend(chunk.tokens)
        message.confidences.extend(chunk.confidences)
        if answer.include_distributions:
            message.distributions.extend(_distribution_to_proto(d) for d in chunk.distributions)
    elif outcome.status is SyncStatus.CACHE_MISS:
        message.cache_miss.num_cached_tokens = chunk.num_cached_tokens
    return message


def release_ids_from_proto(request: common_pb2.ReleaseRequest) -> list[str]:
    return list(request.session_ids)


def release_response(released_count: int) -> common_pb2.ReleaseResponse:
    return common_pb2.ReleaseResponse(released_count=released_count)


def profile_to_proto(profile: DrafterProfile) -> common_pb2.ProfileResponse:
    return common_pb2.ProfileResponse(
        model_name=profile.model_name,
        vocab_size=profile.vocab_size,
        tokenizer_fingerprint=profile.tokenizer_fingerprint,
        cost_table=[common_pb2.CostPoint(batch_tokens=size, forward_seconds=seconds)
                    for size, seconds in profile.cost_table],
        max_context_tokens=profile.max_context_tokens,
        max_sessions=profile.max_sessions,
        max_draft_tokens=profile.max_draft_tokens,
        draft_top_k=profile.draft_top_k,
    )


def stats_to_proto(stats: WorkerStats) -> common_pb2.StatsResponse:
    return common_pb2.StatsResponse(
        active_sessions=stats.active_sessions,
        cached_tokens=stats.cached_tokens,
        capacity_tokens=stats.capacity_tokens,
        in_flight=stats.in_flight,
    )

