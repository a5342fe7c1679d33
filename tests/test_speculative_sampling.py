"""Unit tests of the speculative sampler and the distribution helpers it relies on.

Modelled on vLLM's rejection-sampler tests: hand-made logits with a known answer for the fixed
cases, plus a few small statistical checks (chi-square) where the answer is a distribution.
The end-to-end losslessness check lives in tests/test_sampling_distribution_math.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specmesh.distributions import (
    derive_seed,
    draft_distribution,
    greedy_drafts,
    make_generator,
    sample_from_probs,
    target_probs,
    warp_logits,
)
from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams
from verifier.speculative_sampling import (
    Verdict,
    dense_from_sparse,
    num_uniforms,
    verify_greedy,
    verify_sampled,
)

NEG_INF = float("-inf")
V = 8


def one_hot_logits(argmaxes: list[int], vocab_size: int = V, low: float = -2.0) -> torch.Tensor:
    """[len(argmaxes), V] logits whose row i has a clear maximum at argmaxes[i]."""
    logits = torch.full((len(argmaxes), vocab_size), low)
    # A little structure off the maximum, so argmax is not the only thing that differs by row.
    logits += torch.linspace(0.0, 0.5, vocab_size)
    for row, token in enumerate(argmaxes):
        logits[row, token] = 5.0
    return logits


def chi2_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of counts to probs; a count where probs is 0 is an outright failure."""
    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    support = probs > 0
    if observed[~support].sum() > 0:
        return 0.0
    obs = observed[support]
    exp = probs[support] / probs[support].sum() * obs.sum()
    if len(obs) == 1:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


# --------------------------------------------------------------------------- greedy


def test_greedy_perfect_match_accepts_all_and_bonus_is_last_argmax():
    logits = one_hot_logits([1, 3, 2, 5])
    assert verify_greedy(logits, [1, 3, 2]) == Verdict(accepted_count=3, next_token=5)


def test_greedy_early_mismatch_returns_target_argmax_at_that_row():
    logits = one_hot_logits([1, 3, 2, 5])
    assert verify_greedy(logits, [1, 0, 2]) == Verdict(accepted_count=1, next_token=3)
    assert verify_greedy(logits, [1, 3, 7]) == Verdict(accepted_count=2, next_token=2)


def test_greedy_mismatch_at_first_token():
    logits = one_hot_logits([4, 3, 2, 5])
    assert verify_greedy(logits, [0, 3, 2]) == Verdict(accepted_count=0, next_token=4)


def test_greedy_empty_draft_gives_argmax_of_row_zero():
    logits = one_hot_logits([6])
    assert verify_greedy(logits, []) == Verdict(accepted_count=0, next_token=6)


def test_greedy_rows_after_the_mismatch_do_not_matter():
    logits = one_hot_logits([1, 3, 2, 5])
    changed = logits.clone()
    changed[2:] = torch.randn(2, V, generator=torch.Generator().manual_seed(0))
    assert verify_greedy(logits, [1, 0, 2]) == verify_greedy(changed, [1, 0, 2]) == Verdict(1, 3)


def test_greedy_several_sessions_each_with_their_own_case():
    sessions = {
        "all-accepted": (one_hot_logits([2, 2, 7]), [2, 2], Verdict(2, 7)),
        "second-rejected": (one_hot_logits([0, 1, 2, 3, 4]), [0, 6, 2, 3], Verdict(1, 1)),
        "first-rejected": (one_hot_logits([5, 5]), [4], Verdict(0, 5)),
        "empty-draft": (one_hot_logits([3]), [], Verdict(0, 3)),
        "long-all-accepted": (one_hot_logits([7, 6, 5, 4, 3, 2, 1, 0]), [7, 6, 5, 4, 3, 2, 1], Verdict(7, 0)),
    }
    verdicts = {sid: verify_greedy(logits, drafts) for sid, (logits, drafts, _) in sessions.items()}
    assert verdicts == {sid: expected for sid, (_, _, expected) in sessions.items()}


def test_greedy_speculative_decoding_matches_plain_greedy_decoding():
    """Drive a toy model with a poor drafter: the committed tokens must be the argmax chain."""
    gen = torch.Generator().manual_seed(1234)
    table = torch.randn(V, V, generator=gen)  # next-token logits given the previous token
    drafter = torch.randn(V, V, generator=gen)  # an unrelated drafter

    def plain(start: int, length: int) -> list[int]:
        out = [start]
        for _ in range(length):
            out.append(int(table[out[-1]].argmax()))
        return out[1:]

    for start in range(V):
        for k in (0, 1, 3):
            seq = [start]
            while len(seq) < 13:
                drafts = []
                for _ in range(k):
                    drafts.append(int(drafter[(drafts or seq)[-1]].argmax()))
                rows = torch.stack([table[t] for t in [seq[-1], *drafts]])
                verdict = verify_greedy(rows, drafts)
                seq += drafts[: verdict.accepted_count] + [verdict.next_token]
            assert seq[1:13] == plain(start, 12)


