"""Gateway counters, rendered as Prometheus text for GET /metrics. No transport here.

Every request ends with one outcome, counted per transport (grpc, http); admission and rate
limiter state is read when rendered. Label values are fixed words, never caller input, and
never an API key.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Iterable

from gateway.admission import AdmissionSnapshot
from gateway.rate_limit import RateLimitedError
from specmesh.errors import CapacityError, InvalidRequestError
from specmesh.grpc_errors import NoBackendError, OverloadedError, UnauthenticatedError

OUTCOMES = ("ok", "invalid", "unauthenticated", "rate_limited", "overloaded", "deadline", "cancelled",
            "unavailable", "error")


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, InvalidRequestError):
        return "invalid"
    if isinstance(error, UnauthenticatedError):
        return "unauthenticated"
    if isinstance(error, RateLimitedError):
        return "rate_limited"
    if isinstance(error, (OverloadedError, CapacityError)):
        return "overloaded"
    if isinstance(error, TimeoutError):
        return "deadline"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    if isinstance(error, NoBackendError):
        return "unavailable"
    return "error"


class GatewayCounters:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (transport, outcome)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def count_request(self, transport: str, error: BaseException | None) -> str:
        outcome = outcome_of(error)
        self.requests[(transport, outcome)] += 1
        return outcome

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def total(self, outcome: str | None = None) -> int:
        return sum(n for (_, o), n in self.requests.items() if outcome is None or o == outcome)

    def render(self, admission: AdmissionSnapshot, rate_limit_fallbacks: int = 0) -> str:
        lines: list[str] = []
        _family(lines, "specmesh_gateway_requests_total", "counter",
                "Requests by transport and outcome.",
                ((f'{{transport="{t}",outcome="{o}"}}', n) for (t, o), n in sorted(self.requests.items())))
        _family(lines, "specmesh_gateway_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                [("", self.prompt_tokens)])
        _family(lines, "specmesh_gateway_generation_tokens_total", "counter", "Tokens generated.",
                [("", self.completion_tokens)])
        _family(lines, "specmesh_gateway_requests_running", "gauge", "Requests holding an admission slot.",
                [("", admission.running)])
        _family(lines, "specmesh_gateway_requests_queued", "gauge", "Requests waiting for an admission slot.",
                [("", admission.queued)])
        _family(lines, "specmesh_gateway_admitted_total", "counter", "Requests admitted.",
                [("", admission.admitted_total)])
        _family(lines, "specmesh_gateway_admission_refused_total", "counter", "Requests refused by admission.",
                [('{reason="queue_full"}', admission.refused_queue_full_total),
                 ('{reason="queue_timeout"}', admission.refused_queue_timeout_total)])
        _family(lines, "specmesh_gateway_rate_limit_local_decisions_total", "counter",
                "Rate limit decisions taken in this process because Redis did not answer.",
                [("", rate_limit_fallbacks)])
        return "\n".join(lines) + "\n"


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, int]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {value}" for labels, value in samples)
