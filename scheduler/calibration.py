"""Online calibration of drafter confidence: raw confidence -> probability the draft survives.

Pure logic, no I/O. A `CalibrationTable` holds, per (position in the chunk, confidence
bucket), how many draft tokens were offered to the verifier and how many it accepted,
exponentially decayed by elapsed time so the table follows drift (new prompts, load, drafter
updates). From it:

- `acceptance(position, confidence)` = ĉ: the probability that the token at `position` is
  accepted given that every draft before it was accepted, for a token of that raw confidence.
  A Beta prior whose mean is the raw confidence itself (weight `prior_weight` pseudo-tokens)
  keeps empty or thin buckets sensible: with no data ĉ equals the raw confidence.
- `position_acceptance(position)`: the same probability marginalised over confidence. It is
  built from older rounds only, so the budget policy may use it to decide whether to verify a
  token without looking at that token (what keeps verification lossless, DSpark appendix A).

Positions are 0-based within the drafted chunk; positions at or past `max_positions - 1`
share the last row. Counts are floats (decay makes them fractional).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from scheduler.draft_policy import RoundOutcome


@dataclass(frozen=True)
class CalibrationConfig:
    num_buckets: int = 10  # equal-width confidence buckets over [0, 1]
    max_positions: int = 16  # rows; later positions share the last row
    half_life_s: float = 600.0  # an observation counts half after this long
    prior_weight: float = 2.0  # Beta prior strength, in pseudo-observations
    default_acceptance: float = 0.5  # prior mean of position 0's marginal (no data at all)

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.max_positions < 1:
            raise ValueError("num_buckets and max_positions must be >= 1")
        if not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {self.half_life_s}")
        if not self.prior_weight > 0:
            raise ValueError(f"prior_weight must be > 0, got {self.prior_weight}")
        if not 0.0 <= self.default_acceptance <= 1.0:
            raise ValueError(f"default_acceptance must be in [0, 1], got {self.default_acceptance}")

    @property
    def geometry(self) -> str:
        """Identifies the table layout; stores key on it so incompatible layouts never mix."""
        return f"{self.max_positions}x{self.num_buckets}"

    def row_of(self, position: int) -> int:
        return min(max(position, 0), self.max_positions - 1)

    def bucket_of(self, confidence: float) -> int:
        """Equal-width bucket of a raw confidence; out-of-range or NaN values are clamped."""
        if not confidence > 0.0:  # also catches NaN
            return 0
        return min(int(confidence * self.num_buckets), self.num_buckets - 1)


@dataclass(frozen=True)
class Observation:
    """An increment to one cell: `offered` drafts at (position, bucket), `accepted` of them."""

    position: int
    bucket: int
    offered: float
    accepted: float


def observations_from(outcomes: Iterable[RoundOutcome], config: CalibrationConfig) -> list[Observation]:
    """Cell increments from a round's outcomes.

    Draft token j (0-based) was offered if it was verified and every draft before it was
    accepted, i.e. j <= accepted_count; it was accepted if j < accepted_count. Tokens after
    the first rejection were never judged on their own and are not counted. Rounds without a
    usable chunk (no drafter, cache misses) teach nothing.
    """
    # Cells by flat index (row * num_buckets + bucket: sorts like (row, bucket)), with
    # CalibrationConfig.row_of and bucket_of inlined: this runs for every offered draft of every
    # session each round, and at 64 sessions the two method calls per draft were most of it.
    num_buckets, last_row = config.num_buckets, config.max_positions - 1
    top_bucket = num_buckets - 1
    cells: dict[int, list[float]] = {}
    for outcome in outcomes:
        chunk, item, result = outcome.chunk, outcome.item, outcome.result
        if chunk is None or chunk.cache_miss or result.cache_miss:
            continue
        num_verified = len(item.draft_tokens)
        accepted = max(0, min(result.accepted_count, num_verified))
        confidences = chunk.confidences
        num_offered = min(num_verified, accepted + 1, len(confidences))
        for j in range(num_offered):
            confidence = confidences[j]
            if not confidence > 0.0:  # also catches NaN
                bucket = 0
            else:
                bucket = int(confidence * num_buckets)
                if bucket > top_bucket:
                    bucket = top_bucket
            index = (j if j < last_row else last_row) * num_buckets + bucket
            cell = cells.get(index)
            if cell is None:
                cell = cells[index] = [0.0, 0.0]
            cell[0] += 1.0
            if j < accepted:
                cell[1] += 1.0
    return [Observation(index // num_buckets, index % num_buckets, offered, accepted)
            for index, (offered, accepted) in sorted(cells.items())]


def decay_factor(elapsed_s: float, half_life_s: float) -> float:
    return 1.0 if elapsed_s <= 0 else math.pow(0.5, elapsed_s / half_life_s)


@dataclass(frozen=True)
class AcceptanceGrid:
    """`CalibrationTable.acceptance` frozen for one round: ĉ = base[cell] + scale[cell] * c.

    The budget policy asks for ĉ once per draft of every session each round (320 times at 64
    sessions x 5 drafts); the posterior mean (accepted + w c) / (offered + w) splits into two
    per-cell constants, computed once."""

    num_buckets: int
    last_row: int
    base: tuple[float, ...]  # min(accepted, offered) / (offered + w)
    scale: tuple[float, ...]  # w / (offered + w)

    def acceptance(self, position: int, confidence: float) -> float:
        if not confidence > 0.0:  # also NaN: the first bucket, prior mean 0
            index = min(max(position, 0), self.last_row) * self.num_buckets
            return self.base[index]
        bucket = min(int(confidence * self.num_buckets), self.num_buckets - 1)
        index = min(max(position, 0), self.last_row) * self.num_buckets + bucket
        return self.base[index] + self.scale[index] * min(confidence, 1.0)


class CalibrationTable:
    """Decayed offered/accepted counts per (position row, confidence bucket).

    `as_of` is the time (any monotonic clock, seconds) the counts are valid at; every mutation
    first decays the counts to the mutation's time, so counts from different moments add up
    correctly.
    """

    def __init__(self, config: CalibrationConfig, as_of: float = 0.0) -> None:
        self.config = config
        self.as_of = as_of
        size = config.max_positions * config.num_buckets
        self.offered = [0.0] * size  # [max_positions * num_buckets], row-major by position
        self.accepted = [0.0] * size

    # ---- mutation ----------------------------------------------------------------------------
    def copy(self) -> "CalibrationTable":
        other = CalibrationTable(self.config, self.as_of)
        other.offered = list(self.offered)
        other.accepted = list(self.accepted)
        return other

    def decay_to(self, now: float) -> "CalibrationTable":
        if now > self.as_of:
            factor = decay_factor(now - self.as_of, self.config.half_life_s)
            if factor < 1.0:
                self.offered = [v * factor for v in self.offered]
                self.accepted = [v * factor for v in self.accepted]
            self.as_of = now
        return self

    def add(self, observations: Iterable[Observation], now: float) -> "CalibrationTable":
        self.decay_to(now)
        for obs in observations:
            index = self._index(obs.position, obs.bucket)
            self.offered[index] += obs.offered
            self.accepted[index] += obs.accepted
        return self

    def merge(self, other: "CalibrationTable", now: float) -> "CalibrationTable":
        """Add another table's counts (decayed to `now`) into this one."""
        if other.config.geometry != self.config.geometry:
            raise ValueError(f"cannot merge tables of layout {other.config.geometry} into {self.config.geometry}")
        self.decay_to(now)
        factor = decay_factor(now - other.as_of, self.config.half_life_s)
        for i, (o, a) in enumerate(zip(other.offered, other.accepted)):
            self.offered[i] += o * factor
            self.accepted[i] += a * factor
        return self

    # ---- reading -----------------------------------------------------------------------------
    @property
    def total_offered(self) -> float:
        return sum(self.offered)

    def is_empty(self) -> bool:
        return not any(self.offered)

    def cell(self, position: int, bucket: int) -> tuple[float, float]:
        """(offered, accepted) of one cell."""
        index = self._index(position, bucket)
        return self.offered[index], self.accepted[index]

    def acceptance(self, position: int, confidence: float) -> float:
        """ĉ: posterior mean acceptance of a draft at `position` with this raw confidence."""
        offered, accepted = self.cell(position, self.config.bucket_of(confidence))
        prior_mean = min(max(confidence, 0.0), 1.0) if confidence == confidence else 0.0
        w = self.config.prior_weight
        return (min(accepted, offered) + w * prior_mean) / (offered + w)

    def grid(self, num_positions: int | None = None) -> AcceptanceGrid:
        """A snapshot of `acceptance` for one round's many lookups; with num_positions, of
        positions 0..num_positions-1 only (a round of 8 drafts reads 8 of the 16 rows, and the
        snapshot is taken every round): asking it about a later position is an IndexError."""
        w = self.config.prior_weight
        cells = len(self.offered)
        if num_positions is not None and num_positions < self.config.max_positions:
            cells = max(num_positions, 0) * self.config.num_buckets
        offered, accepted = self.offered[:cells], self.accepted[:cells]
        return AcceptanceGrid(self.config.num_buckets, self.config.max_positions - 1,
                              tuple(min(a, o) / (o + w) for o, a in zip(offered, accepted)),
                              tuple(w / (o + w) for o in offered))

    def position_acceptances(self, num_positions: int) -> list[float]:
        """ĉ marginalised over confidence for positions 0..num_positions-1.

        Each position's prior mean is the estimate of the position before it (the first uses
        `default_acceptance`): a position without data behaves like its predecessor.
        """
        k = self.config.num_buckets
        w = self.config.prior_weight
        out: list[float] = []
        prior_mean = self.config.default_acceptance
        for position in range(num_positions):
            row = self.config.row_of(position) * k
            offered = sum(self.offered[row:row + k])
            accepted = min(sum(self.accepted[row:row + k]), offered)
            estimate = (accepted + w * prior_mean) / (offered + w)
            out.append(estimate)
            prior_mean = estimate
        return out

    def position_acceptance(self, position: int) -> float:
        return self.position_acceptances(position + 1)[position]

    # ---- (de)serialisation: flat string fields, as stored in a Redis hash -------------------
    def to_fields(self) -> dict[str, float]:
        """Non-zero cells as {"o:pos:bucket": offered, "a:pos:bucket": accepted}."""
        fields: dict[str, float] = {}
        k = self.config.num_buckets
        for i, (o, a) in enumerate(zip(self.offered, self.accepted)):
            if o > 0:
                fields[f"o:{i // k}:{i % k}"] = o
            if a > 0:
                fields[f"a:{i // k}:{i % k}"] = a
        return fields

    @classmethod
    def from_fields(cls, config: CalibrationConfig, fields: Mapping[str, float], as_of: float,
                    scale: float = 1.0) -> "CalibrationTable":
        """Inverse of to_fields; unknown or malformed fields are ignored, counts times `scale`."""
        table = cls(config, as_of)
        for name, value in fields.items():
            parts = name.split(":")
            if len(parts) != 3 or parts[0] not in ("o", "a"):
                continue
            try:
                position, bucket, count = int(parts[1]), int(parts[2]), float(value) * scale
            except ValueError:
                continue
            if not (0 <= position < config.max_positions and 0 <= bucket < config.num_buckets):
                continue
            if not (count >= 0 and math.isfinite(count)):
                continue
            target = table.offered if parts[0] == "o" else table.accepted
            target[position * config.num_buckets + bucket] = count
        return table

    def _index(self, position: int, bucket: int) -> int:
        if not 0 <= bucket < self.config.num_buckets:
            raise ValueError(f"bucket {bucket} outside [0, {self.config.num_buckets})")
        return self.config.row_of(position) * self.config.num_buckets + bucket


def survival_curve(acceptances: Sequence[float]) -> list[float]:
    """Cumulative products: the probability that drafts 0..j all survive."""
    out: list[float] = []
    running = 1.0
    for value in acceptances:
        running *= value
        out.append(running)
    return out
