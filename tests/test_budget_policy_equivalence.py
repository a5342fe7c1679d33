"""The adaptive policy's cheaper per-round Python decides exactly what the old code decided.

tests/budget_policy_reference.py is the decision code before it was made cheaper (commit
3b926bb), frozen. Here the current AdaptiveBudgetPolicy and that copy run side by side over many
randomized rounds (1, 16 and 64 sessions; confidences anywhere in [0, 1] and beyond, NaN
included; chunks short, long, missing or lost; sessions finishing, re-prefilling, opting out;
a verifier profile or none) on the same inputs and the same clock, and every decision and
everything either learns must be equal bit for bit: draft lengths, verify lengths, the plan's
expected tokens and seconds, every calibration count, every cost-fit point and coefficient.
The pure helpers are compared the same way on random inputs of their own. Any change of a
decision, even one rounding step in a sum, fails here.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

import tests.budget_policy_reference as reference
from scheduler import budget_policy as current
from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation, observations_from
from scheduler.calibration_store import InMemoryCalibrationStore
from scheduler.cost_model import CostProfile
from scheduler.draft_policy import RoundOutcome
from scheduler.round_timing import LinearFit
from scheduler.session import Session
from specmesh.records import DraftChunk, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams

PAIR = "verifier->drafter"
CONTEXT = 4096
# The H200 bench's verifier profile, and one with a step (a 2-core CPU: 1 token is a
# matrix-vector product, 2+ a matrix product).
GPU = CostProfile.from_table([(1, 0.00709), (8, 0.00745), (64, 0.00823), (128, 0.00915), (256, 0.01204),
                              (512, 0.01822)])
STEP = CostProfile.from_table([(1, 0.040), (2, 0.060), (8, 0.070), (64, 0.2)])


def confidence(rng: random.Random, quality: float) -> float:
    """Mostly around the session's quality; now and then an edge: 0, 1, NaN, out of range."""
    roll = rng.random()
    if roll < 0.02:
        return rng.choice([0.0, 1.0, -0.5, 1.5, math.nan, 1e-300, 0.9999999999])
    if roll < 0.05:
        return rng.choice([b / 10 for b in range(11)])  # bucket edges
    return min(1.0, max(0.0, rng.gauss(quality, 0.25)))


def new_session(rng: random.Random, name: str) -> Session:
    s = Session(name, list(range(rng.randint(3, 40))), SamplingParams(temperature=0.0),
                max_tokens=rng.choice([3, 12, 40, 200]),
                disable_speculation=rng.random() < 0.05,
                max_draft_tokens=rng.choice([None, None, None, 0, 2, 5]))
    return s


