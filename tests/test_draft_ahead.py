"""Draft-ahead in the drafter core (drafter/drafting.py).

The core keeps each session's path (committed tokens, then its drafts) and, on a sync, keeps
the longest prefix that agrees with the committed sequence. Drafting ahead only moves work
earlier: since draft randomness is keyed by absolute position, every draft() answer must be
the same with or without draft-ahead, and the same as a fresh drafter given the full history.
"""

from __future__ import annotations

import random

import pytest
import torch

from drafter.context_copy import ContextCopyRule
from drafter.drafting import ModelDrafter
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftChunk, DraftRequest
from specmesh.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_llama

VOCAB = 64
MAX_CONTEXT = 64
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, seed=3)


def make_drafter(model, num_slots: int = 8, max_context: int = MAX_CONTEXT,
                 context_copy: ContextCopyRule | None = None) -> ModelDrafter:
    return ModelDrafter(ModelRunner(model, num_slots, max_context), name="tiny", draft_top_k=8,
                        context_copy=context_copy)


def request(sid: str, num_cached: int, new: list[int], k: int, params: SamplingParams) -> DraftRequest:
    return DraftRequest(sid, num_cached, tuple(new), k, params)


def assert_same_chunk(got: DraftChunk, want: DraftChunk) -> None:
    assert got.session_id == want.session_id
    assert got.base_length == want.base_length
    assert got.cache_miss == want.cache_miss
    assert got.tokens == want.tokens
    assert got.confidences == pytest.approx(want.confidences, abs=1e-5)
    assert [q.token_ids[0] for q in got.distributions] == [q.token_ids[0] for q in want.distributions]


@pytest.mark.parametrize("copy", [None, ContextCopyRule(below_probability=2.0)], ids=["model", "copying"])
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_draft_ahead_never_changes_what_draft_returns(model, params, copy):
    """Several sessions through many rounds of a simulated scheduler: verification accepts a
    random number of drafts, then a correction, or (all accepted) a bonus that half the time
    equals the drafter's own ahead token. The drafter that drafts ahead between rounds answers
    exactly like one that never does, and like a fresh drafter re-prefilled every round."""
    rng = random.Random(7)
    ahead, plain, fresh_model = make_drafter(model, context_copy=copy), make_drafter(model, context_copy=copy), model
    sessions = {f"s{i}": [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))] for i in range(4)}
    cached = {sid: 0 for sid in sessions}  # what the scheduler believes each drafter holds
    num_bonus_hits = 0
    for round_index in range(12):
        requests = []
        for sid, committed in sessions.items():
            requests.append(request(sid, cached[sid], committed[cached[sid]:], rng.randint(1, 5), params))
        got = ahead.draft(requests)
        want = plain.draft(requests)
        fresh = make_drafter(fresh_model, context_copy=copy).draft(
            [request(r.session_id, 0, sessions[r.session_id], r.num_draft_tokens, params) for r in requests])
        for g, w, f in zip(got, want, fresh):
            assert_same_chunk(g, w)
            assert_same_chunk(g, f)
        ahead.draft_ahead(list(sessions), rng.randint(1, 6))
        for chunk in got:
            committed = sessions[chunk.session_id]
            accepted = rng.randint(0, len(chunk.tokens))
            drafted_next = ahead.ahead_tokens(chunk.session_id)[:1] if accepted == len(chunk.tokens) else ()
            if drafted_next and rng.random() < 0.5:
                bonus = drafted_next[0]  # the verifier's bonus equals the token drafted ahead
                num_bonus_hits += 1
            else:
                wrong = chunk.tokens[accepted] if accepted < len(chunk.tokens) else -1
                bonus = rng.choice([t for t in range(4, VOCAB) if t != wrong])
            committed += list(chunk.tokens[:accepted]) + [bonus]
            # Wire rule: the next sync claims the committed length of the last answered sync.
            cached[chunk.session_id] = chunk.base_length
    assert num_bonus_hits > 0
    assert ahead.num_reused_tokens > plain.num_reused_tokens
    if copy is not None:
        assert ahead.num_copied_tokens > 0 and plain.num_copied_tokens > 0


