"""The verifier service over real gRPC on loopback, with tiny float32 Llamas.

Each test starts its own replica (grpc.aio objects belong to one event loop) with an injected
in-memory model; a second copy of the same weights in a plain VerifierCore is the reference.
The last test runs `python -m verifier` as a subprocess against a saved tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Sequence

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from specmesh.grpc_server import insecure_channel
from specmesh.model_loading import tokenizer_fingerprint
from specmesh.model_runner import ModelRunner
from specmesh.records import SparseDistribution, VerifyItem, VerifyResult
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from tests.tiny_models import make_tiny_llama, make_tiny_tokenizer, save_tiny_model
from verifier import convert
from verifier.call_validation import RefusedItem
from verifier.config import VerifierConfig
from verifier.microbatch import VerifyBatcher
from verifier.server import RunningVerifier, start_verifier
from verifier.servicer import SERVICE_NAME
from verifier.verification import VerifierCore

VOCAB = 64
NUM_SLOTS = 8
MAX_CONTEXT = 128
SEED = 5
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1234)
PROMPT_A = (1, 10, 11, 20, 33, 41)
PROMPT_B = (1, 5, 6, 7)


def _model() -> torch.nn.Module:
    return make_tiny_llama(VOCAB, seed=SEED)


def _reference_core() -> VerifierCore:
    return VerifierCore(ModelRunner(_model(), NUM_SLOTS, MAX_CONTEXT))


def _config(**overrides) -> VerifierConfig:
    values = dict(model="tiny-llama", num_slots=NUM_SLOTS, max_context=MAX_CONTEXT,
                  profile_batch_tokens=(1, 4, 2, 8), grace_s=1.0)
    values.update(overrides)
    return VerifierConfig(**values)


@contextlib.asynccontextmanager
async def _serving(**overrides) -> AsyncIterator[tuple[RunningVerifier, verifier_pb2_grpc.VerifierStub]]:
    running = await start_verifier(_config(**overrides), model=_model(), tokenizer=make_tiny_tokenizer(VOCAB))
    channel = insecure_channel(running.address)
    try:
        yield running, verifier_pb2_grpc.VerifierStub(channel)
    finally:
        await channel.close()
        await running.stop()


async def _verify(stub: verifier_pb2_grpc.VerifierStub, items: Sequence[VerifyItem]):
    response = await stub.Verify(convert.verify_request(items), timeout=30)
    return [convert.result_from_proto(r) for r in response.results], response


def _q(draft_token: int) -> SparseDistribution:
    """A sparse draft distribution that gives the draft token most, but not all, of its mass."""
    others = [(draft_token + k) % VOCAB for k in (1, 2)]
    return SparseDistribution((draft_token, *others), (0.6, 0.3, 0.1))


def _sampled_item(session_id: str, cached: int, new: Sequence[int], drafts: Sequence[int],
                  want_logprobs: bool = True) -> VerifyItem:
    return VerifyItem(session_id, cached, tuple(new), tuple(drafts), tuple(_q(d) for d in drafts), SAMPLED,
                      want_logprobs)


def _same(a: VerifyResult, b: VerifyResult) -> None:
    assert (a.session_id, a.accepted_count, a.next_token, a.num_cached_tokens, a.cache_miss) == \
        (b.session_id, b.accepted_count, b.next_token, b.num_cached_tokens, b.cache_miss)
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)  # float32 on the wire


def _greedy_continuation(prompt: Sequence[int], n: int) -> list[int]:
    model = _model()
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


# ---- Verify --------------------------------------------------------------------------------------


async def test_verify_over_grpc_matches_core() -> None:
    reference = _reference_core()
    async with _serving() as (_, stub):
        cached = {"g": 0, "s": 0}
        new = {"g": PROMPT_A, "s": PROMPT_B}
        for round_ in range(4):
            drafts = [(round_ * 7 + k) % VOCAB for k in range(3)]
            items = [
                VerifyItem("g", cached["g"], new["g"], tuple(drafts), (), GREEDY, want_logprobs=True),
                _sampled_item("s", cached["s"], new["s"], drafts),
            ]
            expected = reference.verify(items)
            got, response = await _verify(stub, items)
            for g, e in zip(got, expected):
                _same(g, e)
                assert len(g.logprobs) == g.accepted_count + 1
            assert response.batch_tokens == sum(len(i.new_tokens) + len(i.draft_tokens) for i in items)
            assert response.forward_seconds > 0
            for item, result in zip(items, expected):
                cached[item.session_id] = result.num_cached_tokens
                new[item.session_id] = (result.next_token,)


async def test_greedy_drafts_equal_to_argmax_are_all_accepted() -> None:
    continuation = _greedy_continuation(PROMPT_A, 6)
    async with _serving() as (_, stub):
        item = VerifyItem("g", 0, PROMPT_A, tuple(continuation[:5]), (), GREEDY, want_logprobs=True)
        (result,), _ = await _verify(stub, [item])
    assert result.accepted_count == 5
    assert result.next_token == continuation[5]
    assert result.num_cached_tokens == len(PROMPT_A) + 5


async def test_concurrent_calls_share_one_forward() -> None:
    reference = _reference_core()
    call_1 = [VerifyItem("a", 0, PROMPT_A, (3, 4), (), GREEDY)]
    call_2 = [_sampled_item("b", 0, PROMPT_B, (9, 8, 7)), VerifyItem("c", 0, (1, 2), (), (), GREEDY)]
    expected = reference.verify([*call_1, *call_2])
    async with _serving(batch_wait_ms=300) as (running, stub):
        before = running.batcher.num_forwards
        (got_1, response_1), (got_2, response_2) = await asyncio.gather(_verify(stub, call_1), _verify(stub, call_2))
        assert running.batcher.num_forwards == before + 1
        assert running.batcher.calls_per_forward_history[-1] == 2
    for g, e in zip([*got_1, *got_2], expected):
        _same(g, e)
    assert response_1.batch_tokens == response_2.batch_tokens == 6 + 2 + 4 + 3 + 2 + 0


async def test_a_lone_caller_stops_waiting_for_company_and_a_second_caller_brings_the_wait_back() -> None:
    """One scheduler sending one call at a time has no company to wait for: after 8 such calls
    its calls skip the batch window. A call from anyone else, or overlapping calls, restore it."""
    from verifier.microbatch import LONE_CALLS_BEFORE_NOT_WAITING

    window = 0.3
    batcher = VerifyBatcher(_reference_core(), batch_wait_s=window)
    state = {"cached": 0, "new": PROMPT_A}

    async def timed_call(caller: str | None) -> float:
        start = time.monotonic()
        outcome = await batcher.submit([VerifyItem("s", state["cached"], state["new"], (), (), GREEDY)], caller=caller)
        result = outcome.results[0]
        assert not result.cache_miss
        state["cached"], state["new"] = result.num_cached_tokens, (result.next_token,)
        return time.monotonic() - start

    try:
        waited = [await timed_call("ipv4:127.0.0.1:5001") for _ in range(LONE_CALLS_BEFORE_NOT_WAITING)]
        assert min(waited) >= window * 0.9  # the first calls wait: company is not ruled out yet
        fast = [await timed_call("ipv4:127.0.0.1:5001") for _ in range(4)]
        assert max(fast) < window * 0.9 and batcher.num_waits_skipped == 4
        assert await timed_call("ipv4:127.0.0.1:5002") >= window * 0.9  # another scheduler
        assert await timed_call("ipv4:127.0.0.1:5001") >= window * 0.9  # ... so the first waits again
        assert await timed_call(None) >= window * 0.9  # an unknown caller always waits
    finally:
        await batcher.close()


async def test_the_verifier_service_knows_its_callers() -> None:
    """Through gRPC: a scheduler's sequential calls stop waiting after a few; two concurrent
    calls on the same channel still share a forward (test_concurrent_calls_share_one_forward)."""
    async with _serving(batch_wait_ms=150) as (running, stub):
        cached, new = 0, PROMPT_A
        for _ in range(10):
            (result,), _ = await _verify(stub, [VerifyItem("s", cached, new, (), (), GREEDY)])
            cached, new = result.num_cached_tokens, (result.next_token,)
        assert running.batcher.num_waits_skipped == 2


@pytest.mark.parametrize("bad_item", [
    VerifyItem("bad", 0, (1, 2, VOCAB), (), (), GREEDY),  # token id outside the vocabulary
    VerifyItem("bad", 0, (1, 2), (5, 6), (_q(5),), SAMPLED),  # 2 drafts, 1 distribution
    VerifyItem("bad", 0, (1, 2), (5,), (SparseDistribution((5, 900), (0.5, 0.5)),), SAMPLED),  # q off-vocab
], ids=["token-out-of-vocab", "draft-distribution-count", "q-out-of-vocab"])
async def test_invalid_call_fails_alone(bad_item: VerifyItem) -> None:
    good = [VerifyItem("good", 0, PROMPT_A, (3,), (), GREEDY)]
    expected = _reference_core().verify(good)
    async with _serving(batch_wait_ms=200) as (running, stub):
        bad_call = _verify(stub, [VerifyItem("innocent", 0, PROMPT_B, (), (), GREEDY), bad_item])
        bad, (got, _) = await asyncio.gather(bad_call, _verify(stub, good), return_exceptions=True)
        assert isinstance(bad, grpc.aio.AioRpcError)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        _same(got[0], expected[0])
        stats = await stub.Stats(common_pb2.StatsRequest())
        assert stats.active_sessions == 1  # nothing of the bad call was kept


async def test_capacity_refuses_only_the_item_that_does_not_fit() -> None:
    too_long = VerifyItem("long", 0, tuple(4 + i % 50 for i in range(MAX_CONTEXT)), (5,), (), GREEDY)
    async with _serving() as (_, stub):
        (refused, ok), _ = await _verify(stub, [too_long, VerifyItem("ok", 0, PROMPT_B, (), (), GREEDY)])
    assert isinstance(refused, RefusedItem) and refused.status == "capacity"
    assert isinstance(ok, VerifyResult) and not ok.cache_miss


async def test_same_session_in_concurrent_calls_runs_in_arrival_order() -> None:
    # Call 2 continues what call 1 commits, so merging or reordering them would be a cache miss.
    first = _reference_core().verify([VerifyItem("s", 0, PROMPT_A, (), (), GREEDY)])[0]
    batcher = VerifyBatcher(_reference_core(), batch_wait_s=0.2)
    try:
        call_1 = asyncio.create_task(batcher.submit([VerifyItem("s", 0, PROMPT_A, (), (), GREEDY)]))
        call_2 = asyncio.create_task(batcher.submit(
            [VerifyItem("s", first.num_cached_tokens, (first.next_token,), (), (), GREEDY)]))
        outcome_1, outcome_2 = await asyncio.gather(call_1, call_2)
    finally:
        await batcher.close()
    assert outcome_1.results[0] == first
    assert not outcome_2.results[0].cache_miss
    assert outcome_2.results[0].num_cached_tokens == len(PROMPT_A) + 1
    assert batcher.num_forwards == 2


async def test_full_batch_does_not_wait_and_oversized_calls_split() -> None:
    batcher = VerifyBatcher(_reference_core(), batch_wait_s=5.0, max_batch_tokens=8)
    try:
        start = time.monotonic()
        # 6 + 4 tokens exceed max_batch_tokens: two forwards, neither waits the 5 s window.
        await asyncio.gather(batcher.submit([VerifyItem("a", 0, PROMPT_A, (), (), GREEDY)]),
                             batcher.submit([VerifyItem("b", 0, PROMPT_B, (), (), GREEDY)]))
        assert time.monotonic() - start < 2.5
    finally:
        await batcher.close()
    assert list(batcher.batch_tokens_history) == [6, 4]


# ---- sessions: release and eviction ---------------------------------------------------------------


async def test_release_then_verify_is_a_cache_miss() -> None:
    async with _serving() as (_, stub):
        (result,), _ = await _verify(stub, [VerifyItem("r", 0, PROMPT_A, (), (), GREEDY)])
        follow_up = VerifyItem("r", result.num_cached_tokens, (result.next_token,), (), (), GREEDY)
        # Believing more than we hold is a miss that reports what is held.
        (miss,), _ = await _verify(stub, [VerifyItem("r", result.num_cached_tokens + 3, (7,), (), (), GREEDY)])
        assert miss.cache_miss and miss.num_cached_tokens == len(PROMPT_A)
        released = await stub.Release(common_pb2.ReleaseRequest(session_ids=["r", "never-seen"]))
        assert released.released_count == 1
        response = await stub.Verify(convert.verify_request([follow_up]))
        assert response.results[0].status == common_pb2.SESSION_STATUS_CACHE_MISS
        assert response.results[0].cache_miss.num_cached_tokens == 0
        assert response.batch_tokens == 0


async def test_idle_sessions_are_evicted_after_ttl() -> None:
    async with _serving(idle_ttl_s=0.3) as (_, stub):
        (result,), _ = await _verify(stub, [VerifyItem("t", 0, PROMPT_A, (), (), GREEDY)])
        assert (await stub.Stats(common_pb2.StatsRequest())).active_sessions == 1
        deadline = time.monotonic() + 5
        while (await stub.Stats(common_pb2.StatsRequest())).active_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # no Verify calls: the periodic sweep must evict it
        stats = await stub.Stats(common_pb2.StatsRequest())
        assert stats.active_sessions == 0 and stats.cached_tokens == 0
        (miss,), _ = await _verify(stub, [VerifyItem("t", result.num_cached_tokens, (result.next_token,), (), (),
                                                     GREEDY)])
        assert miss.cache_miss


# ---- Profile, Stats, health, reflection -----------------------------------------------------------


async def test_profile_reports_cost_table_and_tokenizer() -> None:
    async with _serving() as (_, stub):
        profile = await stub.Profile(common_pb2.ProfileRequest())
        stats = await stub.Stats(common_pb2.StatsRequest())
    table = convert.cost_table_from_proto(profile)
    assert [b for b, _ in table] == [1, 2, 4, 8]
    assert all(seconds > 0 for _, seconds in table)
    assert profile.tokenizer_fingerprint == tokenizer_fingerprint(make_tiny_tokenizer(VOCAB))
    assert (profile.model_name, profile.vocab_size) == ("tiny-llama", VOCAB)
    assert (profile.max_context_tokens, profile.max_sessions) == (MAX_CONTEXT, NUM_SLOTS)
    # The dummy sessions of the profile are gone.
    assert (stats.active_sessions, stats.cached_tokens, stats.in_flight) == (0, 0, 0)
    assert stats.capacity_tokens == NUM_SLOTS * MAX_CONTEXT


async def test_health_serving_then_not_serving_when_stop_begins() -> None:
    async with _serving(batch_wait_ms=500) as (running, stub):
        channel = insecure_channel(running.address)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
        # A call in flight (held by the batch wait) keeps the stop draining for a while.
        in_flight = asyncio.create_task(_verify(stub, [VerifyItem("d", 0, PROMPT_A, (), (), GREEDY)]))
        while running.batcher.load().in_flight == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(running.stop())
        # The server refuses new calls once it stops, so ask the health servicer itself.
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while (await running.service.health.Check(request, None)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.01)
        assert not stopping.done() and not in_flight.done()
        (result,), _ = await in_flight  # drained, not dropped
        assert isinstance(result, VerifyResult) and not result.cache_miss
        await stopping


async def test_reflection_lists_the_verifier() -> None:
    async with _serving() as (running, _):
        channel = insecure_channel(running.address)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        await channel.close()
    names = {service.name for service in reply.list_services_response.service}
    assert "specmesh.v1.Verifier" in names and "grpc.health.v1.Health" in names


# ---- the command line --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health_status(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=1).status
        except grpc.RpcError:
            return None


def test_python_m_verifier_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny", vocab_size=VOCAB, seed=SEED)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "SPECMESH_VERIFIER_NUM_SLOTS": "4", "SPECMESH_VERIFIER_PROFILE_BATCH_TOKENS": "1,2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "verifier", "--model", str(model_dir), "--port", str(port), "--max-context", "64"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 40
        while _health_status(address) != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "verifier did not become SERVING"
            time.sleep(0.2)
        with grpc.insecure_channel(address) as channel:
            profile = verifier_pb2_grpc.VerifierStub(channel).Profile(common_pb2.ProfileRequest(), timeout=5)
        assert profile.max_sessions == 4 and profile.max_context_tokens == 64
        assert [p.batch_tokens for p in profile.cost_table] == [1, 2]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
