"""The adaptive policy's cheaper per-round Python decides exactly what the old code decided.

Every scenario below runs the adaptive policy (or one of its pure helpers) over many randomized
rounds (1, 16 and 64 sessions; confidences anywhere in [0, 1] and beyond, NaN included; chunks
short, long, missing or lost; sessions finishing, re-prefilling, opting out; a verifier profile
or none) on a simulated clock, and folds every decision and everything the policy learns into a
running sha256 digest: draft lengths, verify lengths, the plan's expected tokens and seconds,
every calibration count, every cost-fit point and coefficient, the timing marks, the helpers'
outputs. Values enter the digest as repr() (a float's repr round-trips exactly), in a fixed
order, so equal digests mean equal decisions bit for bit. Any change of a decision, even one
rounding step in a sum, fails here.

The golden digests in tests/data/budget_policy_decisions.json were recorded from the decision
code as it stood at commit 3b926bb, before its per-round Python was made cheaper (commit
9328e12), and the current code was checked to produce the same digest for every case. Regenerate
them only for an intended change of decisions, from the current code:

    python -m tests.test_budget_policy_equivalence --write

and say in the commit which decision changed and why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scheduler import budget_policy, calibration_store, round_timing
from scheduler import calibration as calibration_module
from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation
from scheduler.cost_model import CostProfile
from scheduler.draft_policy import RoundOutcome
from scheduler.session import Session
from specmesh.records import DraftChunk, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams

GOLDEN = Path(__file__).parent / "data" / "budget_policy_decisions.json"
ABOUT = ("sha256 digests of the adaptive policy's decisions and learned state, one per scenario of "
         "tests/test_budget_policy_equivalence.py; regenerate only for an intended decision change")

PAIR = "verifier->drafter"
CONTEXT = 4096
# The H200 bench's verifier profile, and one with a step (a 2-core CPU: 1 token is a
# matrix-vector product, 2+ a matrix product).
GPU = CostProfile.from_table([(1, 0.00709), (8, 0.00745), (64, 0.00823), (128, 0.00915), (256, 0.01204),
                              (512, 0.01822)])
STEP = CostProfile.from_table([(1, 0.040), (2, 0.060), (8, 0.070), (64, 0.2)])
PROFILES = {"gpu": GPU, "step": STEP, "none": None}
SETTINGS = [dict(explore_every_rounds=5, explore_sessions=3, dither_every_rounds=0),
            dict(measure_timing=False, dither_every_rounds=1, min_speedup=1.0),
            dict(explore_min_offered=1e9, explore_draft_tokens=3)]


@dataclass(frozen=True)
class Implementation:
    """The decision code under test. Attributes are looked up at call time on the modules, so a
    monkeypatched module function (the negative control) is what runs."""

    AdaptiveBudgetPolicy: Any
    InMemoryCalibrationStore: Any
    BudgetConfig: Any
    CalibrationTable: Any
    LinearFit: Any
    admission_survivals: Callable
    choose_verify_lengths: Callable
    choose_draft_length: Callable
    observations_from: Callable
    grid: Callable  # (table, rows) -> the table's AcceptanceGrid


def current_implementation() -> Implementation:
    return Implementation(
        AdaptiveBudgetPolicy=budget_policy.AdaptiveBudgetPolicy,
        InMemoryCalibrationStore=calibration_store.InMemoryCalibrationStore,
        BudgetConfig=budget_policy.BudgetConfig,
        CalibrationTable=calibration_module.CalibrationTable,
        LinearFit=round_timing.LinearFit,
        admission_survivals=lambda *a: budget_policy.admission_survivals(*a),
        choose_verify_lengths=lambda *a: budget_policy.choose_verify_lengths(*a),
        choose_draft_length=lambda *a: budget_policy.choose_draft_length(*a),
        observations_from=lambda *a: calibration_module.observations_from(*a),
        grid=lambda table, rows: table.grid(rows))


class Digest:
    """A running sha256 over repr() of everything folded in."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def fold(self, label: str, value: Any) -> None:
        self._hash.update(f"{label}={value!r}\n".encode())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


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


def sorted_items(mapping: dict) -> list:
    return sorted(mapping.items())


