"""One mapping from specmesh errors to gRPC status codes, applied by a server interceptor.

Servicers just raise; the interceptor turns the exception into a status with its message, so
no handler repeats try/except and an unexpected bug becomes INTERNAL instead of a dropped stream.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import grpc
from grpc import aio

from specmesh.errors import (
    CacheMissError,
    CapacityError,
    InvalidRequestError,
    ModelReferenceError,
    SpecmeshError,
    TokenizerMismatchError,
)

log = logging.getLogger(__name__)


class NoBackendError(SpecmeshError):
    """No verifier is reachable at all (the only case that maps to UNAVAILABLE)."""


class UnauthenticatedError(SpecmeshError):
    """Missing or wrong API key."""


class OverloadedError(SpecmeshError):
    """Refused to protect admitted work; carries a retry hint in seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def status_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, (InvalidRequestError, TokenizerMismatchError, ModelReferenceError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, (CapacityError, OverloadedError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, CacheMissError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, NoBackendError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


async def _abort(context: aio.ServicerContext, error: BaseException) -> None:
    code = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in handler", exc_info=error)
        message = f"internal error: {type(error).__name__}: {error}"
    else:
        message = str(error)
    if isinstance(error, OverloadedError):
        context.set_trailing_metadata((("retry-after", f"{error.retry_after_s:.3f}"),))
    await context.abort(code, message)


def _wrap_unary(behaviour: Callable) -> Callable:
    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except (aio.AbortError, grpc.RpcError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code
            await _abort(context, error)

    return handler


def _wrap_stream(behaviour: Callable) -> Callable:
    if not inspect.isasyncgenfunction(behaviour):
        # A streaming handler written as a coroutine that writes via context (e.g. Health.Watch).
        return _wrap_unary(behaviour)

    async def handler(request: Any, context: aio.ServicerContext):
        try:
            async for response in behaviour(request, context):
                yield response
        except (aio.AbortError, grpc.RpcError):
            raise
        except Exception as error:  # noqa: BLE001 - mapped to a status code
            await _abort(context, error)

    return handler


class ErrorMappingInterceptor(aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer)
        return handler
