"""`specmesh tune`: turn exported traces into acceptance statistics and recommended settings.

Pure: spans in (specmesh/otlp_json.py records), a TuneReport out; no printing, no plotting
(specmesh/tune_plot.py draws, the CLI prints `format_report`). Definitions, all from the
scheduler's round spans (``specmesh.scheduler.round``, one per session per round):

- position j is *offered* in a round when ``verify_length > j``, *accepted* when
  ``accepted > j``. survival[j] = accepted/offered: the chance that the first j+1 drafts all
  survive, given j+1 were verified (what the Prometheus per-position series give too).
  conditional[j] = accepted / (offered rounds whose drafts before j were all accepted).
- calibration: each draft token that verification actually tested (positions up to the first
  rejection) is one (confidence, accepted) observation, bucketed by confidence.
- expected speedup at a fixed draft length g, against plain decoding at the same load:
  E(g) = 1 + sum_{j<g} prod_{i<=j} conditional[i] committed tokens per round, and a round
  costs T(g) = draft(g) + verify(n * (1 + g)) where draft() and verify() are least-squares
  fits of the rounds' measured draft and Verify seconds, and n the median batch size;
  speedup(g) = E(g) * T(0) / T(g) (Leviathan et al. with measured costs). The achieved
  speedup is the rounds' real committed tokens per second over what plain decoding of the same
  batches would have done: one token per session per verify(batch tokens - draft tokens).
Rounds answered CACHE_MISS (re-prefills) are left out of every figure.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from specmesh.otlp_json import SpanRecord, read_spans

ROUND_SPAN = "specmesh.scheduler.round"
VERIFIER_BATCH_SPAN = "specmesh.verifier.batch"
DRAFT_SPAN = "specmesh.drafter.draft"
REQUEST_SPAN = "specmesh.gateway.request"
CONFIDENCE_BUCKETS = 10
MAX_FIXED_LENGTH = 12


@dataclass(frozen=True)
class RoundRecord:
    session_id: str
    trace_id: str
    draft_length: int
    verify_length: int
    accepted: int
    committed: int
    confidences: tuple[float, ...]
    batch_size: int
    batch_tokens: int
    batch_draft_tokens: int
    queue_wait_s: float
    draft_s: float
    verify_s: float
    adaptive: bool = False  # chosen by the adaptive policy (else a fixed draft length)

    @classmethod
    def from_span(cls, span: SpanRecord) -> "RoundRecord | None":
        a = span.attributes
        if "specmesh.round.accepted" not in a or a.get("specmesh.round.verifier_cache_miss"):
            return None  # cancelled mid-round, or a re-prefill: no verification outcome
        return cls(
            session_id=str(a.get("specmesh.session.id", "")), trace_id=span.trace_id,
            draft_length=int(a.get("specmesh.round.draft_length", 0)),
            verify_length=int(a.get("specmesh.round.verify_length", 0)),
            accepted=int(a.get("specmesh.round.accepted", 0)), committed=int(a.get("specmesh.round.committed", 0)),
            confidences=tuple(float(c) for c in a.get("specmesh.round.confidences", ()) or ()),
            batch_size=int(a.get("specmesh.round.batch_size", 1)), batch_tokens=int(a.get("specmesh.round.batch_tokens", 0)),
            batch_draft_tokens=int(a.get("specmesh.round.batch_draft_tokens", a.get("specmesh.round.verify_length", 0))),
            queue_wait_s=float(a.get("specmesh.round.queue_wait_s", 0.0)),
            draft_s=float(a.get("specmesh.round.draft_s", 0.0)), verify_s=float(a.get("specmesh.round.verify_s", 0.0)),
            adaptive=a.get("specmesh.round.policy") == "adaptive" or "specmesh.round.expected_tokens" in a,
        )


@dataclass(frozen=True)
class PositionStat:
    position: int
    offered: int
    accepted: int
    tested: int  # offered with every earlier draft accepted

    @property
    def survival(self) -> float:
        return self.accepted / self.offered if self.offered else 0.0

    @property
    def conditional(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0


@dataclass(frozen=True)
class ConfidenceBucket:
    low: float
    high: float
    tested: int
    accepted: int
    mean_confidence: float

    @property
    def rate(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0


@dataclass(frozen=True)
class BatchSizeStat:
    batch_size: int
    rounds: int
    mean_draft_length: float
    mean_verify_length: float
    mean_accepted: float


@dataclass(frozen=True)
class SpeedupPoint:
    draft_length: int
    tokens_per_round: float
    round_seconds: float
    speedup: float


@dataclass
class TuneReport:
    num_spans: int = 0
    num_traces: int = 0
    num_sessions: int = 0
    num_rounds: int = 0
    num_verifier_batches: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    positions: list[PositionStat] = field(default_factory=list)
    calibration: list[ConfidenceBucket] = field(default_factory=list)
    calibration_error: float = 0.0  # expected calibration error over the buckets
    by_batch_size: list[BatchSizeStat] = field(default_factory=list)
    speedup: list[SpeedupPoint] = field(default_factory=list)
    achieved: SpeedupPoint | None = None
    median_batch_size: int = 1
    verify_cost: tuple[float, float] = (0.0, 0.0)  # seconds = a + b * batch tokens
    draft_cost: tuple[float, float] = (0.0, 0.0)  # seconds = a + b * draft steps (0 when none)
    queue_wait_p90_s: float = 0.0
    policy: str = ""  # "adaptive", "fixed" or "mixed": what chose the traced rounds' lengths
    recommendations: list[str] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def best(self) -> SpeedupPoint | None:
        return max(self.speedup, key=lambda p: p.speedup, default=None)


# ---- reading -----------------------------------------------------------------------------------


def trace_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files to read: each path itself, or every *.json/*.jsonl below a directory."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such trace file or directory: {path}")
    return files


def load_spans(paths: Sequence[str | os.PathLike],
               progress: Callable[[int, int], None] | None = None) -> list[SpanRecord]:
    """Spans of every trace file; progress(bytes_done, bytes_total) after each file."""
    files = trace_files(paths)
    total = sum(f.stat().st_size for f in files)
    done = 0
    spans: list[SpanRecord] = []
    for path in files:
        spans.extend(read_spans(path))
        done += path.stat().st_size
        if progress is not None:
            progress(done, total)
    return spans


# ---- analysis ----------------------------------------------------------------------------------


def analyze(spans: Iterable[SpanRecord], max_fixed_length: int = MAX_FIXED_LENGTH) -> TuneReport:
    spans = list(spans)
    report = TuneReport(num_spans=len(spans), num_traces=len({s.trace_id for s in spans}))
    rounds = [r for r in (RoundRecord.from_span(s) for s in spans if s.name == ROUND_SPAN) if r is not None]
    report.num_verifier_batches = sum(1 for s in spans if s.name == VERIFIER_BATCH_SPAN)
    report.num_rounds = len(rounds)
    report.num_sessions = len({r.session_id for r in rounds})
    report.drafted_tokens = sum(r.verify_length for r in rounds)
    report.accepted_tokens = sum(r.accepted for r in rounds)
    report.positions = position_stats(rounds)
    report.calibration = confidence_buckets(rounds)
    tested = sum(b.tested for b in report.calibration)
    report.calibration_error = (sum(b.tested * abs(b.rate - b.mean_confidence) for b in report.calibration) / tested
                                if tested else 0.0)
    report.by_batch_size = batch_size_stats(rounds)
    kinds = {r.adaptive for r in rounds}
    report.policy = "mixed" if len(kinds) > 1 else ("adaptive" if True in kinds else "fixed") if kinds else ""
    if rounds:
        report.median_batch_size = max(1, int(statistics.median(r.batch_size for r in rounds)))
        waits = sorted(r.queue_wait_s for r in rounds)
        report.queue_wait_p90_s = waits[min(len(waits) - 1, int(0.9 * len(waits)))]
    report.verify_cost = linear_fit([(r.batch_tokens, r.verify_s) for r in rounds if r.batch_tokens > 0])
    report.draft_cost = linear_fit([(r.draft_length, r.draft_s) for r in rounds if r.draft_length > 0])
    _speedups(report, rounds, max_fixed_length)
    report.recommendations = recommend(report)
    return report


def position_stats(rounds: Sequence[RoundRecord]) -> list[PositionStat]:
    longest = max((r.verify_length for r in rounds), default=0)
    stats = []
    for j in range(longest):
        offered = [r for r in rounds if r.verify_length > j]
        stats.append(PositionStat(
            position=j, offered=len(offered), accepted=sum(1 for r in offered if r.accepted > j),
            tested=sum(1 for r in offered if r.accepted >= j)))
    return stats


def confidence_buckets(rounds: Sequence[RoundRecord], num_buckets: int = CONFIDENCE_BUCKETS) -> list[ConfidenceBucket]:
    counts = [[0, 0, 0.0] for _ in range(num_buckets)]  # tested, accepted, sum of confidence
    for r in rounds:
        # Tested positions: up to and including the first rejection (later ones never ran).
        for j in range(min(r.verify_length, r.accepted + 1, len(r.confidences))):
            confidence = min(max(r.confidences[j], 0.0), 1.0)
            bucket = counts[min(int(confidence * num_buckets), num_buckets - 1)]
            bucket[0] += 1
            bucket[1] += 1 if j < r.accepted else 0
            bucket[2] += confidence
    return [ConfidenceBucket(i / num_buckets, (i + 1) / num_buckets, int(t), int(a), s / t)
            for i, (t, a, s) in enumerate(counts) if t]


def batch_size_stats(rounds: Sequence[RoundRecord]) -> list[BatchSizeStat]:
    groups: dict[int, list[RoundRecord]] = {}
    for r in rounds:
        groups.setdefault(r.batch_size, []).append(r)
    return [BatchSizeStat(size, len(g), statistics.fmean(r.draft_length for r in g),
                          statistics.fmean(r.verify_length for r in g), statistics.fmean(r.accepted for r in g))
            for size, g in sorted(groups.items())]


def linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x with a, b >= 0; through the origin when x has no spread."""
    points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not points:
        return 0.0, 0.0
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points) / n
    if var_x > 1e-9 * max(1.0, mean_x * mean_x):
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / n / var_x
        intercept = mean_y - slope * mean_x
        if slope >= 0 and intercept >= 0:
            return intercept, slope
        if slope < 0:
            return mean_y, 0.0
    sum_xx = sum(x * x for x, _ in points)
    return (0.0, max(sum(x * y for x, y in points) / sum_xx, 0.0)) if sum_xx > 0 else (mean_y, 0.0)


