"""The gateway over real gRPC on loopback: a real gateway in front of a Scheduler gRPC service
backed by the in-process Engine (tests/engine_scheduler.py) with a tiny random Llama, an
early-exit drafter and the tiny tokenizer (with a chat template), all float32 on CPU.

Checked through the generated stubs, through specmesh.client (sync and async), and through a
client generated from the .proto files alone in a separate process: greedy output equals the
engine's own, deltas concatenate to the decoded text, stop strings cut, usage and speculation
totals, bad requests, deadline and cancel reaching the scheduler's session, reflection, health.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import GatewayConfig
from gateway.server import RunningGateway, start_gateway
from specmesh.client import AsyncSpecmeshClient, SpecmeshClient, SpecmeshClientError
from specmesh.engine import Engine, EngineConfig, build_drafter
from specmesh.grpc_server import insecure_channel
from specmesh.local_cluster import free_port
from specmesh.sampling_params import SamplingParams
from specmesh.v1 import generation_pb2, generation_pb2_grpc
from tests.engine_scheduler import RunningEngineScheduler, start_engine_scheduler
from tests.tiny_models import make_tiny_llama, make_tiny_tokenizer

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
MODEL_SEED = 26  # greedy output from PROMPT runs 200+ tokens without EOS and is varied
PROMPT = "the cat sat on the mat and the dog"
MESSAGES = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "the cat sat ?"}]
MAX_PROMPT_TOKENS = 64
MAX_TOKENS_LIMIT = 512
ENGINE_CONTEXT = 256  # the scheduler's own limit, below the gateway's max_tokens_limit
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Throttle:
    """Slows every verifier forward (in the engine's worker thread) while delay_s > 0, so a
    request is still running when its deadline passes or its client cancels."""

    delay_s = 0.0

    def __call__(self, module, args) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The verifier's REF as the gateway sees it: tokenizer, chat template, generation config."""
    directory = tmp_path_factory.mktemp("tiny-verifier")
    make_tiny_llama(VOCAB, seed=MODEL_SEED).save_pretrained(directory)
    make_tiny_tokenizer(VOCAB).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def throttle() -> Throttle:
    return Throttle()


@pytest.fixture(scope="module")
def engine(throttle) -> Engine:
    model = make_tiny_llama(VOCAB, seed=MODEL_SEED)
    tokenizer = make_tiny_tokenizer(VOCAB)
    config = EngineConfig(num_slots=8, max_context=ENGINE_CONTEXT, draft_length=4)
    drafter = build_drafter("layers:1", model, tokenizer, config)
    model.lm_head.register_forward_pre_hook(throttle)  # after the drafter's copy: verifier only
    return Engine(model, tokenizer, drafter, config)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler(engine) -> RunningEngineScheduler:
    running = await start_engine_scheduler(engine)
    yield running
    await running.stop()


def gateway_config(model_dir: Path, scheduler_address: str, **overrides) -> GatewayConfig:
    options = dict(model=str(model_dir), scheduler=scheduler_address, host="127.0.0.1", port=0,
                   max_tokens_default=32, max_tokens_limit=MAX_TOKENS_LIMIT, max_prompt_tokens=MAX_PROMPT_TOKENS,
                   max_stop_strings=4, max_stop_length=32, max_messages=8, grace_s=2.0)
    options.update(overrides)
    return GatewayConfig(**options)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_dir, scheduler) -> RunningGateway:
    # No tokenizer passed: the real start path loads it (and the EOS ids) from the REF.
    running = await start_gateway(gateway_config(model_dir, scheduler.address))
    yield running
    await running.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(gateway):
    channel = insecure_channel(gateway.address)
    yield generation_pb2_grpc.GenerationStub(channel)
    await channel.close()


async def collect(stub, timeout: float = 30.0, **fields) -> list[generation_pb2.GenerateResponse]:
    return [r async for r in stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=timeout)]


async def reference(engine: Engine, max_tokens: int, prompt: str | None = None, messages=None):
    """What the engine alone generates (greedy), in this event loop."""
    return await engine.generate_ids_async(engine.encode(prompt, messages), SamplingParams(), max_tokens)


async def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def scheduler_idle(scheduler: RunningEngineScheduler) -> bool:
    return scheduler.servicer.loop_sessions() == 0 and not scheduler.servicer.active


# ---------------------------------------------------------------------------- output


