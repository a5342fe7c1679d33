"""What the adaptive policy's own Python costs per round: draft_lengths, verify_lengths, observe.

No Redis, no GPU, no models: the real AdaptiveBudgetPolicy with an in-memory calibration store,
the H200 bench's verifier profile, and a simulated clock that each round advances by what the
round would cost there (tests/test_budget_lifecycle.py's cost shapes), so the cost fits and the
calibration table hold what they hold after warm-up. Each session drafts a 4-8 token chunk
with random confidences every round; acceptance follows the confidences.

Wall time of each phase is measured with the real clock (the policy reads only the simulated
one), so the numbers are the policy's Python and nothing else. The decision digest at the end of
each row covers every draft length, verify length and learned statistic of the timed rounds:
equal digests before and after a change mean equal decisions on these inputs.

    OMP_NUM_THREADS=1 python scripts/policy_overhead_bench.py            # the table
    python scripts/policy_overhead_bench.py --profile 64                 # cProfile at 64 sessions
    python scripts/policy_overhead_bench.py --quality 0.1,0.3            # saturated: drafting off
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.budget_policy import AdaptiveBudgetPolicy  # noqa: E402
from scheduler.calibration import CalibrationConfig  # noqa: E402
from scheduler.calibration_store import InMemoryCalibrationStore  # noqa: E402
from scheduler.cost_model import CostProfile  # noqa: E402
from scheduler.draft_policy import RoundOutcome  # noqa: E402
from scheduler.session import Session  # noqa: E402
from specmesh.records import DraftChunk, VerifyResult  # noqa: E402
from specmesh.sampling_params import SamplingParams  # noqa: E402

CONTEXT = 1 << 20
PAIR = "verifier->drafter"
# The verifier's start-up profile on the H200 (batch tokens: seconds), as in the lifecycle test.
PROFILE = CostProfile.from_table([(1, 0.00709), (8, 0.00745), (64, 0.00823), (128, 0.00915), (256, 0.01204),
                                  (512, 0.01822)])


def simulated_draft_seconds(steps: int, sessions: int) -> float:
    base, step = (0.0016, 0.0014) if sessions == 1 else (0.0051, 0.0029)
    return base + step * steps if steps else 0.0


def simulated_verify_seconds(batch_tokens: int, sessions: int) -> float:
    return PROFILE.forward_seconds(batch_tokens) + (0.0018 if sessions == 1 else 0.0045) + 0.000025 * batch_tokens


class Bench:
    """One policy and its sessions; `round()` runs one scheduling round and times each phase."""

    def __init__(self, num_sessions: int, seed: int = 0, quality: tuple[float, float] = (0.4, 0.95)) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        clock = lambda: self.now  # noqa: E731
        self.store = InMemoryCalibrationStore(CalibrationConfig(), clock=clock)
        self.policy = AdaptiveBudgetPolicy(self.store, PROFILE, PAIR, 8, verifier="v0", clock=clock)
        self.sessions = []
        for i in range(num_sessions):
            s = Session(f"s{i}", list(range(16)), SamplingParams(temperature=0.0), max_tokens=1 << 30)
            s.verifier_cached = s.drafter_cached = s.drafter_seen = len(s.tokens) - 1
            self.sessions.append(s)
        # Each session's drafter quality: how its confidences spread (some good, some poor).
        self.quality = [self.rng.uniform(*quality) for _ in range(num_sessions)]
        self.quality_default = quality == (0.4, 0.95)
        self.digest = hashlib.sha256()
        self.profiler: cProfile.Profile | None = None  # on around the policy's calls only

    def _on(self) -> int:
        if self.profiler is not None:
            self.profiler.enable()
        return time.perf_counter_ns()

    def _off(self) -> int:
        now = time.perf_counter_ns()
        if self.profiler is not None:
            self.profiler.disable()
        return now

    def _chunk(self, index: int, session: Session, planned: int) -> DraftChunk:
        # 4-8 drafts whatever was planned (the drafter of the default table overshoots), or, for
        # a poor drafter, exactly the planned length (mostly none: the saturated case).
        k = self.rng.randint(4, 8) if self.quality_default else planned
        q = self.quality[index]
        confidences = tuple(min(1.0, max(0.0, self.rng.gauss(q, 0.2))) for _ in range(k))
        return DraftChunk(session.session_id, len(session.tokens), tuple(range(100, 100 + k)), confidences, (),
                          num_cached_tokens=len(session.tokens))

    async def round(self, timings: dict[str, list[int]] | None = None) -> None:
        sessions, policy = self.sessions, self.policy
        t0 = self._on()
        planned = policy.draft_lengths(sessions, CONTEXT)
        t1 = self._off()
        self.now += simulated_draft_seconds(max(planned.values()), len(sessions)) * self.rng.uniform(0.95, 1.05)
        chunks = {s.session_id: self._chunk(i, s, planned[s.session_id]) for i, s in enumerate(sessions)}
        drafted = {sid: len(chunk.tokens) for sid, chunk in chunks.items()}
        t2 = self._on()
        verify = policy.verify_lengths(sessions, chunks, drafted)
        t3 = self._off()
        items = [s.verify_item(chunks[s.session_id], verify[s.session_id]) for s in sessions]
        batch_tokens = sum(len(i.new_tokens) + len(i.draft_tokens) for i in items)
        self.now += simulated_verify_seconds(batch_tokens, len(sessions)) * self.rng.uniform(0.95, 1.05)
        outcomes = []
        for s, item in zip(sessions, items):
            chunk = chunks[s.session_id]
            accepted = 0
            while accepted < len(item.draft_tokens) and self.rng.random() < chunk.confidences[accepted]:
                accepted += 1
            result = VerifyResult(s.session_id, accepted_count=accepted, next_token=1,
                                  num_cached_tokens=len(s.tokens) + accepted)
            outcomes.append(RoundOutcome(chunk, item, result))
        t4 = self._on()
        await policy.observe(outcomes)
        t5 = self._off()
        for outcome, s in zip(outcomes, sessions):
            s.commit(outcome.item, outcome.result, outcome.chunk)
        if timings is not None:
            timings["draft_lengths"].append(t1 - t0)
            timings["verify_lengths"].append(t3 - t2)
            timings["observe"].append(t5 - t4)
            self._record(planned, verify)

    def _record(self, planned: dict[str, int], verify: dict[str, int]) -> None:
        """Every decision and learned statistic of the round, bit for bit, into the digest."""
        table = self.store.table(PAIR)
        fits = self.policy.cost_fits()
        state = (sorted(planned.items()), sorted(verify.items()), [v.hex() for v in table.offered],
                 [v.hex() for v in table.accepted], sorted((k, sorted(v.items())) for k, v in fits.items()))
        self.digest.update(repr(state).encode())


def measure(num_sessions: int, warmup: int, rounds: int, profile: bool = False,
            quality: tuple[float, float] = (0.4, 0.95)) -> dict[str, float | str]:
    bench = Bench(num_sessions, quality=quality)

    async def run() -> dict[str, list[int]]:
        for _ in range(warmup):
            await bench.round()
        timings: dict[str, list[int]] = {"draft_lengths": [], "verify_lengths": [], "observe": []}
        bench.profiler = cProfile.Profile() if profile else None
        for _ in range(rounds):
            await bench.round(timings)
        if bench.profiler:
            pstats.Stats(bench.profiler).sort_stats("tottime").print_stats(30)
        return timings

    timings = asyncio.run(run())
    out: dict[str, float | str] = {}
    for phase, values in timings.items():
        values.sort()
        out[phase] = values[len(values) // 2] / 1e3  # median, microseconds
    out["total"] = sum(float(v) for v in out.values())
    out["digest"] = bench.digest.hexdigest()[:16]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,16,64", help="comma-separated session counts")
    parser.add_argument("--warmup", type=int, default=300, help="untimed rounds first (fills table and fits)")
    parser.add_argument("--rounds", type=int, default=400, help="timed rounds")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile the timed rounds at N sessions")
    parser.add_argument("--quality", default="0.4,0.95", metavar="LO,HI",
                        help="each session's drafter quality is uniform in [LO, HI]; a poor drafter (e.g. 0.1,0.3) "
                             "gets the saturated case, where the policy drafts nothing")
    args = parser.parse_args()
    quality = tuple(float(v) for v in args.quality.split(","))
    if args.profile:
        measure(args.profile, args.warmup, args.rounds, profile=True, quality=quality)
        return
    print(f"{'sessions':>8} {'draft_lengths':>14} {'verify_lengths':>15} {'observe':>9} {'total':>9}  "
          f"decision digest   (median us per call)")
    for n in (int(v) for v in args.sessions.split(",")):
        r = measure(n, args.warmup, args.rounds, quality=quality)
        print(f"{n:>8} {r['draft_lengths']:>14.1f} {r['verify_lengths']:>15.1f} {r['observe']:>9.1f} "
              f"{r['total']:>9.1f}  {r['digest']}")


if __name__ == "__main__":
    main()
