"""Gateways as real `python -m gateway` processes (gRPC + HTTP), in front of the engine-backed
scheduler of this process:

- two gateway processes sharing one real redis-server enforce one API key's request and token
  limits jointly (neither alone would have refused);
- overload: 10x the admission capacity in concurrent requests, over HTTP and gRPC at once: the
  excess is refused at once with 503 / RESOURCE_EXHAUSTED and a retry hint, every admitted
  request completes with exactly the expected output, and the gateway's resident memory stays
  within a stated bound.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest
from grpc import aio

from specmesh.client import SpecmeshClient, SpecmeshClientError
from specmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.gateway_harness import PROMPT, GatewayStack, Throttle, make_engine, save_model_dir, spawn_gateway, \
    wait_http_healthy
from tests.redis_server import redis_process, redis_server  # noqa: F401

KEY = "sk-shared-4d3c2b1a"
TOKEN_KEY = "sk-tokens-9f8e7d"
MAX_CONCURRENT, MAX_QUEUED = 4, 4
CAPACITY = MAX_CONCURRENT + MAX_QUEUED
FLOOD = 10 * CAPACITY
RSS_GROWTH_BOUND_MIB = 32  # stated bound on resident memory growth under the flood


@pytest.fixture(scope="module")
def throttle() -> Throttle:
    return Throttle()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, throttle):
    running = GatewayStack.start(make_engine(throttle), save_model_dir(tmp_path_factory.mktemp("tiny")))
    yield running
    running.close()


def http_completion(gateway, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(gateway.http_url + "/v1/completions", headers={"authorization": f"Bearer {key}"} if key else {},
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens}, timeout=30)


def grpc_completion(gateway, key: str, max_tokens: int) -> int:
    """200 or 429, like HTTP, for counting."""
    with SpecmeshClient(gateway.grpc_address) as client:
        try:
            client.generate(prompt=PROMPT, max_tokens=max_tokens, timeout=30,
                            metadata={"authorization": f"Bearer {key}"} if key else None)
            return 200
        except SpecmeshClientError as error:
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert error.retry_after_s and error.retry_after_s > 0
            return 429


def test_two_gateway_processes_share_one_keys_limits_through_redis(stack, redis_server, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY}\n{TOKEN_KEY}\n")
    args = ("--api-keys-file", str(keys_file), "--redis-url", redis_server, "--rate-limit-rpm", "5",
            "--rate-limit-tpm", "200")
    gateways = [spawn_gateway(stack.model_dir, stack.scheduler.address, tmp_path, *args) for _ in range(2)]
    try:
        for gateway in gateways:
            wait_http_healthy(gateway)
        # 12 requests of one key, alternating gateways and transports: 5 pass in all.
        outcomes = []
        for i in range(12):
            gateway = gateways[i % 2]
            if (i // 2) % 2 == 0:
                answer = http_completion(gateway, KEY, 2)
                if answer.status_code == 429:
                    assert int(answer.headers["retry-after"]) >= 1
                outcomes.append((i % 2, answer.status_code))
            else:
                outcomes.append((i % 2, grpc_completion(gateway, KEY, 2)))
        assert [status for _, status in outcomes] == [200] * 5 + [429] * 7, outcomes
        for index in (0, 1):  # each gateway served some and refused some: the limit is joint
            statuses = {status for g, status in outcomes if g == index}
            assert statuses == {200, 429}, outcomes
        # Tokens: 9 prompt + 80 max_tokens reserves 89 of the key's 200 per minute; two requests
        # (one per gateway) fit, the third (either gateway) does not.
        assert http_completion(gateways[0], TOKEN_KEY, 80).status_code == 200
        assert grpc_completion(gateways[1], TOKEN_KEY, 80) == 200
        refused = http_completion(gateways[0], TOKEN_KEY, 80)
        assert refused.status_code == 429 and "tokens/min" in refused.json()["error"]["message"]
        assert http_completion(gateways[1], TOKEN_KEY, 80).status_code == 429
        metrics = httpx.get(gateways[0].http_url + "/metrics").text
        assert "specmesh_gateway_rate_limit_local_decisions_total 0" in metrics  # Redis decided
    finally:
        for gateway in gateways:
            assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]
    logs = "".join(g.log_path.read_text() for g in gateways)
    assert KEY not in logs and TOKEN_KEY not in logs


async def flood(gateway, expected_text: str, expected_ids: list[int], count: int) -> list[tuple[str, str]]:
    """count concurrent requests, half HTTP and half gRPC, all started at once."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http, aio.insecure_channel(gateway.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        await channel.channel_ready()
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "return_token_ids": True}

        async def over_http() -> tuple[str, str]:
            answer = await http.post(gateway.http_url + "/v1/completions", json=body)
            if answer.status_code == 200:
                choice = answer.json()["choices"][0]
                correct = choice["text"] == expected_text and choice["token_ids"] == expected_ids
                return "admitted", "correct" if correct else f"wrong: {choice}"
            error = answer.json()["error"]
            assert answer.status_code == 503 and error["code"] == "overloaded", answer.text
            assert int(answer.headers["retry-after"]) >= 1
            return "refused", "503"

        async def over_grpc() -> tuple[str, str]:
            request = generation_pb2.GenerateRequest(prompt=PROMPT, max_tokens=24)
            call = stub.Generate(request, timeout=60)
            try:
                responses = [r async for r in call]
            except aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                assert float(dict(error.trailing_metadata())["retry-after"]) > 0
                return "refused", "RESOURCE_EXHAUSTED"
            text = "".join(r.text for r in responses)
            ids = [t for r in responses for t in r.token_ids]
            return "admitted", "correct" if (text, ids) == (expected_text, expected_ids) else f"wrong: {text!r}"

        return await asyncio.gather(*(over_http() if i % 2 else over_grpc() for i in range(count)))


