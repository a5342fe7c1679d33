"""Per-request sampling parameters and their validation.

Validation lives here, next to the type, so the engine, the scheduler and the gateway all
refuse the same inputs with the same messages.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from specmesh.errors import InvalidRequestError

# Largest seed we accept: seeds travel as int64 on the wire.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 means greedy (argmax), whatever top_k/top_p say."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature):
            raise InvalidRequestError(f"temperature must be a number, got {self.temperature!r}")
        if self.temperature < 0 or math.isinf(self.temperature):
            raise InvalidRequestError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be in [0, 2^63-1], got {self.seed}")
        return self

    def with_seed(self) -> "SamplingParams":
        """A copy carrying a concrete seed: unseeded requests get a random one at admission,
        so every later random draw is a pure function of (seed, position) and replays exactly."""
        if self.seed is not None:
            return self
        return SamplingParams(self.temperature, self.top_p, self.top_k, secrets.randbits(62))


def validate_max_tokens(max_tokens: int, limit: int) -> int:
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > limit:
        raise InvalidRequestError(f"max_tokens {max_tokens} exceeds this deployment's limit of {limit}")
    return max_tokens
