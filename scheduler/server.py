"""Start the scheduler service: connect to verifiers/drafters, then serve the Scheduler API."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from scheduler.config import SchedulerConfig
from scheduler.coordinator import Coordinator
from scheduler.draft_policy import FixedDraftLength
from scheduler.drafter_router import DrafterRouter
from scheduler.remote_drafter import RemoteDrafter
from scheduler.remote_verifier import RemoteVerifier
from scheduler.replica_pool import ReplicaPool, StaticEndpoints
from scheduler.servicer import SchedulerServicer
from specmesh.grpc_server import GrpcService, ServesGrpc
from specmesh.metrics import serve_metrics_for
from specmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


@dataclass
class RunningScheduler(ServesGrpc):
    service: GrpcService
    coordinator: Coordinator


def build_coordinator(config: SchedulerConfig, sources: tuple | None = None) -> Coordinator:
    """sources: (verifier source, drafter source or None); default: the static lists."""
    if sources is None:
        sources = (StaticEndpoints(list(config.verifiers)),
                   StaticEndpoints(list(config.drafters)) if config.drafters else None)
    verifier_source, drafter_source = sources
    prompt_lengths: dict[str, int] = {}
    verifiers = ReplicaPool(verifier_source,
                            lambda e: RemoteVerifier(e, config.verify_timeout_s, prompt_lengths),
                            cooldown_s=config.replica_cooldown_s)
    drafters = None
    if drafter_source is not None:
        drafters = DrafterRouter(ReplicaPool(drafter_source,
                                             lambda e: RemoteDrafter(e, config.draft_timeout_s, prompt_lengths),
                                             cooldown_s=config.replica_cooldown_s))
    registry = None
    if config.policy == "fixed":
        policy = FixedDraftLength(config.draft_length)
    else:
        from scheduler.budget_policy import AdaptiveBudgetPolicy, model_pair_id
        from scheduler.calibration_store import open_calibration_store
        from scheduler.cost_model import CostProfileRegistry

        store = open_calibration_store(config.redis_url)
        registry = CostProfileRegistry(config.redis_url)

        def policy(verifier_model: str, drafter_model: str) -> AdaptiveBudgetPolicy:
            return AdaptiveBudgetPolicy(store, registry, model_pair_id(verifier_model, drafter_model),
                                        config.max_draft_tokens)
    coordinator = Coordinator(verifiers, drafters, policy, max_batch_sessions=config.max_batch_sessions,
                              max_tokens_limit=config.max_tokens_limit, cost_registry=registry,
                              lanes=config.pipeline_lanes, lane_min_sessions=config.lane_min_sessions)
    coordinator.prompt_lengths = prompt_lengths
    return coordinator


async def start_scheduler(config: SchedulerConfig) -> RunningScheduler:
    """Listen at once (health NOT_SERVING), connect to the pools, then report SERVING."""
    from scheduler.discovery import PoolFollower, make_endpoint_sources

    coordinator = build_coordinator(config, make_endpoint_sources(config))
    # Dynamic pools (dns, kubernetes) are followed from here on; static ones are a no-op.
    follower = PoolFollower(coordinator)
    service = GrpcService(config.host, config.port, [SERVICE_NAME], grace_s=config.grace_s)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(coordinator), service.server)
    service.on_stop(follower.close)
    service.on_stop(coordinator.close)
    await service.start()
    serve_metrics_for(service, config.metrics_port, config.host)
    await follower.start()
    await coordinator.connect(wait_s=config.connect_wait_s)
    await service.set_serving()
    return RunningScheduler(service, coordinator)


async def serve(config: SchedulerConfig) -> None:
    running = await start_scheduler(config)
    running.service.install_signal_handlers()
    print(f"scheduler listening on {running.address}", flush=True)
    await running.service.serve_until_stopped()


def run(config: SchedulerConfig) -> None:
    asyncio.run(serve(config))
