"""Server-side micro-batching: concurrent Verify calls share one forward pass.

Several schedulers (or several batches of one scheduler) call Verify at about the same time;
a forward over all of them costs little more than a forward over one (the model weights are
read once), so the batcher merges calls that arrive within `batch_wait_s` of the first one and
runs ONE VerifierCore.verify over the merged items. The wait is bounded, skipped as soon as
the queued calls fill a batch (max_batch_tokens or one session per KV slot), never repeated
for a call that a full batch left behind, and skipped for a caller that has been alone (one
scheduler, one call at a time: nobody to wait for) until another caller or an overlapping call
shows up. While a forward runs, new calls queue up and form the next batch, so under load
batches grow by themselves.

Rules that keep merging invisible to callers:
- each call is validated on its own before it is queued (verifier/call_validation.py), so a
  bad call fails alone;
- a session that appears in two queued calls goes into separate forwards, in arrival order
  (the queue is FIFO and a batch stops at the first call that conflicts with it);
- every access to the core (forwards, releases, evictions, profiling) runs on one worker
  thread, one job at a time: the KV cache is not thread-safe, and torch releases the GIL so the
  event loop keeps accepting calls while a forward runs.

No gRPC here: verifier/servicer.py is the shell around it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from specmesh import metrics, telemetry
from specmesh.batch_window import wait_for_company
from specmesh.errors import SpecmeshError
from specmesh.model_runner import model_thread_initializer
from specmesh.records import VerifyItem, VerifyResult
from verifier.call_validation import RefusedItem, validate_call
from verifier.verification import VerifierCore

log = logging.getLogger(__name__)

T = TypeVar("T")
ItemOutcome = VerifyResult | RefusedItem

# How many recent forwards the batch-size history keeps (for stats and tests).
HISTORY_LENGTH = 1024
# One span per batched forward, linked to the round span of every session in it.
BATCH_SPAN = "specmesh.verifier.batch"


class BatcherClosedError(SpecmeshError):
    """The verifier is shutting down and takes no more work."""


@dataclass(frozen=True)
class CallOutcome:
    """What one Verify call gets back."""

    results: list[ItemOutcome]  # one per item, in the call's order
    forward_seconds: float  # wall time of the forward pass this call joined; 0 when none ran
    batch_tokens: int  # tokens fed through the model in that pass, over every merged call


@dataclass(frozen=True)
class LoadSnapshot:
    """The core's occupancy after the last job on the worker thread, plus calls in flight."""

    active_sessions: int
    cached_tokens: int
    capacity_tokens: int
    in_flight: int = 0


@dataclass(frozen=True)
class _PassResult:
    results: list[VerifyResult]  # for the merged items, in order
    forward_seconds: float
    batch_tokens: int


@dataclass(eq=False)
class _Call:
    items: list[VerifyItem]  # the admitted items of one Verify call
    session_ids: frozenset[str]
    tokens: int  # tokens this call feeds through the model (new + draft, summed)
    arrived: float  # event-loop time
    future: asyncio.Future[_PassResult]
    passed_over: bool = False  # left out of a full forward: it has waited its turn already
    trace_parent: Any = None  # the caller's context (its server span) when tracing is on
    caller: str | None = None  # who sent it (the gRPC peer), None when unknown


def _tokens_of(item: VerifyItem) -> int:
    return len(item.new_tokens) + len(item.draft_tokens)


# Calls in a row from one caller, each arriving with nothing else queued or running, after which
# that caller's calls stop waiting for company (see VerifyBatcher.submit).
LONE_CALLS_BEFORE_NOT_WAITING = 8


