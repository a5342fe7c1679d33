"""A Redis connection that is never a dependency: bounded calls, outage detection, backoff.

What specmesh keeps in Redis (scheduler statistics, gateway rate limits) is shared state that
serving must never wait on.
Every call through a `RedisLink` finishes within `timeout_s` (connect included) or fails with
`RedisUnavailable`; after a failure the link reports itself not `ready` until a backoff
(doubling, with jitter, capped) has passed, so callers skip Redis entirely meanwhile instead of
paying a timeout every round. Background work is started through `spawn` so `close` can stop it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, Coroutine, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis did not answer in time (or at all); the caller continues without it."""


class RedisLink:
    def __init__(self, url: str | None = None, *, client: Redis | None = None, timeout_s: float = 0.1,
                 min_backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 fallback: str = "continuing with local statistics") -> None:
        """fallback: what the caller does meanwhile, for the one warning logged per outage."""
        if client is None:
            if url is None:
                raise ValueError("RedisLink needs a url or a client")
            # No client-side retries: one attempt, bounded; our own backoff decides when to retry.
            client = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.client = client
        self.timeout_s = timeout_s
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.fallback = fallback
        self.num_failures = 0  # consecutive
        self.retry_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    @property
    def available(self) -> bool:
        """False while an outage is suspected (the last call failed)."""
        return self.num_failures == 0

    @property
    def ready(self) -> bool:
        """Whether a call may be attempted now (healthy, or the backoff has passed)."""
        return not self._closed and (self.num_failures == 0 or self.clock() >= self.retry_at)

    async def call(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `operation(client)` within timeout_s; raises RedisUnavailable on any failure."""
        if self._closed:
            raise RedisUnavailable("link closed")
        try:
            result = await asyncio.wait_for(operation(self.client), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure means "continue without Redis"
            self._failed(error)
            raise RedisUnavailable(f"{type(error).__name__}: {error}") from error
        if self.num_failures:
            log.info("redis reachable again after %d failed attempts", self.num_failures)
        self.num_failures = 0
        return result

    def spawn(self, coroutine: Coroutine) -> asyncio.Task | None:
        """Run background work tied to this link; None (and the coroutine closed) without a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coroutine.close()
            return None
        task = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Wait for the background work started so far (tests, orderly shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        try:
            await asyncio.wait_for(self.client.aclose(), self.timeout_s)
        except Exception:  # noqa: BLE001 - closing a dead connection may fail; nothing to do
            pass

    def _failed(self, error: BaseException) -> None:
        if self.num_failures == 0:
            log.warning("redis unavailable (%s: %s); %s", type(error).__name__, error, self.fallback)
        self.num_failures += 1
        backoff = min(self.max_backoff_s, self.min_backoff_s * 2 ** (self.num_failures - 1))
        self.retry_at = self.clock() + backoff * random.uniform(0.75, 1.25)
