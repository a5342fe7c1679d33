"""The adaptive policy over whole sessions, from a cold calibration table, against simulated
costs shaped like the GPU bench's (8B verifier, 0.75B drafter on one H200): it must find a draft
length near the best one on its own, alone and with 16 or 64 sessions sharing each round.

Nothing here is a mock of a service: the real policy, the real Session bookkeeping (commits,
what the drafter has seen), a clock the simulation advances by each phase's cost (with 5%
noise), acceptance drawn i.i.d. with probability alpha, waves of simultaneous requests as the
benchmark sends them.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from scheduler.budget_policy import AdaptiveBudgetPolicy, choose_draft_length
from scheduler.calibration import CalibrationConfig
from scheduler.calibration_store import InMemoryCalibrationStore
from scheduler.cost_model import CostProfile
from scheduler.draft_policy import RoundOutcome
from scheduler.session import Session
from specmesh.records import DraftChunk, VerifyResult
from specmesh.sampling_params import SamplingParams

# The verifier's start-up profile on the H200 (batch tokens: seconds).
PROFILE = CostProfile.from_table([(1, 0.00709), (8, 0.00745), (64, 0.00823), (128, 0.00915), (256, 0.01204),
                                  (512, 0.01822)])


def draft_seconds(steps: int, sessions: int, unseen: int) -> float:
    """A Draft call: fixed part, per step (1.4 ms alone, 2.9 ms for a busy batch), and a re-fed
    history (an eager forward) when a session comes back from a pause."""
    base, step = (0.0016, 0.0014) if sessions == 1 else (0.0051, 0.0029)
    return base + step * steps + (0.025 if unseen > 2 else 0.0)


def verify_seconds(batch_tokens: int, sessions: int) -> float:
    """A Verify call: the profile's forward plus what the services add per call and per token."""
    return PROFILE.forward_seconds(batch_tokens) + (0.0018 if sessions == 1 else 0.0045) + 0.000025 * batch_tokens


async def run_waves(alpha: float, concurrency: int, waves: int, seed: int, noise: float = 0.05) -> list[int]:
    """Serve `waves` waves of `concurrency` simultaneous greedy requests; returns the planned
    draft length of every round in which the whole wave was still running."""
    rng = random.Random(seed)
    now = [0.0]
    policy = AdaptiveBudgetPolicy(InMemoryCalibrationStore(CalibrationConfig()), PROFILE, "v->d", 8,
                                  clock=lambda: now[0])

    def jitter(seconds: float) -> float:
        return seconds * (1 + rng.gauss(0, noise))

    planned = []
    for wave in range(waves):
        sessions = [Session(f"w{wave}s{i}", list(range(100)), SamplingParams(temperature=0.0), max_tokens=128)
                    for i in range(concurrency)]
        while any(not s.finished for s in sessions):
            live = [s for s in sessions if not s.finished]
            lengths = policy.draft_lengths(live, 4096)
            if len(live) == concurrency:
                planned.append(max(lengths.values()))
            # A new session's first round prefills the drafter beside the verifier (the loop's rule).
            cold = {s.session_id for s in live if lengths[s.session_id] > 0 and s.drafter_cold}
            drafting = [s for s in live if lengths[s.session_id] > 0 and s.session_id not in cold]
            chunks = {}
            if drafting:
                now[0] += jitter(draft_seconds(max(lengths.values()), len(drafting),
                                               max(s.drafter_unseen for s in drafting)))
                for s in drafting:
                    k = lengths[s.session_id]
                    # Over the wire a chunk promises only its base (scheduler/convert.py).
                    chunks[s.session_id] = DraftChunk(s.session_id, len(s.tokens), (7,) * k, (0.5,) * k, (),
                                                      num_cached_tokens=len(s.tokens))
            verify = policy.verify_lengths(live, chunks, lengths)
            items = [s.verify_item(chunks.get(s.session_id), verify[s.session_id]) for s in live]
            now[0] += jitter(verify_seconds(sum(len(i.new_tokens) + len(i.draft_tokens) for i in items), len(live)))
            outcomes = []
            for s, item in zip(live, items):
                accepted = 0
                while accepted < len(item.draft_tokens) and rng.random() < alpha:
                    accepted += 1
                chunk = chunks.get(s.session_id)
                if s.session_id in cold:
                    chunk = DraftChunk(s.session_id, len(s.tokens), (7,), (0.5,), (), num_cached_tokens=len(s.tokens))
                result = VerifyResult(s.session_id, accepted_count=accepted, next_token=1,
                                      num_cached_tokens=len(s.tokens) + accepted)
                outcomes.append((s, RoundOutcome(chunk, item, result)))
            await policy.observe([outcome for _, outcome in outcomes])
            for s, outcome in outcomes:
                s.commit(outcome.item, outcome.result, outcome.chunk)
    return planned


def best_length(alpha: float, concurrency: int) -> int:
    survival = [alpha ** (j + 1) for j in range(8)]
    return choose_draft_length([8] * concurrency, survival, concurrency, lambda b, steps: (
        verify_seconds(b, concurrency) + (draft_seconds(steps, concurrency, 1) if steps else 0.0)))[0]


@pytest.mark.parametrize("alpha", [0.6, 0.8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_cold_policy_finds_a_draft_length_near_the_best_one_for_one_session(alpha, seed):
    """Before dithering offered one position beyond the plan, an unlucky early estimate of
    that position (e.g. 2 rejections in 2 offers) held an 80% drafter at 1.7 tokens for good."""
    planned = asyncio.run(run_waves(alpha, 1, waves=8, seed=seed))
    settled = planned[len(planned) // 2:]
    mean = sum(settled) / len(settled)
    best = best_length(alpha, 1)
    assert best >= 3
    assert best - 1.5 <= mean <= best + 1.5, (alpha, seed, best, mean)
    assert sum(1 for k in settled if k == 0) <= 0.05 * len(settled)


@pytest.mark.parametrize("concurrency", [16, 64])
@pytest.mark.parametrize("alpha", [0.6, 0.8])
def test_with_many_sessions_the_policy_drafts_near_the_best_length_or_not_at_all(concurrency, alpha):
    """A busy round's draft step costs twice a lone one: at alpha 0.8 the best length is 3-4,
    and at alpha 0.6 drafting does not pay at all, so the policy must stop (the saturation
    case, where drafting anyway lost 8-16% on the GPU)."""
    planned = asyncio.run(run_waves(alpha, concurrency, waves=6, seed=0))
    settled = planned[len(planned) // 3:]
    mean = sum(settled) / len(settled)
    best = best_length(alpha, concurrency)
    if best == 0:
        assert mean <= 0.25, (alpha, concurrency, mean)
    else:
        assert best - 1 <= mean <= best + 1, (alpha, concurrency, best, mean)
