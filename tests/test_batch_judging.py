"""The batched judge (verifier/batch_judging.py) against the per-session reference, bit for bit.

The reference is what VerifierCore did per session before batching: verify_greedy_argmax or
verify_sampled from verifier/speculative_sampling.py, then the log-softmax of the committed
rows read at the committed tokens. Random batches mix greedy and sampled sessions, draft
lengths 0..6, temperature / top-k / top-p settings, q that the drafter would send, q with
tokens outside p's support, drafts q cannot produce, q that dominates p (empty residual), drafts
that are all accepted. Verdicts and logprobs must be equal, not close.
"""

from __future__ import annotations

import random

import pytest
import torch

from specmesh.distributions import draft_distribution, make_generator, target_probs
from specmesh.model_runner import ModelRunner
from specmesh.records import SparseDistribution, VerifyItem
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama
from verifier.batch_judging import Case, judge_batch
from verifier.speculative_sampling import (
    Verdict,
    num_uniforms,
    verify_greedy_argmax,
    verify_sampled,
)
from verifier.verification import RANDOM_STREAM, VerifierCore

SETTINGS = (
    SamplingParams(),  # greedy
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.5, top_p=0.3),
)


def reference(logits: torch.Tensor, cases: list[Case]) -> list[tuple[Verdict, tuple[float, ...]]]:
    out = []
    offset = 0
    for case in cases:
        n = len(case.draft_tokens)
        rows = logits[offset: offset + n + 1]
        offset += n + 1
        drafts = list(case.draft_tokens)
        if case.params.greedy:
            verdict = verify_greedy_argmax(rows.argmax(dim=-1).tolist(), drafts)
        else:
            verdict = verify_sampled(rows, drafts, list(case.draft_distributions), case.params, case.uniforms)
        logprobs: tuple[float, ...] = ()
        if case.want_logprobs:
            committed = drafts[: verdict.accepted_count] + [verdict.next_token]
            log_rows = rows[: len(committed)].log_softmax(dim=-1)
            logprobs = tuple(log_rows[torch.arange(len(committed)), torch.tensor(committed)].tolist())
        out.append((verdict, logprobs))
    return out


def random_q(rng: random.Random, p_row: torch.Tensor, drafter_row: torch.Tensor, params: SamplingParams,
             vocab: int) -> tuple[int, SparseDistribution]:
    """A draft token and its q, of one of several kinds (most of them what a drafter sends)."""
    kind = rng.choice(["drafter", "drafter", "drafter", "point", "outside", "not_in_q", "dominates", "equal"])
    if kind == "drafter":  # the drafter's exact top-k q, sampled from it
        token, _, q = draft_distribution(drafter_row, params, rng.choice([1, 4, 8]), torch.rand(()))
        return token, q
    if kind == "point":  # a point mass (greedy-style drafts, context copies)
        token = rng.randrange(vocab)
        return token, SparseDistribution((token,), (1.0,))
    if kind == "outside":  # q's tokens where p is zero (removed by top-k / top-p)
        order = p_row.argsort().tolist()
        ids = tuple(order[:3])
        return ids[0], SparseDistribution(ids, (0.5, 0.3, 0.2))
    if kind == "not_in_q":  # a draft q could not produce: always rejected
        ids = tuple(rng.sample(range(vocab), 3))
        token = next(t for t in range(vocab) if t not in ids)
        return token, SparseDistribution(ids, (0.2, 0.3, 0.5))
    support = (p_row > 0).nonzero().flatten().tolist()
    ids = tuple(support[:8])
    scale = 1.3 if kind == "dominates" else 1.0  # q >= p everywhere: the residual is empty
    probs = tuple(float(p_row[t]) * scale for t in ids)
    if sum(probs) <= 0:
        probs = (1.0,) * len(ids)
    return ids[0] if kind == "dominates" else rng.choice(ids), SparseDistribution(ids, probs)


