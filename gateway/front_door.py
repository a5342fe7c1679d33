"""What every request passes on its way in, the same for gRPC and HTTP: its API key, its
fields and prompt (validated and tokenized by the pipeline), its key's rate limit, then
admission. Only then does it reach the scheduler. No transport here: the gRPC servicer and the
HTTP app are shells that turn their input into a GenerationRequest and errors into statuses.

Order matters: the cheap refusals come first (key, fields, prompt length), the rate limit before
the admission queue (a caller over its limit must not hold a queue place), and nothing is sent
to the scheduler before a slot is held. A request refused by admission gets its rate limit
charge back; a finished one gets back the tokens it reserved but did not generate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from gateway.admission import AdmissionController
from gateway.api_keys import ApiKeys, Caller
from gateway.counters import GatewayCounters
from gateway.generation import GenerationPipeline, PreparedRequest
from gateway.rate_limit import RateLimiter
from gateway.records import GenerationRequest, GenerationResponse

log = logging.getLogger(__name__)


class FrontDoor:
    def __init__(self, pipeline: GenerationPipeline, keys: ApiKeys, limiter: RateLimiter,
                 admission: AdmissionController, counters: GatewayCounters | None = None) -> None:
        self.pipeline = pipeline
        self.keys = keys
        self.limiter = limiter
        self.admission = admission
        self.counters = counters or GatewayCounters()
        self._background: set[asyncio.Task] = set()

    def authenticate(self, credential: str | None) -> Caller:
        """credential: the `authorization` value (`Bearer <key>`), None when absent."""
        return self.keys.authenticate(credential)

    async def open(self, request: GenerationRequest, caller: Caller,
                   timeout_s: float | None = None) -> "AdmittedRequest":
        """Check, tokenize, rate-limit and admit request; raises the error that refuses it.
        The caller must close() the result (its responses() does so when it ends)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        prepared = await self.pipeline.prepare(request)
        reserved = prepared.num_prompt_tokens + prepared.max_tokens
        await self.limiter.acquire(caller.bucket, reserved)
        try:
            await self.admission.acquire(_remaining(deadline))
        except BaseException:
            self._refund(caller, 1, reserved)
            raise
        log.debug("request %s from %s admitted: %d prompt tokens, max_tokens %d", request.request_id,
                  caller.key_id, prepared.num_prompt_tokens, prepared.max_tokens)
        return AdmittedRequest(self, prepared, caller, deadline)

    def _refund(self, caller: Caller, requests: int, tokens: int) -> None:
        if not self.limiter.limits.enabled or (requests <= 0 and tokens <= 0):
            return
        # In the background: a refund must neither delay the response nor be lost to a cancel.
        task = asyncio.get_running_loop().create_task(self.limiter.refund(caller.bucket, requests, tokens))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)
        await self.limiter.close()


class AdmittedRequest:
    """A request holding an admission slot. Iterate responses(); close() (idempotent) frees
    the slot and settles the rate limit, however the request ended."""

    def __init__(self, door: FrontDoor, prepared: PreparedRequest, caller: Caller, deadline: float | None) -> None:
        self.door = door
        self.prepared = prepared
        self.caller = caller
        self.deadline = deadline
        self.completion_tokens = 0
        self.admitted_at = time.monotonic()
        self._closed = False

    @property
    def request_id(self) -> str:
        return self.prepared.request.request_id

    async def responses(self) -> AsyncIterator[GenerationResponse]:
        try:
            async for response in self.door.pipeline.execute(self.prepared, _remaining(self.deadline)):
                self.completion_tokens = response.usage.completion_tokens
                yield response
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.door.admission.release(time.monotonic() - self.admitted_at)
        self.door.counters.count_tokens(self.prepared.num_prompt_tokens, self.completion_tokens)
        self.door._refund(self.caller, 0, self.prepared.max_tokens - self.completion_tokens)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("deadline exceeded before the request could start")
    return remaining
