"""Judge every session of a verify batch at once: batched tensor ops and ONE device-to-host read.

The same decisions as verifier/speculative_sampling.py's per-session `verify_greedy_argmax` and
`verify_sampled` plus the logprobs of the committed tokens, bit for bit on CPU (checked against
them by tests/test_batch_judging.py), without per-session kernels or per-draft `.item()` reads;
on CUDA each `.item()` was a synchronisation with the device.

How the per-session loop becomes batched work:
- Sampled sessions are grouped by (temperature, top_k, top_p); each group's rows go through
  `target_probs` in one call (every step of it works row by row).
- Whether a draft is accepted does not depend on where the first rejection is, so it is decided
  for every draft row: u * q < p, with u * q computed on the host in Python floats exactly as
  the per-session code computes it (+inf where q <= 0: never accepted) and compared on the
  device in float64 (float32 p widens exactly).
- The token drawn after a row (from the residual max(0, p - q) of a draft row, or from p on the
  bonus row) is drawn for every row with the session's last uniform; the host then takes the
  one at the first rejection. That costs a cumulative sum over every row instead of one row per
  session, which is cheap next to the synchronisations it saves.
- Logprobs are gathered for both candidates of every row (its draft token and its drawn or
  argmax token); the host keeps those of the committed tokens.
What the device reads from the host goes over as one int64 and one float64 tensor (asynchronous
copies from pinned memory), and what the host needs (next-token candidates, accepted flags,
logprobs) comes back as one float64 tensor: token ids and float32 values are exact in float64.
Every device op costs host time too (10-40 us each on the H200 host), so the op count per call
is kept small and independent of the number of sessions; for the same reason a batch with a
single sampled session judges that one with the per-session code (its few reads cost less than
the batched path's ~40 small kernels).

On CUDA the scans (cumsum) pick their thread layout from the tensor's shape, so the last bit
of a cumulative probability may differ from the per-session kernels'; a drawn token can differ
only when its uniform falls within that rounding of a token boundary. The distribution is the
same either way.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from specmesh.distributions import target_probs
from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams
from verifier.speculative_sampling import _EMPTY_RESIDUAL, Verdict, verify_sampled


class Case(NamedTuple):
    """One session's share of the logits: len(draft_tokens) + 1 consecutive rows.

    (Named tuples, not frozen dataclasses: one per session per call, built on the hot path.)"""

    draft_tokens: Sequence[int]
    draft_distributions: Sequence[SparseDistribution]  # read only when sampling
    params: SamplingParams
    uniforms: torch.Tensor | None  # [n+1] float32 on the CPU when sampling (see num_uniforms)
    want_logprobs: bool = False


class Judgement(NamedTuple):
    verdict: Verdict
    logprobs: tuple[float, ...]  # of the accepted drafts then the next token; () unless asked


class _Layout:
    """Where every row's data sits, and what the device reads from the host (one pass over the
    cases; flat indices are then computed by numpy, not per element in Python). "Sampled order"
    lists the rows of sampled sessions group by group; "draft order" their draft rows."""

    def __init__(self, cases: Sequence[Case], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.offsets: list[int] = []  # first logits row of each case
        self.sampled_base: dict[int, int] = {}  # sampled case -> its first row in sampled order
        self.draft_base: dict[int, int] = {}  # sampled case -> its first draft in draft order
        self.lp_base: dict[int, int] = {}  # case that wants logprobs -> its first logprob row
        self.lp_rows: list[int] = []  # logits row of each logprob row
        self.lp_drafts: list[int] = []  # its draft token (0 on bonus rows: never read)
        self.groups: dict[tuple[float, int, float], list[int]] = {}  # warp settings -> cases
        total = 0
        for i, case in enumerate(cases):
            self.offsets.append(total)
            n = len(case.draft_tokens)
            if case.want_logprobs:
                self.lp_base[i] = len(self.lp_rows)
                self.lp_rows.extend(range(total, total + n + 1))
                self.lp_drafts.extend(case.draft_tokens)
                self.lp_drafts.append(0)
            params = case.params
            if not params.greedy:
                self.groups.setdefault((params.temperature, params.top_k, params.top_p), []).append(i)
            total += n + 1
        self.num_rows = total
        self.rows: list[int] = []  # logits row of each sampled row
        self.final_uniform: list[float] = []  # its session's last uniform (the draw's)
        self.draft_pos: list[int] = []  # sampled-order position of each draft row
        self.draft_tokens: list[int] = []
        self.draft_uniform: list[float] = []
        self.q_of_draft: list[float] = []  # q(draft token), SparseDistribution.prob_of
        self.q_sizes: list[int] = []  # entries in each draft's sparse q
        self.q_tokens: list[int] = []
        self.q_probs: list[float] = []
        self.group_sizes: list[int] = []
        for members in self.groups.values():
            start = len(self.rows)
            for i in members:
                case = cases[i]
                n = len(case.draft_tokens)
                if len(case.draft_distributions) != n:
                    raise ValueError(f"{n} draft tokens but {len(case.draft_distributions)} draft distributions")
                if case.uniforms is None or case.uniforms.shape != (n + 1,):
                    raise ValueError(f"a sampled case with {n} drafts needs {n + 1} uniforms")
                base = len(self.rows)
                self.sampled_base[i] = base
                self.draft_base[i] = len(self.draft_pos)
                u = case.uniforms.tolist()
                self.rows.extend(range(self.offsets[i], self.offsets[i] + n + 1))
                self.final_uniform.extend([u[n]] * (n + 1))
                self.draft_pos.extend(range(base, base + n))
                self.draft_tokens.extend(case.draft_tokens)
                self.draft_uniform.extend(u[:n])
                for token, dist in zip(case.draft_tokens, case.draft_distributions):
                    self.q_of_draft.append(dist.prob_of(token))
                    self.q_sizes.append(len(dist.token_ids))
                    self.q_tokens.extend(dist.token_ids)
                    self.q_probs.extend(dist.probs)
            self.group_sizes.append(len(self.rows) - start)

    def to_device(self, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """What the device reads, as one int64 tensor (lp_rows, lp_draft_flat, lp_flat_base, rows,
        draft_pos, p_token_flat, q_flat) and one float64 tensor (u_times_q, final_uniform,
        q_probs: .float() rounds q to float32 exactly as dense_from_sparse does), each split."""
        vocab = self.vocab_size
        lp_flat_base = np.arange(len(self.lp_rows), dtype=np.int64) * vocab
        lp_draft_flat = lp_flat_base + np.array(self.lp_drafts, dtype=np.int64)
        num_drafts = len(self.draft_pos)
        p_token_flat = np.array(self.draft_pos, dtype=np.int64) * vocab + np.array(self.draft_tokens, dtype=np.int64)
        # The per-session test `q > 0 and u * q < p`, the product in float64 as Python does it;
        # +inf where q <= 0 (or NaN): no p exceeds it.
        q = np.array(self.q_of_draft, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            u_times_q = np.where(q > 0.0, np.array(self.draft_uniform, dtype=np.float64) * q, np.inf)
        # The dense q of every draft row, as flat indices into [num drafts, V].
        q_flat = np.repeat(np.arange(num_drafts, dtype=np.int64) * vocab, self.q_sizes) + np.array(
            self.q_tokens, dtype=np.int64)
        q_probs = np.array(self.q_probs, dtype=np.float64)
        if np.unique(q_flat).size != q_flat.size:
            q_flat, q_probs = _merge_repeats(q_flat, q_probs)
        longs = (np.array(self.lp_rows, dtype=np.int64), lp_draft_flat, lp_flat_base,
                 np.array(self.rows, dtype=np.int64), np.array(self.draft_pos, dtype=np.int64), p_token_flat, q_flat)
        doubles = (u_times_q, np.array(self.final_uniform, dtype=np.float64), q_probs)
        return _to_device(longs, device), _to_device(doubles, device)


def _to_device(parts: tuple[np.ndarray, ...], device: torch.device) -> list[torch.Tensor]:
    host = torch.from_numpy(np.concatenate(parts))
    if device.type == "cuda":
        # A pageable copy would wait for the forward still running; from pinned memory it is
        # asynchronous, like the forward's own inputs.
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(part) for part in parts]))


def _merge_repeats(q_flat: np.ndarray, q_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A q listing a token twice (call validation refuses it; an in-process caller might send
    it): dense_from_sparse sums its float32 probs in order; so do we, so that the device writes
    each position once."""
    merged: dict[int, np.float32] = {}
    for index, prob in zip(q_flat.tolist(), q_probs.astype(np.float32)):
        merged[index] = merged.get(index, np.float32(0.0)) + prob
    return (np.fromiter(merged, dtype=np.int64, count=len(merged)),
            np.array([float(v) for v in merged.values()], dtype=np.float64))


