"""The scheduler's bookkeeping, in plain Python: commits, beliefs about remote caches, stops."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.backends import BackendUnavailable
from scheduler.drafter_router import DrafterRouter
from scheduler.replica_pool import ReplicaPool, StaticEndpoints
from scheduler.session import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Session
from specmesh.records import DraftChunk, DraftRequest, SparseDistribution, VerifyResult
from specmesh.sampling_params import SamplingParams


def make_session(**overrides) -> Session:
    options = dict(session_id="s", prompt_tokens=[5, 6, 7], params=SamplingParams(seed=1), max_tokens=10)
    options.update(overrides)
    return Session(**options)


def chunk_for(session: Session, tokens: tuple[int, ...]) -> DraftChunk:
    base = len(session.tokens)
    return DraftChunk(session.session_id, base, tokens, tuple(0.5 for _ in tokens),
                      tuple(SparseDistribution((t,), (1.0,)) for t in tokens),
                      num_cached_tokens=base + len(tokens) - 1)


def test_first_round_sends_the_whole_prompt_to_both_sides():
    session = make_session()
    assert session.draft_request(3).new_tokens == (5, 6, 7)
    item = session.verify_item(chunk_for(session, (1, 2, 3)), 3)
    assert item.num_cached_tokens == 0 and item.new_tokens == (5, 6, 7) and item.draft_tokens == (1, 2, 3)


def test_commit_keeps_accepted_drafts_then_the_next_token_and_updates_beliefs():
    session = make_session()
    chunk = chunk_for(session, (1, 2, 3))
    item = session.verify_item(chunk, 3)
    commit = session.commit(item, VerifyResult("s", accepted_count=2, next_token=9, num_cached_tokens=5), chunk)
    assert commit.token_ids == [1, 2, 9] and commit.finish_reason is None
    assert session.tokens == [5, 6, 7, 1, 2, 9]
    assert session.verifier_cached == 5  # prompt + 2 accepted drafts; 9 is not processed yet
    assert session.drafter_cached == 5  # it processed 1 and 2 (not 3): both confirmed
    assert session.stats.drafted_tokens == 3 and session.stats.accepted_tokens == 2 and session.stats.rounds == 1
    assert session.stats.accepted_by_position == [1, 1]
    # Next round sends only what each side lacks.
    assert session.verify_item(None, 0).new_tokens == (9,)
    assert session.draft_request(2).new_tokens == (9,)


def test_rejected_drafts_are_not_believed_cached_at_the_drafter():
    session = make_session()
    chunk = chunk_for(session, (1, 2, 3))
    item = session.verify_item(chunk, 3)
    session.commit(item, VerifyResult("s", accepted_count=0, next_token=4, num_cached_tokens=3), chunk)
    assert session.drafter_cached == 3 and session.tokens[-1] == 4


def test_verify_length_may_cut_the_chunk():
    session = make_session()
    item = session.verify_item(chunk_for(session, (1, 2, 3, 4)), 2)
    assert item.draft_tokens == (1, 2) and len(item.draft_distributions) == 2


def test_stop_token_cuts_the_commit_and_finishes():
    session = make_session(stop_token_ids=frozenset({2}))
    chunk = chunk_for(session, (1, 2, 3))
    item = session.verify_item(chunk, 3)
    commit = session.commit(item, VerifyResult("s", accepted_count=3, next_token=8, num_cached_tokens=6), chunk)
    assert commit.token_ids == [1, 2] and commit.finish_reason == FINISH_STOP and session.finished


def test_length_limit_cuts_the_commit():
    session = make_session(max_tokens=2)
    chunk = chunk_for(session, (1, 2, 3))
    item = session.verify_item(chunk, 3)
    commit = session.commit(item, VerifyResult("s", accepted_count=3, next_token=8, num_cached_tokens=6), chunk)
    assert commit.token_ids == [1, 2] and commit.finish_reason == FINISH_LENGTH


def test_draft_limit_respects_remaining_tokens_context_and_per_request_caps():
    session = make_session(max_tokens=3)
    assert session.draft_limit(context_limit=100) == 2  # a round commits at most drafts + 1
    assert make_session(max_draft_tokens=1).draft_limit(100) == 1
    assert make_session(disable_speculation=True).draft_limit(100) == 0
    assert make_session().draft_limit(context_limit=5) == 2  # 3 prompt tokens, room for 2


def test_verifier_cache_miss_commits_nothing_and_resends_history():
    session = make_session()
    session.verifier_cached = 3
    session.tokens.append(11)
    item = session.verify_item(None, 0)
    commit = session.commit(item, VerifyResult("s", cache_miss=True), None)
    assert commit.token_ids == [] and session.verifier_cached == 0
    assert session.verify_item(None, 0).new_tokens == (5, 6, 7, 11)


def test_cancel_sets_finish_reason_once():
    session = make_session()
    session.cancel()
    assert session.finish_reason == FINISH_CANCELLED
    session.finish_reason = FINISH_STOP
    session.cancel()
    assert session.finish_reason == FINISH_STOP


class _Drafter:
    """An in-process drafter replica that proposes token 1 repeatedly, or fails when told."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.fail = False
        self.seen: list[str] = []

    async def draft(self, requests):
        if self.fail:
            raise BackendUnavailable(self.endpoint, "gone")
        self.seen += [r.session_id for r in requests]
        return [DraftChunk(r.session_id, r.num_cached_tokens + len(r.new_tokens), (1,) * r.num_draft_tokens)
                for r in requests]

    async def release(self, session_ids):
        pass


