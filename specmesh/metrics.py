"""Prometheus metrics of every specmesh service, in one registry per process.

Names follow vLLM where they mean the same thing (``spec_decode_num_drafts_total``,
``spec_decode_num_draft_tokens_total``, ``spec_decode_num_accepted_tokens_total``, per-position
acceptance), everything else is ``specmesh_<service>_...``. Each service records only its
own families; a process hosting several (tests) shows them all. Recording is always on (a
counter increment is a lock and an add); exposing is opt-in:

- ``--metrics-port N`` on scheduler, drafter and verifier serves ``/metrics`` on 127.0.0.1:N
  (0, the default, serves nothing) — `start_metrics_server`;
- the gateway's HTTP server appends `render_prometheus()` to its own ``/metrics``;
- ``OTEL_METRICS_EXPORTER=otlp`` pushes the same values over OTLP (metrics_export.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# `_created` series double the output and nobody reads them.
prometheus_client.disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_SESSIONS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
MAX_TRACKED_POSITION = 32  # per-position series stop here (positions beyond are folded into it)

# ---- scheduler: speculation (vLLM names) ---------------------------------------------------
SPEC_DECODE_NUM_DRAFTS = Counter(
    "spec_decode_num_drafts", "Drafts verified: session rounds that sent at least one draft token.",
    registry=REGISTRY)
SPEC_DECODE_NUM_DRAFT_TOKENS = Counter(
    "spec_decode_num_draft_tokens", "Draft tokens sent to verification (the sum of requests' drafted_tokens).",
    registry=REGISTRY)
SPEC_DECODE_NUM_ACCEPTED_TOKENS = Counter(
    "spec_decode_num_accepted_tokens", "Draft tokens accepted (the sum of requests' accepted_tokens).",
    registry=REGISTRY)
SPEC_DECODE_DRAFT_TOKENS_PER_POS = Counter(
    "spec_decode_num_draft_tokens_per_pos", "Draft tokens verified at each draft position (0 = first).",
    ["position"], registry=REGISTRY)
SPEC_DECODE_ACCEPTED_TOKENS_PER_POS = Counter(
    "spec_decode_num_accepted_tokens_per_pos",
    "Draft tokens accepted at each draft position; divided by the draft series: acceptance by position.",
    ["position"], registry=REGISTRY)
# ---- scheduler: sessions and rounds -------------------------------------------------------
SCHEDULER_ROUNDS = Counter("specmesh_scheduler_rounds", "Session rounds committed.", registry=REGISTRY)
SCHEDULER_ACTIVE_SESSIONS = Gauge("specmesh_scheduler_active_sessions", "Sessions running.", registry=REGISTRY)
SCHEDULER_QUEUE_DEPTH = Gauge(
    "specmesh_scheduler_queue_depth", "Sessions waiting for a place in a verify batch (beyond max_batch_sessions).",
    registry=REGISTRY)
SCHEDULER_QUEUE_WAIT = Histogram(
    "specmesh_scheduler_queue_wait_seconds", "Time a session waited between becoming ready and its round starting.",
    buckets=_SECONDS, registry=REGISTRY)
SCHEDULER_BATCH_SESSIONS = Histogram(
    "specmesh_scheduler_verify_batch_sessions", "Sessions per verify batch the scheduler sends.",
    buckets=_SESSIONS, registry=REGISTRY)
SCHEDULER_ROUND_SECONDS = Histogram(
    "specmesh_scheduler_round_seconds", "Wall time of a speculation round (draft + verify + commit).",
    buckets=_SECONDS, registry=REGISTRY)
SCHEDULER_CACHE_MISSES = Counter(
    "specmesh_scheduler_cache_misses", "CACHE_MISS answers the scheduler got (it resends history).",
    ["backend"], registry=REGISTRY)
SCHEDULER_FAILOVERS = Counter(
    "specmesh_scheduler_failovers", "Sessions moved to another replica after one was lost.",
    ["backend"], registry=REGISTRY)
# ---- gateway: request latency (its request counters live in gateway/counters.py) ------------
TIME_TO_FIRST_TOKEN = Histogram(
    "specmesh_time_to_first_token_seconds", "From request arrival at the gateway to the first token sent.",
    buckets=_LATENCY, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "specmesh_time_per_output_token_seconds", "(e2e - TTFT) / (completion tokens - 1), per request.",
    buckets=_SECONDS, registry=REGISTRY)
E2E_REQUEST_LATENCY = Histogram(
    "specmesh_e2e_request_latency_seconds", "From request arrival to the last token, per request.",
    buckets=_LATENCY, registry=REGISTRY)
# ---- verifier --------------------------------------------------------------------------------
VERIFIER_BATCH_TOKENS = Histogram(
    "specmesh_verifier_batch_tokens", "Tokens per batched forward (new + draft tokens of every merged item).",
    buckets=_TOKENS, registry=REGISTRY)
VERIFIER_BATCH_SESSIONS = Histogram(
    "specmesh_verifier_batch_sessions", "Sessions per batched forward (the verifier batch size).",
    buckets=_SESSIONS, registry=REGISTRY)
VERIFIER_FORWARD_SECONDS = Histogram(
    "specmesh_verifier_forward_seconds", "Wall time of one batched verify forward.", buckets=_SECONDS,
    registry=REGISTRY)
VERIFIER_QUEUE_WAIT = Histogram(
    "specmesh_verifier_queue_wait_seconds", "Time a Verify call waited before its forward started.",
    buckets=_SECONDS, registry=REGISTRY)
VERIFIER_QUEUE_DEPTH = Gauge("specmesh_verifier_queue_depth", "Verify calls queued for a forward.", registry=REGISTRY)
VERIFIER_ACTIVE_SESSIONS = Gauge("specmesh_verifier_active_sessions", "Sessions with a KV cache slot.",
                                 registry=REGISTRY)
VERIFIER_CACHE_MISSES = Counter("specmesh_verifier_cache_misses", "Items answered CACHE_MISS.", registry=REGISTRY)
# ---- drafter -----------------------------------------------------------------------------------
DRAFTER_BATCH_SESSIONS = Histogram(
    "specmesh_drafter_batch_sessions", "Syncs served by one batched draft call.", buckets=_SESSIONS,
    registry=REGISTRY)
DRAFTER_DRAFT_TOKENS = Counter("specmesh_drafter_draft_tokens", "Tokens drafted and sent.", registry=REGISTRY)
DRAFTER_QUEUE_WAIT = Histogram(
    "specmesh_drafter_queue_wait_seconds", "Time a sync waited before its draft batch started.", buckets=_SECONDS,
    registry=REGISTRY)
DRAFTER_QUEUE_DEPTH = Gauge("specmesh_drafter_queue_depth", "Syncs and releases queued.", registry=REGISTRY)
DRAFTER_ACTIVE_SESSIONS = Gauge("specmesh_drafter_active_sessions", "Sessions with drafter state.", registry=REGISTRY)
DRAFTER_CACHE_MISSES = Counter("specmesh_drafter_cache_misses", "Syncs answered CACHE_MISS.", registry=REGISTRY)
DRAFTER_COPIED_TOKENS = Counter(
    "specmesh_drafter_copied_tokens", "Tokens a model drafter drafted by copying from the context "
    "(drafter/context_copy.py), sent or drafted ahead.", registry=REGISTRY)

for _backend in ("verifier", "drafter"):  # both series exist from the start (rates need a zero)
    SCHEDULER_CACHE_MISSES.labels(backend=_backend)
    SCHEDULER_FAILOVERS.labels(backend=_backend)
_draft_per_pos = [SPEC_DECODE_DRAFT_TOKENS_PER_POS.labels(position=str(i)) for i in range(MAX_TRACKED_POSITION)]
_accepted_per_pos = [SPEC_DECODE_ACCEPTED_TOKENS_PER_POS.labels(position=str(i)) for i in range(MAX_TRACKED_POSITION)]


def record_verified_draft(num_draft_tokens: int, num_accepted: int) -> None:
    """One session round's verification outcome (only rounds that were committed)."""
    SCHEDULER_ROUNDS.inc()
    if num_draft_tokens <= 0:
        return
    SPEC_DECODE_NUM_DRAFTS.inc()
    SPEC_DECODE_NUM_DRAFT_TOKENS.inc(num_draft_tokens)
    SPEC_DECODE_NUM_ACCEPTED_TOKENS.inc(num_accepted)
    last = MAX_TRACKED_POSITION - 1
    for position in range(num_draft_tokens):
        _draft_per_pos[min(position, last)].inc()
    for position in range(num_accepted):
        _accepted_per_pos[min(position, last)].inc()


