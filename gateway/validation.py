"""Checks on a public request before any work is done. No gRPC here: every failure is an
InvalidRequestError whose message names the field, which the error interceptor turns into
INVALID_ARGUMENT. Sampling fields are checked by SamplingParams.validate, so the gateway, the
scheduler and the engine refuse the same inputs with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.records import GenerationRequest
from specmesh.errors import InvalidRequestError
from specmesh.sampling_params import SamplingParams

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Beyond these a request is nonsense rather than a choice: a temperature of 1e30 samples
# uniformly like 100 does, and top_k travels as int32 to the scheduler.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class RequestLimits:
    max_tokens_limit: int = 4096
    max_prompt_tokens: int = 8192
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_messages: int = 1024
    max_request_id_length: int = 128


def validate_request(request: GenerationRequest, limits: RequestLimits) -> None:
    """Raise InvalidRequestError for the first thing wrong with request (fields as sent)."""
    _check_input(request, limits)
    if request.max_tokens is not None and not 1 <= request.max_tokens <= limits.max_tokens_limit:
        raise InvalidRequestError(
            f"max_tokens must be in [1, {limits.max_tokens_limit}], got {request.max_tokens}")
    # Unset fields are checked as their neutral values; the gateway's defaults are valid.
    SamplingParams(
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None else request.top_k,
        seed=request.seed,
    ).validate()
    if request.temperature is not None and request.temperature > MAX_TEMPERATURE:
        raise InvalidRequestError(f"temperature must be at most {MAX_TEMPERATURE:g}, got {request.temperature}")
    if request.top_k is not None and request.top_k > MAX_TOP_K:
        raise InvalidRequestError(f"top_k must be at most {MAX_TOP_K}, got {request.top_k}")
    if request.max_draft_tokens is not None and request.max_draft_tokens < 0:
        raise InvalidRequestError(f"max_draft_tokens must be >= 0, got {request.max_draft_tokens}")
    _check_stop(request.stop, limits)
    if len(request.request_id) > limits.max_request_id_length:
        raise InvalidRequestError(
            f"request_id must be at most {limits.max_request_id_length} characters, got {len(request.request_id)}")
    if any(not ch.isprintable() for ch in request.request_id):
        raise InvalidRequestError("request_id must contain printable characters only")


def validate_prompt_length(num_prompt_tokens: int, limits: RequestLimits) -> None:
    """After tokenisation (and chat template): the prompt must be non-empty and not too long."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError("prompt tokenizes to no tokens")
    if num_prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"prompt is too long: {num_prompt_tokens} tokens, this deployment accepts at most "
            f"{limits.max_prompt_tokens} (max_prompt_tokens)")


def _check_input(request: GenerationRequest, limits: RequestLimits) -> None:
    if request.prompt and request.messages:
        raise InvalidRequestError("set exactly one of prompt and messages, not both")
    if not request.prompt and not request.messages:
        raise InvalidRequestError("prompt must not be empty (or send messages instead)")
    if len(request.messages) > limits.max_messages:
        raise InvalidRequestError(
            f"messages has {len(request.messages)} entries, at most {limits.max_messages} are accepted")
    for i, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}; got {message.role!r}")


def _check_stop(stop: tuple[str, ...], limits: RequestLimits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequestError(f"stop has {len(stop)} strings, at most {limits.max_stop_strings} are accepted")
    for i, text in enumerate(stop):
        if not text:
            raise InvalidRequestError(f"stop[{i}] must not be empty")
        if len(text) > limits.max_stop_length:
            raise InvalidRequestError(
                f"stop[{i}] is {len(text)} characters long, at most {limits.max_stop_length} are accepted")
