"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Each bucket holds up to one minute's allowance and refills continuously (rpm/60 per second).
A request takes 1 request and its token reservation (prompt tokens + max_tokens) from its key's
buckets, both or neither; when it finishes, the tokens it did not generate are given back, and
a request refused later (overload) gets everything back.

Buckets live in Redis when a URL is configured, so every gateway replica draws from the same
ones: one Lua script refills, checks and takes atomically, on Redis's clock (replicas' clocks do
not matter). Without Redis (or while it is unreachable) each process keeps its own buckets with
the same arithmetic: the limit then holds per replica. A Redis outage never fails a request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from specmesh.errors import InvalidRequestError
from specmesh.grpc_errors import OverloadedError
from specmesh.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "specmesh:ratelimit:v1:"
BUCKET_TTL_MS = 120_000  # idle a minute, a bucket is full anyway: dropping it changes nothing


class RateLimitedError(OverloadedError):
    """The caller's key is over its limit (RESOURCE_EXHAUSTED / HTTP 429), with a retry hint."""


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # 0: unlimited

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0

    def check_cost(self, tokens: int) -> None:
        """A request larger than a full bucket could never run: refuse it as invalid, not as
        'retry later'."""
        if 0 < self.tokens_per_minute < tokens:
            raise InvalidRequestError(
                f"this request reserves {tokens} tokens (prompt tokens + max_tokens), more than the "
                f"{self.tokens_per_minute} tokens per minute allowed to one API key; lower max_tokens")


@dataclass(frozen=True)
class BucketState:
    requests: float  # requests left (ignored when unlimited)
    tokens: float  # tokens left (ignored when unlimited)
    updated_s: float  # when the levels above were computed


def take(state: BucketState | None, now_s: float, limits: RateLimits, requests: float, tokens: float,
         force: bool = False) -> tuple[BucketState | None, float]:
    """Refill, then take (requests, tokens) from both buckets, or from neither.

    Returns (new state, 0.0) when taken, or (None, seconds until it would fit) when not. force
    takes without checking (refunds pass negative amounts). A bucket never holds more than its
    per-minute allowance. The Lua script below is this function, line for line.
    """
    elapsed = max(0.0, now_s - state.updated_s) if state is not None else 0.0

    def level(stored: float | None, per_minute: int) -> float:
        if per_minute <= 0:
            return 0.0
        if stored is None:
            return float(per_minute)
        return min(float(per_minute), stored + elapsed * per_minute / 60.0)

    r = level(state.requests if state else None, limits.requests_per_minute)
    t = level(state.tokens if state else None, limits.tokens_per_minute)
    if not force:
        wait = 0.0
        if limits.requests_per_minute > 0 and r < requests:
            wait = max(wait, (requests - r) * 60.0 / limits.requests_per_minute)
        if limits.tokens_per_minute > 0 and t < tokens:
            wait = max(wait, (tokens - t) * 60.0 / limits.tokens_per_minute)
        if wait > 0:
            return None, wait
    r = min(float(limits.requests_per_minute), r - requests)
    t = min(float(limits.tokens_per_minute), t - tokens)
    return BucketState(r, t, now_s), 0.0


TAKE_LUA = """
-- KEYS[1]: the key's buckets (hash: r = requests left, t = tokens left, ts = when, seconds)
-- ARGV: rpm, tpm, requests, tokens, force ('1': take without checking; refunds), ttl_ms
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local want_r = tonumber(ARGV[3])
local want_t = tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local elapsed = 0
if state[3] then elapsed = math.max(0, now - tonumber(state[3])) end
local function level(stored, per_minute)
  if per_minute <= 0 then return 0 end
  if not stored then return per_minute end
  return math.min(per_minute, tonumber(stored) + elapsed * per_minute / 60)
end
local r = level(state[1], rpm)
local t = level(state[2], tpm)
if ARGV[5] ~= '1' then
  local wait = 0
  if rpm > 0 and r < want_r then wait = math.max(wait, (want_r - r) * 60 / rpm) end
  if tpm > 0 and t < want_t then wait = math.max(wait, (want_t - t) * 60 / tpm) end
  if wait > 0 then return {0, string.format('%.6f', wait)} end
end
r = math.min(rpm, r - want_r)
t = math.min(tpm, t - want_t)
redis.call('HSET', KEYS[1], 'r', string.format('%.17g', r), 't', string.format('%.17g', t),
           'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return {1, '0'}
"""


