"""Bad input is refused with a typed error (specmesh.errors) and a message that says what to fix,
before anything runs; the engine keeps serving afterwards."""

from __future__ import annotations

import pytest
import torch

from specmesh.engine import Engine, EngineConfig, build_drafter
from specmesh.errors import (
    InvalidRequestError,
    ModelReferenceError,
    SpecmeshError,
    TokenizerMismatchError,
)
from specmesh.model_loading import load_causal_lm
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import PAD_ID, make_tiny_llama, make_tiny_tokenizer, save_tiny_model

VOCAB = 64
MAX_CONTEXT = 32
PROMPT = [1, 10, 11, 12]


@pytest.fixture(scope="module")
def verifier() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, seed=0)


@pytest.fixture(scope="module")
def engine(verifier) -> Engine:
    config = EngineConfig(num_slots=4, max_context=MAX_CONTEXT, draft_length=3, max_tokens_limit=20)
    return Engine(verifier, make_tiny_tokenizer(VOCAB), build_drafter("layers:1", verifier, None, config), config,
                  stop_token_ids=[])


def greedy_reference(verifier, prompt: list[int], n: int) -> list[int]:
    input_ids = torch.tensor([prompt])
    out = verifier.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=PAD_ID)
    return out[0, len(prompt):].tolist()


# ---- requests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, params, max_tokens, match",
    [
        ([], SamplingParams(), 5, "prompt must not be empty"),
        (PROMPT, SamplingParams(), 0, "max_tokens must be a positive integer"),
        (PROMPT, SamplingParams(), -3, "max_tokens must be a positive integer"),
        (PROMPT, SamplingParams(), 21, "exceeds this deployment's limit of 20"),
        (PROMPT, SamplingParams(temperature=-0.5), 5, "temperature must be >= 0"),
        (PROMPT, SamplingParams(temperature=float("nan")), 5, "temperature must be a number"),
        (PROMPT, SamplingParams(temperature=float("inf")), 5, "temperature must be >= 0 and finite"),
        (PROMPT, SamplingParams(temperature=1.0, top_p=0.0), 5, r"top_p must be in \(0, 1\], got 0.0"),
        (PROMPT, SamplingParams(temperature=1.0, top_p=-0.1), 5, r"top_p must be in \(0, 1\]"),
        (PROMPT, SamplingParams(temperature=1.0, top_p=1.5), 5, r"top_p must be in \(0, 1\], got 1.5"),
        (PROMPT, SamplingParams(top_k=-1), 5, "top_k must be >= 0"),
        (PROMPT, SamplingParams(seed=-1), 5, "seed must be in"),
        ([1, VOCAB], SamplingParams(), 5, r"prompt token ids must lie in \[0, 64\)"),
        ([-1], SamplingParams(), 5, "prompt token ids"),
        ([1] * 20, SamplingParams(), 13, r"prompt \(20 tokens\) \+ max_tokens \(13\) exceeds the context limit of 32"),
        ([1] * MAX_CONTEXT, SamplingParams(), 1, "exceeds the context limit"),
    ],
)
def test_invalid_request(engine, prompt, params, max_tokens, match):
    with pytest.raises(InvalidRequestError, match=match) as info:
        engine.generate_batch_ids([prompt], params=params, max_tokens=max_tokens)
    assert isinstance(info.value, SpecmeshError) and isinstance(info.value, ValueError)


def test_invalid_max_draft_tokens(engine):
    with pytest.raises(InvalidRequestError, match="max_draft_tokens must be >= 0"):
        engine.generate_batch_ids([PROMPT], max_tokens=5, max_draft_tokens=-1)


def test_empty_text_prompt(engine):
    with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
        engine.generate("")
    with pytest.raises(InvalidRequestError, match="prompt must not be empty"):
        engine.generate(None)


def test_context_limit_is_inclusive(engine, verifier):
    prompt = [1] + [5] * 19
    out = engine.generate_batch_ids([prompt], max_tokens=MAX_CONTEXT - len(prompt))[0]
    assert out.token_ids == greedy_reference(verifier, prompt, MAX_CONTEXT - len(prompt))
    assert out.finish_reason == "length"


