"""A verifier replica over gRPC, as a VerifyBackend for the speculation loop."""

from __future__ import annotations

from typing import Sequence

import grpc
from grpc import aio

from scheduler import convert
from scheduler.backends import BackendUnavailable
from scheduler.remote_replica import RemoteReplica
from specmesh.records import VerifyItem, VerifyResult
from specmesh.v1 import verifier_pb2_grpc

# Codes that mean "this replica cannot serve now": move its sessions elsewhere.
UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}


class RemoteVerifier(RemoteReplica):
    def __init__(self, endpoint: str, timeout_s: float, prompt_lengths: dict[str, int]) -> None:
        self.timeout_s = timeout_s
        self._prompt_lengths = prompt_lengths  # shared with the coordinator (for num_generated_tokens)
        super().__init__(endpoint, verifier_pb2_grpc.VerifierStub)

    async def verify(self, items: Sequence[VerifyItem]) -> list[VerifyResult]:
        try:
            response = await self._stub.Verify(convert.verify_request(items, self._prompt_lengths),
                                               timeout=self.timeout_s)
        except aio.AioRpcError as error:
            if error.code() in UNREACHABLE:
                raise BackendUnavailable(self.endpoint, f"Verify failed: {error.code().name} {error.details()}")
            raise
        return convert.verify_results(response)
