"""What the speculation loop needs from a drafter and a verifier, wherever they run.

In one process these wrap the drafter/verifier cores directly; across the network they are
gRPC clients. The loop cannot tell the difference, which is what keeps the output identical.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, Sequence

from specmesh.records import DraftChunk, DraftRequest, VerifyItem, VerifyResult


class BackendUnavailable(Exception):
    """A drafter or verifier replica cannot be reached (or broke its stream). The scheduler
    reacts by moving sessions, never by failing them while another replica exists."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(f"{endpoint}: {message}")
        self.endpoint = endpoint


class DraftBackend(Protocol):
    async def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]: ...

    async def release(self, session_ids: Sequence[str]) -> None: ...


class VerifyBackend(Protocol):
    async def verify(self, items: Sequence[VerifyItem]) -> list[VerifyResult]: ...

    async def release(self, session_ids: Sequence[str]) -> None: ...


class LocalDraftBackend:
    """A drafter core in this process. Its compute runs in a worker thread (torch releases the
    GIL), one call at a time, so the event loop keeps serving while it drafts."""

    def __init__(self, core) -> None:  # drafter.drafting.Drafter
        self.core = core
        self._lock = asyncio.Lock()

    async def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        async with self._lock:
            return await asyncio.to_thread(self.core.draft, list(requests))

    async def release(self, session_ids: Sequence[str]) -> None:
        async with self._lock:
            self.core.release(list(session_ids))


class LocalVerifyBackend:
    def __init__(self, core) -> None:  # verifier.verification.VerifierCore
        self.core = core
        self._lock = asyncio.Lock()

    async def verify(self, items: Sequence[VerifyItem]) -> list[VerifyResult]:
        async with self._lock:
            return await asyncio.to_thread(self.core.verify, list(items))

    async def release(self, session_ids: Sequence[str]) -> None:
        async with self._lock:
            self.core.release(list(session_ids))
