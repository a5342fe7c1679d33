"""Plots of one or more `scripts/gpu_bench.py` results (the JSON it writes under $OUT).

Three panels in one PNG:
1. the verifier's cost curve: ms per forward against batch tokens, CUDA graphs (and eager where
   measured), and the start-up profile the scheduler plans with;
2. speedup over speculation off by concurrency, aggregate (bar) and per user (dash), one bar
   per mode, with the analytic ceiling (1 - a^(g+1)) / ((1 - a)(g c + 1)) at the measured
   alpha, gamma and cost ratio marked (triangle);
3. where a round goes: the scheduler's draft and verify calls against the cores' own work.

With several result files the speedup panel shows each run's bars side by side (labelled by
file name): the spread between runs of one configuration is part of the result.

    python scripts/plot_gpu_bench.py docs/gpu-bench-h200-repeat-steady.json \\
        docs/gpu-bench-h200-repeat-steady-2.json --out docs/gpu-bench-h200-repeat-steady.png

matplotlib comes with specmesh's own install (`specmesh bench --plot` uses it); the GPU
machine need not have it: plot here from the JSON the device run wrote.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(paths: list[str]) -> list[tuple[str, dict]]:
    return [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]


def plot(runs: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cost_ax, speed_ax, round_ax) = plt.subplots(1, 3, figsize=(18, 5.5))
    name, first = runs[0]
    meta = first.get("meta", {})
    fig.suptitle(f"specmesh GPU bench on {meta.get('device', '?')}, {meta.get('date', '?')[:10]} "
                 f"(torch {meta.get('torch', '?')}): 8B-shaped verifier, 1B-shaped drafter, random weights, "
                 f"controlled acceptance", fontsize=11)

    # 1. The verifier's cost curve.
    by_sessions: dict[int, list[dict]] = {}
    for row in first.get("verifier_cost", []):
        by_sessions.setdefault(row["sessions"], []).append(row)
    for sessions, rows in sorted(by_sessions.items()):
        rows.sort(key=lambda r: r["batch_tokens"])
        line, = cost_ax.plot([r["batch_tokens"] for r in rows], [r["ms"] for r in rows], marker="o",
                             label=f"{sessions} session{'s' if sessions > 1 else ''}, CUDA graphs")
        eager = [r for r in rows if "ms_eager" in r]
        if eager:
            cost_ax.scatter([r["batch_tokens"] for r in eager], [r["ms_eager"] for r in eager], marker="x",
                            color=line.get_color(), label=f"{sessions}: eager")
    profile = first.get("verifier_profile_ms") or []
    if profile:
        cost_ax.plot([p[0] for p in profile], [p[1] for p in profile], linestyle="--", color="grey",
                     label="start-up profile (what the scheduler plans with)")
    cost_ax.set_xscale("log", base=2)
    cost_ax.set_xlabel("batch tokens (sessions x tokens each)")
    cost_ax.set_ylabel("ms per forward")
    cost_ax.set_title("verifier forward cost")
    cost_ax.legend(fontsize=7)
    cost_ax.grid(alpha=0.3)

    # 2. Speedup over speculation off.
    modes = [m for m in first["levels"][0]["modes"] if m != "off"]
    levels = [level["concurrency"] for level in first["levels"]]
    groups = [(run_name, {lv["concurrency"]: lv["modes"] for lv in data["levels"]}) for run_name, data in runs]
    width = 0.8 / (len(modes) * len(groups))
    for g, (run_name, by_level) in enumerate(groups):
        for m, mode in enumerate(modes):
            offset = (g * len(modes) + m) * width - 0.4 + width / 2
            xs, aggregate, per_user = [], [], []
            for i, concurrency in enumerate(levels):
                row = by_level.get(concurrency, {}).get(mode)
                if row is None:
                    continue
                xs.append(i + offset)
                aggregate.append(row["aggregate_vs_off"])
                per_user.append(row["per_user_vs_off"])
            label = mode if len(groups) == 1 else f"{mode} ({run_name})"
            bars = speed_ax.bar(xs, aggregate, width, label=label, alpha=0.85)
            if bars.patches:
                speed_ax.scatter(xs, per_user, marker="_", s=120, color=bars.patches[0].get_facecolor())
            for x, concurrency in zip(xs, [c for c in levels if mode in by_level.get(c, {})]):
                ceiling = by_level[concurrency][mode].get("ceiling")
                if ceiling:
                    speed_ax.scatter([x], [ceiling], marker="v", color="black", s=10)
    speed_ax.axhline(1.0, color="black", linewidth=0.8)
    speed_ax.axhline(0.97, color="red", linewidth=0.6, linestyle=":", label="0.97 (saturation target)")
    speed_ax.set_xticks(range(len(levels)), [f"{c} session{'s' if c > 1 else ''}" for c in levels])
    speed_ax.set_ylabel("x speculation off (bar: aggregate, dash: per user, triangle: ceiling)")
    speed_ax.set_title("speedup, measured side by side in each run")
    speed_ax.legend(fontsize=6, ncol=2)
    speed_ax.grid(axis="y", alpha=0.3)

    # 3. Where a round goes (the first run).
    labels, draft_call, draft_core, verify_call, verify_core = [], [], [], [], []
    for level in first["levels"]:
        for mode, row in level["modes"].items():
            if "sched_round_ms" not in row:
                continue
            labels.append(f"{level['concurrency']} {mode}")
            draft_call.append(row.get("sched_draft_call_ms", 0.0) if mode != "off" else 0.0)
            draft_core.append(row.get("drafter_core_ms", 0.0) if mode != "off" else 0.0)
            verify_call.append(row.get("sched_verify_call_ms", 0.0))
            verify_core.append(row.get("verifier_core_ms", 0.0))
    ys = range(len(labels))
    round_ax.barh(ys, draft_core, color="tab:blue", label="drafter core")
    round_ax.barh(ys, [c - k for c, k in zip(draft_call, draft_core)], left=draft_core, color="lightsteelblue",
                  label="draft call beyond the core (gRPC, conversion, hand-overs)")
    round_ax.barh(ys, verify_core, left=draft_call, color="tab:orange", label="verifier core")
    round_ax.barh(ys, [c - k for c, k in zip(verify_call, verify_core)],
                  left=[d + k for d, k in zip(draft_call, verify_core)], color="navajowhite",
                  label="verify call beyond the core")
    round_ax.set_yticks(list(ys), labels, fontsize=7)
    round_ax.invert_yaxis()
    round_ax.set_xlabel(f"ms per round ({name})")
    round_ax.set_title("where a round goes")
    round_ax.legend(fontsize=6, loc="upper right")
    round_ax.grid(axis="x", alpha=0.3)

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="gpu_bench.json files (one run each)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    plot(load(args.results), Path(args.out))
    print(args.out)


if __name__ == "__main__":
    main()
