"""Statistical losslessness end to end: sampled output of the Engine follows the verifier.

A tiny verifier and a DIFFERENT tiny drafter on a 10-token vocabulary (LM heads scaled so the
distributions are far from uniform, and far from each other). The same prompt is generated
with many different seeds through the whole stack (scheduler session, draft policy, model
drafter with its KV slots and sparse top-k q, verifier with lossless rejection sampling,
commit), hundreds of sessions per verify batch. The committed tokens must follow the verifier's
own distribution under the request's temperature / top-k / top-p, computed exactly from the
verifier's logits with `target_probs`:

  first token             ~ p1(a)
  (second, third) tokens  ~ sum_a p1(a) p2(b | a) p3(c | a, b)

A session's first round verifies no drafts (the drafter prefills the prompt beside the
verifier, scheduler/speculation_loop.py), so it commits the first token; drafting starts with
the second round. With max_tokens=3 that round verifies a single draft (a round commits at most
drafts + 1 tokens), so the third token comes from a correction or a bonus; with max_tokens=4 it
verifies two drafts, so both tokens can come from accepted drafts or a rejection at either
position. A negative control shows the same check rejects the drafter's own q.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from drafter.context_copy import ContextCopyRule
from drafter.drafting import ModelDrafter
from specmesh.distributions import draft_distribution, target_probs
from specmesh.engine import Engine, EngineConfig
from specmesh.model_runner import ModelRunner
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

VOCAB = 10
PROMPT = [1, 5, 7, 4]
MAX_CONTEXT = 16
BATCH = 500  # concurrent sessions per generate_batch_ids call (all in one verify batch)
NUM_SAMPLES = 20_000
PVALUE_OK = 0.01
MIN_EXPECTED = 5.0  # cells expecting fewer samples are pooled, as chi-square needs

SETTINGS = {
    "T1": SamplingParams(temperature=1.0),
    "T0.8-topk5-topp0.9": SamplingParams(temperature=0.8, top_k=5, top_p=0.9),
}


def _tiny(seed: int, head_scale: float) -> torch.nn.Module:
    model = make_tiny_llama(VOCAB, hidden=16, layers=2, heads=2, kv_heads=1, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)  # sharper than a random init's near-uniform output
    return model


@pytest.fixture(scope="module")
def verifier() -> torch.nn.Module:
    return _tiny(seed=1, head_scale=8.0)


@pytest.fixture(scope="module")
def drafter_model() -> torch.nn.Module:
    return _tiny(seed=7, head_scale=8.0)


def make_engine(verifier, drafter_model, draft_length: int, num_slots: int = BATCH,
                context_copy: ContextCopyRule | None = None) -> Engine:
    config = EngineConfig(num_slots=num_slots, max_context=MAX_CONTEXT, draft_length=draft_length)
    drafter = ModelDrafter(ModelRunner(drafter_model, num_slots, MAX_CONTEXT), draft_top_k=config.draft_top_k,
                           context_copy=context_copy)
    return Engine(verifier, None, drafter, config, stop_token_ids=[])


@torch.no_grad()
def last_logits(model: torch.nn.Module, contexts: list[list[int]]) -> torch.Tensor:
    """[len(contexts), V]: next-token logits by a plain forward (contexts of equal length)."""
    input_ids = torch.tensor(contexts)
    return model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, -1].float()


def exact_distributions(verifier, params: SamplingParams, prompt: list[int] = PROMPT) -> tuple[np.ndarray, np.ndarray]:
    """p1 [V] and the joint of the second and third tokens, sum_a p1(a) p2(b|a) p3(c|a,b) [V, V]."""
    p1 = target_probs(last_logits(verifier, [prompt])[0], params).double().numpy()
    p2 = target_probs(last_logits(verifier, [prompt + [a] for a in range(VOCAB)]), params).double().numpy()
    p3 = target_probs(last_logits(verifier, [prompt + [a, b] for a in range(VOCAB) for b in range(VOCAB)]),
                      params).double().numpy().reshape(VOCAB, VOCAB, VOCAB)
    return p1, np.einsum("a,ab,abc->bc", p1, p2, p3)


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit of counts to probs (any shape). A sample in a zero-probability cell is an
    outright failure (0.0); cells expecting fewer than MIN_EXPECTED samples are pooled."""
    counts, probs = counts.ravel().astype(float), probs.ravel() / probs.sum()
    if counts[probs <= 0].sum() > 0:
        return 0.0
    counts, probs = counts[probs > 0], probs[probs > 0]
    expected = probs * counts.sum()
    big = expected >= MIN_EXPECTED
    observed_bins = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    expected_bins = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    return float(chisquare(observed_bins, expected_bins).pvalue)


