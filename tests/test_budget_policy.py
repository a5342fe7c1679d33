"""The load-aware budget policy and the verifier cost model, in pure tests (plus cost profiles
shared through a real Redis)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.budget_policy import (
    choose_draft_length,
    AdaptiveBudgetPolicy,
    BudgetConfig,
    admission_survivals,
    batch_objective,
    choose_verify_lengths,
)
from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation
from scheduler.calibration_store import InMemoryCalibrationStore
from scheduler.cost_model import CostProfile, CostProfileRegistry
from scheduler.draft_policy import RoundOutcome
from scheduler.session import Session
from specmesh.records import DraftChunk, VerifyResult
from specmesh.sampling_params import SamplingParams
from tests.redis_server import redis_process, redis_server  # noqa: F401

PAIR = "verifier->drafter"
CONTEXT = 4096


def make_sessions(n: int, **kwargs) -> list[Session]:
    sessions = []
    for i in range(n):
        s = Session(f"s{i}", [1, 2, 3, 4], SamplingParams(temperature=1.0, seed=i), max_tokens=200, **kwargs)
        s.verifier_cached = len(s.tokens) - 1  # steady state: one new committed token each
        s.drafter_cached = len(s.tokens) - 1
        sessions.append(s)
    return sessions


def make_chunks(sessions: list[Session], confidences: list[list[float]] | list[float]) -> dict[str, DraftChunk]:
    chunks = {}
    for i, s in enumerate(sessions):
        conf = confidences[i] if isinstance(confidences[0], list) else confidences
        chunks[s.session_id] = DraftChunk(s.session_id, len(s.tokens), tokens=tuple(range(10, 10 + len(conf))),
                                          confidences=tuple(conf))
    return chunks


def warmed_store(acceptance_by_bucket: dict[int, float] | None = None, positions: int = 16,
                 volume: float = 1000.0) -> InMemoryCalibrationStore:
    """A store that has seen `volume` drafts per cell, accepted at the given rate per bucket
    (default: calibrated, i.e. acceptance = bucket centre)."""
    store = InMemoryCalibrationStore(CalibrationConfig(half_life_s=1e9))
    config = store.config
    rates = acceptance_by_bucket or {b: (b + 0.5) / config.num_buckets for b in range(config.num_buckets)}
    store.table(PAIR).add([Observation(p, b, volume, volume * rate) for p in range(positions)
                           for b, rate in rates.items()], now=store.clock())
    return store


def policy(store=None, profile: CostProfile | None = None, max_draft: int = 8, **config) -> AdaptiveBudgetPolicy:
    return AdaptiveBudgetPolicy(store or warmed_store(), profile, PAIR, max_draft,
                                config=BudgetConfig(measure_timing=False, **config))


FLAT = CostProfile.flat(0.030)  # launch-bound verifier: B tokens cost the same up to 1024
STEEP = CostProfile.linear(0.001, 0.010)  # compute-bound: every token costs 10x the fixed part


# --------------------------------------------------------------------------- cost model


def test_cost_profile_is_made_monotone_and_interpolates():
    profile = CostProfile.from_table([(1, 0.030), (2, 0.036), (4, 0.034), (8, 0.035), (16, 0.050), (2, 0.034)])
    seconds = [s for _, s in profile.points]
    assert seconds == sorted(seconds)  # the dip at 4 was pooled with its neighbours
    assert profile.forward_seconds(1) == pytest.approx(0.030)
    assert profile.forward_seconds(0) == pytest.approx(0.030)  # flat below the table
    assert profile.forward_seconds(12) == pytest.approx((profile.forward_seconds(8) + 0.050) / 2)
    # Beyond the table: extrapolated, never flatter than the average slope.
    assert profile.forward_seconds(32) > 0.050
    assert profile.steps_per_second(16) == pytest.approx(1 / 0.050)
    assert CostProfile.from_json(profile.to_json()) == profile
    single = CostProfile.from_table([(10, 0.1)])
    assert single.forward_seconds(20) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        CostProfile.from_table([])
    with pytest.raises(ValueError):
        CostProfile.from_table([(4, -1.0)])


# --------------------------------------------------------------------------- the policy's choices


def test_flat_cost_curve_verifies_long_drafts():
    sessions = make_sessions(4)
    p = policy(profile=FLAT)
    drafts = p.draft_lengths(sessions, CONTEXT)
    assert drafts == {s.session_id: 8 for s in sessions}
    lengths = p.verify_lengths(sessions, make_chunks(sessions, [0.9] * 8), drafts)
    assert lengths == {s.session_id: 8 for s in sessions}


def test_steep_cost_curve_verifies_short_drafts():
    sessions = make_sessions(4)
    p = policy(profile=STEEP)
    drafts = p.draft_lengths(sessions, CONTEXT)
    assert all(0 <= n <= 2 for n in drafts.values())
    lengths = p.verify_lengths(sessions, make_chunks(sessions, [0.9] * 8), {s.session_id: 8 for s in sessions})
    assert all(0 <= n <= 2 for n in lengths.values())


def test_load_shrinks_drafts_towards_plain_decoding():
    # Memory-bound up to 32 tokens, then every token costs as much as the base step.
    knee = CostProfile.from_table([(1, 0.030), (32, 0.031), (64, 0.062), (512, 0.496)])
    p = policy(profile=knee)
    light = p.draft_lengths(make_sessions(1), CONTEXT)
    heavy = p.draft_lengths(make_sessions(200), CONTEXT)
    assert list(light.values()) == [8]
    assert set(heavy.values()) == {0}  # speculation off under saturation


def test_zero_confidence_drafts_verify_none():
    sessions = make_sessions(3)
    zero = make_chunks(sessions, [0.0] * 6)
    # Cold calibration: the first draft is judged by its position alone (never by its own
    # confidence), so at most it is verified; nothing after a zero-confidence draft is.
    cold = policy(InMemoryCalibrationStore(), profile=FLAT)
    assert all(n <= 1 for n in cold.verify_lengths(sessions, zero, {s.session_id: 6 for s in sessions}).values())
    # Once rounds have shown that such drafts are rejected, none is verified or even drafted.
    learned = InMemoryCalibrationStore()
    learned.table(PAIR).add([Observation(p, 0, 50, 0) for p in range(16)], now=learned.clock())
    p = policy(learned, profile=STEEP)
    assert set(p.verify_lengths(sessions, zero, {s.session_id: 6 for s in sessions}).values()) == {0}
    assert set(p.draft_lengths(sessions, CONTEXT).values()) == {0}


def test_low_confidence_prefix_stops_verification_early():
    sessions = make_sessions(2)
    p = policy(profile=CostProfile.linear(0.030, 0.002))
    chunks = make_chunks(sessions, [[0.95, 0.95, 0.95, 0.95, 0.95, 0.95], [0.95, 0.05, 0.95, 0.95, 0.95, 0.95]])
    lengths = p.verify_lengths(sessions, chunks, {s.session_id: 6 for s in sessions})
    assert lengths["s0"] >= 4
    assert lengths["s1"] <= 2  # draft 1 is verified or not by position; draft 2 follows a 0.05


def test_per_request_limits_are_honoured():
    sessions = make_sessions(3)
    sessions[0].disable_speculation = True
    sessions[1].max_draft_tokens = 2
    sessions[2].max_tokens = len(sessions[2].tokens) - len(sessions[2].prompt_tokens) + 3  # 3 left
    p = policy(profile=FLAT)
    drafts = p.draft_lengths(sessions, CONTEXT)
    assert drafts == {"s0": 0, "s1": 2, "s2": 2}
    chunks = make_chunks(sessions, [0.9] * 8)
    assert p.verify_lengths(sessions, chunks, {s.session_id: 8 for s in sessions}) == drafts
    assert policy(profile=FLAT).draft_lengths(make_sessions(1), context_limit=7) == {"s0": 3}


def test_missing_or_short_chunks_cap_verification():
    sessions = make_sessions(3)
    chunks = make_chunks(sessions[:1], [0.9] * 2)
    chunks["s1"] = DraftChunk("s1", 4, cache_miss=True)
    lengths = policy(profile=FLAT).verify_lengths(sessions, chunks, {s.session_id: 8 for s in sessions})
    assert lengths == {"s0": 2, "s1": 0, "s2": 0}


def test_draft_ahead_follows_chunk_survival():
    sessions = make_sessions(1)
    confident = policy(warmed_store({b: 0.98 for b in range(10)}), profile=FLAT)
    assert confident.draft_ahead_chunks(sessions, {"s0": 4})["s0"] >= 1
    doubtful = policy(warmed_store({b: 0.4 for b in range(10)}), profile=FLAT)
    assert doubtful.draft_ahead_chunks(sessions, {"s0": 4}) == {"s0": 0}
    assert confident.draft_ahead_chunks(sessions, {"s0": 0}) == {"s0": 0}


async def test_observe_feeds_calibration_and_changes_decisions():
    store = InMemoryCalibrationStore()
    p = AdaptiveBudgetPolicy(store, STEEP, PAIR, 8, config=BudgetConfig(measure_timing=False))
    sessions = make_sessions(1)
    before = p.draft_lengths(sessions, CONTEXT)["s0"]
    chunk = make_chunks(sessions, [0.99] * 8)["s0"]
    for _ in range(30):  # every draft accepted
        item = sessions[0].verify_item(chunk, 8)
        await p.observe([RoundOutcome(chunk, item, VerifyResult("s0", accepted_count=8, next_token=1))])
    assert store.table(PAIR).position_acceptance(3) > 0.9
    assert p.draft_lengths(sessions, CONTEXT)["s0"] > before


async def test_measured_drafting_cost_turns_speculation_off_when_it_does_not_pay():
    """Drafting on the critical path at c ~ 0.21 of a verifier step plus an RPC, and 15%
    acceptance: even one draft token loses (1.15 tokens per 1.27 steps), so once the policy has
    measured drafting it stops."""
    now = [0.0]
    store = warmed_store({b: 0.15 for b in range(10)})
    p = AdaptiveBudgetPolicy(store, CostProfile.flat(0.085), PAIR, 8, clock=lambda: now[0])
    sessions = make_sessions(1)
    assert p.draft_lengths(sessions, CONTEXT)["s0"] > 0  # nothing measured yet
    for _ in range(20):
        lengths = p.draft_lengths(sessions, CONTEXT)
        k = lengths["s0"]
        now[0] += 0.005 + 0.018 * k  # one RPC plus one drafter step per token (c ~ 0.21)
        chunks = make_chunks(sessions, [0.15] * k) if k else {}
        verify = p.verify_lengths(sessions, chunks, lengths)
        now[0] += 0.085
        chunk = chunks.get("s0")
        item = sessions[0].verify_item(chunk, verify["s0"])
        await p.observe([RoundOutcome(chunk, item, VerifyResult("s0", accepted_count=0, next_token=1))])
    assert p.draft_lengths(sessions, CONTEXT)["s0"] == 0
    # The same acceptance with free drafting (drafted ahead, off the critical path) pays.
    assert policy(store, profile=CostProfile.flat(0.085)).draft_lengths(sessions, CONTEXT)["s0"] > 0


def test_policy_per_verifier_reads_its_own_cost_curve():
    registry = CostProfileRegistry()
    registry.set_local("10.0.0.1:7000", FLAT)
    registry.set_local("10.0.0.2:7000", STEEP)
    base = AdaptiveBudgetPolicy(warmed_store(), registry, PAIR, 8, config=BudgetConfig(measure_timing=False))
    sessions = make_sessions(4)
    fast = base.for_verifier("10.0.0.1:7000").draft_lengths(sessions, CONTEXT)
    slow = base.for_verifier("10.0.0.2:7000").draft_lengths(sessions, CONTEXT)
    assert min(fast.values()) > max(slow.values())
    # Unbound with two verifiers known: no curve to pick; measured or flat fallback, no error.
    assert len(base.draft_lengths(sessions, CONTEXT)) == 4


# --------------------------------------------------------------------------- properties

confidence = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def batches(draw):
    """Sessions' confidences, a calibration table, and a convex non-decreasing cost curve."""
    num_sessions = draw(st.integers(1, 6))
    confidences = [draw(st.lists(confidence, min_size=0, max_size=8)) for _ in range(num_sessions)]
    config = CalibrationConfig(num_buckets=4, max_positions=8)
    table = CalibrationTable(config)
    cells = draw(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.integers(1, 50), confidence),
                          max_size=12))
    table.add([Observation(p, b, n, round(n * rate)) for p, b, n, rate in cells], now=0.0)
    base = draw(st.floats(0.001, 1.0))
    slope = draw(st.floats(0.0, 0.5))
    knee = draw(st.integers(1, 40))
    extra = draw(st.floats(0.0, 0.5))
    return confidences, table, (lambda b: base + slope * b + extra * max(0, b - knee))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_choice_beats_every_fixed_length(case):
    confidences, table, seconds = case
    positions = table.position_acceptances(8)
    survivals = [admission_survivals(c, len(c), table, positions) for c in confidences]
    base_tokens = len(confidences)
    lengths, objective = choose_verify_lengths(survivals, base_tokens, seconds)
    assert objective == pytest.approx(batch_objective(survivals, lengths, base_tokens, seconds))
    for fixed in range(9):
        fixed_lengths = [min(fixed, len(c)) for c in confidences]
        assert objective >= batch_objective(survivals, fixed_lengths, base_tokens, seconds) * (1 - 1e-9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 5), st.sampled_from(["flat", "steep", "knee", "bumpy"]))
