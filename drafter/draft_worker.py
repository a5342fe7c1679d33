"""The replica's one worker: every call into the drafter core runs here, one at a time.

- Micro-batching: syncs from all open streams wait in one FIFO queue; the first waits at most
  `batch_wait_s` for more (or until a batch is full), then one core.draft call serves them all.
  Syncs arriving while a forward runs simply join the next batch.
- A session appears at most once per batch: a second sync for it (and a release of it) waits
  for the next one, so each stream's requests take effect in the order they were sent.
- Draft-ahead (PEARL-style): while no sync waits, sessions whose chunk was just answered are
  extended one token per forward, up to `draft_ahead_tokens` each, so that a sync confirming
  the path is answered without a forward. A new sync for a session stops its ahead work; the
  core keeps what the sync confirms and discards the rest.
- Failures stay per session: a batch the core refuses is retried one request at a time, so a bad
  request answers INVALID alone and the others are served.

Forwards run on one worker thread (the KV cache is not thread-safe; torch releases the GIL, so
the event loop keeps reading streams meanwhile). No gRPC here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from specmesh import metrics, telemetry
from specmesh.batch_window import wait_for_company
from specmesh.errors import CapacityError, InvalidRequestError, SpecmeshError
from specmesh.model_runner import model_thread_initializer
from specmesh.records import DraftChunk, DraftRequest

log = logging.getLogger(__name__)

# How many recent draft batches the history keeps (for stats and tests).
HISTORY_LENGTH = 1024
# One span per answered sync, child of the scheduler's round span (DraftSync.trace_context).
DRAFT_SPAN = "specmesh.drafter.draft"


class WorkerClosedError(SpecmeshError):
    """The drafter is shutting down and takes no more work."""


class SyncStatus(enum.Enum):
    OK = "ok"
    CACHE_MISS = "cache_miss"  # the session is not held as the caller believed: resend history
    CAPACITY = "capacity"  # no room for this session now: retry elsewhere or later
    INVALID = "invalid"  # the request itself is wrong: retrying will not help


@dataclass(frozen=True)
class SyncOutcome:
    """The answer to one sync. chunk.base_length is always the committed length; tokens only
    when OK; on CACHE_MISS chunk.num_cached_tokens is the committed prefix still held."""

    status: SyncStatus
    chunk: DraftChunk
    error_message: str = ""


@dataclass(frozen=True)
class WorkerStats:
    active_sessions: int
    cached_tokens: int
    capacity_tokens: int  # 0 when unbounded
    in_flight: int  # sessions in the draft batch running now


@dataclass
class _SyncJob:
    request: DraftRequest
    deliver: Callable[[SyncOutcome], None]  # called on the event loop
    is_cancelled: Callable[[], bool]  # the asker went away: skip the work
    arrived: float
    arrived_ns: int = 0  # wall clock, for the span's start (only when tracing is on)
    # Came with every other sync its sender had (a batch message): waiting for company is
    # pointless, so the worker drafts at once.
    complete: bool = False


@dataclass
class _ReleaseJob:
    session_ids: tuple[str, ...]
    future: asyncio.Future


def _refused(request: DraftRequest, error: Exception) -> SyncOutcome:
    base_length = request.num_cached_tokens + len(request.new_tokens)
    status = SyncStatus.CAPACITY if isinstance(error, CapacityError) else SyncStatus.INVALID
    return SyncOutcome(status, DraftChunk(request.session_id, base_length), str(error))


def _outcome(chunk: DraftChunk) -> SyncOutcome:
    if chunk.cache_miss:
        return SyncOutcome(SyncStatus.CACHE_MISS, chunk,
                           f"session {chunk.session_id!r} does not hold the claimed cached tokens here")
    return SyncOutcome(SyncStatus.OK, chunk)


class DraftWorker:
    def __init__(self, core, *, max_draft_tokens: int, draft_ahead_tokens: int = 0, batch_wait_s: float = 0.002,
                 max_batch_sessions: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = core  # drafter.drafting.Drafter; draft_ahead is used when it has one
        self.max_draft_tokens = max_draft_tokens
        self.draft_ahead_tokens = draft_ahead_tokens if hasattr(core, "draft_ahead") else 0
        self.batch_wait_s = batch_wait_s
        self.max_batch_sessions = max_batch_sessions
        self._clock = clock
        self._queue: collections.deque[_SyncJob | _ReleaseJob] = collections.deque()
        self._queued_syncs: collections.Counter[str] = collections.Counter()
        self._copied_counted = 0  # core.num_copied_tokens already counted in the metrics
        self._ahead: dict[str, int] = {}  # session -> ahead tokens still to draft
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="drafter-model", initializer=model_thread_initializer(core))
        self._task: asyncio.Task | None = None
        self._closed = False
        self._in_flight = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=HISTORY_LENGTH)
        self.num_ahead_steps = 0
        self._queue_depth = metrics.GaugeShare(metrics.DRAFTER_QUEUE_DEPTH)
        self._active_sessions = metrics.GaugeShare(metrics.DRAFTER_ACTIVE_SESSIONS)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="drafter-worker")

    async def close(self) -> None:
        self._closed = True
        self._queue_depth.clear()
        self._active_sessions.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._queue:
            if isinstance(job, _ReleaseJob) and not job.future.done():
                job.future.set_exception(WorkerClosedError("the drafter is shutting down"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_exclusive(self, fn: Callable, *args):
        """Run fn(*args) on the worker thread (for start-up work like profiling)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- submitting work -----------------------------------------------------------------------
    def submit_sync(self, request: DraftRequest, deliver: Callable[[SyncOutcome], None],
                    is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self.submit_syncs([(request, deliver)], is_cancelled, complete=False)

    def submit_syncs(self, syncs: Sequence[tuple[DraftRequest, Callable[[SyncOutcome], None]]],
                     is_cancelled: Callable[[], bool] = lambda: False, complete: bool = True) -> None:
        """Queue syncs of distinct sessions, each answered through its own deliver callback.
        complete: these are all the syncs the sender has for now (a round's batch), so they are
        drafted without waiting for more to join."""
        if self._closed:
            raise WorkerClosedError("the drafter is shutting down")
        arrived, arrived_ns = self._clock(), time.time_ns() if telemetry.enabled() else 0
        for request, deliver in syncs:
            if request.num_draft_tokens > self.max_draft_tokens:
                request = dataclasses.replace(request, num_draft_tokens=self.max_draft_tokens)
            self._ahead.pop(request.session_id, None)  # superseded: the sync decides what stays
            self._queued_syncs[request.session_id] += 1
            self._queue.append(_SyncJob(request, deliver, is_cancelled, arrived, arrived_ns, complete))
        self._queue_depth.set(len(self._queue))
        self._wakeup.set()

    def submit_release(self, session_ids: Sequence[str]) -> asyncio.Future:
        """Queue a release behind earlier syncs of those sessions; the future gives the count."""
        if self._closed:
            raise WorkerClosedError("the drafter is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_ReleaseJob(tuple(session_ids), future))
        self._queue_depth.set(len(self._queue))
        self._wakeup.set()
        return future

    async def release(self, session_ids: Sequence[str]) -> int:
        return await self.submit_release(session_ids)

    def stats(self) -> WorkerStats:
        core = self.core
        return WorkerStats(
            active_sessions=core.num_sessions,
            cached_tokens=int(getattr(core, "cached_tokens", 0)),
            capacity_tokens=int(getattr(core, "capacity_tokens", 0)),
            in_flight=self._in_flight,
        )

    # ---- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                if self._queue:
                    await self._wait_for_batch()
                    batch = self._take_batch()
                    if batch:
                        await self._draft(batch)
                elif self._ahead:
                    await self._ahead_step()
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the worker must outlive any one bad batch
                log.exception("drafter worker loop error")

    async def _wait_for_batch(self) -> None:
        """Give other sessions and streams a bounded moment to join the head sync's batch."""
        head = self._queue[0]
        if not isinstance(head, _SyncJob) or head.complete:
            return
        await wait_for_company(self._wakeup, head.arrived + self.batch_wait_s, self._clock,
                               lambda: len(self._queue) >= self.max_batch_sessions)

    def _take_batch(self) -> list[_SyncJob]:
        """Pop the longest run of queued syncs with distinct sessions; releases met on the way
        run at once unless they concern a session of the batch (then they wait their turn)."""
        batch: list[_SyncJob] = []
        sessions: set[str] = set()
        while self._queue and len(batch) < self.max_batch_sessions:
            job = self._queue[0]
            if isinstance(job, _ReleaseJob):
                if sessions.intersection(job.session_ids):
                    break
                self._queue.popleft()
                self._release_now(job)
                continue
            sid = job.request.session_id
            if sid in sessions:
                break
            self._queue.popleft()
            self._queued_syncs[sid] -= 1
            if self._queued_syncs[sid] <= 0:
                del self._queued_syncs[sid]
            if job.is_cancelled():
                continue
            batch.append(job)
            sessions.add(sid)
        self._queue_depth.set(len(self._queue))
        return batch

    def _release_now(self, job: _ReleaseJob) -> None:
        # Runs on the event loop while no forward is in flight (the loop awaits each one), so it
        # never races the worker thread.
        for sid in job.session_ids:
            self._ahead.pop(sid, None)
        try:
            count = self.core.release(list(job.session_ids))
        except Exception as error:  # noqa: BLE001 - reported to the one caller waiting
            if not job.future.done():
                job.future.set_exception(error)
            return
        if not job.future.done():
            job.future.set_result(count)

    async def _draft(self, batch: list[_SyncJob]) -> None:
        requests = [job.request for job in batch]
        self._in_flight = len(requests)
        self.batch_sizes.append(len(requests))
        started = self._clock()
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._executor, self._draft_batch, requests)
        finally:
            self._in_flight = 0
        forward_s = self._clock() - started
        _record_batch(batch, outcomes, started, forward_s)
        self._record_copies()
        self._active_sessions.set(self.core.num_sessions)
        for job, outcome in zip(batch, outcomes):
            if job.is_cancelled():
                continue
            sid = job.request.session_id
            if (outcome.status is SyncStatus.OK and self.draft_ahead_tokens > 0
                    and sid not in self._queued_syncs):
                # Ahead of what was just sent; tokens the path already holds beyond it count.
                budget = self.draft_ahead_tokens - len(self._ahead_tokens(sid))
                if budget > 0:
                    self._ahead[sid] = budget
            job.deliver(outcome)

    def _record_copies(self) -> None:
        """Count the core's newly copied draft tokens (model drafters with context copying)."""
        copied = int(getattr(self.core, "num_copied_tokens", 0))
        if copied > self._copied_counted:
            metrics.DRAFTER_COPIED_TOKENS.inc(copied - self._copied_counted)
        self._copied_counted = copied

    def _ahead_tokens(self, session_id: str) -> tuple[int, ...]:
        ahead_tokens = getattr(self.core, "ahead_tokens", None)
        return ahead_tokens(session_id) if ahead_tokens is not None else ()

    def _draft_batch(self, requests: list[DraftRequest]) -> list[SyncOutcome]:
        """On the worker thread: one core.draft over the batch, or per request if it refuses."""
        try:
            return [_outcome(chunk) for chunk in self.core.draft(requests)]
        except (InvalidRequestError, CapacityError) as error:
            # Refused before any forward; retrying alone isolates the culprit (syncs are
            # idempotent: the core keeps whatever part of its path a repeated sync confirms).
            if len(requests) == 1:
                return [_refused(requests[0], error)]
            return [self._draft_batch([request])[0] for request in requests]
        except Exception as error:  # noqa: BLE001 - a broken forward must not take the stream down
            log.exception("draft batch of %d sessions failed; dropping their state", len(requests))
            try:
                self.core.release([r.session_id for r in requests])
            except Exception:  # noqa: BLE001
                log.exception("release after a failed draft batch failed too")
            return [
                SyncOutcome(SyncStatus.CACHE_MISS,
                            DraftChunk(r.session_id, r.num_cached_tokens + len(r.new_tokens), cache_miss=True),
                            f"drafter error, session state dropped: {type(error).__name__}: {error}")
                for r in requests
            ]

    async def _ahead_step(self) -> None:
        session_ids = list(self._ahead)[: self.max_batch_sessions]
        self.num_ahead_steps += 1
        try:
            added = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.core.draft_ahead, session_ids, 1)
        except Exception:  # noqa: BLE001 - ahead work is optional
            log.exception("draft-ahead failed for %d sessions", len(session_ids))
            for sid in session_ids:
                self._ahead.pop(sid, None)
            return
        self._record_copies()
        for sid in session_ids:
            if sid not in self._ahead:
                continue  # a sync superseded it meanwhile
            num_added = added.get(sid, 0)
            left = self._ahead[sid] - num_added
            if num_added == 0 or left <= 0:
                del self._ahead[sid]
            else:
                self._ahead[sid] = left


