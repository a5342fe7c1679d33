"""bfloat16 on CPU: verifying drafts commits exactly what decoding alone would.

In float32 a token's logits differ between a forward of 1 token and one of 5 only far below any
argmax gap. In bfloat16 they do not (SmolLM2: 2-5% of greedy tokens flipped), because the CPU
kernels round differently with the number of rows (matrix-vector for one, matrix for more) and
attention's result for a query depends on the key length and the other queries of the call.
The runner's batch-invariant layout (PackedForward.batch_invariant) makes each token's result
the same bits whatever shares its forward; these tests hold it to that, bit for bit, on a
model wide enough that bfloat16 rounding shows.
"""

from __future__ import annotations

import random

import pytest
import torch

from drafter.drafting import ModelDrafter
from specmesh.engine import Engine, EngineConfig
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

VOCAB = 256
MAX_CONTEXT = 200


def bf16_llama(seed: int) -> torch.nn.Module:
    model = make_tiny_llama(VOCAB, hidden=256, layers=2, heads=4, kv_heads=2, seed=seed)
    with torch.no_grad():
        # Close logits: the top two often within bfloat16's rounding of each other, as in a
        # real vocabulary, so that any rounding that depends on the batch flips some argmax.
        model.lm_head.weight.mul_(0.05)
    return model.to(torch.bfloat16)


@pytest.fixture(scope="module")
def verifier() -> torch.nn.Module:
    return bf16_llama(5)


def logits_fed(runner: ModelRunner, context: list[int], follow: list[int], chunk: int,
               neighbour: list[int] | None = None) -> torch.Tensor:
    """Logits of every token of `follow`, fed `chunk` tokens a forward after `context` (slot 0),
    optionally beside another session (slot 1) that feeds as many tokens in the same forwards."""
    for slot in (0, 1):
        runner.cache.end_forward([slot], [0])
    runner.forward_flat([ForwardRequest(0, context, logits_from=len(context) - 1)])
    if neighbour is not None:
        runner.forward_flat([ForwardRequest(1, neighbour[:7], logits_from=6)])
    rows = []
    for start in range(0, len(follow), chunk):
        requests = [ForwardRequest(0, follow[start:start + chunk], logits_from=0)]
        if neighbour is not None:
            requests.append(ForwardRequest(1, neighbour[7 + start:7 + start + chunk], logits_from=0))
        logits, counts = runner.forward_flat(requests)
        rows.append(logits[:counts[0]])
    return torch.cat(rows)


def test_a_tokens_logits_are_the_same_bits_whatever_shares_its_forward(verifier):
    runner = ModelRunner(verifier, num_slots=2, max_tokens=MAX_CONTEXT)
    assert runner.packed is not None and runner.packed.batch_invariant
    rng = random.Random(0)
    context = [rng.randrange(4, VOCAB) for _ in range(40)]
    follow = [rng.randrange(4, VOCAB) for _ in range(24)]
    neighbour = [rng.randrange(4, VOCAB) for _ in range(40)]
    alone = logits_fed(runner, context, follow, 1)
    for chunk in (2, 3, 5, 8):
        assert torch.equal(logits_fed(runner, context, follow, chunk), alone), chunk
    assert torch.equal(logits_fed(runner, context, follow, 4, neighbour), alone)


@pytest.mark.parametrize("draft_length", [1, 3, 6])
def test_speculation_on_commits_exactly_what_speculation_off_does(verifier, draft_length):
    """Many prompts at once through the engine, drafted by an unrelated bfloat16 model (so drafts
    are rejected at every position) and by the verifier itself (accepted): the greedy output
    equals the same engine's without drafting, token for token."""
    rng = random.Random(3)
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in (1, 9, 30, 4, 17, 50)]
    config = EngineConfig(num_slots=8, max_context=MAX_CONTEXT, draft_length=draft_length)
    plain = Engine(verifier, None, None, config).generate_batch_ids(prompts, params=SamplingParams(), max_tokens=80)
    for drafter_model in (bf16_llama(77), verifier):
        drafter = ModelDrafter(ModelRunner(drafter_model, 8, MAX_CONTEXT))
        outs = Engine(verifier, None, drafter, config).generate_batch_ids(prompts, params=SamplingParams(),
                                                                           max_tokens=80)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        accepted = sum(o.stats.accepted_tokens for o in outs)
        assert accepted > 0 if drafter_model is verifier else accepted < sum(o.stats.drafted_tokens for o in outs)
