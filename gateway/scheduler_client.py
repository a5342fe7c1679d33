"""The scheduler over gRPC, as the SchedulerBackend of the gateway's pipeline.

Its stream is an async generator: closing it (stop string matched, client cancelled, client
deadline passed) cancels the gRPC call, and the scheduler ends the session within one round.
Scheduler errors come back as the specmesh errors the gateway's interceptor maps to the same
status codes, so INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED reach
the client with the scheduler's message.
"""

from __future__ import annotations

from typing import AsyncGenerator

import grpc
from grpc import aio

from gateway import convert
from gateway.records import CommittedTokens, TokenizedRequest
from specmesh.errors import InvalidRequestError, SpecmeshError
from specmesh.grpc_errors import NoBackendError, OverloadedError
from specmesh.grpc_server import insecure_channel
from specmesh.v1 import scheduler_pb2_grpc


class SchedulerFailedError(SpecmeshError):
    """The scheduler failed the request for a reason the client cannot act on (INTERNAL)."""


class GrpcSchedulerBackend:
    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: aio.Channel = insecure_channel(target)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def generate(self, request: TokenizedRequest, timeout_s: float | None) -> AsyncGenerator[CommittedTokens, None]:
        call = self._stub.Generate(convert.schedule_request_to_proto(request), timeout=timeout_s)
        try:
            async for message in call:
                yield convert.committed_from_proto(message)
        except aio.AioRpcError as error:
            raise _error_from_status(error, self.target) from None
        finally:
            # A no-op when the call already ended; otherwise this is what frees the session.
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()


def _error_from_status(error: aio.AioRpcError, target: str) -> Exception:
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return OverloadedError(details, _retry_after(error))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(details or "deadline exceeded")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return NoBackendError(f"scheduler {target}: {details or code.name}")
    return SchedulerFailedError(f"scheduler failed the request: {code.name}: {details}")


def _retry_after(error: aio.AioRpcError) -> float:
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after":
            try:
                return float(value)
            except ValueError:
                break
    return 1.0
