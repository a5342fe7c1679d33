"""Context copying in the model drafter (drafter/context_copy.py): the bigram index finds what
prompt lookup finds, it stays right through cuts, and the drafter copies where (and only where)
the rule says, with q the point mass on the copied token."""

from __future__ import annotations

import random

import pytest
import torch

from drafter.context_copy import MAX_CANDIDATES, ContextCopyRule, NgramIndex
from drafter.drafting import ModelDrafter
from drafter.prompt_lookup import find_continuation
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftRequest
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

VOCAB = 32


def _reference(tokens, max_ngram, min_ngram):
    follow, n = find_continuation(tokens, max_ngram, min_ngram, 1)
    return (follow[0], n) if follow else None


@pytest.mark.parametrize("alphabet", [3, 6, 20])
def test_index_finds_what_prompt_lookup_finds_through_growth_and_cuts(alphabet):
    rng = random.Random(alphabet)
    tokens: list[int] = []
    index = NgramIndex()
    checked = 0
    for _ in range(600):
        if tokens and rng.random() < 0.15:  # a cut (rejected drafts), sometimes rewritten after
            cut = rng.randrange(len(tokens))
            del tokens[cut:]
            index.truncate(cut)
        tokens += [rng.randrange(alphabet) for _ in range(rng.randint(1, 4))]
        index.extend(tokens)
        for max_ngram, min_ngram in ((4, 2), (3, 3), (5, 2)):
            want = _reference(tokens, max_ngram, min_ngram)
            if want is None or len(tokens) < 3 * MAX_CANDIDATES:  # few occurrences: an exact match
                assert index.continuation(tokens, max_ngram, min_ngram) == want, (tokens, max_ngram, min_ngram)
                checked += 1
    assert checked > 500
    # The index equals one built from scratch, whatever cuts came before.
    fresh = NgramIndex()
    fresh.extend(tokens)
    assert fresh.positions == index.positions and fresh.keys == index.keys


def test_rule_rejects_bad_settings():
    with pytest.raises(ValueError, match="min_ngram"):
        ContextCopyRule(min_ngram=1)
    with pytest.raises(ValueError, match="min_ngram"):
        ContextCopyRule(min_ngram=4, max_ngram=3)
    with pytest.raises(ValueError, match="below_probability"):
        ContextCopyRule(below_probability=0.0)
    with pytest.raises(ValueError, match="confidence_by_ngram"):
        ContextCopyRule(confidence_by_ngram=(0.5, 1.5))
    rule = ContextCopyRule()
    assert [rule.confidence(n) for n in (2, 3, 8, 20)] == [0.45, 0.55, 0.88, 0.88]


def _drafter(rule: ContextCopyRule | None, seed: int = 5) -> ModelDrafter:
    model = make_tiny_llama(VOCAB, hidden=32, layers=1, heads=4, kv_heads=2, seed=seed)
    return ModelDrafter(ModelRunner(model, 4, 128), draft_top_k=8, context_copy=rule)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=9)],
                         ids=["greedy", "sampled"])
def test_drafter_copies_where_the_context_repeats_and_the_model_is_unsure(params):
    # A random tiny model is unsure everywhere (top probability far below 0.9), so with a
    # repeating context every drafted token is the copy: the cycle continues.
    cycle = [3, 9, 14, 21, 7]
    history = cycle * 3 + cycle[:2]
    drafter = _drafter(ContextCopyRule())
    chunk = drafter.draft([DraftRequest("s", 0, tuple(history), 6, params)])[0]
    want = [cycle[(2 + i) % len(cycle)] for i in range(6)]
    assert list(chunk.tokens) == want
    assert all(q.token_ids == (t,) and q.probs == (1.0,) for q, t in zip(chunk.distributions, want))
    # Confidence rises with the match's length; the history repeats a 5-token cycle, so every
    # match here is as long as the rule reads (8 tokens).
    assert all(c == ContextCopyRule().confidence(8) for c in chunk.confidences)
    assert drafter.num_copied_tokens == 6
    # The model alone drafts something else, and a confident model is never overridden.
    plain = _drafter(None).draft([DraftRequest("s", 0, tuple(history), 6, params)])[0]
    assert list(plain.tokens) != want
    never = _drafter(ContextCopyRule(below_probability=1e-9))
    assert never.draft([DraftRequest("s", 0, tuple(history), 6, params)])[0].tokens == plain.tokens
    assert never.num_copied_tokens == 0


def test_copies_follow_the_committed_sequence_after_a_rejection():
    """After the verifier rejects a copy, the path (and its index) is cut there: the next
    draft copies from the committed text, as a fresh drafter given the same history would."""
    rule = ContextCopyRule(below_probability=2.0)  # copy wherever the context matches
    drafter = _drafter(rule)
    history = [3, 9, 14, 21, 7, 3, 9, 14, 21, 7, 3, 9]
    first = drafter.draft([DraftRequest("s", 0, tuple(history), 4, SamplingParams())])[0]
    assert list(first.tokens) == [14, 21, 7, 3]
    committed = history + [14, 5]  # first draft accepted, the second replaced by a correction
    later = drafter.draft([DraftRequest("s", len(history) + 1, (5,), 4, SamplingParams())])[0]
    fresh = _drafter(rule).draft([DraftRequest("s", 0, tuple(committed), 4, SamplingParams())])[0]
    assert later.tokens == fresh.tokens and later.confidences == fresh.confidences


def test_training_evaluation_scores_what_a_copying_drafter_would_agree_on():
    """train-drafter's report (context_copy_agreement): on text that repeats its context, an
    unsure model with copying agrees where the model alone does not."""
    from specmesh.drafter_training.data import Sample
    from specmesh.drafter_training.evaluate import context_copy_agreement

    model = make_tiny_llama(VOCAB, hidden=32, layers=1, heads=4, kv_heads=2, seed=5)
    cycle = [3, 9, 14, 21, 7]
    text = cycle * 6
    sample = Sample(tuple(text), prompt_length=10)
    scored = context_copy_agreement(model, [sample])
    never = context_copy_agreement(model, [sample], ContextCopyRule(below_probability=1e-9))
    assert scored["copied_share"] == 1.0 and scored["copies_right"] == 1.0 and scored["top1_agreement"] == 1.0
    assert never["copied_share"] == 0.0 and never["top1_agreement"] < 0.5
