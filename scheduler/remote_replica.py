"""What every remote replica (drafter or verifier) answers alike: Release, Profile, Stats."""

from __future__ import annotations

from typing import Sequence

from grpc import aio

from scheduler.backends import BackendUnavailable
from specmesh.grpc_server import insecure_channel
from specmesh.v1 import common_pb2


class RemoteReplica:
    """A channel to one replica; subclasses add the service's own stub and calls."""

    def __init__(self, endpoint: str, stub_class) -> None:
        self.endpoint = endpoint
        self._channel: aio.Channel = insecure_channel(endpoint)
        self._stub = stub_class(self._channel)

    async def _unary(self, name: str, request, timeout_s: float):
        try:
            return await getattr(self._stub, name)(request, timeout=timeout_s)
        except aio.AioRpcError as error:
            raise BackendUnavailable(self.endpoint, f"{name} failed: {error.code().name} {error.details()}")

    async def release(self, session_ids: Sequence[str]) -> None:
        if session_ids:
            await self._unary("Release", common_pb2.ReleaseRequest(session_ids=list(session_ids)), 5.0)

    async def profile(self, timeout_s: float = 10.0) -> common_pb2.ProfileResponse:
        return await self._unary("Profile", common_pb2.ProfileRequest(), timeout_s)

    async def stats(self, timeout_s: float = 5.0) -> common_pb2.StatsResponse:
        return await self._unary("Stats", common_pb2.StatsRequest(), timeout_s)

    async def close(self) -> None:
        await self._channel.close()
