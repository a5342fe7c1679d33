"""OpenTelemetry tracing for every specmesh service, set up once per process.

Configuration is the standard OTEL_* environment, plus a file for local use:

- ``OTEL_TRACES_EXPORTER``: comma-separated ``otlp``, ``console``, ``none``. Unset, ``otlp`` is
  chosen when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set.
- ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``grpc`` (default) or ``http/protobuf``; endpoint,
  headers, TLS, timeouts and compression are read by the OTLP exporters themselves.
- ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``,
  ``OTEL_BSP_*`` (batching), ``OTEL_PROPAGATORS``, ``OTEL_SDK_DISABLED``: as everywhere.
- ``trace_file`` (``--trace-file`` / ``SPECMESH_TRACE_FILE``): OTLP JSON lines appended to a
  file, which is what ``specmesh tune`` reads (specmesh/otlp_json.py).
- ``OTEL_METRICS_EXPORTER=otlp`` additionally pushes the Prometheus metrics over OTLP
  (specmesh/metrics_export.py).

With none of these, tracing is off: no provider, no exporter thread, no gRPC interceptor, and
the services skip every span-building step (they test `enabled()` first), so it costs nothing.

One provider per process (resource ``service.name = specmesh-<service>``). When several
services share a process (tests), their spans are told apart by instrumentation scope
(``specmesh.scheduler`` ...) and span names, which are the contract (docs in README).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_TRACE_FILE = "SPECMESH_TRACE_FILE"
_NOOP_TRACER = trace.NoOpTracer()
# Long-lived or housekeeping RPCs get no span: health and reflection are noise, and the Draft
# stream lives as long as the scheduler (each sync carries its round's context in a field).
_UNTRACED_METHODS = ("specmesh.v1.Drafter/Draft",)
_UNTRACED_PREFIXES = ("grpc.",)


@dataclass
class Telemetry:
    """What setup_telemetry started; `shutdown` flushes and stops it."""

    service_name: str
    tracer_provider: Any  # opentelemetry.sdk.trace.TracerProvider; None when only metrics are pushed
    exporters: list[str] = field(default_factory=list)  # names, for the start-up log line
    metrics_exporter: Any = None  # specmesh.metrics_export.OtlpMetricsPusher, when configured

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        if self.metrics_exporter is not None:
            self.metrics_exporter.push()
        return self.tracer_provider is None or self.tracer_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if self.metrics_exporter is not None:
            self.metrics_exporter.stop()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


_state: Telemetry | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _names(value: str | None) -> list[str]:
    return [part.strip().lower() for part in (value or "").split(",") if part.strip()]


def _otlp_span_exporter(env: Mapping[str, str]):
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")
    return OTLPSpanExporter(), f"otlp ({protocol})"


def setup_telemetry(service_name: str, trace_file: str | os.PathLike | None = None, *,
                    span_exporters: Sequence[Any] = (), env: Mapping[str, str] | None = None) -> Telemetry | None:
    """Start tracing for this process as service `service_name` (gateway, scheduler, drafter,
    verifier), or leave it off (returns None) when nothing asks for it.

    span_exporters: extra SpanExporters (tests pass an in-memory one). Calling again replaces
    (and flushes) the previous setup, so tests can switch exporters between cases.
    """
    global _state
    env = os.environ if env is None else env
    if _state is not None:
        shutdown_telemetry()
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    names = _names(env.get("OTEL_TRACES_EXPORTER"))
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    exporters: list[tuple[Any, str]] = []
    for name in names:
        if name == "none":
            continue
        if name == "otlp":
            exporters.append(_otlp_span_exporter(env))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append((ConsoleSpanExporter(), "console"))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (use otlp, console or none; "
                             f"for a file use --trace-file)")
    if trace_file:
        from specmesh.otlp_json import OtlpJsonFileExporter

        exporters.append((OtlpJsonFileExporter(trace_file), f"file {trace_file}"))
    exporters += [(exporter, type(exporter).__name__) for exporter in span_exporters]

    from specmesh.metrics_export import metrics_pusher_from_env

    pusher = metrics_pusher_from_env(service_name, env)
    if not exporters and pusher is None:
        return None
    provider = None
    if exporters:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, override these (Resource.create).
        resource = Resource.create({"service.name": f"specmesh-{service_name}", "service.namespace": "specmesh",
                                    "specmesh.service": service_name})
        provider = TracerProvider(resource=resource, shutdown_on_exit=True)
        for exporter, _ in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: %s", ", ".join(label for _, label in exporters))
    _state = Telemetry(service_name, provider, [label for _, label in exporters], pusher)
    if pusher is not None:
        pusher.start()
    return _state


def shutdown_telemetry() -> None:
    """Flush and stop tracing (and metrics export); afterwards `enabled()` is False."""
    global _state
    state, _state = _state, None
    if state is not None:
        state.shutdown()


def enabled() -> bool:
    """True while spans are recorded. Hot paths test this before building any span."""
    return _state is not None and _state.tracer_provider is not None


def current() -> Telemetry | None:
    return _state


def tracer(component: str) -> trace.Tracer:
    """The tracer of one service's code (scope ``specmesh.<component>``); a no-op when off."""
    if not enabled():
        return _NOOP_TRACER
    return _state.tracer_provider.get_tracer(f"specmesh.{component}")


