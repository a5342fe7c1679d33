"""Speculation off vs a fixed draft length (4) vs the adaptive policy, on one local cluster, in one run.

One verifier and one drafter process serve two schedulers (policy fixed, policy adaptive), each
behind its own gateway; the modes run interleaved at each concurrency level so they see the
same machine state. Prints aggregate tokens/s and accepted length tau as ratios to speculation
off.

    .venv/bin/python scripts/policy_bench.py [--verifier REF] [--drafter REF] [--concurrency 1,4,16]
                                             [--fixed-length 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specmesh.bench import BenchMode, run_bench  # noqa: E402
from specmesh.local_cluster import LocalCluster, free_port, wait_serving  # noqa: E402
from specmesh.workloads import load_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verifier", default="smollm2-135m")
    parser.add_argument("--drafter", default="prompt-lookup")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--json", default=None)
    parser.add_argument("--fixed-length", type=int, default=4, help="Draft length of the fixed policy.")
    args = parser.parse_args()

    cluster = LocalCluster(verifier=args.verifier, drafter=args.drafter, port=free_port(), policy="fixed",
                           draft_length=args.fixed_length)
    cluster.start()
    try:
        verifier = next(s for s in cluster.services if s.name == "verifier")
        drafter = next(s for s in cluster.services if s.name == "drafter")
        # A second scheduler + gateway with the adaptive policy, sharing verifier and drafter.
        adaptive_scheduler = cluster._spawn("scheduler", free_port(), [
            "--verifiers", verifier.address, "--drafters", drafter.address, "--policy", "adaptive"])
        wait_serving(adaptive_scheduler.address, 300, adaptive_scheduler.process)
        adaptive_gateway = cluster._spawn("gateway", free_port(), [
            "--model", args.verifier, "--scheduler", adaptive_scheduler.address])
        wait_serving(adaptive_gateway.address, 300, adaptive_gateway.process)
        modes = (BenchMode("off", False), BenchMode(f"fixed-{args.fixed_length}", True),
                 BenchMode("adaptive", True, target=adaptive_gateway.address))
        levels = [int(x) for x in args.concurrency.split(",")]
        results = asyncio.run(run_bench(cluster.gateway_address, load_workload(args.workload), levels,
                                        args.max_tokens, args.requests, modes=modes))
    finally:
        cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"{'conc':>4} {'mode':>9} {'agg tok/s':>10} {'vs off':>7} {'tau':>5} {'tau vs off':>10} {'accept':>7}")
    for r in results:
        base = next(x for x in results if x["concurrency"] == r["concurrency"] and x["mode"] == "off")
        print(f"{r['concurrency']:>4} {r['mode']:>9} {r['aggregate_tokens_per_s']:>10.1f} "
              f"{r['aggregate_tokens_per_s_vs_off']:>7.2f} {r['tau']:>5.2f} {r['tau'] / base['tau']:>10.2f} "
              f"{r['acceptance_rate']:>7.1%}")


if __name__ == "__main__":
    main()
