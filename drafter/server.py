"""Start the drafter service: listen at once (health NOT_SERVING), load the model, profile it,
then report SERVING. Stops gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from drafter.config import DrafterConfig
from drafter.draft_worker import DraftWorker
from drafter.loading import LoadedDrafter, load_drafter
from drafter.profiling import DrafterProfile, build_profile
from drafter.servicer import DrafterServicer
from specmesh.grpc_server import GrpcService, ServesGrpc
from specmesh.metrics import serve_metrics_for
from specmesh.v1 import drafter_pb2, drafter_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["Drafter"].full_name


@dataclass
class RunningDrafter(ServesGrpc):
    service: GrpcService
    core: Any  # the drafter core (ModelDrafter, PromptLookupDrafter, or what the caller passed)
    worker: DraftWorker
    profile: DrafterProfile


async def start_drafter(config: DrafterConfig, *, drafter_core: Any = None, tokenizer: Any = None) -> RunningDrafter:
    """Serve `drafter_core` (tests pass one built in-process) or the core config.model names.

    `tokenizer` is what Profile fingerprints when a core is passed in; otherwise the loaded
    model's (or, for prompt lookup, config.verifier_model's) tokenizer.
    """
    service = GrpcService(config.host, config.port, [SERVICE_NAME], grace_s=config.grace_s)
    servicer = DrafterServicer()
    drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, service.server)
    await service.start()
    worker: DraftWorker | None = None
    try:
        if drafter_core is None:
            loaded = await asyncio.to_thread(load_drafter, config)
        else:
            loaded = LoadedDrafter(drafter_core, tokenizer, getattr(drafter_core, "name", config.model))
        core = loaded.core
        max_batch_sessions = core.runner.cache.num_slots if hasattr(core, "runner") else config.num_slots
        worker = DraftWorker(core, max_draft_tokens=config.max_draft_tokens,
                             draft_ahead_tokens=config.draft_ahead_tokens,
                             batch_wait_s=config.batch_wait_ms / 1000.0, max_batch_sessions=max_batch_sessions)
        profile = await worker.run_exclusive(
            lambda: build_profile(core, model_name=loaded.model_name, tokenizer=loaded.tokenizer,
                                  max_draft_tokens=config.max_draft_tokens, batch_sizes=config.profile_batch_sizes))
    except BaseException:
        if worker is not None:
            await worker.close()
        await service.stop()
        raise
    worker.start()
    servicer.attach(worker, profile)
    service.on_drain(servicer.finish_streams)
    service.on_stop(worker.close)
    serve_metrics_for(service, config.metrics_port, config.host)
    await service.set_serving()
    log.info("drafter %s ready (cost table of %d rows, draft-ahead %d tokens, context copying %s)",
             profile.model_name, len(profile.cost_table), worker.draft_ahead_tokens,
             "on" if getattr(core, "context_copy", None) is not None else "off")
    return RunningDrafter(service, core, worker, profile)


async def serve(config: DrafterConfig) -> None:
    """Run until SIGTERM/SIGINT (what `python -m drafter` and `specmesh serve drafter` run)."""
    running = await start_drafter(config)
    running.service.install_signal_handlers()
    print(f"drafter listening on {running.address}", flush=True)
    await running.service.serve_until_stopped()