def judge_batch(logits: torch.Tensor, cases: Sequence[Case]) -> list[Judgement]:
    """logits: [sum(n_i + 1), V] float32, the rows of every case in order. One result per case."""
    num_rows, vocab_size = logits.shape
    layout = _Layout(cases, vocab_size)
    if layout.num_rows != num_rows:
        raise ValueError(f"{num_rows} logits rows for cases that need {layout.num_rows}")
    if not cases:
        return []
    if len(layout.sampled_base) == 1:
        return _with_lone_sampled_case(logits, cases, layout)
    device = logits.device
    sampled = bool(layout.rows)
    greedy = len(layout.rows) < num_rows
    longs, doubles = layout.to_device(device) if sampled or layout.lp_rows else ([], [])

    # Per row, the token committed if the session stops there: the argmax (greedy rows), the
    # token drawn from the row's residual or p (sampled rows). Per sampled draft: accepted?
    argmax = logits.argmax(dim=-1) if greedy else None  # [R]
    draws = accepted = None
    if sampled:
        draws, accepted = _judge_sampled(logits, cases, layout, longs[3:], doubles)  # [Rs] long, [Rd] bool
    pieces: list[torch.Tensor] = []
    if argmax is not None:
        pieces.append(argmax)
    if draws is not None:
        pieces.extend((draws, accepted))
    if layout.lp_rows:
        lp_rows, lp_draft_flat, lp_flat_base = longs[:3]
        if draws is None:
            candidates = argmax
        else:
            candidates = argmax if argmax is not None else torch.empty(num_rows, dtype=torch.long, device=device)
            candidates = candidates.index_copy(0, longs[3], draws)
        # Logprobs (no temperature) of both candidates of every row of the sessions that ask.
        log_probs = logits.index_select(0, lp_rows).log_softmax(dim=-1).view(-1)  # [L * V]
        pieces.append(log_probs.index_select(0, candidates.index_select(0, lp_rows) + lp_flat_base))
        pieces.append(log_probs.index_select(0, lp_draft_flat))
    host = (torch.cat([piece.double() for piece in pieces]) if len(pieces) > 1 else pieces[0].double()).tolist()

    # Where each piece starts in `host`.
    argmax_at = 0
    draws_at = num_rows if argmax is not None else 0
    accepted_at = draws_at + len(layout.rows)
    lp_next_at = accepted_at + (len(layout.draft_pos) if draws is not None else 0)
    lp_draft_at = lp_next_at + len(layout.lp_rows)
    out: list[Judgement] = []
    for i, (case, offset) in enumerate(zip(cases, layout.offsets)):
        drafts = case.draft_tokens
        count = len(drafts)
        if case.params.greedy:
            for j, token in enumerate(drafts):
                if token != host[argmax_at + offset + j]:
                    count = j
                    break
            next_token = host[argmax_at + offset + count]
        else:
            flags = accepted_at + layout.draft_base[i]
            for j in range(count):
                if not host[flags + j]:
                    count = j
                    break
            next_token = host[draws_at + layout.sampled_base[i] + count]
        logprobs: tuple[float, ...] = ()
        if case.want_logprobs:
            base = layout.lp_base[i]
            logprobs = (*host[lp_draft_at + base: lp_draft_at + base + count], host[lp_next_at + base + count])
        out.append(Judgement(Verdict(count, int(next_token)), logprobs))
    return out