def expected_tokens(conditional: Sequence[float], length: int) -> float:
    """1 + sum_{j<length} prod_{i<=j} conditional[i]; positions past the data reuse the last."""
    total, survival = 1.0, 1.0
    for j in range(length):
        rate = conditional[j] if j < len(conditional) else (conditional[-1] if conditional else 0.0)
        survival *= rate
        total += survival
    return total


def _speedups(report: TuneReport, rounds: Sequence[RoundRecord], max_length: int) -> None:
    if not rounds:
        return
    n = report.median_batch_size
    verify_a, verify_b = report.verify_cost
    draft_a, draft_b = report.draft_cost

    def round_seconds(length: int) -> float:
        drafting = draft_a + draft_b * length if length > 0 else 0.0
        return drafting + verify_a + verify_b * n * (1 + length)

    base = round_seconds(0)
    if base <= 0:
        return
    conditional = [p.conditional for p in report.positions]
    longest = max(len(conditional), 1)
    for length in range(0, min(max_length, longest + 4) + 1):
        tokens = expected_tokens(conditional, length)
        seconds = round_seconds(length)
        report.speedup.append(SpeedupPoint(length, tokens, seconds, tokens * base / seconds if seconds > 0 else 0.0))
    committed = statistics.fmean(r.committed for r in rounds)
    seconds = statistics.fmean(r.draft_s + r.verify_s for r in rounds)
    # Plain decoding of the very same batches (prefills included): no drafting, no drafts.
    plain = statistics.fmean(verify_a + verify_b * max(r.batch_tokens - r.batch_draft_tokens, r.batch_size)
                             for r in rounds)
    mean_length = statistics.fmean(r.verify_length for r in rounds)
    report.achieved = SpeedupPoint(round(mean_length), committed, seconds,
                                   committed * plain / seconds if seconds > 0 else 0.0)


