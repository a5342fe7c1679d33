"""A verifier replica over gRPC, as a VerifyBackend for the speculation loop."""

from __future__ import annotations

from typing import Sequence

import grpc
from grpc import aio

from scheduler import convert
from scheduler.backends import BackendUnavailable
from specmesh.grpc_server import insecure_channel
from specmesh.records import VerifyItem, VerifyResult
from specmesh.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc

# Codes that mean "this replica cannot serve now": move its sessions elsewhere.
UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
               grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}


class RemoteVerifier:
    def __init__(self, endpoint: str, timeout_s: float, prompt_lengths: dict[str, int]) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._prompt_lengths = prompt_lengths  # shared with the coordinator (for num_generated_tokens)
        self._channel: aio.Channel = insecure_channel(endpoint)
        self._stub = verifier_pb2_grpc.VerifierStub(self._channel)

    async def verify(self, items: Sequence[VerifyItem]) -> list[VerifyResult]:
        try:
            response = await self._stub.Verify(convert.verify_request(items, self._prompt_lengths),
                                               timeout=self.timeout_s)
        except aio.AioRpcError as error:
            if error.code() in UNREACHABLE:
                raise BackendUnavailable(self.endpoint, f"Verify failed: {error.code().name} {error.details()}")
            raise
        return convert.verify_results(response)

    async def release(self, session_ids: Sequence[str]) -> None:
        if not session_ids:
            return
        try:
            await self._stub.Release(common_pb2.ReleaseRequest(session_ids=list(session_ids)), timeout=5.0)
        except aio.AioRpcError as error:
            raise BackendUnavailable(self.endpoint, f"Release failed: {error.code().name}")

    async def profile(self, timeout_s: float = 10.0) -> common_pb2.ProfileResponse:
        try:
            return await self._stub.Profile(common_pb2.ProfileRequest(), timeout=timeout_s)
        except aio.AioRpcError as error:
            raise BackendUnavailable(self.endpoint, f"Profile failed: {error.code().name} {error.details()}")

    async def stats(self, timeout_s: float = 5.0) -> common_pb2.StatsResponse:
        try:
            return await self._stub.Stats(common_pb2.StatsRequest(), timeout=timeout_s)
        except aio.AioRpcError as error:
            raise BackendUnavailable(self.endpoint, f"Stats failed: {error.code().name}")

    async def close(self) -> None:
        await self._channel.close()


__all__ = ["RemoteVerifier", "verifier_pb2"]