def sample(engine: Engine, params: SamplingParams, max_tokens: int, num_samples: int, first_seed: int,
           prompt: list[int] = PROMPT):
    """num_samples outputs of `prompt` with seeds first_seed, first_seed + 1, ..."""
    outs = []
    for start in range(0, num_samples, BATCH):
        seeds = range(first_seed + start, first_seed + min(start + BATCH, num_samples))
        batch_params = [SamplingParams(params.temperature, params.top_p, params.top_k, seed) for seed in seeds]
        outs += engine.generate_batch_ids([prompt] * len(batch_params), params=batch_params, max_tokens=max_tokens)
    return outs


@pytest.mark.parametrize("draft_length, max_tokens", [(2, 3), (3, 4)])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_engine_output_follows_the_verifier_distribution(verifier, drafter_model, setting, draft_length, max_tokens):
    params = SETTINGS[setting]
    p1, joint = exact_distributions(verifier, params)
    engine = make_engine(verifier, drafter_model, draft_length)
    first_seed = 1_000_000 * (draft_length + 10 * list(SETTINGS).index(setting))
    outs = sample(engine, params, max_tokens, NUM_SAMPLES, first_seed)
    assert len(outs) == NUM_SAMPLES
    assert all(len(o.token_ids) == max_tokens and o.finish_reason == "length" for o in outs)

    first = np.bincount([o.token_ids[0] for o in outs], minlength=VOCAB)
    pairs = np.zeros((VOCAB, VOCAB))
    for o in outs:
        pairs[o.token_ids[1], o.token_ids[2]] += 1
    first_pvalue = chi2_pvalue(first, p1)
    joint_pvalue = chi2_pvalue(pairs, joint)
    assert first_pvalue > PVALUE_OK, f"first token: p-value {first_pvalue:.2e}, counts {first.tolist()}"
    assert joint_pvalue > PVALUE_OK, f"(second, third): p-value {joint_pvalue:.2e}"

    # The machinery was exercised: drafts were both accepted and rejected ...
    drafted = sum(o.stats.drafted_tokens for o in outs)
    accepted = sum(o.stats.accepted_tokens for o in outs)
    assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)
    first_round = Counter(len(o.stats.accepted_by_position) for o in outs)
    if max_tokens == 4:  # ... at both positions of a two-draft round
        assert first_round[2] > 0 and first_round[1] > 0 and first_round[0] > 0, first_round

    # Negative control: the drafter's own q is far from p, and this check would say so.
    _, _, q = draft_distribution(last_logits(drafter_model, [PROMPT])[0], params, engine.config.draft_top_k,
                                 torch.tensor(0.5))
    q1 = np.zeros(VOCAB)
    q1[list(q.token_ids)] = q.probs
    assert 0.5 * np.abs(q1 - p1).sum() > 0.2
    samples_of_q = np.random.default_rng(0).multinomial(NUM_SAMPLES, q1 / q1.sum())
    assert chi2_pvalue(samples_of_q, p1) < 1e-6


REPEATING_PROMPT = [1, 5, 7, 4, 1, 5, 7, 2, 5, 7]  # many bigrams to copy from


