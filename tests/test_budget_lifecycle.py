"""The adaptive policy over whole sessions, from a cold calibration table, against simulated
costs shaped like the GPU bench's at one session (8B verifier ~9 ms a round, a drafter step 1.4
ms, a re-fed history 25 ms): it must find a draft length near the best one on its own.

Nothing here is a mock of a service: the real policy, the real Session bookkeeping (commits,
what the drafter has seen), a clock the simulation advances by each phase's cost, acceptance
drawn i.i.d. with probability alpha.
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

PROFILE = CostProfile.from_table([(1, 0.0074), (8, 0.0076), (64, 0.0083), (128, 0.0092), (256, 0.012)])


def draft_seconds(steps: int, unseen: int) -> float:
    return 0.0016 + 0.0014 * steps + (0.025 if unseen > 2 else 0.0)


def verify_seconds(batch_tokens: int) -> float:
    return PROFILE.forward_seconds(batch_tokens) + 0.0018 + 0.0001 * batch_tokens


async def run_sessions(alpha: float, seed: int, requests: int = 8, noise: float = 0.05) -> list[int]:
    """Serve `requests` greedy requests one after another; returns each round's draft length."""
    rng = random.Random(seed)
    now = [0.0]
    policy = AdaptiveBudgetPolicy(InMemoryCalibrationStore(CalibrationConfig()), PROFILE, "v->d", 8,
                                  clock=lambda: now[0])

    def jitter(seconds: float) -> float:
        return seconds * (1 + rng.gauss(0, noise))

    lengths_drafted = []
    for r in range(requests):
        session = Session(f"r{r}", list(range(100)), SamplingParams(temperature=0.0), max_tokens=128)
        while not session.finished:
            lengths = policy.draft_lengths([session], 4096)
            k = lengths[session.session_id]
            lengths_drafted.append(k)
            # A new session's first round prefills the drafter beside the verifier (the loop's rule).
            cold = k > 0 and session.num_generated == 0 and session.drafter_cached == 0
            chunk = None
            if k and not cold:
                now[0] += jitter(draft_seconds(k, session.drafter_unseen))
                # Over the wire a chunk promises only its base (scheduler/convert.py).
                chunk = DraftChunk(session.session_id, len(session.tokens), (7,) * k, (0.5,) * k, (),
                                   num_cached_tokens=len(session.tokens))
            verify = policy.verify_lengths([session], {session.session_id: chunk} if chunk else {}, lengths)
            item = session.verify_item(chunk, verify[session.session_id])
            now[0] += jitter(verify_seconds(len(item.new_tokens) + len(item.draft_tokens)))
            accepted = 0
            while accepted < len(item.draft_tokens) and rng.random() < alpha:
                accepted += 1
            if cold:
                chunk = DraftChunk(session.session_id, len(session.tokens), (7,), (0.5,), (),
                                   num_cached_tokens=len(session.tokens))
            result = VerifyResult(session.session_id, accepted_count=accepted, next_token=1,
                                  num_cached_tokens=len(session.tokens) + accepted)
            await policy.observe([RoundOutcome(chunk, item, result)])
            session.commit(item, result, chunk)
    return lengths_drafted


def best_length(alpha: float) -> int:
    survival = [alpha ** (j + 1) for j in range(8)]
    return choose_draft_length([8], survival, 1, lambda b, steps: verify_seconds(b) + (
        draft_seconds(steps, 1) if steps else 0.0))[0]


@pytest.mark.parametrize("alpha", [0.6, 0.8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_cold_policy_finds_a_draft_length_near_the_best_one(alpha, seed):
    """Before dithering offered one position beyond the plan, an unlucky early estimate of
    position 3 (2 rejections in 2 offers) held an 80% drafter at 1.7 tokens a round for good."""
    lengths = asyncio.run(run_sessions(alpha, seed))
    settled = lengths[len(lengths) // 2:]
    mean = sum(settled) / len(settled)
    best = best_length(alpha)
    assert best >= 3
    assert best - 1.5 <= mean <= best + 1.5, (alpha, seed, best, mean)
    assert sum(1 for k in settled if k == 0) <= 0.05 * len(settled)
