"""The OpenAI-compatible HTTP API: a thin FastAPI shell over the same front door as gRPC.

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, /v1/models/{model}, /healthz, /metrics

Bodies are read with a hard size limit and parsed by gateway/openai_schema.py; errors are
OpenAI-style JSON bodies, with the status decided in one place (http_status). A client that
disconnects (while queued, while generating, streaming or not) ends its request: the admission
slot is freed and the scheduler call cancelled, as a gRPC cancel does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from contextlib import aclosing
from typing import Any, AsyncGenerator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.counters import GatewayCounters
from gateway.front_door import AdmittedRequest, FrontDoor
from gateway.openai_schema import (
    BodyTooLargeError,
    ModelNotFoundError,
    OpenAIRequest,
    ResponseBuilder,
    error_body,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
)
from gateway.rate_limit import RateLimitedError
from gateway.records import GenerationResponse
from specmesh.errors import CapacityError, InvalidRequestError
from specmesh.grpc_errors import NoBackendError, OverloadedError, UnauthenticatedError
from specmesh.request_telemetry import observe_request

log = logging.getLogger(__name__)

TRANSPORT = "http"
# An oversized body is read to its end (and thrown away) up to this size before the 413 goes
# out, so clients that write the whole body before reading see the answer rather than a reset.
DRAIN_LIMIT_BYTES = 64 << 20
MAX_REQUEST_ID_HEADER = 128
T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


def http_status(error: BaseException) -> tuple[int, str, str | None]:
    """(status, OpenAI error type, code) of an error: the one HTTP mapping."""
    if isinstance(error, BodyTooLargeError):
        return 413, "invalid_request_error", "request_too_large"
    if isinstance(error, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(error, InvalidRequestError):
        return 400, "invalid_request_error", None
    if isinstance(error, UnauthenticatedError):
        return 401, "authentication_error", "invalid_api_key"
    if isinstance(error, RateLimitedError):
        return 429, "rate_limit_error", "rate_limit_exceeded"
    if isinstance(error, (OverloadedError, CapacityError)):
        return 503, "server_error", "overloaded"
    if isinstance(error, NoBackendError):
        return 503, "server_error", "unavailable"
    if isinstance(error, TimeoutError):
        return 504, "server_error", "timeout"
    return 500, "server_error", None


def error_response(error: BaseException) -> JSONResponse:
    status, kind, code = http_status(error)
    if status == 500:
        log.error("unhandled error in an HTTP request", exc_info=error)
        message = f"internal error: {type(error).__name__}"
    else:
        message = str(error)
    headers = {}
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None and status in (429, 503):
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))  # whole seconds, never 0
        headers["retry-after-ms"] = str(max(1, round(retry_after * 1000)))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_body(message, kind, code), status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT_BYTES:
        raise BodyTooLargeError(f"request body is {declared} bytes, at most {limit} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT_BYTES:
            break
    if size > limit:
        raise BodyTooLargeError(f"request body is {size if size <= DRAIN_LIMIT_BYTES else 'over ' + str(size)} "
                                f"bytes, at most {limit} are accepted (max_body_bytes)")
    return b"".join(chunks)


async def _drain(request: Request) -> None:
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_LIMIT_BYTES:
                return
    except Exception:  # noqa: BLE001 - the client went away or broke the framing: nothing to drain
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client disconnects first (the body must be read)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; whatever it was is moot
        pass
    raise ClientDisconnected()


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator and runs on_close however the response ends: on a client
    disconnect Starlette cancels the sending task and may leave the generator suspended at a
    yield, where only an explicit aclose() runs its cleanup (the scheduler call's cancel)."""

    def __init__(self, content: AsyncGenerator[str, None], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()
            except RuntimeError:  # still running elsewhere: its own cancellation cleans up
                pass
            finally:
                self._on_close()


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class HttpApi:
    def __init__(self, door: FrontDoor | None, model_name: str, max_body_bytes: int,
                 counters: GatewayCounters | None = None, metrics_text: Callable[[], str] | None = None) -> None:
        self.door = door
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.counters = counters or (door.counters if door else GatewayCounters())
        self.metrics_text = metrics_text or (lambda: "")
        self.serving = door is not None
        self.app = self._build()

    def attach(self, door: FrontDoor) -> None:
        self.door = door
        self.counters = door.counters
        self.serving = True

    def _build(self) -> FastAPI:
        app = FastAPI(title="specmesh gateway", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
            return JSONResponse(error_body(str(error.detail), "invalid_request_error",
                                           "not_found" if error.status_code == 404 else None),
                                status_code=error.status_code)

        @app.get("/healthz")
        async def healthz() -> JSONResponse:
            serving = self.serving and self.door is not None
            return JSONResponse({"status": "serving" if serving else "not_serving"},
                                status_code=200 if serving else 503)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            try:
                self._authenticate(request)
            except Exception as error:  # noqa: BLE001 - mapped to a status
                return error_response(error)
            return JSONResponse({"object": "list", "data": [self._model_card()]})

        @app.get("/v1/models/{model:path}")
        async def model(model: str, request: Request) -> JSONResponse:
            try:
                self._authenticate(request)
                if model != self.model_name:
                    raise ModelNotFoundError(f"the model {model[:200]!r} does not exist here")
            except Exception as error:  # noqa: BLE001 - mapped to a status
                return error_response(error)
            return JSONResponse(self._model_card())

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._generate(request, parse_completion_request)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            return await self._generate(request, parse_chat_request)

        return app

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "specmesh"}

    def _authenticate(self, request: Request):
        if self.door is None:
            raise NoBackendError("the gateway is still loading its tokenizer")
        return self.door.authenticate(request.headers.get("authorization"))

    async def _generate(self, request: Request, parse: Callable[..., OpenAIRequest]) -> Response:
        admitted: AdmittedRequest | None = None
        try:
            try:
                caller = self._authenticate(request)
            except Exception:
                await _drain(request)  # answer on an intact connection, without reading into memory
                raise
            body = await read_body(request, self.max_body_bytes)
            parsed = parse(parse_json_body(body), self.model_name, _request_id(request))
            assert self.door is not None
            admitted = await until_disconnected(request, self.door.open(parsed.generation, caller))
            builder = ResponseBuilder(parsed, self._token_text, parsed.generation.request_id)
            if parsed.stream:
                stream = _StreamState(admitted)
                response = _ClosingStreamingResponse(
                    self._events(stream, builder), on_close=lambda: self._stream_closed(stream),
                    media_type="text/event-stream", headers={"cache-control": "no-cache",
                                                             "x-request-id": builder.request_id})
                admitted = None  # the response owns it now
                return response
            responses = await until_disconnected(request, _collect(admitted))
            self.counters.count_request(TRANSPORT, None)
            return JSONResponse(builder.whole(responses), headers={"x-request-id": builder.request_id})
        except ClientDisconnected:
            self.counters.count_request(TRANSPORT, asyncio.CancelledError())
            return Response(status_code=499)
        except Exception as error:  # noqa: BLE001 - mapped to a status
            self.counters.count_request(TRANSPORT, error)
            return error_response(error)
        finally:
            if admitted is not None:
                admitted.close()

    async def _events(self, stream: "_StreamState", builder: ResponseBuilder) -> AsyncGenerator[str, None]:
        admitted = stream.admitted
        error: BaseException | None = None
        try:
            for chunk in builder.first_chunks():
                yield _sse(chunk)
            # aclosing: if this generator is closed at a yield (client gone), the chain below is
            # closed now, which cancels the scheduler call, rather than whenever it is collected.
            async with aclosing(observe_request(admitted.responses(), TRANSPORT)) as responses:  # span, TTFT
                async for response in responses:
                    for chunk in builder.chunks(response):
                        yield _sse(chunk)
            yield "data: [DONE]\n\n"
        except Exception as caught:  # noqa: BLE001 - the status line is gone: report in the stream
            error = caught
            status, kind, code = http_status(caught)
            if status == 500:
                log.error("unhandled error in an HTTP stream", exc_info=caught)
            message = f"internal error: {type(caught).__name__}" if status == 500 else str(caught)
            yield _sse(error_body(message, kind, code))
            yield "data: [DONE]\n\n"
        except BaseException as caught:  # cancelled or closed: the client went away
            error = caught
            raise
        finally:
            admitted.close()
            stream.counted = True
            self.counters.count_request(TRANSPORT, error)

    def _stream_closed(self, stream: "_StreamState") -> None:
        stream.admitted.close()
        if not stream.counted:  # the body never started: the client left before the first byte
            stream.counted = True
            self.counters.count_request(TRANSPORT, asyncio.CancelledError())

    def _token_text(self, token_id: int) -> str:
        assert self.door is not None
        return self.door.pipeline.tokenizer.decode([token_id])


class _StreamState:
    def __init__(self, admitted: AdmittedRequest) -> None:
        self.admitted = admitted
        self.counted = False  # its outcome is in the counters


async def _collect(admitted: AdmittedRequest) -> list[GenerationResponse]:
    async with aclosing(observe_request(admitted.responses(), TRANSPORT)) as responses:  # span, TTFT
        return [response async for response in responses]


def _request_id(request: Request) -> str:
    """The caller's X-Request-Id when it is a sane one, else a new id."""
    value = request.headers.get("x-request-id", "")
    if value and len(value) <= MAX_REQUEST_ID_HEADER and value.isprintable():
        return value
    return uuid.uuid4().hex