def test_admission_of_a_draft_never_depends_on_its_own_confidence(data, num_sessions, curve):
    """Change conf_{r,j} (and anything after it in that chunk): whether draft j of session r
    is verified must not change. Any cost curve, any calibration, any batch."""
    profiles = {
        "flat": FLAT, "steep": STEEP,
        "knee": CostProfile.from_table([(1, 0.03), (8, 0.031), (16, 0.06), (64, 0.25)]),
        "bumpy": CostProfile.from_table([(1, 0.02), (2, 0.035), (9, 0.036), (10, 0.07), (40, 0.08)]),
    }
    rates = data.draw(st.lists(confidence, min_size=10, max_size=10))
    p = policy(warmed_store(dict(enumerate(rates)), volume=data.draw(st.sampled_from([1.0, 20.0]))),
               profile=profiles[curve])
    sessions = make_sessions(num_sessions)
    confidences = [data.draw(st.lists(confidence, min_size=0, max_size=8)) for _ in sessions]
    chunks = {}
    for s, c in zip(sessions, confidences):
        chunks[s.session_id] = DraftChunk(s.session_id, 4, tuple(range(len(c))), tuple(c))
    drafts = {s.session_id: len(c) for s, c in zip(sessions, confidences)}
    before = p.verify_lengths(sessions, chunks, drafts)
    r = data.draw(st.integers(0, num_sessions - 1))
    if not confidences[r]:
        return
    j = data.draw(st.integers(0, len(confidences[r]) - 1))
    changed = list(confidences[r][:j]) + data.draw(st.lists(confidence, min_size=len(confidences[r]) - j,
                                                            max_size=len(confidences[r]) - j))
    sid = sessions[r].session_id
    chunks[sid] = DraftChunk(sid, 4, tuple(range(len(changed))), tuple(changed))
    after = p.verify_lengths(sessions, chunks, drafts)
    assert (before[sid] > j) == (after[sid] > j)


