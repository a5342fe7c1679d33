"""Traces as OTLP JSON lines: the file exporter behind ``--trace-file``, and the reader that
``specmesh tune`` uses.

Each line is one ``ExportTraceServiceRequest`` in the OTLP/JSON encoding (lowerCamelCase
fields, trace and span ids as hex, enums as integers, 64-bit integers as strings): the same
format the OpenTelemetry Collector's file exporter writes, so tune reads either.

Several processes (``specmesh up`` runs four) may append to one file: every export is one
``os.write`` of whole lines on an O_APPEND descriptor, so lines never interleave.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence


class OtlpJsonFileExporter:
    """An OpenTelemetry SpanExporter that appends OTLP JSON lines to `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]):
        from opentelemetry.sdk.trace.export import SpanExportResult

        if not spans:
            return SpanExportResult.SUCCESS
        line = encode_spans_json(spans) + "\n"
        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            data = line.encode("utf-8")
            while data:  # a regular file takes it whole; loop only for safety
                written = os.write(self._fd, data)
                data = data[written:]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def encode_spans_json(spans: Sequence[Any]) -> str:
    """SDK ReadableSpans as one OTLP/JSON ExportTraceServiceRequest (no newline)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    message = MessageToDict(encode_spans(spans), use_integers_for_enums=True)
    for resource_spans in message.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _ids_to_hex(span)
                for link in span.get("links", ()):
                    _ids_to_hex(link)
    return json.dumps(message, separators=(",", ":"))


def _ids_to_hex(record: dict) -> None:
    # proto3 JSON writes bytes as base64; OTLP/JSON wants hex ids.
    for key in ("traceId", "spanId", "parentSpanId"):
        if record.get(key):
            record[key] = base64.b64decode(record[key]).hex()


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanLink:
    trace_id: str
    span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRecord:
    """One span as tune sees it (attribute values decoded to Python types)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[SpanLink, ...] = ()
    service: str = ""  # resource service.name
    scope: str = ""  # instrumentation scope name

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def decode_value(value: dict) -> Any:
    """An OTLP AnyValue in JSON form, as a Python value."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "arrayValue" in value:
        return [decode_value(v) for v in value["arrayValue"].get("values", ())]
    if "kvlistValue" in value:
        return decode_attributes(value["kvlistValue"].get("values", ()))
    if "bytesValue" in value:
        return base64.b64decode(value["bytesValue"])
    return None


def decode_attributes(attributes: Sequence[dict]) -> dict[str, Any]:
    return {a["key"]: decode_value(a.get("value", {})) for a in attributes}


def spans_of_request(message: dict) -> Iterator[SpanRecord]:
    """The spans of one decoded ExportTraceServiceRequest line."""
    for resource_spans in message.get("resourceSpans", ()):
        resource = decode_attributes(resource_spans.get("resource", {}).get("attributes", ()))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.get("scopeSpans", ()):
            scope = scope_spans.get("scope", {}).get("name", "")
            for span in scope_spans.get("spans", ()):
                yield SpanRecord(
                    name=span.get("name", ""),
                    trace_id=span.get("traceId", ""),
                    span_id=span.get("spanId", ""),
                    parent_span_id=span.get("parentSpanId", ""),
                    start_ns=int(span.get("startTimeUnixNano", 0)),
                    end_ns=int(span.get("endTimeUnixNano", 0)),
                    attributes=decode_attributes(span.get("attributes", ())),
                    links=tuple(SpanLink(link.get("traceId", ""), link.get("spanId", ""),
                                         decode_attributes(link.get("attributes", ())))
                                for link in span.get("links", ())),
                    service=service,
                    scope=scope,
                )


def read_spans(path: str | os.PathLike) -> Iterator[SpanRecord]:
    """Every span in one OTLP JSON lines file (blank lines skipped; a torn last line, from a
    process killed mid-write, is ignored)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(message, dict):  # other JSON (a model's config.json in a directory) has no spans
                yield from spans_of_request(message)
