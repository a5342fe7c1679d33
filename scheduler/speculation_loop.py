"""The speculation loop: every round, draft for all active sessions, verify them in one batch,
commit, and stream what was committed. Sessions join and leave between rounds (continuous
batching). Backends may be local or remote; the loop only sees records.

Lanes (pipelining): with `lanes` > 1 and enough sessions, the sessions are split between
lanes that run their rounds concurrently, so one lane's drafting, RPCs and bookkeeping overlap
another lane's verification. A session is in at most one round at a time, whichever lane runs
it, so its tokens are exactly those of a single lane. The price is smaller verify batches; the
verifier merges calls that arrive together, so lanes cost little when it is the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from typing import Callable

from scheduler.backends import BackendUnavailable, DraftBackend, VerifyBackend
from scheduler.draft_policy import DraftLengthPolicy, RoundOutcome
from scheduler.round_tracing import RoundTrace
from scheduler.session import Commit, Session
from specmesh.metrics import SCHEDULER_QUEUE_DEPTH, GaugeShare
from specmesh.records import DraftChunk

log = logging.getLogger(__name__)


@dataclass
class SessionEntry:
    """A running session and the queue its consumer reads commits (or an error) from."""

    session: Session
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Telemetry (scheduler/round_tracing.py): the session span (None when tracing is off),
    # when the session last became ready for a round, and how many rounds it started.
    span: Any = None
    ready_at: float = 0.0
    rounds_started: int = 0


async def drain(entry: SessionEntry) -> AsyncIterator[Commit]:
    """Yield a session's commits until it finishes; an error delivered to it is raised."""
    while True:
        item = await entry.outbox.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


# Called with the entries of a round whose verifier became unreachable; they have already
# been removed from this loop, and the callee re-homes them (or fails them).
VerifierLostCallback = Callable[["SpeculationLoop", list[SessionEntry], BackendUnavailable], None]