# --------------------------------------------------------------------------- sampled

T1 = SamplingParams(temperature=1.0)


def test_num_uniforms():
    assert num_uniforms(0) == 1
    assert num_uniforms(1) == 2
    assert num_uniforms(5) == 6


def test_verify_sampled_rejects_mismatched_distribution_count():
    logits = one_hot_logits([1, 2])
    with pytest.raises(ValueError):
        verify_sampled(logits, [1], [], T1, torch.rand(num_uniforms(1)))


def test_verify_sampled_empty_draft_samples_from_p():
    logits = torch.tensor([[1.0, 0.5, NEG_INF, -1.0, 0.0, 2.0, NEG_INF, 0.3]])
    p = target_probs(logits[0], T1).numpy()
    counts = np.zeros(V)
    for u in (np.arange(4000) + 0.5) / 4000:
        verdict = verify_sampled(logits, [], [], T1, torch.tensor([u], dtype=torch.float32))
        assert verdict.accepted_count == 0
        counts[verdict.next_token] += 1
    assert counts[2] == counts[6] == 0
    assert np.allclose(counts / counts.sum(), p, atol=1e-3)


@pytest.mark.parametrize(
    ("row0", "params"),
    [
        # x = 2 has -inf logit: p(x) == 0.
        ([1.0, 0.5, NEG_INF, -1.0, 0.0, 2.0, 0.7, 0.3], T1),
        # x = 2 has a finite logit but top-k removes it: p(x) == 0 as well.
        ([1.0, 0.5, -3.0, -1.0, 0.0, 2.0, 0.7, 0.3], SamplingParams(temperature=0.8, top_k=4)),
        # ... or top-p removes it.
        ([1.0, 0.5, -3.0, -1.0, 0.0, 2.0, 0.7, 0.3], SamplingParams(temperature=1.2, top_p=0.7)),
    ],
)
@pytest.mark.parametrize("q_extra", [{}, {0: 0.3, 5: 0.2}])
def test_draft_with_zero_target_probability_is_always_rejected(row0, params, q_extra):
    x = 2
    q_map = {x: 1.0 - sum(q_extra.values()), **q_extra}
    q = SparseDistribution(tuple(q_map), tuple(q_map.values()))
    logits = torch.tensor([row0, [0.0] * V])
    p0 = target_probs(logits[0], params)
    assert float(p0[x]) == 0.0
    residual = (p0 - dense_from_sparse(q, V, torch.device("cpu"))).clamp_min(0.0).numpy()
    residual /= residual.sum()

    counts = np.zeros(V)
    grid = (np.arange(2000) + 0.5) / 2000
    for i, u_final in enumerate(grid):
        # Acceptance uniforms cover [0, 1) including 0, the most permissive value.
        u_accept = 0.0 if i % 10 == 0 else float(grid[(7 * i) % len(grid)])
        uniforms = torch.tensor([u_accept, u_final], dtype=torch.float32)
        verdict = verify_sampled(logits, [x], [q], params, uniforms)
        assert verdict.accepted_count == 0
        assert verdict.next_token != x
        assert residual[verdict.next_token] > 0
        counts[verdict.next_token] += 1
    # The replacement follows normalize(max(0, p - q)): with a deterministic grid of final
    # uniforms the inverse-CDF sample reproduces it to within the grid step.
    assert np.allclose(counts / counts.sum(), residual, atol=2e-3)


