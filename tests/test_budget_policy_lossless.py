"""Statistical losslessness with the budget policy choosing the verify lengths.

Same toy verifier/drafter pair as tests/test_sampling_distribution_math.py (8-token vocabulary,
sparse top-3 q), but now sessions are batched four at a time and, every round, the adaptive
policy's admission rule (`admission_survivals` + `choose_verify_lengths`) decides how many of
each session's drafts are verified, from the drafts' confidences, the other sessions' drafts
and a load-dependent cost curve. The committed tokens must still follow the verifier's own
distribution (chi-square p > 0.01). A negative control shows that a rule which looks at a
draft's own confidence (the DSpark appendix A counterexample) is caught by the same check.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

from scheduler.budget_policy import admission_survivals, choose_verify_lengths
from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation
from specmesh.distributions import draft_distribution, make_generator
from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams
from tests.test_sampling_distribution_math import (  # noqa: F401 - _single_thread is an autouse fixture
    DRAFT_TOP_K,
    NUM_TOKENS,
    PVALUE_BIASED,
    PVALUE_OK,
    SETTINGS,
    _single_thread,
    drafter_logits,
    marginal_pvalues,
    target_logits,
)
from verifier.speculative_sampling import num_uniforms, verify_sampled

MAX_DRAFT = 2
GROUP = 4  # sessions verified together
TRIALS = 24_000

Survivals = Callable[[Sequence[float], int, CalibrationTable, Sequence[float]], list[float]]


def calibration() -> CalibrationTable:
    """A miscalibrated drafter: acceptance rises with confidence, but more steeply."""
    config = CalibrationConfig(num_buckets=10, max_positions=4)
    table = CalibrationTable(config)
    table.add([Observation(p, b, 40, 40 * (0.05 + 0.1 * b)) for p in range(4) for b in range(10)], now=0.0)
    return table


def peeking_survivals(confidences, num_drafts, table, position_acceptances) -> list[float]:
    """Biased: the survival of draft j includes draft j's own calibrated confidence."""
    out, running = [], 1.0
    for j in range(num_drafts):
        running *= table.acceptance(j, confidences[j])
        out.append(running)
    return out


def generate(params: SamplingParams, seed: int, survivals_of: Survivals, seconds_per_token: float,
             trials: int = TRIALS) -> tuple[np.ndarray, np.ndarray]:
    """Seeded speculative decodes, GROUP sessions per batch; returns ([trials, 3] tokens,
    histogram of verify lengths chosen when MAX_DRAFT drafts were available)."""
    table = calibration()
    positions = table.position_acceptances(MAX_DRAFT)

    def seconds(batch_tokens: int) -> float:
        return 1.0 + seconds_per_token * batch_tokens

    @lru_cache(maxsize=None)
    def target_rows(context: tuple[int, ...], drafts: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([target_logits(context + drafts[:i]) for i in range(len(drafts) + 1)])

    per_round = MAX_DRAFT + num_uniforms(MAX_DRAFT)
    uniforms = torch.rand(trials, NUM_TOKENS, per_round, generator=make_generator(seed, "policy-trials"))
    out = np.empty((trials, NUM_TOKENS), dtype=np.int64)
    chosen = np.zeros(MAX_DRAFT + 1, dtype=np.int64)
    for first in range(0, trials, GROUP):
        members = list(range(first, min(first + GROUP, trials)))
        contexts: dict[int, tuple[int, ...]] = {t: () for t in members}
        rounds = {t: 0 for t in members}
        while active := [t for t in members if len(contexts[t]) < NUM_TOKENS]:
            drafted: dict[int, tuple[list[int], list[float], list[SparseDistribution]]] = {}
            for t in active:
                u = uniforms[t, rounds[t]]
                k = min(MAX_DRAFT, NUM_TOKENS - 1 - len(contexts[t]))
                tokens, confidences, dists = [], [], []
                for i in range(k):
                    token, conf, q = draft_distribution(drafter_logits(contexts[t] + tuple(tokens)), params,
                                                        DRAFT_TOP_K, u[i])
                    tokens.append(token)
                    confidences.append(conf)
                    dists.append(q)
                drafted[t] = (tokens, confidences, dists)
            curves = [survivals_of(drafted[t][1], len(drafted[t][0]), table, positions) for t in active]
            lengths, _ = choose_verify_lengths(curves, len(active), seconds)
            for t, length in zip(active, lengths):
                tokens, _, dists = drafted[t]
                if len(tokens) == MAX_DRAFT:
                    chosen[length] += 1
                u = uniforms[t, rounds[t]]
                rows = target_rows(contexts[t], tuple(tokens[:length]))
                verdict = verify_sampled(rows, tokens[:length], dists[:length], params,
                                         u[MAX_DRAFT: MAX_DRAFT + num_uniforms(length)])
                contexts[t] = contexts[t] + tuple(tokens[: verdict.accepted_count]) + (verdict.next_token,)
                rounds[t] += 1
        for t in members:
            out[t] = contexts[t][:NUM_TOKENS]
    return out, chosen


@pytest.mark.parametrize("name", ["T0.7-topk4", "T0.9-topk6-topp0.9"])
def test_policy_truncated_drafts_keep_the_target_distribution(name):
    params = SETTINGS[name]
    tokens, chosen = generate(params, seed=77 + list(SETTINGS).index(name), survivals_of=admission_survivals,
                              seconds_per_token=0.06)
    # Not vacuous: the policy really truncates, and differently from round to round.
    assert chosen[1] > 0.1 * chosen.sum() and chosen[2] > 0.1 * chosen.sum(), chosen
    pvalues = marginal_pvalues(tokens, params)
    assert all(pv > PVALUE_OK for pv in pvalues.values()), pvalues


def test_rule_that_reads_a_drafts_own_confidence_is_detected():
    params = SETTINGS["T1"]
    tokens, chosen = generate(params, seed=77, survivals_of=peeking_survivals, seconds_per_token=0.1)
    assert chosen[0] > 0.05 * chosen.sum(), chosen
    pvalues = marginal_pvalues(tokens, params)
    assert min(pvalues.values()) < PVALUE_BIASED, pvalues
