"""Tracing, metrics and `specmesh tune` over the four real services (in-process, real gRPC on
loopback, tiny models).

One traced run (module fixture) exports every span three ways at once: an in-memory exporter,
the OTLP JSON lines file (--trace-file) and a real OTLP gRPC receiver built from the
opentelemetry-proto service definitions. The tests then check the trace from each sink.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from drafter.config import DrafterConfig
from drafter.server import start_drafter
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from scheduler.config import SchedulerConfig
from scheduler.server import start_scheduler
from specmesh import metrics, telemetry
from specmesh.cli import app
from specmesh.client import AsyncSpecmeshClient
from specmesh.local_cluster import free_port
from specmesh.otlp_json import read_spans
from specmesh.tune import analyze, load_spans
from tests.tiny_models import save_tiny_model
from verifier.config import VerifierConfig
from verifier.server import start_verifier

MAX_CONTEXT = 256
PROMPTS = ["w5 w9 w12 w5 w9 w12 w5", "w7 w7 w8 w9 w10 w11", "w20 w21 w20 w21 w20", "w3 w4 w5 w6 w7 w8 w9 w10"]


@pytest.fixture(scope="module")
def verifier_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("telemetry") / "verifier", vocab_size=64, hidden=64, layers=3,
                           heads=4, kv_heads=2, seed=0)


async def start_cluster(verifier_dir: Path, **metrics_ports: int):
    # The drafter is the verifier's first two layers: it agrees often but not always, so
    # acceptance, confidence and draft lengths all vary.
    verifier = await start_verifier(VerifierConfig(
        model=str(verifier_dir), max_context=MAX_CONTEXT, num_slots=16, profile_batch_tokens=(1, 8),
        metrics_port=metrics_ports.get("verifier", 0)))
    drafter = await start_drafter(DrafterConfig(
        model="layers:2", verifier_model=str(verifier_dir), max_context=MAX_CONTEXT, num_slots=16,
        profile_batch_sizes=(1,), metrics_port=metrics_ports.get("drafter", 0)))
    scheduler = await start_scheduler(SchedulerConfig(
        verifiers=(verifier.address,), drafters=(drafter.address,), connect_wait_s=30,
        metrics_port=metrics_ports.get("scheduler", 0)))
    gateway = await start_gateway(GatewayConfig(model=str(verifier_dir), scheduler=scheduler.address))
    return [gateway, scheduler, drafter, verifier]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver: keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, str, str]]:
        """(name, trace id, span id) of every span received."""
        with self.lock:
            return [(span.name, span.trace_id.hex(), span.span_id.hex())
                    for request in self.requests for resource in request.resource_spans
                    for scope in resource.scope_spans for span in scope.spans]


class MetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """A real OTLP/gRPC metrics receiver: keeps the last value of every sum data point."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def Export(self, request, context):
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.HasField("sum") and not metric.sum.data_points[0].attributes:
                        point = metric.sum.data_points[0]
                        self.sums[metric.name] = point.as_double or float(point.as_int)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture(scope="module")
def traced_run(verifier_dir, tmp_path_factory):
    """One request alone, then three at once, with tracing exported three ways."""
    receiver, metrics_receiver = Receiver(), MetricsReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics_receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    trace_file = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    memory = InMemorySpanExporter()
    # The endpoint alone turns on OTLP export of traces and metrics (metrics pushed on flush).
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    drafted_before = metrics.SPEC_DECODE_NUM_DRAFT_TOKENS._value.get()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        state = telemetry.setup_telemetry("test", trace_file, span_exporters=[memory])
    assert state is not None and telemetry.enabled()

    async def scenario():
        services = await start_cluster(verifier_dir)
        try:
            async with AsyncSpecmeshClient(services[0].address) as client:
                alone = await client.generate(prompt=PROMPTS[0], max_tokens=24, request_id="alone")
                together = await asyncio.gather(*(client.generate(prompt=p, max_tokens=32, request_id=f"together-{i}")
                                                  for i, p in enumerate(PROMPTS[1:])))
        finally:
            for service in services:
                await service.stop()
        return alone, together

    try:
        alone, together = asyncio.run(scenario())
        assert state.force_flush()
    finally:
        telemetry.shutdown_telemetry()
        server.stop(0)
    return {"memory": memory.get_finished_spans(), "file": trace_file, "receiver": receiver,
            "metrics": metrics_receiver.sums, "drafted_before": drafted_before, "alone": alone, "together": together}