def test_rejected_draft_replacement_follows_residual_not_p():
    """x has p(x) > 0 but q(x) > p(x): rejections must resample from max(0, p - q), normalised."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, NEG_INF], [0.0] * V])
    p0 = target_probs(logits[0], T1)
    q = SparseDistribution((0, 1, 7), (0.7, 0.2, 0.1))  # q(0) > p(0); 7 is impossible under p
    residual = (p0 - dense_from_sparse(q, V, torch.device("cpu"))).clamp_min(0.0).numpy()
    residual /= residual.sum()
    assert residual[0] == 0.0 and residual[7] == 0.0

    gen = make_generator(7, "residual")
    counts = np.zeros(V)
    n_rejected = 0
    for _ in range(6000):
        verdict = verify_sampled(logits, [0], [q], T1, torch.rand(2, generator=gen))
        if verdict.accepted_count == 0:
            n_rejected += 1
            counts[verdict.next_token] += 1
    # Acceptance rate is p(0) / q(0).
    expected_accept = float(p0[0]) / 0.7
    assert abs((6000 - n_rejected) / 6000 - expected_accept) < 0.03
    assert chi2_pvalue(counts, residual) > 0.01


def test_q_equal_to_p_is_always_accepted():
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95)
    n = 3
    for trial in range(300):
        logits = torch.randn(n + 1, V, generator=gen) * 2
        p = target_probs(logits, params)
        drafts, dists = [], []
        for i in range(n):
            support = torch.nonzero(p[i]).flatten()
            dists.append(SparseDistribution(tuple(support.tolist()), tuple(p[i, support].tolist())))
            drafts.append(int(support[trial % len(support)]))
        uniforms = torch.rand(num_uniforms(n), generator=gen)
        if trial % 3 == 0:
            uniforms[:n] = 1.0 - 2.0**-24  # largest float32 below 1
        verdict = verify_sampled(logits, drafts, dists, params, uniforms)
        assert verdict.accepted_count == n
        assert float(p[n, verdict.next_token]) > 0


def test_one_hot_q_on_certain_token_is_always_accepted():
    # Row 0: p is one-hot on token 4 through top_k=1; row 1: through -inf logits.
    logits = torch.tensor(
        [
            [0.1, 0.2, 0.3, 0.4, 3.0, 0.5, 0.6, 0.7],
            [NEG_INF, NEG_INF, 0.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF, NEG_INF],
            [0.0] * V,
        ]
    )
    params = SamplingParams(temperature=1.0, top_k=1)
    p = target_probs(logits, params)
    assert float(p[0, 4]) == 1.0 and float(p[1, 2]) == 1.0
    q = [SparseDistribution((4,), (1.0,)), SparseDistribution((2,), (1.0,))]
    for u in [0.0, 0.25, 0.5, 0.999, 1.0 - 2.0**-24]:
        verdict = verify_sampled(logits, [4, 2], q, params, torch.tensor([u, u, 0.5]))
        assert verdict.accepted_count == 2


def test_acceptance_rate_is_min_one_p_over_q():
    logits = torch.tensor([[1.0, 0.0, -0.5, 0.2, -2.0, 0.4, 0.1, -1.0], [0.0] * V])
    p0 = target_probs(logits[0], T1)
    q = SparseDistribution((0, 3, 5), (0.2, 0.5, 0.3))
    grid = (torch.arange(2000, dtype=torch.float32) + 0.5) / 2000
    for x in (0, 3, 5):
        accepted = sum(
            verify_sampled(logits, [x], [q], T1, torch.stack([u, torch.tensor(0.5)])).accepted_count
            for u in grid
        )
        expected = min(1.0, float(p0[x]) / q.prob_of(x))
        assert abs(accepted / len(grid) - expected) < 2e-3


def test_seeded_verdicts_are_deterministic_and_seeds_vary():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, V, generator=gen)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    draft_logits = torch.randn(3, V, generator=gen)
    drafts, dists = [], []
    for i in range(3):
        token, _, q = draft_distribution(draft_logits[i], params, 4, torch.rand((), generator=gen))
        drafts.append(token)
        dists.append(q)

    def verdict_for(seed: int) -> Verdict:
        uniforms = torch.rand(num_uniforms(3), generator=make_generator(seed, "session-a", 17))
        return verify_sampled(logits, drafts, dists, params, uniforms)

    for seed in (0, 1, 42, 2**62):
        assert verdict_for(seed) == verdict_for(seed)
    assert len({verdict_for(seed) for seed in range(60)}) > 1

    assert derive_seed(5, "a", 3) == derive_seed(5, "a", 3)
    assert derive_seed(5, "a", 3) != derive_seed(5, "a", 4)
    assert derive_seed(5, "a", 3) != derive_seed(6, "a", 3)
    assert 0 <= derive_seed(2**63 - 1, "x") < 2**63
    a = torch.rand(5, generator=make_generator(9, 1))
    b = torch.rand(5, generator=make_generator(9, 1))
    c = torch.rand(5, generator=make_generator(9, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_from_probs_never_picks_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.0, 0.5, 0.2, 0.0, 0.0])
    for u in [0.0, 0.1, 0.299999, 0.3, 0.8, 0.999, 1.0 - 2.0**-24]:
        assert float(probs[sample_from_probs(probs, torch.tensor(u))]) > 0
    # Unnormalised input is fine.
    assert sample_from_probs(probs * 7, torch.tensor(0.5)) == sample_from_probs(probs, torch.tensor(0.5))


# --------------------------------------------------------------------------- warp_logits / target_probs


def test_temperature_scaling():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 0.25, -0.5, 3.0])
    for temperature in (0.25, 0.7, 1.0, 1.5, 4.0):
        params = SamplingParams(temperature=temperature)
        assert torch.allclose(warp_logits(logits, params), logits / temperature)
        assert torch.allclose(target_probs(logits, params), torch.softmax(logits / temperature, -1))
    cold = target_probs(logits, SamplingParams(temperature=0.5))
    hot = target_probs(logits, SamplingParams(temperature=2.0))
    assert cold.max() > target_probs(logits, T1).max() > hot.max()
    assert int(cold.argmax()) == int(hot.argmax()) == 7


def test_top_k_keeps_exactly_k():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(50, 32, generator=gen)
    for k in range(1, 33):
        warped = warp_logits(logits, SamplingParams(temperature=0.8, top_k=k))
        kept = torch.isfinite(warped)
        assert torch.all(kept.sum(-1) == k)
        top = torch.topk(logits, k, dim=-1).indices
        assert torch.all(kept.gather(-1, top))
        probs = target_probs(logits, SamplingParams(temperature=0.8, top_k=k))
        assert torch.equal(probs > 0, kept)
        assert torch.allclose(probs.sum(-1), torch.ones(50))
    for k in (0, 32, 100):  # disabled / no-op
        assert torch.isfinite(warp_logits(logits, SamplingParams(temperature=1.0, top_k=k))).all()


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -1.0, 2.0, 1.0])
    kept = torch.isfinite(warp_logits(logits, SamplingParams(temperature=1.0, top_k=3)))
    assert kept.tolist() == [True, True, True, True, False, False, True, True]


def _smallest_top_p_set(probs: np.ndarray, top_p: float) -> set[int] | None:
    """The smallest set of most-likely tokens whose mass reaches top_p (None near a boundary)."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    if np.any(np.abs(cumulative[:-1] - top_p) < 1e-5):
        return None  # float32 rounding could legitimately go either way
    m = int(np.searchsorted(cumulative, top_p)) + 1
    return set(order[: min(m, len(probs))].tolist())


