"""Every conversion between the verifier's protobuf messages and specmesh records.

Both directions live here: server side (request in, response out) and client side (what a
caller or a test sends and reads back), so the wire mapping is written once.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from specmesh.errors import InvalidRequestError
from specmesh.records import SparseDistribution, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, verifier_pb2
from verifier.call_validation import RefusedItem
from verifier.microbatch import CallOutcome, ItemOutcome, LoadSnapshot
from verifier.profiling import ReplicaProfile

_REFUSAL_STATUS = {
    "capacity": common_pb2.SESSION_STATUS_CAPACITY,
    "invalid": common_pb2.SESSION_STATUS_INVALID,
}


# ---- sampling parameters and sparse distributions ----------------------------------------------


@functools.lru_cache(maxsize=4096)  # a handful of distinct values, every item of every call
def _from_float32(value: float) -> float:
    """The shortest decimal that round-trips through float32, as a Python float.

    Wire floats are float32: 0.7 arrives as 0.699999988. Restoring 0.7 makes a session sampled
    through the service use exactly the temperature an in-process engine would.
    """
    return float(str(np.float32(value)))


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    top_p = _from_float32(message.top_p)
    return SamplingParams(
        temperature=_from_float32(message.temperature),
        top_p=top_p if 0.0 < top_p < 1.0 else 1.0,  # the wire says <= 0 or >= 1 disables the cut
        top_k=message.top_k,
        seed=message.seed if message.has_seed else None,
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        seed=params.seed or 0,
        has_seed=params.seed is not None,
    )


def distribution_from_proto(message: common_pb2.SparseDistribution) -> SparseDistribution:
    if len(message.token_ids) != len(message.probs):
        raise InvalidRequestError(
            f"sparse distribution has {len(message.token_ids)} token ids but {len(message.probs)} probs")
    return SparseDistribution(tuple(message.token_ids), tuple(message.probs))


def distribution_to_proto(dist: SparseDistribution) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(token_ids=list(dist.token_ids), probs=list(dist.probs))


# ---- Verify ------------------------------------------------------------------------------------


def item_from_proto(message: verifier_pb2.VerifyItem) -> VerifyItem:
    # num_generated_tokens is not read: the core keys its random stream by (seed, committed
    # length), which the item already determines.
    return VerifyItem(
        session_id=message.session_id,
        num_cached_tokens=message.num_cached_tokens,
        new_tokens=tuple(message.new_tokens),
        draft_tokens=tuple(message.draft_tokens),
        draft_distributions=tuple(distribution_from_proto(d) for d in message.draft_distributions),
        params=sampling_from_proto(message.sampling),
        want_logprobs=message.want_logprobs,
        trace_context=dict(message.trace_context),
    )


def items_from_request(request: verifier_pb2.VerifyRequest) -> list[VerifyItem]:
    return [item_from_proto(item) for item in request.items]


def item_to_proto(item: VerifyItem, num_generated_tokens: int = 0) -> verifier_pb2.VerifyItem:
    return verifier_pb2.VerifyItem(
        session_id=item.session_id,
        num_cached_tokens=item.num_cached_tokens,
        new_tokens=list(item.new_tokens),
        draft_tokens=list(item.draft_tokens),
        draft_distributions=[distribution_to_proto(d) for d in item.draft_distributions],
        sampling=sampling_to_proto(item.params),
        num_generated_tokens=num_generated_tokens,
        want_logprobs=item.want_logprobs,
        trace_context=item.trace_context,
    )


def verify_request(items: Sequence[VerifyItem]) -> verifier_pb2.VerifyRequest:
    return verifier_pb2.VerifyRequest(items=[item_to_proto(item) for item in items])


def result_to_proto(item: VerifyItem, outcome: ItemOutcome) -> verifier_pb2.VerifyResult:
    if isinstance(outcome, RefusedItem):
        return verifier_pb2.VerifyResult(
            session_id=outcome.session_id, status=_REFUSAL_STATUS[outcome.status], error_message=outcome.message)
    if outcome.cache_miss:
        held = outcome.num_cached_tokens
        return verifier_pb2.VerifyResult(
            session_id=outcome.session_id,
            status=common_pb2.SESSION_STATUS_CACHE_MISS,
            cache_miss=common_pb2.CacheMiss(num_cached_tokens=held),
            error_message=f"verifier holds {held} tokens of the session, not {item.num_cached_tokens}",
        )
    committed = [*item.draft_tokens[: outcome.accepted_count], outcome.next_token]
    return verifier_pb2.VerifyResult(
        session_id=outcome.session_id,
        status=common_pb2.SESSION_STATUS_OK,
        accepted_count=outcome.accepted_count,
        next_token=outcome.next_token,
        logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp) for t, lp in zip(committed, outcome.logprobs)],
        num_cached_tokens=outcome.num_cached_tokens,
    )


def verify_response(items: Sequence[VerifyItem], outcome: CallOutcome) -> verifier_pb2.VerifyResponse:
    return verifier_pb2.VerifyResponse(
        results=[result_to_proto(item, result) for item, result in zip(items, outcome.results)],
        forward_seconds=outcome.forward_seconds,
        batch_tokens=outcome.batch_tokens,
    )


def result_from_proto(message: verifier_pb2.VerifyResult) -> ItemOutcome:
    """Client side: a VerifyResult record, or a RefusedItem for CAPACITY / INVALID."""
    status = message.status
    if status == common_pb2.SESSION_STATUS_OK:
        return VerifyResult(
            session_id=message.session_id,
            accepted_count=message.accepted_count,
            next_token=message.next_token,
            logprobs=tuple(lp.logprob for lp in message.logprobs),
            num_cached_tokens=message.num_cached_tokens,
        )
    if status == common_pb2.SESSION_STATUS_CACHE_MISS:
        return VerifyResult(message.session_id, num_cached_tokens=message.cache_miss.num_cached_tokens,
                            cache_miss=True)
    if status == common_pb2.SESSION_STATUS_CAPACITY:
        return RefusedItem(message.session_id, "capacity", message.error_message)
    return RefusedItem(message.session_id, "invalid", message.error_message or "invalid session input")


# ---- Release, Profile, Stats ---------------------------------------------------------------------


def release_response(released_count: int) -> common_pb2.ReleaseResponse:
    return common_pb2.ReleaseResponse(released_count=released_count)


def profile_response(profile: ReplicaProfile) -> common_pb2.ProfileResponse:
    return common_pb2.ProfileResponse(
        model_name=profile.model_name,
        vocab_size=profile.vocab_size,
        tokenizer_fingerprint=profile.tokenizer_fingerprint,
        cost_table=[common_pb2.CostPoint(batch_tokens=b, forward_seconds=s) for b, s in profile.cost_table],
        max_context_tokens=profile.max_context_tokens,
        max_sessions=profile.max_sessions,
    )


def cost_table_from_proto(message: common_pb2.ProfileResponse) -> list[tuple[int, float]]:
    return [(point.batch_tokens, point.forward_seconds) for point in message.cost_table]


def stats_response(load: LoadSnapshot) -> common_pb2.StatsResponse:
    return common_pb2.StatsResponse(
        active_sessions=load.active_sessions,
        cached_tokens=load.cached_tokens,
        capacity_tokens=load.capacity_tokens,
        in_flight=load.in_flight,
    )
