"""Overload protection: at most `max_concurrent` requests run, at most `max_queued` wait, and
none waits longer than `queue_timeout_s`. Everything beyond is refused at once with
OverloadedError (RESOURCE_EXHAUSTED / HTTP 503) and a retry hint, so a flood costs the gateway
one small refusal per request instead of unbounded memory, and admitted requests keep their pace.

Waiters are served first come, first served. No transport here; one controller is shared by
gRPC and HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

from specmesh.grpc_errors import OverloadedError

MIN_RETRY_S = 0.5


@dataclass(frozen=True)
class AdmissionLimits:
    max_concurrent: int = 128
    max_queued: int = 512
    queue_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if not self.queue_timeout_s >= 0:
            raise ValueError(f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")


@dataclass(frozen=True)
class AdmissionSnapshot:
    running: int
    queued: int
    admitted_total: int
    refused_queue_full_total: int
    refused_queue_timeout_total: int


class AdmissionController:
    def __init__(self, limits: AdmissionLimits = AdmissionLimits()) -> None:
        self.limits = limits
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self.admitted_total = 0
        self.refused_queue_full_total = 0
        self.refused_queue_timeout_total = 0
        self._mean_hold_s = 1.0  # moving average of how long a request holds its slot

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(self.running, self.queued, self.admitted_total, self.refused_queue_full_total,
                                 self.refused_queue_timeout_total)

    def retry_after_s(self) -> float:
        """When a slot is likely free again: the queue ahead drains at max_concurrent per hold time."""
        ahead = (self.queued + 1) / self.limits.max_concurrent
        return max(MIN_RETRY_S, min(self._mean_hold_s * ahead, 60.0))

    async def acquire(self, timeout_s: float | None = None) -> None:
        """Take a slot, waiting in the queue if need be. timeout_s (what is left of the client's
        deadline) shortens the wait below queue_timeout_s. Raises OverloadedError."""
        if self.running < self.limits.max_concurrent and not self._waiters:
            self._admit()
            return
        if len(self._waiters) >= self.limits.max_queued:
            self.refused_queue_full_total += 1
            raise OverloadedError(
                f"gateway overloaded: {self.running} requests running and {len(self._waiters)} waiting, "
                f"the most it accepts; retry later", retry_after_s=self.retry_after_s())
        wait_s = self.limits.queue_timeout_s if timeout_s is None else min(self.limits.queue_timeout_s, timeout_s)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(max(wait_s, 0.0), self._expire, waiter, wait_s)
        try:
            await waiter  # the slot is ours when this returns (release() handed it over)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot in the same instant the caller went away
            else:
                self._discard(waiter)
            raise
        finally:
            timer.cancel()

    def release(self, held_s: float | None = None) -> None:
        """Give a slot back; the longest waiter (if any) gets it."""
        if held_s is not None:
            self._mean_hold_s += 0.1 * (held_s - self._mean_hold_s)
        self.running -= 1
        while self._waiters and self.running < self.limits.max_concurrent:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._admit()
            waiter.set_result(None)

    @asynccontextmanager
    async def slot(self, timeout_s: float | None = None) -> AsyncIterator[None]:
        await self.acquire(timeout_s)
        started = time.monotonic()
        try:
            yield
        finally:
            self.release(time.monotonic() - started)

    def _admit(self) -> None:
        self.running += 1
        self.admitted_total += 1

    def _expire(self, waiter: asyncio.Future, wait_s: float) -> None:
        if waiter.done():
            return
        self._discard(waiter)
        self.refused_queue_timeout_total += 1
        waiter.set_exception(OverloadedError(
            f"gateway overloaded: no free slot within {wait_s:.2f} s of queueing; retry later",
            retry_after_s=self.retry_after_s()))

    def _discard(self, waiter: asyncio.Future) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass
