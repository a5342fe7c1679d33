"""One scheduler connection's Draft stream, without gRPC: requests in, tagged answers out.

The scheduler multiplexes its sessions over one long-lived stream. Each sync is answered by
exactly one chunk (last = true) tagged with the sync's sequence number; a batch of syncs (one
scheduler round) by one answer holding an outcome per sync; releases are not answered.
Requests are handed to the shared DraftWorker in the order they arrive, which batches them
with every other open stream's and keeps a stream's requests in order.

Closing a stream (the scheduler went away or reconnects) drops its unanswered work but no
session state: sessions belong to the scheduler, which may resume them on another stream, and
are freed by Release, by eviction, or by the idle TTL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator

from drafter.draft_worker import DraftWorker, SyncOutcome, SyncStatus
from specmesh.records import DraftChunk, DraftRequest


@dataclass(frozen=True)
class SyncMessage:
    sequence: int
    request: DraftRequest


@dataclass(frozen=True)
class ReleaseMessage:
    sequence: int
    session_id: str


@dataclass(frozen=True)
class SyncBatchMessage:
    """Several sessions' syncs in one message. An entry is a request, or the error text of a
    sync that could not be read (answered INVALID in its place, the others are served)."""

    sequence: int
    entries: tuple[DraftRequest | BadMessage, ...]


@dataclass(frozen=True)
class BadMessage:
    """A request that could not be read (no kind, invalid fields): answered INVALID alone."""

    sequence: int
    session_id: str
    error_message: str


StreamMessage = SyncMessage | SyncBatchMessage | ReleaseMessage | BadMessage


@dataclass(frozen=True)
class StreamAnswer:
    sequence: int
    outcome: SyncOutcome
    # The draft distributions travel only for sampled requests: greedy verification ignores q.
    include_distributions: bool


@dataclass(frozen=True)
class BatchAnswer:
    """The answer to a SyncBatchMessage: one StreamAnswer per entry, in the batch's order."""

    sequence: int
    answers: tuple[StreamAnswer, ...]


class DraftStream:
    def __init__(self, worker: DraftWorker) -> None:
        self._worker = worker
        self._answers: asyncio.Queue[StreamAnswer | BatchAnswer | None] = asyncio.Queue()
        self._outstanding = 0  # syncs handed to the worker and not answered yet
        self._input_done = False
        self._closed = False
        self._finished = False

    @property
    def closed(self) -> bool:
        return self._closed

    def receive(self, message: StreamMessage) -> None:
        """Take the next request of the stream (call in arrival order)."""
        if self._closed or self._input_done:
            return
        if isinstance(message, SyncMessage):
            self._outstanding += 1
            include_q = not message.request.params.greedy

            def deliver(outcome: SyncOutcome, sequence: int = message.sequence) -> None:
                self._outstanding -= 1
                self._answer(StreamAnswer(sequence, outcome, include_q))
                self._finish_if_done()

            self._worker.submit_sync(message.request, deliver, lambda: self._closed)
        elif isinstance(message, SyncBatchMessage):
            self._receive_batch(message)
        elif isinstance(message, ReleaseMessage):
            released = self._worker.submit_release([message.session_id])
            # Nobody waits for a stream release; mark a shutdown error as seen.
            released.add_done_callback(lambda f: f.cancelled() or f.exception())
        else:
            self._answer(_invalid(message.sequence, message))

    def _receive_batch(self, message: SyncBatchMessage) -> None:
        answers: list[StreamAnswer | None] = [None] * len(message.entries)
        waiting = sum(1 for entry in message.entries if isinstance(entry, DraftRequest))
        if waiting == 0:
            answers = [_invalid(message.sequence, entry) for entry in message.entries]
            self._answer(BatchAnswer(message.sequence, tuple(answers)))
            return
        self._outstanding += 1
        remaining = [waiting]

        def deliver(outcome: SyncOutcome, index: int, include_q: bool) -> None:
            answers[index] = StreamAnswer(message.sequence, outcome, include_q)
            remaining[0] -= 1
            if remaining[0] == 0:
                self._outstanding -= 1
                self._answer(BatchAnswer(message.sequence, tuple(answers)))
                self._finish_if_done()

        requests = []
        for index, entry in enumerate(message.entries):
            if isinstance(entry, DraftRequest):
                requests.append((entry, lambda outcome, i=index, q=not entry.params.greedy: deliver(outcome, i, q)))
            else:
                answers[index] = _invalid(message.sequence, entry)
        # The whole batch is here: the worker drafts it at once instead of waiting for company.
        self._worker.submit_syncs(requests, lambda: self._closed)

    def end_of_input(self) -> None:
        """The scheduler will send nothing more: finish once every sync is answered."""
        self._input_done = True
        self._finish_if_done()

    def close(self) -> None:
        """The stream is gone: drop unanswered work (session state stays)."""
        self._closed = True
        self._finish()

    async def answers(self) -> AsyncIterator[StreamAnswer | BatchAnswer]:
        while True:
            answer = await self._answers.get()
            if answer is None:
                return
            yield answer

    def _answer(self, answer: StreamAnswer | BatchAnswer) -> None:
        if not self._closed:
            self._answers.put_nowait(answer)

    def _finish_if_done(self) -> None:
        if self._input_done and self._outstanding == 0:
            self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._answers.put_nowait(None)


def _invalid(sequence: int, message: BadMessage) -> StreamAnswer:
    chunk = DraftChunk(message.session_id, 0)
    return StreamAnswer(sequence, SyncOutcome(SyncStatus.INVALID, chunk, message.error_message), False)
