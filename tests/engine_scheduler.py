"""Test-only Scheduler gRPC service backed by the in-process Engine (drafter, verifier and
speculation loop in this process): ScheduleRequest -> Engine.make_session/stream ->
ScheduleResponse. It lets the gateway be tested over real gRPC without the real scheduler
service, drafter and verifier pods; end-to-end tests use those instead.

Cancelling a call (client cancel, deadline, a gateway that stops reading) closes the engine
stream, which cancels the session; the loop frees its drafter and verifier state next round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grpc import aio

from specmesh.engine import Engine
from specmesh.grpc_server import GrpcService
from specmesh.records import SpeculationStats
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class EngineSchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.active: set[str] = set()  # request ids whose call is in progress
        self.requests: dict[str, scheduler_pb2.ScheduleRequest] = {}  # every request seen, by id
        self.final_stats: dict[str, SpeculationStats] = {}  # per request id, when its call ended
        self.finish_reasons: dict[str, str | None] = {}
        self.time_remaining: dict[str, float | None] = {}  # the call's deadline as seen on arrival

    def loop_sessions(self) -> int:
        """Sessions the engine's speculation loop still holds (must be called in its event loop)."""
        return self.engine._loop().num_sessions

    async def Generate(self, request: scheduler_pb2.ScheduleRequest, context: aio.ServicerContext):
        sampling = request.sampling
        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p if 0.0 < sampling.top_p < 1.0 else 1.0,
            top_k=sampling.top_k,
            seed=sampling.seed if sampling.has_seed else None,
        )
        session = self.engine.make_session(
            list(request.prompt_token_ids), params, request.max_tokens,
            disable_speculation=request.disable_speculation,
            max_draft_tokens=request.max_draft_tokens if request.HasField("max_draft_tokens") else None,
            logprobs=request.logprobs, session_id=request.request_id or None,
        )
        session.stop_token_ids = frozenset(request.stop_token_ids)  # the gateway names the EOS ids
        self.requests[session.session_id] = request
        self.time_remaining[session.session_id] = context.time_remaining()
        self.active.add(session.session_id)
        stream = self.engine.stream(session)
        try:
            async for commit in stream:
                yield scheduler_pb2.ScheduleResponse(
                    token_ids=commit.token_ids,
                    logprobs=[common_pb2.TokenLogprob(token_id=t, logprob=lp)
                              for t, lp in zip(commit.token_ids, commit.logprobs)],
                    finish_reason=commit.finish_reason or "",
                    speculation=common_pb2.SpeculationStats(
                        drafted_tokens=session.stats.drafted_tokens, accepted_tokens=session.stats.accepted_tokens,
                        rounds=session.stats.rounds),
                )
        finally:
            await stream.aclose()
            if not session.finished:
                # Closing the outer generator does not reach the loop's own generator at once.
                session.cancel()
                self.engine._loop().wake()
            self.final_stats[session.session_id] = SpeculationStats(
                session.stats.drafted_tokens, session.stats.accepted_tokens, session.stats.rounds)
            self.finish_reasons[session.session_id] = session.finish_reason
            self.active.discard(session.session_id)

    async def Stats(self, request: common_pb2.StatsRequest, context: aio.ServicerContext) -> common_pb2.StatsResponse:
        return common_pb2.StatsResponse(active_sessions=self.loop_sessions())


@dataclass
class RunningEngineScheduler:
    service: GrpcService
    servicer: EngineSchedulerServicer
    engine: Engine = field(repr=False)

    @property
    def address(self) -> str:
        return self.service.address

    async def stop(self) -> None:
        await self.service.stop()
        for loop in self.engine._loops.values():
            await loop.close()


async def start_engine_scheduler(engine: Engine, host: str = "127.0.0.1", port: int = 0) -> RunningEngineScheduler:
    service = GrpcService(host, port, [SERVICE_NAME], grace_s=1.0)
    servicer = EngineSchedulerServicer(engine)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, service.server)
    await service.start()
    await service.set_serving()
    return RunningEngineScheduler(service, servicer, engine)