def record_request(ttft_s: float | None, e2e_s: float, completion_tokens: int) -> None:
    """A finished request at the gateway."""
    E2E_REQUEST_LATENCY.observe(e2e_s)
    if ttft_s is not None:
        TIME_TO_FIRST_TOKEN.observe(ttft_s)
        if completion_tokens > 1:
            TIME_PER_OUTPUT_TOKEN.observe(max(e2e_s - ttft_s, 0.0) / (completion_tokens - 1))


class GaugeShare:
    """One object's contribution to a process-wide gauge (several speculation loops, or
    several in-process services, add up instead of overwriting each other)."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.value = 0.0

    def set(self, value: float) -> None:
        if value != self.value:
            self.gauge.inc(value - self.value)
            self.value = value

    def clear(self) -> None:
        self.set(0.0)


def render_prometheus() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format: (body, content type)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@dataclass
class MetricsServer:
    host: str
    port: int
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]


def start_metrics_server(port: int, host: str = "127.0.0.1") -> MetricsServer | None:
    """Serve /metrics on host:port in a daemon thread; port 0 means off (returns None)."""
    if port <= 0:
        return None
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=REGISTRY)
    return MetricsServer(host, server.server_port, server, thread)


def sample_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one series in Prometheus text (0 when absent); for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    return 0.0


__all__: Sequence[str] = ["REGISTRY", "render_prometheus", "start_metrics_server", "record_verified_draft",
                          "record_request", "GaugeShare", "sample_value"]


def serve_metrics_for(service, port: int, host: str = "127.0.0.1") -> MetricsServer | None:
    """Start /metrics next to a GrpcService (port 0: nothing) and stop it with the service."""
    server = start_metrics_server(port, host)
    if server is not None:
        async def stop() -> None:
            server.stop()

        service.on_stop(stop)
        import logging

        logging.getLogger(__name__).info("Prometheus metrics on http://%s:%d/metrics", server.host, server.port)
    return server
