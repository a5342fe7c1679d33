"""A drafter replica over gRPC: one bidirectional Draft stream per scheduler connection.

A round's syncs are written as one message (DraftSyncBatch) with an increasing sequence number;
a reader task collects the answer (one chunk holding an answer per sync). A broken stream fails
every pending sync with BackendUnavailable and is reopened on next use. Drafts are optional: a
slow answer is abandoned after a timeout and the round proceeds without drafts for those
sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Sequence

from grpc import aio

from scheduler import convert
from scheduler.backends import BackendUnavailable
from scheduler.remote_replica import RemoteReplica
from specmesh.records import DraftChunk, DraftRequest
from specmesh.v1 import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger(__name__)


class RemoteDrafter(RemoteReplica):
    def __init__(self, endpoint: str, timeout_s: float, prompt_lengths: dict[str, int]) -> None:
        self.timeout_s = timeout_s
        self._prompt_lengths = prompt_lengths
        super().__init__(endpoint, drafter_pb2_grpc.DrafterStub)
        self._call: aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._sequence = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, list[drafter_pb2.DraftChunk]]] = {}
        # One write at a time on the stream: several speculation loops (one per verifier) draft
        # through the same drafter concurrently, and gRPC refuses overlapping writes
        # (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS), which would look like a lost drafter.
        self._write_lock = asyncio.Lock()

    def _ensure_stream(self) -> aio.StreamStreamCall:
        if self._call is None or self._call.done():
            self._call = self._stub.Draft()
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        return self._call

    async def _read(self, call: aio.StreamStreamCall) -> None:
        error: BaseException | None = None
        try:
            while True:
                message = await call.read()
                if message is aio.EOF:
                    break
                waiting = self._pending.get(message.sequence)
                if waiting is None:
                    continue  # an answer we stopped waiting for
                future, parts = waiting
                parts.append(message)
                if message.last and not future.done():
                    future.set_result(parts)
                    del self._pending[message.sequence]
        except asyncio.CancelledError:
            error = BackendUnavailable(self.endpoint, "draft stream closed")
        except aio.AioRpcError as rpc_error:
            error = BackendUnavailable(self.endpoint, f"draft stream broke: {rpc_error.code().name}")
        except Exception as other:  # noqa: BLE001 - any reader failure means the stream is gone
            error = BackendUnavailable(self.endpoint, f"draft stream failed: {other!r}")
        finally:
            failure = error or BackendUnavailable(self.endpoint, "draft stream ended")
            for future, _ in self._pending.values():
                if not future.done():
                    future.set_exception(failure)
            self._pending.clear()
            if self._call is call:
                self._call = None

    async def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        """Draft for a round's sessions with one stream message (DraftSyncBatch) and one answer."""
        if not requests:
            return []
        call = self._ensure_stream()
        future = asyncio.get_running_loop().create_future()
        sequence = next(self._sequence)
        self._pending[sequence] = (future, [])
        generated = [max(r.num_cached_tokens + len(r.new_tokens) - self._prompt_lengths.get(r.session_id, 0), 0)
                     for r in requests]
        try:
            async with self._write_lock:
                await call.write(convert.draft_batch_request(requests, sequence, generated))
        except (aio.AioRpcError, asyncio.InvalidStateError, RuntimeError) as error:
            self._abandon([(sequence, future)])
            raise BackendUnavailable(self.endpoint, f"cannot write to draft stream: {error!r}")
        done, _ = await asyncio.wait([future], timeout=self.timeout_s)
        if not done:
            # Too slow this round: verify without drafts; our belief of its caches is unchanged.
            self._abandon([(sequence, future)])
            return [DraftChunk(r.session_id, r.num_cached_tokens + len(r.new_tokens),
                               num_cached_tokens=r.num_cached_tokens) for r in requests]
        if future.exception() is not None:
            raise future.exception()
        parts = future.result()
        return convert.draft_batch_chunks(parts[-1], requests)

    def _abandon(self, waits: list[tuple[int, asyncio.Future]]) -> None:
        for sequence, future in waits:
            self._pending.pop(sequence, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark retrieved

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        await super().close()