def _by_name(spans, name):
    return [s for s in spans if s.name == name]


def test_one_request_is_one_connected_trace_across_the_four_services(traced_run):
    spans = traced_run["memory"]
    requests = [s for s in _by_name(spans, "specmesh.gateway.request")
                if s.attributes.get("specmesh.request.id") == "alone"]
    assert len(requests) == 1
    trace_id = requests[0].context.trace_id
    mine = [s for s in spans if s.context.trace_id == trace_id]
    names = {s.name for s in mine}
    # gateway -> scheduler -> drafter and verifier, including the gRPC hops between them.
    for name in ("specmesh.gateway.request", "/specmesh.v1.Scheduler/Generate", "specmesh.scheduler.session",
                 "specmesh.scheduler.round", "specmesh.drafter.draft", "/specmesh.v1.Verifier/Verify",
                 "specmesh.verifier.batch"):
        assert name in names, (name, sorted(names))
    by_id = {s.context.span_id: s for s in mine}

    def ancestors(span):
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            yield span.name

    session = _by_name(mine, "specmesh.scheduler.session")[0]
    assert "specmesh.gateway.request" in set(ancestors(session))
    rounds = _by_name(mine, "specmesh.scheduler.round")
    assert all(r.parent.span_id == session.context.span_id for r in rounds)
    round_ids = {r.context.span_id for r in rounds}
    drafts = _by_name(mine, "specmesh.drafter.draft")
    assert drafts and all(d.parent.span_id in round_ids for d in drafts)
    for batch in _by_name(mine, "specmesh.verifier.batch"):
        assert {link.context.span_id for link in batch.links} <= round_ids
        assert "specmesh.scheduler.round" in set(ancestors(batch))
    # The session's own totals agree with what the client was told.
    alone = traced_run["alone"]
    assert session.attributes["specmesh.session.drafted_tokens"] == alone.speculation.drafted_tokens
    assert session.attributes["specmesh.session.accepted_tokens"] == alone.speculation.accepted_tokens
    assert len(rounds) == alone.speculation.rounds
    assert sum(r.attributes["specmesh.round.verify_length"] for r in rounds) == alone.speculation.drafted_tokens
    assert sum(r.attributes["specmesh.round.accepted"] for r in rounds) == alone.speculation.accepted_tokens
    for attribute in ("specmesh.round.draft_length", "specmesh.round.batch_size", "specmesh.round.queue_wait_s",
                      "specmesh.round.batch_tokens", "specmesh.round.committed"):
        assert all(attribute in r.attributes for r in rounds), attribute
    with_drafts = [r for r in rounds if r.attributes["specmesh.round.verify_length"]]
    assert with_drafts and all(len(r.attributes["specmesh.round.confidences"]) >= 1 for r in with_drafts)


def test_verifier_batch_span_links_the_round_span_of_every_session_in_it(traced_run):
    spans = traced_run["memory"]
    rounds = {s.context.span_id: s for s in _by_name(spans, "specmesh.scheduler.round")}
    best = max(_by_name(spans, "specmesh.verifier.batch"), key=lambda s: len(s.links))
    linked = [rounds[link.context.span_id] for link in best.links]
    sessions = {r.attributes["specmesh.session.id"] for r in linked}
    assert len(sessions) >= 2 and len({r.context.trace_id for r in linked}) >= 2
    assert best.attributes["specmesh.batch.sessions"] == len(best.links)
    assert set(best.attributes["specmesh.batch.session_ids"]) == sessions
    assert all(r.attributes["specmesh.round.batch_size"] >= 2 for r in linked)


