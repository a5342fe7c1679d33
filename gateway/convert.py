"""All protobuf conversion of the gateway: the public API (GenerateRequest/GenerateResponse)
and its call to the scheduler (ScheduleRequest/ScheduleResponse)."""

from __future__ import annotations

from gateway.records import ChatMessage, CommittedTokens, GenerationRequest, GenerationResponse, TokenizedRequest
from specmesh.records import SpeculationStats
from specmesh.v1 import common_pb2, generation_pb2, scheduler_pb2


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def request_from_proto(message: generation_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        prompt=message.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in message.messages),
        max_tokens=_optional(message, "max_tokens"),
        temperature=_optional(message, "temperature"),
        top_p=_optional(message, "top_p"),
        top_k=_optional(message, "top_k"),
        seed=_optional(message, "seed"),
        stop=tuple(message.stop),
        disable_speculation=message.disable_speculation,
        request_id=message.request_id,
        logprobs=message.logprobs,
        max_draft_tokens=_optional(message, "max_draft_tokens"),
    )


def _stats_to_proto(stats: SpeculationStats) -> common_pb2.SpeculationStats:
    return common_pb2.SpeculationStats(drafted_tokens=stats.drafted_tokens, accepted_tokens=stats.accepted_tokens,
                                       rounds=stats.rounds)


def response_to_proto(response: GenerationResponse) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        text=response.text,
        token_ids=response.token_ids,
        finish_reason=response.finish_reason,
        usage=common_pb2.Usage(prompt_tokens=response.usage.prompt_tokens,
                               completion_tokens=response.usage.completion_tokens),
        speculation=_stats_to_proto(response.speculation),
        logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp)
                  for t, lp in zip(response.token_ids, response.logprobs)],
        request_id=response.request_id,
    )


def schedule_request_to_proto(request: TokenizedRequest) -> scheduler_pb2.ScheduleRequest:
    params = request.params
    message = scheduler_pb2.ScheduleRequest(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        sampling=common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                           seed=params.seed or 0, has_seed=params.seed is not None),
        max_tokens=request.max_tokens,
        stop_token_ids=request.stop_token_ids,
        disable_speculation=request.disable_speculation,
        logprobs=request.logprobs,
    )
    if request.max_draft_tokens is not None:
        message.max_draft_tokens = request.max_draft_tokens
    return message


def committed_from_proto(message: scheduler_pb2.ScheduleResponse) -> CommittedTokens:
    stats = message.speculation
    return CommittedTokens(
        token_ids=tuple(message.token_ids),
        logprobs=tuple(lp.logprob for lp in message.logprobs),
        finish_reason=message.finish_reason,
        speculation=SpeculationStats(stats.drafted_tokens, stats.accepted_tokens, stats.rounds),
    )