async def test_greedy_prompt_matches_the_engine(stub, engine, scheduler):
    expected = await reference(engine, 40, prompt=PROMPT)
    responses = await collect(stub, prompt=PROMPT, max_tokens=40, request_id="greedy-prompt")
    token_ids = [t for r in responses for t in r.token_ids]
    assert token_ids == expected.token_ids
    text = "".join(r.text for r in responses)
    assert text == expected.text == engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert all("\ufffd" not in r.text for r in responses)
    assert len(responses) > 1  # streamed, not one blob
    assert [r.finish_reason for r in responses[:-1]] == [""] * (len(responses) - 1)
    last = responses[-1]
    assert last.finish_reason == expected.finish_reason
    assert {r.request_id for r in responses} == {"greedy-prompt"}
    # Usage and speculation totals on the last message are the request's.
    assert last.usage.prompt_tokens == len(engine.encode(PROMPT))
    assert last.usage.completion_tokens == len(token_ids)
    stats = scheduler.servicer.final_stats["greedy-prompt"]
    assert (last.speculation.drafted_tokens, last.speculation.accepted_tokens, last.speculation.rounds) == (
        stats.drafted_tokens, stats.accepted_tokens, stats.rounds)
    assert last.speculation.rounds > 0 and last.speculation.drafted_tokens > 0
    assert last.speculation.rounds <= len(token_ids) <= last.speculation.rounds + last.speculation.accepted_tokens
    # Totals grow monotonically along the stream.
    completions = [r.usage.completion_tokens for r in responses]
    assert completions == sorted(completions)
    # The gateway resolved defaults and named the EOS id it read from the model's config.
    sent = scheduler.servicer.requests["greedy-prompt"]
    assert list(sent.stop_token_ids) == [2] and sent.sampling.temperature == 0.0 and not sent.sampling.has_seed


async def test_greedy_messages_use_the_chat_template(stub, engine):
    expected = await reference(engine, 24, messages=MESSAGES)
    responses = await collect(stub, messages=[generation_pb2.ChatMessage(**m) for m in MESSAGES], max_tokens=24)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert "".join(r.text for r in responses) == expected.text
    assert responses[-1].usage.prompt_tokens == len(engine.encode(messages=MESSAGES))
    assert responses[0].request_id  # generated by the gateway


async def test_default_max_tokens_logprobs_and_request_id(stub, engine):
    expected = await reference(engine, 32, prompt="hello world")
    responses = await collect(stub, prompt="hello world", logprobs=True)
    token_ids = [t for r in responses for t in r.token_ids]
    assert token_ids == expected.token_ids  # max_tokens_default = 32
    for r in responses:
        assert [lp.token_id for lp in r.logprobs] == list(r.token_ids)
        assert all(lp.logprob <= 0.0 for lp in r.logprobs)
    ids = {r.request_id for r in responses}
    assert len(ids) == 1 and len(ids.pop()) >= 16


async def test_stop_strings_cut_the_output_and_end_the_session(stub, engine, scheduler):
    full = await reference(engine, 40, prompt=PROMPT)
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = full.text.index(stop)
    responses = await collect(stub, prompt=PROMPT, max_tokens=40, stop=["never-there", stop], request_id="stopped")
    text = "".join(r.text for r in responses)
    assert text == full.text[:cut]
    last = responses[-1]
    assert last.finish_reason == "stop"
    token_ids = [t for r in responses for t in r.token_ids]
    assert token_ids == full.token_ids[: len(token_ids)]
    decoded = engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    assert decoded.startswith(text + stop) and stop not in engine.tokenizer.decode(token_ids[:-1])
    assert last.usage.completion_tokens == len(token_ids) < len(full.token_ids)
    assert await wait_until(lambda: scheduler_idle(scheduler), 5.0)
    assert scheduler.servicer.finish_reasons["stopped"] in ("cancelled", "length", "stop")


# ---------------------------------------------------------------------------- errors


BAD_REQUESTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hello", messages=[generation_pb2.ChatMessage(role="user", content="x")]), "prompt and messages"),
    (dict(messages=[generation_pb2.ChatMessage(role="wizard", content="x")]), "messages[0].role"),
    (dict(prompt="hello", max_tokens=0), "max_tokens"),
    (dict(prompt="hello", max_tokens=10**6), "max_tokens"),
    (dict(prompt="hello", top_p=2.0), "top_p"),
    (dict(prompt="hello", temperature=-1.0), "temperature"),
    (dict(prompt="hello", stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(prompt=" ".join(["cat"] * (MAX_PROMPT_TOKENS + 5))), "max_prompt_tokens"),
    # Passed by the gateway, refused by the scheduler (prompt + max_tokens beyond its context):
    # its INVALID_ARGUMENT and message come through.
    (dict(prompt="hello", max_tokens=ENGINE_CONTEXT + 10), "context"),
]