def _request(session_id: str) -> DraftRequest:
    return DraftRequest(session_id, 0, (1, 2), 2, SamplingParams())


def test_router_pins_least_loaded_and_moves_sessions_off_a_failed_drafter():
    replicas = {e: _Drafter(e) for e in ("a:1", "b:1")}
    router = DrafterRouter(ReplicaPool(StaticEndpoints(list(replicas)), replicas.__getitem__, cooldown_s=60))
    chunks = asyncio.run(router.draft([_request(f"s{i}") for i in range(4)]))
    assert all(c.tokens == (1, 1) for c in chunks)
    assert sorted(router.assignment.values()) == ["a:1", "a:1", "b:1", "b:1"]
    replicas["a:1"].fail = True
    chunks = asyncio.run(router.draft([_request(f"s{i}") for i in range(4)]))
    lost = [c for c in chunks if c.cache_miss]
    assert len(lost) == 2  # a:1's sessions: resend their history next round
    chunks = asyncio.run(router.draft([_request(f"s{i}") for i in range(4)]))
    assert not any(c.cache_miss for c in chunks)
    assert set(router.assignment.values()) == {"b:1"} and router.num_failovers == 0


def test_router_without_live_drafters_drafts_nothing():
    replica = _Drafter("a:1")
    replica.fail = True
    router = DrafterRouter(ReplicaPool(StaticEndpoints(["a:1"]), lambda e: replica, cooldown_s=60))
    asyncio.run(router.draft([_request("s")]))
    chunks = asyncio.run(router.draft([_request("s")]))
    assert chunks[0].tokens == () and not chunks[0].cache_miss


@pytest.mark.parametrize("cooldown", [0.0])
def test_failed_replica_is_retried_after_cooldown(cooldown):
    now = [0.0]
    pool = ReplicaPool(StaticEndpoints(["a:1"]), lambda e: e, cooldown_s=5, clock=lambda: now[0])
    pool.mark_failed("a:1")
    assert pool.live_endpoints() == []
    now[0] = 5.0 + cooldown
    assert pool.live_endpoints() == ["a:1"]


def test_what_the_drafter_has_not_seen_stays_one_token_while_it_drafts_and_grows_in_a_pause():
    """Over the wire a chunk only promises its base (num_cached_tokens = base_length), yet the
    drafter keeps the drafts a sync confirms: after an all-accepted round it must catch up on one
    token (the verifier's next), not on every accepted draft; rounds without drafting add up."""
    session = make_session(max_tokens=40)
    session.tokens = session.tokens + [9] * 10
    session.verifier_cached = session.drafter_cached = session.drafter_seen = len(session.tokens) - 1
    for accepted in (3, 0, 2):
        base = len(session.tokens)
        wire_chunk = DraftChunk(session.session_id, base, (1, 2, 3), (0.5,) * 3,
                                tuple(SparseDistribution((t,), (1.0,)) for t in (1, 2, 3)), num_cached_tokens=base)
        item = session.verify_item(wire_chunk, 3)
        session.commit(item, VerifyResult("s", accepted_count=accepted, next_token=4, num_cached_tokens=base + accepted),
                       wire_chunk)
        assert session.drafter_unseen <= 1, accepted
    before = session.drafter_unseen
    for pause in range(1, 4):  # plain rounds: the drafter is not asked
        item = session.verify_item(None, 0)
        session.commit(item, VerifyResult("s", accepted_count=0, next_token=4, num_cached_tokens=len(session.tokens)),
                       None)
        assert session.drafter_unseen == before + pause
    session.note_drafter_lost()
    assert session.drafter_unseen == len(session.tokens)