def recommend(report: TuneReport) -> list[str]:
    out: list[str] = []
    best = report.best
    if report.num_rounds == 0:
        return ["no scheduler round spans found: run the services with --trace-file (or OTEL_* export) and "
                "send some requests first"]
    if best is not None:
        if best.draft_length == 0 or best.speedup < 1.05:
            out.append(f"speculation does not pay at this load with this drafter (best fixed length "
                       f"{best.draft_length}: {best.speedup:.2f}x): use a better-matched drafter, or "
                       f"`--policy fixed --draft-length 0`")
        else:
            out.append(f"best fixed draft length: {best.draft_length} (expected {best.speedup:.2f}x over plain "
                       f"decoding at batch size {report.median_batch_size}; "
                       f"`specmesh serve scheduler --policy fixed --draft-length {best.draft_length}`)")
        if report.achieved is not None and best.speedup > 0:
            ratio = report.achieved.speedup / best.speedup
            achieved = f"the {report.policy} policy achieved {report.achieved.speedup:.2f}x, {ratio:.0%} of the best"
            if ratio >= 0.95:
                out.append(f"{achieved}: keep it")
            elif report.policy == "fixed":
                out.append(f"{achieved}: use `--draft-length {best.draft_length}`, or the adaptive policy (the "
                           f"default), which picks lengths per round from confidence and load")
            else:
                out.append(f"{achieved}: try `--policy fixed --draft-length {best.draft_length}`, or let the "
                           f"adaptive policy calibrate longer (share calibration with `--redis-url`)")
    useful = [p.position + 1 for p in report.positions if p.survival >= 0.1 and p.offered >= 5]
    if useful and max(useful) < len(report.positions):
        out.append(f"drafts beyond position {max(useful)} survive less than 10% of the time: "
                   f"`--max-draft-tokens {max(useful)}` loses nothing")
    if report.calibration_error > 0.1:
        out.append(f"raw drafter confidence is miscalibrated (expected calibration error "
                   f"{report.calibration_error:.2f}): rely on the adaptive policy's online calibration, shared "
                   f"through Redis across schedulers")
    elif report.calibration:
        out.append(f"raw drafter confidence is well calibrated (expected calibration error "
                   f"{report.calibration_error:.2f})")
    if report.achieved is not None and report.queue_wait_p90_s > 1.5 * max(report.achieved.round_seconds, 1e-9):
        out.append(f"sessions wait {report.queue_wait_p90_s * 1000:.0f} ms (p90) for a round: raise "
                   f"`--max-batch-sessions` or add verifier replicas")
    return out
