"""The drafter service over real gRPC on loopback, with tiny float32 Llamas.

Each test starts its own replica (grpc.aio objects belong to one event loop) around a
ModelDrafter built here; a second ModelDrafter on the same weights, called directly, is the
reference. The last test runs `python -m drafter --model prompt-lookup` as a subprocess.
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

from drafter.config import DrafterConfig
from drafter.drafting import ModelDrafter
from drafter.server import RunningDrafter, start_drafter
from specmesh.grpc_server import insecure_channel
from specmesh.model_loading import tokenizer_fingerprint
from specmesh.model_runner import ModelRunner
from specmesh.records import DraftChunk, DraftRequest
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc
from tests.tiny_models import make_tiny_llama, make_tiny_tokenizer

VOCAB = 64
NUM_SLOTS = 8
MAX_CONTEXT = 96
TOP_K = 8
GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=4321)
PROMPTS = {"a": (1, 10, 11, 20, 33, 41), "b": (1, 5, 6, 7), "c": (1, 22, 23, 22, 23, 22, 9, 30), "d": (1, 40)}

_MODEL = make_tiny_llama(VOCAB, seed=21)  # read-only: every drafter below shares these weights


class CountingDrafter(ModelDrafter):
    """A ModelDrafter that records how many forwards each draft() call ran."""

    def __init__(self, max_context: int = MAX_CONTEXT) -> None:
        super().__init__(ModelRunner(_MODEL, NUM_SLOTS, max_context), name="tiny-drafter", draft_top_k=TOP_K)
        self.draft_forwards: list[int] = []

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        before = self.num_forwards
        chunks = super().draft(requests)
        self.draft_forwards.append(self.num_forwards - before)
        return chunks


def _config(**overrides) -> DrafterConfig:
    values = dict(model="tiny-drafter", num_slots=NUM_SLOTS, max_context=MAX_CONTEXT, draft_top_k=TOP_K,
                  draft_ahead_tokens=0, batch_wait_ms=2.0, profile_batch_sizes=(1, 2, 4), grace_s=0.5)
    values.update(overrides)
    return DrafterConfig(**values)


@contextlib.asynccontextmanager
async def _serving(core: ModelDrafter | None = None, **overrides) -> AsyncIterator[
        tuple[RunningDrafter, drafter_pb2_grpc.DrafterStub]]:
    running = await start_drafter(_config(**overrides), drafter_core=core or CountingDrafter(),
                                  tokenizer=make_tiny_tokenizer(VOCAB))
    channel = insecure_channel(running.address)
    try:
        yield running, drafter_pb2_grpc.DrafterStub(channel)
    finally:
        await channel.close()
        await running.stop()


def _sampling(params: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     seed=params.seed or 0, has_seed=params.seed is not None)


def _sync(sequence: int, request: DraftRequest) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(sequence=sequence, sync=drafter_pb2.DraftSync(
        session_id=request.session_id, num_cached_tokens=request.num_cached_tokens,
        new_tokens=request.new_tokens, num_tokens=request.num_draft_tokens, sampling=_sampling(request.params)))


def _release(sequence: int, session_id: str) -> drafter_pb2.DraftRequest:
    return drafter_pb2.DraftRequest(sequence=sequence, release=drafter_pb2.DraftRelease(session_id=session_id))


def _request(sid: str, cached: int, new: Sequence[int], k: int, params: SamplingParams = GREEDY) -> DraftRequest:
    return DraftRequest(sid, cached, tuple(new), k, params)


class Stream:
    """One client Draft stream: write requests, read the chunk answering a sequence number."""

    def __init__(self, stub: drafter_pb2_grpc.DrafterStub) -> None:
        self.call = stub.Draft()
        self._sequence = 0
        self.received: dict[int, drafter_pb2.DraftChunk] = {}

    async def send(self, message_or_request) -> int:
        self._sequence += 1
        if isinstance(message_or_request, DraftRequest):
            message = _sync(self._sequence, message_or_request)
        else:
            message = message_or_request
            message.sequence = self._sequence
        await self.call.write(message)
        return self._sequence

    async def answer(self, sequence: int, timeout: float = 20.0) -> drafter_pb2.DraftChunk:
        async def read_until() -> drafter_pb2.DraftChunk:
            while sequence not in self.received:
                chunk = await self.call.read()
                assert chunk is not grpc.aio.EOF, "stream ended early"
                assert chunk.last  # one chunk per sync
                assert chunk.sequence not in self.received
                self.received[chunk.sequence] = chunk
            return self.received[sequence]

        return await asyncio.wait_for(read_until(), timeout)


def assert_matches(chunk: drafter_pb2.DraftChunk, want: DraftChunk, sampled: bool) -> None:
    assert chunk.status == common_pb2.SESSION_STATUS_OK, chunk.error_message
    assert chunk.session_id == want.session_id
    assert chunk.base_length == want.base_length
    assert tuple(chunk.tokens) == want.tokens
    assert list(chunk.confidences) == pytest.approx(want.confidences, abs=1e-5)
    if sampled:
        assert len(chunk.distributions) == len(want.distributions)
        for got, expected in zip(chunk.distributions, want.distributions):
            assert dict(zip(got.token_ids, got.probs)) == pytest.approx(
                dict(zip(expected.token_ids, expected.probs)), abs=1e-5)
    else:
        assert len(chunk.distributions) == 0  # greedy: q is not sent


async def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ---- drafting over the stream ---------------------------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_stream_chunks_equal_direct_draft(params) -> None:
    reference = CountingDrafter()
    async with _serving() as (_, stub):
        stream = Stream(stub)
        cached = {sid: 0 for sid in PROMPTS}
        committed = {sid: list(prompt) for sid, prompt in PROMPTS.items()}
        for round_index in range(3):
            requests = [_request(sid, cached[sid], committed[sid][cached[sid]:], 2 + round_index, params)
                        for sid in PROMPTS]
            sequences = [await stream.send(r) for r in requests]
            expected = reference.draft(requests)
            for sequence, want in zip(sequences, expected):
                chunk = await stream.answer(sequence)
                assert_matches(chunk, want, sampled=not params.greedy)
                # The verifier accepts one draft, then a token of its own.
                committed[want.session_id] += [want.tokens[0], (want.tokens[1] + 1) % VOCAB]
                cached[want.session_id] = want.base_length
        await stream.call.done_writing()
        assert await stream.call.read() is grpc.aio.EOF  # half-close: answered everything, then ended
        assert await stream.call.code() == grpc.StatusCode.OK


async def test_sessions_and_streams_share_one_batch() -> None:
    reference = CountingDrafter()
    # A generous batch wait: all five syncs, from two streams, reach the first batch.
    async with _serving(batch_wait_ms=400.0) as (running, stub):
        first, second = Stream(stub), Stream(stub)
        requests = {sid: _request(sid, 0, prompt, 3) for sid, prompt in PROMPTS.items()}
        sent = {}
        for stream, sid in [(first, "a"), (second, "b"), (first, "c"), (second, "d")]:
            sent[sid] = (stream, await stream.send(requests[sid]))
        sent["a2"] = (first, await first.send(_request("e", 0, (1, 2, 3), 2)))
        expected = dict(zip(list(requests) + ["a2"], reference.draft(list(requests.values()) + [
            _request("e", 0, (1, 2, 3), 2)])))
        for key, (stream, sequence) in sent.items():
            chunk = await stream.answer(sequence)
            assert chunk.sequence == sequence
            assert_matches(chunk, expected[key], sampled=False)
        assert list(running.worker.batch_sizes) == [5]
        assert first.received.keys() == {1, 2, 3} and second.received.keys() == {1, 2}


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_sync_batch_is_drafted_at_once_and_answered_in_one_message(params) -> None:
    reference = CountingDrafter()
    # A long batch window that a batch message must not wait for.
    async with _serving(batch_wait_ms=5000.0) as (running, stub):
        stream = Stream(stub)
        requests = [_request(sid, 0, prompt, 3, params) for sid, prompt in PROMPTS.items()]
        bad = drafter_pb2.DraftSync(session_id="bad", num_cached_tokens=-1, num_tokens=2)
        syncs = [_sync(0, r).sync for r in requests[:2]] + [bad] + [_sync(0, r).sync for r in requests[2:]]
        started = time.monotonic()
        sequence = await stream.send(drafter_pb2.DraftRequest(sync_batch=drafter_pb2.DraftSyncBatch(syncs=syncs)))
        answer = await stream.answer(sequence)
        assert time.monotonic() - started < 4.0  # not held for the batch window
        assert answer.sequence == sequence and answer.last and not answer.tokens
        assert [part.session_id for part in answer.batch] == ["a", "b", "bad", "c", "d"]
        expected = reference.draft(requests)
        for part, want in zip([p for p in answer.batch if p.session_id != "bad"], expected):
            assert_matches(part, want, sampled=not params.greedy)
        assert answer.batch[2].status == common_pb2.SESSION_STATUS_INVALID
        assert "num_cached_tokens" in answer.batch[2].error_message
        assert list(running.worker.batch_sizes) == [4]  # one forward batch for the whole message


async def test_a_second_sync_of_a_session_waits_for_the_next_batch() -> None:
    reference = CountingDrafter()
    async with _serving(batch_wait_ms=200.0) as (running, stub):
        stream = Stream(stub)
        first = _request("a", 0, PROMPTS["a"], 3)
        s1 = await stream.send(first)
        s2 = await stream.send(_request("b", 0, PROMPTS["b"], 2))
        want = reference.draft([first])[0]
        follow = _request("a", len(PROMPTS["a"]), [want.tokens[0], 3], 2)
        s3 = await stream.send(follow)
        assert_matches(await stream.answer(s1), want, sampled=False)
        assert_matches(await stream.answer(s3), reference.draft([follow])[0], sampled=False)
        assert (await stream.answer(s2)).status == common_pb2.SESSION_STATUS_OK
        assert list(running.worker.batch_sizes) == [2, 1]


# ---- draft-ahead ------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_confirmed_ahead_path_is_answered_without_forwards(params) -> None:
    plain = CountingDrafter()  # the same syncs, never drafting ahead
    core = CountingDrafter()
    async with _serving(core, draft_ahead_tokens=4) as (running, stub):
        stream = Stream(stub)
        prompt = PROMPTS["c"]
        first = _request("s", 0, prompt, 3, params)
        chunk = await stream.answer(await stream.send(first))
        assert_matches(chunk, plain.draft([first])[0], sampled=not params.greedy)
        await _wait_for(lambda: len(core.ahead_tokens("s")) == 4)  # drafted while "verifying"
        ahead = core.ahead_tokens("s")
        # The verifier accepted all 3 drafts and its bonus token equals the first ahead token.
        follow = _request("s", len(prompt), list(chunk.tokens) + [ahead[0]], 3, params)
        answer = await stream.answer(await stream.send(follow))
        plain_forwards = plain.num_forwards
        want = plain.draft([follow])[0]
        assert plain.num_forwards > plain_forwards
        assert core.draft_forwards[-1] == 0  # answered from the ahead path
        assert tuple(answer.tokens) == ahead[1:4]
        assert_matches(answer, want, sampled=not params.greedy)
        assert running.worker.num_ahead_steps >= 4


async def test_contradicted_ahead_path_is_discarded() -> None:
    plain = CountingDrafter()
    core = CountingDrafter()
    async with _serving(core, draft_ahead_tokens=6) as (_, stub):
        stream = Stream(stub)
        prompt = PROMPTS["a"]
        first = _request("s", 0, prompt, 4)
        chunk = await stream.answer(await stream.send(first))
        plain.draft([first])
        await _wait_for(lambda: len(core.ahead_tokens("s")) == 6)
        correction = next(t for t in range(4, VOCAB) if t != chunk.tokens[2])
        follow = _request("s", len(prompt), [chunk.tokens[0], chunk.tokens[1], correction], 4)
        answer = await stream.answer(await stream.send(follow))
        assert_matches(answer, plain.draft([follow])[0], sampled=False)
        history = list(prompt) + [chunk.tokens[0], chunk.tokens[1], correction]
        assert_matches(answer, CountingDrafter().draft([_request("s", 0, history, 4)])[0], sampled=False)


# ---- session status, release, profile ---------------------------------------------------------------


async def test_unknown_session_with_cached_tokens_is_a_cache_miss() -> None:
    async with _serving() as (_, stub):
        stream = Stream(stub)
        chunk = await stream.answer(await stream.send(_request("ghost", 5, (7,), 3)))
        assert chunk.status == common_pb2.SESSION_STATUS_CACHE_MISS
        assert chunk.cache_miss.num_cached_tokens == 0
        assert chunk.base_length == 6 and not chunk.tokens and chunk.last
        # Resending the full history serves it.
        chunk = await stream.answer(await stream.send(_request("ghost", 0, (1, 2, 3, 4, 5, 7), 3)))
        assert chunk.status == common_pb2.SESSION_STATUS_OK and len(chunk.tokens) == 3


async def test_release_frees_sessions() -> None:
    async with _serving() as (running, stub):
        stream = Stream(stub)
        for sid in ("a", "b", "c"):
            await stream.answer(await stream.send(_request(sid, 0, PROMPTS[sid], 2)))
        assert running.core.num_sessions == 3
        response = await stub.Release(common_pb2.ReleaseRequest(session_ids=["a", "nobody"]), timeout=5)
        assert response.released_count == 1
        stats = await stub.Stats(common_pb2.StatsRequest(), timeout=5)
        assert stats.active_sessions == 2
        assert stats.capacity_tokens == NUM_SLOTS * MAX_CONTEXT
        assert 0 < stats.cached_tokens <= stats.capacity_tokens
        # A release on the stream takes effect in order: the sync after it misses.
        await stream.send(_release(0, "b"))
        miss_b = await stream.answer(await stream.send(_request("b", len(PROMPTS["b"]), (9,), 2)))
        miss_a = await stream.answer(await stream.send(_request("a", len(PROMPTS["a"]), (9,), 2)))
        ok_c = await stream.answer(await stream.send(_request("c", len(PROMPTS["c"]), (9,), 2)))
        assert miss_a.status == miss_b.status == common_pb2.SESSION_STATUS_CACHE_MISS
        assert ok_c.status == common_pb2.SESSION_STATUS_OK
        assert running.core.num_sessions == 1


async def test_profile_reports_model_tokenizer_and_costs() -> None:
    async with _serving() as (_, stub):
        profile = await stub.Profile(common_pb2.ProfileRequest(), timeout=5)
    assert profile.model_name == "tiny-drafter"
    assert profile.tokenizer_fingerprint == tokenizer_fingerprint(make_tiny_tokenizer(VOCAB))
    assert profile.vocab_size == VOCAB
    assert [row.batch_tokens for row in profile.cost_table] == [1, 2, 4]
    assert all(row.forward_seconds > 0 for row in profile.cost_table)
    assert profile.max_context_tokens == MAX_CONTEXT
    assert profile.max_sessions == NUM_SLOTS
    assert profile.draft_top_k == TOP_K
    assert profile.max_draft_tokens == 16


# ---- failures stay local ------------------------------------------------------------------------------


async def test_bad_request_fails_alone() -> None:
    reference = CountingDrafter()
    async with _serving(batch_wait_ms=300.0) as (running, stub):
        stream = Stream(stub)
        good = [_request("a", 0, PROMPTS["a"], 3), _request("b", 0, PROMPTS["b"], 3)]
        s_good_a = await stream.send(good[0])
        s_bad = await stream.send(_request("x", 0, (1, 2, VOCAB + 5), 3))  # token outside the vocabulary
        s_good_b = await stream.send(good[1])
        s_unseeded = await stream.send(_request("y", 0, (1, 2), 3, SamplingParams(temperature=1.0)))
        s_empty = await stream.send(drafter_pb2.DraftRequest())  # neither sync nor release
        expected = reference.draft(good)
        assert_matches(await stream.answer(s_good_a), expected[0], sampled=False)
        assert_matches(await stream.answer(s_good_b), expected[1], sampled=False)
        bad = await stream.answer(s_bad)
        assert bad.status == common_pb2.SESSION_STATUS_INVALID and "vocabulary" in bad.error_message
        assert bad.session_id == "x" and not bad.tokens and bad.last
        assert (await stream.answer(s_unseeded)).status == common_pb2.SESSION_STATUS_INVALID
        assert (await stream.answer(s_empty)).status == common_pb2.SESSION_STATUS_INVALID
        # The stream keeps serving.
        follow = _request("a", len(PROMPTS["a"]), (expected[0].tokens[0], 5), 2)
        assert_matches(await stream.answer(await stream.send(follow)), reference.draft([follow])[0], sampled=False)
        assert "x" not in running.core.slots


async def test_stopping_ends_open_streams_cleanly_without_waiting_out_the_grace_period() -> None:
    running = await start_drafter(_config(grace_s=10.0), drafter_core=CountingDrafter(),
                                  tokenizer=make_tiny_tokenizer(VOCAB))
    channel = insecure_channel(running.address)
    try:
        stream = Stream(drafter_pb2_grpc.DrafterStub(channel))
        sequence = await stream.send(_request("a", 0, PROMPTS["a"], 2))
        assert (await stream.answer(sequence)).status == common_pb2.SESSION_STATUS_OK
        started = time.monotonic()
        await running.stop()
        assert time.monotonic() - started < 5.0  # the open stream did not hold the drain for 10 s
        assert await asyncio.wait_for(stream.call.read(), 5.0) is grpc.aio.EOF
        assert await stream.call.code() == grpc.StatusCode.OK  # ended, not cancelled
    finally:
        await channel.close()
        await running.stop()


async def test_closed_stream_keeps_sessions_and_the_server_healthy() -> None:
    reference = CountingDrafter()
    async with _serving(batch_wait_ms=300.0) as (running, stub):
        stream = Stream(stub)
        first = _request("a", 0, PROMPTS["a"], 3)
        chunk = await stream.answer(await stream.send(first))
        reference.draft([first])
        # Close with a sync still waiting for its batch.
        await stream.send(_request("b", 0, PROMPTS["b"], 3))
        stream.call.cancel()
        other = Stream(stub)
        follow = _request("a", len(PROMPTS["a"]), (chunk.tokens[0], 7), 3)
        # A new stream resumes the session: nothing was freed with the old stream.
        assert_matches(await other.answer(await other.send(follow)), reference.draft([follow])[0], sampled=False)
        assert "a" in running.core.slots
        assert "b" not in running.core.slots  # the closed stream's pending sync was dropped
        async with insecure_channel(running.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stats = await stub.Stats(common_pb2.StatsRequest(), timeout=5)
        assert stats.in_flight == 0


# ---- the command line -------------------------------------------------------------------------------


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


def test_python_m_drafter_serves_and_stops_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "SPECMESH_DRAFTER_DRAFT_AHEAD_TOKENS": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "drafter", "--model", "prompt-lookup", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 40
        while _health_status(address) != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "drafter did not become SERVING"
            time.sleep(0.2)
        with grpc.insecure_channel(address) as channel:
            stub = drafter_pb2_grpc.DrafterStub(channel)
            chunks = list(stub.Draft(iter([_sync(1, _request("s", 0, (5, 6, 7, 5, 6), 2))]), timeout=10))
        assert [tuple(c.tokens) for c in chunks] == [(7, 5)]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
        assert process.returncode == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_context_copies_reach_the_stream_and_the_metric() -> None:
    """A model drafter with context copying, behind the service: a repeating history is
    continued by copies (q the point mass on each), and /metrics counts them."""
    from drafter.context_copy import ContextCopyRule
    from specmesh import metrics

    core = ModelDrafter(ModelRunner(_MODEL, NUM_SLOTS, MAX_CONTEXT), name="tiny-drafter", draft_top_k=TOP_K,
                        context_copy=ContextCopyRule(below_probability=2.0))
    before = metrics.REGISTRY.get_sample_value("specmesh_drafter_copied_tokens_total") or 0.0
    cycle = [3, 9, 14, 21, 7]
    async with _serving(core) as (_, stub):
        stream = Stream(stub)
        sequence = await stream.send(_request("s", 0, cycle * 2 + cycle[:2], 4))
        chunk = await stream.answer(sequence)
        assert list(chunk.tokens) == [14, 21, 7, 3]
        await stream.call.done_writing()
    assert core.num_copied_tokens == 4
    after = metrics.REGISTRY.get_sample_value("specmesh_drafter_copied_tokens_total")
    assert after - before == 4
