"""The benchmark-only controlled-acceptance drafter (drafter/controlled_acceptance.py).

It runs the model but proposes a registered reference continuation, each token kept with
probability alpha (keyed by session and position, so re-drafting and drafting ahead agree).
"""

from __future__ import annotations

import random

import pytest
import torch

from drafter.controlled_acceptance import ControlledAcceptanceDrafter
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftRequest
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

VOCAB = 64


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=5)


def drafter(model) -> ControlledAcceptanceDrafter:
    return ControlledAcceptanceDrafter(ModelRunner(model, 8, 256), draft_top_k=4)


def reference(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_proposals_follow_the_reference_with_probability_alpha(model, alpha):
    core = drafter(model)
    kept = total = 0
    for i in range(6):
        sid, ref = f"s{i}", reference(200, seed=i)
        core.register(sid, ref, alpha)
        prompt = 10
        chunk = core.draft([DraftRequest(sid, 0, tuple(ref[:prompt]), 30, SamplingParams())])[0]
        assert len(chunk.tokens) == 30
        for position, token in enumerate(chunk.tokens, start=prompt):
            kept += token == ref[position]
            total += 1
            assert 0 <= token < VOCAB
        assert all(q.token_ids == (t,) and q.probs == (1.0,) for q, t in zip(chunk.distributions, chunk.tokens))
        assert chunk.confidences == (alpha,) * 30
    assert kept / total == pytest.approx(alpha, abs=0.12)


def test_redrafting_and_drafting_ahead_propose_the_same_tokens(model):
    ref = reference(100, seed=9)
    a, b = drafter(model), drafter(model)
    for core in (a, b):
        core.register("s", ref, 0.7)
    first = a.draft([DraftRequest("s", 0, tuple(ref[:12]), 8, SamplingParams())])[0]
    b.draft([DraftRequest("s", 0, tuple(ref[:12]), 2, SamplingParams())])
    b.draft_ahead(["s"], 6)
    again = b.draft([DraftRequest("s", 0, tuple(ref[:12]), 8, SamplingParams())])[0]
    assert again.tokens == first.tokens


def test_unregistered_sessions_draft_with_the_model(model):
    core = drafter(model)
    chunk = core.draft([DraftRequest("x", 0, (1, 2, 3), 4, SamplingParams())])[0]
    assert len(chunk.tokens) == 4 and chunk.distributions[0].token_ids[0] == chunk.tokens[0]
    assert core.num_proposed == 0