def _record_batch(batch: list[_SyncJob], outcomes: list[SyncOutcome], started: float, forward_s: float) -> None:
    """Metrics of one draft batch, and (tracing on) a span per sync under its round span."""
    metrics.DRAFTER_BATCH_SESSIONS.observe(len(batch))
    tracer = telemetry.tracer("drafter") if telemetry.enabled() else None
    for job, outcome in zip(batch, outcomes):
        queue_wait = max(started - job.arrived, 0.0)
        metrics.DRAFTER_QUEUE_WAIT.observe(queue_wait)
        metrics.DRAFTER_DRAFT_TOKENS.inc(len(outcome.chunk.tokens))
        if outcome.status is SyncStatus.CACHE_MISS:
            metrics.DRAFTER_CACHE_MISSES.inc()
        if tracer is None:
            continue
        request = job.request
        span = tracer.start_span(DRAFT_SPAN, context=telemetry.context_from(request.trace_context),
                                 start_time=job.arrived_ns or None, attributes={
                                     "specmesh.session.id": request.session_id,
                                     "specmesh.draft.requested": request.num_draft_tokens,
                                     "specmesh.draft.tokens": len(outcome.chunk.tokens),
                                     "specmesh.draft.status": outcome.status.value,
                                     "specmesh.draft.batch_size": len(batch),
                                     "specmesh.draft.queue_wait_s": queue_wait,
                                     "specmesh.draft.forward_s": forward_s,
                                     "specmesh.draft.num_cached_tokens": request.num_cached_tokens,
                                     "specmesh.draft.new_tokens": len(request.new_tokens),
                                 })
        if outcome.status in (SyncStatus.INVALID, SyncStatus.CAPACITY):
            span.set_status(telemetry.trace.Status(telemetry.trace.StatusCode.ERROR, outcome.error_message))
        span.end()