@settings(max_examples=200, deadline=None)
@given(st.lists(confidence, min_size=1, max_size=10), st.integers(0, 9), confidence)
def test_admission_survival_of_draft_j_ignores_confidence_j(confidences, j, replacement):
    j = min(j, len(confidences) - 1)
    table = warmed_store().table(PAIR)
    positions = table.position_acceptances(len(confidences))
    before = admission_survivals(confidences, len(confidences), table, positions)
    changed = list(confidences)
    changed[j] = replacement
    after = admission_survivals(changed, len(changed), table, positions)
    assert before[: j + 1] == after[: j + 1]
    assert all(x >= y for x, y in zip(before, before[1:]))  # non-increasing: prefix-closed ranking


# --------------------------------------------------------------------------- shared cost profiles


async def test_cost_profiles_are_shared_with_a_ttl(redis_server):
    publisher = CostProfileRegistry(redis_server, ttl_s=0.5, refresh_interval_s=0.05)
    reader = CostProfileRegistry(redis_server, ttl_s=0.5, refresh_interval_s=0.05)
    try:
        assert await publisher.publish("10.1.2.3:50052", STEEP)
        assert await reader.refresh()
        assert reader.profile("10.1.2.3:50052") == STEEP
        assert reader.profiles() == {"10.1.2.3:50052": STEEP}
        # Nobody re-publishes it: it expires with its TTL.
        await asyncio.sleep(0.7)
        assert await reader.refresh()
        assert reader.profile("10.1.2.3:50052") is None
        # set_local publishes in the background and keeps it alive while it is used.
        publisher.set_local("10.1.2.4:50052", FLAT)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            publisher.profile("10.1.2.4:50052")  # use keeps it published
            reader.profile("10.1.2.4:50052")  # use keeps the reader refreshing
            if reader.profile("10.1.2.4:50052") == FLAT and time.monotonic() > deadline - 2.0:
                break
            await asyncio.sleep(0.05)
        assert reader.profile("10.1.2.4:50052") == FLAT
        assert reader.profile(None) == FLAT  # the only one known
    finally:
        await publisher.close()
        await reader.close()


async def test_cost_registry_without_redis_serves_local_profiles(redis_process):
    registry = CostProfileRegistry(redis_process.url, timeout_s=0.05)
    try:
        redis_process.kill()
        started = time.perf_counter()
        registry.set_local("v:1", FLAT)
        assert registry.profile("v:1") == FLAT
        assert not await registry.publish("v:1", FLAT)
        assert not await registry.refresh()
        assert time.perf_counter() - started < 0.5
        assert registry.profile("v:1") == FLAT
    finally:
        await registry.close()


# --------------------------------------------------------------------------- in the real loop


def _next_token(context: list[int]) -> int:
    """A toy greedy 'verifier model'."""
    return (sum(context) * 31 + 7 * len(context)) % 50


def _drafter_is_right(context: list[int]) -> bool:
    return (sum(context) * 17 + len(context)) % 10 < 7  # ~70% of positions


