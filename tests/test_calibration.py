"""Online calibration: the pure table (buckets, prior, decay, observations) and its stores
(in memory; Redis shared by replicas, surviving a Redis outage)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from redis.asyncio import Redis

from scheduler.calibration import (
    CalibrationConfig,
    CalibrationTable,
    Observation,
    observations_from,
    survival_curve,
)
from scheduler.calibration_store import InMemoryCalibrationStore, RedisCalibrationStore
from scheduler.draft_policy import RoundOutcome
from specmesh.records import DraftChunk, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams
from tests.redis_server import redis_process, redis_server  # noqa: F401

PAIR = "verifier-x->drafter-y"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def outcome(confidences: list[float], verified: int, accepted: int, *, chunk_miss: bool = False,
            result_miss: bool = False, with_chunk: bool = True) -> RoundOutcome:
    tokens = tuple(range(len(confidences)))
    chunk = DraftChunk("s", base_length=5, tokens=tokens, confidences=tuple(confidences),
                       cache_miss=chunk_miss) if with_chunk else None
    item = VerifyItem("s", 4, (7,), tokens[:verified], (), SamplingParams())
    result = VerifyResult("s", accepted_count=accepted, next_token=3, cache_miss=result_miss)
    return RoundOutcome(chunk, item, result)


# --------------------------------------------------------------------------- pure table


def test_bucket_mapping_clamps_and_splits_evenly():
    config = CalibrationConfig(num_buckets=10)
    assert [config.bucket_of(c) for c in (0.0, 0.05, 0.1, 0.55, 0.999, 1.0)] == [0, 0, 1, 5, 9, 9]
    assert config.bucket_of(-0.3) == 0
    assert config.bucket_of(1.7) == 9
    assert config.bucket_of(float("nan")) == 0
    assert config.row_of(3) == 3
    assert config.row_of(500) == config.max_positions - 1


def test_empty_table_answers_with_the_prior():
    table = CalibrationTable(CalibrationConfig(default_acceptance=0.4))
    assert table.acceptance(0, 0.83) == pytest.approx(0.83)  # raw confidence, uncalibrated
    assert table.acceptance(5, 0.0) == 0.0
    assert table.position_acceptances(3) == pytest.approx([0.4, 0.4, 0.4])


def test_counts_pull_the_estimate_away_from_the_prior():
    config = CalibrationConfig(prior_weight=2.0)
    table = CalibrationTable(config)
    # An over-confident drafter: tokens at confidence ~0.95 survive only half the time.
    table.add([Observation(0, config.bucket_of(0.95), offered=98, accepted=49)], now=0.0)
    assert table.acceptance(0, 0.95) == pytest.approx((49 + 2 * 0.95) / 100)
    # Other buckets and positions are untouched: they still answer with their prior.
    assert table.acceptance(0, 0.35) == pytest.approx(0.35)
    assert table.acceptance(1, 0.95) == pytest.approx(0.95)
    # The position marginal learned from the same counts; position 1 inherits it as prior.
    marginal = (49 + 2 * 0.5) / 100
    assert table.position_acceptance(0) == pytest.approx(marginal)
    assert table.position_acceptance(1) == pytest.approx(marginal)


def test_counts_decay_with_the_half_life():
    config = CalibrationConfig(half_life_s=10.0)
    table = CalibrationTable(config, as_of=0.0)
    table.add([Observation(0, 3, offered=8, accepted=4)], now=0.0)
    table.decay_to(10.0)
    assert table.cell(0, 3) == pytest.approx((4.0, 2.0))
    table.add([Observation(0, 3, offered=4, accepted=4)], now=20.0)
    assert table.cell(0, 3) == pytest.approx((2.0 + 4.0, 1.0 + 4.0))
    # Old evidence fades: after many half-lives the prior speaks again.
    table.decay_to(20.0 + 400.0)
    assert table.acceptance(0, 0.35) == pytest.approx(0.35, abs=1e-6)


def test_merge_aligns_tables_of_different_ages():
    config = CalibrationConfig(half_life_s=5.0)
    old = CalibrationTable(config, as_of=0.0).add([Observation(1, 1, 4, 2)], now=0.0)
    new = CalibrationTable(config, as_of=5.0).add([Observation(1, 1, 4, 4)], now=5.0)
    merged = new.copy().merge(old, now=5.0)
    assert merged.cell(1, 1) == pytest.approx((4 + 2, 4 + 1))
    with pytest.raises(ValueError):
        merged.merge(CalibrationTable(CalibrationConfig(num_buckets=4)), now=5.0)


def test_fields_round_trip():
    config = CalibrationConfig()
    table = CalibrationTable(config).add([Observation(0, 9, 3.5, 2.25), Observation(15, 0, 1, 0)], now=0.0)
    fields = table.to_fields()
    assert fields == {"o:0:9": 3.5, "a:0:9": 2.25, "o:15:0": 1.0}
    back = CalibrationTable.from_fields(config, {**fields, "_t": 12.0, "junk": 1, "o:99:0": 5}, as_of=0.0)
    assert back.offered == table.offered and back.accepted == table.accepted


def test_observations_count_up_to_the_first_rejection():
    config = CalibrationConfig(num_buckets=10)
    confidences = [0.95, 0.85, 0.45, 0.15, 0.9]
    # 4 verified, 2 accepted: positions 0 and 1 accepted, 2 rejected, 3 never judged.
    got = observations_from([outcome(confidences, verified=4, accepted=2)], config)
    assert got == [Observation(0, 9, 1, 1), Observation(1, 8, 1, 1), Observation(2, 4, 1, 0)]
    # All verified accepted: each offered and accepted; the unverified 5th is not counted.
    got = observations_from([outcome(confidences, verified=4, accepted=4)], config)
    assert [(o.position, o.offered, o.accepted) for o in got] == [(0, 1, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1)]
    # Nothing verified, misses, no chunk: nothing learned.
    for case in (outcome(confidences, 0, 0), outcome(confidences, 3, 1, chunk_miss=True),
                 outcome(confidences, 3, 1, result_miss=True), outcome(confidences, 0, 0, with_chunk=False)):
        assert observations_from([case], config) == []


def test_observations_aggregate_and_fold_late_positions():
    config = CalibrationConfig(num_buckets=2, max_positions=2)
    outcomes = [outcome([0.9, 0.9, 0.9], verified=3, accepted=3), outcome([0.9, 0.2, 0.2], 3, 1)]
    got = {(o.position, o.bucket): (o.offered, o.accepted) for o in observations_from(outcomes, config)}
    # Positions 1 and 2 share row 1.
    assert got == {(0, 1): (2, 2), (1, 1): (2, 2), (1, 0): (1, 0)}


def test_survival_curve_is_the_running_product():
    assert survival_curve([0.5, 0.5, 0.8]) == pytest.approx([0.5, 0.25, 0.2])


# --------------------------------------------------------------------------- in-memory store


async def test_in_memory_store_learns_and_decays():
    clock = FakeClock()
    store = InMemoryCalibrationStore(CalibrationConfig(half_life_s=10.0), clock=clock)
    before = store.table(PAIR).acceptance(0, 0.9)
    await store.record(PAIR, [Observation(0, 9, 20, 2)])
    after = store.table(PAIR).acceptance(0, 0.9)
    assert before == pytest.approx(0.9) and after < 0.2
    clock.now += 1000.0
    assert store.table(PAIR).acceptance(0, 0.9) == pytest.approx(0.9, abs=1e-3)
    assert store.table("another pair").acceptance(0, 0.9) == pytest.approx(0.9)


# --------------------------------------------------------------------------- Redis store


def redis_store(url: str, **kwargs) -> RedisCalibrationStore:
    options = dict(timeout_s=0.1, refresh_interval_s=0.05, min_backoff_s=0.05, max_backoff_s=0.3,
                   config=CalibrationConfig(half_life_s=1e6))
    options.update(kwargs)
    return RedisCalibrationStore(url, **options)


async def eventually(condition, timeout_s: float = 5.0, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(poll_s)


BAD = [Observation(0, 9, 10, 1)]  # confident drafts that keep getting rejected


async def test_two_replicas_share_calibration(redis_server):
    learner, watcher = redis_store(redis_server), redis_store(redis_server)
    try:
        assert watcher.table(PAIR).acceptance(0, 0.95) == pytest.approx(0.95)
        for _ in range(5):
            await learner.record(PAIR, BAD)
            await asyncio.sleep(0.01)
        # The watcher never observed anything itself, yet its estimate moves.
        await eventually(lambda: watcher.table(PAIR).acceptance(0, 0.95) < 0.2)
        await learner.wait_idle()
        assert watcher.table(PAIR).cell(0, 9) == pytest.approx((50, 5))
        assert learner.table(PAIR).cell(0, 9) == pytest.approx((50, 5))  # not double counted
        # Another model pair is another table.
        assert watcher.table("other->pair").acceptance(0, 0.95) == pytest.approx(0.95)
    finally:
        await learner.close()
        await watcher.close()


async def test_concurrent_writers_compose_in_redis(redis_server):
    stores = [redis_store(redis_server) for _ in range(4)]
    try:
        await asyncio.gather(*(s.record(PAIR, [Observation(j % 3, 2, 1, 1)]) for s in stores for j in range(30)))
        for store in stores:
            await store.wait_idle()
        assert await stores[0].sync(PAIR)
        table = stores[0].table(PAIR)
        assert [table.cell(p, 2)[0] for p in range(3)] == pytest.approx([40, 40, 40])
    finally:
        for store in stores:
            await store.close()


async def test_redis_decay_matches_the_pure_table(redis_server):
    """Server-side decay (rebase + forward decay) agrees with the local table's arithmetic."""
    config = CalibrationConfig(half_life_s=0.5)
    store = redis_store(redis_server, config=config, rebase_after_s=0.2)
    try:
        await store.record(PAIR, [Observation(0, 0, 8, 8)])
        await store.wait_idle()
        await asyncio.sleep(0.3)
        await store.record(PAIR, [Observation(0, 0, 8, 8)])
        await store.wait_idle()
        await asyncio.sleep(0.25)
        assert await store.sync(PAIR)
        offered, _ = store.table(PAIR).cell(0, 0)
        # 8 observed ~0.55 s ago and 8 observed ~0.25 s ago, half-life 0.5 s.
        expected = 8 * 0.5 ** (0.55 / 0.5) + 8 * 0.5 ** (0.25 / 0.5)
        assert offered == pytest.approx(expected, rel=0.12)
    finally:
        await store.close()


