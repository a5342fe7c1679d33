"""Gateway settings: one frozen dataclass, built only at the entry point (CLI flags / env)."""

from __future__ import annotations

from dataclasses import dataclass

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

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_tokens=self.max_prompt_tokens,
            max_stop_strings=self.max_stop_strings,
            max_stop_length=self.max_stop_length,
            max_messages=self.max_messages,
            max_request_id_length=self.max_request_id_length,
        )