class _ToyVerifier:
    def __init__(self) -> None:
        self.cache: dict[str, list[int]] = {}
        self.batch_tokens: list[int] = []

    async def verify(self, items):
        await asyncio.sleep(0.003)
        self.batch_tokens.append(sum(len(i.new_tokens) + len(i.draft_tokens) for i in items))
        results = []
        for item in items:
            context = self.cache.get(item.session_id, [])[: item.num_cached_tokens] + list(item.new_tokens)
            accepted = 0
            for token in item.draft_tokens:
                if token != _next_token(context + list(item.draft_tokens[:accepted])):
                    break
                accepted += 1
            context += list(item.draft_tokens[:accepted])
            self.cache[item.session_id] = context
            results.append(VerifyResult(item.session_id, accepted, _next_token(context), (), len(context)))
        return results

    async def release(self, session_ids):
        for sid in session_ids:
            self.cache.pop(sid, None)


class _ToyDrafter:
    def __init__(self) -> None:
        self.cache: dict[str, list[int]] = {}

    async def draft(self, requests):
        await asyncio.sleep(0.001)
        chunks = []
        for request in requests:
            context = self.cache.get(request.session_id, [])[: request.num_cached_tokens] + list(request.new_tokens)
            base = len(context)
            tokens, confidences = [], []
            for _ in range(request.num_draft_tokens):
                right = _drafter_is_right(context)
                token = _next_token(context) if right else (_next_token(context) + 1) % 50
                tokens.append(token)
                confidences.append(0.85 if right else 0.35)
                context.append(token)
            self.cache[request.session_id] = context[:-1] if tokens else context
            chunks.append(DraftChunk(request.session_id, base, tuple(tokens), tuple(confidences),
                                     num_cached_tokens=len(self.cache[request.session_id])))
        return chunks

    async def release(self, session_ids):
        for sid in session_ids:
            self.cache.pop(sid, None)


def _plain_greedy(prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):
        out.append(_next_token(out))
    return out[len(prompt):]


async def test_speculation_loop_with_adaptive_policy_survives_redis_loss(redis_process):
    from scheduler.calibration_store import RedisCalibrationStore
    from scheduler.speculation_loop import SpeculationLoop

    store = RedisCalibrationStore(redis_process.url, timeout_s=0.05, refresh_interval_s=0.05,
                                  min_backoff_s=0.05, max_backoff_s=0.2)
    registry = CostProfileRegistry(redis_process.url, timeout_s=0.05)
    registry.set_local("toy:1", CostProfile.from_table([(1, 0.003), (64, 0.0036), (256, 0.012)]))
    base = AdaptiveBudgetPolicy(store, registry, PAIR, max_draft_tokens=6)
    verifier = _ToyVerifier()
    loop = SpeculationLoop(verifier, _ToyDrafter(), base.for_verifier("toy:1"), context_limit=4096)
    prompts = [[i + 1, 2 * i + 3, 5] for i in range(8)]

    async def run(i: int) -> list[int]:
        session = Session(f"r{i}", prompts[i], SamplingParams(seed=i), max_tokens=60)
        out: list[int] = []
        async for commit in loop.stream(session):
            out += commit.token_ids
        return out

    async def kill_and_restart() -> None:
        await asyncio.sleep(0.1)
        redis_process.kill()
        await asyncio.sleep(0.2)
        redis_process.start()

    try:
        results = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(8)), kill_and_restart()), 30)
        for i in range(8):
            assert results[i] == _plain_greedy(prompts[i], 60)
        assert loop.num_rounds < 8 * 60 / 2  # speculation paid: well over 2 tokens per round
        # Calibration learned that 0.35-confidence drafts fail and 0.85 ones mostly survive.
        table = store.table(PAIR)
        assert table.acceptance(1, 0.85) > 0.6 > 0.2 > table.acceptance(1, 0.35)
    finally:
        await loop.close()
        await store.close()
        await registry.close()


def test_a_marginal_predicted_gain_does_not_draft():
    """min_speedup: drafting must be predicted to beat plain decoding by a margin, because the
    measured cost model is noisy and a marginal predicted gain was a real loss (GPU bench)."""
    caps = [4] * 64
    survival = [0.6, 0.2, 0.05, 0.01]

    def seconds(batch_tokens: int, steps: int) -> float:  # plain 15 ms; one draft step +7.5 ms
        return 0.015 + 0.000012 * (batch_tokens - 64) + (0.0075 + 0.003 * (steps - 1) if steps else 0.0)

    k, value = choose_draft_length(caps, survival, 64, seconds)
    assert k >= 1 and 1.0 < value / (64 / seconds(64, 0)) < 1.05  # a 1-4% predicted gain
    k, value = choose_draft_length(caps, survival, 64, seconds, min_speedup=1.05)
    assert k == 0 and value == pytest.approx(64 / seconds(64, 0))
    # A clear gain still drafts.
    k, _ = choose_draft_length(caps, [0.9, 0.81, 0.73, 0.66], 64, seconds, min_speedup=1.05)
    assert k >= 2


def test_verify_overhead_that_grows_with_batch_tokens_shortens_drafts():
    """The start-up profile times a bare forward; what rounds really cost beyond it is fitted
    against B, so a per-token overhead (Python per verified token in both services) makes long
    drafts cost what they do, and the plan shortens them."""
    profile = CostProfile.linear(0.010, 0.00002)  # 10 ms + 20 us a token: drafts look cheap
    store = warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)})
    sessions = make_sessions(64)

    def longest_draft(seconds_per_token: float) -> int:
        planner = policy(store, profile)
        now = planner.clock()
        for batch_tokens in (64, 128, 192, 256, 320, 384):
            planner.verify_overhead.add(64, batch_tokens, 0.002 + seconds_per_token * batch_tokens, now)
        return max(planner.draft_lengths(sessions, CONTEXT).values())

    constant, growing = longest_draft(0.0), longest_draft(0.00015)
    assert growing < constant, (growing, constant)
    assert growing >= 1  # still worth drafting, only less


def test_round_timing_fit_without_spread_puts_the_cost_where_it_is_told():
    from scheduler.round_timing import LinearFit

    marginal, constant = LinearFit(), LinearFit(without_spread="intercept")
    for fit in (marginal, constant):
        for _ in range(5):
            fit.add(4, 0.020, now=0.0)
    assert marginal.coefficients(0.0) == pytest.approx((0.0, 0.005))  # draft steps: conservative
    assert constant.coefficients(0.0) == pytest.approx((0.020, 0.0))  # overhead: seen, not assumed
    for fit in (marginal, constant):  # with spread both see the same line
        for x in (1, 2, 8):
            fit.add(x, 0.010 + 0.0025 * x, now=0.0)
    a, b = marginal.coefficients(0.0)
    assert b > 0 and constant.coefficients(0.0) == pytest.approx((a, b))