def test_top_p_keeps_smallest_set_reaching_top_p():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(200, 16, generator=gen) * 2
    checked = 0
    for top_p in (0.05, 0.3, 0.5, 0.8, 0.9, 0.99):
        params = SamplingParams(temperature=1.0, top_p=top_p)
        kept = torch.isfinite(warp_logits(logits, params))
        full = torch.softmax(logits.double(), -1).numpy()
        for row in range(logits.shape[0]):
            expected = _smallest_top_p_set(full[row], top_p)
            if expected is None:
                continue
            checked += 1
            assert set(torch.nonzero(kept[row]).flatten().tolist()) == expected
            assert full[row][sorted(expected)].sum() >= top_p
    assert checked > 1000


def test_top_p_always_keeps_at_least_one_token():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * V])
    for top_p in (1e-9, 1e-3, 0.1):
        params = SamplingParams(temperature=1.0, top_p=top_p)
        kept = torch.isfinite(warp_logits(logits, params))
        assert kept.sum(-1).tolist()[0] == 1 and bool(kept[0, 0])
        assert kept[1].sum() >= 1
        probs = target_probs(logits, params)
        assert torch.allclose(probs.sum(-1), torch.ones(2))


HF_CASES = [
    (1.0, 0, 1.0),
    (0.7, 5, 1.0),
    (1.3, 0, 0.8),
    (0.5, 10, 0.9),
    (2.0, 3, 0.5),
    (1.0, 1, 0.95),
    (0.9, 0, 0.3),
    (1.1, 20, 0.99),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), HF_CASES)
def test_warp_logits_matches_hf_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = torch.Generator().manual_seed(hash((temperature, top_k, top_p)) % 2**31)
    batch, vocab = 128, 50
    logits = torch.randn(batch, vocab, generator=gen) * 3
    input_ids = torch.zeros(batch, 1, dtype=torch.long)

    hf = TemperatureLogitsWarper(temperature)(input_ids, logits.clone())
    if top_k > 0:
        hf = TopKLogitsWarper(top_k)(input_ids, hf)
    if top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(input_ids, hf)

    ours = warp_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf))
    finite = torch.isfinite(ours)
    assert torch.allclose(ours[finite], hf[finite])
    assert torch.allclose(
        target_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)),
        torch.softmax(hf, -1),
        atol=1e-6,
    )