def test_otlp_receiver_and_trace_file_get_every_span(traced_run):
    expected = {(s.name, format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
                for s in traced_run["memory"]}
    assert set(traced_run["receiver"].spans()) == expected
    from_file = {(s.name, s.trace_id, s.span_id) for s in read_spans(traced_run["file"])}
    assert from_file == expected


def test_otlp_metrics_export_pushes_the_prometheus_counters(traced_run):
    clients = [traced_run["alone"], *traced_run["together"]]
    drafted = sum(c.speculation.drafted_tokens for c in clients)
    assert traced_run["metrics"]["spec_decode_num_draft_tokens_total"] == traced_run["drafted_before"] + drafted


def test_tune_on_the_trace_file_prints_the_report_and_plots(traced_run, tmp_path):
    png = tmp_path / "tune.png"
    result = CliRunner().invoke(app, ["tune", str(traced_run["file"]), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    for heading in ("Acceptance by position", "Acceptance by confidence", "Chosen lengths by verifier batch size",
                    "Expected speedup by fixed draft length", "Recommended settings"):
        assert heading in result.output, heading
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same figures, computed straight from the round spans.
    rounds = [s.attributes for s in read_spans(traced_run["file"]) if s.name == "specmesh.scheduler.round"]
    report = analyze(load_spans([traced_run["file"]]))
    clients = [traced_run["alone"], *traced_run["together"]]
    assert report.drafted_tokens == sum(r["specmesh.round.verify_length"] for r in rounds) \
        == sum(c.speculation.drafted_tokens for c in clients)
    assert report.accepted_tokens == sum(r["specmesh.round.accepted"] for r in rounds) \
        == sum(c.speculation.accepted_tokens for c in clients)
    assert report.num_sessions == len(clients)
    for stat in report.positions:
        offered = [r for r in rounds if r["specmesh.round.verify_length"] > stat.position]
        assert stat.offered == len(offered)
        assert stat.accepted == sum(1 for r in offered if r["specmesh.round.accepted"] > stat.position)
    tested = accepted = 0
    for r in rounds:
        n = min(r["specmesh.round.verify_length"], r["specmesh.round.accepted"] + 1)
        tested += n
        accepted += min(r["specmesh.round.accepted"], n)
    assert sum(b.tested for b in report.calibration) == tested
    assert sum(b.accepted for b in report.calibration) == accepted
    assert f"accepted {report.accepted_tokens} (acceptance {report.acceptance_rate:.1%})" in result.output


async def test_metrics_endpoint_counts_what_the_requests_report_and_tracing_off_costs_nothing(verifier_dir):
    telemetry.shutdown_telemetry()
    ports = {"scheduler": free_port(), "verifier": free_port(), "drafter": free_port()}

    def scrape(service: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[service]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    services = await start_cluster(verifier_dir, **ports)
    try:
        before = await asyncio.to_thread(scrape, "scheduler")
        async with AsyncSpecmeshClient(services[0].address) as client:
            results = await asyncio.gather(*(client.generate(prompt=p, max_tokens=32) for p in PROMPTS))
        after = await asyncio.to_thread(scrape, "scheduler")
        verifier_text = await asyncio.to_thread(scrape, "verifier")
        drafter_text = await asyncio.to_thread(scrape, "drafter")
        # Tracing off: no exporter or span-processor thread was started for any of this.
        assert not telemetry.enabled()
        assert not [t.name for t in threading.enumerate() if "Otel" in t.name or "otlp" in t.name.lower()]
    finally:
        for service in services:
            await service.stop()

    def delta(name: str, labels=None) -> float:
        return metrics.sample_value(after, name, labels) - metrics.sample_value(before, name, labels)

    drafted = sum(r.speculation.drafted_tokens for r in results)
    accepted = sum(r.speculation.accepted_tokens for r in results)
    assert drafted > 0
    assert delta("spec_decode_num_draft_tokens_total") == drafted
    assert delta("spec_decode_num_accepted_tokens_total") == accepted
    assert delta("specmesh_scheduler_rounds_total") == sum(r.speculation.rounds for r in results)
    assert 0 < delta("spec_decode_num_drafts_total") <= sum(r.speculation.rounds for r in results)
    positions = range(metrics.MAX_TRACKED_POSITION)
    assert sum(delta("spec_decode_num_draft_tokens_per_pos_total", {"position": str(p)}) for p in positions) == drafted
    assert sum(delta("spec_decode_num_accepted_tokens_per_pos_total", {"position": str(p)})
               for p in positions) == accepted
    assert delta("specmesh_time_to_first_token_seconds_count") == len(PROMPTS)
    assert delta("specmesh_e2e_request_latency_seconds_count") == len(PROMPTS)
    assert metrics.sample_value(after, "specmesh_scheduler_active_sessions") == 0
    assert metrics.sample_value(verifier_text, "specmesh_verifier_batch_sessions_count") > 0
    assert metrics.sample_value(drafter_text, "specmesh_drafter_batch_sessions_count") > 0
