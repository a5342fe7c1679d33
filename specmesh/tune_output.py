"""Showing a TuneReport (specmesh/tune.py): rich tables on a console, and a matplotlib figure."""

from __future__ import annotations

import os

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from specmesh.tune import TuneReport


def print_report(report: TuneReport, console: Console) -> None:
    console.print(Panel.fit(
        f"{report.num_spans} spans, {report.num_traces} traces, {report.num_sessions} sessions, "
        f"{report.num_rounds} rounds, {report.num_verifier_batches} verifier batches, {report.policy or 'no'} policy\n"
        f"drafted {report.drafted_tokens} tokens, accepted {report.accepted_tokens} "
        f"(acceptance {report.acceptance_rate:.1%})", title="specmesh tune"))

    positions = Table(title="Acceptance by position")
    for column in ("position", "verified", "accepted", "survival", "conditional"):
        positions.add_column(column, justify="right")
    for p in report.positions:
        positions.add_row(str(p.position), str(p.offered), str(p.accepted), f"{p.survival:.1%}", f"{p.conditional:.1%}")

    calibration = Table(title=f"Acceptance by confidence (calibration; ECE {report.calibration_error:.3f})")
    for column in ("confidence", "tested", "accepted", "rate", "mean conf."):
        calibration.add_column(column, justify="right")
    for b in report.calibration:
        calibration.add_row(f"{b.low:.1f}-{b.high:.1f}", str(b.tested), str(b.accepted), f"{b.rate:.1%}",
                            f"{b.mean_confidence:.2f}")
    console.print(positions, calibration)

    by_batch = Table(title="Chosen lengths by verifier batch size (sessions)")
    for column in ("batch size", "rounds", "draft length", "verify length", "accepted"):
        by_batch.add_column(column, justify="right")
    for b in report.by_batch_size:
        by_batch.add_row(str(b.batch_size), str(b.rounds), f"{b.mean_draft_length:.2f}",
                         f"{b.mean_verify_length:.2f}", f"{b.mean_accepted:.2f}")

    speed = Table(title=f"Expected speedup by fixed draft length (batch size {report.median_batch_size})")
    for column in ("draft length", "tokens/round", "round ms", "speedup"):
        speed.add_column(column, justify="right")
    best = report.best
    for p in report.speedup:
        mark = " *" if best is not None and p.draft_length == best.draft_length else ""
        speed.add_row(str(p.draft_length), f"{p.tokens_per_round:.2f}", f"{p.round_seconds * 1000:.1f}",
                      f"{p.speedup:.2f}x{mark}")
    if report.achieved is not None:
        a = report.achieved
        speed.add_row("scheduler", f"{a.tokens_per_round:.2f}", f"{a.round_seconds * 1000:.1f}",
                      f"{a.speedup:.2f}x", style="bold")
    console.print(by_batch, speed)
    verify_a, verify_b = report.verify_cost
    draft_a, draft_b = report.draft_cost
    console.print(f"cost model: verify {verify_a * 1000:.2f} ms + {verify_b * 1000:.3f} ms/token, "
                  f"draft {draft_a * 1000:.2f} ms + {draft_b * 1000:.3f} ms/step; "
                  f"queue wait p90 {report.queue_wait_p90_s * 1000:.1f} ms")
    console.print(Panel(Group(*[f"- {line}" for line in report.recommendations]), title="Recommended settings"))


def plot_report(report: TuneReport, path: str | os.PathLike) -> None:
    """Calibration curve, speedup curve, acceptance by position, verify length vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if report.calibration:
        xs = [b.mean_confidence for b in report.calibration]
        ys = [b.rate for b in report.calibration]
        sizes = [20 + 200 * b.tested / max(c.tested for c in report.calibration) for b in report.calibration]
        ax.plot(xs, ys, "-", color="tab:blue")
        ax.scatter(xs, ys, s=sizes, color="tab:blue", label="measured (size = tokens)", zorder=3)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="drafter confidence", ylabel="acceptance rate",
           title=f"Calibration (ECE {report.calibration_error:.3f})")
    ax.legend(loc="upper left")

    ax = axes[0][1]
    if report.speedup:
        xs = [p.draft_length for p in report.speedup]
        ax.plot(xs, [p.speedup for p in report.speedup], "o-", color="tab:green", label="fixed draft length (model)")
        best = report.best
        if best is not None:
            ax.annotate(f"best: {best.draft_length} ({best.speedup:.2f}x)", (best.draft_length, best.speedup),
                        textcoords="offset points", xytext=(8, -14))
        if report.achieved is not None:
            ax.axhline(report.achieved.speedup, color="tab:red", linestyle="--",
                       label=f"{report.policy or 'scheduler'} policy achieved {report.achieved.speedup:.2f}x")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(xs)
    ax.set(xlabel="draft length", ylabel="speedup over plain decoding",
           title=f"Expected speedup (batch size {report.median_batch_size})")
    ax.legend(loc="lower right")

    ax = axes[1][0]
    if report.positions:
        xs = [p.position for p in report.positions]
        ax.bar([x - 0.2 for x in xs], [p.survival for p in report.positions], width=0.4, label="survival")
        ax.bar([x + 0.2 for x in xs], [p.conditional for p in report.positions], width=0.4, label="conditional")
        ax.set_xticks(xs)
    ax.set(ylim=(0, 1.02), xlabel="draft position", ylabel="acceptance",
           title=f"Acceptance by position (overall {report.acceptance_rate:.1%})")
    ax.legend(loc="upper right")

    ax = axes[1][1]
    if report.by_batch_size:
        xs = [b.batch_size for b in report.by_batch_size]
        ax.plot(xs, [b.mean_draft_length for b in report.by_batch_size], "s--", label="draft length")
        ax.plot(xs, [b.mean_verify_length for b in report.by_batch_size], "o-", label="verify length chosen")
        ax.plot(xs, [b.mean_accepted for b in report.by_batch_size], "^:", label="accepted")
        top = max(max(b.mean_draft_length, b.mean_verify_length) for b in report.by_batch_size)
        ax.set_ylim(0, top * 1.35 + 0.1)
    ax.set(xlabel="verifier batch size (sessions)", ylabel="tokens per session-round",
           title="Chosen verify length vs load")
    ax.legend(loc="upper center", ncol=3)

    fig.suptitle(f"specmesh tune: {report.num_sessions} sessions, {report.num_rounds} rounds, "
                 f"{report.drafted_tokens} drafted, {report.accepted_tokens} accepted", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
