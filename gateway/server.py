"""Start the gateway: listen at once (gRPC health NOT_SERVING, HTTP /healthz 503), load the
tokenizer, then serve. gRPC and the OpenAI-compatible HTTP API run in one process and one event
loop and share one front door: the same pipeline, API keys, rate limiter, admission queue and
counters. On SIGTERM both report not serving and drain in-flight requests for grace_s together.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Sequence

from gateway.admission import AdmissionController
from gateway.api_keys import ApiKeys
from gateway.config import GatewayConfig
from gateway.counters import GatewayCounters
from gateway.front_door import FrontDoor
from gateway.generation import GenerationDefaults, GenerationPipeline
from gateway.http_api import HttpApi
from gateway.http_server import HttpServer
from gateway.rate_limit import RedisRateLimiter, open_rate_limiter
from gateway.scheduler_client import GrpcSchedulerBackend
from gateway.servicer import SERVICE_NAME, GenerationServicer, add_generation_servicer
from gateway.tokenization import stop_token_ids as model_stop_token_ids
from specmesh.grpc_server import GrpcService, ServesGrpc
from specmesh.model_loading import load_tokenizer
from specmesh.metrics import render_prometheus
from specmesh.telemetry import TraceContextMiddleware

log = logging.getLogger(__name__)


@dataclass
class RunningGateway(ServesGrpc):
    service: GrpcService
    pipeline: GenerationPipeline
    scheduler: GrpcSchedulerBackend
    door: FrontDoor
    http: HttpServer | None = None
    http_api: HttpApi | None = None
    _stopping: bool = False
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    @property
    def http_url(self) -> str | None:
        return self.http.url if self.http else None

    async def stop(self) -> None:
        """Not serving on both transports at once, drain both, then close shared resources."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            if self.http_api is not None:
                self.http_api.serving = False
            await asyncio.gather(self.service.stop(), self.http.stop() if self.http else asyncio.sleep(0))
            await self.door.close()
            await self.scheduler.close()
        finally:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.stop()))


def metrics_text(door: FrontDoor) -> str:
    limiter = door.limiter
    fallbacks = limiter.num_fallbacks if isinstance(limiter, RedisRateLimiter) else 0
    text = door.counters.render(door.admission.snapshot(), fallbacks)
    # Telemetry (specmesh/metrics.py): TTFT, TPOT, e2e latency and, in-process, any other families.
    return text + render_prometheus()[0].decode()


async def start_gateway(config: GatewayConfig, *, tokenizer: Any = None,
                        stop_token_ids: Sequence[int] | None = None) -> RunningGateway:
    """Serve the public Generation API over gRPC (and HTTP when config.http_port is set).
    tokenizer: skip loading it from config.model (tests); stop_token_ids: override the
    end-of-sequence ids read from the model's config."""
    keys = ApiKeys.load(config.api_keys_file, config.api_keys)  # bad key files fail before listening
    counters = GatewayCounters()
    service = GrpcService(config.host, config.port, [SERVICE_NAME], grace_s=config.grace_s)
    servicer = GenerationServicer(counters=counters)
    add_generation_servicer(service.server, servicer, config.max_body_bytes)
    http_api: HttpApi | None = None
    http: HttpServer | None = None
    scheduler = GrpcSchedulerBackend(config.scheduler)
    limiter = open_rate_limiter(config.redis_url, config.rate_limits())
    try:
        await service.start()
        if config.http_port is not None:
            http_api = HttpApi(None, config.model_name, config.max_body_bytes, counters)
            # TraceContextMiddleware: an HTTP caller's `traceparent` parents the request's spans.
            http = HttpServer(TraceContextMiddleware(http_api.app), config.host, config.http_port,
                              grace_s=config.grace_s)
            await http.start()
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(load_tokenizer, config.model)
        if stop_token_ids is None:
            stop_token_ids = await asyncio.to_thread(model_stop_token_ids, config.model, tokenizer)
    except BaseException:
        await asyncio.gather(service.stop(), http.stop() if http else asyncio.sleep(0), return_exceptions=True)
        await limiter.close()
        await scheduler.close()
        raise
    if not stop_token_ids:
        log.warning("model %s names no end-of-sequence token: generation ends only at max_tokens or a stop string",
                    config.model)
    pipeline = GenerationPipeline(
        tokenizer, scheduler, stop_token_ids, limits=config.limits(),
        defaults=GenerationDefaults(max_tokens=config.max_tokens_default, temperature=config.temperature_default),
    )
    door = FrontDoor(pipeline, keys, limiter, AdmissionController(config.admission_limits()), counters)
    servicer.attach(door)
    if http_api is not None:
        http_api.metrics_text = lambda: metrics_text(door)
        http_api.attach(door)
    await service.set_serving()
    rate_limits = config.rate_limits()
    log.info("API keys: %s; rate limits per key: %s; admission: %d running, %d queued, %.1f s queue timeout",
             f"{len(keys)} configured" if keys.enabled else "none (open to all)",
             f"{rate_limits.requests_per_minute or 'unlimited'} requests/min, "
             f"{rate_limits.tokens_per_minute or 'unlimited'} tokens/min, "
             f"{'shared through redis' if config.redis_url else 'in this process'}" if rate_limits.enabled else "none",
             config.max_concurrent_requests, config.max_queued_requests, config.queue_timeout_s)
    return RunningGateway(service, pipeline, scheduler, door, http, http_api)


async def serve(config: GatewayConfig) -> None:
    running = await start_gateway(config)
    running.install_signal_handlers()
    http = f", HTTP on {running.http_url}" if running.http else ""
    print(f"gateway listening on {running.address}{http} (scheduler {config.scheduler})", flush=True)
    await running.wait_stopped()


def run(config: GatewayConfig) -> None:
    asyncio.run(serve(config))
