"""A small client of the public API, so other programs need not touch generated stubs.

    from specmesh.client import SpecmeshClient
    with SpecmeshClient("127.0.0.1:50051") as client:
        print(client.generate(prompt="Hello", max_tokens=32).text)
        for delta in client.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(delta.text, end="", flush=True)

With API keys on the gateway, pass `api_key=...` (sent as `authorization: Bearer <key>`).
AsyncSpecmeshClient has the same methods as coroutines / async iterators. Failures raise
SpecmeshClientError carrying the gRPC status code and the server's message. Leaving a stream
early (break, close) cancels the request, which frees its state all the way down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Mapping, Sequence

import grpc
from grpc import aio

from specmesh.grpc_server import CHANNEL_OPTIONS
from specmesh.v1 import generation_pb2, generation_pb2_grpc

Message = Mapping[str, str] | tuple[str, str]  # {"role": ..., "content": ...} or (role, content)
Metadata = Sequence[tuple[str, str]] | Mapping[str, str]


class SpecmeshClientError(Exception):
    """A failed request: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # set when the server sent a retry hint (overload)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class SpeculationStats:
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens committed per verification round (accepted drafts + 1)."""
        return self.accepted_tokens / self.rounds + 1.0 if self.rounds else 0.0


@dataclass(frozen=True)
class Delta:
    """One streamed piece: new text and tokens since the previous one, totals so far."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # empty except on the last piece
    usage: Usage
    speculation: SpeculationStats
    logprobs: tuple[float, ...]  # one per token_ids entry when asked for
    request_id: str


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    speculation: SpeculationStats
    logprobs: tuple[float, ...] = ()
    request_id: str = ""
    deltas: tuple[Delta, ...] = field(default=(), repr=False)


def _message(item: Message) -> generation_pb2.ChatMessage:
    if isinstance(item, tuple):
        role, content = item
    else:
        role, content = item["role"], item["content"]
    return generation_pb2.ChatMessage(role=role, content=content)


def build_request(prompt: str | None = None, messages: Sequence[Message] | None = None, *,
                  max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                  top_k: int | None = None, seed: int | None = None, stop: Sequence[str] | str | None = None,
                  disable_speculation: bool = False, logprobs: bool = False, request_id: str = "",
                  max_draft_tokens: int | None = None) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; None leaves a field unset (the server's default)."""
    request = generation_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=[_message(m) for m in messages or ()],
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        disable_speculation=disable_speculation,
        logprobs=logprobs,
        request_id=request_id,
    )
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                        ("top_k", top_k), ("seed", seed), ("max_draft_tokens", max_draft_tokens)):
        if value is not None:
            setattr(request, name, value)
    return request


def _delta(message: generation_pb2.GenerateResponse) -> Delta:
    return Delta(
        text=message.text,
        token_ids=tuple(message.token_ids),
        finish_reason=message.finish_reason,
        usage=Usage(message.usage.prompt_tokens, message.usage.completion_tokens),
        speculation=SpeculationStats(message.speculation.drafted_tokens, message.speculation.accepted_tokens,
                                     message.speculation.rounds),
        logprobs=tuple(lp.logprob for lp in message.logprobs),
        request_id=message.request_id,
    )


def _completion(deltas: Sequence[Delta]) -> Completion:
    if not deltas:
        raise SpecmeshClientError(grpc.StatusCode.INTERNAL, "the server ended the stream without a response")
    last = deltas[-1]
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        finish_reason=last.finish_reason,
        usage=last.usage,
        speculation=last.speculation,
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        request_id=last.request_id,
        deltas=tuple(deltas),
    )


def _client_error(error: grpc.RpcError) -> SpecmeshClientError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    retry_after = None
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == "retry-after":
            try:
                retry_after = float(value)
            except ValueError:
                pass
    return SpecmeshClientError(code, details or "", retry_after)


def _metadata(metadata: Metadata | None, api_key: str | None = None) -> tuple[tuple[str, str], ...] | None:
    items = () if metadata is None else (metadata.items() if isinstance(metadata, Mapping) else metadata)
    pairs = tuple((str(k), str(v)) for k, v in items)
    if api_key and not any(k.lower() == "authorization" for k, _ in pairs):
        pairs += (("authorization", f"Bearer {api_key}"),)
    return pairs or None


class SpecmeshClient:
    """Blocking client. `timeout` (seconds) becomes the gRPC deadline, honoured end to end."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        self._channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def stream(self, prompt: str | None = None, messages: Sequence[Message] | None = None, *,
               timeout: float | None = None, metadata: Metadata | None = None, **options) -> Iterator[Delta]:
        """Deltas as they are generated; the last one has a finish_reason. Options as build_request."""
        call = self._stub.Generate(build_request(prompt, messages, **options), timeout=timeout,
                                   metadata=_metadata(metadata, self.api_key))
        try:
            for message in call:
                yield _delta(message)
        except grpc.RpcError as error:
            raise _client_error(error) from None
        finally:
            call.cancel()  # no-op when finished; cancels the request when the caller stopped early

    def generate(self, prompt: str | None = None, messages: Sequence[Message] | None = None, *,
                 timeout: float | None = None, metadata: Metadata | None = None, **options) -> Completion:
        """The whole completion. Options: max_tokens, temperature, top_p, top_k, seed, stop,
        disable_speculation, logprobs, request_id, max_draft_tokens."""
        return _completion(list(self.stream(prompt, messages, timeout=timeout, metadata=metadata, **options)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SpecmeshClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncSpecmeshClient:
    """asyncio client; same methods as SpecmeshClient (generate is a coroutine, stream an async iterator)."""

    def __init__(self, target: str, *, channel: aio.Channel | None = None, api_key: str | None = None) -> None:
        self.target = target
        self.api_key = api_key
        self._channel = channel or aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def stream(self, prompt: str | None = None, messages: Sequence[Message] | None = None, *,
                     timeout: float | None = None, metadata: Metadata | None = None,
                     **options) -> AsyncIterator[Delta]:
        call = self._stub.Generate(build_request(prompt, messages, **options), timeout=timeout,
                                   metadata=_metadata(metadata, self.api_key))
        try:
            async for message in call:
                yield _delta(message)
        except grpc.RpcError as error:
            raise _client_error(error) from None
        finally:
            call.cancel()

    async def generate(self, prompt: str | None = None, messages: Sequence[Message] | None = None, *,
                       timeout: float | None = None, metadata: Metadata | None = None, **options) -> Completion:
        return _completion([d async for d in self.stream(prompt, messages, timeout=timeout, metadata=metadata,
                                                         **options)])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncSpecmeshClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
