"""Thin gRPC shell of the public API: GenerateRequest in, the pipeline, GenerateResponse out.

Deadline: what is left of the client's deadline bounds the scheduler call. Cancellation: when
the client cancels (or its deadline passes) grpc cancels this handler; the pipeline's scheduler
stream is closed on the way out, which cancels the scheduler call and frees the session there.
Errors are raised, never caught: specmesh.grpc_errors maps them to status codes.
"""

from __future__ import annotations

import dataclasses
import uuid

from grpc import aio

from gateway import convert
from gateway.generation import GenerationPipeline
from specmesh.grpc_errors import NoBackendError
from specmesh.request_telemetry import observe_request
from specmesh.v1 import generation_pb2, generation_pb2_grpc

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Registered before the server starts (health answers NOT_SERVING while the tokenizer
    loads) and attached to the pipeline afterwards; until then every call is UNAVAILABLE."""

    def __init__(self, pipeline: GenerationPipeline | None = None) -> None:
        self.pipeline = pipeline

    def attach(self, pipeline: GenerationPipeline) -> None:
        self.pipeline = pipeline

    async def Generate(self, request: generation_pb2.GenerateRequest, context: aio.ServicerContext):
        if self.pipeline is None:
            raise NoBackendError("the gateway is still loading its tokenizer")
        record = convert.request_from_proto(request)
        if not record.request_id:
            record = dataclasses.replace(record, request_id=uuid.uuid4().hex)
        # observe_request: the request span (specmesh.gateway.request) and TTFT/TPOT/e2e metrics.
        async for response in observe_request(self.pipeline.run(record, timeout_s=context.time_remaining()), "grpc"):
            yield convert.response_to_proto(response)