class RateLimiter(Protocol):
    limits: RateLimits

    async def acquire(self, bucket: str, tokens: int) -> None:
        """Take 1 request and `tokens` from bucket, or raise RateLimitedError (with a retry hint)."""
        ...

    async def refund(self, bucket: str, requests: int, tokens: int) -> None:
        """Give back what a request did not use (never raises)."""
        ...

    async def close(self) -> None:
        ...


def _refused(bucket_name: str, wait_s: float, limits: RateLimits) -> RateLimitedError:
    return RateLimitedError(
        f"rate limit exceeded for this API key ({limits.requests_per_minute or 'unlimited'} requests/min, "
        f"{limits.tokens_per_minute or 'unlimited'} tokens/min); retry in {wait_s:.2f} s", retry_after_s=wait_s)


class InMemoryRateLimiter:
    """Buckets in this process. Used without Redis, and by RedisRateLimiter during outages."""

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._buckets: dict[str, BucketState] = {}

    async def acquire(self, bucket: str, tokens: int) -> None:
        self.take_now(bucket, tokens)

    def take_now(self, bucket: str, tokens: int) -> None:
        if not self.limits.enabled:
            return
        self.limits.check_cost(tokens)
        state, wait = take(self._buckets.get(bucket), self.clock(), self.limits, 1, tokens)
        if state is None:
            raise _refused(bucket, wait, self.limits)
        self._buckets[bucket] = state

    async def refund(self, bucket: str, requests: int, tokens: int) -> None:
        if not self.limits.enabled or (requests <= 0 and tokens <= 0):
            return
        state, _ = take(self._buckets.get(bucket), self.clock(), self.limits, -requests, -tokens, force=True)
        self._buckets[bucket] = state

    async def close(self) -> None:
        pass


class RedisRateLimiter:
    """Buckets in Redis, shared by every replica; falls back to InMemoryRateLimiter (this
    process's own buckets) while Redis does not answer within timeout_s, and tries Redis again
    after a backoff, so an outage costs at most one timeout per backoff period."""

    def __init__(self, url: str | None, limits: RateLimits, *, client=None, timeout_s: float = 0.25,
                 min_backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = RedisLink(url, client=client, timeout_s=timeout_s, min_backoff_s=min_backoff_s,
                              max_backoff_s=max_backoff_s, clock=clock,
                              fallback="limiting in this process until it returns")
        self.limits = limits
        self.fallback = InMemoryRateLimiter(limits, clock)
        self.num_fallbacks = 0  # decisions taken locally because Redis did not answer
        self._script = self.link.client.register_script(TAKE_LUA)

    @property
    def available(self) -> bool:
        return self.link.available

    @property
    def num_failures(self) -> int:
        """Consecutive failed attempts (0 while Redis answers)."""
        return self.link.num_failures

    async def acquire(self, bucket: str, tokens: int) -> None:
        if not self.limits.enabled:
            return
        self.limits.check_cost(tokens)
        result = await self._run(bucket, 1, tokens, force=False)
        if result is None:
            self.num_fallbacks += 1
            self.fallback.take_now(bucket, tokens)
            return
        taken, wait = result
        if not taken:
            raise _refused(bucket, wait, self.limits)

    async def refund(self, bucket: str, requests: int, tokens: int) -> None:
        if not self.limits.enabled or (requests <= 0 and tokens <= 0):
            return
        if await self._run(bucket, -requests, -tokens, force=True) is None:
            await self.fallback.refund(bucket, requests, tokens)

    async def _run(self, bucket: str, requests: int, tokens: int, force: bool) -> tuple[bool, float] | None:
        """(taken, wait_s) from Redis, or None when Redis is (believed) unreachable."""
        if not self.link.ready:
            return None
        args = [self.limits.requests_per_minute, self.limits.tokens_per_minute, requests, tokens,
                "1" if force else "0", BUCKET_TTL_MS]
        try:
            taken, wait = await self.link.call(lambda _client: self._script(keys=[KEY_PREFIX + bucket], args=args))
        except RedisUnavailable:
            return None
        return bool(int(taken)), float(wait)

    async def close(self) -> None:
        await self.link.close()


def open_rate_limiter(redis_url: str | None, limits: RateLimits, **options) -> RateLimiter:
    if redis_url and limits.enabled:
        return RedisRateLimiter(redis_url, limits, **options)
    return InMemoryRateLimiter(limits)