def test_round_timing_fit_retires_a_few_old_slow_rounds_once_newer_rounds_outnumber_them():
    """Warm-up rounds before the CUDA graphs of their shape existed (GPU bench: 33 ms against 10)
    must not price every verified token for good: decay alone keeps their slope, since it
    shrinks every sum alike, and a policy that stops drafting never makes other lengths to
    outweigh them."""
    from scheduler.round_timing import LinearFit

    fit = LinearFit(half_life_s=30.0, without_spread="intercept")
    for t in range(5):
        fit.add(9, 0.026, now=0.01 * t)  # slow warm-up rounds of 8 drafts
    for t in range(20):
        fit.add(1, 0.0021, now=0.1 + 0.01 * t)
    intercept, slope = fit.coefficients(0.3)
    assert slope > 0.002  # while they are a fifth of the data they speak
    for t in range(600):
        fit.add(1, 0.0021, now=0.3 + 0.01 * t)
    assert fit.coefficients(6.3) == pytest.approx((0.0021, 0.0))
    for t in range(100):  # rounds of other lengths at their real cost make the slope again
        fit.add(3 if t % 4 else 5, 0.002 + 0.0001 * (3 if t % 4 else 5), now=6.3 + 0.01 * t)
    intercept, slope = fit.coefficients(7.3)
    assert (intercept, slope) == pytest.approx((0.002, 0.0001))


def test_a_few_slow_rounds_of_long_drafts_do_not_price_every_draft_for_good():
    """The GPU bench, one session at acceptance 0.8: five rounds of 8 drafts ran before their
    CUDA graphs existed (26 ms beyond the profile). Hundreds of later rounds of 4-5 drafts (2 ms)
    never retired the slope those five made (the plan went down to 3 drafts; where the plan
    then stopped drafting, to 0.94x against 1.85x possible)."""
    now = [0.0]
    p = AdaptiveBudgetPolicy(warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)}, volume=1e7),
                             CostProfile.linear(0.0076, 0.00001), PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0))
    for steps in (2, 3, 4, 5):
        p.draft_cost.add(1, steps, 0.0016 + 0.0014 * steps, now[0])
    for _ in range(5):
        p.verify_overhead.add(1, 9, 0.026, now[0])
    for i in range(600):
        now[0] += 0.01
        p.verify_overhead.add(1, 6 if i % 4 == 0 else 5, 0.002, now[0])
    assert max(p.draft_lengths(make_sessions(1), CONTEXT).values()) >= 4


async def test_rounds_without_drafts_are_priced_apart_from_rounds_that_verify_some():
    """H200, one session: verifying any drafts at all costs a step (2.3 ms beyond the profile
    without drafts, 4.1-4.5 ms with 2-4). One line through both priced each verified token at
    1.5 ms, so 8 drafts looked 12 ms dearer than they are, and a 60% drafter never drafted."""
    now = [0.0]
    profile = CostProfile.linear(0.0076, 0.00001)
    p = AdaptiveBudgetPolicy(warmed_store({b: 0.9 for b in range(CalibrationConfig().num_buckets)}, volume=1e7),
                             profile, PAIR, 8, clock=lambda: now[0], config=BudgetConfig(explore_draft_tokens=0))
    sessions = make_sessions(1)
    for i in range(400):  # mostly plain rounds, now and then one that verifies a few drafts
        drafts = 2 + i % 3 if i % 20 == 0 else 0
        chunks = make_chunks(sessions, [0.99] * drafts) if drafts else {}
        verified = sum(p.verify_lengths(sessions, chunks, {s.session_id: drafts for s in sessions}).values())
        assert verified == drafts
        now[0] += profile.forward_seconds(1 + verified) + (0.0043 if verified else 0.0023)
        await p.observe([RoundOutcome(chunks.get(s.session_id), s.verify_item(chunks.get(s.session_id), verified),
                                      VerifyResult(s.session_id, accepted_count=0, next_token=1)) for s in sessions])
    seconds = p.verify_seconds_fn(1, 1)
    assert seconds(1) == pytest.approx(profile.forward_seconds(1) + 0.0023, rel=0.01)
    assert seconds(9) == pytest.approx(profile.forward_seconds(9) + 0.0043, rel=0.01)


def test_round_timing_fit_reads_a_falling_line_like_no_spread():
    """GPU bench, 64 sessions: a slow early round of 2 drafts and normal ones of 4 made a line
    that falls with the number of steps. Read as a flat cost it made 8 steps look as cheap as 4
    and every later round drafted 8; a draft fit prices the steps as marginal instead."""
    from scheduler.round_timing import LinearFit

    draft, overhead = LinearFit(), LinearFit(without_spread="intercept")
    points = ((4, 0.018), (2, 0.044), (4, 0.017), (4, 0.019))
    for fit in (draft, overhead):
        for x, y in points:
            fit.add(x, y, now=0.0)
    per_step = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
    assert draft.coefficients(0.0) == pytest.approx((0.0, per_step))  # 8 steps cost twice 4
    assert overhead.coefficients(0.0) == pytest.approx((sum(y for _, y in points) / 4, 0.0))


def test_a_busy_round_that_drafted_verifies_its_drafts_despite_the_step_verifying_costs():
    """Verifying any drafts at all costs a step beyond a plain round. Charged to the first
    candidate of 64 sessions' it outweighs that one draft's gain, and the greedy stopped there
    every round: 8 drafts drafted, 1.2 verified a session (GPU bench). The round chose to draft
    knowing the step; verification must not re-decide it from one candidate."""
    now = 0.0
    profile = CostProfile.linear(0.010, 0.00002)
    p = AdaptiveBudgetPolicy(warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)}, volume=1e7),
                             profile, PAIR, 8, clock=lambda: now, config=BudgetConfig(explore_draft_tokens=0))
    for _ in range(50):
        p.plain_overhead.add(64, 64, 0.004, now)
        for batch_tokens in (256, 320):
            p.verify_overhead.add(64, batch_tokens, 0.007, now)
    sessions = make_sessions(64)
    chunks = make_chunks(sessions, [0.8] * 4)
    verify = p.verify_lengths(sessions, chunks, {s.session_id: 4 for s in sessions})
    assert sum(verify.values()) >= 2 * 64


