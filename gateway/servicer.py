"""Thin gRPC shell of the public API: GenerateRequest in, the front door (key, checks, rate
limit, admission) and the pipeline, GenerateResponse out.

Deadline: what is left of the client's deadline bounds the queue wait and the scheduler call.
Cancellation: when the client cancels (or its deadline passes) grpc cancels this handler; the
admitted request is closed on the way out, which frees its admission slot and cancels the
scheduler call (and with it the session there).
Errors are raised, never caught: specmesh.grpc_errors maps them to status codes.

Requests are parsed by our own deserializer so that bytes that are not a GenerateRequest
(invalid UTF-8, wrong wire types), requests over the size limit and fields this server does
not know are INVALID_ARGUMENT with a message, not grpc's generic INTERNAL.
"""

from __future__ import annotations

import dataclasses
import uuid

import grpc
from google.protobuf import message as protobuf_message
from google.protobuf import unknown_fields
from grpc import aio

from gateway import convert
from gateway.counters import GatewayCounters
from gateway.front_door import FrontDoor
from specmesh.errors import InvalidRequestError
from specmesh.grpc_errors import NoBackendError
from specmesh.request_telemetry import observe_request
from specmesh.v1 import generation_pb2

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
TRANSPORT = "grpc"


class MalformedRequest:
    """What the deserializer hands over instead of a request it could not accept."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def request_deserializer(max_body_bytes: int):
    def deserialize(data: bytes) -> generation_pb2.GenerateRequest | MalformedRequest:
        if max_body_bytes and len(data) > max_body_bytes:
            return MalformedRequest(f"request is {len(data)} bytes, at most {max_body_bytes} are accepted "
                                    f"(max_body_bytes)")
        try:
            request = generation_pb2.GenerateRequest.FromString(data)
        except protobuf_message.DecodeError as error:
            return MalformedRequest(f"request is not a valid specmesh.v1.GenerateRequest: {error}")
        unknown = _unknown_field_numbers(request)
        if unknown:
            return MalformedRequest(f"unknown fields in GenerateRequest (field numbers {unknown}); "
                                    f"this server does not support them")
        return request

    return deserialize


def _unknown_field_numbers(request: generation_pb2.GenerateRequest) -> list[int]:
    numbers = [field.field_number for field in unknown_fields.UnknownFieldSet(request)]
    for message in request.messages:
        numbers += [field.field_number for field in unknown_fields.UnknownFieldSet(message)]
    return sorted(set(numbers))


def _authorization(context: aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


class GenerationServicer:
    """Registered before the server starts (health answers NOT_SERVING while the tokenizer
    loads) and attached to the front door afterwards; until then every call is UNAVAILABLE."""

    def __init__(self, door: FrontDoor | None = None, counters: GatewayCounters | None = None) -> None:
        self.door = door
        self.counters = counters or GatewayCounters()

    def attach(self, door: FrontDoor) -> None:
        self.door = door
        self.counters = door.counters

    async def Generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                       context: aio.ServicerContext):
        error: BaseException | None = None
        try:
            async for response in observe_request(self._generate(request, context), TRANSPORT):  # span + TTFT
                yield response
        except BaseException as caught:
            error = caught
            raise
        finally:
            self.counters.count_request(TRANSPORT, error)

    async def _generate(self, request: generation_pb2.GenerateRequest | MalformedRequest,
                        context: aio.ServicerContext):
        if self.door is None:
            raise NoBackendError("the gateway is still loading its tokenizer")
        caller = self.door.authenticate(_authorization(context))
        if isinstance(request, MalformedRequest):
            raise InvalidRequestError(request.reason)
        record = convert.request_from_proto(request)
        if not record.request_id:
            record = dataclasses.replace(record, request_id=uuid.uuid4().hex)
        admitted = await self.door.open(record, caller, timeout_s=context.time_remaining())
        try:
            async for response in admitted.responses():
                yield convert.response_to_proto(response)
        finally:
            admitted.close()


def add_generation_servicer(server: aio.Server, servicer: GenerationServicer, max_body_bytes: int) -> None:
    """Like the generated add_GenerationServicer_to_server, with our request deserializer."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=request_deserializer(max_body_bytes),
            response_serializer=generation_pb2.GenerateResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
