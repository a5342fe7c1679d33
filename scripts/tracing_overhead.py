"""Tokens/s with tracing off versus on (--trace-file), on two local clusters run side by side.

    python scripts/tracing_overhead.py [--verifier REF] [--drafter REF] [--policy fixed] [--rounds 3]
        [--concurrency 4] [--requests 8] [--max-tokens 48]

Both clusters are `specmesh up`-style process sets (LocalCluster) started at once; rounds
alternate which one is driven first, so drift (thermal, page cache) hits both alike. The idle
cluster sleeps (passive OpenMP waits). Prints aggregate completion tokens/s per round and mode.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from specmesh.client import AsyncSpecmeshClient
from specmesh.local_cluster import LocalCluster, free_port
from specmesh.workloads import load_workload


async def drive(target: str, prompts: list[dict], concurrency: int, requests: int, max_tokens: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(client: AsyncSpecmeshClient, prompt: dict) -> None:
        nonlocal tokens
        async with gate:
            result = await client.generate(**prompt, max_tokens=max_tokens)
            tokens += result.usage.completion_tokens

    async with AsyncSpecmeshClient(target) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, prompts[i % len(prompts)]) for i in range(requests)))
        return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", default="smollm2-135m")
    parser.add_argument("--drafter", default="prompt-lookup")
    parser.add_argument("--policy", default="adaptive", help="adaptive or fixed (fixed removes the policy's "
                                                                  "timing-driven choices from the comparison)")
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    prompts = load_workload("mixed")
    trace_dir = Path(tempfile.mkdtemp(prefix="specmesh-overhead-"))
    clusters = {
        "off": LocalCluster(verifier=args.verifier, drafter=args.drafter, port=free_port(), policy=args.policy,
                            draft_length=args.draft_length),
        "on": LocalCluster(verifier=args.verifier, drafter=args.drafter, port=free_port(), policy=args.policy,
                           draft_length=args.draft_length, trace_file=trace_dir / "traces.jsonl"),
    }
    print("starting two clusters (tracing off / on) ...", file=sys.stderr)
    try:
        for cluster in clusters.values():
            cluster.start()
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for mode, cluster in clusters.items():  # warm-up, not counted
            asyncio.run(drive(cluster.gateway_address, prompts, args.concurrency, args.concurrency, 8))
        for round_index in range(args.rounds):
            order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
            for mode in order:
                rate = asyncio.run(drive(clusters[mode].gateway_address, prompts, args.concurrency, args.requests,
                                         args.max_tokens))
                rates[mode].append(rate)
                print(f"round {round_index + 1} tracing {mode:3}: {rate:7.2f} tokens/s", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    off, on = statistics.fmean(rates["off"]), statistics.fmean(rates["on"])
    size = (trace_dir / "traces.jsonl").stat().st_size if (trace_dir / "traces.jsonl").exists() else 0
    print(f"mean: off {off:.2f} tokens/s, on {on:.2f} tokens/s ({(on / off - 1) * 100:+.1f}%); "
          f"trace file {size / 1e6:.1f} MB in {trace_dir}")


if __name__ == "__main__":
    main()