async def test_bad_requests_are_invalid_argument_and_do_not_disturb_others(stub, engine, scheduler, throttle):
    expected = await reference(engine, 60, prompt=PROMPT)
    assert len(expected.token_ids) == 60
    throttle.delay_s = 0.03
    try:
        good = asyncio.ensure_future(collect(stub, prompt=PROMPT, max_tokens=60))
        await asyncio.sleep(0.05)

        async def bad(fields):
            try:
                await collect(stub, **fields)
            except aio.AioRpcError as error:
                return error.code(), error.details()
            return None, "accepted"

        outcomes = await asyncio.gather(*(bad(fields) for fields, _ in BAD_REQUESTS))
        assert not good.done()  # the bad ones came and went while the good one ran
        responses = await good
    finally:
        throttle.delay_s = 0.0
    for (fields, mentioned), (code, message) in zip(BAD_REQUESTS, outcomes):
        assert code == INVALID, (fields, message)
        assert mentioned in message, (mentioned, message)
    assert [t for r in responses for t in r.token_ids] == expected.token_ids
    assert await wait_until(lambda: scheduler_idle(scheduler), 5.0)


async def test_unreachable_scheduler_is_unavailable(model_dir, engine):
    gateway = await start_gateway(gateway_config(model_dir, f"127.0.0.1:{free_port()}"),
                                  tokenizer=engine.tokenizer, stop_token_ids=[2])
    try:
        async with AsyncSpecmeshClient(gateway.address) as client:
            with pytest.raises(SpecmeshClientError) as info:
                await client.generate(prompt="hello", timeout=10)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.message
    finally:
        await gateway.stop()


# ---------------------------------------------------------------------------- deadline, cancel


async def test_client_deadline_is_honoured_end_to_end(stub, scheduler, throttle):
    throttle.delay_s = 0.03
    try:
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as info:
            await collect(stub, timeout=0.6, prompt=PROMPT, max_tokens=200, request_id="deadline")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 3.0
        # The deadline travelled to the scheduler call, and the session there is gone.
        remaining = scheduler.servicer.time_remaining["deadline"]
        assert remaining is not None and 0 < remaining < 0.7  # the wire rounds the timeout up a little
        assert await wait_until(lambda: scheduler_idle(scheduler), 2.0)
    finally:
        throttle.delay_s = 0.0
    assert scheduler.servicer.finish_reasons["deadline"] == "cancelled"


async def test_client_cancel_frees_the_scheduler_session(stub, scheduler, throttle):
    throttle.delay_s = 0.03
    try:
        call = stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, max_tokens=200, request_id="cancel"))
        first = await call.read()
        assert first.token_ids
        assert scheduler.servicer.loop_sessions() == 1 and "cancel" in scheduler.servicer.active
        call.cancel()
        started = time.monotonic()
        assert await wait_until(lambda: scheduler_idle(scheduler), 2.0)
        assert time.monotonic() - started < 1.0  # about one round (30 ms), not the rest of 200 tokens
    finally:
        throttle.delay_s = 0.0
    assert scheduler.servicer.finish_reasons["cancel"] == "cancelled"


# ---------------------------------------------------------------------------- specmesh.client


