"""Start the gateway: listen at once (health NOT_SERVING), load the tokenizer, then SERVING.
Health goes NOT_SERVING again on SIGTERM while in-flight requests drain for grace_s."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from gateway.config import GatewayConfig
from gateway.generation import GenerationDefaults, GenerationPipeline
from gateway.scheduler_client import GrpcSchedulerBackend
from gateway.servicer import SERVICE_NAME, GenerationServicer
from gateway.tokenization import stop_token_ids as model_stop_token_ids
from specmesh.grpc_server import GrpcService
from specmesh.model_loading import load_tokenizer
from specmesh.v1 import generation_pb2_grpc

log = logging.getLogger(__name__)


@dataclass
class RunningGateway:
    service: GrpcService
    pipeline: GenerationPipeline
    scheduler: GrpcSchedulerBackend

    @property
    def address(self) -> str:
        return self.service.address

    @property
    def port(self) -> int:
        return self.service.port

    async def stop(self) -> None:
        await self.service.stop()


async def start_gateway(config: GatewayConfig, *, tokenizer: Any = None,
                        stop_token_ids: Sequence[int] | None = None) -> RunningGateway:
    """Serve the public Generation API. tokenizer: skip loading it from config.model (tests);
    stop_token_ids: override the end-of-sequence ids read from the model's config."""
    service = GrpcService(config.host, config.port, [SERVICE_NAME], grace_s=config.grace_s)
    servicer = GenerationServicer()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, service.server)
    await service.start()
    scheduler = GrpcSchedulerBackend(config.scheduler)
    service.on_stop(scheduler.close)
    try:
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(load_tokenizer, config.model)
        if stop_token_ids is None:
            stop_token_ids = await asyncio.to_thread(model_stop_token_ids, config.model, tokenizer)
    except BaseException:
        await service.stop()
        raise
    if not stop_token_ids:
        log.warning("model %s names no end-of-sequence token: generation ends only at max_tokens or a stop string",
                    config.model)
    pipeline = GenerationPipeline(
        tokenizer, scheduler, stop_token_ids, limits=config.limits(),
        defaults=GenerationDefaults(max_tokens=config.max_tokens_default, temperature=config.temperature_default),
    )
    servicer.attach(pipeline)
    await service.set_serving()
    return RunningGateway(service, pipeline, scheduler)


async def serve(config: GatewayConfig) -> None:
    running = await start_gateway(config)
    running.service.install_signal_handlers()
    print(f"gateway listening on {running.address} (scheduler {config.scheduler})", flush=True)
    await running.service.serve_until_stopped()


def run(config: GatewayConfig) -> None:
    asyncio.run(serve(config))
