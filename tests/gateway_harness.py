"""A gateway (gRPC + OpenAI HTTP) in front of the engine-backed scheduler (tests/engine_scheduler.py),
all running in one asyncio loop on a background thread, so plain synchronous tests (the `openai`
client, httpx, grpc's blocking stubs, hypothesis) can drive it. Also: the tiny model REF on disk,
and `python -m gateway` processes for multi-process tests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import httpx

from gateway.config import GatewayConfig
from gateway.server import RunningGateway, start_gateway
from specmesh.engine import Engine, EngineConfig, build_drafter
from specmesh.local_cluster import free_port
from specmesh.sampling_params import SamplingParams
from tests.engine_scheduler import RunningEngineScheduler, start_engine_scheduler
from tests.tiny_models import make_tiny_llama, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
MODEL_SEED = 26  # greedy output from PROMPT runs 200+ tokens without EOS (tests/test_gateway.py)
PROMPT = "the cat sat on the mat and the dog"
MESSAGES = [{"role": "system", "content": "hello world"}, {"role": "user", "content": "the cat sat ?"}]
T = TypeVar("T")


class Throttle:
    """Slows every verifier forward while delay_s > 0, so requests overlap in time."""

    delay_s = 0.0

    def __call__(self, module, args) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)


def save_model_dir(directory: Path) -> Path:
    """The verifier's REF as a gateway process sees it: tokenizer, chat template, config."""
    make_tiny_llama(VOCAB, seed=MODEL_SEED).save_pretrained(directory)
    make_tiny_tokenizer(VOCAB).save_pretrained(directory)
    return directory


def make_engine(throttle: Throttle | None = None, num_slots: int = 8, max_context: int = 256) -> Engine:
    model = make_tiny_llama(VOCAB, seed=MODEL_SEED)
    tokenizer = make_tiny_tokenizer(VOCAB)
    config = EngineConfig(num_slots=num_slots, max_context=max_context, draft_length=4)
    drafter = build_drafter("layers:1", model, tokenizer, config)
    if throttle is not None:
        model.lm_head.register_forward_pre_hook(throttle)  # after the drafter's copy: verifier only
    return Engine(model, tokenizer, drafter, config)


class LoopThread:
    """An asyncio event loop on a daemon thread; run() waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def call(self, function: Callable[[], T]) -> T:
        """Run a plain function in the loop's thread (for state owned by the loop)."""
        async def wrapper() -> T:
            return function()
        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class GatewayStack:
    """Scheduler + gateway(s) on a LoopThread."""

    loop: LoopThread
    engine: Engine
    scheduler: RunningEngineScheduler
    model_dir: Path
    gateways: list[RunningGateway] = field(default_factory=list)

    @classmethod
    def start(cls, engine: Engine, model_dir: Path) -> "GatewayStack":
        loop = LoopThread()
        scheduler = loop.run(start_engine_scheduler(engine))
        return cls(loop, engine, scheduler, model_dir)

    def config(self, **overrides: Any) -> GatewayConfig:
        options: dict[str, Any] = dict(
            model=str(self.model_dir), scheduler=self.scheduler.address, host="127.0.0.1", port=0, http_port=0,
            served_model_name="tiny", max_tokens_default=32, max_tokens_limit=512, max_prompt_tokens=64,
            max_stop_strings=4, max_stop_length=32, max_messages=8, grace_s=2.0)
        options.update(overrides)
        return GatewayConfig(**options)

    def gateway(self, **overrides: Any) -> RunningGateway:
        running = self.loop.run(start_gateway(self.config(**overrides), tokenizer=self.engine.tokenizer,
                                              stop_token_ids=[2]))
        self.gateways.append(running)
        return running

    def reference(self, max_tokens: int, prompt: str | None = None, messages=None,
                  params: SamplingParams = SamplingParams()):
        """What the engine alone generates."""
        return self.loop.run(self.engine.generate_ids_async(self.engine.encode(prompt, messages), params,
                                                            max_tokens))

    def idle(self) -> bool:
        return self.loop.call(lambda: self.scheduler.servicer.loop_sessions() == 0
                              and not self.scheduler.servicer.active)

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.02)
        return self.idle()

    def close(self) -> None:
        for running in self.gateways:
            self.loop.run(running.stop())
        self.loop.run(self.scheduler.stop())
        self.loop.close()


# ---------------------------------------------------------------------------- gateway processes


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    grpc_address: str
    http_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self, field_name: str = "VmRSS") -> int:
        """Resident memory (VmRSS) or its peak (VmHWM) in KiB, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} not in /proc/{self.pid}/status")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def spawn_gateway(model_dir: Path, scheduler_address: str, log_dir: Path, *args: str,
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """`python -m gateway` with HTTP, on free loopback ports (not yet waited for)."""
    grpc_port, http_port = free_port(), free_port()
    log_path = log_dir / f"gateway-{grpc_port}.log"
    command = [sys.executable, "-m", "gateway", "--model", str(model_dir), "--scheduler", scheduler_address,
               "--host", "127.0.0.1", "--port", str(grpc_port), "--http-port", str(http_port),
               "--served-model-name", "tiny", "--max-prompt-tokens", "64", "--max-tokens-default", "32", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=full_env, cwd=REPO)
    return GatewayProcess(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", log_path)


def wait_http_healthy(gateway: GatewayProcess, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log_path.read_text()}")
        try:
            if httpx.get(gateway.http_url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"gateway not healthy within {timeout_s} s:\n{gateway.log_path.read_text()}")
