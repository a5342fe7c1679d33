"""The speculation loop: every round, draft for all active sessions, verify them in one batch,
commit, and stream what was committed. Sessions join and leave between rounds (continuous
batching). Backends may be local or remote; the loop only sees records.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Sequence

from scheduler.backends import DraftBackend, VerifyBackend
from scheduler.draft_policy import DraftLengthPolicy
from scheduler.session import Commit, Session
from specmesh.records import DraftChunk

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    session: Session
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)


class SpeculationLoop:
    def __init__(
        self,
        verifier: VerifyBackend,
        drafter: DraftBackend | None,
        policy: DraftLengthPolicy,
        context_limit: int,
        max_batch_sessions: int = 64,
    ) -> None:
        self.verifier = verifier
        self.drafter = drafter
        self.policy = policy
        self.context_limit = context_limit
        self.max_batch_sessions = max_batch_sessions
        self._entries: dict[str, _Entry] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._to_release: list[str] = []
        self.num_rounds = 0

    @property
    def num_sessions(self) -> int:
        return len(self._entries)

    async def stream(self, session: Session) -> AsyncIterator[Commit]:
        """Run one session to completion, yielding each round's commit. Closing the iterator
        early (client gone) cancels the session and frees its state at drafter and verifier."""
        if session.session_id in self._entries:
            raise ValueError(f"session {session.session_id!r} is already running")
        entry = _Entry(session)
        self._entries[session.session_id] = entry
        self._ensure_running()
        self._wakeup.set()
        try:
            while True:
                item = await entry.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not session.finished:
                session.cancel()
                self._wakeup.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="speculation-loop")

    async def _run(self) -> None:
        while True:
            await self._release_finished()
            live = [e for e in self._entries.values() if not e.session.finished]
            if not live:
                self._wakeup.clear()
                if not self._entries:
                    await self._wakeup.wait()
                continue
            try:
                await self.run_round(live[: self.max_batch_sessions])
            except Exception as error:  # noqa: BLE001 - delivered to every session in the round
                log.exception("speculation round failed")
                for entry in live[: self.max_batch_sessions]:
                    entry.session.cancel()
                    entry.outbox.put_nowait(error)
            # Rotate so sessions beyond max_batch_sessions get their turn.
            for entry in live[: self.max_batch_sessions]:
                if entry.session.session_id in self._entries:
                    self._entries[entry.session.session_id] = self._entries.pop(entry.session.session_id)
            await asyncio.sleep(0)

    async def _release_finished(self) -> None:
        done = [sid for sid, e in self._entries.items() if e.session.finished]
        for sid in done:
            del self._entries[sid]
        if not done:
            return
        if self.drafter is not None:
            try:
                await self.drafter.release(done)
            except Exception:  # noqa: BLE001 - a drafter that cannot release will evict by TTL
                log.warning("drafter release failed for %d sessions", len(done))
        await self.verifier.release(done)

    async def run_round(self, entries: Sequence[_Entry]) -> None:
        sessions = [e.session for e in entries]
        lengths = self.policy.draft_lengths(sessions, self.context_limit)
        chunks = await self._draft(sessions, lengths)
        items = [s.verify_item(chunks.get(s.session_id), lengths[s.session_id]) for s in sessions]
        results = await self.verifier.verify(items)
        self.num_rounds += 1
        for entry, item, result in zip(entries, items, results):
            session = entry.session
            if session.finished:  # cancelled while the round was in flight
                continue
            commit = session.commit(item, result, chunks.get(session.session_id))
            if commit.token_ids or commit.finish_reason:
                entry.outbox.put_nowait(commit)

    async def _draft(self, sessions: Sequence[Session], lengths: dict[str, int]) -> dict[str, DraftChunk]:
        wanted = [s for s in sessions if lengths[s.session_id] > 0]
        if self.drafter is None or not wanted:
            return {}
        requests = [s.draft_request(lengths[s.session_id]) for s in wanted]
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
