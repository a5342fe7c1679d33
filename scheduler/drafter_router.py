"""Routes each session's draft requests to the drafter replica it is pinned to.

Implements DraftBackend for the speculation loop over a pool of drafters. Sessions are pinned
least-loaded at first use; when a drafter fails, its sessions are unpinned and get CACHE_MISS
chunks this round, so their next request carries the full history to a new drafter. (A session
re-pinned for another reason meets a drafter that answers CACHE_MISS itself: same path.) With no
drafter left, rounds simply carry no drafts: the verifier decodes alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Sequence

from scheduler.backends import BackendUnavailable
from scheduler.replica_pool import ReplicaPool
from specmesh.metrics import SCHEDULER_FAILOVERS
from specmesh.records import DraftChunk, DraftRequest

log = logging.getLogger(__name__)


class DrafterRouter:
    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.assignment: dict[str, str] = {}  # session id -> drafter endpoint
        self.num_failovers = 0

    def load(self, endpoint: str) -> int:
        return sum(1 for e in self.assignment.values() if e == endpoint)

    def _pin(self, session_id: str) -> str | None:
        endpoint = self.assignment.get(session_id)
        if endpoint is not None and endpoint in self.pool.live_endpoints():
            return endpoint
        counts = Counter(self.assignment.values())
        endpoint = self.pool.pick_least_loaded(lambda e: counts.get(e, 0))
        if endpoint is None:
            self.assignment.pop(session_id, None)
            return None
        previous = self.assignment.get(session_id)
        self.assignment[session_id] = endpoint
        if previous is not None and previous != endpoint:
            self.num_failovers += 1
            SCHEDULER_FAILOVERS.labels(backend="drafter").inc()
        return endpoint

    async def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        groups: dict[str, list[int]] = {}
        chunks: list[DraftChunk | None] = [None] * len(requests)
        for index, request in enumerate(requests):
            endpoint = self._pin(request.session_id)
            if endpoint is None:
                chunks[index] = _no_draft(request)
                continue
            groups.setdefault(endpoint, []).append(index)

        async def run(endpoint: str, indices: list[int]) -> None:
            group = [requests[i] for i in indices]
            try:
                answers = await self.pool.client(endpoint).draft(group)
                self.pool.mark_ok(endpoint)
            except BackendUnavailable as error:
                log.warning("drafter %s lost (%s); moving its sessions", endpoint, error)
                self.pool.mark_failed(endpoint)
                for request in group:
                    self.assignment.pop(request.session_id, None)
                answers = [_lost(r) for r in group]
            for i, chunk in zip(indices, answers):
                chunks[i] = chunk

        await asyncio.gather(*(run(e, idx) for e, idx in groups.items()))
        return [c if c is not None else _no_draft(r) for c, r in zip(chunks, requests)]

    async def release(self, session_ids: Sequence[str]) -> None:
        by_endpoint: dict[str, list[str]] = {}
        for sid in session_ids:
            endpoint = self.assignment.pop(sid, None)
            if endpoint is not None:
                by_endpoint.setdefault(endpoint, []).append(sid)
        for endpoint, ids in by_endpoint.items():
            try:
                await self.pool.client(endpoint).release(ids)
            except BackendUnavailable:
                log.info("could not release %d sessions at %s (it will evict them)", len(ids), endpoint)


def _no_draft(request: DraftRequest) -> DraftChunk:
    return DraftChunk(request.session_id, request.num_cached_tokens + len(request.new_tokens),
                      num_cached_tokens=request.num_cached_tokens)


def _lost(request: DraftRequest) -> DraftChunk:
    return DraftChunk(request.session_id, request.num_cached_tokens + len(request.new_tokens), cache_miss=True)
