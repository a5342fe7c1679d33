"""The gateway's transport-free guards: API keys (hashed), token-bucket rate limits (pure
arithmetic, in memory, and the Redis Lua script against a real redis-server, including two
limiters sharing one key and a Redis outage), and the admission queue."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from redis.asyncio import Redis

from gateway.admission import AdmissionController, AdmissionLimits
from gateway.api_keys import ANONYMOUS, ApiKeys, key_digest
from gateway.rate_limit import (
    KEY_PREFIX,
    InMemoryRateLimiter,
    RateLimitedError,
    RateLimits,
    RedisRateLimiter,
    take,
)
from specmesh.errors import InvalidRequestError
from specmesh.grpc_errors import OverloadedError, UnauthenticatedError
from tests.redis_server import redis_process, redis_server  # noqa: F401

# ---------------------------------------------------------------------------- API keys


def test_keys_file_holds_keys_or_their_hashes_and_env_adds_more(tmp_path):
    hashed = "sk-only-the-hash-is-on-disk"
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\n\nsk-plain-key\n  sha256:{hashlib.sha256(hashed.encode()).hexdigest().upper()}\n")
    keys = ApiKeys.from_env(str(keys_file), {"SPECMESH_GATEWAY_API_KEYS": "sk-env-1, sk-env-2,"})
    assert keys.enabled and len(keys) == 4
    for key in ("sk-plain-key", hashed, "sk-env-1", "sk-env-2"):
        caller = keys.authenticate(f"Bearer {key}")
        assert caller.digest == key_digest(key)
        assert key not in caller.key_id and caller.key_id.startswith("key-")
    assert keys.authenticate("bearer   sk-plain-key ").digest == key_digest("sk-plain-key")  # scheme any case
    assert keys.authenticate("sk-plain-key").digest == key_digest("sk-plain-key")  # bare key


@pytest.mark.parametrize("credential", [None, "", "Bearer", "Bearer ", "Bearer sk-wrong", "Basic sk-plain-key",
                                        "Bearer " + "x" * 10_000])
def test_wrong_or_missing_keys_are_refused_without_echoing_them(credential):
    keys = ApiKeys.load(entries=["sk-plain-key"])
    with pytest.raises(UnauthenticatedError) as info:
        keys.authenticate(credential)
    if credential and len(credential) > 7:
        assert credential[7:] not in str(info.value)


def test_no_keys_means_an_open_gateway_with_one_anonymous_caller():
    assert ApiKeys().authenticate(None) is ANONYMOUS
    assert ApiKeys().authenticate("Bearer anything") is ANONYMOUS


def test_a_malformed_hash_line_is_refused_naming_the_line_not_the_secret(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-fine\nsha256:not-hex-secretish\n")
    with pytest.raises(ValueError) as info:
        ApiKeys.load(str(keys_file))
    assert "line 2" in str(info.value) and "secretish" not in str(info.value)


# ---------------------------------------------------------------------------- bucket arithmetic

RPM_TPM = RateLimits(requests_per_minute=6, tokens_per_minute=600)


def test_buckets_start_full_take_both_or_neither_and_refill_per_second():
    state, wait = take(None, 100.0, RPM_TPM, 1, 500)
    assert wait == 0 and state.requests == 5 and state.tokens == 100
    # Tokens short: nothing is taken (requests stay at 5), the wait is for the tokens.
    refused, wait = take(state, 100.0, RPM_TPM, 1, 160)
    assert refused is None and wait == pytest.approx(6.0)  # 60 missing tokens at 10 tokens/s
    state, wait = take(state, 106.0, RPM_TPM, 1, 160)  # refilled 60 tokens and 0.6 requests
    assert wait == 0 and state.requests == pytest.approx(4.6) and state.tokens == pytest.approx(0.0)
    # Never above a full minute's allowance, however long idle.
    state, _ = take(state, 10_000.0, RPM_TPM, 0, 0)
    assert (state.requests, state.tokens) == (6, 600)


def test_request_bucket_empties_and_tells_when_the_next_one_fits():
    limits = RateLimits(requests_per_minute=2)
    state, _ = take(None, 0.0, limits, 1, 10**9)  # tokens unlimited
    state, _ = take(state, 0.0, limits, 1, 10**9)
    refused, wait = take(state, 0.0, limits, 1, 1)
    assert refused is None and wait == pytest.approx(30.0)


def test_refunds_are_forced_and_capped_at_a_full_bucket():
    state, _ = take(None, 0.0, RPM_TPM, 1, 550)
    state, _ = take(state, 0.0, RPM_TPM, -1, -500, force=True)
    assert (state.requests, state.tokens) == (6, 550)
    state, _ = take(state, 0.0, RPM_TPM, -1, -500, force=True)
    assert (state.requests, state.tokens) == (6, 600)


async def test_in_memory_limiter_per_key_and_too_large_requests():
    now = [0.0]
    limiter = InMemoryRateLimiter(RateLimits(requests_per_minute=2, tokens_per_minute=100), clock=lambda: now[0])
    await limiter.acquire("a", 10)
    await limiter.acquire("a", 10)
    with pytest.raises(RateLimitedError) as info:
        await limiter.acquire("a", 10)
    assert info.value.retry_after_s == pytest.approx(30.0)
    await limiter.acquire("b", 10)  # another key has its own buckets
    with pytest.raises(InvalidRequestError, match="lower max_tokens"):
        await limiter.acquire("b", 101)  # could never fit: not "retry later"
    now[0] += 30.0
    await limiter.acquire("a", 10)


# ---------------------------------------------------------------------------- Redis


async def test_redis_script_matches_the_arithmetic_and_shares_one_key(redis_server):
    limits = RateLimits(requests_per_minute=20, tokens_per_minute=1_000)
    # Generous timeouts: this test is about the script's arithmetic, not the outage path, and a
    # loaded CI machine must not push it onto the local fallback.
    first = RedisRateLimiter(redis_server, limits, timeout_s=5.0)
    second = RedisRateLimiter(redis_server, limits, timeout_s=5.0)
    try:
        # 60 concurrent requests through two limiters (two connections): exactly 20 pass.
        async def attempt(limiter: RedisRateLimiter) -> bool:
            try:
                await limiter.acquire("shared", 10)
                return True
            except RateLimitedError as error:
                assert 0 < error.retry_after_s <= 3.0 + 0.5  # one request refills in 3 s
                return False

        outcomes = await asyncio.gather(*(attempt(first if i % 2 else second) for i in range(60)))
        assert sum(outcomes) == 20
        assert first.num_fallbacks == second.num_fallbacks == 0
        client = Redis.from_url(redis_server)
        stored = await client.hgetall(KEY_PREFIX + "shared")
        assert float(stored[b"r"]) < 0.1 and float(stored[b"t"]) == pytest.approx(800, abs=1)
        assert 0 < await client.pttl(KEY_PREFIX + "shared") <= 120_000
        # A refund gives back tokens at once, never more than a full bucket.
        await first.refund("shared", 0, 10_000)
        assert float((await client.hgetall(KEY_PREFIX + "shared"))[b"t"]) == 1_000
        # Tokens: a request of 1_000 drains the bucket; the next waits ~ 60 s per 1_000 tokens.
        await first.acquire("tokens", 1_000)
        with pytest.raises(RateLimitedError) as info:
            await second.acquire("tokens", 500)
        assert info.value.retry_after_s == pytest.approx(30.0, abs=0.5)
        await client.aclose()
    finally:
        await first.close()
        await second.close()


async def test_redis_outage_falls_back_to_local_limits_and_recovers(redis_process):
    limits = RateLimits(requests_per_minute=3)
    limiter = RedisRateLimiter(redis_process.url, limits, timeout_s=0.2, min_backoff_s=0.1, max_backoff_s=0.2)
    try:
        await limiter.acquire("k", 1)  # shared: 2 left in Redis
        redis_process.kill()
        started = time.monotonic()
        await limiter.acquire("k", 1)  # no error: decided locally (a full local bucket)
        await limiter.acquire("k", 1)
        await limiter.acquire("k", 1)
        with pytest.raises(RateLimitedError):
            await limiter.acquire("k", 1)  # the local bucket still limits
        assert time.monotonic() - started < 1.0  # one timeout at most, then backoff skips Redis
        assert not limiter.available and limiter.num_fallbacks >= 3
        redis_process.start()  # empty: the shared bucket starts full again
        await asyncio.sleep(0.3)
        await limiter.acquire("k", 1)
        assert limiter.available
    finally:
        await limiter.close()


# ---------------------------------------------------------------------------- admission


async def test_admission_runs_queues_fifo_and_refuses_beyond_the_queue():
    admission = AdmissionController(AdmissionLimits(max_concurrent=2, max_queued=2, queue_timeout_s=5.0))
    await admission.acquire()
    await admission.acquire()
    order: list[int] = []

    async def queued(i: int) -> None:
        await admission.acquire()
        order.append(i)

    waiters = [asyncio.ensure_future(queued(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert (admission.running, admission.queued) == (2, 2)
    started = time.monotonic()
    with pytest.raises(OverloadedError) as info:
        await admission.acquire()
    assert time.monotonic() - started < 0.01 and info.value.retry_after_s >= 0.5
    admission.release()
    admission.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1] and (admission.running, admission.queued) == (2, 0)
    snapshot = admission.snapshot()
    assert (snapshot.admitted_total, snapshot.refused_queue_full_total) == (4, 1)


async def test_admission_queue_timeout_and_cancelled_waiters_free_their_place():
    admission = AdmissionController(AdmissionLimits(max_concurrent=1, max_queued=2, queue_timeout_s=0.1))
    await admission.acquire()
    started = time.monotonic()
    with pytest.raises(OverloadedError, match="within 0.10 s"):
        await admission.acquire()
    assert 0.09 < time.monotonic() - started < 0.5
    # A client deadline shorter than the queue timeout wins.
    started = time.monotonic()
    with pytest.raises(OverloadedError):
        await admission.acquire(timeout_s=0.02)
    assert time.monotonic() - started < 0.08
    waiter = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0)
    assert admission.queued == 0
    # Granted and cancelled in the same instant: the slot goes to the next in line.
    admission = AdmissionController(AdmissionLimits(max_concurrent=1, max_queued=2, queue_timeout_s=5.0))
    await admission.acquire()
    first = asyncio.ensure_future(admission.acquire())
    second = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0.01)
    admission.release()  # hands the slot to `first` ...
    first.cancel()  # ... which is cancelled before it runs again
    await asyncio.sleep(0.01)
    assert second.done() and admission.running == 1 and admission.queued == 0
    snapshot = admission.snapshot()
    assert snapshot.refused_queue_timeout_total == 0