async def test_sync_client(gateway, engine, scheduler, throttle):
    expected = await reference(engine, 30, prompt=PROMPT)

    def run_client():
        with SpecmeshClient(gateway.address) as client:
            completion = client.generate(prompt=PROMPT, max_tokens=30, timeout=30, logprobs=True,
                                         metadata={"x-test": "1"})
            with pytest.raises(SpecmeshClientError) as info:
                client.generate(prompt="hello", top_p=2.0)
            stream = client.stream(prompt=PROMPT, max_tokens=200, request_id="sync-cancel")
            first = next(stream)
            stream.close()  # leaving early cancels the request
            return completion, info.value, first

    throttle.delay_s = 0.02
    try:
        completion, error, first = await asyncio.to_thread(run_client)
        assert await wait_until(lambda: scheduler_idle(scheduler), 2.0)
    finally:
        throttle.delay_s = 0.0
    assert list(completion.token_ids) == expected.token_ids and completion.text == expected.text
    assert completion.finish_reason == expected.finish_reason
    assert completion.usage.completion_tokens == len(expected.token_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    assert completion.speculation.rounds > 0
    assert error.code == INVALID and "top_p" in error.message
    assert first.token_ids and first.finish_reason == ""
    assert scheduler.servicer.finish_reasons["sync-cancel"] == "cancelled"


async def test_async_client(gateway, engine):
    expected = await reference(engine, 24, messages=MESSAGES)
    async with AsyncSpecmeshClient(gateway.address) as client:
        completion = await client.generate(messages=MESSAGES, max_tokens=24, timeout=30)
        deltas = [d async for d in client.stream(messages=MESSAGES, max_tokens=24)]
        with pytest.raises(SpecmeshClientError) as info:
            await client.generate(prompt="hello", max_tokens=10, timeout=0.000001)
    assert list(completion.token_ids) == expected.token_ids and completion.text == expected.text
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason and all(not d.finish_reason for d in deltas[:-1])
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------------------- service surface


async def test_reflection_and_health(gateway):
    async with insecure_channel(gateway.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="specmesh.v1.Generation")]
        answers = [a async for a in reflection.ServerReflectionInfo(iter(requests), timeout=10)]
        services = {s.name for s in answers[0].list_services_response.service}
        assert {"specmesh.v1.Generation", "grpc.health.v1.Health"} <= services
        assert answers[1].file_descriptor_response.file_descriptor_proto
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "specmesh.v1.Generation"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_graceful_stop_reports_not_serving_and_drains(model_dir, scheduler, engine, throttle):
    gateway = await start_gateway(gateway_config(model_dir, scheduler.address, grace_s=5.0),
                                  tokenizer=engine.tokenizer, stop_token_ids=[2])
    async with insecure_channel(gateway.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        throttle.delay_s = 0.005
        try:
            in_flight = asyncio.ensure_future(collect(generation_pb2_grpc.GenerationStub(channel),
                                                      prompt=PROMPT, max_tokens=40))
            await asyncio.sleep(0.05)
            stopping = asyncio.ensure_future(gateway.stop())  # what SIGTERM runs
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()  # an open Watch would itself hold the drain for the whole grace period
            responses = await in_flight  # drained, not cut
            started = time.monotonic()
            await stopping
            assert time.monotonic() - started < 4.0  # done when the last call ended, not at grace_s
        finally:
            throttle.delay_s = 0.0
    assert responses[-1].finish_reason


# ---------------------------------------------------------------------------- proto-only client

PROTO_ONLY_CLIENT = """
import json, sys
import grpc
from specmesh.v1 import generation_pb2, generation_pb2_grpc

assert generation_pb2.__file__.startswith(sys.argv[2]), generation_pb2.__file__
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = generation_pb2_grpc.GenerationStub(channel)
    request = generation_pb2.GenerateRequest(prompt=sys.argv[3], max_tokens=12, request_id="proto-only")
    responses = list(stub.Generate(request, timeout=30))
    try:
        list(stub.Generate(generation_pb2.GenerateRequest(), timeout=30))
        error = None
    except grpc.RpcError as e:
        error = [e.code().name, e.details()]
print(json.dumps({
    "token_ids": [t for r in responses for t in r.token_ids],
    "text": "".join(r.text for r in responses),
    "finish_reason": responses[-1].finish_reason,
    "completion_tokens": responses[-1].usage.completion_tokens,
    "error": error,
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("gateway", "scheduler", "tests")),
}))
"""


async def test_client_generated_from_the_protos_alone(gateway, engine, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "proto"), f"--python_out={out}",
                    f"--grpc_python_out={out}", *protos], check=True, cwd=REPO / "proto")
    for package in (out / "specmesh", out / "specmesh" / "v1"):
        (package / "__init__.py").touch()  # a regular package, found before the installed project
    (out / "client.py").write_text(PROTO_ONLY_CLIENT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(out)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(out / "client.py"), gateway.address, str(out), PROMPT,
        cwd=out, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    expected = await reference(engine, 12, prompt=PROMPT)
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["finish_reason"] == expected.finish_reason
    assert result["completion_tokens"] == len(expected.token_ids)
    assert result["error"][0] == "INVALID_ARGUMENT" and "prompt" in result["error"][1]
    assert result["project_modules"] == []