class VerifyBatcher:
    def __init__(
        self,
        core: VerifierCore,
        *,
        batch_wait_s: float = 0.002,
        max_batch_tokens: int = 1024,
        max_batch_sessions: int | None = None,
    ) -> None:
        self.core = core
        self.batch_wait_s = batch_wait_s
        # A verifier with one scheduler (one caller, one call at a time) has no company to wait
        # for: every call waited the whole window for nothing (2 ms a round by default, a fifth
        # of a one-session round of an 8B model on an H200). The lone caller and its streak.
        self._lone_caller: str | None = None
        self._lone_calls = 0
        self.num_waits_skipped = 0
        self.max_batch_tokens = max_batch_tokens
        # One forward can hold at most one session per KV slot (else allocation would fail
        # for everybody in the pass).
        self.max_batch_sessions = max_batch_sessions or core.runner.cache.num_slots
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="verifier-forward", initializer=model_thread_initializer(core))
        self._queue: collections.deque[_Call] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = 0
        self._queue_depth = metrics.GaugeShare(metrics.VERIFIER_QUEUE_DEPTH)
        self._active_sessions = metrics.GaugeShare(metrics.VERIFIER_ACTIVE_SESSIONS)
        self._snapshot = self._measure_load()
        # Records, for stats and tests.
        self.num_forwards = 0
        self.batch_tokens_history: collections.deque[int] = collections.deque(maxlen=HISTORY_LENGTH)
        self.calls_per_forward_history: collections.deque[int] = collections.deque(maxlen=HISTORY_LENGTH)

    # ---- public API ------------------------------------------------------------------------
    async def submit(self, items: Sequence[VerifyItem], caller: str | None = None) -> CallOutcome:
        """Verify one call's items, merged with whatever other calls arrive meanwhile.

        caller: who sends it (the gRPC peer). Once LONE_CALLS_BEFORE_NOT_WAITING calls in a
        row came from this caller, each finding nothing else queued or running, its calls no
        longer wait for company; a call of another caller, an unknown one (None) or one that
        overlaps another call ends that at once.

        Raises InvalidRequestError (before anything is queued) when the call is malformed.
        """
        if self._closed:
            raise BatcherClosedError("the verifier is shutting down")
        items = list(items)
        runner = self.core.runner
        refusals = validate_call(items, runner.vocab_size, runner.max_tokens, self.max_batch_sessions)
        admitted = [item for item, refusal in zip(items, refusals) if refusal is None]
        if not admitted:
            return CallOutcome(list(refusals), 0.0, 0)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        call = _Call(
            items=admitted,
            session_ids=frozenset(item.session_id for item in admitted),
            tokens=sum(_tokens_of(item) for item in admitted),
            arrived=loop.time(),
            future=loop.create_future(),
            trace_parent=otel_context.get_current() if telemetry.enabled() else None,
            caller=caller,
        )
        self._note_caller(caller)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="verify-batcher")
        self._in_flight += 1
        try:
            self._queue.append(call)
            self._queue_depth.set(len(self._queue))
            self._wake.set()
            passed = await call.future  # a cancelled caller cancels the future: it is skipped
        finally:
            self._in_flight -= 1
        served = iter(passed.results)
        results = [refusal if refusal is not None else next(served) for refusal in refusals]
        return CallOutcome(results, passed.forward_seconds, passed.batch_tokens)

    async def release(self, session_ids: Sequence[str]) -> int:
        """Drop sessions' KV caches; returns how many were held. Unknown ids are ignored."""
        return await self.run_exclusive(self.core.release, list(session_ids))

    async def evict_idle(self) -> list[str]:
        """Drop sessions idle longer than the core's TTL; returns their ids."""
        return await self.run_exclusive(self.core.slots.evict_idle)

    async def run_exclusive(self, function: Callable[..., T], *args: object) -> T:
        """Run `function(*args)` on the worker thread, between forwards (e.g. profiling)."""
        if self._closed:
            raise BatcherClosedError("the verifier is shutting down")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._job, function, args)

    def load(self) -> LoadSnapshot:
        return dataclasses.replace(self._snapshot, in_flight=self._in_flight)

    async def close(self) -> None:
        """Stop taking work; queued calls fail, a forward already running finishes in the background."""
        if self._closed:
            return
        self._closed = True
        self._queue_depth.clear()
        self._active_sessions.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue:
            call = self._queue.popleft()
            if not call.future.done():
                call.future.set_exception(BatcherClosedError("the verifier is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- worker thread -----------------------------------------------------------------------
    def _job(self, function: Callable[..., T], args: tuple) -> T:
        try:
            return function(*args)
        finally:
            self._snapshot = self._measure_load()

    def _measure_load(self) -> LoadSnapshot:
        slots = self.core.slots
        cache = self.core.runner.cache
        cached = sum(slots.cached_length(session_id) for session_id in slots.session_ids())
        if not self._closed:
            self._active_sessions.set(len(slots))
        return LoadSnapshot(len(slots), cached, cache.num_slots * cache.max_tokens)

    def _verify(self, items: list[VerifyItem]) -> _PassResult:
        start = time.perf_counter()
        results = self.core.verify(items)
        seconds = time.perf_counter() - start
        slots = self.core.slots
        # A miss tells the caller what we do hold, so it can resend the least history. Every
        # held position is committed (rejected drafts are truncated after each verify).
        results = [
            dataclasses.replace(r, num_cached_tokens=slots.cached_length(r.session_id) if r.session_id in slots else 0)
            if r.cache_miss else r
            for r in results
        ]
        tokens = sum(_tokens_of(item) for item, r in zip(items, results) if not r.cache_miss)
        return _PassResult(results, seconds, tokens)

    # ---- the merging loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._wait_for_company()
            batch = self._take_batch()
            if batch:
                await self._forward(batch)

    def _drop_cancelled(self) -> None:
        self._queue = collections.deque(call for call in self._queue if not call.future.done())

    def _note_caller(self, caller: str | None) -> None:
        alone = caller is not None and self._in_flight == 0 and not self._queue
        if alone and caller == self._lone_caller:
            self._lone_calls += 1
        else:
            self._lone_caller, self._lone_calls = (caller, 1) if alone else (None, 0)

    def _company_is_possible(self, head: _Call) -> bool:
        return not (head.caller is not None and head.caller == self._lone_caller
                    and self._lone_calls > LONE_CALLS_BEFORE_NOT_WAITING)

    def _batch_is_full(self) -> bool:
        """True when waiting longer cannot grow the next forward."""
        tokens, sessions = 0, set()
        for call in self._queue:
            if call.session_ids & sessions:
                return True  # this call has to wait for the next forward anyway
            tokens += call.tokens
            sessions |= call.session_ids
            if tokens >= self.max_batch_tokens or len(sessions) >= self.max_batch_sessions:
                return True
        return False

    async def _wait_for_company(self) -> None:
        """Wait up to batch_wait_s after the oldest queued call for more calls to merge with."""
        loop = asyncio.get_running_loop()
        self._drop_cancelled()
        if not self._queue or self._queue[0].passed_over:
            return  # a call never waits twice
        if not self._company_is_possible(self._queue[0]):
            self.num_waits_skipped += 1
            return
        await wait_for_company(self._wake, self._queue[0].arrived + self.batch_wait_s, loop.time,
                               self._batch_is_full)

    def _take_batch(self) -> list[_Call]:
        """The longest FIFO prefix of the queue that fits one forward."""
        self._drop_cancelled()
        batch: list[_Call] = []
        tokens, sessions = 0, set()
        while self._queue:
            call = self._queue[0]
            if batch and (
                call.session_ids & sessions
                or tokens + call.tokens > self.max_batch_tokens
                or len(sessions) + len(call.session_ids) > self.max_batch_sessions
            ):
                for left in self._queue:
                    left.passed_over = True
                break
            self._queue.popleft()
            batch.append(call)
            tokens += call.tokens
            sessions |= call.session_ids
        self._queue_depth.set(len(self._queue))
        return batch

    async def _forward(self, batch: list[_Call]) -> None:
        items = [item for call in batch for item in call.items]
        now = asyncio.get_running_loop().time()
        queue_wait = max(now - call.arrived for call in batch)
        for call in batch:
            metrics.VERIFIER_QUEUE_WAIT.observe(now - call.arrived)
        span = _start_batch_span(batch, items, queue_wait) if telemetry.enabled() else None
        try:
            passed = await self.run_exclusive(self._verify, items)
        except asyncio.CancelledError:  # close() while this forward ran: nobody may hang
            _end_batch_span(span, error="cancelled: the verifier is shutting down")
            for call in batch:
                _settle(call.future, error=BatcherClosedError("the verifier is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - handed to the callers
            _end_batch_span(span, error=f"{type(error).__name__}: {error}")
            if len(batch) > 1:
                # Isolation: retry each call alone so only the call at fault fails. Retrying is
                # safe: every item restates its cached length, and sync rolls the slot back to it.
                log.warning("merged forward of %d calls failed (%s); retrying them one by one", len(batch), error)
                for call in batch:
                    await self._forward([call])
                return
            _settle(batch[0].future, error=error)
            return
        self.num_forwards += 1
        self.batch_tokens_history.append(passed.batch_tokens)
        self.calls_per_forward_history.append(len(batch))
        _record_batch(span, items, passed)
        start = 0
        for call in batch:
            end = start + len(call.items)
            _settle(call.future, _PassResult(passed.results[start:end], passed.forward_seconds, passed.batch_tokens))
            start = end


def _start_batch_span(batch: list[_Call], items: list[VerifyItem], queue_wait_s: float) -> trace.Span:
    """The forward's span: a child of the first merged call's server span, linked to the round
    span of every session in the batch (their contexts came in VerifyItem.trace_context)."""
    links = telemetry.links_to(
        (item.trace_context, {"specmesh.session.id": item.session_id,
                              "specmesh.round.verify_length": len(item.draft_tokens)})
        for item in items)
    return telemetry.tracer("verifier").start_span(BATCH_SPAN, context=batch[0].trace_parent, links=links, attributes={
        "specmesh.batch.sessions": len(items),
        "specmesh.batch.calls": len(batch),
        "specmesh.batch.draft_tokens": sum(len(item.draft_tokens) for item in items),
        "specmesh.batch.queue_wait_s": queue_wait_s,
        "specmesh.batch.session_ids": [item.session_id for item in items],
    })


def _end_batch_span(span: trace.Span | None, error: str) -> None:
    if span is not None:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()


def _record_batch(span: trace.Span | None, items: list[VerifyItem], passed: _PassResult) -> None:
    misses = sum(1 for r in passed.results if r.cache_miss)
    metrics.VERIFIER_BATCH_TOKENS.observe(passed.batch_tokens)
    metrics.VERIFIER_BATCH_SESSIONS.observe(len(items))
    metrics.VERIFIER_FORWARD_SECONDS.observe(passed.forward_seconds)
    if misses:
        metrics.VERIFIER_CACHE_MISSES.inc(misses)
    if span is not None:
        span.set_attributes({
            "specmesh.batch.tokens": passed.batch_tokens,
            "specmesh.batch.forward_s": passed.forward_seconds,
            "specmesh.batch.accepted_tokens": sum(r.accepted_count for r in passed.results if not r.cache_miss),
            "specmesh.batch.cache_misses": misses,
        })
        span.end()


def _settle(future: asyncio.Future, result: _PassResult | None = None, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away (cancelled); its session state is a cache, so no harm
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