def test_confirmed_ahead_path_is_answered_without_a_forward(model):
    ahead, plain = make_drafter(model), make_drafter(model)
    prompt = [5, 9, 13, 17, 21]
    first = request("s", 0, prompt, 3, GREEDY)
    chunk = ahead.draft([first])[0]
    assert_same_chunk(chunk, plain.draft([first])[0])
    added = ahead.draft_ahead(["s"], 4)
    assert added == {"s": 4}
    assert len(ahead.ahead_tokens("s")) == 4
    # The verifier accepts the 3 drafts and its bonus token equals the first ahead token.
    drafted_ahead = ahead.ahead_tokens("s")
    confirmed = list(chunk.tokens) + [drafted_ahead[0]]
    follow_up = request("s", len(prompt), confirmed, 3, GREEDY)
    forwards = ahead.num_forwards
    got = ahead.draft([follow_up])[0]
    assert ahead.num_forwards == forwards  # all three came from the path
    assert got.tokens == drafted_ahead[1:4]
    assert_same_chunk(got, plain.draft([follow_up])[0])
    assert_same_chunk(got, make_drafter(model).draft([request("s", 0, prompt + confirmed, 3, GREEDY)])[0])


def test_contradicted_ahead_path_is_discarded(model):
    ahead, plain = make_drafter(model), make_drafter(model)
    prompt = [7, 8, 9, 10]
    chunk = ahead.draft([request("s", 0, prompt, 4, GREEDY)])[0]
    plain.draft([request("s", 0, prompt, 4, GREEDY)])
    ahead.draft_ahead(["s"], 5)
    correction = next(t for t in range(4, VOCAB) if t != chunk.tokens[1])
    follow_up = request("s", len(prompt), [chunk.tokens[0], correction], 4, GREEDY)
    got = ahead.draft([follow_up])[0]
    assert_same_chunk(got, plain.draft([follow_up])[0])
    history = prompt + [chunk.tokens[0], correction]
    assert_same_chunk(got, make_drafter(model).draft([request("s", 0, history, 4, GREEDY)])[0])
    assert ahead.ahead_tokens("s") == ()


def test_changed_sampling_params_discard_drafts(model):
    ahead = make_drafter(model)
    prompt = [4, 5, 6]
    chunk = ahead.draft([request("s", 0, prompt, 2, GREEDY)])[0]
    ahead.draft_ahead(["s"], 3)
    history = prompt + list(chunk.tokens)
    got = ahead.draft([request("s", len(prompt), list(chunk.tokens), 3, SAMPLED)])[0]
    assert_same_chunk(got, make_drafter(model).draft([request("s", 0, history, 3, SAMPLED)])[0])


def test_draft_ahead_respects_the_slot_capacity(model):
    drafter = make_drafter(model, max_context=12)
    prompt = list(range(4, 12))  # 8 tokens
    drafter.draft([request("s", 0, prompt, 2, GREEDY)])
    added = drafter.draft_ahead(["s"], 10)
    # Positions up to max_context (12) can be drafted: the path ends at 13 tokens.
    assert added == {"s": 3}
    assert drafter.draft_ahead(["s"], 1) == {}
    assert drafter.draft_ahead(["unknown"], 3) == {}
    assert drafter.runner.cache.lengths[drafter.slots.slot_of("s")] <= 12


def test_sync_keeps_accepted_drafts_cached_and_allows_an_empty_update(model):
    drafter = make_drafter(model)
    prompt = [9, 10, 11, 12, 13, 14]
    chunk = drafter.draft([request("s", 0, prompt, 4, GREEDY)])[0]
    assert chunk.num_cached_tokens == len(prompt) + 4
    # Two drafts accepted, then a correction: the prompt and the two drafts keep their K/V.
    correction = next(t for t in range(4, VOCAB) if t != chunk.tokens[2])
    drafter.draft([request("s", len(prompt), list(chunk.tokens[:2]) + [correction], 1, GREEDY)])
    assert drafter.num_reused_tokens == 0
    # Nothing new committed (e.g. the verifier lost the session): drafting from the held prefix.
    base = len(prompt) + 3
    again = drafter.draft([request("s", base, [], 2, GREEDY)])[0]
    history = prompt + list(chunk.tokens[:2]) + [correction]
    assert_same_chunk(again, make_drafter(model).draft([request("s", 0, history, 2, GREEDY)])[0])


def test_cache_miss_reports_what_is_held(model):
    drafter = make_drafter(model)
    assert drafter.draft([request("s", 3, [5], 2, GREEDY)])[0].cache_miss
    chunk = drafter.draft([request("s", 0, [5, 6, 7], 2, GREEDY)])[0]
    miss = drafter.draft([request("s", 9, [5], 2, GREEDY)])[0]
    assert miss.cache_miss and miss.num_cached_tokens == 3
    # The miss changed nothing: the session still continues from its committed tokens.
    follow = drafter.draft([request("s", 3, [chunk.tokens[0]], 1, GREEDY)])[0]
    assert follow.tokens == chunk.tokens[1:2]
