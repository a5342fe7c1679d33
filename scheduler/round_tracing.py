"""Telemetry of the speculation loop: the session span, one span per session per round, and
the scheduler's Prometheus metrics. The loop calls these hooks; they never change a decision.

Spans (names and attributes are a documented contract; `specmesh tune` reads them):

- ``specmesh.scheduler.session``: one per session, child of the scheduler's gRPC server span
  (so of the gateway's request span). Attributes ``specmesh.session.*``.
- ``specmesh.scheduler.round``: one per session per round, child of the session span, from the
  round's start to its commit. Attributes ``specmesh.round.*`` (see ROUND_ATTRIBUTES). Its
  context travels in each DraftSync and VerifyItem (`trace_context`): the drafter's
  ``specmesh.drafter.draft`` span is its child, the verifier's ``specmesh.verifier.batch``
  span links to it.

With tracing off only the metrics run (a few counter increments per session round).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Sequence

from opentelemetry import trace

from specmesh import metrics, telemetry
from specmesh.records import DraftChunk, VerifyItem, VerifyResult

SESSION_SPAN = "specmesh.scheduler.session"
ROUND_SPAN = "specmesh.scheduler.round"

ROUND_ATTRIBUTES = {
    "specmesh.session.id": "session (request) id",
    "specmesh.round.index": "1-based round number within the session",
    "specmesh.round.draft_length": "draft tokens the policy asked the drafter for",
    "specmesh.round.drafted": "draft tokens the drafter returned",
    "specmesh.round.verify_length": "draft tokens the policy chose to verify",
    "specmesh.round.accepted": "draft tokens the verifier accepted",
    "specmesh.round.committed": "tokens committed (accepted + correction/bonus, cut by stop/length)",
    "specmesh.round.confidences": "drafter confidence of each drafted token (float array)",
    "specmesh.round.batch_size": "sessions in the round's verify batch",
    "specmesh.round.batch_tokens": "tokens in the round's verify batch (new + draft, all sessions)",
    "specmesh.round.batch_draft_tokens": "draft tokens in the round's verify batch (all sessions)",
    "specmesh.round.policy": "adaptive (confidence x load) or fixed",
    "specmesh.round.prefill_tokens": "committed tokens this session sent to the verifier",
    "specmesh.round.queue_wait_s": "seconds the session waited between becoming ready and the round's start",
    "specmesh.round.draft_s": "seconds of the round's draft phase",
    "specmesh.round.verify_s": "seconds of the round's Verify call",
    "specmesh.round.expected_tokens": "the adaptive policy's expected committed tokens for the whole batch",
    "specmesh.round.planned_s": "the adaptive policy's predicted Verify seconds for the batch",
    "specmesh.round.verifier_cache_miss": "the verifier answered CACHE_MISS (history resent next round)",
    "specmesh.round.drafter_cache_miss": "the drafter answered CACHE_MISS or failed",
    "specmesh.verifier.endpoint": "verifier replica of the batch",
}


def start_session_span(session: Any, verifier_endpoint: str = "") -> trace.Span | None:
    """The session span, child of the current context (the gRPC handler's); None when off."""
    if not telemetry.enabled():
        return None
    return telemetry.tracer("scheduler").start_span(SESSION_SPAN, attributes={
        "specmesh.session.id": session.session_id,
        "specmesh.session.prompt_tokens": len(session.prompt_tokens),
        "specmesh.session.max_tokens": session.max_tokens,
        "specmesh.session.temperature": float(session.params.temperature),
        "specmesh.session.disable_speculation": bool(session.disable_speculation),
        "specmesh.verifier.endpoint": verifier_endpoint,
    })


def end_session_span(span: trace.Span | None, session: Any, error: BaseException | None = None) -> None:
    if span is None:
        return
    stats = session.stats
    span.set_attributes({
        "specmesh.session.completion_tokens": session.num_generated,
        "specmesh.session.rounds": stats.rounds,
        "specmesh.session.drafted_tokens": stats.drafted_tokens,
        "specmesh.session.accepted_tokens": stats.accepted_tokens,
        "specmesh.session.finish_reason": session.finish_reason or "",
    })
    if error is not None and not isinstance(error, GeneratorExit):
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


class RoundTrace:
    """One round of one speculation loop: timings for the metrics, and (tracing on) a span
    per session. Created by `begin_round` at the round's start."""

    def __init__(self, entries: Sequence[Any], verifier_endpoint: str) -> None:
        self.start = time.perf_counter()
        self.entries = list(entries)
        self.verifier_endpoint = verifier_endpoint
        self.draft_end = self.start
        self.verify_start = self.start
        self.verify_end = self.start
        self.queue_waits = {}
        for entry in entries:
            wait = max(self.start - entry.ready_at, 0.0) if entry.ready_at else 0.0
            self.queue_waits[entry.session.session_id] = wait
            metrics.SCHEDULER_QUEUE_WAIT.observe(wait)
        metrics.SCHEDULER_BATCH_SESSIONS.observe(len(entries))
        self.spans: dict[str, trace.Span] = {}
        self.carriers: dict[str, dict[str, str]] = {}
        if telemetry.enabled():
            tracer = telemetry.tracer("scheduler")
            for entry in entries:
                entry.rounds_started += 1
                parent = trace.set_span_in_context(entry.span) if entry.span is not None else None
                span = tracer.start_span(ROUND_SPAN, context=parent, attributes={
                    "specmesh.session.id": entry.session.session_id,
                    "specmesh.round.index": entry.rounds_started,
                    "specmesh.round.queue_wait_s": self.queue_waits[entry.session.session_id],
                    "specmesh.round.batch_size": len(entries),
                    "specmesh.verifier.endpoint": verifier_endpoint,
                })
                self.spans[entry.session.session_id] = span
                self.carriers[entry.session.session_id] = telemetry.carrier_of(span)

    def carrier(self, session_id: str) -> dict[str, str]:
        return self.carriers.get(session_id, {})

    def drafted(self, draft_lengths: dict[str, int], chunks: dict[str, DraftChunk]) -> None:
        self.draft_end = time.perf_counter()
        for session_id, span in self.spans.items():
            chunk = chunks.get(session_id)
            attributes = {"specmesh.round.draft_length": draft_lengths.get(session_id, 0),
                          "specmesh.round.draft_s": self.draft_end - self.start,
                          "specmesh.round.drafted": 0 if chunk is None or chunk.cache_miss else len(chunk.tokens),
                          "specmesh.round.drafter_cache_miss": bool(chunk is not None and chunk.cache_miss)}
            if chunk is not None and chunk.confidences:
                attributes["specmesh.round.confidences"] = [float(c) for c in chunk.confidences]
            span.set_attributes(attributes)
        for chunk in chunks.values():
            if chunk.cache_miss:
                metrics.SCHEDULER_CACHE_MISSES.labels(backend="drafter").inc()

    def planned(self, items: Sequence[VerifyItem], policy: Any) -> None:
        if not self.spans:
            return
        batch_tokens = sum(len(i.new_tokens) + len(i.draft_tokens) for i in items)
        plan = getattr(policy, "last_plan", None)
        common: dict[str, Any] = {"specmesh.round.policy": "adaptive" if hasattr(policy, "last_plan") else "fixed",
                                  "specmesh.round.batch_tokens": batch_tokens,
                                  "specmesh.round.batch_draft_tokens": sum(len(i.draft_tokens) for i in items)}
        if plan is not None and set(plan.lengths) == set(self.spans):
            common["specmesh.round.expected_tokens"] = float(plan.expected_tokens)
            common["specmesh.round.planned_s"] = float(plan.round_seconds)
        for item in items:
            span = self.spans.get(item.session_id)
            if span is not None:
                span.set_attributes({**common, "specmesh.round.verify_length": len(item.draft_tokens),
                                     "specmesh.round.prefill_tokens": len(item.new_tokens)})

    @contextlib.contextmanager
    def verifying(self) -> Iterator[None]:
        """Around the Verify call: timed, and with the first session's round span current, so
        the RPC's client span (and the verifier's server span) join a real trace."""
        self.verify_start = time.perf_counter()
        try:
            if self.spans:
                with trace.use_span(next(iter(self.spans.values())), end_on_exit=False):
                    yield
            else:
                yield
        finally:
            self.verify_end = time.perf_counter()

    def committed(self, item: VerifyItem, result: VerifyResult, commit: Any) -> None:
        """A session's round was committed (not called for sessions cancelled meanwhile)."""
        if result.cache_miss:
            metrics.SCHEDULER_CACHE_MISSES.labels(backend="verifier").inc()
        else:
            metrics.record_verified_draft(len(item.draft_tokens), result.accepted_count)
        span = self.spans.pop(item.session_id, None)
        if span is not None:
            span.set_attributes({
                "specmesh.round.accepted": result.accepted_count,
                "specmesh.round.committed": len(commit.token_ids),
                "specmesh.round.verifier_cache_miss": bool(result.cache_miss),
                "specmesh.round.verify_s": self.verify_end - self.verify_start,
            })
            span.end()

    def end(self, error: BaseException | None = None) -> None:
        """The round is over: end spans not committed (cancelled or failed), record its time."""
        now = time.perf_counter()
        metrics.SCHEDULER_ROUND_SECONDS.observe(now - self.start)
        for entry in self.entries:
            entry.ready_at = now
        for span in self.spans.values():
            if error is not None:
                span.record_exception(error)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end()
        self.spans.clear()