async def run_rounds(store: RedisCalibrationStore, rounds: int, observations) -> float:
    """Simulate speculation rounds using the store; returns the slowest round (seconds)."""
    slowest = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        store.table(PAIR).acceptance(0, 0.95)  # what verify_lengths does
        await store.record(PAIR, observations)  # what observe does
        slowest = max(slowest, time.perf_counter() - started)
        await asyncio.sleep(0.01)  # the verify call
    return slowest


async def test_redis_killed_mid_run_then_restarted(redis_process):
    learner, watcher = redis_store(redis_process.url), redis_store(redis_process.url)
    try:
        await run_rounds(learner, 5, BAD)
        await eventually(lambda: watcher.table(PAIR).cell(0, 9)[0] == pytest.approx(50))

        redis_process.kill()
        slowest = await run_rounds(learner, 30, BAD)  # no exception escapes
        assert slowest < 0.1  # rounds never wait for Redis
        assert not learner.available
        # Local learning continues: the learner's own estimate includes the outage's rounds.
        assert learner.table(PAIR).cell(0, 9) == pytest.approx((350, 35))
        assert watcher.table(PAIR).cell(0, 9) == pytest.approx((50, 5))  # last shared view

        redis_process.start()  # empty: it had no persistence
        await run_rounds(learner, 5, BAD)
        # The buffered increments merged back: the watcher sees everything learned since the
        # restart, including the outage (the counts from before the restart died with Redis).
        await eventually(lambda: watcher.table(PAIR).cell(0, 9)[0] == pytest.approx(350))
        await learner.wait_idle()
        assert learner.available
        assert learner.table(PAIR).cell(0, 9) == pytest.approx((350, 35))
        # And sharing resumes in both directions.
        await watcher.record(PAIR, [Observation(1, 0, 7, 0)])
        await eventually(lambda: learner.table(PAIR).cell(1, 0)[0] == pytest.approx(7))
    finally:
        await learner.close()
        await watcher.close()


