"""The Drafter gRPC API: protobuf in, drafter logic, protobuf out. Nothing else lives here."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from grpc import aio

from drafter import convert
from drafter.draft_stream import DraftStream
from drafter.draft_worker import DraftWorker
from drafter.profiling import DrafterProfile
from specmesh.grpc_errors import NoBackendError
from specmesh.v1 import common_pb2, drafter_pb2, drafter_pb2_grpc

log = logging.getLogger(__name__)


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self) -> None:
        self._worker: DraftWorker | None = None
        self._profile: DrafterProfile | None = None
        self._streams: set[DraftStream] = set()

    def attach(self, worker: DraftWorker, profile: DrafterProfile) -> None:
        """Called once the model is loaded; until then calls answer UNAVAILABLE."""
        self._worker, self._profile = worker, profile

    def finish_streams(self) -> None:
        """Shutting down: every open Draft stream answers what it was sent, then ends (OK)."""
        for stream in list(self._streams):
            stream.end_of_input()

    def _ready(self) -> tuple[DraftWorker, DrafterProfile]:
        if self._worker is None or self._profile is None:
            raise NoBackendError("the drafter is still loading its model")
        return self._worker, self._profile

    async def Draft(self, request_iterator: AsyncIterator[drafter_pb2.DraftRequest],
                    context: aio.ServicerContext) -> AsyncIterator[drafter_pb2.DraftChunk]:
        worker, _ = self._ready()
        stream = DraftStream(worker)
        self._streams.add(stream)

        async def read_requests() -> None:
            try:
                async for message in request_iterator:
                    stream.receive(convert.stream_message_from_proto(message))
            except Exception as error:  # noqa: BLE001 - the client went away mid-read
                log.debug("draft stream input ended: %r", error)
            finally:
                stream.end_of_input()

        reader = asyncio.get_running_loop().create_task(read_requests())
        try:
            async for answer in stream.answers():
                yield convert.answer_to_proto(answer)
        finally:
            self._streams.discard(stream)
            stream.close()
            reader.cancel()

    async def Release(self, request: common_pb2.ReleaseRequest, context: aio.ServicerContext) -> common_pb2.ReleaseResponse:
        worker, _ = self._ready()
        return convert.release_response(await worker.release(convert.release_ids_from_proto(request)))

    async def Profile(self, request: common_pb2.ProfileRequest, context: aio.ServicerContext) -> common_pb2.ProfileResponse:
        _, profile = self._ready()
        return convert.profile_to_proto(profile)

    async def Stats(self, request: common_pb2.StatsRequest, context: aio.ServicerContext) -> common_pb2.StatsResponse:
        worker, _ = self._ready()
        return convert.stats_to_proto(worker.stats())