class Simulation:
    """One policy fed randomized rounds on a simulated clock; the random stream does not depend
    on the policy's code beyond its decisions, so equal decisions mean equal rounds."""

    def __init__(self, impl: Implementation, seed: int, num_sessions: int, profile: CostProfile | None,
                 **config) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.digest = Digest()
        clock = lambda: self.now  # noqa: E731
        calibration = CalibrationConfig(half_life_s=self.rng.choice([5.0, 600.0]))
        self.policy = impl.AdaptiveBudgetPolicy(
            impl.InMemoryCalibrationStore(calibration, clock=clock), profile, PAIR, 8, verifier="v",
            config=impl.BudgetConfig(**config), clock=clock)
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
        rng, sessions, policy, digest = self.rng, self.sessions, self.policy, self.digest
        if rng.random() < 0.05:  # some sessions re-prefill (the verifier lost them)
            for s in rng.sample(sessions, max(1, len(sessions) // 8)):
                s.verifier_cached = 0
        lengths = policy.draft_lengths(sessions, CONTEXT)
        digest.fold("draft_lengths", sorted_items(lengths))
        self.now += rng.uniform(0.001, 0.02)
        drafter_failed = rng.random() < 0.03
        chunks = {}
        if not drafter_failed:
            for s in sessions:
                if lengths[s.session_id] > 0:
                    chunk = self._chunk(s, lengths[s.session_id])
                    if chunk is not None:
                        chunks[s.session_id] = chunk
        verify = policy.verify_lengths(sessions, chunks, lengths)
        digest.fold("verify_lengths", sorted_items(verify))
        digest.fold("last_plan", [(k, sorted_items(v) if isinstance(v, dict) else v)
                                  for k, v in sorted_items(vars(policy.last_plan))])
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
        await policy.observe(outcomes)
        self.fold_state()
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

    def fold_state(self) -> None:
        policy, digest = self.policy, self.digest
        table = policy.calibration.table(PAIR)
        digest.fold("calibration", (table.as_of, table.offered, table.accepted))
        for name in ("draft_cost", "verify_cost", "verify_overhead", "plain_overhead"):
            fits = getattr(policy, name).fits
            digest.fold(name, sorted(fits))
            for bucket in sorted(fits):
                fit = fits[bucket]
                digest.fold(f"{name}[{bucket}]", (fit.origin, fit.as_of, fit.scaled_weight,
                                                   list(fit.points.items()), fit.coefficients(self.now)))
        # Keyed by frozensets of session ids: sorted, so string hashing cannot reorder them.
        for name in ("_draft_marks", "_verify_marks"):
            marks = getattr(policy, name)
            digest.fold(name, sorted((sorted(key), value) for key, value in marks.items()))


def run_rounds(sim: Simulation, rounds: int) -> str:
    async def run() -> None:
        for _ in range(rounds):
            await sim.round()

    asyncio.run(run())
    return sim.digest.hexdigest()


# ---------------------------------------------------------------------------- the scenarios
# Each takes the implementation and returns its digest; CASES names every recorded case.
def policy_scenario(impl: Implementation, num_sessions: int, profile: str) -> str:
    rounds = {1: 600, 16: 250, 64: 120}[num_sessions]
    sim = Simulation(impl, seed=num_sessions * 7 + len(profile), num_sessions=num_sessions,
                     profile=PROFILES[profile])
    return run_rounds(sim, rounds)


def settings_scenario(impl: Implementation, seed: int) -> str:
    """Exploration every few rounds, no dithering or always, no timing: other branches."""
    sim = Simulation(impl, seed=100 + seed, num_sessions=16, profile=GPU, **SETTINGS[seed])
    return run_rounds(sim, 150)


def random_table(rng: random.Random, config: CalibrationConfig) -> CalibrationTable:
    table = CalibrationTable(config)
    table.add([Observation(rng.randrange(config.max_positions), rng.randrange(config.num_buckets),
                           n := rng.choice([1.0, 3.0, rng.uniform(0, 500)]), n * rng.random())
               for _ in range(rng.randint(0, 60))], now=0.0)
    return table


def adopt_table(impl: Implementation, table: CalibrationTable):
    """The table as the implementation's own class (the same counts, bit for bit)."""
    if isinstance(table, impl.CalibrationTable):
        return table
    other = impl.CalibrationTable(table.config, table.as_of)
    other.offered, other.accepted = list(table.offered), list(table.accepted)
    return other


def helpers_scenario(impl: Implementation) -> str:
    rng, digest = random.Random(5), Digest()
    for case in range(400):
        config = CalibrationConfig(num_buckets=rng.choice([1, 4, 10]), max_positions=rng.choice([1, 3, 16]))
        table = adopt_table(impl, random_table(rng, config))
        num_sessions = rng.choice([1, 2, 16, 64])
        positions = table.position_acceptances(9)
        digest.fold("positions", positions)
        curves = []
        for _ in range(num_sessions):
            n = rng.randint(0, 9)
            confidences = [confidence(rng, rng.random()) for _ in range(rng.randint(0, 9))]
            rows = rng.choice([None, n, 9])
            curve = impl.admission_survivals(confidences, n, impl.grid(table, rows), positions)
            digest.fold("admission_survivals(grid)", curve)
            # The table's own path (not the grid's: its formula rounds differently, as it always did).
            digest.fold("admission_survivals(table)", impl.admission_survivals(confidences, n, table, positions))
            curves.append(curve)
        base = num_sessions + rng.choice([0, 0, 5, 300])
        profile = rng.choice([GPU, STEP])
        extra = rng.choice([0.0, 0.004])
        seconds = lambda b: extra + profile.forward_seconds(b) + 0.0001 * b  # noqa: E731
        digest.fold("choose_verify_lengths", impl.choose_verify_lengths(curves, base, seconds))
        caps = [rng.choice([0, 2, 8, 8, 8]) for _ in range(num_sessions)] if case % 2 else [8] * num_sessions
        survival = [0.9 ** (j + 1) * rng.uniform(0.5, 1.0) for j in range(8)]
        draft_seconds = lambda b, k: profile.forward_seconds(b) + (0.001 + 0.0015 * k if k else 0.0)  # noqa: E731
        speedup = rng.choice([1.0, 1.05])
        digest.fold("choose_draft_length", impl.choose_draft_length(caps, survival, base, draft_seconds, speedup))
    return digest.hexdigest()


def observations_scenario(impl: Implementation) -> str:
    rng, digest = random.Random(9), Digest()
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
        digest.fold("observations", [(o.position, o.bucket, o.offered, o.accepted)
                                     for o in impl.observations_from(outcomes, config)])
    return digest.hexdigest()


def cost_fits_scenario(impl: Implementation) -> str:
    rng, digest = random.Random(13), Digest()
    for _ in range(200):
        kwargs = dict(half_life_s=rng.choice([0.5, 30.0]), min_weight=rng.choice([0.5, 3.0]),
                      without_spread=rng.choice(["slope", "intercept"]), min_point_share=rng.choice([0.0, 0.01, 0.3]))
        fit = impl.LinearFit(**kwargs)
        now = 0.0
        for _ in range(rng.randint(0, 300)):
            now += rng.choice([0.01, 0.5, 20.0])
            x = float(rng.choice([rng.randint(1, 600), rng.randint(60, 70)]))
            y = rng.uniform(0.0, 0.05) * (10 if rng.random() < 0.02 else 1)
            fit.add(x, y, now)
            if rng.random() < 0.3:
                digest.fold("coefficients", fit.coefficients(now))
                digest.fold("points", list(fit.points.items()))
        digest.fold("coefficients(later)", fit.coefficients(now + 5.0))
        digest.fold("points", list(fit.points.items()))
    return digest.hexdigest()


POLICY_CASES = [(n, p) for p in PROFILES for n in (1, 16, 64)]
CASES: dict[str, Callable[[Implementation], str]] = {
    **{f"policy-{n}-sessions-{p}": (lambda impl, n=n, p=p: policy_scenario(impl, n, p)) for n, p in POLICY_CASES},
    **{f"settings-{seed}": (lambda impl, seed=seed: settings_scenario(impl, seed)) for seed in range(len(SETTINGS))},
    "pure-helpers": helpers_scenario,
    "observations": observations_scenario,
    "cost-fits": cost_fits_scenario,
}


def record(impl: Implementation) -> dict[str, str]:
    return {name: scenario(impl) for name, scenario in CASES.items()}


def golden(name: str) -> str:
    return json.loads(GOLDEN.read_text())["digests"][name]


# ---------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("num_sessions", [1, 16, 64])
@pytest.mark.parametrize("profile", ["gpu", "step", "none"])
def test_the_policy_decides_and_learns_exactly_as_before(num_sessions, profile):
    name = f"policy-{num_sessions}-sessions-{profile}"
    assert policy_scenario(current_implementation(), num_sessions, profile) == golden(name), name


@pytest.mark.parametrize("seed", range(3))
def test_the_policy_decides_as_before_with_other_settings(seed):
    """Exploration every few rounds, no dithering or always, no timing: other branches."""
    assert settings_scenario(current_implementation(), seed) == golden(f"settings-{seed}")


def test_the_pure_helpers_compute_the_same_bits():
    assert helpers_scenario(current_implementation()) == golden("pure-helpers")


def test_observations_are_counted_the_same():
    assert observations_scenario(current_implementation()) == golden("observations")


def test_cost_fits_read_the_same_bits():
    assert cost_fits_scenario(current_implementation()) == golden("cost-fits")


def test_the_comparison_can_fail(monkeypatch):
    """A negative control: the digest notices a rule that verifies one draft less."""
    original = budget_policy.choose_verify_lengths

    def one_less(survivals, base_tokens, round_seconds):
        lengths, value = original(survivals, base_tokens, round_seconds)
        return [max(n - 1, 0) for n in lengths], value

    monkeypatch.setattr(budget_policy, "choose_verify_lengths", one_less)
    with pytest.raises(AssertionError):
        test_the_policy_decides_as_before_with_other_settings(0)


def main(argv: list[str]) -> int:
    if argv != ["--write"]:
        print(__doc__)
        print("usage: python -m tests.test_budget_policy_equivalence --write")
        return 2
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    document = {
        "about": ABOUT,
        "recorded_from": f"the working tree at {head} (regenerated with --write)",
        "digests": record(current_implementation()),
    }
    GOLDEN.write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {len(document['digests'])} digests to {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
