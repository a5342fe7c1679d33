"""Typed records of the gateway. They mirror specmesh.v1 GenerateRequest / GenerateResponse
(the public API) and ScheduleRequest / ScheduleResponse (the call to the scheduler); the core
modules speak only these, and gateway/convert.py is the one place that touches protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.records import SpeculationStats
from specmesh.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """A public request as the client sent it: None means "unset" (the gateway's default)."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    disable_speculation: bool = False
    request_id: str = ""
    logprobs: bool = False
    max_draft_tokens: int | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class GenerationResponse:
    """One streamed piece: the new text and tokens since the previous piece, totals so far."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()  # one per token_ids entry when asked, else empty
    finish_reason: str = ""  # empty except on the last piece: "stop", "length" or "cancelled"
    usage: Usage = field(default_factory=Usage)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass(frozen=True)
class TokenizedRequest:
    """What the gateway asks the scheduler to run: tokenized, every default resolved."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    disable_speculation: bool = False
    max_draft_tokens: int | None = None
    logprobs: bool = False


@dataclass(frozen=True)
class CommittedTokens:
    """One message of the scheduler's stream: tokens committed since the previous one."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str = ""
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