def test_overload_at_ten_times_capacity_refuses_the_excess_and_finishes_the_rest(stack, throttle, tmp_path):
    gateway = spawn_gateway(stack.model_dir, stack.scheduler.address, tmp_path,
                            "--max-concurrent-requests", str(MAX_CONCURRENT), "--max-queued-requests",
                            str(MAX_QUEUED), "--queue-timeout-s", "30")
    reference = stack.reference(24, prompt=PROMPT)
    try:
        wait_http_healthy(gateway)
        # Warm both transports (first-use allocations are not what the bound is about).
        assert http_completion(gateway, "", 24).status_code == 200
        assert grpc_completion(gateway, "", 24) == 200
        rss_before = gateway.rss_kib()
        throttle.delay_s = 0.05  # admitted requests take ~1 s: the whole flood overlaps them
        started = time.monotonic()
        try:
            results = asyncio.run(flood(gateway, reference.text, reference.token_ids, FLOOD))
        finally:
            throttle.delay_s = 0.0
        elapsed = time.monotonic() - started
        peak_growth_mib = (gateway.rss_kib("VmHWM") - rss_before) / 1024
        admitted = [outcome for kind, outcome in results if kind == "admitted"]
        refused = [outcome for kind, outcome in results if kind == "refused"]
        print(f"\noverload: {FLOOD} concurrent requests at capacity {CAPACITY} ({MAX_CONCURRENT} running + "
              f"{MAX_QUEUED} queued): {len(admitted)} admitted ({admitted.count('correct')} correct), "
              f"{len(refused)} refused ({refused.count('503')} HTTP 503, "
              f"{refused.count('RESOURCE_EXHAUSTED')} gRPC RESOURCE_EXHAUSTED) in {elapsed:.1f} s; "
              f"RSS {rss_before / 1024:.0f} MiB before, peak growth {peak_growth_mib:.1f} MiB "
              f"(bound {RSS_GROWTH_BOUND_MIB})")
        assert len(admitted) + len(refused) == FLOOD
        assert admitted and all(outcome == "correct" for outcome in admitted), admitted
        assert CAPACITY <= len(admitted) <= 2 * CAPACITY  # the flood arrives while the first ones run
        assert len(refused) >= FLOOD - 2 * CAPACITY
        assert peak_growth_mib < RSS_GROWTH_BOUND_MIB
        metrics = httpx.get(gateway.http_url + "/metrics").text
        assert "specmesh_gateway_requests_running 0" in metrics and "specmesh_gateway_requests_queued 0" in metrics
        assert f'specmesh_gateway_admission_refused_total{{reason="queue_full"}} {len(refused)}' in metrics
        # Served normally again right after.
        assert http_completion(gateway, "", 24).json()["choices"][0]["text"] == reference.text
    finally:
        assert gateway.stop() == 0, gateway.log_path.read_text()[-2000:]
