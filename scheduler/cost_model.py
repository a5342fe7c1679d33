"""Verifier cost model: how long one forward pass of B batch tokens takes, hence SPS(B).

A `CostProfile` comes from a verifier's measured cost table [(batch_tokens, forward_seconds)]
(ProfileResponse.cost_table). Measurements are noisy and a larger batch never really costs
less, so the table is first made monotone (isotonic regression, pool-adjacent-violators), then
interpolated linearly; beyond the largest measured batch it is extrapolated with the steeper of
the last segment and the average slope (conservative: a flat tail would make huge batches
look free); below the smallest it is flat.

`CostProfileRegistry` makes every verifier's curve visible to every scheduler replica: curves
this replica measured are published to Redis under `{namespace}:cost:{endpoint}` with a TTL
(re-published while they are in use), and the others' curves are read back periodically.
Without Redis, or while it is down, it serves what it knows locally.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from redis.asyncio import Redis

from specmesh.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "specmesh:v1"


def _isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean2, w2, n2 = blocks.pop()
            mean1, w1, n1 = blocks[-1]
            blocks[-1] = [(mean1 * w1 + mean2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


@dataclass(frozen=True)
class CostProfile:
    """Monotone forward cost per batch size. points: ((batch_tokens, seconds), ...) ascending."""

    points: tuple[tuple[int, float], ...]

    @classmethod
    def from_table(cls, table: Iterable[tuple[int, float]]) -> "CostProfile":
        by_size: dict[int, list[float]] = {}
        for batch_tokens, seconds in table:
            batch_tokens, seconds = int(batch_tokens), float(seconds)
            if batch_tokens < 1 or not (seconds > 0 and math.isfinite(seconds)):
                raise ValueError(f"bad cost point ({batch_tokens}, {seconds})")
            by_size.setdefault(batch_tokens, []).append(seconds)
        if not by_size:
            raise ValueError("a cost table needs at least one point")
        sizes = sorted(by_size)
        means = [sum(by_size[b]) / len(by_size[b]) for b in sizes]
        fitted = _isotonic(means, [float(len(by_size[b])) for b in sizes])
        return cls(tuple(zip(sizes, fitted)))

    @classmethod
    def linear(cls, base_seconds: float, seconds_per_token: float, max_tokens: int = 1024) -> "CostProfile":
        """seconds(B) = base + per_token * B (tests, defaults)."""
        sizes = sorted({1, max(2, max_tokens // 2), max(3, max_tokens)})
        return cls.from_table([(b, base_seconds + seconds_per_token * b) for b in sizes])

    @classmethod
    def flat(cls, seconds: float, max_tokens: int = 1024) -> "CostProfile":
        """Every batch up to max_tokens costs the same (then grows in proportion)."""
        return cls.from_table([(1, seconds), (max_tokens, seconds)])

    def forward_seconds(self, batch_tokens: float) -> float:
        points = self.points
        if batch_tokens <= points[0][0]:
            return points[0][1]
        last_b, last_s = points[-1]
        if batch_tokens >= last_b:
            if len(points) == 1:
                slope = last_s / last_b  # one measurement: assume cost in proportion to size
            else:
                prev_b, prev_s = points[-2]
                first_b, first_s = points[0]
                slope = max((last_s - prev_s) / (last_b - prev_b), (last_s - first_s) / (last_b - first_b))
            return last_s + slope * (batch_tokens - last_b)
        for (b0, s0), (b1, s1) in zip(points, points[1:]):
            if batch_tokens <= b1:
                return s0 + (s1 - s0) * (batch_tokens - b0) / (b1 - b0)
        return last_s  # unreachable

    def steps_per_second(self, batch_tokens: float) -> float:
        """SPS(B): forward passes per second at this batch size."""
        return 1.0 / self.forward_seconds(batch_tokens)

    def to_json(self) -> str:
        return json.dumps({"points": [[b, s] for b, s in self.points]})

    @classmethod
    def from_json(cls, text: str | bytes) -> "CostProfile":
        data = json.loads(text)
        return cls.from_table((int(b), float(s)) for b, s in data["points"])


class CostProfileSource(Protocol):
    def profile(self, verifier: str | None) -> CostProfile | None: ...


class StaticCostProfiles:
    """A fixed profile for every verifier (tests, or a single known verifier)."""

    def __init__(self, profile: CostProfile | None) -> None:
        self._profile = profile

    def profile(self, verifier: str | None) -> CostProfile | None:
        return self._profile


class CostProfileRegistry:
    """Every verifier's cost profile: local measurements first, then those shared via Redis."""

    def __init__(self, redis_url: str | None = None, *, client: Redis | None = None,
                 namespace: str = DEFAULT_NAMESPACE, ttl_s: float = 60.0, refresh_interval_s: float = 5.0,
                 timeout_s: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.link = (RedisLink(redis_url, client=client, timeout_s=timeout_s, clock=clock)
                     if redis_url is not None or client is not None else None)
        self._local: dict[str, CostProfile] = {}
        self._shared: dict[str, CostProfile] = {}
        self._published_at: dict[str, float] = {}
        self._last_read = -math.inf
        self._busy = False

    def key(self, endpoint: str) -> str:
        return f"{self.namespace}:cost:{endpoint}"

    @property
    def index_key(self) -> str:
        return f"{self.namespace}:cost-index"

    # ---- local knowledge ---------------------------------------------------------------------
    def set_local(self, endpoint: str, profile: CostProfile) -> None:
        """A profile this replica measured or fetched (Profile RPC); shared in the background."""
        self._local[endpoint] = profile
        self._published_at.pop(endpoint, None)
        self._kick()

    def remove_local(self, endpoint: str) -> None:
        self._local.pop(endpoint, None)
        self._published_at.pop(endpoint, None)

    def profile(self, verifier: str | None) -> CostProfile | None:
        """The profile of `verifier`; with None, the only known profile (if exactly one)."""
        self._kick()
        if verifier is None:
            known = self.profiles()
            return next(iter(known.values())) if len(known) == 1 else None
        return self._local.get(verifier) or self._shared.get(verifier)

    def profiles(self) -> dict[str, CostProfile]:
        return {**self._shared, **self._local}

    # ---- Redis -------------------------------------------------------------------------------
    async def publish(self, endpoint: str, profile: CostProfile) -> bool:
        """Write one profile with a TTL (and index it). True on success."""
        if self.link is None:
            return False
        expires = self.wall_clock() + self.ttl_s

        async def write(client: Redis) -> None:
            pipe = client.pipeline(transaction=False)
            pipe.set(self.key(endpoint), profile.to_json(), px=int(self.ttl_s * 1000))
            pipe.zadd(self.index_key, {endpoint: expires})
            # Entries whose key has long expired leave the index.
            pipe.zremrangebyscore(self.index_key, "-inf", self.wall_clock() - 2 * self.ttl_s)
            pipe.pexpire(self.index_key, int(3 * self.ttl_s * 1000))
            await pipe.execute()

        try:
            await self.link.call(write)
        except RedisUnavailable:
            return False
        self._published_at[endpoint] = self.clock()
        return True

    async def refresh(self) -> bool:
        """Read every live profile from Redis. True on success."""
        if self.link is None:
            return False

        async def read(client: Redis) -> dict[str, CostProfile]:
            # Lenient lower bound: replicas' clocks differ; the keys' own TTL is the truth.
            endpoints = await client.zrangebyscore(self.index_key, self.wall_clock() - self.ttl_s, "+inf")
            if not endpoints:
                return {}
            names = [e.decode() if isinstance(e, bytes) else e for e in endpoints]
            values = await client.mget([self.key(n) for n in names])
            found = {}
            for name, value in zip(names, values):
                if value is None:
                    continue
                try:
                    found[name] = CostProfile.from_json(value)
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring malformed cost profile for %s", name)
            return found

        try:
            self._shared = await self.link.call(read)
        except RedisUnavailable:
            return False
        self._last_read = self.clock()
        return True

    async def sync(self) -> bool:
        """Re-publish local profiles that are due, then read everyone's."""
        now = self.clock()
        ok = True
        for endpoint, profile in list(self._local.items()):
            if now - self._published_at.get(endpoint, -math.inf) >= self.ttl_s / 3:
                ok = await self.publish(endpoint, profile) and ok
        return await self.refresh() and ok

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()

    def _kick(self) -> None:
        if self.link is None or self._busy or not self.link.ready:
            return
        now = self.clock()
        due_publish = any(now - self._published_at.get(e, -math.inf) >= self.ttl_s / 3 for e in self._local)
        if not due_publish and now - self._last_read < self.refresh_interval_s:
            return
        self._busy = True

        async def run() -> None:
            try:
                await self.sync()
            finally:
                self._busy = False

        if self.link.spawn(run()) is None:
            self._busy = False