def _with_lone_sampled_case(logits: torch.Tensor, cases: Sequence[Case], layout: _Layout) -> list[Judgement]:
    """One sampled session: the batched path's fixed cost (some 40 small kernels) exceeds the
    per-session code's few reads, so that session takes the per-session code; the greedy rest,
    if any, the batched path."""
    [lone] = layout.sampled_base
    case = cases[lone]
    start, end = layout.offsets[lone], layout.offsets[lone] + len(case.draft_tokens) + 1
    rows = logits[start:end]
    assert case.uniforms is not None
    verdict = verify_sampled(rows, list(case.draft_tokens), list(case.draft_distributions), case.params,
                             case.uniforms.to(logits.device))
    logprobs: tuple[float, ...] = ()
    if case.want_logprobs:
        committed = [*case.draft_tokens[: verdict.accepted_count], verdict.next_token]
        log_rows = rows[: len(committed)].log_softmax(dim=-1)
        logprobs = tuple(log_rows[torch.arange(len(committed)), torch.tensor(committed)].tolist())
    alone = Judgement(verdict, logprobs)
    if len(cases) == 1:
        return [alone]
    others = judge_batch(torch.cat([logits[:start], logits[end:]]), [*cases[:lone], *cases[lone + 1:]])
    return [*others[:lone], alone, *others[lone:]]


