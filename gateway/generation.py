"""The gateway's request pipeline, without gRPC: validate, tokenize, run the request on the
scheduler, detokenize incrementally, apply stop strings, count usage, stream response records.

The scheduler is reached through the small SchedulerBackend interface (gateway/scheduler_client.py
is the gRPC one; tests substitute their own). Closing the backend's stream ends the request at
the scheduler, which frees the session's drafter and verifier state within one round; that is
how a matched stop string, a client cancel and a client deadline all end the work behind them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Protocol, Sequence

from gateway.records import CommittedTokens, GenerationRequest, GenerationResponse, TokenizedRequest, Usage
from gateway.stop_strings import StopStringMatcher
from gateway.tokenization import encode_messages, encode_prompt
from gateway.validation import RequestLimits, validate_prompt_length, validate_request
from specmesh.detokenize import IncrementalDetokenizer
from specmesh.errors import SpecmeshError
from specmesh.records import SpeculationStats
from specmesh.sampling_params import SamplingParams

log = logging.getLogger(__name__)

FINISH_STOP = "stop"


class SchedulerStreamError(SpecmeshError):
    """The scheduler broke its stream contract (e.g. ended without a finish reason)."""


class SchedulerBackend(Protocol):
    def generate(self, request: TokenizedRequest, timeout_s: float | None) -> AsyncGenerator[CommittedTokens, None]:
        """Run request at the scheduler; an async generator whose aclose() cancels it there.
        Failures raise specmesh errors (InvalidRequestError, OverloadedError, NoBackendError,
        TimeoutError, ...) so the error interceptor maps them to status codes."""
        ...


@dataclass(frozen=True)
class GenerationDefaults:
    max_tokens: int = 256
    temperature: float = 0.0


# Tokenizing a 1 MiB prompt takes ~0.5 s and ~150 MB at its peak (SmolLM2's tokenizer, measured):
# a flood of large prompts must queue for the tokenizer rather than run all at once.
MAX_CONCURRENT_ENCODES = 4


class GenerationPipeline:
    def __init__(self, tokenizer: Any, scheduler: SchedulerBackend, stop_token_ids: Sequence[int],
                 limits: RequestLimits = RequestLimits(), defaults: GenerationDefaults = GenerationDefaults()) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.stop_token_ids = tuple(stop_token_ids)
        self.limits = limits
        self.defaults = defaults
        self._encode_slots = asyncio.Semaphore(MAX_CONCURRENT_ENCODES)

    def encode(self, request: GenerationRequest) -> list[int]:
        if request.messages:
            return encode_messages(self.tokenizer, request.messages)
        return encode_prompt(self.tokenizer, request.prompt)

    def tokenized_request(self, request: GenerationRequest, prompt_ids: Sequence[int]) -> TokenizedRequest:
        """Resolve every default: what the scheduler runs is fully concrete."""
        max_tokens = request.max_tokens
        if max_tokens is None:
            max_tokens = min(self.defaults.max_tokens, self.limits.max_tokens_limit)
        params = SamplingParams(
            temperature=self.defaults.temperature if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=0 if request.top_k is None else request.top_k,
            seed=request.seed,
        ).validate()
        return TokenizedRequest(
            request_id=request.request_id,
            prompt_token_ids=tuple(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            stop_token_ids=self.stop_token_ids,
            disable_speculation=request.disable_speculation,
            max_draft_tokens=request.max_draft_tokens,
            logprobs=request.logprobs,
        )

    async def prepare(self, request: GenerationRequest) -> "PreparedRequest":
        """Everything that can refuse a request before it costs the scheduler anything:
        field checks, tokenisation (chat template) and the prompt length. Raises
        InvalidRequestError."""
        validate_request(request, self.limits)
        # Long prompts and chat templates take real CPU time: keep the event loop serving.
        async with self._encode_slots:
            prompt_ids = await asyncio.to_thread(self.encode, request)
        validate_prompt_length(len(prompt_ids), self.limits)
        return PreparedRequest(request, self.tokenized_request(request, prompt_ids))

    async def execute(self, prepared: "PreparedRequest",
                      timeout_s: float | None = None) -> AsyncIterator[GenerationResponse]:
        """Stream the completion of a prepared request; the last record has a finish_reason.

        timeout_s is what is left of the client's deadline (None: no deadline); it bounds the
        scheduler call, so the whole chain gives up together.
        """
        start = time.monotonic()
        request = prepared.request
        output = CompletionAssembler(self.tokenizer, request.request_id, prepared.num_prompt_tokens, request.stop)
        steps = self.scheduler.generate(prepared.tokenized, timeout_s)
        try:
            async for step in steps:
                response = output.add(step)
                if response is None:
                    continue
                if response.finish_reason:
                    # Ends the scheduler call before the client hears of it (stop strings end
                    # early, and the session must not keep running at the scheduler).
                    await steps.aclose()
                    _log_finished(response, start)
                    yield response
                    return
                yield response
            raise SchedulerStreamError("the scheduler ended the stream without a finish reason")
        finally:
            await steps.aclose()

    async def run(self, request: GenerationRequest, timeout_s: float | None = None) -> AsyncIterator[GenerationResponse]:
        """prepare, then execute: the whole request, with no admission or rate limit in between
        (gateway/front_door.py adds those)."""
        start = time.monotonic()
        prepared = await self.prepare(request)
        if timeout_s is not None:
            timeout_s = max(timeout_s - (time.monotonic() - start), 0.0)
        async for response in self.execute(prepared, timeout_s):
            yield response


@dataclass(frozen=True)
class PreparedRequest:
    """A request that passed every check, tokenized, with every default resolved."""

    request: GenerationRequest
    tokenized: TokenizedRequest

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.tokenized.prompt_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.tokenized.max_tokens


class CompletionAssembler:
    """Turns the scheduler's committed tokens into response records: text deltas that never
    split a character, stop strings cut out, usage and speculation totals."""

    def __init__(self, tokenizer: Any, request_id: str, prompt_tokens: int, stop: Sequence[str]) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopStringMatcher(stop)
        self.finish_reason = ""

    def add(self, step: CommittedTokens) -> GenerationResponse | None:
        """The record for one scheduler message, or None when it carries nothing new."""
        if self.finish_reason:
            return None
        texts: list[str] = []
        token_ids: list[int] = []
        logprobs: list[float] = []
        # Token by token, so a stop string ends the output at the token that completed it;
        # tokens the scheduler committed after it are not part of the completion.
        for i, token in enumerate(step.token_ids):
            token_ids.append(token)
            if i < len(step.logprobs):
                logprobs.append(step.logprobs[i])
            texts.append(self.stops.feed(self.detokenizer.add([token])))
            if self.stops.matched is not None:
                self.finish_reason = FINISH_STOP
                break
        if not self.finish_reason and step.finish_reason:
            texts.append(self.stops.feed(self.detokenizer.flush()))
            if self.stops.matched is not None:
                self.finish_reason = FINISH_STOP
            else:
                texts.append(self.stops.flush())
                self.finish_reason = step.finish_reason
        self.completion_tokens += len(token_ids)
        text = "".join(texts)
        if not (text or token_ids or self.finish_reason):
            return None
        return GenerationResponse(
            request_id=self.request_id,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            finish_reason=self.finish_reason,
            usage=Usage(self.prompt_tokens, self.completion_tokens),
            speculation=SpeculationStats(step.speculation.drafted_tokens, step.speculation.accepted_tokens,
                                         step.speculation.rounds),
        )


def _log_finished(response: GenerationResponse, start: float) -> None:
    spec = response.speculation
    log.info("request %s finished (%s): %d prompt + %d completion tokens in %.3f s; rounds %d, drafted %d, "
             "accepted %d", response.request_id, response.finish_reason, response.usage.prompt_tokens,
             response.usage.completion_tokens, time.monotonic() - start, spec.rounds, spec.drafted_tokens,
             spec.accepted_tokens)
