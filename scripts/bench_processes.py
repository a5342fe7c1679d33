"""The GPU benchmark's side processes: the schedulers, and the clients that load them.

In a deployment the scheduler and the clients (gateway, users) are other processes than the
verifier and drafter, each with its own interpreter. Run in the benchmark's own process they
would share one GIL with the model services, and the per-session Python of streaming 64
responses each round would be charged to the verifier's and drafter's rounds. So the benchmark
keeps the model services (which share the GPU) in its own process and runs:

- SchedulerHost: one process with every scheduler the benchmark compares (one per alpha, and a
  fixed-gamma one), counting acceptance per verification round (RoundCounter) and able to force
  a warm-up exploration;
- ClientHost: one process that sends a slice of Generate requests concurrently and returns
  what each received.

Both answer commands over a multiprocessing pipe; the parent awaits them without blocking its
event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Host:
    """A child process running `target(connection, setup)` and answering one command at a time."""

    def __init__(self, target, setup: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, setup), daemon=True)
        self._process.start()
        self._lock = asyncio.Lock()

    async def call(self, command: str, payload: Any = None, timeout_s: float = 600.0) -> Any:
        async with self._lock:
            loop = asyncio.get_running_loop()
            self._connection.send((command, payload))
            ready = await loop.run_in_executor(None, self._connection.poll, timeout_s)
            if not ready:
                raise TimeoutError(f"side process did not answer {command!r} in {timeout_s} s")
            status, value = self._connection.recv()
        if status == "error":
            raise RuntimeError(f"side process failed on {command!r}: {value}")
        return value

    async def stop(self) -> None:
        try:
            await self.call("stop", timeout_s=30.0)
        except Exception:  # noqa: BLE001 - a dead child is stopped already
            pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


def _serve(connection, handlers: dict, loop: asyncio.AbstractEventLoop) -> None:
    """The child's command loop: each command runs as a coroutine on the child's event loop."""
    while True:
        command, payload = connection.recv()
        try:
            value = asyncio.run_coroutine_threadsafe(handlers[command](payload), loop).result()
            connection.send(("ok", value))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
            connection.send(("error", repr(error)))
        if command == "stop":
            return


def _run_child(connection, make_handlers) -> None:
    import logging
    import threading

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loop = asyncio.new_event_loop()
    handlers = loop.run_until_complete(make_handlers())
    done = threading.Event()

    def commands() -> None:
        try:
            _serve(connection, handlers, loop)
        finally:
            done.set()
            loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=commands, daemon=True).start()
    loop.run_forever()


# ---- schedulers ---------------------------------------------------------------------------------
class RoundCounter:
    """Per-token acceptance from every verification round (the scheduler policy's observe hook):
    the maximum-likelihood alpha = accepted / (accepted + rounds that hit a rejection)."""

    def __init__(self) -> None:
        self.accepted = self.trials = self.verified = self.rounds = 0
        from scheduler import budget_policy, draft_policy, remote_drafter, remote_verifier, speculation_loop

        for policy_class in (budget_policy.AdaptiveBudgetPolicy, draft_policy.FixedDraftLength):
            policy_class.observe = self._counting(policy_class.observe)
        # Where a round's time goes, seen from the scheduler: the round, its Draft and Verify
        # calls (RPC included); the rest is the scheduler's own work.
        self.seconds = {"round": 0.0, "draft_call": 0.0, "verify_call": 0.0}
        self.calls = dict.fromkeys(self.seconds, 0)
        for cls, name, key in ((speculation_loop.SpeculationLoop, "run_round", "round"),
                               (remote_drafter.RemoteDrafter, "draft", "draft_call"),
                               (remote_verifier.RemoteVerifier, "verify", "verify_call")):
            setattr(cls, name, self._timed(getattr(cls, name), key))

    def _timed(self, original, key: str):
        async def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1

        return timed

    def _counting(self, original):
        async def observe(policy, outcomes):
            for outcome in outcomes:
                if outcome.result.cache_miss:
                    continue
                verified, accepted = len(outcome.item.draft_tokens), outcome.result.accepted_count
                self.rounds += 1
                self.verified += verified
                self.accepted += accepted
                self.trials += accepted + (1 if accepted < verified else 0)
            return await original(policy, outcomes)

        return observe

    def take(self) -> dict:
        out = {"alpha_hat": self.accepted / self.trials if self.trials else 0.0,
               "gamma_verified": self.verified / self.rounds if self.rounds else 0.0,
               "policy_rounds": self.rounds, "alpha_trials": self.trials, "alpha_accepted": self.accepted}
        for key, seconds in self.seconds.items():
            out[f"sched_{key}_s"] = seconds
            out[f"sched_{key}_calls"] = self.calls[key]
            self.seconds[key], self.calls[key] = 0.0, 0
        self.accepted = self.trials = self.verified = self.rounds = 0
        return out


def _scheduler_child(connection, configs: dict) -> None:
    async def make_handlers() -> dict:
        from scheduler import budget_policy
        from scheduler.config import SchedulerConfig
        from scheduler.server import start_scheduler

        counter = RoundCounter()
        schedulers = {name: await start_scheduler(SchedulerConfig(**values)) for name, values in configs.items()}
        plan_drafts = budget_policy.AdaptiveBudgetPolicy._plan_drafts

        async def explore(draft_tokens: int) -> None:
            # With an empty calibration (prior acceptance 0.5) and no measured draft cost the
            # adaptive policy finds drafting not worth it and, never drafting, never learns
            # otherwise (seen on the first GPU run): its warm-up rounds draft a fixed length.
            if draft_tokens > 0:
                budget_policy.AdaptiveBudgetPolicy._plan_drafts = lambda self, sessions, caps: {
                    s.session_id: min(draft_tokens, cap) for s, cap in zip(sessions, caps)}
            else:
                budget_policy.AdaptiveBudgetPolicy._plan_drafts = plan_drafts

        async def policy_fits(_) -> dict:
            """Each adaptive scheduler's cost fits per verifier (what its plans believe)."""
            out = {}
            for name, running in schedulers.items():
                for endpoint, loop in running.coordinator._loops.items():
                    if hasattr(loop.policy, "cost_fits"):
                        out[name] = loop.policy.cost_fits()
            return out

        async def addresses(_) -> dict:
            return {name: s.address for name, s in schedulers.items()}

        async def rounds(_) -> dict:
            return counter.take()

        async def stop(_) -> None:
            for s in schedulers.values():
                await s.stop()

        return {"addresses": addresses, "rounds": rounds, "explore": explore, "policy_fits": policy_fits,
                "stop": stop}

    _run_child(connection, make_handlers)


class SchedulerHost(_Host):
    def __init__(self, configs: dict[str, dict]) -> None:
        """configs: name -> SchedulerConfig keyword arguments."""
        super().__init__(_scheduler_child, configs)


# ---- clients ------------------------------------------------------------------------------------
async def generate(stub, request_id: str, prompt: list[int], max_tokens: int, speculation: bool) -> dict:
    from specmesh.v1 import common_pb2, scheduler_pb2

    request = scheduler_pb2.ScheduleRequest(request_id=request_id, prompt_token_ids=prompt,
                                            sampling=common_pb2.SamplingParams(temperature=0.0),
                                            max_tokens=max_tokens, disable_speculation=not speculation)
    start = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    spec = None
    async for message in stub.Generate(request):
        if message.token_ids and ttft is None:
            ttft = time.perf_counter() - start
        tokens.extend(message.token_ids)
        spec = message.speculation
    return {"latency_s": time.perf_counter() - start, "ttft_s": ttft or 0.0, "tokens": tokens,
            "drafted": spec.drafted_tokens if spec else 0, "accepted": spec.accepted_tokens if spec else 0,
            "rounds": spec.rounds if spec else 0}


def _client_child(connection, addresses: dict[str, str]) -> None:
    async def make_handlers() -> dict:
        import grpc

        from specmesh.v1 import scheduler_pb2_grpc

        channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
        stubs = {name: scheduler_pb2_grpc.SchedulerStub(channel) for name, channel in channels.items()}

        async def run(payload: dict) -> dict:
            stub = stubs[payload["scheduler"]]
            start = time.perf_counter()
            samples = await asyncio.gather(*(
                generate(stub, rid, prompt, payload["max_tokens"], payload["speculation"])
                for rid, prompt in zip(payload["ids"], payload["prompts"])))
            return {"samples": samples, "wall_s": time.perf_counter() - start}

        async def stop(_) -> None:
            for channel in channels.values():
                await channel.close()

        return {"run": run, "stop": stop}

    _run_child(connection, make_handlers)


class ClientHost(_Host):
    def __init__(self, addresses: dict[str, str]) -> None:
        super().__init__(_client_child, addresses)

    async def run(self, scheduler: str, ids: list[str], prompts: list[list[int]], max_tokens: int,
                  speculation: bool) -> tuple[list[dict], float]:
        out = await self.call("run", {"scheduler": scheduler, "ids": ids, "prompts": prompts,
                                      "max_tokens": max_tokens, "speculation": speculation})
        return out["samples"], out["wall_s"]