# ---- gRPC ---------------------------------------------------------------------------------------


def _method_of(details: Any) -> str:
    method = getattr(details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode("utf-8", "replace")
    return method.lstrip("/")


def _is_traced_rpc(details: Any) -> bool:
    method = _method_of(details)
    return not (method in _UNTRACED_METHODS or method.startswith(_UNTRACED_PREFIXES))


def server_interceptors() -> list:
    """OpenTelemetry's grpc.aio server interceptor (context from the caller's metadata), or
    nothing when tracing is off."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    stock = aio_server_interceptor(tracer_provider=_state.tracer_provider, filter_=_is_traced_rpc)
    return [_stream_safe(stock)]


class _StartWithoutAttaching:
    """Stands in for a tracer whose start_as_current_span only starts the span."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def start_as_current_span(self, name: str, kind: trace.SpanKind, attributes: dict, **_: Any):
        import contextlib

        return contextlib.nullcontext(self.tracer.start_span(name, kind=kind, attributes=attributes))


def _stream_safe(stock: Any) -> Any:
    """The stock interceptor, but server-streaming handlers keep their span current only while
    each response is produced. The stock version stays attached across `yield`, and grpc.aio
    finalizes an abandoned stream (the caller cancelled between two messages) in another task,
    where detaching fails with "Failed to detach context" errors."""
    from opentelemetry.instrumentation.grpc._aio_server import (OpenTelemetryAioServerInterceptor,
                                                                _OpenTelemetryAioServicerContext)
    from opentelemetry.instrumentation.grpc._server import OpenTelemetryServerInterceptor

    class StreamSafeServerInterceptor(OpenTelemetryAioServerInterceptor):
        def _intercept_aio_server_stream(self, behavior, handler_call_details):
            starter = OpenTelemetryServerInterceptor(_StartWithoutAttaching(self._tracer))

            async def _stream_interceptor(request_or_iterator, context):
                with self._set_remote_context(context):  # the caller's context, for the parent only
                    with starter._start_span(handler_call_details, context) as span:
                        pass
                wrapped = _OpenTelemetryAioServicerContext(context, span)
                responses = iterate_in_span(span, behavior(request_or_iterator, wrapped))
                try:
                    async for response in responses:
                        yield response
                except Exception as error:
                    if type(error) != Exception:  # noqa: E721 - bare Exceptions are aborts (stock rule)
                        span.record_exception(error)
                    raise
                finally:
                    span.end()

            return _stream_interceptor

    return StreamSafeServerInterceptor(stock._tracer, filter_=stock._filter)


def client_interceptors() -> list:
    """OpenTelemetry's grpc.aio client interceptors (inject the current context into every
    call's metadata), or nothing when tracing is off."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=_state.tracer_provider, filter_=_is_traced_rpc))


# ---- carrying a span's context in a message field -------------------------------------------------


def carrier_of(span: trace.Span) -> dict[str, str]:
    """W3C trace-context headers (traceparent, tracestate) naming `span`, for a message field."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_from(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context a carrier names (None when it names none)."""
    if not carrier:
        return None
    extracted = propagate.extract(dict(carrier))
    return extracted if trace.get_current_span(extracted).get_span_context().is_valid else None


def span_context_from(carrier: Mapping[str, str] | None) -> trace.SpanContext | None:
    extracted = context_from(carrier)
    return None if extracted is None else trace.get_current_span(extracted).get_span_context()


def links_to(carriers: Iterable[tuple[Mapping[str, str] | None, Mapping[str, Any]]]) -> list[trace.Link]:
    """One Link per (carrier, attributes) that names a span."""
    links = []
    for carrier, attributes in carriers:
        span_context = span_context_from(carrier)
        if span_context is not None:
            links.append(trace.Link(span_context, dict(attributes)))
    return links


async def iterate_in_span(span: trace.Span, iterator: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield from `iterator` with `span` current while each item is produced (so RPCs made
    inside are its children). The context is attached and detached around every step, never
    across a yield, so cancellation or closing from elsewhere cannot unbalance it."""
    span_context = trace.set_span_in_context(span)
    while True:
        token = otel_context.attach(span_context)
        try:
            item = await iterator.__anext__()
        except StopAsyncIteration:
            return
        finally:
            otel_context.detach(token)
        yield item


# ---- HTTP -------------------------------------------------------------------------------------------


def context_from_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> otel_context.Context:
    """The caller's context from HTTP headers (W3C `traceparent`/`tracestate`)."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return propagate.extract({key.lower(): value for key, value in pairs})


class TraceContextMiddleware:
    """ASGI middleware: requests carrying `traceparent` run inside the caller's trace, so the
    gateway's request span (specmesh.gateway.request) becomes the caller's child. A no-op
    when tracing is off. Usage: ``app.add_middleware(TraceContextMiddleware)`` or wrap the app."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or not enabled():
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        token = otel_context.attach(context_from_headers(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
