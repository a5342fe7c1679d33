"""The gateway's request span and latency metrics, for any front end (gRPC, HTTP).

Wrap the stream of responses a front end sends to its client:

    async for response in observe_request(responses, transport="grpc"):
        ...send response...

`responses` yields objects with `token_ids`, `finish_reason`, `request_id`, `usage`
(`prompt_tokens`, `completion_tokens`) and `speculation` (`drafted_tokens`, `accepted_tokens`,
`rounds`): GenerateResponse protos and gateway GenerationResponse records both do. The span
``specmesh.gateway.request`` is a child of the current context (the gRPC server span, or an
HTTP caller's ``traceparent`` attached by telemetry.TraceContextMiddleware) and is current
while each response is produced, so the scheduler call made inside joins the trace. Time to
first token, time per output token and end-to-end latency are recorded for every request that
finishes (specmesh/metrics.py), traced or not.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, TypeVar

from opentelemetry import trace

from specmesh import metrics, telemetry

R = TypeVar("R")

REQUEST_SPAN = "specmesh.gateway.request"


async def observe_request(responses: AsyncIterator[R], transport: str) -> AsyncIterator[R]:
    start = time.perf_counter()
    span = None
    if telemetry.enabled():
        span = telemetry.tracer("gateway").start_span(REQUEST_SPAN, kind=trace.SpanKind.INTERNAL,
                                                      attributes={"specmesh.request.transport": transport})
    stream = telemetry.iterate_in_span(span, responses) if span is not None else responses
    first_token_at: float | None = None
    last: Any = None
    error: BaseException | None = None
    try:
        async for response in stream:
            if first_token_at is None and getattr(response, "token_ids", None):
                first_token_at = time.perf_counter()
                if span is not None:
                    span.add_event("first_token")
            if last is None and span is not None and getattr(response, "request_id", ""):
                span.set_attribute("specmesh.request.id", response.request_id)
            last = response
            yield response
    except BaseException as caught:
        error = caught
        raise
    finally:
        if stream is not responses:
            await stream.aclose()  # type: ignore[attr-defined]
        _finish(span, start, first_token_at, last, error)


def _finish(span: trace.Span | None, start: float, first_token_at: float | None, last: Any,
            error: BaseException | None) -> None:
    e2e = time.perf_counter() - start
    ttft = None if first_token_at is None else first_token_at - start
    finish_reason = getattr(last, "finish_reason", "") if last is not None else ""
    usage = getattr(last, "usage", None)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    if finish_reason and error is None:
        metrics.record_request(ttft, e2e, completion)
    if span is None:
        return
    speculation = getattr(last, "speculation", None)
    attributes: dict[str, Any] = {
        "specmesh.request.finish_reason": finish_reason or ("error" if error is not None else "cancelled"),
        "specmesh.request.prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "specmesh.request.completion_tokens": completion,
        "specmesh.request.e2e_s": e2e,
        "specmesh.request.drafted_tokens": int(getattr(speculation, "drafted_tokens", 0) or 0),
        "specmesh.request.accepted_tokens": int(getattr(speculation, "accepted_tokens", 0) or 0),
        "specmesh.request.rounds": int(getattr(speculation, "rounds", 0) or 0),
    }
    if ttft is not None:
        attributes["specmesh.request.ttft_s"] = ttft
        if completion > 1:
            attributes["specmesh.request.tpot_s"] = max(e2e - ttft, 0.0) / (completion - 1)
    span.set_attributes(attributes)
    if error is not None and not isinstance(error, GeneratorExit):
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()
