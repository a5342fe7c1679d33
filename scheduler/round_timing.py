"""What rounds really cost, measured by the scheduler itself. Pure logic, no I/O.

The verifier's profile gives the shape of its forward cost; what a round costs end to end
also includes RPCs, serialisation and, above all, drafting (on the critical path unless drafted
ahead). `LinearFit` keeps an exponentially decayed least-squares fit y ~ intercept + slope * x
of such measurements (x = draft steps or batch tokens, y = seconds). With too little spread in
x it attributes everything to the slope (a conservative marginal cost), or, with
`without_spread="intercept"`, to the intercept (a constant: for a correction whose marginal
part must be seen, not assumed). Its weight decays with
time, so a fit that stopped receiving data (e.g. drafting switched off because it looked too
expensive) fades and the policy tries again. A point of the curve (one x) takes part only
while it holds a share of the recent weight, so a few outlying rounds from a bygone phase
(warm-up before CUDA graphs existed) are retired once newer rounds outnumber them. `LoadBucketedFit` keeps one fit per load (sessions
in the round), since what a step costs depends on how many sessions share it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field


@dataclass
class LinearFit:
    half_life_s: float = 30.0
    min_weight: float = 3.0  # below this (decayed) weight the fit does not speak
    without_spread: str = "slope"  # where y goes when x hardly varies: "slope" or "intercept"
    # A point of the curve (one x) speaks only while it holds at least this share of the fit's
    # decayed weight. Decay alone does not retire an old point: the slope is a ratio of sums that
    # all decay alike, so a few slow rounds at one x (on the GPU bench, warm-up rounds before the
    # CUDA graphs of their shape existed: 33 ms against 10) kept pricing every verified token at
    # 2.2 ms for good, the policy stopped drafting, and nothing ever came to outweigh them.
    min_point_share: float = 0.01
    max_outlier_ratio: float = 3.0  # see add
    # Forward decay: a measurement taken at time t is stored with weight 2^((t - origin) /
    # half-life), so adding stays O(1) however many points there are, and reading divides by the
    # same factor at the time of reading.
    origin: float | None = None
    as_of: float = 0.0  # the latest time the fit was given
    scaled_weight: float = 0.0
    points: dict[float, list[float]] = field(default_factory=dict)  # x -> [scaled weight, scaled sum of y]
    established: bool = False  # whether the weight ever reached min_weight (see LoadBucketedFit)

    def _scale(self, now: float) -> float:
        self.as_of = max(self.as_of, now)
        return math.pow(2.0, (self.as_of - self.origin) / self.half_life_s) if self.origin is not None else 1.0

    @property
    def weight(self) -> float:
        """The decayed weight as of the latest time the fit was given."""
        return self.scaled_weight / self._scale(self.as_of)

    def add(self, x: float, y: float, now: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)) or y < 0:
            return
        if self.origin is None:
            self.origin = self.as_of = now
        scale = self._scale(now)
        if scale > 2.0**40:  # keep the stored sums in range: move the origin to now
            for point in self.points.values():
                point[0] /= scale
                point[1] /= scale
            self.scaled_weight /= scale
            self.origin, scale = self.as_of, 1.0
        point = self.points.setdefault(float(x), [0.0, 0.0])
        if point[0] >= self.min_weight * scale:
            # One round far above its point's mean (a CUDA graph captured mid-load: 289 ms
            # against 17) counts as at most this many times the mean: it still moves the point
            # if costs really rose, without one capture outweighing dozens of rounds.
            y = min(y, self.max_outlier_ratio * point[1] / point[0])
        self.scaled_weight += scale
        point[0] += scale
        point[1] += scale * y
        if not self.established and self.scaled_weight >= self.min_weight * scale:
            self.established = True

    def coefficients(self, now: float, min_weight: float | None = None) -> tuple[float, float] | None:
        """(intercept, slope), both >= 0, or None without enough recent data (decayed weight
        below min_weight, by default the fit's own)."""
        scale = self._scale(now)
        if self.scaled_weight < (self.min_weight if min_weight is None else min_weight) * scale:
            return None
        # Points too faint to matter again are dropped (keeps reading cheap); only those that
        # hold their share speak. Sums stay scaled: every ratio below is unchanged by the scale.
        # One pass sorts the points into faint and speaking, and the sums run over columns with
        # map(): the verify fits hold a point per batch size seen (~100 at 64 sessions), and
        # this is read twice a round. Each sum is the same sum() over the same terms in the
        # same order as a generator over the points would give, so the bits are the same.
        faint = 1e-4 * scale
        threshold = self.min_point_share * self.scaled_weight
        dropped = []
        xs: list[float] = []
        ws: list[float] = []
        ys: list[float] = []
        for x, (w, sum_y) in self.points.items():
            if w < faint:
                dropped.append(x)
            elif w >= threshold:
                xs.append(x)
                ws.append(w)
                ys.append(sum_y)
        for x in dropped:
            del self.points[x]
        weight = sum(ws)
        if weight <= 0:
            return None
        weighted_x = list(map(operator.mul, ws, xs))  # w * x
        mean_x = sum(weighted_x) / weight
        mean_y = sum(ys) / weight
        mean_xx = sum(map(operator.mul, weighted_x, xs)) / weight  # (w * x) * x
        mean_xy = sum(map(operator.mul, xs, ys)) / weight
        var_x = mean_xx - mean_x * mean_x
        through_origin = (0.0, max(mean_xy / mean_xx, 0.0)) if mean_xx > 0 else (mean_y, 0.0)  # all marginal
        if len(xs) > 1 and var_x > 1e-6 * max(1.0, mean_x * mean_x):
            slope = (mean_xy - mean_x * mean_y) / var_x
            intercept = mean_y - slope * mean_x
            if slope >= 0:
                return (intercept, slope) if intercept >= 0 else through_origin
        # No spread, or a line that says cost falls with size: noise, or outliers at short
        # lengths. Read as a flat cost, that made the longest drafts look free (GPU bench, 64
        # sessions: two slow early rounds of 2 and 5 drafts, then 8 drafts a round where 3-4 pay).
        return (mean_y, 0.0) if self.without_spread == "intercept" else through_origin

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
    borrows the nearest load's (the heavier one on a tie: the costlier guess).

    A load whose own fit has faded below min_weight (after once reaching it: a young fit of
    one or two rounds does not speak early) keeps speaking from it while it holds
    own_faded_share of min_weight (four more half-lives at 1/16) before it borrows: a
    neighbour's live fit is the wrong load's cost. (GPU bench, 64 sessions at a 60% drafter:
    the 64-session fit, fed only by the rare rounds that drafted, faded between waves; each
    wave then borrowed the fit of the wave's own light tail, priced 4 draft steps at 9.5 ms
    against 19.8, drafted for four rounds to learn it again, and reset the exploration's
    back-off: 0.91-0.95x of speculation off where drafting nothing is 1.0x.)"""

    half_life_s: float = 30.0
    min_weight: float = 3.0
    without_spread: str = "slope"
    own_faded_share: float = 1.0 / 16.0

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
        own = self.fits.get(bucket)
        if own is not None:
            # Established (not merely young): it speaks down to the faded share of its min_weight.
            coefficients = own.coefficients(now, own.min_weight * self.own_faded_share if own.established else None)
            if coefficients is not None:
                return coefficients
        for other in sorted(self.fits, key=lambda b: (abs(b - bucket), -b)):
            if other == bucket:
                continue
            coefficients = self.fits[other].coefficients(now)
            if coefficients is not None:
                return coefficients
        return None