def random_batch(rng: random.Random, vocab: int, num_cases: int, max_drafts: int = 6
                 ) -> tuple[torch.Tensor, list[Case]]:
    cases: list[Case] = []
    blocks: list[torch.Tensor] = []
    for _ in range(num_cases):
        params = rng.choice(SETTINGS)
        n = rng.randint(0, max_drafts)
        scale = rng.choice([0.5, 3.0, 10.0])  # flat to peaky target distributions
        logits = torch.randn(n + 1, vocab) * scale
        if rng.random() < 0.1:
            logits[:, : vocab // 2] = logits[:, :1]  # ties
        drafter = logits + torch.randn(n + 1, vocab) * rng.choice([0.0, 0.3, 2.0])
        if params.greedy:
            argmax = logits.argmax(dim=-1).tolist()
            all_right = rng.random() < 0.4
            drafts = [argmax[i] if all_right or rng.random() < 0.6 else rng.randrange(vocab) for i in range(n)]
            dists = [SparseDistribution((t,), (1.0,)) for t in drafts]
        else:
            p = target_probs(logits, params)
            drafts, dists = [], []
            for i in range(n):
                token, q = random_q(rng, p[i], drafter[i], params, vocab)
                drafts.append(token)
                dists.append(q)
        uniforms = None
        if not params.greedy:
            seed = rng.randrange(1 << 30)
            uniforms = torch.rand(num_uniforms(n), generator=make_generator(seed, RANDOM_STREAM, rng.randrange(999)))
        cases.append(Case(tuple(drafts), tuple(dists), params, uniforms, want_logprobs=rng.random() < 0.5))
        blocks.append(logits)
    return torch.cat(blocks), cases


@pytest.mark.parametrize("vocab", [8, 50, 512])
def test_batched_judge_equals_per_session_reference(vocab: int) -> None:
    rng = random.Random(vocab)
    torch.manual_seed(vocab)
    for trial in range(40):
        logits, cases = random_batch(rng, vocab, rng.choice([1, 2, 7, 24]))
        got = [(j.verdict, j.logprobs) for j in judge_batch(logits, cases)]
        assert got == reference(logits, cases), f"trial {trial}"


def test_edge_batches() -> None:
    rng = random.Random(1)
    torch.manual_seed(1)
    assert judge_batch(torch.empty(0, 16), []) == []
    for max_drafts in (0, 1):  # every session with zero drafts; one draft each
        for _ in range(10):
            logits, cases = random_batch(rng, 16, 12, max_drafts=max_drafts)
            assert [(j.verdict, j.logprobs) for j in judge_batch(logits, cases)] == reference(logits, cases)


def test_all_greedy_drafts_right_are_all_accepted_with_bonus() -> None:
    logits = torch.randn(3 * 5, 32)
    argmax = logits.argmax(dim=-1).tolist()
    cases = [Case(tuple(argmax[5 * s: 5 * s + 4]), (), SamplingParams(), None, True) for s in range(3)]
    for s, judgement in enumerate(judge_batch(logits, cases)):
        assert judgement.verdict == Verdict(4, argmax[5 * s + 4])
        assert len(judgement.logprobs) == 5


def test_q_equal_to_p_accepts_everything() -> None:
    params = SamplingParams(temperature=1.0, top_k=4)
    logits = torch.randn(4, 20)
    p = target_probs(logits, params)
    drafts, dists = [], []
    for i in range(3):
        ids = tuple((p[i] > 0).nonzero().flatten().tolist())
        drafts.append(ids[0])
        dists.append(SparseDistribution(ids, tuple(float(p[i, t]) for t in ids)))
    for seed in range(20):
        uniforms = torch.rand(4, generator=make_generator(seed, RANDOM_STREAM, 0))
        case = Case(tuple(drafts), tuple(dists), params, uniforms)
        [judgement] = judge_batch(logits, [case])
        assert judgement.verdict.accepted_count == 3
        assert (judgement.verdict, ()) == reference(logits, [case])[0]


def test_core_uniforms_are_the_seeded_stream() -> None:
    """VerifierCore reseeds one generator per session: the same numbers as a fresh one."""
    core = VerifierCore(ModelRunner(make_tiny_llama(32), 2, 64))
    for seed, cached, n in [(1, 0, 0), (7, 10, 4), (2**63 - 1, 3, 8)]:
        item = VerifyItem("s", cached, (1, 2), tuple(range(n)), (), SamplingParams(temperature=1.0, seed=seed))
        expected = torch.rand(n + 1, generator=make_generator(seed, RANDOM_STREAM, item.committed_length))
        assert torch.equal(core._case(item).uniforms, expected)


def test_q_with_repeated_tokens_and_zero_mass_drafts() -> None:
    """Malformed q's that only an in-process caller could send (call validation refuses
    repeats): repeated ids sum like dense_from_sparse; a draft whose listed q is 0 is rejected."""
    rng = random.Random(3)
    torch.manual_seed(3)
    vocab = 12
    for trial in range(30):
        cases, blocks = [], []
        for _ in range(rng.randint(1, 5)):
            n = rng.randint(1, 4)
            params = rng.choice(SETTINGS[1:])
            blocks.append(torch.randn(n + 1, vocab) * 3)
            drafts, dists = [], []
            for _ in range(n):
                ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
                probs = [rng.choice([0.0, 0.1, 0.3, 0.7, 1 / 3]) for _ in ids]
                drafts.append(rng.choice(ids))
                dists.append(SparseDistribution(tuple(ids), tuple(probs)))
            uniforms = torch.rand(n + 1, generator=make_generator(trial, RANDOM_STREAM, n))
            cases.append(Case(tuple(drafts), tuple(dists), params, uniforms, rng.random() < 0.5))
        logits = torch.cat(blocks)
        got = [(j.verdict, j.logprobs) for j in judge_batch(logits, cases)]
        assert got == reference(logits, cases), f"trial {trial}"


def test_one_sampled_session_among_greedy_ones() -> None:
    """A lone sampled session takes the per-session code; the greedy rest the batched path."""
    rng = random.Random(4)
    torch.manual_seed(4)
    for trial in range(20):
        logits, cases = random_batch(rng, 50, 6)
        lone = rng.randrange(len(cases))
        cases = [case if i == lone or case.params.greedy else
                 Case(case.draft_tokens, case.draft_distributions, SamplingParams(), None, case.want_logprobs)
                 for i, case in enumerate(cases)]
        got = [(j.verdict, j.logprobs) for j in judge_batch(logits, cases)]
        assert got == reference(logits, cases), f"trial {trial}"