async def test_slow_redis_does_not_slow_rounds_and_is_counted_once(redis_process):
    learner, watcher = redis_store(redis_process.url), redis_store(redis_process.url)
    try:
        await run_rounds(learner, 3, BAD)
        await learner.wait_idle()
        redis_process.pause()  # accepts bytes, answers nothing: every call times out
        slowest = await run_rounds(learner, 20, BAD)
        assert slowest < 0.1
        assert learner.table(PAIR).cell(0, 9) == pytest.approx((230, 23))
        redis_process.resume()
        # A write that timed out may still be applied when Redis wakes up; its retry must not
        # count it a second time.
        await run_rounds(learner, 2, BAD)
        await eventually(lambda: watcher.table(PAIR).cell(0, 9)[0] == pytest.approx(250), timeout_s=8)
        await asyncio.sleep(0.2)
        assert await watcher.sync(PAIR)
        assert watcher.table(PAIR).cell(0, 9) == pytest.approx((250, 25))
    finally:
        await learner.close()
        await watcher.close()


async def test_store_without_any_redis_serves_locally():
    store = redis_store("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        started = time.perf_counter()
        await run_rounds(store, 10, BAD)
        assert time.perf_counter() - started < 1.0
        assert store.table(PAIR).cell(0, 9) == pytest.approx((100, 10))
        assert not store.available
    finally:
        await store.close()


async def test_keys_are_namespaced_and_versioned(redis_server):
    store = redis_store(redis_server)
    client = Redis.from_url(redis_server)
    try:
        await store.record(PAIR, BAD)
        await store.wait_idle()
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys == [f"specmesh:v1:calib:16x10:{PAIR}", f"specmesh:v1:calib:16x10:{PAIR}:batches"]
        assert 0 < await client.ttl(keys[0]) and math.isfinite(await client.ttl(keys[0]))
    finally:
        await store.close()
        await client.aclose()


async def test_open_calibration_store_picks_the_backend(redis_server):
    from scheduler.calibration_store import open_calibration_store

    assert isinstance(open_calibration_store(None), InMemoryCalibrationStore)
    store = open_calibration_store(redis_server, timeout_s=0.1)
    try:
        assert isinstance(store, RedisCalibrationStore)
        assert await store.sync(PAIR)
    finally:
        await store.close()


def test_acceptance_grid_answers_what_the_table_answers():
    """The per-round snapshot the budget policy reads must be the table's own posterior."""
    import random

    from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation

    rng = random.Random(3)
    config = CalibrationConfig(num_buckets=5, max_positions=4)
    table = CalibrationTable(config)
    table.add([Observation(rng.randrange(6), rng.randrange(5), o, rng.uniform(0, o + 1))
               for o in (rng.uniform(0, 40) for _ in range(30))], now=0.0)
    grid = table.grid()
    for position in range(-1, 7):
        for confidence in (0.0, -0.5, float("nan"), 0.05, 0.2, 0.5, 0.79, 0.8, 0.999, 1.0, 1.7):
            assert grid.acceptance(position, confidence) == pytest.approx(table.acceptance(position, confidence),
                                                                           rel=1e-12, abs=1e-12), (position, confidence)
