"""The verifier replica: grpc.aio server, model load, start-up profile, TTL eviction, stop.

Start-up order: listen with health NOT_SERVING, load the model (or take an injected one),
profile the forward cost, then SERVING. On SIGTERM/SIGINT health turns NOT_SERVING first,
in-flight calls drain for up to grace_s, then the batcher and the eviction task stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch

from specmesh.grpc_server import GrpcService, ServesGrpc
from specmesh.metrics import serve_metrics_for
from specmesh.model_loading import load_causal_lm, tokenizer_fingerprint
from specmesh.model_runner import ModelRunner
from specmesh.v1 import verifier_pb2_grpc
from verifier.config import VerifierConfig
from verifier.microbatch import BatcherClosedError, VerifyBatcher
from verifier.profiling import ReplicaProfile, measure_forward_costs
from verifier.servicer import SERVICE_NAME, VerifierServicer
from verifier.verification import VerifierCore

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RunningVerifier(ServesGrpc):
    config: VerifierConfig
    service: GrpcService
    core: VerifierCore
    batcher: VerifyBatcher
    profile: ReplicaProfile

    async def wait(self) -> None:
        """Return once the replica has stopped."""
        await self.service.serve_until_stopped()


async def start_verifier(config: VerifierConfig, *, model: Any = None, tokenizer: Any = None) -> RunningVerifier:
    """Start a serving verifier replica in this event loop.

    `model` (a transformers causal LM, used as given: no dtype or device change) and
    `tokenizer` let tests inject in-memory models; without `model`, config.model is loaded
    with config.dtype on config.device. Returns once health is SERVING.
    """
    service = GrpcService(config.host, config.port, [SERVICE_NAME], grace_s=config.grace_s)
    servicer = VerifierServicer()
    verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, service.server)
    await service.start()
    batcher: VerifyBatcher | None = None
    abort_profile = threading.Event()
    try:
        if model is None:
            loaded = await _in_daemon_thread(
                lambda: load_causal_lm(config.model, dtype=getattr(torch, config.dtype), device=config.device))
            model = loaded.model
            tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        runner = await _in_daemon_thread(lambda: ModelRunner(model, config.num_slots, config.max_context))
        core = VerifierCore(runner, idle_ttl_s=config.idle_ttl)
        batcher = VerifyBatcher(
            core, batch_wait_s=config.batch_wait_ms / 1000.0, max_batch_tokens=config.max_batch_tokens)
        cost_table = await batcher.run_exclusive(
            functools.partial(measure_forward_costs, should_stop=abort_profile.is_set), core, config.profile_batch_tokens)
    except BaseException:
        abort_profile.set()
        await service.stop()
        if batcher is not None:
            await batcher.close()
        raise
    profile = ReplicaProfile(
        model_name=config.model,
        vocab_size=runner.vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer) if tokenizer is not None else "",
        max_context_tokens=config.max_context,
        max_sessions=config.num_slots,
        cost_table=tuple(cost_table),
    )
    log.info("cost table (tokens: ms): %s", ", ".join(f"{b}: {1000 * s:.2f}" for b, s in cost_table))
    servicer.attach(batcher, profile)
    eviction = asyncio.create_task(_evict_idle_periodically(batcher, config.idle_ttl), name="verifier-ttl")

    async def shut_down() -> None:
        eviction.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await eviction
        await batcher.close()

    service.on_stop(shut_down)
    serve_metrics_for(service, config.metrics_port, config.host)
    await service.set_serving()
    return RunningVerifier(config, service, core, batcher, profile)


async def serve(config: VerifierConfig) -> None:
    """Run one replica until SIGTERM or SIGINT (also during the model load), then stop cleanly."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        starting = asyncio.ensure_future(start_verifier(config))
        stopping = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while starting; exiting")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            return
        if starting.exception() is not None:
            stopping.cancel()
        running = starting.result()  # raises the start-up error, if any
        log.info("verifier for %s serving on %s", config.model, running.address)
        try:
            await stopping
        finally:
            await running.stop()
        log.info("verifier stopped")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _evict_idle_periodically(batcher: VerifyBatcher, idle_ttl_s: float | None) -> None:
    """Idle replicas get no Verify calls (which evict too), so sweep on a timer."""
    if idle_ttl_s is None:
        return
    interval = max(0.05, min(5.0, idle_ttl_s / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            evicted = await batcher.evict_idle()
        except BatcherClosedError:
            return
        if evicted:
            log.info("evicted %d idle sessions", len(evicted))


async def _in_daemon_thread(function: Callable[[], T]) -> T:
    """Run a blocking start-up step in a daemon thread, so SIGTERM during a long model load
    can end the process without waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = function()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            outcome: tuple[Any, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="verifier-start-up", daemon=True).start()
    return await future