def test_engine_keeps_serving_after_errors(engine, verifier):
    with pytest.raises(InvalidRequestError):
        engine.generate_batch_ids([PROMPT, []], max_tokens=5)  # one bad request in a batch
    with pytest.raises(InvalidRequestError):
        engine.generate_batch_ids([PROMPT], params=SamplingParams(temperature=1.0, top_p=2.0), max_tokens=5)
    outs = engine.generate_batch_ids([PROMPT, [1, 7]], max_tokens=8)
    assert [o.token_ids for o in outs] == [greedy_reference(verifier, PROMPT, 8), greedy_reference(verifier, [1, 7], 8)]


# ---- model references -----------------------------------------------------------------------
def test_unknown_model_reference():
    with pytest.raises(ModelReferenceError, match="no-such-model-xyz"):
        Engine.from_refs("no-such-model-xyz")


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelReferenceError, match="does not exist"):
        Engine.from_refs(str(tmp_path / "absent-model"))


@pytest.mark.parametrize("ref", ["layers:0", "layers:-2", "layers:x", "layers:"])
def test_bad_early_exit_reference(verifier, ref):
    with pytest.raises(ModelReferenceError, match="positive layer count"):
        build_drafter(ref, verifier, None, EngineConfig())


def test_early_exit_needs_fewer_layers_than_the_verifier(verifier):
    with pytest.raises(ModelReferenceError, match="fewer layers than the verifier's 2"):
        build_drafter("layers:2", verifier, None, EngineConfig())


def test_unknown_drafter_reference(verifier):
    with pytest.raises(ModelReferenceError, match="no-such-drafter-xyz"):
        build_drafter("no-such-drafter-xyz", verifier, make_tiny_tokenizer(VOCAB), EngineConfig())


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "verifier": str(save_tiny_model(root / "verifier", VOCAB, seed=1)),
        "same-tokenizer": str(save_tiny_model(root / "same-tokenizer", VOCAB, layers=1, seed=2)),
        "other-tokenizer": str(save_tiny_model(root / "other-tokenizer", VOCAB, seed=3, token_prefix="x")),
        "smaller-tokenizer": str(save_tiny_model(root / "smaller-tokenizer", VOCAB, seed=4, tokenizer_vocab_size=48)),
    }


@pytest.mark.parametrize("drafter", ["other-tokenizer", "smaller-tokenizer"])
def test_mismatched_tokenizers(saved_models, drafter):
    loaded = load_causal_lm(saved_models["verifier"])
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer") as info:
        build_drafter(saved_models[drafter], loaded.model, loaded.tokenizer, EngineConfig())
    assert "verifier" in str(info.value) and "drafter" in str(info.value)


def test_matching_tokenizers_build_a_model_drafter(saved_models):
    loaded = load_causal_lm(saved_models["verifier"])
    drafter = build_drafter(saved_models["same-tokenizer"], loaded.model, loaded.tokenizer,
                            EngineConfig(num_slots=2, max_context=32))
    assert drafter is not None and drafter.runner.vocab_size == VOCAB


def test_an_unknown_policy_is_refused_and_the_adaptive_one_is_exact(verifier):
    with pytest.raises(ValueError, match="policy must be 'adaptive' or 'fixed'"):
        Engine(verifier, make_tiny_tokenizer(VOCAB), None, EngineConfig(num_slots=4, max_context=MAX_CONTEXT,
                                                                        policy="greedy"))
    config = EngineConfig(num_slots=4, max_context=MAX_CONTEXT, policy="adaptive", max_tokens_limit=20)
    adaptive = Engine(verifier, make_tiny_tokenizer(VOCAB), build_drafter("layers:1", verifier, None, config), config,
                      stop_token_ids=[])
    out = adaptive.generate_batch_ids([PROMPT], params=SamplingParams(), max_tokens=16)[0]
    assert out.token_ids == greedy_reference(verifier, PROMPT, 16)