class SpeculationLoop:
    def __init__(
        self,
        verifier: VerifyBackend,
        drafter: DraftBackend | None,
        policy: DraftLengthPolicy,
        context_limit: int,
        max_batch_sessions: int = 64,
        on_verifier_lost: VerifierLostCallback | None = None,
        lanes: int = 1,
        lane_min_sessions: int = 8,
    ) -> None:
        """lanes: rounds in flight at once; a lane takes its share of the sessions only when
        every lane would get at least lane_min_sessions (fewer sessions run as one batch)."""
        if lanes < 1 or lane_min_sessions < 1:
            raise ValueError(f"lanes and lane_min_sessions must be >= 1, got {lanes} and {lane_min_sessions}")
        self.lanes = lanes
        self.lane_min_sessions = lane_min_sessions
        self.on_verifier_lost = on_verifier_lost
        self.verifier = verifier
        self.drafter = drafter
        self.policy = policy
        self.context_limit = context_limit
        self.max_batch_sessions = max_batch_sessions
        self._entries: dict[str, SessionEntry] = {}
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._in_flight: set[str] = set()  # sessions in some lane's round
        self.num_rounds = 0
        self._queue_depth = GaugeShare(SCHEDULER_QUEUE_DEPTH)

    @property
    def num_sessions(self) -> int:
        return len(self._entries)

    async def stream(self, session: Session) -> AsyncIterator[Commit]:
        """Run one session to completion, yielding each round's commit. Closing the iterator
        early (client gone) cancels the session and frees its state at drafter and verifier."""
        entry = SessionEntry(session)
        self.adopt(entry)
        try:
            async for commit in drain(entry):
                yield commit
        finally:
            if not session.finished:
                session.cancel()
                self.wake()

    def adopt(self, entry: SessionEntry) -> None:
        """Run this entry's session here (a new session, or one moved from a lost verifier)."""
        if entry.session.session_id in self._entries:
            raise ValueError(f"session {entry.session.session_id!r} is already running")
        self._entries[entry.session.session_id] = entry
        entry.ready_at = time.perf_counter()
        self._ensure_running()
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    def detach_idle(self) -> list[SessionEntry]:
        """Remove and return every live session not in a round now (this loop's verifier is
        gone; sessions in another lane's round are detached when that round fails too)."""
        entries = [e for sid, e in self._entries.items() if not e.session.finished and sid not in self._in_flight]
        for entry in entries:
            del self._entries[entry.session.session_id]
        return entries

    async def close(self) -> None:
        self._queue_depth.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                pass
        self._tasks = []

    def _ensure_running(self) -> None:
        self._tasks = [task for task in self._tasks if not task.done()]
        while len(self._tasks) < self.lanes:
            # A fresh context: the loop serves every session, so it must not inherit the trace
            # context (session span) of whichever request happened to start it.
            self._tasks.append(asyncio.get_running_loop().create_task(
                self._run(), name=f"speculation-lane-{len(self._tasks)}", context=contextvars.Context()))

    def _take_round(self) -> list[SessionEntry]:
        """The sessions of the next round of a lane: idle ones, up to the lane's share."""
        live = [e for e in self._entries.values() if not e.session.finished]
        self._queue_depth.set(max(len(live) - self.max_batch_sessions, 0))
        # The oldest sessions run until they finish; later ones wait their turn (rotating
        # instead would make every group evict the previous one's KV state each round).
        eligible = live[: self.max_batch_sessions]
        lanes = min(self.lanes, max(len(eligible) // self.lane_min_sessions, 1))
        share = -(-len(eligible) // lanes)
        return [e for e in eligible if e.session.session_id not in self._in_flight][:share]

    async def _run(self) -> None:
        while True:
            await self._release_finished()
            entries = self._take_round()
            if not entries:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            ids = [e.session.session_id for e in entries]
            self._in_flight.update(ids)
            try:
                await self.run_round(entries)
            except BackendUnavailable as error:
                self._in_flight.difference_update(ids)
                if self.on_verifier_lost is None:
                    for entry in entries:
                        entry.session.cancel()
                        entry.outbox.put_nowait(error)
                else:
                    self.on_verifier_lost(self, self.detach_idle(), error)
                    continue
            except Exception as error:  # noqa: BLE001 - delivered to every session in the round
                log.exception("speculation round failed")
                for entry in entries:
                    entry.session.cancel()
                    entry.outbox.put_nowait(error)
            finally:
                self._in_flight.difference_update(ids)
                self._wakeup.set()  # other lanes may take what this round freed
            await asyncio.sleep(0)

    async def _release_finished(self) -> None:
        # Never a session in a round: its release would race that round's Verify.
        done = [sid for sid, e in self._entries.items() if e.session.finished and sid not in self._in_flight]
        for sid in done:
            del self._entries[sid]
        if not done:
            return
        if self.drafter is not None:
            try:
                await self.drafter.release(done)
            except Exception:  # noqa: BLE001 - a drafter that cannot release will evict by TTL
                log.warning("drafter release failed for %d sessions", len(done))
        try:
            await self.verifier.release(done)
        except Exception:  # noqa: BLE001 - a lost verifier holds nothing worth releasing
            log.warning("verifier release failed for %d sessions", len(done))

    async def run_round(self, entries: Sequence[SessionEntry]) -> None:
        sessions = [e.session for e in entries]
        record = RoundTrace(entries, getattr(self.verifier, "endpoint", ""))
        error: BaseException | None = None
        prefill: asyncio.Task | None = None
        try:
            lengths = self.policy.draft_lengths(sessions, self.context_limit)
            # A session's first round verifies (prefills) its prompt anyway. Drafting for it first
            # would put the drafter's prefill of the prompt on the round's critical path (time to
            # first token, and every other session's round): the drafter prefills it while the
            # verifier does, and drafting starts next round. The prefill drafts one token (its
            # own logits give it), which the drafter keeps if the verifier's token confirms it.
            cold = [s for s in sessions if lengths[s.session_id] > 0 and s.drafter_cold]
            if cold and self.drafter is not None:
                lengths = {**lengths, **{s.session_id: 0 for s in cold}}
            chunks = await self._draft(sessions, lengths, record)
            if cold and self.drafter is not None:
                prefill = asyncio.ensure_future(self._draft(cold, {s.session_id: 1 for s in cold}))
            record.drafted(lengths, chunks)
            verify_lengths = self.policy.verify_lengths(sessions, chunks, lengths)
            items = [s.verify_item(chunks.get(s.session_id), verify_lengths.get(s.session_id, 0)) for s in sessions]
            if record.carriers:
                items = [dataclasses.replace(i, trace_context=record.carrier(i.session_id)) for i in items]
            record.planned(items, self.policy)
            with record.verifying():
                results = await self.verifier.verify(items)
            if prefill is not None:
                chunks = {**chunks, **await prefill}
            self.num_rounds += 1
            outcomes = []
            for entry, item, result in zip(entries, items, results):
                session = entry.session
                chunk = chunks.get(session.session_id)
                outcomes.append(RoundOutcome(chunk, item, result))
                if session.finished:  # cancelled while the round was in flight
                    continue
                commit = session.commit(item, result, chunk)
                record.committed(item, result, commit)
                if commit.token_ids or commit.finish_reason:
                    entry.outbox.put_nowait(commit)
        except BaseException as caught:
            error = caught
            raise
        finally:
            if prefill is not None and not prefill.done():
                prefill.cancel()
            record.end(error)
        await self.policy.observe(outcomes)

    async def _draft(self, sessions: Sequence[Session], lengths: dict[str, int],
                     record: RoundTrace | None = None) -> dict[str, DraftChunk]:
        wanted = [s for s in sessions if lengths[s.session_id] > 0]
        if self.drafter is None or not wanted:
            return {}
        requests = [s.draft_request(lengths[s.session_id]) for s in wanted]
        if record is not None and record.carriers:
            requests = [dataclasses.replace(r, trace_context=record.carrier(r.session_id)) for r in requests]
        try:
            chunks = await self.drafter.draft(requests)
        except Exception:  # noqa: BLE001 - drafters accelerate, they are never a dependency
            log.warning("drafter failed; verifying without drafts this round", exc_info=True)
            for session in wanted:
                session.note_drafter_lost()
            return {}
        by_id = {}
        for session, chunk in zip(wanted, chunks):
            if chunk.cache_miss:
                session.note_drafter_lost()
            by_id[session.session_id] = chunk
        return by_id
