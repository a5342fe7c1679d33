"""The OpenAI-compatible HTTP API of the gateway, next to its gRPC API in the same process: the
official `openai` client unchanged (same tokens as gRPC for the same seed), API keys on both
transports, OpenAI-style errors for what is not supported, per-key rate limits with retry hints,
queue timeouts, client disconnects freeing the scheduler session, /healthz, /metrics, /v1/models.

The gateway runs on a background event loop (tests/gateway_harness.py) in front of the
engine-backed scheduler with a tiny random Llama, so these tests are synchronous.
"""

from __future__ import annotations

import json
import logging
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specmesh.client import SpecmeshClient, SpecmeshClientError
from tests.gateway_harness import MESSAGES, PROMPT, GatewayStack, Throttle, make_engine, save_model_dir

KEY = "sk-test-5f1e2d3c4b5a"
OTHER_KEY = "sk-other-0a9b8c7d"
AUTH = {"authorization": f"Bearer {KEY}"}
SAMPLING = dict(temperature=0.9, top_p=0.95, seed=1234)


@pytest.fixture(scope="module")
def throttle() -> Throttle:
    return Throttle()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, throttle):
    running = GatewayStack.start(make_engine(throttle), save_model_dir(tmp_path_factory.mktemp("tiny")))
    yield running
    running.close()


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    keys_file.write_text(f"{KEY}\n")
    return stack.gateway(api_keys_file=str(keys_file), api_keys=(OTHER_KEY,))


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.http_url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def grpc_generate(gateway, key: str = KEY, **options):
    with SpecmeshClient(gateway.address, api_key=key) as specmesh:
        return specmesh.generate(timeout=30, **options)


# ---------------------------------------------------------------------------- openai client parity


def test_openai_completions_match_grpc_for_the_same_seed(client, gateway, stack):
    expected = grpc_generate(gateway, prompt=PROMPT, max_tokens=24, top_k=20, **SAMPLING)
    assert len(expected.token_ids) == 24
    extra = {"top_k": 20, "return_token_ids": True}
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, extra_body=extra, **SAMPLING)
    choice = whole.choices[0]
    assert choice.text == expected.text and choice.to_dict()["token_ids"] == list(expected.token_ids)
    assert choice.finish_reason == "length" == expected.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        expected.usage.prompt_tokens, expected.usage.completion_tokens)
    assert whole.object == "text_completion" and whole.model == "tiny"

    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra, **SAMPLING))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert [t for c in text_chunks for t in c.choices[0].to_dict()["token_ids"]] == list(expected.token_ids)
    assert len(text_chunks) > 2  # streamed, not one blob
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices

    # Greedy completions are the engine's own greedy output.
    reference = stack.reference(16, prompt=PROMPT)
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert greedy.choices[0].to_dict()["token_ids"] == reference.token_ids
    assert greedy.choices[0].text == reference.text


def test_openai_chat_matches_grpc_for_the_same_seed(client, gateway):
    expected = grpc_generate(gateway, messages=MESSAGES, max_tokens=20, **SAMPLING)
    extra = {"return_token_ids": True}
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, logprobs=True,
                                           extra_body=extra, **SAMPLING)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.to_dict()["token_ids"] == list(expected.token_ids)
    assert whole.usage.prompt_tokens == expected.usage.prompt_tokens
    assert len(choice.logprobs.content) == len(expected.token_ids)
    assert all(entry.logprob <= 0 for entry in choice.logprobs.content)

    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=20, stream=True,
                                            extra_body=extra, **SAMPLING)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [t for c in chunks for t in c.choices[0].to_dict().get("token_ids", [])] == list(expected.token_ids)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_stop_strings_and_models_through_the_openai_client(client, stack):
    reference = stack.reference(30, prompt=PROMPT)
    stop = reference.text.split()[5]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == reference.text[: reference.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=4)


# ---------------------------------------------------------------------------- keys


