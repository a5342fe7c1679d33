"""The adaptive policy explores: a cold table still drafts (so it can learn), and a policy that
has learned drafting does not pay still re-checks now and then, at a bounded cost."""

from __future__ import annotations

from scheduler.budget_policy import AdaptiveBudgetPolicy, BudgetConfig
from scheduler.calibration import CalibrationConfig, Observation
from scheduler.calibration_store import InMemoryCalibrationStore
from scheduler.cost_model import CostProfile
from tests.test_budget_policy import CONTEXT, PAIR, make_chunks, make_sessions

STEEP = CostProfile.linear(0.001, 0.010)


def store_with(acceptance: float, volume: float) -> InMemoryCalibrationStore:
    store = InMemoryCalibrationStore(CalibrationConfig(half_life_s=1e9))
    config = store.config
    store.table(PAIR).add([Observation(p, b, volume, volume * acceptance) for p in range(16)
                           for b in range(config.num_buckets)], now=store.clock())
    return store


def test_cold_table_drafts_and_verifies_the_exploration_length_even_when_costs_say_no():
    policy = AdaptiveBudgetPolicy(InMemoryCalibrationStore(), STEEP, PAIR, 8,
                                  config=BudgetConfig(measure_timing=False, explore_draft_tokens=2))
    sessions = make_sessions(4)
    lengths = policy.draft_lengths(sessions, CONTEXT)
    assert all(k == 2 for k in lengths.values())
    verify = policy.verify_lengths(sessions, make_chunks(sessions, [0.0, 0.0]), lengths)
    assert all(n == 2 for n in verify.values())  # observed, so the table learns


def _explored_rounds(policy, sessions, rounds: int, start: int = 1) -> list[int]:
    return [r for r in range(start, start + rounds) if max(policy.draft_lengths(sessions, CONTEXT).values()) > 0]


def _observe(store: InMemoryCalibrationStore, acceptance: float, volume: float) -> None:
    config = store.config
    store.table(PAIR).add([Observation(p, b, volume, volume * acceptance) for p in range(16)
                           for b in range(config.num_buckets)], now=store.clock())


def test_learned_bad_drafter_is_rechecked_ever_less_often_until_it_pays_again():
    store = store_with(0.0, 1000.0)
    policy = AdaptiveBudgetPolicy(store, CostProfile.linear(0.010, 0.0001), PAIR, 8,
                                  config=BudgetConfig(measure_timing=False, explore_every_rounds=10,
                                                      explore_max_interval=40))
    sessions = make_sessions(2)
    # Each re-check that still says no doubles the wait (10, 20, 40, then capped at 40).
    assert _explored_rounds(policy, sessions, 150) == [10, 30, 70, 110, 150]
    # Drafting pays again: every round drafts (none of them an exploration), and once it stops
    # paying the first re-check comes 10 rounds later, then 20.
    _observe(store, 1.0, 1e6)
    assert _explored_rounds(policy, sessions, 5, start=151) == [151, 152, 153, 154, 155]
    _observe(store, 0.0, 1e9)
    assert _explored_rounds(policy, sessions, 31, start=156) == [166, 186]


def test_exploration_can_be_turned_off():
    policy = AdaptiveBudgetPolicy(InMemoryCalibrationStore(), STEEP, PAIR, 8,
                                  config=BudgetConfig(measure_timing=False, explore_draft_tokens=0))
    sessions = make_sessions(2)
    verify = policy.verify_lengths(sessions, make_chunks(sessions, [0.0, 0.0]), {"s0": 2, "s1": 2})
    assert all(n == 0 for n in verify.values())  # zero-confidence drafts: nothing worth verifying


def test_a_periodic_recheck_explores_a_few_rotating_sessions_only():
    policy = AdaptiveBudgetPolicy(store_with(0.0, 1000.0), STEEP, PAIR, 8,
                                  config=BudgetConfig(measure_timing=False, explore_every_rounds=10,
                                                      explore_sessions=3, explore_max_interval=10))
    sessions = make_sessions(8)
    explored = []
    for _ in range(30):
        lengths = policy.draft_lengths(sessions, CONTEXT)
        if any(lengths.values()):
            explored.append({sid for sid, k in lengths.items() if k > 0})
    assert len(explored) == 3 and all(len(chosen) == 3 for chosen in explored)
    assert len(set().union(*explored)) > 3  # a different group each time
    # A cold table still explores with every session.
    cold = AdaptiveBudgetPolicy(InMemoryCalibrationStore(), STEEP, PAIR, 8,
                                config=BudgetConfig(measure_timing=False, explore_sessions=3))
    assert all(k == 2 for k in cold.draft_lengths(sessions, CONTEXT).values())


def test_a_policy_that_drafts_does_not_interrupt_itself_to_explore():
    """Re-checks are for a drafter turned off: while drafting pays, no round is handed to a few
    sessions' short exploration drafts."""
    policy = AdaptiveBudgetPolicy(store_with(0.9, 1000.0), CostProfile.flat(0.03), PAIR, 8,
                                  config=BudgetConfig(measure_timing=False, explore_every_rounds=10,
                                                      explore_sessions=3, dither_every_rounds=0))
    sessions = make_sessions(8)
    plans = [policy.draft_lengths(sessions, CONTEXT) for _ in range(60)]
    assert all(len(set(plan.values())) == 1 and min(plan.values()) >= 4 for plan in plans)