def test_round_timing_fit_counts_one_far_outlier_as_a_few_times_its_points_mean():
    """A CUDA graph captured mid-load made one 4-step draft call take 289 ms among dozens of
    17 ms; it must not move the price of 4 steps by more than a few ms, while a real, lasting
    rise in cost is still followed."""
    from scheduler.round_timing import LinearFit

    fit = LinearFit(without_spread="intercept")
    for _ in range(20):
        fit.add(4, 0.017, now=0.0)
    fit.add(4, 0.289, now=0.0)
    assert fit.coefficients(0.0)[0] < 0.017 + 0.002
    for _ in range(40):
        fit.add(4, 0.040, now=0.0)
    assert fit.coefficients(0.0)[0] > 0.030


def test_draft_calls_whose_sessions_mostly_stop_short_are_not_timed():
    """At the end of a wave most sessions can draft only a token or two before their limit,
    so a round planned at 8 runs 8 steps of a batch of one (GPU bench, 64 sessions: 8 steps in
    12 ms against 4 steps of all 64 in 17 ms): as a point of the draft-cost line it flattened
    the step cost, and the plan drafted longer than paid."""
    now = [0.0]
    p = AdaptiveBudgetPolicy(warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)}, volume=1e7),
                             CostProfile.flat(0.010), PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0, dither_every_rounds=0))

    def drafting_round(sessions: list[Session]) -> None:
        lengths = p.draft_lengths(sessions, CONTEXT)
        now[0] += 0.012
        chunks = {s.session_id: DraftChunk(s.session_id, len(s.tokens), tokens=(7,) * lengths[s.session_id],
                                           confidences=(0.8,) * lengths[s.session_id]) for s in sessions}
        p.verify_lengths(sessions, chunks, lengths)

    ending = make_sessions(8)
    for s in ending[1:]:
        s.max_tokens = s.num_generated + 2  # one draft left before the limit
    drafting_round(ending)
    assert not p.draft_cost.fits
    drafting_round(make_sessions(8))
    assert p.draft_cost.fits


def test_load_bucketed_fit_keeps_each_load_apart_and_borrows_the_nearest():
    from scheduler.round_timing import LoadBucketedFit, load_bucket

    assert [load_bucket(n) for n in (1, 2, 3, 4, 7, 8, 64, 127)] == [0, 1, 1, 2, 2, 3, 6, 6]
    fit = LoadBucketedFit()
    assert fit.coefficients(1, 0.0) is None
    for steps in (1, 2, 3, 4):
        fit.add(1, steps, 0.001 + 0.001 * steps, now=0.0)
        fit.add(64, steps, 0.002 + 0.003 * steps, now=0.0)
    assert fit.coefficients(1, 0.0) == pytest.approx((0.001, 0.001))
    assert fit.coefficients(64, 0.0) == pytest.approx((0.002, 0.003))
    assert fit.coefficients(48, 0.0) == pytest.approx((0.002, 0.003))  # same bucket (32-63 is next to 64)
    assert fit.coefficients(2, 0.0) == pytest.approx((0.001, 0.001))  # nearest: 1
    assert fit.coefficients(512, 0.0) == pytest.approx((0.002, 0.003))  # nearest: 64


def test_a_faded_fit_of_the_rounds_own_load_outranks_a_live_fit_of_another_load():
    """Between waves of 64 sessions the 64-session draft fit fades while the light tail of each
    wave keeps a 16-session fit alive; borrowing that one priced busy rounds' drafts at half
    their cost. The own fit speaks for four more half-lives first, then the neighbour's."""
    from scheduler.round_timing import LoadBucketedFit

    fit = LoadBucketedFit(half_life_s=30.0, min_weight=3.0)
    for steps in (1, 2, 3, 4):
        fit.add(64, steps, 0.004 + 0.0033 * steps, now=0.0)  # weight 4 at t = 0
    assert fit.coefficients(64, 0.0) == pytest.approx((0.004, 0.0033))
    for t in range(0, 200, 2):  # a live light-load fit, fed all along
        fit.add(16, 1 + t % 4, 0.003 + 0.0015 * (1 + t % 4), now=float(t))
    # One half-life later the 64 fit holds weight 2 < 3: faded, and still the one that speaks.
    assert fit.fits[6].coefficients(30.0) is None
    assert fit.coefficients(64, 30.0) == pytest.approx((0.004, 0.0033))
    # Below min_weight / 16 (4 -> 3/16 after ~4.4 half-lives) it retires and the neighbour speaks.
    assert fit.coefficients(64, 140.0) == pytest.approx((0.003, 0.0015))
    # A load that never had a fit of its own borrows as before.
    assert fit.coefficients(1, 140.0) == pytest.approx((0.003, 0.0015))


async def test_drafts_are_sized_by_what_steps_cost_at_the_rounds_own_load():
    """A drafter step costs 1.2 ms for one session and 3.5 ms for 64 (and the verifier's
    per-token work beyond its bare forward is 40 us). After many light rounds and fewer busy
    ones, as in a benchmark that runs concurrency 1 before 64, the busy rounds draft the length
    that is best at their own load, not one priced with the light rounds' step cost (one fit
    pooled over both loads drafts 4 here, against a best of 2)."""
    now = [0.0]
    profile = CostProfile.linear(0.008, 0.000025)
    store = warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)}, volume=1e7)
    p = AdaptiveBudgetPolicy(store, profile, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0, min_speedup=1.0))

    def step_seconds(n: int) -> float:
        return 0.0012 if n == 1 else 0.0035

    def verify_seconds(batch_tokens: int) -> float:
        return profile.forward_seconds(batch_tokens) + 0.0015 + 0.00004 * batch_tokens

    async def run(sessions: list[Session], rounds: int) -> list[int]:
        chosen = []
        for _ in range(rounds):
            lengths = p.draft_lengths(sessions, CONTEXT)
            k = max(lengths.values())
            chosen.append(k)
            now[0] += 0.0008 + step_seconds(len(sessions)) * k if k else 0.0
            chunks = make_chunks(sessions, [0.8] * k) if k else {}
            verify = p.verify_lengths(sessions, chunks, lengths)
            now[0] += verify_seconds(len(sessions) + sum(verify.values()))
            await p.observe([RoundOutcome(chunks.get(s.session_id), s.verify_item(chunks.get(s.session_id),
                                                                                   verify[s.session_id]),
                                          VerifyResult(s.session_id, accepted_count=verify[s.session_id],
                                                       next_token=1)) for s in sessions])
        return chosen

    light, busy = make_sessions(1), make_sessions(64)
    await run(light, 400)
    chosen = await run(busy, 120)
    # (The same busy rounds alone, never dithered, keep drafting their first guess of 4:
    # test_dithering_shows_the_fits_what_a_step_costs.)

    def best(n: int) -> int:
        survival = [0.8 ** (j + 1) for j in range(8)]
        return choose_draft_length([8] * n, survival, n, lambda b, steps: verify_seconds(b) + (
            0.0008 + step_seconds(n) * steps if steps else 0.0))[0]

    assert best(64) < best(1)
    settled = chosen[-40:]
    assert max(set(settled), key=settled.count) == best(64), (settled, best(64))
    assert min(settled) >= best(64) - 1 and max(settled) <= best(64) + 1
    light_plan = [max(p.draft_lengths(light, CONTEXT).values()) for _ in range(8)]
    assert max(set(light_plan), key=light_plan.count) >= best(1) - 1, (light_plan, best(1))


