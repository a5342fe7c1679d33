"""Thin gRPC shell around the Coordinator: ScheduleRequest in, ScheduleResponse stream out."""

from __future__ import annotations

import uuid

from grpc import aio

from scheduler import convert
from scheduler.coordinator import Coordinator
from scheduler.session import Session
from specmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def Generate(self, request: scheduler_pb2.ScheduleRequest, context: aio.ServicerContext):
        params = convert.sampling_from_proto(request.sampling)
        session = Session(
            session_id=request.request_id or uuid.uuid4().hex,
            prompt_tokens=list(request.prompt_token_ids),
            params=params.validate().with_seed(),
            max_tokens=request.max_tokens,
            stop_token_ids=frozenset(request.stop_token_ids),
            disable_speculation=request.disable_speculation,
            max_draft_tokens=request.max_draft_tokens if request.HasField("max_draft_tokens") else None,
            want_logprobs=request.logprobs,
        )
        async for commit in self.coordinator.stream(session):
            yield convert.schedule_response(commit, session.stats)

    async def Stats(self, request: common_pb2.StatsRequest, context: aio.ServicerContext) -> common_pb2.StatsResponse:
        return common_pb2.StatsResponse(active_sessions=self.coordinator.num_sessions)
