"""What the verifier core's own host work costs per Verify call: VerifierCore.verify on a tiny model.

The verifier is a tiny random float32 Llama (vocab 512, hidden 64, 2 layers), so its forward is
cheap and the time of a call is mostly the core's Python: validating and syncing items, building
the batch, the acceptance/rejection math, reading results back, truncating the KV cache and
building results. Each of 1 / 16 / 64 sessions starts from a ~200-token history and every round
verifies 4 draft tokens per session, the commit advancing like a real loop.

Drafts come from a drafter with the same weights (its own ModelRunner and KV slots, not timed),
so acceptance looks like a real loop's: greedy drafts are its argmax, sometimes replaced by a
random token; sampled drafts are drawn from its exact sparse q (specmesh.distributions
.draft_distribution, top 8), a few replaced by a random token (possibly outside q's support).
Sampled sessions mix temperature / top-k / top-p settings; half of all sessions ask for
logprobs. The LM head is scaled up so the random model is confident enough to accept drafts.

Per row: median and mean microseconds per verify call, the part inside ModelRunner.forward_flat
(the forward, including packed_forward's input building), the rest (the core's own host work),
acceptance, and a digest of every output of the timed rounds (accepted counts, next tokens,
logprob bits, cache lengths): equal digests before and after a change mean equal outputs.

    OMP_NUM_THREADS=1 python scripts/verifier_core_overhead_bench.py            # the table
    OMP_NUM_THREADS=1 python scripts/verifier_core_overhead_bench.py --profile 64 --mode sampled
    python scripts/verifier_core_overhead_bench.py --device cuda                 # on a GPU

On CUDA the forward is synchronised before its time is taken, so "host" is the core's own
work there too, including every wait for a read back from the device (a CPU run cannot show
those: there a read costs nothing, and sorting the vocabulary for top-p, which the GPU does in
a kernel, is part of "host").
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import random
import statistics
import struct
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from specmesh.distributions import draft_distribution, make_generator  # noqa: E402
from specmesh.model_runner import ForwardRequest, ModelRunner  # noqa: E402
from specmesh.records import SparseDistribution, VerifyItem, VerifyResult  # noqa: E402
from specmesh.sampling_params import SamplingParams  # noqa: E402
from tests.tiny_models import make_tiny_llama  # noqa: E402
from verifier.verification import VerifierCore  # noqa: E402

VOCAB, HIDDEN, LAYERS = 512, 64, 2
HISTORY = 200
DRAFTS = 4
DRAFT_TOP_K = 8
LOGIT_SCALE = 40.0  # makes the random model confident (mean top probability ~0.6)
SAMPLED_SETTINGS = (
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.8, top_k=20, top_p=0.95),
)


def tiny_model() -> torch.nn.Module:
    model = make_tiny_llama(VOCAB, HIDDEN, LAYERS, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    return model


class Loop:
    """num_sessions sessions verified together every round, like one scheduler's batch."""

    def __init__(self, num_sessions: int, mode: str, rounds: int, device: str = "cpu", seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.mode = mode
        max_tokens = HISTORY + 8 + (rounds + 4) * (DRAFTS + 1)
        self.core = VerifierCore(ModelRunner(tiny_model().to(device), num_sessions, max_tokens))
        self.drafter = ModelRunner(tiny_model().to(device), num_sessions, max_tokens)
        self.ids = [f"session-{i}" for i in range(num_sessions)]
        self.params = [self._params(i) for i in range(num_sessions)]
        self.want_logprobs = [i % 2 == 1 for i in range(num_sessions)]
        self.tokens = [[self.rng.randrange(4, VOCAB) for _ in range(HISTORY + self.rng.randrange(-8, 9))]
                       for _ in range(num_sessions)]
        self.verifier_cached = [0] * num_sessions
        self.drafter_slots = [self.drafter.cache.allocate() for _ in range(num_sessions)]
        self.drafter_valid = [0] * num_sessions  # drafter positions that hold committed tokens
        self.digest = hashlib.sha256()
        self.verify_ns: list[int] = []
        self.forward_ns: list[int] = []
        self.accepted = self.offered = 0
        self._time_forward()

    def _params(self, i: int) -> SamplingParams:
        if self.mode == "greedy":
            return SamplingParams()
        return SamplingParams(**SAMPLED_SETTINGS[i % len(SAMPLED_SETTINGS)], seed=1000 + i)

    def _time_forward(self) -> None:
        runner = self.core.runner
        original = runner.forward_flat

        def timed(requests):
            start = time.perf_counter_ns()
            try:
                out = original(requests)
                if runner.device.type == "cuda":
                    # The forward's GPU time belongs to the forward, not to the first read after it.
                    torch.cuda.synchronize(runner.device)
                return out
            finally:
                self._forward_ns += time.perf_counter_ns() - start

        self._forward_ns = 0
        runner.forward_flat = timed

    # ---- the drafter (not timed) ---------------------------------------------------------------
    def draft(self) -> list[tuple[tuple[int, ...], tuple[SparseDistribution, ...]]]:
        n = len(self.ids)
        drafts: list[list[int]] = [[] for _ in range(n)]
        dists: list[list[SparseDistribution]] = [[] for _ in range(n)]
        for step in range(DRAFTS):
            requests = []
            for i in range(n):
                slot = self.drafter_slots[i]
                if step == 0:
                    self.drafter.cache.truncate(slot, self.drafter_valid[i])
                    feed = self.tokens[i][self.drafter_valid[i]:]
                else:
                    feed = drafts[i][-1:]
                requests.append(ForwardRequest(slot, tuple(feed), logits_from=len(feed) - 1))
            logits = self.drafter.forward(requests)
            for i in range(n):
                params = self.params[i]
                row = logits[i][-1]
                if params.greedy:
                    token, q = int(row.argmax()), None
                    if self.rng.random() < 0.2:
                        token = self.rng.randrange(VOCAB)
                else:
                    position = len(self.tokens[i]) + step
                    uniform = torch.rand((), generator=make_generator(params.seed, "draft", position))
                    token, _, q = draft_distribution(row, params, DRAFT_TOP_K, uniform)
                    if self.rng.random() < 0.05:
                        token = self.rng.randrange(VOCAB)
                drafts[i].append(token)
                dists[i].append(q if q is not None else SparseDistribution((token,), (1.0,)))
        return [(tuple(d), tuple(q)) for d, q in zip(drafts, dists)]

    # ---- one round -------------------------------------------------------------------------
    def items(self, drafts) -> list[VerifyItem]:
        return [
            VerifyItem(sid, cached, tuple(tokens[cached:]), d, q, params, want)
            for sid, cached, tokens, (d, q), params, want in zip(
                self.ids, self.verifier_cached, self.tokens, drafts, self.params, self.want_logprobs)
        ]

    def round(self, timed: bool, profiler: cProfile.Profile | None = None) -> None:
        drafts = self.draft()
        items = self.items(drafts)
        self._forward_ns = 0
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter_ns()
        results = self.core.verify(items)
        elapsed = time.perf_counter_ns() - start
        if profiler is not None:
            profiler.disable()
        if timed:
            self.verify_ns.append(elapsed)
            self.forward_ns.append(self._forward_ns)
        for i, (result, (d, _)) in enumerate(zip(results, drafts)):
            assert not result.cache_miss, result
            if timed:
                self.record(result)
                self.accepted += result.accepted_count
                self.offered += len(d)
            base = len(self.tokens[i])
            self.tokens[i].extend(d[: result.accepted_count])
            self.tokens[i].append(result.next_token)
            self.verifier_cached[i] = result.num_cached_tokens
            # The drafter cached the history and all drafts but the last: keep what was committed.
            self.drafter_valid[i] = base + min(result.accepted_count, DRAFTS - 1)

    def prefill(self) -> None:
        """The first call of every session: its whole history, no drafts (not timed)."""
        items = self.items([((), ())] * len(self.ids))
        for i, result in enumerate(self.core.verify(items)):
            self.tokens[i].append(result.next_token)
            self.verifier_cached[i] = result.num_cached_tokens

    def record(self, r: VerifyResult) -> None:
        logprob_bits = b"".join(struct.pack("<d", x) for x in r.logprobs)
        self.digest.update(f"{r.session_id}|{r.accepted_count}|{r.next_token}|{r.num_cached_tokens}|"
                           f"{r.cache_miss}|".encode() + logprob_bits)


def run(num_sessions: int, mode: str, rounds: int, warmup: int, profile: bool, device: str = "cpu") -> dict:
    loop = Loop(num_sessions, mode, rounds + warmup, device)
    loop.prefill()
    for _ in range(warmup):
        loop.round(timed=False)
    profiler = cProfile.Profile() if profile else None
    for _ in range(rounds):
        loop.round(timed=True, profiler=profiler)
    verify_us = [ns / 1000 for ns in loop.verify_ns]
    forward_us = [ns / 1000 for ns in loop.forward_ns]
    host_us = [v - f for v, f in zip(verify_us, forward_us)]
    row = {
        "sessions": num_sessions, "mode": mode,
        "verify_med_us": statistics.median(verify_us), "verify_mean_us": statistics.fmean(verify_us),
        "forward_med_us": statistics.median(forward_us), "host_med_us": statistics.median(host_us),
        "accept_rate": loop.accepted / max(1, loop.offered), "digest": loop.digest.hexdigest()[:16],
    }
    if profiler is not None:
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--mode", choices=["greedy", "sampled", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: there each read back is a synchronisation")
    parser.add_argument("--profile", type=int, default=None, metavar="SESSIONS",
                        help="cProfile the verify calls at this many sessions (only that row)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    modes = ["greedy", "sampled"] if args.mode == "both" else [args.mode]
    sessions = [args.profile] if args.profile else args.sessions
    print(f"{'sessions':>8} {'mode':>8} {'verify med':>11} {'mean':>8} {'forward':>8} {'host':>8} "
          f"{'accept':>7}  digest", flush=True)
    for mode in modes:
        for n in sessions:
            r = run(n, mode, args.rounds, args.warmup, profile=args.profile is not None, device=args.device)
            print(f"{r['sessions']:>8} {r['mode']:>8} {r['verify_med_us']:>9.0f}us {r['verify_mean_us']:>6.0f}us "
                  f"{r['forward_med_us']:>6.0f}us {r['host_med_us']:>6.0f}us {r['accept_rate']:>7.2f}  {r['digest']}",
                  flush=True)


if __name__ == "__main__":
    main()
