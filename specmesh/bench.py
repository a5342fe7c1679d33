"""Drive a running gateway with a workload at fixed concurrency levels; speculation on and
off measured interleaved in the same run, so the ratio is not skewed by drift.

Per mode and concurrency: per-user tokens/s (each request's completion tokens over its own
latency), aggregate tokens/s (all tokens over wall time), TTFT and time per output token
(p50/p99), accepted length tau (tokens committed per verification round) and acceptance rate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from specmesh.client import AsyncSpecmeshClient


@dataclass
class RequestSample:
    latency_s: float
    ttft_s: float
    completion_tokens: int
    drafted: int
    accepted: int
    rounds: int
    key: tuple = ()  # which request of which slice: the same key in every mode
    token_ids: tuple[int, ...] = ()


@dataclass
class ModeResult:
    mode: str
    concurrency: int
    wall_s: float = 0.0
    samples: list[RequestSample] = field(default_factory=list)

    def _percentile(self, values: Sequence[float], q: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        index = min(int(round(q * (len(ordered) - 1))), len(ordered) - 1)
        return ordered[index]

    def summary(self) -> dict:
        tokens = sum(s.completion_tokens for s in self.samples)
        per_user = [s.completion_tokens / s.latency_s for s in self.samples if s.latency_s > 0]
        tpot = [(s.latency_s - s.ttft_s) / (s.completion_tokens - 1) for s in self.samples if s.completion_tokens > 1]
        ttft = [s.ttft_s for s in self.samples]
        drafted = sum(s.drafted for s in self.samples)
        accepted = sum(s.accepted for s in self.samples)
        rounds = sum(s.rounds for s in self.samples)
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "completion_tokens": tokens,
            "aggregate_tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "per_user_tokens_per_s": statistics.mean(per_user) if per_user else 0.0,
            "ttft_p50_s": self._percentile(ttft, 0.5),
            "ttft_p99_s": self._percentile(ttft, 0.99),
            "tpot_p50_s": self._percentile(tpot, 0.5),
            "tpot_p99_s": self._percentile(tpot, 0.99),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "tau": (accepted + rounds) / rounds if rounds else 0.0,
            "mean_draft_length": drafted / rounds if rounds else 0.0,
        }


async def _one(client: AsyncSpecmeshClient, request: dict, max_tokens: int, speculation: bool,
               max_draft_tokens: int | None, key: tuple = ()) -> RequestSample:
    start = time.perf_counter()
    ttft = None
    last = None
    token_ids: list[int] = []
    options = {"max_draft_tokens": max_draft_tokens} if max_draft_tokens is not None else {}
    async for delta in client.stream(**request, max_tokens=max_tokens, temperature=0.0,
                                     disable_speculation=not speculation, **options):
        if ttft is None and delta.token_ids:
            ttft = time.perf_counter() - start
        token_ids.extend(delta.token_ids)
        last = delta
    latency = time.perf_counter() - start
    spec = last.speculation if last is not None else None
    return RequestSample(latency, ttft or latency, last.usage.completion_tokens if last else 0,
                         spec.drafted_tokens if spec else 0, spec.accepted_tokens if spec else 0,
                         spec.rounds if spec else 0, key, tuple(token_ids))


async def _run_batch(client, requests: list[dict], concurrency: int, max_tokens: int, speculation: bool,
                     max_draft_tokens: int | None, result: ModeResult, slice_index: int = 0) -> None:
    queue = list(enumerate(requests))
    start = time.perf_counter()

    async def worker() -> None:
        while queue:
            index, request = queue.pop(0)
            result.samples.append(await _one(client, request, max_tokens, speculation, max_draft_tokens,
                                             (slice_index, index)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s += time.perf_counter() - start


@dataclass(frozen=True)
class BenchMode:
    name: str
    speculation: bool
    max_draft_tokens: int | None = None
    target: str | None = None  # another gateway (e.g. one whose scheduler runs another policy)


DEFAULT_MODES = (BenchMode("off", False), BenchMode("on", True))


async def run_bench(target: str, requests: list[dict], concurrency_levels: Sequence[int], max_tokens: int,
                    requests_per_level: int, modes: Sequence[BenchMode] = DEFAULT_MODES, repeats: int = 2,
                    progress=None) -> list[dict]:
    """Modes alternate in slices (off, on, off, on, ...) at each concurrency level."""
    summaries = []
    api_key = os.environ.get("SPECMESH_API_KEY")
    clients = {t: AsyncSpecmeshClient(t, api_key=api_key) for t in {target, *(m.target for m in modes if m.target)}}
    try:
        for client in clients.values():
            # Warm-up: first requests pay one-off costs (kernel selection, caches) in every service.
            await _run_batch(client, requests[:2], 2, 8, True, None, ModeResult("warmup", 2))
        for concurrency in concurrency_levels:
            results = {m.name: ModeResult(m.name, concurrency) for m in modes}
            total = max(requests_per_level, concurrency)
            per_slice = max(total // repeats, concurrency)
            for r in range(repeats):
                chosen = [requests[(r * per_slice + i) % len(requests)] for i in range(per_slice)]
                for mode in modes:
                    await _run_batch(clients[mode.target or target], chosen, concurrency, max_tokens,
                                     mode.speculation, mode.max_draft_tokens, results[mode.name], r)
                    if progress is not None:
                        progress()
            base = results[modes[0].name].summary()
            base_outputs = {sample.key: sample.token_ids for sample in results[modes[0].name].samples}
            for mode in modes:
                summary = results[mode.name].summary()
                # Greedy requests: speculation must not change a single token (lossless).
                outputs = {sample.key: sample.token_ids for sample in results[mode.name].samples}
                shared = [key for key in outputs if key in base_outputs]
                summary["outputs_compared"] = len(shared)
                summary["outputs_identical"] = sum(1 for key in shared if outputs[key] == base_outputs[key])
                for key in ("aggregate_tokens_per_s", "per_user_tokens_per_s"):
                    summary[f"{key}_vs_{modes[0].name}"] = summary[key] / base[key] if base[key] else 0.0
                summaries.append(summary)
    finally:
        for client in clients.values():
            await client.close()
    return summaries


def format_table(summaries: list[dict]) -> str:
    """Ratios are against the first mode at the same concurrency (speculation off); HF baselines
    (concurrency 1) are compared with it too. `ceiling` is the analytic speedup for the measured
    acceptance and draft length."""
    header = (f"{'conc':>4} {'mode':>12} {'agg tok/s':>10} {'ratio':>6} {'user tok/s':>10} {'ratio':>6} "
              f"{'ttft p50':>8} {'tpot p50':>8} {'accept':>7} {'tau':>5} {'ceiling':>7} {'same out':>8}")
    lines = [header]
    for s in summaries:
        base = next((b for b in summaries if b["concurrency"] == s["concurrency"]), s)
        agg_ratio = s["aggregate_tokens_per_s"] / base["aggregate_tokens_per_s"] if base["aggregate_tokens_per_s"] else 0
        user_ratio = s["per_user_tokens_per_s"] / base["per_user_tokens_per_s"] if base["per_user_tokens_per_s"] else 0
        ceiling = f"{s['analytic_ceiling']:>7.2f}" if "analytic_ceiling" in s else f"{'':>7}"
        same = f"{s['outputs_identical']}/{s['outputs_compared']}" if s.get("outputs_compared") else ""
        lines.append(f"{s['concurrency']:>4} {s['mode']:>12} {s['aggregate_tokens_per_s']:>10.1f} {agg_ratio:>6.2f} "
                     f"{s['per_user_tokens_per_s']:>10.1f} {user_ratio:>6.2f} {s.get('ttft_p50_s', 0):>8.3f} "
                     f"{s.get('tpot_p50_s', 0):>8.3f} {s.get('acceptance_rate', 0):>7.1%} {s.get('tau', 0):>5.2f} "
                     f"{ceiling} {same:>8}")
    return "\n".join(lines)


def to_json(summaries: list[dict], meta: dict) -> dict:
    return {"meta": meta, "results": summaries}


__all__ = ["run_bench", "format_table", "to_json", "BenchMode", "ModeResult", "RequestSample", "asdict"]
