"""Where the time goes on this CPU: a drafter step and a verifier forward of 1..5 tokens,
through specmesh's own ModelRunner (packed path), split into decoder layers and LM head, and
per operator (torch.profiler).

    OMP_WAIT_POLICY=PASSIVE python scripts/drafter_cpu_profile.py [--verifier smollm2-135m]
        [--drafter smollm2-135m-drafter] [--context 200] [--repeats 40] [--json OUT]

Each measurement is the median of `repeats` forwards of a session holding `context` cached
tokens; the appended tokens are rolled back after every forward so the context stays fixed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from specmesh.engine import EngineConfig, build_drafter
from specmesh.model_loading import load_causal_lm
from specmesh.model_runner import ForwardRequest, ModelRunner


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first call of a shape pays for kernel selection
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 2)


def _prefilled(runner: ModelRunner, context: int) -> int:
    slot = 0
    runner.cache.end_forward([slot], [0])
    runner.forward_flat([ForwardRequest(slot, [100 + i % 1000 for i in range(context)], logits_from=context - 1)])
    return slot


def profile_runner(runner: ModelRunner, context: int, sizes: list[int], repeats: int,
                   head: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """Per forward size n: total (runner.forward_flat, logits of every token), decoder only
    (the packed run without the LM head), LM head only ([n, H] x [H, V]). head: the LM head's
    weight to time (a reduced one); None: the runner's."""
    slot = _prefilled(runner, context)
    weight = head if head is not None else runner.lm_head.weight
    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        tokens = [200 + i for i in range(n)]

        def full() -> None:
            runner.forward_flat([ForwardRequest(slot, tokens, logits_from=0)])
            runner.cache.end_forward([slot], [context])  # roll back: the context stays fixed

        def decoder_only() -> None:
            packed = runner.packed
            key = packed.eager_key(n, slot, n, context + n)
            inputs = torch.from_numpy(packed.host_inputs([ForwardRequest(slot, tokens)], [context], [n], key))
            with torch.inference_mode():
                packed.run(inputs, key)
            runner.cache.end_forward([slot], [context])

        hidden = torch.randn(n, weight.shape[1], dtype=weight.dtype)

        def lm_head() -> None:
            with torch.inference_mode():
                torch.nn.functional.linear(hidden, weight)

        out[str(n)] = {"total_ms": _median_ms(full, repeats), "decoder_ms": _median_ms(decoder_only, repeats),
                       "lm_head_ms": _median_ms(lm_head, repeats)}
    return out


def op_table(runner: ModelRunner, context: int, n: int, repeats: int = 10, top: int = 12) -> list[dict]:
    """Self CPU time per operator for a forward of n tokens (ms per forward)."""
    slot = _prefilled(runner, context)
    tokens = [200 + i for i in range(n)]
    from torch.profiler import ProfilerActivity, profile

    runner.forward_flat([ForwardRequest(slot, tokens)])
    runner.cache.end_forward([slot], [context])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(repeats):
            runner.forward_flat([ForwardRequest(slot, tokens)])
            runner.cache.end_forward([slot], [context])
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        totals[event.key] += event.self_cpu_time_total / 1e3 / repeats
        counts[event.key] += event.count // repeats
    rows = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": k, "self_ms": round(v, 2), "calls": counts[k]} for k, v in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--verifier", default="smollm2-135m")
    parser.add_argument("--drafter", default="smollm2-135m-drafter")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--draft-vocab", type=int, nargs="*", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_causal_lm(args.verifier)
    verifier_runner = ModelRunner(loaded.model, 2, 1024)
    result: dict = {"threads": torch.get_num_threads(), "context": args.context}
    result["verifier"] = profile_runner(verifier_runner, args.context, [1, 2, 3, 4, 5, 8], args.repeats)
    result["verifier_ops_1"] = op_table(verifier_runner, args.context, 1)
    result["verifier_ops_3"] = op_table(verifier_runner, args.context, 3)
    drafter = build_drafter(args.drafter, loaded.model, loaded.tokenizer, EngineConfig(num_slots=2, max_context=1024))
    runner = drafter.runner
    result["drafter"] = profile_runner(runner, args.context, [1], args.repeats)
    result["drafter_ops_1"] = op_table(runner, args.context, 1)
    full_head = runner.lm_head.weight
    reduced = {}
    for k in args.draft_vocab:
        rows = full_head[:k].clone()
        hidden = torch.randn(1, full_head.shape[1])
        reduced[str(k)] = _median_ms(lambda: torch.nn.functional.linear(hidden, rows), args.repeats)
    result["lm_head_1_token_ms_by_rows"] = reduced | {str(full_head.shape[0]): result["drafter"]["1"]["lm_head_ms"]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
