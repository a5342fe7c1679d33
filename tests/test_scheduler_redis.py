"""Schedulers sharing calibration through a real redis-server, and surviving its loss."""

from __future__ import annotations

import asyncio
import concurrent.futures

import grpc
import pytest

from drafter.config import DrafterConfig
from drafter.server import start_drafter
from scheduler.config import SchedulerConfig
from scheduler.server import start_scheduler
from specmesh.engine import Engine, EngineConfig
from specmesh.model_loading import load_causal_lm
from specmesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.redis_server import redis_process  # noqa: F401 - fixture
from tests.tiny_models import save_tiny_model
from verifier.config import VerifierConfig
from verifier.server import start_verifier

MAX_CONTEXT = 192
PROMPTS = [[1] + [(5 * i + 3 * j) % 50 + 4 for j in range(4 + i % 9)] for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("redis") / "model", vocab_size=64, hidden=48, layers=2, seed=4)


@pytest.fixture(scope="module")
def references(model_dir) -> dict[int, list[int]]:
    loaded = load_causal_lm(str(model_dir))
    engine = Engine(loaded.model, loaded.tokenizer, None, EngineConfig(num_slots=16, max_context=MAX_CONTEXT),
                    stop_token_ids=[])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        outs = pool.submit(engine.generate_batch_ids, PROMPTS, max_tokens=40).result()
    return {i: out.token_ids for i, out in enumerate(outs)}


async def generate(address: str, prompt: list[int], max_tokens: int = 40) -> list[int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = scheduler_pb2.ScheduleRequest(prompt_token_ids=prompt, max_tokens=max_tokens,
                                                sampling=common_pb2.SamplingParams(temperature=0.0))
        tokens: list[int] = []
        async for response in stub.Generate(request):
            tokens += list(response.token_ids)
        return tokens


async def start_pair(model_dir, redis_url: str):
    verifier = await start_verifier(VerifierConfig(model=str(model_dir), max_context=MAX_CONTEXT, num_slots=32,
                                                   profile_batch_tokens=(1, 4, 16)))
    # The drafter is the verifier's twin, so drafts are accepted and calibration has signal.
    drafter = await start_drafter(DrafterConfig(model=str(model_dir), max_context=MAX_CONTEXT, num_slots=32,
                                                profile_batch_sizes=(1,)))
    schedulers = [await start_scheduler(SchedulerConfig(verifiers=(verifier.address,), drafters=(drafter.address,),
                                                        redis_url=redis_url, connect_wait_s=30))
                  for _ in range(2)]
    return verifier, drafter, schedulers


def offered(scheduler) -> float:
    policy = scheduler.coordinator.policy
    return policy.calibration.table(policy.model_pair).total_offered


async def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


async def test_two_schedulers_share_calibration_and_survive_redis_loss(model_dir, references, redis_process):
    verifier, drafter, (learner, watcher) = await start_pair(model_dir, redis_process.url)
    try:
        assert offered(watcher) == 0
        outs = await asyncio.gather(*(generate(learner.address, p) for p in PROMPTS[:4]))
        assert outs == [references[i] for i in range(4)]
        # The watcher served nothing, yet its estimates move: they come from Redis.
        assert await wait_for(lambda: offered(watcher) > 0), "calibration did not reach the other scheduler"

        # Redis dies mid-run: every request still completes with identical output.
        tasks = [asyncio.ensure_future(generate(learner.address, p)) for p in PROMPTS[4:]]
        await asyncio.sleep(0.05)
        redis_process.kill()
        outs = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        assert outs == [references[i] for i in range(4, 8)]
        outs = await asyncio.gather(*(generate(watcher.address, p) for p in PROMPTS[:2]))
        assert outs == [references[0], references[1]]

        # Redis returns (empty, no persistence): buffered and new counts flow again.
        redis_process.start()
        before = offered(watcher)
        await asyncio.gather(*(generate(learner.address, p) for p in PROMPTS[2:6]))
        assert await wait_for(lambda: offered(learner) > 0 and offered(watcher) != before, 15), \
            "sharing did not resume after Redis came back"
    finally:
        for service in (learner, watcher, drafter, verifier):
            await service.stop()
