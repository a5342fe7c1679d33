"""The skeleton every specmesh service runs on: a grpc.aio server with the standard health
service, server reflection, the error-mapping interceptor, and a graceful stop.

Lifecycle: health reports NOT_SERVING while the service loads its model, SERVING once ready,
and NOT_SERVING again as soon as SIGTERM/SIGINT arrives, so load balancers and Kubernetes stop
routing to it before in-flight calls drain within `grace_s`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Sequence

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from specmesh import telemetry
from specmesh.grpc_errors import ErrorMappingInterceptor

log = logging.getLogger(__name__)

# Models do not fit the 4 MiB default once prompts carry long histories and sparse q per token.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


class GrpcService:
    """Owns one grpc.aio server. Register servicers with `add`, then `start`, `serve_until_stopped`."""

    def __init__(self, host: str, port: int, service_names: Sequence[str], grace_s: float = 5.0,
                 interceptors: Sequence[aio.ServerInterceptor] = ()) -> None:
        # Tracing first (outermost): the server span covers the error mapping too. Without
        # tracing set up (telemetry.setup_telemetry) the list is empty and costs nothing.
        self.server = aio.server(
            interceptors=[*telemetry.server_interceptors(), *interceptors, ErrorMappingInterceptor()],
            options=SERVER_OPTIONS)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME],
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.host = host
        self.grace_s = grace_s
        self._stopped = asyncio.Event()
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_drain: list[Callable[[], None]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_stop.append(callback)

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Called when stopping begins, before the drain: a service with long-lived streams
        ends them here (after answering what they hold), or they would run into the grace
        period's end and be cancelled."""
        self._on_drain.append(callback)

    async def start(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s (not serving until ready)", self.address)

    async def set_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", self.address)

    async def _set_all(self, status) -> None:
        await self.health.set("", status)
        for name in self.service_names:
            await self.health.set(name, status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: asyncio.ensure_future(self.stop()))

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("stopping: health NOT_SERVING, draining for up to %.1f s", self.grace_s)
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        for drain in self._on_drain:
            drain()
        await self.server.stop(self.grace_s)
        for callback in self._on_stop:
            await callback()

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.server.wait_for_termination()


class ServesGrpc:
    """Base of the handles that start_<service>() returns: where it listens and how to stop it.

    Subclasses are dataclasses with a `service: GrpcService` field.
    """

    service: GrpcService

    @property
    def address(self) -> str:
        return self.service.address

    @property
    def port(self) -> int:
        return self.service.port

    async def stop(self) -> None:
        """Health NOT_SERVING, drain in-flight calls (grace_s), then stop. Idempotent."""
        await self.service.stop()


def insecure_channel(target: str) -> aio.Channel:
    """A channel to another specmesh service; with tracing on, every call carries the
    caller's trace context in its metadata (and gets a client span)."""
    return aio.insecure_channel(target, options=CHANNEL_OPTIONS,
                                interceptors=telemetry.client_interceptors() or None)