class SideBySide:
    """The current policy and the reference one, fed the same rounds on one simulated clock."""

    def __init__(self, seed: int, num_sessions: int, profile: CostProfile | None, **config) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        calibration = CalibrationConfig(half_life_s=self.rng.choice([5.0, 600.0]))
        self.current = current.AdaptiveBudgetPolicy(
            InMemoryCalibrationStore(calibration, clock=clock), profile, PAIR, 8, verifier="v",
            config=current.BudgetConfig(**config), clock=clock)
        self.reference = reference.AdaptiveBudgetPolicy(
            reference.InMemoryCalibrationStore(calibration, clock=clock), profile, PAIR, 8, verifier="v",
            config=reference.BudgetConfig(**config), clock=clock)
        self.num_sessions = num_sessions
        self.sessions = [new_session(self.rng, f"s{i}") for i in range(num_sessions)]
        self.quality = {s.session_id: self.rng.uniform(0.1, 0.95) for s in self.sessions}
        self.created = num_sessions

    def _chunk(self, s: Session, k: int) -> DraftChunk | None:
        roll = self.rng.random()
        if roll < 0.03:
            return None  # this session's drafter gave nothing
        if roll < 0.05:
            return DraftChunk(s.session_id, len(s.tokens), (), (), cache_miss=True)
        # Usually what was asked; sometimes shorter (the drafter stopped) or longer (drafted ahead).
        n = k if self.rng.random() < 0.8 else self.rng.randint(0, k + 3)
        quality = self.quality[s.session_id]
        return DraftChunk(s.session_id, len(s.tokens), tuple(range(100, 100 + n)),
                          tuple(confidence(self.rng, quality) for _ in range(n)), (),
                          num_cached_tokens=len(s.tokens))

    async def round(self) -> None:
        rng, sessions = self.rng, self.sessions
        if rng.random() < 0.05:  # some sessions re-prefill (the verifier lost them)
            for s in rng.sample(sessions, max(1, len(sessions) // 8)):
                s.verifier_cached = 0
        lengths = self.current.draft_lengths(sessions, CONTEXT)
        assert lengths == self.reference.draft_lengths(sessions, CONTEXT)
        self.now += rng.uniform(0.001, 0.02)
        drafter_failed = rng.random() < 0.03
        chunks = {}
        if not drafter_failed:
            for s in sessions:
                if lengths[s.session_id] > 0:
                    chunk = self._chunk(s, lengths[s.session_id])
                    if chunk is not None:
                        chunks[s.session_id] = chunk
        verify = self.current.verify_lengths(sessions, chunks, lengths)
        assert verify == self.reference.verify_lengths(sessions, chunks, lengths)
        assert vars(self.current.last_plan) == vars(self.reference.last_plan)  # two BatchPlan classes
        self.now += rng.uniform(0.005, 0.03)
        outcomes = []
        for s in sessions:
            chunk = chunks.get(s.session_id)
            item = s.verify_item(chunk, verify[s.session_id])
            if rng.random() < 0.02:
                result = VerifyResult(s.session_id, accepted_count=0, next_token=1, cache_miss=True)
            else:
                accepted = 0
                while accepted < len(item.draft_tokens) and rng.random() < self.quality[s.session_id]:
                    accepted += 1
                result = VerifyResult(s.session_id, accepted_count=accepted, next_token=1,
                                      num_cached_tokens=len(s.tokens) + accepted)
            outcomes.append(RoundOutcome(chunk, item, result))
        if rng.random() < 0.3:
            self.now += rng.uniform(0.0, 0.002)  # counting outcomes takes time too
        await self.current.observe(outcomes)
        await self.reference.observe(outcomes)
        self.assert_same_state()
        for s, outcome in zip(sessions, outcomes):
            s.commit(outcome.item, outcome.result, outcome.chunk)
        # Finished sessions leave; new ones (cold at the drafter) take their place.
        for i, s in enumerate(sessions):
            if s.finished:
                fresh = new_session(rng, f"s{self.created}")
                self.created += 1
                self.quality[fresh.session_id] = rng.uniform(0.1, 0.95)
                sessions[i] = fresh
        if rng.random() < 0.01:
            self.now += rng.uniform(10.0, 200.0)  # an idle spell: fits and counts decay

    def assert_same_state(self) -> None:
        ours, theirs = self.current.calibration.table(PAIR), self.reference.calibration.table(PAIR)
        assert ours.as_of == theirs.as_of
        assert ours.offered == theirs.offered and ours.accepted == theirs.accepted
        for name in ("draft_cost", "verify_cost", "verify_overhead", "plain_overhead"):
            a, b = getattr(self.current, name).fits, getattr(self.reference, name).fits
            assert a.keys() == b.keys(), name
            for bucket in a:
                fa, fb = a[bucket], b[bucket]
                assert (fa.origin, fa.as_of, fa.scaled_weight) == (fb.origin, fb.as_of, fb.scaled_weight), name
                assert list(fa.points.items()) == list(fb.points.items()), name
                assert fa.coefficients(self.now) == fb.coefficients(self.now), name
        assert self.current._draft_marks == self.reference._draft_marks
        assert self.current._verify_marks == self.reference._verify_marks


@pytest.mark.parametrize("num_sessions", [1, 16, 64])
@pytest.mark.parametrize("profile", ["gpu", "step", "none"])
def test_the_policy_decides_and_learns_exactly_as_before(num_sessions, profile):
    rounds = {1: 600, 16: 250, 64: 120}[num_sessions]
    pair = SideBySide(seed=num_sessions * 7 + len(profile), num_sessions=num_sessions,
                      profile={"gpu": GPU, "step": STEP, "none": None}[profile])

    async def run() -> None:
        for _ in range(rounds):
            await pair.round()

    asyncio.run(run())


@pytest.mark.parametrize("seed", range(3))
def test_the_policy_decides_as_before_with_other_settings(seed):
    """Exploration every few rounds, no dithering or always, no timing: other branches."""
    settings = [dict(explore_every_rounds=5, explore_sessions=3, dither_every_rounds=0),
                dict(measure_timing=False, dither_every_rounds=1, min_speedup=1.0),
                dict(explore_min_offered=1e9, explore_draft_tokens=3)][seed]
    pair = SideBySide(seed=100 + seed, num_sessions=16, profile=GPU, **settings)

    async def run() -> None:
        for _ in range(150):
            await pair.round()

    asyncio.run(run())


def random_table(rng: random.Random, config: CalibrationConfig) -> CalibrationTable:
    table = CalibrationTable(config)
    table.add([Observation(rng.randrange(config.max_positions), rng.randrange(config.num_buckets),
                           n := rng.choice([1.0, 3.0, rng.uniform(0, 500)]), n * rng.random())
               for _ in range(rng.randint(0, 60))], now=0.0)
    return table


def reference_table(table: CalibrationTable) -> reference.CalibrationTable:
    other = reference.CalibrationTable(table.config, table.as_of)
    other.offered, other.accepted = list(table.offered), list(table.accepted)
    return other


def test_the_pure_helpers_compute_the_same_bits():
    rng = random.Random(5)
    for case in range(400):
        config = CalibrationConfig(num_buckets=rng.choice([1, 4, 10]), max_positions=rng.choice([1, 3, 16]))
        table = random_table(rng, config)
        old_table = reference_table(table)
        num_sessions = rng.choice([1, 2, 16, 64])
        positions = table.position_acceptances(9)
        assert positions == old_table.position_acceptances(9)
        curves = []
        for _ in range(num_sessions):
            n = rng.randint(0, 9)
            confidences = [confidence(rng, rng.random()) for _ in range(rng.randint(0, 9))]
            rows = rng.choice([None, n, 9])
            new = current.admission_survivals(confidences, n, table.grid(rows), positions)
            assert new == reference.admission_survivals(confidences, n, old_table.grid(), positions)
            # The table's own path (not the grid's: its formula rounds differently, as it always did).
            assert current.admission_survivals(confidences, n, table, positions) == \
                reference.admission_survivals(confidences, n, old_table, positions)
            curves.append(new)
        base = num_sessions + rng.choice([0, 0, 5, 300])
        profile = rng.choice([GPU, STEP])
        extra = rng.choice([0.0, 0.004])
        seconds = lambda b: extra + profile.forward_seconds(b) + 0.0001 * b  # noqa: E731
        assert current.choose_verify_lengths(curves, base, seconds) == \
            reference.choose_verify_lengths(curves, base, seconds)
        caps = [rng.choice([0, 2, 8, 8, 8]) for _ in range(num_sessions)] if case % 2 else [8] * num_sessions
        survival = [0.9 ** (j + 1) * rng.uniform(0.5, 1.0) for j in range(8)]
        draft_seconds = lambda b, k: profile.forward_seconds(b) + (0.001 + 0.0015 * k if k else 0.0)  # noqa: E731
        speedup = rng.choice([1.0, 1.05])
        assert current.choose_draft_length(caps, survival, base, draft_seconds, speedup) == \
            reference.choose_draft_length(caps, survival, base, draft_seconds, speedup)


def test_observations_are_counted_the_same():
    rng = random.Random(9)
    for _ in range(300):
        config = CalibrationConfig(num_buckets=rng.choice([1, 4, 10]), max_positions=rng.choice([1, 3, 16]))
        outcomes = []
        for i in range(rng.choice([1, 16, 64])):
            n = rng.randint(0, 10)
            chunk = None if rng.random() < 0.05 else DraftChunk(
                f"s{i}", 5, tuple(range(n)), tuple(confidence(rng, rng.random()) for _ in range(n)), (),
                cache_miss=rng.random() < 0.05)
            verified = rng.randint(0, n)
            item = VerifyItem(f"s{i}", 4, (1,), tuple(range(verified)), (), SamplingParams())
            result = VerifyResult(f"s{i}", accepted_count=rng.randint(-1, verified + 1), next_token=1,
                                  cache_miss=rng.random() < 0.05)
            outcomes.append(RoundOutcome(chunk, item, result))
        assert observations_from(outcomes, config) == reference.observations_from(outcomes, config)


def test_cost_fits_read_the_same_bits():
    rng = random.Random(13)
    for _ in range(200):
        kwargs = dict(half_life_s=rng.choice([0.5, 30.0]), min_weight=rng.choice([0.5, 3.0]),
                      without_spread=rng.choice(["slope", "intercept"]), min_point_share=rng.choice([0.0, 0.01, 0.3]))
        ours, theirs = LinearFit(**kwargs), reference.LinearFit(**kwargs)
        now = 0.0
        for _ in range(rng.randint(0, 300)):
            now += rng.choice([0.01, 0.5, 20.0])
            x = float(rng.choice([rng.randint(1, 600), rng.randint(60, 70)]))
            y = rng.uniform(0.0, 0.05) * (10 if rng.random() < 0.02 else 1)
            ours.add(x, y, now)
            theirs.add(x, y, now)
            if rng.random() < 0.3:
                assert ours.coefficients(now) == theirs.coefficients(now)
                assert list(ours.points.items()) == list(theirs.points.items())
        assert ours.coefficients(now + 5.0) == theirs.coefficients(now + 5.0)
        assert list(ours.points.items()) == list(theirs.points.items())


def test_the_comparison_can_fail(monkeypatch):
    """A negative control: the side-by-side run notices a rule that verifies one draft less."""
    pair = SideBySide(seed=1, num_sessions=16, profile=GPU)
    original = current.choose_verify_lengths

    def one_less(survivals, base_tokens, round_seconds):
        lengths, value = original(survivals, base_tokens, round_seconds)
        return [max(n - 1, 0) for n in lengths], value

    async def run() -> None:
        for _ in range(60):
            await pair.round()

    monkeypatch.setattr(current, "choose_verify_lengths", one_less)
    with pytest.raises(AssertionError):
        asyncio.run(run())
