"""What rounds really cost, measured by the scheduler itself. Pure logic, no I/O.

The verifier's profile gives the shape of its forward cost; what a round costs end to end
also includes RPCs, serialisation and, above all, drafting (on the critical path unless drafted
ahead). `LinearFit` keeps an exponentially decayed least-squares fit y ~ intercept + slope * x
of such measurements (x = draft steps or batch tokens, y = seconds). With too little spread in
x it attributes everything to the slope (a conservative marginal cost), or, with
`without_spread="intercept"`, to the intercept (a constant: for a correction whose marginal
part must be seen, not assumed). Its weight decays with
time, so a fit that stopped receiving data (e.g. drafting switched off because it looked too
expensive) fades and the policy tries again. `LoadBucketedFit` keeps one fit per load (sessions
in the round), since what a step costs depends on how many sessions share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LinearFit:
    half_life_s: float = 30.0
    min_weight: float = 3.0  # below this (decayed) weight the fit does not speak
    without_spread: str = "slope"  # where y goes when x hardly varies: "slope" or "intercept"
    as_of: float = 0.0
    weight: float = 0.0
    sum_x: float = 0.0
    sum_y: float = 0.0
    sum_xx: float = 0.0
    sum_xy: float = 0.0

    def _decay_to(self, now: float) -> None:
        if now > self.as_of:
            factor = math.pow(0.5, (now - self.as_of) / self.half_life_s)
            self.weight *= factor
            self.sum_x *= factor
            self.sum_y *= factor
            self.sum_xx *= factor
            self.sum_xy *= factor
            self.as_of = now

    def add(self, x: float, y: float, now: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)) or y < 0:
            return
        self._decay_to(now)
        self.weight += 1.0
        self.sum_x += x
        self.sum_y += y
        self.sum_xx += x * x
        self.sum_xy += x * y

    def coefficients(self, now: float) -> tuple[float, float] | None:
        """(intercept, slope), both >= 0, or None without enough recent data."""
        self._decay_to(now)
        if self.weight < self.min_weight:
            return None
        mean_x = self.sum_x / self.weight
        mean_y = self.sum_y / self.weight
        var_x = self.sum_xx / self.weight - mean_x * mean_x
        spread = var_x > 1e-6 * max(1.0, mean_x * mean_x)
        if spread:
            slope = (self.sum_xy / self.weight - mean_x * mean_y) / var_x
            intercept = mean_y - slope * mean_x
            if slope >= 0 and intercept >= 0:
                return intercept, slope
            if slope < 0:  # noise: cost does not fall with size
                return mean_y, 0.0
        elif self.without_spread == "intercept":
            return mean_y, 0.0
        # Through the origin: all cost is marginal.
        if self.sum_xx <= 0:
            return mean_y, 0.0
        return 0.0, max(self.sum_xy / self.sum_xx, 0.0)

    def predict(self, x: float, now: float) -> float | None:
        coefficients = self.coefficients(now)
        if coefficients is None:
            return None
        intercept, slope = coefficients
        return intercept + slope * x


def load_bucket(sessions: int) -> int:
    """Rounds of 1, 2-3, 4-7, 8-15, ... sessions: buckets 0, 1, 2, 3, ..."""
    return max(int(sessions), 1).bit_length() - 1


@dataclass
class LoadBucketedFit:
    """One `LinearFit` per load (sessions in the round, in powers of two).

    What a draft step or a verified token costs depends on how many sessions share the round
    (GPU bench, 8B verifier: a draft step 1.4 ms at 1 session, 2.9 ms at 64; the verifier's
    per-token work beyond a bare forward grows likewise). One fit pooled over every load is
    dominated by whichever load produced the most rounds (light load: many short rounds) and
    then prices a busy round's drafts at the light load's cost. A load without a fit of its own
    borrows the nearest load's (the heavier one on a tie: the costlier guess)."""

    half_life_s: float = 30.0
    min_weight: float = 3.0
    without_spread: str = "slope"

    def __post_init__(self) -> None:
        self.fits: dict[int, LinearFit] = {}

    def add(self, sessions: int, x: float, y: float, now: float) -> None:
        bucket = load_bucket(sessions)
        fit = self.fits.get(bucket)
        if fit is None:
            fit = self.fits[bucket] = LinearFit(self.half_life_s, self.min_weight, self.without_spread)
        fit.add(x, y, now)

    def coefficients(self, sessions: int, now: float) -> tuple[float, float] | None:
        """(intercept, slope) at this load, or at the nearest load that has a fit; None if none."""
        bucket = load_bucket(sessions)
        for other in sorted(self.fits, key=lambda b: (abs(b - bucket), -b)):
            coefficients = self.fits[other].coefficients(now)
            if coefficients is not None:
                return coefficients
        return None