def test_api_keys_on_both_transports_and_never_in_logs(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    url = gateway.http_url + "/v1/completions"
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": f"Basic {KEY}"}):
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["type"] == "authentication_error"
        assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(gateway.http_url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.http_url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    for key in (None, "sk-wrong"):
        with SpecmeshClient(gateway.address) as specmesh:
            with pytest.raises(SpecmeshClientError) as info:
                specmesh.generate(prompt=PROMPT, max_tokens=2, timeout=10,
                                  metadata={"authorization": f"Bearer {key}"} if key else None)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    # Both configured keys (file and environment entries) work on both transports.
    assert grpc_generate(gateway, key=OTHER_KEY, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    assert httpx.post(url, json=body, headers={"authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    assert httpx.post(url, json=body, headers=AUTH).status_code == 200
    logged = caplog.text + httpx.get(gateway.http_url + "/metrics").text
    assert KEY not in logged and OTHER_KEY not in logged and "sk-wrong" not in logged


# ---------------------------------------------------------------------------- errors


BAD_BODIES = [
    ({"model": "tiny", "prompt": PROMPT, "n": 2}, 400, "n=2"),
    ({"model": "tiny", "prompt": PROMPT, "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": PROMPT, "echo": True}, 400, "echo"),
    ({"model": "tiny", "prompt": PROMPT, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": PROMPT, "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": PROMPT, "logprobs": 5}, 400, "logprobs"),
    ({"model": "tiny", "prompt": PROMPT, "frobnicate": 1}, 400, "'frobnicate'"),
    ({"model": "tiny", "prompt": [1, 2, 3]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"prompt": PROMPT}, 400, "model is required"),
    ({"model": "other", "prompt": PROMPT}, 404, "does not exist"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 10**40}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": "12"}, 400, "max_tokens must be an integer"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": True}, 400, "max_tokens must be an integer"),
    ({"model": "tiny", "prompt": PROMPT, "temperature": "hot"}, 400, "temperature must be a number"),
    ({"model": "tiny", "prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": PROMPT, "seed": -5}, 400, "seed"),
    ({"model": "tiny", "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": PROMPT, "stop": [1]}, 400, "stop"),
    ({"model": "tiny", "prompt": PROMPT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": " ".join(["cat"] * 100)}, 400, "max_prompt_tokens"),
    ({"model": "tiny", "prompt": PROMPT, "max_tokens": 300}, 400, "context"),  # the scheduler's refusal
]
BAD_CHAT_BODIES = [
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "only text"),
    ({"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "'tools'"),
    ({"model": "tiny", "messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, 400, "disagree"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 9}, 400, "messages has 9"),
]


@pytest.mark.parametrize("path,body,status,mentioned",
                         [("/v1/completions", *case) for case in BAD_BODIES]
                         + [("/v1/chat/completions", *case) for case in BAD_CHAT_BODIES])
def test_unsupported_options_and_bad_fields_are_openai_errors(gateway, path, body, status, mentioned):
    answer = httpx.post(gateway.http_url + path, json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert mentioned in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_openai_client_surfaces_bad_requests(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=3)
    assert "n=3" in info.value.message


def test_malformed_bodies_and_unknown_routes(gateway):
    url = gateway.http_url + "/v1/completions"
    for content in (b"", b"not json", b"[1, 2]", b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
                    b'{"model": "tiny", "prompt": "\xff\xfe"}', b"[" * 50_000 + b"]" * 50_000):
        answer = httpx.post(url, content=content, headers=AUTH)
        assert answer.status_code == 400, (content[:40], answer.text)
    answer = httpx.post(url, content=b"x" * (2 << 20), headers=AUTH)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
    assert httpx.get(gateway.http_url + "/v1/nothing").status_code == 404
    assert httpx.get(url, headers=AUTH).status_code == 405


# ---------------------------------------------------------------------------- rate limits


def test_rate_limit_per_key_across_http_and_grpc_with_retry_hints(stack):
    gateway = stack.gateway(api_keys=(KEY, OTHER_KEY), rate_limit_rpm=3)
    url = gateway.http_url + "/v1/completions"
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(url, json=body, headers=AUTH).status_code == 200
    assert grpc_generate(gateway, prompt=PROMPT, max_tokens=2).finish_reason == "length"
    assert httpx.post(url, json=body, headers=AUTH).status_code == 200
    refused = httpx.post(url, json=body, headers=AUTH)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request refills in 20 s
    with pytest.raises(SpecmeshClientError) as info:
        grpc_generate(gateway, prompt=PROMPT, max_tokens=2)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and 0 < info.value.retry_after_s <= 20
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=gateway.http_url + "/v1", api_key=KEY, max_retries=0).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=2)
    # Another key has its own buckets.
    assert grpc_generate(gateway, key=OTHER_KEY, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_token_limit_reserves_max_tokens_and_refunds_what_was_not_generated(stack):
    gateway = stack.gateway(api_keys=(KEY,), rate_limit_tpm=100)
    reference = stack.reference(40, prompt=PROMPT)
    stop = reference.text.split()[2]  # ends the request after a few tokens
    prompt_tokens = len(stack.engine.encode(PROMPT))
    # 9 + 80 = 89 reserved; a stop string ends it early and the rest comes back ...
    first = grpc_generate(gateway, prompt=PROMPT, max_tokens=80, stop=[stop])
    assert first.finish_reason == "stop" and first.usage.completion_tokens < 10
    deadline = time.monotonic() + 2.0
    while True:  # the refund is settled in the background
        try:
            second = grpc_generate(gateway, prompt=PROMPT, max_tokens=80, stop=[stop])
            break
        except SpecmeshClientError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert second.text == first.text
    # ... but a request that cannot fit the remaining tokens waits, and one larger than the
    # whole minute's allowance is refused as invalid.
    answer = httpx.post(gateway.http_url + "/v1/completions", headers=AUTH,
                        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 100 - prompt_tokens})
    assert answer.status_code == 429
    answer = httpx.post(gateway.http_url + "/v1/completions", headers=AUTH,
                        json={"model": "tiny", "prompt": PROMPT, "max_tokens": 200})
    assert answer.status_code == 400 and "tokens per minute" in answer.json()["error"]["message"]


# ---------------------------------------------------------------------------- overload, disconnects


def test_queue_timeout_is_503_and_a_client_leaving_the_queue_frees_its_place(stack, throttle):
    gateway = stack.gateway(max_concurrent_requests=1, max_queued_requests=1, queue_timeout_s=0.2)
    url = gateway.http_url + "/v1/completions"
    throttle.delay_s = 0.02
    try:
        with httpx.stream("POST", url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True},
                          timeout=30) as holder:
            lines = holder.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # admitted: it holds the only slot
            started = time.monotonic()
            answer = httpx.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2})
            waited = time.monotonic() - started
            # A client that gives up while queued (here after 0.1 s of a 0.2 s queue timeout)
            # takes its place with it: the next one queues instead of being refused as "full".
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}, timeout=0.1)
            assert wait_for(lambda: stack.loop.call(lambda: gateway.door.admission.queued) == 0, 0.08)
            snapshot = stack.loop.call(gateway.door.admission.snapshot)
            assert (snapshot.refused_queue_full_total, snapshot.refused_queue_timeout_total) == (0, 1)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "overloaded"
        assert 0.15 < waited < 1.5 and int(answer.headers["retry-after"]) >= 1
        assert "within 0.20 s" in answer.json()["error"]["message"]
        assert stack.wait_idle(2.0)
    finally:
        throttle.delay_s = 0.0
    assert stack.loop.call(lambda: gateway.door.admission.running) == 0


def test_http_disconnects_free_the_slot_and_the_scheduler_session(gateway, stack, throttle):
    url = gateway.http_url + "/v1/chat/completions"
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 200}
    throttle.delay_s = 0.03
    try:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url, json={**body, "stream": True}, headers=AUTH) as answer:
                lines = answer.iter_lines()
                assert next(lines).startswith("data: ")
                assert next(l for l in lines if l.startswith("data: "))  # tokens are flowing
                assert not stack.idle()
            # Leaving the block closed the connection mid-stream.
        assert stack.wait_idle(2.0)
        # Non-streaming: the client gives up (timeout) while the request runs.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, headers=AUTH, timeout=0.5)
        assert stack.wait_idle(2.0)
    finally:
        throttle.delay_s = 0.0
    assert stack.loop.call(lambda: gateway.door.admission.running) == 0


# ---------------------------------------------------------------------------- service surface


def test_healthz_metrics_and_grpc_health(gateway):
    assert httpx.get(gateway.http_url + "/healthz").json() == {"status": "serving"}
    metrics = httpx.get(gateway.http_url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'specmesh_gateway_requests_total{transport="http",outcome="ok"}' in text
    assert 'specmesh_gateway_requests_total{transport="grpc",outcome="unauthenticated"}' in text
    assert "specmesh_gateway_requests_running 0" in text
    with grpc.insecure_channel(gateway.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_stopping_reports_not_serving_on_http(stack):
    gateway = stack.gateway()
    url = gateway.http_url
    assert httpx.get(url + "/healthz").status_code == 200
    stack.loop.run(gateway.stop())
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=2)


def test_sse_error_after_the_stream_started_is_reported_in_the_stream(gateway):
    """The scheduler refuses after admission (prompt + max_tokens beyond its context): the
    error comes as an SSE data event with an OpenAI error body, then [DONE]."""
    events = []
    with httpx.stream("POST", gateway.http_url + "/v1/chat/completions", headers=AUTH,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 300, "stream": True}) as answer:
        assert answer.status_code == 200
        events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "invalid_request_error"


def test_sampling_params_reach_the_scheduler(gateway, stack):
    httpx.post(gateway.http_url + "/v1/completions", headers={**AUTH, "x-request-id": "http-params"},
               json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
                     "top_k": -1, "seed": 7, "disable_speculation": True})
    sent = stack.loop.call(lambda: stack.scheduler.servicer.requests["http-params"])
    assert sent.sampling.temperature == pytest.approx(0.5) and sent.sampling.top_p == pytest.approx(0.9)
    assert sent.sampling.top_k == 0 and sent.sampling.seed == 7 and sent.sampling.has_seed
    assert sent.disable_speculation and sent.max_tokens == 3
