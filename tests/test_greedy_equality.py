"""Greedy exactness of the whole engine: token-identical to HF `generate` of the verifier.

Many prompts of different lengths (1..40 tokens) run concurrently through one Engine, so every
round verifies a ragged batch of sessions at different positions. Whatever drafts (the verifier
itself, an unrelated model, an early-exit copy, prompt lookup, nothing), whatever the draft
length, and whatever goes wrong underneath (drafter or verifier losing sessions, fewer KV slots
than sessions), the output must be exactly HF's greedy continuation of each prompt.

Everything is float32 on tiny random Llamas built here, so batched and unbatched kernels agree
far below any argmax gap. The HF references are computed once per module.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import pytest
import torch

from drafter.context_copy import ContextCopyRule
from drafter.drafting import ModelDrafter
from drafter.prompt_lookup import PromptLookupDrafter
from scheduler.session import FINISH_LENGTH, FINISH_STOP
from specmesh.engine import Engine, EngineConfig, GenerationOutput, build_drafter
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftChunk, DraftRequest, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import PAD_ID, make_tiny_llama

VOCAB = 64
MAX_TOKENS = 24
MAX_CONTEXT = 96
NUM_SLOTS = 16
DRAFT_LENGTHS = list(range(1, 9))
GREEDY = SamplingParams()


def _make_prompts() -> list[list[int]]:
    rng = random.Random(1234)
    lengths = [1, 40, 2, 7, 13, 25, 33, 5, 19, 1, 38, 10]
    prompts = [[rng.randrange(4, VOCAB) for _ in range(n)] for n in lengths]
    # A repetitive prompt gives prompt lookup something to copy.
    prompts[3] = [10, 11, 12, 13, 10, 11, 12]
    prompts[9] = [1]  # BOS only
    return prompts


PROMPTS = _make_prompts()


@pytest.fixture(scope="module")
def verifier() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=11)


@pytest.fixture(scope="module")
def unrelated_model() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=99)


@pytest.fixture(scope="module")
def references(verifier) -> list[list[int]]:
    """HF greedy continuation of every prompt, MAX_TOKENS long, no early stop."""
    refs = []
    for prompt in PROMPTS:
        input_ids = torch.tensor([prompt])
        with torch.no_grad():
            out = verifier.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                min_new_tokens=MAX_TOKENS,
                eos_token_id=None,
                pad_token_id=PAD_ID,
            )
        refs.append(out[0, len(prompt):].tolist())
        assert len(refs[-1]) == MAX_TOKENS
    return refs


def model_drafter(model: torch.nn.Module, num_slots: int = NUM_SLOTS) -> ModelDrafter:
    return ModelDrafter(ModelRunner(model, num_slots, MAX_CONTEXT))


def make_engine(verifier, drafter, draft_length: int, num_slots: int = NUM_SLOTS,
                stop_token_ids: Sequence[int] = ()) -> Engine:
    config = EngineConfig(num_slots=num_slots, max_context=MAX_CONTEXT, draft_length=draft_length)
    return Engine(verifier, None, drafter, config, stop_token_ids=list(stop_token_ids))


def run(engine: Engine, **options) -> list[GenerationOutput]:
    return engine.generate_batch_ids(PROMPTS, params=GREEDY, max_tokens=MAX_TOKENS, **options)


def assert_exact(outs: list[GenerationOutput], refs: list[list[int]]) -> None:
    assert len(outs) == len(refs)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        if out.token_ids != ref:
            first = next((j for j, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b),
                         min(len(out.token_ids), len(ref)))
            pytest.fail(f"prompt {i} (length {len(PROMPTS[i])}): engine differs from HF greedy at output "
                        f"position {first}\n engine {out.token_ids}\n     HF {ref}")
        assert out.finish_reason == FINISH_LENGTH, f"prompt {i}: finish_reason {out.finish_reason!r}"


def totals(outs: list[GenerationOutput]) -> tuple[int, int]:
    return sum(o.stats.drafted_tokens for o in outs), sum(o.stats.accepted_tokens for o in outs)


def test_references_are_not_trivial(references):
    # A constant continuation would make "exact" cheap; random tiny models vary enough.
    assert len({tuple(r) for r in references}) > len(references) // 2
    assert all(len(set(r)) > 1 for r in references)


# ---- (a)-(e): drafters ----------------------------------------------------------------------
@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_drafter_equal_to_verifier_accepts_everything(verifier, references, draft_length):
    engine = make_engine(verifier, model_drafter(verifier), draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    for out in outs:
        assert out.stats.drafted_tokens > 0
        assert out.stats.accepted_tokens == out.stats.drafted_tokens, out.stats
        # The first round prefills (one token; the drafter prefills beside it), then every round
        # commits draft_length + 1 tokens (the last round what is left).
        assert out.stats.rounds == 1 + math.ceil((MAX_TOKENS - 1) / (draft_length + 1)), out.stats


@pytest.mark.parametrize("drafter_kind", ["same", "unrelated"])
def test_adaptive_policy_repeating_a_steady_decision(verifier, unrelated_model, references, drafter_kind):
    """The adaptive policy repeats a steady decision (BudgetConfig.steady_rounds) without
    planning: those rounds verify every drafted token. Output stays the verifier's greedy text."""
    from scheduler.budget_policy import AdaptiveBudgetPolicy, BudgetConfig
    from scheduler.calibration import CalibrationConfig
    from scheduler.calibration_store import InMemoryCalibrationStore
    from scheduler.cost_model import CostProfile

    drafter_model = verifier if drafter_kind == "same" else unrelated_model
    engine = make_engine(verifier, model_drafter(drafter_model), 4)
    # A launch-bound cost curve (drafting always pays) and repeats after one steady round.
    policy = AdaptiveBudgetPolicy(InMemoryCalibrationStore(CalibrationConfig()), CostProfile.flat(0.030), "pair", 4,
                                  config=BudgetConfig(measure_timing=False, steady_rounds=1, repeat_rounds=1000))
    engine._policy = policy  # before the first generate builds the speculation loop
    outs = run(engine)
    assert_exact(outs, references)
    assert policy.num_repeated_rounds > 0
    drafted, accepted = totals(outs)
    assert drafted > 0 and (accepted == drafted if drafter_kind == "same" else accepted < drafted)


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_unrelated_drafter(verifier, unrelated_model, references, draft_length):
    engine = make_engine(verifier, model_drafter(unrelated_model), draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    drafted, accepted = totals(outs)
    assert drafted > 0
    assert accepted / drafted < 0.25, (accepted, drafted)


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_model_drafter_copying_from_context(verifier, unrelated_model, references, draft_length):
    """Copies (drafter/context_copy.py) in place of the model's tokens, wherever the context
    repeats (a rule that always copies, so copies are most of the drafts): output stays exact."""
    drafter = ModelDrafter(ModelRunner(unrelated_model, NUM_SLOTS, MAX_CONTEXT),
                           context_copy=ContextCopyRule(below_probability=2.0))
    outs = run(make_engine(verifier, drafter, draft_length))
    assert_exact(outs, references)
    assert drafter.num_copied_tokens > 0
    # Copies are better drafts than the unrelated model's own tokens on the same text.
    drafted, accepted = totals(outs)
    plain_drafted, plain_accepted = totals(run(make_engine(verifier, model_drafter(unrelated_model), draft_length)))
    assert accepted / drafted > plain_accepted / plain_drafted, (accepted, drafted, plain_accepted, plain_drafted)


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_early_exit_drafter(verifier, references, draft_length):
    config = EngineConfig(num_slots=NUM_SLOTS, max_context=MAX_CONTEXT, draft_length=draft_length)
    drafter = build_drafter("layers:1", verifier, None, config)
    assert isinstance(drafter, ModelDrafter)
    assert len(drafter.runner.model.get_decoder().layers) == 1
    assert len(verifier.get_decoder().layers) == 2  # the verifier itself is untouched
    assert verifier.config.num_hidden_layers == 2 and drafter.runner.config.num_hidden_layers == 1
    outs = run(Engine(verifier, None, drafter, config, stop_token_ids=[]))
    assert_exact(outs, references)
    assert totals(outs)[0] > 0


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_prompt_lookup_drafter(verifier, references, draft_length):
    engine = make_engine(verifier, PromptLookupDrafter(), draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    assert totals(outs)[0] > 0


@pytest.mark.parametrize("drafter_ref", ["none", "off"])
def test_no_drafter(verifier, references, drafter_ref):
    config = EngineConfig(num_slots=NUM_SLOTS, max_context=MAX_CONTEXT, draft_length=4)
    assert build_drafter(drafter_ref, verifier, None, config) is None
    outs = run(make_engine(verifier, None, draft_length=4))
    assert_exact(outs, references)
    for out in outs:
        assert out.stats.drafted_tokens == 0
        assert out.stats.rounds == MAX_TOKENS


class RecordingDrafter:
    """Passes calls through to a drafter and keeps every (request, chunk) pair."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = "recording"
        self.calls: list[tuple[DraftRequest, DraftChunk]] = []
        self.num_rollbacks = 0  # requests that rolled drafted positions out of a model drafter's slot

    @property
    def num_sessions(self) -> int:
        return self.inner.num_sessions

    def release(self, session_ids: Sequence[str]) -> int:
        return self.inner.release(session_ids)

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        slots = getattr(self.inner, "slots", None)
        if slots is not None:
            self.num_rollbacks += sum(
                r.session_id in slots and r.num_cached_tokens < slots.cached_length(r.session_id) for r in requests
            )
        chunks = self.inner.draft(requests)
        self.calls += list(zip(requests, chunks))
        return chunks


@torch.no_grad()
def plain_greedy(model: torch.nn.Module, context: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by full forwards over the whole sequence: no cache at all."""
    tokens = list(context)
    for _ in range(num_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(context):]


@pytest.mark.parametrize("draft_length", [2, 5])
def test_drafter_rolls_back_rejected_drafts(verifier, references, draft_length):
    """A near copy of the verifier drafts well but not perfectly, so its slots are rolled back
    after every rejection. Each chunk must be exactly the drafter model's own greedy
    continuation of the committed tokens: stale rejected positions must never leak in."""
    import copy

    near_copy = copy.deepcopy(verifier)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        weight = near_copy.lm_head.weight
        weight.add_(torch.randn_like(weight) * weight.std() * 0.3)
    drafter = RecordingDrafter(model_drafter(near_copy))
    engine = make_engine(verifier, drafter, draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    drafted, accepted = totals(outs)
    assert 0.2 < accepted / drafted < 0.95, (accepted, drafted)  # rejections did happen
    session_prompt: dict[str, int] = {}
    for request, chunk in drafter.calls:
        assert not chunk.cache_miss
        if request.session_id not in session_prompt:  # first request: the whole prompt
            session_prompt[request.session_id] = PROMPTS.index(list(request.new_tokens))
        i = session_prompt[request.session_id]
        context = PROMPTS[i] + references[i][: chunk.base_length - len(PROMPTS[i])]
        assert chunk.tokens == tuple(plain_greedy(near_copy, context, len(chunk.tokens))), (i, chunk)
    assert drafter.num_rollbacks > 0


# ---- (f): per-request options ---------------------------------------------------------------
@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_disable_speculation(verifier, references, draft_length):
    drafter = model_drafter(verifier)
    outs = run(make_engine(verifier, drafter, draft_length), disable_speculation=True)
    assert_exact(outs, references)
    for out in outs:
        assert out.stats.drafted_tokens == 0
        assert out.stats.rounds == MAX_TOKENS


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
@pytest.mark.parametrize("max_draft_tokens", [0, 1, 3])
def test_max_draft_tokens(verifier, references, draft_length, max_draft_tokens):
    outs = run(make_engine(verifier, model_drafter(verifier), draft_length), max_draft_tokens=max_draft_tokens)
    assert_exact(outs, references)
    per_round = min(draft_length, max_draft_tokens)
    for out in outs:
        assert out.stats.accepted_tokens == out.stats.drafted_tokens
        assert len(out.stats.accepted_by_position) == per_round
        # The first round prefills (drafts verified from the second round on).
        expected = MAX_TOKENS if per_round == 0 else 1 + math.ceil((MAX_TOKENS - 1) / (per_round + 1))
        assert out.stats.rounds == expected, out.stats


# ---- (g): stop tokens -----------------------------------------------------------------------
def _stop_tokens(references: list[list[int]], count: int) -> list[int]:
    """Tokens that end some references early but not all: the interesting case."""
    candidates = []
    for token in sorted({t for ref in references for t in ref}):
        hits = sum(token in ref for ref in references)
        if 0 < hits < len(references) and any(token in ref[1:-1] for ref in references):
            candidates.append((hits, token))
    assert len(candidates) >= count, "references too uniform to pick stop tokens"
    # Moderately common tokens: they cut several outputs, at different positions.
    candidates.sort(key=lambda ht: abs(ht[0] - len(references) / 2))
    return [token for _, token in candidates[:count]]


def _cut(ref: list[int], stop: set[int]) -> tuple[list[int], str]:
    for i, token in enumerate(ref):
        if token in stop:
            return ref[: i + 1], FINISH_STOP
    return ref, FINISH_LENGTH


# The self drafter commits draft_length + 1 tokens a round, so a stop token falls inside an
# accepted run at every position; the others stop on a corrected or plain-decoded token.
STOP_CASES = [("self", k) for k in DRAFT_LENGTHS] + [(kind, k) for kind in ("unrelated", "none") for k in (1, 4, 8)]


@pytest.mark.parametrize("num_stop_tokens", [1, 2])
@pytest.mark.parametrize("drafter_kind, draft_length", STOP_CASES)
def test_stop_tokens(verifier, unrelated_model, references, draft_length, num_stop_tokens, drafter_kind):
    stop = _stop_tokens(references, num_stop_tokens)
    drafter = {"self": lambda: model_drafter(verifier), "unrelated": lambda: model_drafter(unrelated_model),
               "none": lambda: None}[drafter_kind]()
    outs = run(make_engine(verifier, drafter, draft_length, stop_token_ids=stop))
    expected = [_cut(ref, set(stop)) for ref in references]
    assert any(reason == FINISH_STOP for _, reason in expected)
    assert any(reason == FINISH_LENGTH for _, reason in expected)
    for i, (out, (tokens, reason)) in enumerate(zip(outs, expected)):
        assert out.token_ids == tokens, f"prompt {i}, stop {stop}: {out.token_ids} != {tokens}"
        assert out.finish_reason == reason, f"prompt {i}"


# ---- (h): more concurrent sessions than KV slots --------------------------------------------
@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
@pytest.mark.parametrize("num_slots", [1, 3])
def test_fewer_slots_than_sessions(verifier, references, draft_length, num_slots):
    """12 concurrent prompts on 3 (or 1) KV slots per model: sessions are evicted and
    re-prefilled, and the output is still exact."""
    assert len(PROMPTS) > num_slots
    engine = make_engine(verifier, model_drafter(verifier, num_slots), draft_length, num_slots=num_slots)
    counters = make_verifier_forgetful(engine, forget_share=0.0, seed=0)  # only counts
    outs = run(engine)
    assert_exact(outs, references)
    # Sessions beyond the slot count wait their turn instead of evicting resident ones.
    assert engine.verifier.slots.num_evictions == 0
    assert 0 < counters["max_batch"] <= num_slots  # the loop never batches more sessions than slots


def test_fewer_slots_than_sessions_does_not_thrash(verifier, references):
    num_slots = 3
    engine = make_engine(verifier, model_drafter(verifier, num_slots), 4, num_slots=num_slots)
    outs = run(engine)
    assert_exact(outs, references)
    # Each session needs 1 + ceil(23 / 5) = 6 rounds (a prefill round, then 5 tokens a round)
    # when it is never evicted mid-generation.
    assert engine.verifier.slots.num_cache_misses == 0
    assert all(out.stats.rounds == 1 + math.ceil((MAX_TOKENS - 1) / 5) for out in outs)


@pytest.mark.parametrize("draft_length", [1, 4, 8])
def test_drafter_with_fewer_slots_than_the_batch(verifier, references, draft_length):
    """A drafter that cannot hold the whole batch fails its round (CapacityError); the loop
    verifies without drafts and the output stays exact."""
    outs = run(make_engine(verifier, model_drafter(verifier, num_slots=2), draft_length))
    assert_exact(outs, references)


# ---- (i): drafter and verifier losing sessions -----------------------------------------------
class ForgetfulDrafter:
    """A ModelDrafter that forgets a random share of its sessions before every call, so the
    scheduler's next request for them is answered with CACHE_MISS."""

    def __init__(self, inner: ModelDrafter, forget_share: float, seed: int) -> None:
        self.inner = inner
        self.name = "forgetful"
        self.forget_share = forget_share
        self.rng = random.Random(seed)
        self.num_cache_misses = 0
        self.num_hits = 0

    @property
    def num_sessions(self) -> int:
        return self.inner.num_sessions

    def release(self, session_ids: Sequence[str]) -> int:
        return self.inner.release(session_ids)

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        held = self.inner.slots.session_ids()
        self.inner.release([sid for sid in held if self.rng.random() < self.forget_share])
        chunks = self.inner.draft(requests)
        self.num_cache_misses += sum(c.cache_miss for c in chunks)
        self.num_hits += sum(bool(c.tokens) for c in chunks)
        return chunks


def make_verifier_forgetful(engine: Engine, forget_share: float, seed: int) -> dict[str, int]:
    """Make the engine's VerifierCore drop a random share of its sessions before each verify,
    forcing verifier CACHE_MISS and re-prefill. Returns live counters."""
    core = engine.verifier
    original_verify = core.verify
    rng = random.Random(seed)
    counters = {"cache_misses": 0, "calls": 0, "max_batch": 0}

    def verify(items: Sequence[VerifyItem]) -> list[VerifyResult]:
        core.release([sid for sid in core.slots.session_ids() if rng.random() < forget_share])
        results = original_verify(items)
        counters["calls"] += 1
        counters["max_batch"] = max(counters["max_batch"], len(items))
        counters["cache_misses"] += sum(r.cache_miss for r in results)
        return results

    core.verify = verify  # instance attribute: LocalVerifyBackend calls core.verify
    return counters


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_drafter_cache_misses(verifier, references, draft_length):
    drafter = ForgetfulDrafter(model_drafter(verifier), forget_share=0.4, seed=draft_length)
    outs = run(make_engine(verifier, drafter, draft_length))
    assert_exact(outs, references)
    assert drafter.num_cache_misses > 0
    assert drafter.num_hits > 0
    # Whatever the drafter drafted was the verifier's own choice, so all of it was accepted.
    drafted, accepted = totals(outs)
    assert drafted == accepted > 0


@pytest.mark.parametrize("draft_length", DRAFT_LENGTHS)
def test_verifier_cache_misses(verifier, references, draft_length):
    engine = make_engine(verifier, model_drafter(verifier), draft_length)
    counters = make_verifier_forgetful(engine, forget_share=0.3, seed=100 + draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    assert counters["cache_misses"] > 0


@pytest.mark.parametrize("draft_length", [1, 3, 8])
@pytest.mark.parametrize("drafter_kind", ["self", "unrelated"])
def test_drafter_and_verifier_cache_misses_with_few_slots(verifier, unrelated_model, references, draft_length,
                                                         drafter_kind):
    model = verifier if drafter_kind == "self" else unrelated_model
    drafter = ForgetfulDrafter(model_drafter(model, num_slots=5), forget_share=0.3, seed=7 * draft_length)
    engine = make_engine(verifier, drafter, draft_length, num_slots=5)
    counters = make_verifier_forgetful(engine, forget_share=0.3, seed=draft_length)
    outs = run(engine)
    assert_exact(outs, references)
    assert counters["cache_misses"] > 0
    assert drafter.num_cache_misses > 0


# ---- pipeline lanes (scheduler/speculation_loop.py) -------------------------------------------------


def _lanes_engine(verifier, drafter_model, draft_length: int, lanes: int) -> tuple[Engine, list[int], list[int]]:
    """An engine whose loop runs `lanes` lanes (3+ sessions each); records every verify batch's
    size and the most rounds in flight at once."""
    config = EngineConfig(num_slots=NUM_SLOTS, max_context=MAX_CONTEXT, draft_length=draft_length,
                          pipeline_lanes=lanes, lane_min_sessions=3)
    engine = Engine(verifier, None, model_drafter(drafter_model), config, stop_token_ids=[])
    batch_sizes: list[int] = []
    in_flight = [0, 0]  # now, most
    backend = engine._draft_backend
    draft, verify = backend.draft, engine._verify_backend.verify

    async def counted(call, items):
        in_flight[0] += 1
        in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            return await call(items)
        finally:
            in_flight[0] -= 1

    async def recording_verify(items):
        batch_sizes.append(len(items))
        return await counted(verify, items)

    backend.draft = lambda requests: counted(draft, requests)
    engine._verify_backend.verify = recording_verify
    return engine, batch_sizes, in_flight


@pytest.mark.parametrize("draft_length", [1, 4])
def test_pipeline_lanes_keep_greedy_output_exact(verifier, unrelated_model, references, draft_length):
    engine, batch_sizes, in_flight = _lanes_engine(verifier, unrelated_model, draft_length, lanes=2)
    outs = run(engine)
    assert_exact(outs, references)
    assert totals(outs)[0] > 0
    # Two lanes of ~6 sessions: never one batch of all 12, and rounds overlapped.
    assert max(batch_sizes) <= math.ceil(len(PROMPTS) / 2), batch_sizes
    assert in_flight[1] >= 2


def test_pipeline_lanes_replay_seeded_sampling_exactly(verifier):
    """Randomness is keyed by (seed, position), so how sessions are split among lanes cannot
    change a sampled output: lanes keep the verifier's distribution (checked statistically for
    one lane in test_sampling_distribution_engine.py)."""
    drafter_model = make_tiny_llama(VOCAB, seed=5)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=700 + i) for i in range(len(PROMPTS))]
    outputs = {}
    for lanes in (1, 2, 3):
        engine, batch_sizes, _ = _lanes_engine(verifier, drafter_model, 3, lanes)
        outs = engine.generate_batch_ids(PROMPTS, params=params, max_tokens=MAX_TOKENS)
        outputs[lanes] = [o.token_ids for o in outs]
        assert max(batch_sizes) <= math.ceil(len(PROMPTS) / lanes)
    assert outputs[1] == outputs[2] == outputs[3]
    assert len({tuple(o) for o in outputs[1]}) > 1


def test_first_round_prefills_the_drafter_beside_the_verifier(verifier, references):
    """A session's first round verifies no drafts: the drafter prefills the prompt (drafting one
    token) while the verifier does, so the second round's sync sends only what was committed."""
    drafter = RecordingDrafter(model_drafter(verifier))
    engine = make_engine(verifier, drafter, 3)
    outs = run(engine)
    assert_exact(outs, references)
    first_calls: dict[str, list[DraftRequest]] = {}
    for request, chunk in drafter.calls:
        first_calls.setdefault(request.session_id, []).append(request)
    assert len(first_calls) == len(PROMPTS)
    for requests in first_calls.values():
        first, second = requests[0], requests[1]
        assert first.num_cached_tokens == 0 and first.num_draft_tokens == 1  # the prefill, beside the verifier
        assert second.num_cached_tokens == len(first.new_tokens)  # only the committed token follows
        assert len(second.new_tokens) == 1
    # The drafter equals the verifier, so from the second round every draft is accepted.
    for out in outs:
        assert out.stats.rounds == 1 + math.ceil((MAX_TOKENS - 1) / 4), out.stats
