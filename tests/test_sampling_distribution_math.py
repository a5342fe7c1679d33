"""Statistical losslessness of the pure speculative sampler.

A toy "verifier model" on an 8-token vocabulary gives next-token logits that depend on the
whole context (so p_2 is conditioned on the first token, p_3 on the first two), and a toy
drafter with different logits proposes tokens through `draft_distribution`, whose q is
truncated to its top 3 tokens: q misses tokens that p has, and (under the request's top-k)
puts mass on tokens p has removed. A plain speculative decoding loop (up to 2 drafts a
round, `verify_sampled` for acceptance) commits 3 tokens per trial; over many seeded trials
the committed tokens must follow the verifier's own distribution under the request's
temperature/top-k/top-p:

  (a) first token            ~ p_1(a)
  (b) (first, second)        ~ p_1(a) p_2(b | a)
  (c) (first, second, third) ~ p_1(a) p_2(b | a) p_3(c | a, b)   (covers the bonus token)

The draft length of a round depends only on how many tokens are already committed, never on
the drafted tokens, so the loop itself cannot bias the output. Negative controls show that the
same check does catch a biased sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specmesh.distributions import draft_distribution, make_generator, sample_from_probs, target_probs
from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams
from verifier.speculative_sampling import Verdict, dense_from_sparse, num_uniforms, verify_sampled

V = 8
NUM_TOKENS = 3  # committed tokens per trial
MAX_DRAFT = 2  # draft tokens per round
DRAFT_TOP_K = 3  # the drafter's q keeps its 3 most likely tokens
TRIALS = 24_000
PVALUE_OK = 0.01
PVALUE_BIASED = 1e-6

SETTINGS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.7-topk4": SamplingParams(temperature=0.7, top_k=4),
    "T1.3-topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
    "T0.9-topk6-topp0.9": SamplingParams(temperature=0.9, top_k=6, top_p=0.9),
}

_gen = torch.Generator().manual_seed(20240601)
# Target logits: row for context () , (a,) and (a, b). Distinct, fairly spread distributions.
TARGET_1 = torch.randn(V, generator=_gen) * 1.2
TARGET_2 = torch.randn(V, V, generator=_gen) * 1.2
TARGET_3 = torch.randn(V, V, V, generator=_gen) * 1.2
# Drafter logits: loosely related to the target (so there are acceptances and rejections),
# plus independent noise (so q is clearly not p).
DRAFT_1 = 0.5 * TARGET_1 + torch.randn(V, generator=_gen) * 1.2
DRAFT_2 = 0.5 * TARGET_2 + torch.randn(V, V, generator=_gen) * 1.2
DRAFT_3 = 0.5 * TARGET_3 + torch.randn(V, V, V, generator=_gen) * 1.2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: extra intra-op threads only spin, doubling CPU time on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def target_logits(context: tuple[int, ...]) -> torch.Tensor:
    return (TARGET_1, TARGET_2, TARGET_3)[len(context)][context] if context else TARGET_1


def drafter_logits(context: tuple[int, ...]) -> torch.Tensor:
    return (DRAFT_1, DRAFT_2, DRAFT_3)[len(context)][context] if context else DRAFT_1


def expected_joint(params: SamplingParams) -> np.ndarray:
    """[V, V, V]: P(first=a, second=b, third=c) = p_1(a) p_2(b|a) p_3(c|a,b) under params."""
    p1 = target_probs(TARGET_1, params).double()
    p2 = target_probs(TARGET_2, params).double()  # [a, b]
    p3 = target_probs(TARGET_3, params).double()  # [a, b, c]
    return (p1[:, None, None] * p2[:, :, None] * p3).numpy()


Verifier = Callable[[torch.Tensor, list[int], list[SparseDistribution], SamplingParams, torch.Tensor], Verdict]


def generate(params: SamplingParams, seed: int, verify: Verifier, trials: int = TRIALS) -> np.ndarray:
    """Run `trials` seeded speculative decodes of NUM_TOKENS tokens; returns [trials, 3] tokens."""

    @lru_cache(maxsize=None)
    def target_rows(context: tuple[int, ...], drafts: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([target_logits(context + drafts[:i]) for i in range(len(drafts) + 1)])

    # Every round gets MAX_DRAFT draft uniforms and num_uniforms(MAX_DRAFT) verify uniforms,
    # drawn up front from one seeded stream (a round uses a prefix of its verify uniforms).
    per_round = MAX_DRAFT + num_uniforms(MAX_DRAFT)
    uniforms = torch.rand(trials, NUM_TOKENS, per_round, generator=make_generator(seed, "trials"))
    out = np.empty((trials, NUM_TOKENS), dtype=np.int64)
    for trial in range(trials):
        context: tuple[int, ...] = ()
        round_index = 0
        while len(context) < NUM_TOKENS:
            u = uniforms[trial, round_index]
            round_index += 1
            # Depends only on the committed length: never on the drafts themselves.
            k = min(MAX_DRAFT, NUM_TOKENS - 1 - len(context))
            drafts: list[int] = []
            dists: list[SparseDistribution] = []
            for i in range(k):
                token, _, q = draft_distribution(
                    drafter_logits(context + tuple(drafts)), params, DRAFT_TOP_K, u[i]
                )
                drafts.append(token)
                dists.append(q)
            rows = target_rows(context, tuple(drafts))
            verdict = verify(rows, drafts, dists, params, u[MAX_DRAFT : MAX_DRAFT + num_uniforms(k)])
            context = context + tuple(drafts[: verdict.accepted_count]) + (verdict.next_token,)
        out[trial] = context[:NUM_TOKENS]
    return out


def chi2_pvalue(observed: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of counts to probs (any shape, flattened).

    A count in a cell of probability 0 is an outright failure (p-value 0). Cells expected to
    hold fewer than min_expected samples are pooled into one cell.
    """
    observed = np.asarray(observed, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    support = probs > 0
    if observed[~support].sum() > 0:
        return 0.0
    n = observed.sum()
    expected = probs / probs[support].sum() * n
    big = support & (expected >= min_expected)
    small = support & ~big
    obs = list(observed[big])
    exp = list(expected[big])
    if small.any():
        obs.append(observed[small].sum())
        exp.append(expected[small].sum())
    if len(obs) < 2:
        return 1.0
    exp_arr = np.array(exp)
    exp_arr *= n / exp_arr.sum()
    return float(chisquare(np.array(obs), exp_arr).pvalue)


def marginal_pvalues(tokens: np.ndarray, params: SamplingParams) -> dict[str, float]:
    joint = expected_joint(params)
    first = np.bincount(tokens[:, 0], minlength=V)
    pair = np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)
    triple = np.bincount(tokens[:, 0] * V * V + tokens[:, 1] * V + tokens[:, 2], minlength=V**3)
    return {
        "first": chi2_pvalue(first, joint.sum(axis=(1, 2))),
        "first,second": chi2_pvalue(pair, joint.sum(axis=2)),
        "first,second,third": chi2_pvalue(triple, joint),
    }