def test_engine_output_follows_the_verifier_distribution_with_context_copies(verifier, drafter_model):
    """Drafts that are copies from the context (q the point mass on the copy), mixed with the
    model's sampled drafts in the same rounds: the output still follows the verifier."""
    params = SETTINGS["T1"]
    p1, joint = exact_distributions(verifier, params, REPEATING_PROMPT)
    engine = make_engine(verifier, drafter_model, draft_length=3, context_copy=ContextCopyRule(below_probability=2.0))
    outs = sample(engine, params, 4, NUM_SAMPLES, 7_000_000, REPEATING_PROMPT)
    first = np.bincount([o.token_ids[0] for o in outs], minlength=VOCAB)
    pairs = np.zeros((VOCAB, VOCAB))
    for o in outs:
        pairs[o.token_ids[1], o.token_ids[2]] += 1
    assert chi2_pvalue(first, p1) > PVALUE_OK
    assert chi2_pvalue(pairs, joint) > PVALUE_OK
    drafted = sum(o.stats.drafted_tokens for o in outs)
    accepted = sum(o.stats.accepted_tokens for o in outs)
    copied = engine.drafter.num_copied_tokens
    assert 0.2 * drafted < copied < drafted, (copied, drafted)  # both kinds of draft, often
    assert 0.1 < accepted / drafted < 0.9, (accepted, drafted)


# ---- seeded reproducibility ------------------------------------------------------------------
REPRO_SEEDS = list(range(40))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_same_seed_same_output(verifier, drafter_model, setting):
    params = SETTINGS[setting]
    engine = make_engine(verifier, drafter_model, draft_length=3, num_slots=64)
    batch = [SamplingParams(params.temperature, params.top_p, params.top_k, seed) for seed in REPRO_SEEDS]
    once = engine.generate_batch_ids([PROMPT] * len(batch), params=batch, max_tokens=10)
    twice = engine.generate_batch_ids([PROMPT] * len(batch), params=batch, max_tokens=10)
    assert [o.token_ids for o in once] == [o.token_ids for o in twice]
    # Different seeds give different outputs (not all the same sequence).
    assert len({tuple(o.token_ids) for o in once}) > len(REPRO_SEEDS) // 2

    # Batch composition and order do not matter either: every random draw depends only on
    # (seed, position), never on which other sessions shared the round.
    fresh = make_engine(verifier, drafter_model, draft_length=3, num_slots=64)
    reordered = list(reversed(batch))
    prompts = [PROMPT if i % 2 else PROMPT + [3] for i in range(len(reordered))]  # interleave other prompts
    mixed = fresh.generate_batch_ids(prompts, params=reordered, max_tokens=10)
    by_seed = {sp.seed: o.token_ids for sp, o, p in zip(reordered, mixed, prompts) if p == PROMPT}
    assert by_seed and all(by_seed[seed] == once[REPRO_SEEDS.index(seed)].token_ids for seed in by_seed)
    alone = fresh.generate_batch_ids([PROMPT], params=[batch[5]], max_tokens=10)[0]
    assert alone.token_ids == once[5].token_ids


def test_seeded_output_does_not_depend_on_a_first_unseeded_run(verifier, drafter_model):
    engine = make_engine(verifier, drafter_model, draft_length=2, num_slots=8)
    unseeded = engine.generate_batch_ids([PROMPT] * 8, params=SamplingParams(temperature=1.0), max_tokens=10)
    assert all(len(o.token_ids) == 10 for o in unseeded)
    seeded = SamplingParams(temperature=1.0, seed=12345)
    a = engine.generate_batch_ids([PROMPT], params=seeded, max_tokens=10)[0].token_ids
    b = make_engine(verifier, drafter_model, draft_length=2, num_slots=8).generate_batch_ids(
        [PROMPT], params=seeded, max_tokens=10)[0].token_ids
    assert a == b
