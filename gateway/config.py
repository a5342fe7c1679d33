"""Gateway settings: one frozen dataclass, built only at the entry point (CLI flags / env)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.admission import AdmissionLimits
from gateway.rate_limit import RateLimits
from gateway.validation import RequestLimits


@dataclass(frozen=True)
class GatewayConfig:
    model: str  # the verifier's REF; the gateway loads only its tokenizer (and chat template)
    scheduler: str  # host:port of the scheduler
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    max_tokens_default: int = 256  # when a request leaves max_tokens unset
    max_tokens_limit: int = 4096  # most tokens one request may ask for
    temperature_default: float = 0.0  # when a request leaves temperature unset (0 = greedy)
    max_prompt_tokens: int = 8192  # after tokenisation and chat template
    max_stop_strings: int = 16
    max_stop_length: int = 256  # characters per stop string
    max_messages: int = 1024
    max_request_id_length: int = 128
    grace_s: float = 5.0  # in-flight requests get this long to finish on SIGTERM
    # OpenAI-compatible HTTP (FastAPI in the same process and event loop); None: no HTTP.
    http_port: int | None = None  # 0 picks a free port
    served_model_name: str | None = None  # the `model` HTTP clients name; None: the model REF
    max_body_bytes: int = 1 << 20  # largest request body (HTTP) / message (gRPC)
    # API keys: a file of keys or `sha256:<hex>` lines, and entries from the environment.
    # Empty: no key needed. Held as digests once loaded; never logged (repr=False).
    api_keys_file: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # Per-key rate limits (0: unlimited), shared through Redis when redis_url is set.
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    rate_limit_rpm: int = 0
    rate_limit_tpm: int = 0
    # Overload protection: running requests, waiting requests, and the longest wait.
    max_concurrent_requests: int = 128
    max_queued_requests: int = 512
    queue_timeout_s: float = 10.0

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_tokens=self.max_prompt_tokens,
            max_stop_strings=self.max_stop_strings,
            max_stop_length=self.max_stop_length,
            max_messages=self.max_messages,
            max_request_id_length=self.max_request_id_length,
        )

    def rate_limits(self) -> RateLimits:
        return RateLimits(requests_per_minute=self.rate_limit_rpm, tokens_per_minute=self.rate_limit_tpm)

    def admission_limits(self) -> AdmissionLimits:
        return AdmissionLimits(max_concurrent=self.max_concurrent_requests, max_queued=self.max_queued_requests,
                               queue_timeout_s=self.queue_timeout_s)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