def test_a_steady_decision_is_repeated_without_planning():
    """After steady_rounds planned rounds that drafted the same length and verified every draft,
    repeat_rounds rounds repeat that decision without deriving it (the derivation is the
    policy's Python on the round's critical path) and verify every drafted token; then a round
    is planned again. Verification that trims, or other sessions, end the repeating."""
    store = warmed_store({b: 0.9 for b in range(CalibrationConfig().num_buckets)})
    p = policy(store, FLAT, explore_draft_tokens=0, dither_every_rounds=0, steady_rounds=3, repeat_rounds=4)
    planned: list[bool] = []
    original = p._plan_verification

    def counting(*args, **kwargs):
        planned.append(True)
        return original(*args, **kwargs)

    p._plan_verification = counting

    def one_round(sessions, confidence: float) -> tuple[int, dict[str, int], dict[str, int]]:
        before = len(planned)
        lengths = p.draft_lengths(sessions, CONTEXT)
        k = max(lengths.values())
        chunks = make_chunks(sessions, [confidence] * k)
        verified = p.verify_lengths(sessions, chunks, lengths)
        return len(planned) - before, lengths, verified

    sessions = make_sessions(2)
    rounds = [one_round(sessions, 0.95) for _ in range(16)]
    k = max(rounds[0][1].values())
    assert k > 0
    assert [r[0] for r in rounds] == [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    for _, lengths, verified in rounds:
        assert set(lengths.values()) == {k}
        assert verified == lengths  # every drafted token verified, repeated or planned
    # Other sessions end the repeat at once: the next round is planned.
    for _ in range(3):
        one_round(sessions, 0.95)
    assert one_round(make_sessions(3), 0.95)[0] == 1
    # Drafts that verification trims are never repeated unexamined.
    # (A calibrated table: a draft's acceptance is its confidence. Two drafts are planned and,
    # after a first draft of confidence 0.3, the second is not worth verifying.)
    p2 = policy(warmed_store(), CostProfile.linear(0.010, 0.001), explore_draft_tokens=0, dither_every_rounds=0,
                steady_rounds=3, repeat_rounds=4)
    trimmed = 0
    for _ in range(12):
        lengths = p2.draft_lengths(sessions, CONTEXT)
        assert max(lengths.values()) == 2
        chunks = make_chunks(sessions, [0.3] * 2)
        verified = p2.verify_lengths(sessions, chunks, lengths)
        assert p2._repeated_round is None
        trimmed += sum(lengths.values()) - sum(verified.values())
    assert trimmed > 0


def test_one_planned_round_in_four_drafts_one_token_more_or_fewer_at_the_cap():
    """Dithering offers the position after the plan's last one (so the calibration keeps
    learning it) and, where no session may draft more, one token fewer."""
    store = warmed_store({b: 0.9 for b in range(CalibrationConfig().num_buckets)})
    sessions = make_sessions(2)
    # (steady_rounds=0: planned every round, no repeats; see test_a_steady_decision_is_repeated_without_planning.)
    at_cap = policy(store, FLAT, explore_draft_tokens=0, dither_every_rounds=4, steady_rounds=0)
    plans = [max(at_cap.draft_lengths(sessions, CONTEXT).values()) for _ in range(12)]
    assert set(plans) == {7, 8} and [i for i, v in enumerate(plans) if v == 7] == [3, 7, 11]
    below = policy(store, CostProfile.linear(0.010, 0.002), explore_draft_tokens=0, dither_every_rounds=4,
                   steady_rounds=0)
    plans = [max(below.draft_lengths(sessions, CONTEXT).values()) for _ in range(12)]
    k = min(plans)
    assert 1 <= k < 8 and set(plans) == {k, k + 1} and [i for i, v in enumerate(plans) if v == k + 1] == [3, 7, 11]
    steady = policy(store, CostProfile.linear(0.010, 0.002), explore_draft_tokens=0, dither_every_rounds=0)
    assert {max(steady.draft_lengths(sessions, CONTEXT).values()) for _ in range(12)} == {k}


@pytest.mark.parametrize("dither", [0, 4])
async def test_dithering_shows_the_fits_what_a_step_costs(dither):
    """64 sessions, a verifier whose per-token work beyond its bare forward is 40 us (the start-up
    profile does not see it) and 3.5 ms a draft step. A policy that always drafts the same length
    puts the whole overhead into a constant and keeps drafting 4; dithered rounds (one token
    more, one round in four) show the fits the marginal cost and it settles on the best length."""
    now = [0.0]
    profile = CostProfile.linear(0.008, 0.000025)
    store = warmed_store({b: 0.8 for b in range(CalibrationConfig().num_buckets)}, volume=1e7)
    p = AdaptiveBudgetPolicy(store, profile, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0, min_speedup=1.0, dither_every_rounds=dither))

    def verify_seconds(batch_tokens: int) -> float:
        return profile.forward_seconds(batch_tokens) + 0.0015 + 0.00004 * batch_tokens

    def draft_seconds(steps: int) -> float:
        return 0.0008 + 0.0035 * steps if steps else 0.0

    sessions, chosen = make_sessions(64), []
    for _ in range(200):
        lengths = p.draft_lengths(sessions, CONTEXT)
        k = max(lengths.values())
        chosen.append(k)
        now[0] += draft_seconds(k)
        chunks = make_chunks(sessions, [0.8] * k) if k else {}
        verify = p.verify_lengths(sessions, chunks, lengths)
        now[0] += verify_seconds(64 + sum(verify.values()))
        await p.observe([RoundOutcome(chunks.get(s.session_id), s.verify_item(chunks.get(s.session_id),
                                                                               verify[s.session_id]),
                                      VerifyResult(s.session_id, accepted_count=verify[s.session_id], next_token=1))
                         for s in sessions])
    best = choose_draft_length([8] * 64, [0.8 ** (j + 1) for j in range(8)], 64,
                               lambda b, steps: verify_seconds(b) + draft_seconds(steps))[0]
    settled = chosen[-40:]
    assert best == 2
    if dither:
        assert max(set(settled), key=settled.count) == best and set(settled) == {best, best + 1}
    else:
        assert set(settled) == {4}  # the failure dithering exists for


