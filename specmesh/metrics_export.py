"""Push the Prometheus registry (specmesh/metrics.py) over OTLP, when OTEL_* asks for it.

Enabled by ``OTEL_METRICS_EXPORTER=otlp`` (or, with that unset, by an OTLP endpoint in
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``); the interval is
``OTEL_METRIC_EXPORT_INTERVAL`` (ms, default 60000) and protocol, endpoint and headers are the
exporter's usual variables. The values are the very counters Prometheus scrapes, converted to
cumulative OTLP sums, gauges and explicit-bucket histograms, so both views always agree.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Mapping

log = logging.getLogger(__name__)


def _names(value: str | None) -> list[str]:
    return [part.strip().lower() for part in (value or "").split(",") if part.strip()]


def metrics_pusher_from_env(service_name: str, env: Mapping[str, str]) -> "OtlpMetricsPusher | None":
    names = _names(env.get("OTEL_METRICS_EXPORTER"))
    if not names and (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")):
        names = ["otlp"]
    if "otlp" not in names:
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")
    interval_s = float(env.get("OTEL_METRIC_EXPORT_INTERVAL") or 60_000) / 1000.0
    return OtlpMetricsPusher(service_name, OTLPMetricExporter(), interval_s)


class OtlpMetricsPusher:
    def __init__(self, service_name: str, exporter: Any, interval_s: float) -> None:
        from opentelemetry.sdk.resources import Resource

        self.exporter = exporter
        self.interval_s = max(interval_s, 0.1)
        self.resource = Resource.create({"service.name": f"specmesh-{service_name}", "service.namespace": "specmesh",
                                         "specmesh.service": service_name})
        self.start_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="specmesh-otlp-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def push(self) -> None:
        try:
            self.exporter.export(registry_as_metrics_data(self.resource, self.start_ns))
        except Exception:  # noqa: BLE001 - telemetry never takes a service down
            log.warning("OTLP metrics export failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.push()
        self.exporter.shutdown()


def registry_as_metrics_data(resource: Any, start_ns: int, registry: Any = None):
    """The Prometheus registry as OTLP MetricsData (cumulative)."""
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Gauge, Histogram, Metric, MetricsData, NumberDataPoint, ResourceMetrics,
                                                  ScopeMetrics, Sum)
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from specmesh.metrics import REGISTRY

    now = time.time_ns()
    metrics = []
    for family in (registry or REGISTRY).collect():
        if family.type in ("counter", "gauge"):
            points = [NumberDataPoint(attributes=dict(s.labels), start_time_unix_nano=start_ns, time_unix_nano=now,
                                      value=s.value)
                      for s in family.samples if s.name in (family.name, family.name + "_total")]
            if not points:
                continue
            if family.type == "counter":
                data = Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True)
                name = family.name + "_total"
            else:
                data, name = Gauge(points), family.name
        elif family.type == "histogram":
            data = Histogram(_histogram_points(family, start_ns, now), AggregationTemporality.CUMULATIVE)
            name = family.name
            if not data.data_points:
                continue
        else:
            continue
        metrics.append(Metric(name=name, description=family.documentation, unit="", data=data))
    scope = ScopeMetrics(InstrumentationScope("specmesh.metrics"), metrics, schema_url="")
    return MetricsData([ResourceMetrics(resource, [scope], schema_url="")])


def _histogram_points(family: Any, start_ns: int, now: int) -> list:
    from opentelemetry.sdk.metrics.export import HistogramDataPoint

    series: dict[tuple, dict[str, Any]] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = tuple(sorted(labels.items()))
        entry = series.setdefault(key, {"labels": labels, "buckets": [], "count": 0.0, "sum": 0.0})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            entry["count"] = sample.value
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    points = []
    for entry in series.values():
        cumulative = sorted(entry["buckets"])
        bounds = [le for le, _ in cumulative if le != float("inf")]
        counts, previous = [], 0.0
        for _, value in cumulative:  # Prometheus buckets are cumulative, OTLP's are not
            counts.append(int(value - previous))
            previous = value
        points.append(HistogramDataPoint(
            attributes=entry["labels"], start_time_unix_nano=start_ns, time_unix_nano=now, count=int(entry["count"]),
            sum=entry["sum"], bucket_counts=counts, explicit_bounds=bounds, min=None, max=None))
    return points