@pytest.mark.parametrize("top_k", [1, 2, 7, 25, 49])
def test_top_k_matches_hf_transformers(top_k):
    from transformers.generation.logits_process import TopKLogitsWarper

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(top_k))
    hf = TopKLogitsWarper(top_k)(torch.zeros(64, 1, dtype=torch.long), logits.clone())
    ours = warp_logits(logits, SamplingParams(temperature=1.0, top_k=top_k))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf))


@pytest.mark.parametrize("top_p", [0.01, 0.2, 0.5, 0.75, 0.9, 0.999])
def test_top_p_matches_hf_transformers(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(int(top_p * 1000))) * 2
    hf = TopPLogitsWarper(top_p)(torch.zeros(64, 1, dtype=torch.long), logits.clone())
    ours = warp_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(hf))


# --------------------------------------------------------------------------- draft_distribution

DRAFT_CASES = [
    (SamplingParams(temperature=1.0), 4),
    (SamplingParams(temperature=0.7, top_k=3), 5),
    (SamplingParams(temperature=1.3, top_p=0.8), 6),
    (SamplingParams(temperature=0.9, top_k=6, top_p=0.9), 4),
    (SamplingParams(temperature=1.0), 1),
]


@pytest.mark.parametrize(("params", "draft_top_k"), DRAFT_CASES)
def test_draft_distribution_contract(params, draft_top_k):
    gen = torch.Generator().manual_seed(21)
    for _ in range(300):
        logits = torch.randn(V, generator=gen) * 2
        token, confidence, q = draft_distribution(logits, params, draft_top_k, torch.rand((), generator=gen))
        assert token in q.token_ids
        assert len(set(q.token_ids)) == len(q.token_ids)
        assert 1 <= len(q.token_ids) <= min(draft_top_k, params.top_k or V)
        assert all(prob > 0 for prob in q.probs)
        assert math.isclose(sum(q.probs), 1.0, abs_tol=1e-5)
        assert confidence == q.prob_of(token)
        # The support is the drafter's own most likely tokens.
        top = set(torch.topk(logits, len(q.token_ids)).indices.tolist())
        assert set(q.token_ids) == top


@pytest.mark.parametrize(("params", "draft_top_k"), DRAFT_CASES[:4])
def test_draft_tokens_follow_q(params, draft_top_k):
    logits = torch.tensor([1.2, 0.3, -0.4, 0.9, 0.1, -1.5, 0.6, 0.0])
    _, _, q = draft_distribution(logits, params, draft_top_k, torch.tensor(0.0))
    gen = make_generator(3, "draft-freq")
    counts = np.zeros(V)
    for u in torch.rand(20000, generator=gen):
        token, _, q_again = draft_distribution(logits, params, draft_top_k, u)
        assert q_again == q
        counts[token] += 1
    q_dense = dense_from_sparse(q, V, torch.device("cpu")).double().numpy()
    assert chi2_pvalue(counts, q_dense) > 0.01


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.6),
    ],
)
def test_untruncated_draft_q_equals_target_p(params):
    """With draft_top_k >= V the drafter's q is exactly the verifier's p for the same logits."""
    gen = torch.Generator().manual_seed(8)
    for _ in range(100):
        logits = torch.randn(V, generator=gen) * 2
        _, _, q = draft_distribution(logits, params, V, torch.rand((), generator=gen))
        q_dense = dense_from_sparse(q, V, torch.device("cpu"))
        assert torch.allclose(q_dense, target_probs(logits, params), atol=1e-6)


def test_greedy_draft_is_argmax():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        logits = torch.randn(V, generator=gen)
        token, confidence, q = draft_distribution(logits, SamplingParams(), 3, torch.rand((), generator=gen))
        assert token == int(logits.argmax())
        assert math.isclose(confidence, float(torch.softmax(logits, -1).max()), rel_tol=1e-6)
        # q is the point mass greedy drafting draws from (greedy verification never reads it).
        assert q.token_ids == (token,) and q.probs == (1.0,)
    batch = torch.randn(5, V, generator=gen)
    assert [t for t, _, _ in greedy_drafts(batch)] == batch.argmax(dim=-1).tolist()