def test_a_round_whose_drafter_must_catch_up_is_not_timed():
    """A session that did not draft for a while hands the drafter its missed tokens first (an
    eager forward, several draft steps' worth); such a round is not what a steady draft step
    costs, so it does not enter the draft-cost fit. A new session (prefilled beside the verifier
    by the loop) does not stop a round from being timed."""
    now = [0.0]
    p = AdaptiveBudgetPolicy(warmed_store(), FLAT, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0))
    steady, stale, new = make_sessions(3)
    for s in (steady, stale):
        s.tokens.extend(range(100, 140))
        s.verifier_cached = len(s.tokens) - 1
    steady.drafter_cached = len(steady.tokens) - 1
    stale.drafter_cached = len(stale.tokens) - 30
    new.drafter_cached = 0  # its drafter holds nothing yet: the loop prefills it beside the verifier

    def one_round(sessions):
        lengths = p.draft_lengths(sessions, CONTEXT)
        k = max(lengths.values())
        now[0] += 0.030 if k else 0.0
        p.verify_lengths(sessions, make_chunks(sessions, [0.9] * k) if k else {}, lengths)

    for _ in range(5):
        one_round([steady, stale])
    assert p.draft_cost.fits == {}
    for _ in range(5):
        one_round([steady, new])
    assert p.draft_cost.coefficients(2, now[0]) is not None


def test_draft_cost_is_kept_under_the_number_of_sessions_that_draft():
    """A round of 64 sessions of which 4 draft (the others opted out, or an exploration picked 4)
    costs the drafter what 4 sessions cost: it must not teach the 64-session fit that steps are cheap."""
    now = [0.0]
    p = AdaptiveBudgetPolicy(warmed_store(), FLAT, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0))
    sessions = make_sessions(64)
    for s in sessions[4:]:
        s.disable_speculation = True
    for _ in range(4):
        lengths = p.draft_lengths(sessions, CONTEXT)
        k = max(lengths.values())
        now[0] += 0.004
        p.verify_lengths(sessions, make_chunks(sessions, [0.9] * k), lengths)
    assert set(p.draft_cost.fits) == {2}  # 4 sessions: bucket 4-7


@pytest.mark.parametrize("drafting_seconds", [0.0, 0.016])
def test_verification_counts_the_rounds_drafting_time_and_gets_over_a_step_in_the_cost_curve(drafting_seconds):
    """A 2-core CPU verifier: 40 ms for one token (a matrix-vector product), 62-70 ms for 2-8
    (matrix products). Judged on the verify forward alone the first draft is a loss (1.5 tokens
    per 62 ms against 1 per 40 ms), so 4 drafted tokens were all thrown away; the round has
    already spent 16 ms drafting them, and per second of the whole round they pay."""
    now = [0.0]
    profile = CostProfile.from_table([(1, 0.040), (2, 0.062), (3, 0.066), (4, 0.066), (8, 0.070)])
    store = warmed_store({b: 0.5 for b in range(CalibrationConfig().num_buckets)})
    p = AdaptiveBudgetPolicy(store, profile, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0, dither_every_rounds=0))
    sessions = make_sessions(1)
    lengths = {"s0": 4}
    p.draft_lengths(sessions, CONTEXT)  # marks the start of drafting
    now[0] += drafting_seconds
    verified = p.verify_lengths(sessions, make_chunks(sessions, [0.5] * 4), lengths)["s0"]
    assert verified == (4 if drafting_seconds else 0)


async def test_the_policys_own_planning_is_part_of_the_round_it_prices(monkeypatch):
    """Ranking a busy round's candidates costs the scheduler real time (GPU bench, 64 sessions:
    ~2 ms a round at 5 drafts); the verify fit is timed from before that planning, so it is
    priced like any other part of the round, and the calibration store's I/O is not."""
    import scheduler.budget_policy as budget_policy

    now = [0.0]
    profile = CostProfile.flat(0.010)
    p = AdaptiveBudgetPolicy(warmed_store(), profile, PAIR, 8, clock=lambda: now[0],
                             config=BudgetConfig(explore_draft_tokens=0, dither_every_rounds=0))
    real_choose = budget_policy.choose_verify_lengths

    def slow_choose(*args, **kwargs):
        now[0] += 0.002  # the planning's own time
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(budget_policy, "choose_verify_lengths", slow_choose)
    real_record = p.calibration.record

    async def slow_record(*args, **kwargs):
        now[0] += 0.050  # a slow calibration store: not the round's cost
        return await real_record(*args, **kwargs)

    monkeypatch.setattr(p.calibration, "record", slow_record)
    sessions = make_sessions(4)
    for _ in range(6):
        lengths = p.draft_lengths(sessions, CONTEXT)
        chunks = make_chunks(sessions, [0.9] * max(lengths.values()))
        verify = p.verify_lengths(sessions, chunks, lengths)
        now[0] += 0.010  # the verify forward, exactly the profile
        await p.observe([RoundOutcome(chunks[s.session_id], s.verify_item(chunks[s.session_id], verify[s.session_id]),
                                      VerifyResult(s.session_id, accepted_count=1, next_token=1)) for s in sessions])
    intercept, slope = p.verify_overhead.coefficients(4, now[0])
    assert intercept + slope * 20 == pytest.approx(0.002, abs=2e-4)
