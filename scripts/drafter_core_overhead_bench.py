"""What the drafter core's own host work costs per draft step: ModelDrafter.draft with a tiny model.

A random 2-layer Llama (vocab 512, hidden 64) drafts for 1/16/64 sessions with ~200-token
histories, 4 tokens per session per round, through the real ModelDrafter and ModelRunner
(packed path, CPU). Each round is what the scheduler does in steady state: draft, accept a
random number of the drafts, then a correction or a bonus token (half the time the drafter's own
next token), and sync with the committed length of the last answer (tests/test_draft_ahead.py).
The model is so small that its forward costs little: what is left is the core's Python and host
work per step (building requests, packing the flat inputs, picking tokens, q, confidences, the
draft-vocabulary mapping, context copying), the part that costs ~0.9 ms a step at 64 sessions
on the H200 bench's host.

Configurations: `plain` (full vocabulary, draft probability as confidence, no copying) and
`shipped` (a 256-token draft vocabulary head, a ConfidenceHead, ContextCopyRule()), each greedy
and sampled. "fwd" is the time inside the decoder and LM head (PackedForward.run and the head),
"host" the rest of draft(). The digest covers every token, confidence and q (bit for bit, via
float.hex) of the timed rounds: equal digests before and after a change mean equal output.
Times are the thread's CPU time (steadier than wall time while other work shares the machine).

    OMP_NUM_THREADS=1 python scripts/drafter_core_overhead_bench.py                # the table
    OMP_NUM_THREADS=1 python scripts/drafter_core_overhead_bench.py --profile 64   # cProfile, 64 sessions
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from drafter.context_copy import ContextCopyRule  # noqa: E402
from drafter.drafting import ModelDrafter  # noqa: E402
from specmesh.drafter_training.model import ConfidenceHead, restrict_vocabulary  # noqa: E402
from specmesh.model_runner import ModelRunner  # noqa: E402
from specmesh.records import DraftRequest  # noqa: E402
from specmesh.sampling_params import SamplingParams  # noqa: E402
from tests.tiny_models import make_tiny_llama  # noqa: E402

VOCAB = 512
DRAFT_VOCAB = 256
HISTORY = 200
DRAFT_TOKENS = 4
MAX_TOKENS = 512
# This thread's CPU time (torch runs single-threaded here): steadier than wall time on a shared
# machine; --wall switches to wall time.
CLOCK = time.thread_time


def build_drafter(config: str, num_sessions: int, graphs: bool = True) -> ModelDrafter:
    model = make_tiny_llama(VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, seed=11, max_position_embeddings=1024)
    head = copy = None
    if config == "shipped":
        restrict_vocabulary(model, list(range(0, VOCAB, 2)))  # 256 ids, not a prefix: the mapping matters
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            head = ConfidenceHead(num_top=8, hidden=32, prior=True)
            torch.nn.init.normal_(head.net[2].weight, std=0.3)  # not the identity: its output is checked
        head.eval()
        copy = ContextCopyRule()
    return ModelDrafter(ModelRunner(model, num_slots=num_sessions, max_tokens=MAX_TOKENS, cuda_graphs=graphs), name="bench",
                        draft_top_k=8, confidence_head=head, context_copy=copy)


def make_history(rng: random.Random) -> list[int]:
    """~200 tokens made of repeated phrases, so the context repeats (context copying has work)."""
    phrases = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(3, 8))] for _ in range(12)]
    history: list[int] = []
    while len(history) < HISTORY:
        history += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(4, VOCAB)]
    return history[:HISTORY]


class Bench:
    def __init__(self, config: str, mode: str, num_sessions: int, seed: int = 0, graphs: bool = True) -> None:
        self.drafter = build_drafter(config, num_sessions, graphs)
        self.rng = random.Random(seed)
        self.sessions = {f"s{i}": make_history(self.rng) for i in range(num_sessions)}
        self.params = {sid: SamplingParams() if mode == "greedy"
                       else SamplingParams(temperature=0.8, top_p=0.95, seed=1000 + i)
                       for i, sid in enumerate(self.sessions)}
        self.cached = {sid: 0 for sid in self.sessions}
        self.digest = hashlib.sha256()
        self.forward_seconds = 0.0
        runner = self.drafter.runner
        assert runner.packed is not None
        run, head = runner.packed.run, runner.head_logits

        def timed(fn):
            def wrapper(*args, **kwargs):
                t = CLOCK()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.forward_seconds += CLOCK() - t
            return wrapper
        runner.packed.run = timed(run)
        runner.head_logits = timed(head)

    def round(self, record: bool) -> tuple[float, int]:
        """One scheduling round; returns (seconds in draft(), forward steps)."""
        requests = [DraftRequest(sid, self.cached[sid], tuple(c[self.cached[sid]:]), DRAFT_TOKENS, self.params[sid])
                    for sid, c in self.sessions.items()]
        forwards = self.drafter.num_forwards
        t = CLOCK()
        chunks = self.drafter.draft(requests)
        seconds = CLOCK() - t
        steps = self.drafter.num_forwards - forwards
        rng = self.rng
        for chunk in chunks:
            assert not chunk.cache_miss
            if record:
                self.digest.update(repr((chunk.session_id, chunk.base_length, chunk.tokens,
                                         [c.hex() for c in chunk.confidences],
                                         [(q.token_ids, [p.hex() for p in q.probs]) for q in chunk.distributions])
                                        ).encode())
            committed = self.sessions[chunk.session_id]
            accepted = rng.randint(0, len(chunk.tokens))
            ahead = self.drafter.ahead_tokens(chunk.session_id)[:1] if accepted == len(chunk.tokens) else ()
            bonus = ahead[0] if ahead and rng.random() < 0.5 else rng.randrange(4, VOCAB)
            committed += list(chunk.tokens[:accepted]) + [bonus]
            self.cached[chunk.session_id] = chunk.base_length
        return seconds, steps


def measure(config: str, mode: str, num_sessions: int, rounds: int, warmup: int = 3,
            profiler: cProfile.Profile | None = None, graphs: bool = True) -> dict:
    torch.manual_seed(0)
    bench = Bench(config, mode, num_sessions, graphs=graphs)
    for _ in range(warmup):
        bench.round(record=False)
    bench.forward_seconds = 0.0
    total, steps = 0.0, 0
    if profiler is not None:
        profiler.enable()
    for _ in range(rounds):
        seconds, n = bench.round(record=True)
        total += seconds
        steps += n
    if profiler is not None:
        profiler.disable()
    return {"round_us": 1e6 * total / rounds, "step_us": 1e6 * total / max(steps, 1),
            "host_step_us": 1e6 * (total - bench.forward_seconds) / max(steps, 1),
            "fwd_step_us": 1e6 * bench.forward_seconds / max(steps, 1), "steps": steps / rounds,
            "copied": bench.drafter.num_copied_tokens, "digest": bench.digest.hexdigest()[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--configs", nargs="+", default=["plain", "shipped"], choices=["plain", "shipped"])
    parser.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", type=int, metavar="SESSIONS",
                        help="cProfile draft() at this many sessions (first config and mode), top functions")
    parser.add_argument("--no-graphs", action="store_true",
                        help="the plain eager packed path (default: the CUDA-graph path, emulated eagerly on CPU, "
                             "as the GPU drafter runs its decode steps)")
    parser.add_argument("--wall", action="store_true", help="wall time instead of this thread's CPU time")
    args = parser.parse_args()
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    graphs = not args.no_graphs
    torch.set_num_threads(1)
    if args.profile:
        profiler = cProfile.Profile()
        row = measure(args.configs[0], args.modes[0], args.profile, args.rounds, profiler=profiler, graphs=graphs)
        print(f"{args.configs[0]} {args.modes[0]} {args.profile} sessions: {row['step_us']:.0f} us/step, "
              f"host {row['host_step_us']:.0f}")
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        return
    print(f"{'config':8} {'mode':8} {'sess':>4} {'steps':>5} {'us/round':>9} {'us/step':>8} {'host/step':>9} "
          f"{'fwd/step':>8} {'copied':>6}  digest")
    for config in args.configs:
        for mode in args.modes:
            for n in args.sessions:
                r = measure(config, mode, n, args.rounds, graphs=graphs)
                print(f"{config:8} {mode:8} {n:4d} {r['steps']:5.2f} {r['round_us']:9.0f} {r['step_us']:8.0f} "
                      f"{r['host_step_us']:9.0f} {r['fwd_step_us']:8.0f} {r['copied']:6d}  {r['digest']}",
                      flush=True)


if __name__ == "__main__":
    main()
