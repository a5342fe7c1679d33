"""Confidence-scheduled, load-aware draft and verify budgets (DSpark Algorithm 1, made lossless).

For the sessions batched to one verifier in a round, choose verify lengths l_r maximising
expected committed tokens per second:

    tau = sum_r (1 + sum_{j<=l_r} a_{r,j})      B = sum_r (prefill_r + l_r)
    objective = tau * SPS(B) = tau / round_seconds(B)

Greedy: candidates (r, j) ranked by estimated survival, added while the objective improves;
the first candidate that does not improve it ends the round's selection (the early stop).

Losslessness (DESIGN.md "Exactness", DSpark appendix A): whether draft j of session r is
verified may depend on the drafts before it but never on draft j itself. So the survival used
to rank and admit (r, j) is

    a'_{r,j} = prod_{i<j} c^(r, i) * c^_pos(j)

the calibrated confidences of the earlier drafts times the position's acceptance marginalised
over confidence (learned from earlier rounds), made non-increasing in j. Every candidate
ranked before (r, j) is then either another session's or (r, i<j), so the whole path to the
decision about (r, j) never reads conf_{r,j}; inclusion is prefix-closed by construction. The
price: the first draft of a round is judged by its position alone.

Before drafting, `draft_lengths` runs the same optimisation with position-wise acceptance only
(nothing drafted yet, so any rule is allowed: it takes the global optimum over a common
length) and adds the measured cost of drafting, which is on the round's critical path. Light
load or a flat cost curve gives long drafts; heavy load or a steep curve gives short ones,
down to 0 (plain decoding), so speculation does not make the system slower.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from scheduler.calibration import (
    AcceptanceGrid,
    CalibrationConfig,
    CalibrationTable,
    observations_from,
    survival_curve,
)
from scheduler.calibration_store import CalibrationStore
from scheduler.cost_model import CostProfile, CostProfileSource, StaticCostProfiles
from scheduler.draft_policy import RoundOutcome
from scheduler.round_timing import LinearFit, LoadBucketedFit
from scheduler.session import Session
from specmesh.records import DraftChunk

log = logging.getLogger(__name__)

# Assumed forward time when neither a profile nor measurements exist: only ratios matter, and a
# flat curve (drafts look cheap) lets the first rounds measure what they really cost.
_UNKNOWN_FORWARD_SECONDS = 0.05


def model_pair_id(verifier_model: str, drafter_model: str) -> str:
    """The calibration key of a verifier/drafter pair (acceptance depends on both)."""
    return f"{verifier_model}->{drafter_model}"


@dataclass(frozen=True)
class BudgetConfig:
    max_draft_ahead_chunks: int = 2
    # A chunk drafted ahead is useful only if the whole previous chunk and the bonus token
    # survive; recommend drafting ahead only while that is at least this likely.
    draft_ahead_min_probability: float = 0.5
    measure_timing: bool = True  # learn draft cost and RPC overhead from the rounds themselves
    timing_half_life_s: float = 30.0
    # Exploration: a policy that only exploits never learns that a drafter pays (a cold table
    # and prefill-heavy first rounds make drafting look bad). Until the table has this many
    # offered tokens, and then one round in explore_every_rounds, every session drafts and
    # verifies at least explore_draft_tokens. Decided before drafting, so it stays lossless.
    explore_min_offered: float = 32.0
    explore_every_rounds: int = 50
    explore_draft_tokens: int = 2
    # A periodic re-check drafts for this many sessions of the round only (rotating): a drafter
    # that stopped being used holds no state, so exploring a whole saturated batch meant
    # re-prefilling every session at the drafter (GPU bench, 64 sessions: a 30 ms round every
    # 50 rounds). A cold table still explores with every session, to learn fast.
    explore_sessions: int = 4
    # Each re-check that still finds drafting not worth it doubles the wait before the next one,
    # up to this many rounds; choosing to draft again resets it. A re-check costs a cold prefill
    # at the drafter (~50 ms on the GPU bench), which every 50 rounds of a 12 ms round was -8%.
    explore_max_interval: int = 1600
    # Draft only when the plan expects at least this speedup over plain decoding. The cost
    # model is measured and noisy; a marginal predicted gain was a loss in practice (GPU bench:
    # acceptance 0.6 at 64 sessions, a predicted +3.5% measured 0.92x aggregate).
    min_speedup: float = 1.05
    # One planned round in this many drafts one token more than the plan. The cost fits need
    # rounds of different lengths to tell a step's marginal cost from the round's fixed cost (a
    # policy that always drafts the same length never shows them the difference: on the GPU
    # bench the fixed part was priced as free per-token work and drafts ran 5-6 tokens where 4
    # was faster), and the calibration needs the position after the plan's last one offered now
    # and then (an unlucky early estimate of that position, never offered again, held an 80%
    # drafter at 2 tokens in simulation). Decided before drafting: lossless. 0: never.
    dither_every_rounds: int = 4
    # Draft cost is learned only from rounds whose drafting sessions hand the drafter at most this
    # many tokens it has not seen (Session.drafter_unseen: a steady round hands it 1, the token
    # after its drafts); see draft_lengths.
    max_timed_catch_up: int = 2
    # Repeating a steady decision: once the plan has drafted the same length (before dither) and
    # verification has admitted every drafted token for steady_rounds planned rounds in a row,
    # the next repeat_rounds rounds of the same sessions repeat that decision without deriving
    # it again (no dither, verification admits everything), then one round is planned again.
    # The derivation is the policy's own Python on the round's critical path (GPU bench, 64
    # sessions: 2.0 ms a round, where the plan drafted 4 and admitted every draft in all of
    # ~150 rounds; 0.4 ms a round of drafting nothing at saturation). Exploration is checked
    # every round as before, and explores end a repeat. Decided before drafting: lossless.
    # 0: never repeat.
    steady_rounds: int = 8
    repeat_rounds: int = 24


@dataclass(frozen=True)
class BatchPlan:
    """The last decision, for telemetry (round span attributes)."""

    lengths: dict[str, int]
    expected_tokens: float  # tau under the admission estimates
    batch_tokens: int  # B
    round_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.expected_tokens / self.round_seconds if self.round_seconds > 0 else 0.0


# ---------------------------------------------------------------------------- pure math


def admission_survivals(confidences: Sequence[float], num_drafts: int, table: CalibrationTable | AcceptanceGrid,
                        position_acceptances: Sequence[float]) -> list[float]:
    """a'_j for drafts j = 0..num_drafts-1: the survival estimate that decides whether draft j
    is verified. Reads confidences[:j] only (never draft j's own), non-increasing in j."""
    if isinstance(table, AcceptanceGrid):
        return _grid_admission_survivals(confidences, num_drafts, table, position_acceptances)
    out: list[float] = []
    prefix = 1.0  # prod_{i<j} c^(i, conf_i)
    previous = 1.0
    for j in range(num_drafts):
        value = min(previous, prefix * position_acceptances[j])
        out.append(value)
        previous = value
        # Only now may draft j's confidence enter: it feeds the estimates of drafts after j.
        prefix *= table.acceptance(j, confidences[j]) if j < len(confidences) else position_acceptances[j]
    return out


def _grid_admission_survivals(confidences: Sequence[float], num_drafts: int, grid: AcceptanceGrid,
                              position_acceptances: Sequence[float]) -> list[float]:
    """`admission_survivals` with `AcceptanceGrid.acceptance` inlined, the same arithmetic in
    the same order (so the same bits): the policy runs it for every draft of every session
    each round, and at 64 sessions two method calls per draft were a third of verify_lengths."""
    base, scale, num_buckets, last_row = grid.base, grid.scale, grid.num_buckets, grid.last_row
    top_bucket = num_buckets - 1
    num_known = len(confidences)
    out: list[float] = []
    prefix = 1.0
    previous = 1.0
    for j in range(num_drafts):
        value = prefix * position_acceptances[j]
        if not value < previous:  # min(previous, value), which keeps `previous` on a tie
            value = previous
        out.append(value)
        previous = value
        if j < num_known:
            confidence = confidences[j]
            row = (j if j < last_row else last_row) * num_buckets
            if not confidence > 0.0:  # also NaN: the first bucket, prior mean 0
                prefix *= base[row]
            else:
                bucket = int(confidence * num_buckets)
                index = row + (bucket if bucket < top_bucket else top_bucket)
                prefix *= base[index] + scale[index] * (confidence if confidence < 1.0 else 1.0)
        else:
            prefix *= position_acceptances[j]
    return out


def batch_objective(survivals: Sequence[Sequence[float]], lengths: Sequence[int], base_tokens: int,
                    round_seconds: Callable[[int], float]) -> float:
    """tau * SPS(B) (expected committed tokens per second) of given verify lengths."""
    tau = sum(1.0 + sum(s[:length]) for s, length in zip(survivals, lengths))
    return tau / round_seconds(base_tokens + sum(lengths))


def choose_verify_lengths(survivals: Sequence[Sequence[float]], base_tokens: int,
                          round_seconds: Callable[[int], float]) -> tuple[list[int], float]:
    """Greedy with early stop over candidates ranked by survival (ties: earlier position,
    then earlier session). survivals[r] must be non-increasing. Returns (lengths, objective).

    The decision about candidate (r, j) depends only on candidates ranked before it, which is
    what makes it lossless given `admission_survivals`. Taking the top k candidates maximises
    tau for every B; with a convex non-decreasing cost curve the gain of one more candidate
    only shrinks along the ranking, so the early stop is the best prefix overall (and beats
    every fixed length). On a non-convex measured curve it may stop at a local optimum: looking
    past it would let later drafts' estimates, i.e. earlier drafts' own confidences, decide.
    """
    lengths = [0] * len(survivals)
    tau = float(len(survivals))
    batch_tokens = base_tokens
    best = tau / round_seconds(batch_tokens)
    # The ranking is sorted((-a, j, r)) over every candidate. Each curve is non-increasing, so
    # each session's candidates already come in that order, and merging the sessions' heads
    # through a heap yields the same sequence while computing only the part the early stop
    # reaches (a busy round admits a few of its hundreds of candidates).
    heap = [(-curve[0], 0, r) for r, curve in enumerate(survivals) if len(curve)]
    heapq.heapify(heap)
    heapreplace, heappop = heapq.heapreplace, heapq.heappop
    while heap:
        negative_survival, j, r = heap[0]
        value = (tau - negative_survival) / round_seconds(batch_tokens + 1)
        if not value > best:
            break  # the early stop: nothing ranked later is admitted
        tau -= negative_survival
        batch_tokens += 1
        best = value
        j += 1
        lengths[r] = j
        curve = survivals[r]
        if j < len(curve):
            heapreplace(heap, (-curve[j], j, r))  # the session's next candidate
        else:
            heappop(heap)
    return lengths, best


def choose_draft_length(caps: Sequence[int], survival: Sequence[float], base_tokens: int,
                        round_seconds: Callable[[int, int], float], min_speedup: float = 1.0) -> tuple[int, float]:
    """The common draft length k (each session drafts min(k, cap_r)) maximising expected
    tokens per second; round_seconds(B, k) includes drafting k steps. A k > 0 must beat plain
    decoding by min_speedup. Returns (k, objective)."""
    num_sessions = len(caps)
    plain = num_sessions / round_seconds(base_tokens, 0)
    best_k, best = 0, plain * min_speedup
    cumulative = [0.0]
    for value in survival:
        cumulative.append(cumulative[-1] + value)
    shortest = min(caps, default=0)
    for k in range(1, max(caps, default=0) + 1):
        if k <= shortest:
            # Every session drafts k: the same terms summed in the same order, without a pass
            # over the sessions per term (64 sessions x 8 lengths a round).
            tau = num_sessions + sum([cumulative[k]] * num_sessions)
            value = tau / round_seconds(base_tokens + k * num_sessions, k)
        else:
            lengths = [min(k, cap) for cap in caps]
            tau = num_sessions + sum(cumulative[length] for length in lengths)
            value = tau / round_seconds(base_tokens + sum(lengths), max(lengths))
        if value > best:
            best_k, best = k, value
    return best_k, best if best_k else plain


# ---------------------------------------------------------------------------- the policy


class AdaptiveBudgetPolicy:
    """DraftLengthPolicy that sizes drafts and verification from calibration and load.

    calibration: shared calibration store (in-memory or Redis).
    cost_profiles: where the verifier's cost curve comes from (a registry keyed by endpoint,
        a fixed CostProfile, or None to learn it from measured rounds).
    model_pair: calibration key (see `model_pair_id`).
    verifier: the endpoint whose batches this instance plans; use `for_verifier` to get one
        instance per speculation loop (they share calibration, keep their own timing).
    """

    def __init__(self, calibration: CalibrationStore, cost_profiles: CostProfileSource | CostProfile | None,
                 model_pair: str, max_draft_tokens: int = 8, *, verifier: str | None = None,
                 config: BudgetConfig | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_draft_tokens < 0:
            raise ValueError(f"max_draft_tokens must be >= 0, got {max_draft_tokens}")
        if cost_profiles is None or isinstance(cost_profiles, CostProfile):
            cost_profiles = StaticCostProfiles(cost_profiles)
        self.calibration = calibration
        self.cost_profiles = cost_profiles
        self.model_pair = model_pair
        self.max_draft_tokens = max_draft_tokens
        self.verifier = verifier
        self.config = config or BudgetConfig()
        self.clock = clock
        half_life = self.config.timing_half_life_s
        # Each fit is kept per load (sessions in the round): a step's cost depends on it.
        self.draft_cost = LoadBucketedFit(half_life)  # seconds of drafting vs draft steps
        self.verify_cost = LoadBucketedFit(half_life)  # seconds of a verify round vs B (no profile)
        # Round seconds beyond the profile's forward time, as a function of B: the start-up profile
        # times a bare forward, while a round's marginal verified token also costs per-token work
        # in both services (on the H200 at 64 sessions ~85 us a token against the profile's 24).
        # Without spread in B (every round the same shape) it is a constant: a per-token slope is
        # believed only once rounds of different B (other draft lengths, exploration) show it.
        self.verify_overhead = LoadBucketedFit(half_life, without_spread="intercept")
        # The same for rounds that verify no drafts. Kept apart because verifying drafts at all
        # costs a step (H200, one session: 2.3 ms beyond the profile without drafts, 4.1-4.5 ms
        # with 2-4), which one line through both fitted as 1.5 ms a verified token: a 60%
        # drafter then never drafted, where drafting 3 would have paid ~1.2x.
        self.plain_overhead = LoadBucketedFit(half_life, without_spread="intercept")
        self.last_plan: BatchPlan | None = None
        self._forward_profile: CostProfile | None = None  # see _forward_seconds_memo
        self._forward_memo: dict[int, float] = {}
        # Timing marks of rounds in progress, keyed by the round's session ids.
        # (start, steps, sessions drafting, whether the draft-cost fit learns from it)
        self._draft_marks: dict[frozenset[str], tuple[float, int, int, bool]] = {}
        self._verify_marks: dict[frozenset[str], tuple[float, int, bool]] = {}  # start, B, drafts verified
        self._warned = False
        # Exploration state (see BudgetConfig): rounds planned, rounds since the last re-check,
        # the current wait between re-checks, re-checks so far, and whether this round or the
        # one planned before explored.
        self._rounds_planned = 0
        self._rounds_since_explored = 0
        self._explore_interval = self.config.explore_every_rounds
        self._explorations = 0
        self._exploring = False
        self._explored_last_round = False
        self._drafting = False  # whether the last plan (not an exploration) drafted
        # Repeating a steady decision (BudgetConfig.steady_rounds): the length planned, for how
        # many planned rounds in a row (each verifying every drafted token), and the repeats left
        # for the round key they were granted to.
        self._steady_length = -1
        self._steady_count = 0
        self._repeats_left = 0
        self._repeat_key: frozenset[str] | None = None
        # The round key of the round being repeated (pipeline lanes interleave two rounds'
        # calls; each verify_lengths must know whether its own round repeats).
        self._repeated_round: frozenset[str] | None = None
        self.num_repeated_rounds = 0  # rounds that repeated a steady decision (stats, tests)

    def for_verifier(self, verifier: str) -> "AdaptiveBudgetPolicy":
        """A policy for one verifier's loop: same calibration and profiles, own cost curve."""
        return AdaptiveBudgetPolicy(self.calibration, self.cost_profiles, self.model_pair, self.max_draft_tokens,
                                    verifier=verifier, config=self.config, clock=self.clock)

    # ---- costs -------------------------------------------------------------------------------
    def verify_seconds_fn(self, sessions: int, base_tokens: int | None,
                          plus_seconds: float = 0.0) -> Callable[[int], float]:
        """Seconds of one verify round of `sessions` sessions as a function of B (profile +
        measured overhead; B = base_tokens is a round without drafts, and None prices every B as
        a round with drafts), with the profile and measurements looked up once (the greedy calls
        it per candidate). plus_seconds: a constant added in front (`plus_seconds + seconds(B)`,
        the same sum a wrapper would form) without the wrapper's extra call per candidate."""
        profile = self.cost_profiles.profile(self.verifier)
        if profile is not None:
            now = self.clock()
            drafting = self.verify_overhead.coefficients(sessions, now)
            plain = self.plain_overhead.coefficients(sessions, now)
            # Either borrows the other's until it has rounds of its own (a drafter never tried
            # is priced like plain decoding, so it gets tried).
            drafting, plain = drafting or plain or (0.0, 0.0), plain or drafting or (0.0, 0.0)
            forward = self._forward_seconds_memo(profile)
            plain_below = base_tokens if base_tokens is not None else -math.inf  # B <= this: a plain round

            def seconds(batch_tokens: int) -> float:
                intercept, slope = plain if batch_tokens <= plain_below else drafting
                forward_seconds = forward.get(batch_tokens)
                if forward_seconds is None:
                    forward_seconds = forward[batch_tokens] = profile.forward_seconds(batch_tokens)
                return plus_seconds + (forward_seconds + intercept + slope * batch_tokens)
            return seconds
        coefficients = self.verify_cost.coefficients(sessions, self.clock())
        if coefficients is None or coefficients[0] + coefficients[1] <= 0:
            return lambda batch_tokens: plus_seconds + _UNKNOWN_FORWARD_SECONDS
        intercept, slope = coefficients
        return lambda batch_tokens: plus_seconds + max(intercept + slope * batch_tokens, 1e-6)

    def _forward_seconds_memo(self, profile: CostProfile) -> dict[int, float]:
        """profile.forward_seconds by batch size, remembered while the profile stays the same
        object: a busy round's greedy asks for a few hundred sizes, each a walk along the
        profile's points, and the next round asks for the same ones again."""
        if self._forward_profile is not profile or len(self._forward_memo) > 4096:
            self._forward_profile, self._forward_memo = profile, {}
        return self._forward_memo

    def draft_seconds_fn(self, sessions: int) -> Callable[[int], float]:
        """Seconds of drafting `steps` tokens for `sessions` sessions on the round's critical
        path (measured)."""
        coefficients = self.draft_cost.coefficients(sessions, self.clock()) if self.config.measure_timing else None
        if coefficients is None:
            return lambda steps: 0.0
        intercept, slope = coefficients
        return lambda steps: intercept + slope * steps if steps > 0 else 0.0

    def cost_fits(self) -> dict[str, dict[int, dict[str, float]]]:
        """What the policy believes rounds cost, per load bucket (sessions 2^b to 2^(b+1) - 1):
        the draft-cost fit (seconds = intercept + slope * steps) and the verify fit beyond the
        profile (seconds = intercept + slope * batch tokens), with each fit's decayed weight.
        For diagnosis (benchmarks, debugging a plan), not for the plan itself."""
        now = self.clock()
        out: dict[str, dict[int, dict[str, float]]] = {}
        for name, fits in (("draft", self.draft_cost), ("verify_overhead", self.verify_overhead),
                           ("plain_overhead", self.plain_overhead), ("verify", self.verify_cost)):
            for bucket, fit in sorted(fits.fits.items()):
                coefficients = fit.coefficients(now)
                if coefficients is not None:
                    out.setdefault(name, {})[bucket] = {"intercept_ms": round(1e3 * coefficients[0], 3),
                                                        "slope_ms": round(1e3 * coefficients[1], 4),
                                                        "weight": round(fit.weight, 1)}
        return out

    # ---- DraftLengthPolicy -------------------------------------------------------------------
    def draft_lengths(self, sessions: Sequence[Session], context_limit: int) -> dict[str, int]:
        caps = [min(s.draft_limit(context_limit), self.max_draft_tokens) for s in sessions]
        try:
            lengths = self._plan_drafts(sessions, caps)
        except Exception:  # noqa: BLE001 - a policy bug must not fail the round
            self._warn_once("draft_lengths")
            lengths = {s.session_id: cap for s, cap in zip(sessions, caps)}
        if self.config.measure_timing:
            # Timed only when the drafter has nothing to catch up on: a session that did not
            # draft for a while (drafting was off, or an exploration picked it) makes the call
            # re-feed its history first, an eager forward several times a draft step (GPU bench:
            # 33 ms against ~4 ms), and a fit of a few lengths apart is ruled by such outliers.
            # A brand-new session does not count: the loop prefills it beside the verifier.
            # Timed only when most drafting sessions draft the round's full length: the fit prices
            # a common length k, and a round whose sessions mostly stop short (near their token
            # limit, the end of a wave) takes k steps of a smaller batch (GPU bench, 64 sessions:
            # 8 steps in 12 ms against 4 steps in 17), which flattened the fitted step cost.
            longest = max(lengths.values(), default=0)
            drafting = full = 0
            catch_up: int | None = None  # the most any drafting session must catch up on
            for s in sessions:
                k = lengths.get(s.session_id, 0)
                if k > 0 and not s.drafter_cold:
                    drafting += 1
                    unseen = s.drafter_unseen
                    if catch_up is None or unseen > catch_up:
                        catch_up = unseen
                    if k == longest:
                        full += 1
            # Keyed by the sessions that draft in the call: what a step costs depends on them.
            self._draft_marks[self._round_key(sessions)] = (self.clock(), longest, drafting,
                                                            (catch_up or 0) <= self.config.max_timed_catch_up
                                                            and 4 * full >= 3 * drafting)
            self._trim(self._draft_marks)
        return lengths

    def verify_lengths(self, sessions: Sequence[Session], chunks: dict[str, DraftChunk],
                       draft_lengths: dict[str, int]) -> dict[str, int]:
        entered = self.clock()
        key = self._round_key(sessions)
        mark = self._draft_marks.pop(key, None)
        # The round's drafting is spent by now, but it is part of the round all the same: what
        # verification maximises is committed tokens per second of the whole round.
        drafted_seconds = entered - mark[0] if mark is not None else 0.0
        # No chunks at all: the drafter failed (or only prefilled new sessions beside the verifier).
        if mark is not None and mark[1] > 0 and mark[2] > 0 and mark[3] and chunks:
            self.draft_cost.add(mark[2], mark[1], drafted_seconds, entered)
        available = []
        for s in sessions:
            chunk = chunks.get(s.session_id)
            usable = 0 if chunk is None or chunk.cache_miss else len(chunk.tokens)
            if usable:  # (a round that drafted nothing skips the limit: min(0, ...) is 0)
                usable = min(usable, draft_lengths.get(s.session_id, 0), s.draft_limit(1 << 62))
            available.append(usable)
        base_tokens = self._base_tokens(sessions)
        if self._repeated_round == key:
            self._repeated_round = None
            # A repeated decision admits every drafted token, as its planned rounds all did.
            lengths = {s.session_id: n for s, n in zip(sessions, available)}
            if self.last_plan is not None:
                self.last_plan = replace(self.last_plan, lengths=dict(lengths))
        else:
            try:
                lengths = self._plan_verification(sessions, chunks, available, base_tokens, drafted_seconds)
            except Exception:  # noqa: BLE001 - fall back to a rule that ignores the drafted tokens
                self._warn_once("verify_lengths")
                lengths = {s.session_id: n for s, n in zip(sessions, available)}
            if sum(lengths.values()) < sum(available):
                # Verification trimmed drafts: this plan is not one to repeat unexamined.
                self._steady_count = 0
                self._repeats_left = 0
        # Timed only when every session feeds one committed token: the plan is for decode
        # rounds, and a round that also prefills (new sessions, re-prefills) costs what prompts
        # cost, which would bend the fit of B against seconds.
        if self.config.measure_timing and base_tokens == len(sessions):
            # From before this planning: the policy's own work grows with sessions x drafts too
            # (GPU bench, 64 sessions: ~2 ms a round of ranking candidates and counting outcomes
            # at 5 drafts, 0.3 ms for a fixed length), and a fit that does not see it prices
            # long drafts too cheaply.
            self._verify_marks[key] = (entered, base_tokens + sum(lengths.values()), any(lengths.values()))
            self._trim(self._verify_marks)
        return lengths

    async def observe(self, outcomes: Sequence[RoundOutcome]) -> None:
        try:
            observations = observations_from(outcomes, self.calibration_config)
        except Exception:  # noqa: BLE001 - statistics must never fail a round
            observations = None
            self._warn_once("observe")
        # After counting the outcomes (the policy's own work, part of the round) and before the
        # calibration store's I/O (Redis: bounded, and an outage must not read as round cost).
        now = self.clock()
        mark = self._verify_marks.pop(frozenset(o.item.session_id for o in outcomes), None)
        if mark is not None:
            seconds, batch_tokens, sessions = now - mark[0], mark[1], len(outcomes)
            profile = self.cost_profiles.profile(self.verifier)
            if profile is not None:
                overhead = self.verify_overhead if mark[2] else self.plain_overhead
                overhead.add(sessions, batch_tokens, max(seconds - profile.forward_seconds(batch_tokens), 0.0), now)
            else:
                self.verify_cost.add(sessions, batch_tokens, seconds, now)
        if observations is None:
            return
        try:
            await self.calibration.record(self.model_pair, observations)
        except Exception:  # noqa: BLE001 - statistics must never fail a round
            self._warn_once("observe")

    # ---- draft ahead -------------------------------------------------------------------------
    def draft_ahead_chunks(self, sessions: Sequence[Session], draft_lengths: dict[str, int]) -> dict[str, int]:
        """How many further chunks each session's drafter should draft while this round is
        verified: worth it only while the chunk being verified (and the bonus token after it)
        will likely all be accepted, since a chunk drafted ahead continues from there."""
        table = self.calibration.table(self.model_pair)
        longest = max(draft_lengths.values(), default=0)
        survival = survival_curve(table.position_acceptances(longest + 1))
        out = {}
        for s in sessions:
            length = draft_lengths.get(s.session_id, 0)
            if length <= 0:
                out[s.session_id] = 0
                continue
            p_chunk = survival[length]  # drafts 0..length-1 accepted and the bonus token matches
            ahead = 0
            while (ahead < self.config.max_draft_ahead_chunks
                   and p_chunk ** (ahead + 1) >= self.config.draft_ahead_min_probability):
                ahead += 1
            out[s.session_id] = ahead
        return out

    # ---- internals ---------------------------------------------------------------------------
    @property
    def calibration_config(self) -> CalibrationConfig:
        return self.calibration.config

    def _should_explore(self, table) -> bool:
        self._rounds_planned += 1
        if self.config.explore_draft_tokens <= 0:
            return False
        if table.total_offered < self.config.explore_min_offered:
            return True
        every = self.config.explore_every_rounds
        if every <= 0:
            return False
        if self._drafting:
            # Drafting rounds keep the table current; a re-check is for a drafter turned off.
            # (Exploring while drafting put one round in 50 of a 64-session batch at 4 sessions
            # drafting 2 tokens, the rest none, and fed the draft-cost fit such cheap rounds.)
            self._rounds_since_explored = 0
            return False
        self._rounds_since_explored += 1
        if self._rounds_since_explored < self._explore_interval:
            return False
        self._rounds_since_explored = 0
        self._explorations += 1
        return True

    def _back_off_exploration(self, drafting: bool) -> None:
        """After a re-check: drafting chosen again resets the interval, else it doubles."""
        every = self.config.explore_every_rounds
        if drafting:
            self._explore_interval = every
        elif self._explored_last_round:
            self._explore_interval = min(2 * self._explore_interval,
                                         max(self.config.explore_max_interval, every))

    def _plan_drafts(self, sessions: Sequence[Session], caps: list[int]) -> dict[str, int]:
        self._exploring = False
        self._repeated_round = None
        longest = max(caps, default=0)
        if longest == 0:
            self._repeats_left = 0
            return {s.session_id: 0 for s in sessions}
        table = self.calibration.table(self.model_pair)
        if self._should_explore(table):
            self._repeats_left = 0
            self._steady_count = 0
            self._exploring = self._explored_last_round = True
            explore = self.config.explore_draft_tokens
            lengths = {s.session_id: min(explore, cap) for s, cap in zip(sessions, caps)}
            few = self.config.explore_sessions
            if table.total_offered >= self.config.explore_min_offered and 0 < few < len(sessions):
                start = (self._explorations * few) % len(sessions)
                chosen = {s.session_id for s in (sessions[start:] + sessions[:start])[:few]}
                lengths = {sid: (k if sid in chosen else 0) for sid, k in lengths.items()}
            return lengths
        if self._repeats_left > 0:
            if self._repeat_key == self._round_key(sessions) and self._base_tokens(sessions) == len(sessions):
                self._repeats_left -= 1
                self._repeated_round = self._repeat_key
                self.num_repeated_rounds += 1
                self._explored_last_round = False
                k = self._steady_length
                return {s.session_id: min(k, cap) for s, cap in zip(sessions, caps)}
            self._repeats_left = 0  # the sessions changed: plan afresh
            self._steady_count = 0
        survival = survival_curve(table.position_acceptances(longest))
        drafting = sum(1 for s, cap in zip(sessions, caps) if cap > 0 and not s.drafter_cold) or len(sessions)
        base_tokens = self._base_tokens(sessions)
        verify_seconds = self.verify_seconds_fn(len(sessions), base_tokens)
        draft_seconds = self.draft_seconds_fn(drafting)
        k, _ = choose_draft_length(caps, survival, base_tokens,
                                   lambda b, steps: verify_seconds(b) + draft_seconds(steps), self.config.min_speedup)
        self._back_off_exploration(k > 0)
        self._explored_last_round = False
        self._drafting = k > 0
        # Steady counting; verify_lengths resets the count when verification trims drafts.
        if k == self._steady_length and base_tokens == len(sessions):
            self._steady_count += 1
        else:
            self._steady_length, self._steady_count = k, 1 if base_tokens == len(sessions) else 0
        if self.config.steady_rounds > 0 and self._steady_count >= self.config.steady_rounds:
            # Granted now, used from the next round on (this one still dithers as planned).
            self._repeats_left = self.config.repeat_rounds
            self._repeat_key = self._round_key(sessions)
            self._steady_count = 0
        k = self._dithered(k, longest)
        return {s.session_id: min(k, cap) for s, cap in zip(sessions, caps)}

    def _dithered(self, k: int, longest: int) -> int:
        """k, or one token more (fewer when no session may draft more) in one planned round of
        dither_every_rounds."""
        every = self.config.dither_every_rounds
        if k <= 0 or every <= 0 or self._rounds_planned % every:
            return k
        if k < longest:
            return k + 1
        return k - 1 if k >= 2 else k

    def _plan_verification(self, sessions: Sequence[Session], chunks: dict[str, DraftChunk],
                           available: list[int], base_tokens: int, drafted_seconds: float = 0.0) -> dict[str, int]:
        """drafted_seconds: what this round's drafting took. Counting it keeps verification from
        throwing away drafts the round has already paid for where the verifier's curve has a
        step (on a 2-core CPU one token is a matrix-vector product and two are a matrix product:
        40 ms, then 60-70 ms for 2-8 tokens; the first draft alone looks like a loss)."""
        # The step that verifying any drafts at all costs was weighed when the round chose to
        # draft (positions only). Charged to the first candidate here, it stops the greedy
        # before a prefix that pays for it (GPU bench, 64 sessions: 8 drafts drafted, 1.2
        # verified), and looking past the first candidate would read drafts' own confidences.
        # drafted_seconds + verify seconds(B), as one function: the greedy calls it per candidate.
        seconds = self.verify_seconds_fn(len(sessions), None if any(available) else base_tokens, drafted_seconds)
        if not any(available):
            self.last_plan = BatchPlan({s.session_id: 0 for s in sessions}, float(len(sessions)), base_tokens,
                                       seconds(base_tokens))
            return dict(self.last_plan.lengths)
        table = self.calibration.table(self.model_pair)
        positions = table.position_acceptances(max(available))
        grid = table.grid(max(available))  # the rows this round reads
        survivals = []
        for s, n in zip(sessions, available):
            chunk = chunks.get(s.session_id)
            confidences = chunk.confidences if chunk is not None else ()
            survivals.append(admission_survivals(confidences, n, grid, positions))
        chosen, objective = choose_verify_lengths(survivals, base_tokens, seconds)
        if self._exploring:
            # An exploration round verifies what it drafted (decided before drafting: lossless).
            chosen = [max(c, n) for c, n in zip(chosen, available)]
        lengths = {s.session_id: n for s, n in zip(sessions, chosen)}
        tau = len(sessions) + sum(sum(curve[:n]) for curve, n in zip(survivals, chosen))
        self.last_plan = BatchPlan(lengths, tau, base_tokens + sum(chosen), tau / objective if objective else 0.0)
        return dict(lengths)

    @staticmethod
    def _base_tokens(sessions: Sequence[Session]) -> int:
        """Committed tokens the verifier still has to process (1 per session unless re-prefilling)."""
        return sum(max(1, len(s.tokens) - s.verifier_cached) for s in sessions)

    @staticmethod
    def _round_key(sessions: Sequence[Session]) -> frozenset[str]:
        return frozenset(s.session_id for s in sessions)

    @staticmethod
    def _trim(marks: dict) -> None:
        while len(marks) > 64:  # rounds that never completed (errors): forget the oldest
            marks.pop(next(iter(marks)))

    def _warn_once(self, where: str) -> None:
        if not self._warned:
            self._warned = True
            log.exception("adaptive budget policy failed in %s; using a fallback rule", where)