def _judge_sampled(logits: torch.Tensor, cases: Sequence[Case], layout: _Layout, longs: list[torch.Tensor],
                   doubles: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The token drawn after every sampled row ([Rs] long, sampled order) and whether each
    sampled draft is accepted ([Rd] bool, draft order)."""
    vocab_size = logits.shape[-1]
    rows, draft_pos, p_token_flat, q_flat = longs
    u_times_q, final_uniform, q_probs = doubles
    num_drafts = len(layout.draft_pos)

    # p per group of warp settings, one call each (every step of target_probs works row by row).
    if len(layout.groups) == 1 and len(layout.rows) == logits.shape[0]:
        p = target_probs(logits, cases[0].params)  # every row, in order: no gather
    else:
        parts = [target_probs(logits.index_select(0, part), cases[members[0]].params)
                 for part, members in zip(torch.split(rows, layout.group_sizes), layout.groups.values())]
        p = torch.cat(parts) if len(parts) > 1 else parts[0]  # [Rs, V]
    # u * q < p, i.e. p > u * q: float32 p against float64 u * q compares in float64.
    accepted = p.view(-1).index_select(0, p_token_flat) > u_times_q
    dist = p
    if num_drafts:
        # Residual max(0, p - q) of every draft row; p itself where it is numerically empty.
        p_drafts = p.index_select(0, draft_pos)  # [Rd, V]
        q_dense = torch.zeros_like(p_drafts)
        q_dense.view(-1).index_put_((q_flat,), q_probs.float())  # each position once (_Layout)
        residual = (p_drafts - q_dense).clamp_min_(0.0)
        empty = residual.sum(dim=-1).double() <= _EMPTY_RESIDUAL
        dist = p.index_copy(0, draft_pos, torch.where(empty.unsqueeze(1), p_drafts, residual))
    # Inverse-CDF draw of every row with its session's last uniform (sample_from_probs, batched).
    cdf = dist.cumsum(dim=-1)
    target = final_uniform.float().unsqueeze(1) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab_size - 1).squeeze(1)
    return draws, accepted
