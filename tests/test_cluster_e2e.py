"""End to end over real gRPC on loopback: gateway -> scheduler -> drafter/verifier.

The output must be exactly the verifier model's own greedy decoding, also when a drafter or a
verifier process is SIGKILLed mid-stream; cancels and deadlines must free state everywhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import grpc
import pytest

from drafter.config import DrafterConfig
from drafter.server import start_drafter
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from scheduler.config import SchedulerConfig
from scheduler.server import start_scheduler
from specmesh.client import AsyncSpecmeshClient, SpecmeshClientError
from specmesh.engine import Engine, EngineConfig
from specmesh.model_loading import load_causal_lm
from specmesh.v1 import common_pb2, drafter_pb2_grpc, verifier_pb2_grpc
from tests.cluster_helpers import ServiceProcesses
from tests.tiny_models import save_tiny_model
from verifier.config import VerifierConfig
from verifier.server import start_verifier

MAX_CONTEXT = 256


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    # A verifier big enough that a long request takes a few hundred milliseconds, and a drafter
    # that agrees with it (a copy), so the adaptive policy drafts long chunks and failover has
    # real drafter state to lose.
    verifier = save_tiny_model(root / "verifier", vocab_size=64, hidden=64, layers=3, heads=4, kv_heads=2, seed=0)
    drafter = save_tiny_model(root / "drafter", vocab_size=64, hidden=64, layers=3, heads=4, kv_heads=2, seed=0)
    return {"verifier": verifier, "drafter": drafter}


@pytest.fixture(scope="module")
def oracle(model_dirs) -> Engine:
    """The verifier model decoding alone, in-process (itself checked against HF generate)."""
    loaded = load_causal_lm(str(model_dirs["verifier"]))
    return Engine(loaded.model, loaded.tokenizer, None, EngineConfig(num_slots=32, max_context=MAX_CONTEXT))


def prompts(count: int) -> list[str]:
    return [" ".join(f"w{(7 * i + 3 * j) % 50 + 4}" for j in range(3 + (5 * i) % 23)) for i in range(count)]


def expected(oracle: Engine, prompt: str, max_tokens: int) -> list[int]:
    # Engine.generate runs its own event loop, so it runs on another thread here.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: oracle.generate(prompt, max_tokens=max_tokens).token_ids).result()


async def start_in_process(model_dirs, num_verifiers: int = 1, policy: str = "adaptive"):
    verifiers = [await start_verifier(VerifierConfig(model=str(model_dirs["verifier"]), max_context=MAX_CONTEXT,
                                                     num_slots=32, profile_batch_tokens=(1, 8)))
                 for _ in range(num_verifiers)]
    drafter = await start_drafter(DrafterConfig(model=str(model_dirs["drafter"]), max_context=MAX_CONTEXT,
                                                num_slots=32, profile_batch_sizes=(1,)))
    scheduler = await start_scheduler(SchedulerConfig(verifiers=tuple(v.address for v in verifiers),
                                                      drafters=(drafter.address,), connect_wait_s=30,
                                                      policy=policy))
    gateway = await start_gateway(GatewayConfig(model=str(model_dirs["verifier"]), scheduler=scheduler.address))
    return verifiers, drafter, scheduler, gateway


async def stop_all(*services) -> None:
    for service in services:
        await service.stop()


@pytest.mark.parametrize("policy", ["adaptive", "fixed"])
async def test_sixteen_concurrent_greedy_requests_match_the_verifier(model_dirs, oracle, policy):
    verifiers, drafter, scheduler, gateway = await start_in_process(model_dirs, policy=policy)
    try:
        texts = prompts(16)
        async with AsyncSpecmeshClient(gateway.address) as client:
            results = await asyncio.gather(*(client.generate(prompt=t, max_tokens=40) for t in texts))
        for text, result in zip(texts, results):
            assert list(result.token_ids) == expected(oracle, text, 40), text
            assert result.finish_reason in ("stop", "length")
            assert result.usage.completion_tokens == len(result.token_ids)
        assert sum(r.speculation.drafted_tokens for r in results) > 0
        assert sum(r.speculation.accepted_tokens for r in results) > 0
    finally:
        await stop_all(gateway, scheduler, drafter, *verifiers)


async def _session_counts(scheduler, verifier_address: str, drafter_address: str) -> tuple[int, int, int]:
    async with grpc.aio.insecure_channel(verifier_address) as channel:
        verifier_stats = await verifier_pb2_grpc.VerifierStub(channel).Stats(common_pb2.StatsRequest())
    async with grpc.aio.insecure_channel(drafter_address) as channel:
        drafter_stats = await drafter_pb2_grpc.DrafterStub(channel).Stats(common_pb2.StatsRequest())
    return scheduler.coordinator.num_sessions, verifier_stats.active_sessions, drafter_stats.active_sessions


async def _wait_freed(scheduler, verifier, drafter, timeout_s: float = 5.0) -> tuple[int, int, int]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    counts = (-1, -1, -1)
    while asyncio.get_running_loop().time() < deadline:
        counts = await _session_counts(scheduler, verifier.address, drafter.address)
        if counts == (0, 0, 0):
            break
        await asyncio.sleep(0.05)
    return counts


async def test_client_cancel_and_deadline_free_the_session_everywhere(model_dirs):
    verifiers, drafter, scheduler, gateway = await start_in_process(model_dirs)
    try:
        async with AsyncSpecmeshClient(gateway.address) as client:
            # Cancel: leave the stream after the first delta.
            stream = client.stream(prompt=prompts(1)[0], max_tokens=200)
            async for _ in stream:
                break
            await stream.aclose()
            assert await _wait_freed(scheduler, verifiers[0], drafter) == (0, 0, 0)
            # Deadline: a request that cannot finish in 50 ms.
            with pytest.raises(SpecmeshClientError) as error:
                await client.generate(prompt=prompts(2)[1], max_tokens=200, timeout=0.05)
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await _wait_freed(scheduler, verifiers[0], drafter) == (0, 0, 0)
    finally:
        await stop_all(gateway, scheduler, drafter, *verifiers)


async def test_bad_requests_fail_alone(model_dirs, oracle):
    verifiers, drafter, scheduler, gateway = await start_in_process(model_dirs)
    try:
        good = prompts(4)
        too_long = " ".join(["w5"] * (MAX_CONTEXT + 10))
        async with AsyncSpecmeshClient(gateway.address) as client:
            bad_calls = [
                client.generate(prompt="", max_tokens=5),
                client.generate(prompt="w4", max_tokens=0),
                client.generate(prompt="w4", max_tokens=10**9),
                client.generate(prompt="w4", max_tokens=5, top_p=2.0),
                client.generate(prompt="w4", max_tokens=5, temperature=-1.0),
                client.generate(prompt=too_long, max_tokens=5),
            ]
            good_calls = [client.generate(prompt=t, max_tokens=30) for t in good]
            outcomes = await asyncio.gather(*bad_calls, *good_calls, return_exceptions=True)
        for outcome in outcomes[: len(bad_calls)]:
            assert isinstance(outcome, SpecmeshClientError), outcome
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
            assert outcome.message
        for text, outcome in zip(good, outcomes[len(bad_calls):]):
            assert not isinstance(outcome, Exception), outcome
            assert list(outcome.token_ids) == expected(oracle, text, 30)
    finally:
        await stop_all(gateway, scheduler, drafter, *verifiers)


async def _stream_all(client: AsyncSpecmeshClient, texts: list[str], max_tokens: int, started: asyncio.Event):
    first = {"count": 0}

    async def one(text: str) -> list[int]:
        tokens: list[int] = []
        async for delta in client.stream(prompt=text, max_tokens=max_tokens):
            if not tokens and delta.token_ids:
                first["count"] += 1
                if first["count"] == len(texts):
                    started.set()
            tokens += list(delta.token_ids)
        return tokens

    return await asyncio.gather(*(one(t) for t in texts))


@pytest.mark.parametrize("victim,lanes", [("drafter", 1), ("verifier", 1), ("verifier", 2)])
async def test_killing_a_process_mid_stream_changes_nothing(model_dirs, oracle, tmp_path, victim, lanes):
    """lanes 2: each verifier's sessions run in two lanes (rounds in flight at once) when it dies."""
    processes = ServiceProcesses()
    try:
        common = ["--max-context", str(MAX_CONTEXT), "--num-slots", "16"]
        verifier_addresses = [processes.spawn("verifier0", "verifier", "--model", str(model_dirs["verifier"]),
                                              *common, log_dir=tmp_path)]
        if victim == "verifier":
            verifier_addresses.append(processes.spawn("verifier1", "verifier", "--model",
                                                      str(model_dirs["verifier"]), *common, log_dir=tmp_path))
        drafter_address = processes.spawn("drafter", "drafter", "--model", str(model_dirs["drafter"]), *common,
                                          log_dir=tmp_path)
        processes.wait_all()
        scheduler = await start_scheduler(SchedulerConfig(verifiers=tuple(verifier_addresses),
                                                          drafters=(drafter_address,), connect_wait_s=30,
                                                          verify_timeout_s=20, draft_timeout_s=5,
                                                          pipeline_lanes=lanes, lane_min_sessions=1))
        gateway = await start_gateway(GatewayConfig(model=str(model_dirs["verifier"]), scheduler=scheduler.address))
        try:
            texts = prompts(6)
            max_tokens = MAX_CONTEXT - 40
            started = asyncio.Event()
            async with AsyncSpecmeshClient(gateway.address) as client:
                task = asyncio.ensure_future(_stream_all(client, texts, max_tokens, started))
                await asyncio.wait_for(started.wait(), 60)
                processes.kill("drafter" if victim == "drafter" else "verifier1")
                results = await asyncio.wait_for(task, 120)
            for text, tokens in zip(texts, results):
                assert tokens == expected(oracle, text, max_tokens), text
            if victim == "verifier":
                assert scheduler.coordinator.num_verifier_failovers > 0
            else:
                # The scheduler noticed the dead drafter and went on with the verifier alone.
                assert scheduler.coordinator.drafters.pool.num_failures.get(drafter_address, 0) >= 1
        finally:
            await stop_all(gateway, scheduler)
    finally:
        processes.close()
