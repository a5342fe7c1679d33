"""The specmesh.v1.Verifier gRPC servicer: protobuf in, batcher call, protobuf out.

It is registered before the server starts (so health can answer NOT_SERVING while the model
loads) and attached to the loaded model afterwards; until then every call is UNAVAILABLE.
Errors are raised, never caught: specmesh.grpc_errors maps them to status codes.
"""

from __future__ import annotations

from grpc import aio

from specmesh.grpc_errors import NoBackendError
from specmesh.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from verifier import convert
from verifier.microbatch import VerifyBatcher
from verifier.profiling import ReplicaProfile

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["Verifier"].full_name


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self) -> None:
        self._batcher: VerifyBatcher | None = None
        self._profile: ReplicaProfile | None = None

    def attach(self, batcher: VerifyBatcher, profile: ReplicaProfile) -> None:
        self._batcher, self._profile = batcher, profile

    def _ready(self) -> tuple[VerifyBatcher, ReplicaProfile]:
        if self._batcher is None or self._profile is None:
            raise NoBackendError("the verifier is still loading its model")
        return self._batcher, self._profile

    async def Verify(self, request: verifier_pb2.VerifyRequest, context: aio.ServicerContext) -> verifier_pb2.VerifyResponse:
        batcher, _ = self._ready()
        items = convert.items_from_request(request)
        return convert.verify_response(items, await batcher.submit(items, caller=context.peer()))

    async def Release(self, request: common_pb2.ReleaseRequest, context: aio.ServicerContext) -> common_pb2.ReleaseResponse:
        batcher, _ = self._ready()
        return convert.release_response(await batcher.release(list(request.session_ids)))

    async def Profile(self, request: common_pb2.ProfileRequest, context: aio.ServicerContext) -> common_pb2.ProfileResponse:
        _, profile = self._ready()
        return convert.profile_response(profile)

    async def Stats(self, request: common_pb2.StatsRequest, context: aio.ServicerContext) -> common_pb2.StatsResponse:
        batcher, _ = self._ready()
        return convert.stats_response(batcher.load())