# --------------------------------------------------------------------------- the setup is a real test


@pytest.mark.parametrize("name", list(SETTINGS))
def test_draft_distributions_clearly_differ_from_target(name):
    """Guard against a vacuous test: q must be sparse, miss tokens p has, and differ from p."""
    params = SETTINGS[name]
    contexts = [()] + [(a,) for a in range(V)]
    missing, total_variation = 0, []
    for context in contexts:
        p = target_probs(target_logits(context), params)
        _, _, q = draft_distribution(drafter_logits(context), params, DRAFT_TOP_K, torch.tensor(0.5))
        q_dense = dense_from_sparse(q, V, torch.device("cpu"))
        assert len(q.token_ids) <= DRAFT_TOP_K
        missing += int(((p > 0) & (q_dense == 0)).sum())
        total_variation.append(0.5 * float((p - q_dense).abs().sum()))
    assert missing > 0
    assert np.mean(total_variation) > 0.2


def test_some_drafts_are_impossible_under_the_target():
    """Under top-k, the drafter sometimes proposes tokens with p(x) = 0 (always rejected)."""
    params = SETTINGS["T0.7-topk4"]
    impossible = 0
    for a in range(V):
        p = target_probs(target_logits((a,)), params)
        _, _, q = draft_distribution(drafter_logits((a,)), params, DRAFT_TOP_K, torch.tensor(0.5))
        impossible += sum(1 for t in q.token_ids if float(p[t]) == 0.0)
    assert impossible > 0


# --------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("name", list(SETTINGS))
def test_committed_tokens_follow_target_distribution(name):
    params = SETTINGS[name]
    tokens = generate(params, seed=1000 + list(SETTINGS).index(name), verify=verify_sampled)
    pvalues = marginal_pvalues(tokens, params)
    assert all(pv > PVALUE_OK for pv in pvalues.values()), pvalues


# --------------------------------------------------------------------------- negative controls


def accept_every_draft(target_logits, draft_tokens, draft_distributions, params, uniforms) -> Verdict:
    """Biased: commits the drafter's tokens unchecked (the output follows q, not p)."""
    p = target_probs(target_logits, params)
    n = len(draft_tokens)
    return Verdict(n, sample_from_probs(p[n], uniforms[n]))


def resample_from_p_on_rejection(target_logits, draft_tokens, draft_distributions, params, uniforms) -> Verdict:
    """Biased the classic way: on rejection draws from p instead of normalize(max(0, p - q))."""
    p = target_probs(target_logits, params)
    n = len(draft_tokens)
    for i, (token, q) in enumerate(zip(draft_tokens, draft_distributions)):
        q_token = q.prob_of(token)
        if not (q_token > 0 and float(uniforms[i]) * q_token < float(p[i, token])):
            return Verdict(i, sample_from_probs(p[i], uniforms[n]))
    return Verdict(n, sample_from_probs(p[n], uniforms[n]))


@pytest.mark.parametrize("biased", [accept_every_draft, resample_from_p_on_rejection])
@pytest.mark.parametrize("name", ["T1", "T1.3-topp0.8"])
def test_biased_sampler_is_detected(name, biased):
    params = SETTINGS[name]
    # The same seed as the lossless run of this setting: the same uniforms, a different sampler.
    tokens = generate(params, seed=1000 + list(SETTINGS).index(name), verify=biased)
    pvalues = marginal_pvalues(tokens, params)
    assert pvalues["first,second"] < PVALUE_BIASED, pvalues
    if biased is accept_every_draft:
        assert pvalues["first"] < PVALUE_BIASED, pvalues
