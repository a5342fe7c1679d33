"""Scheduler settings: one frozen dataclass, built only at the entry point."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    verifiers: tuple[str, ...]  # host:port of each verifier replica
    drafters: tuple[str, ...] = ()  # host:port of each drafter replica (none: verifier alone)
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    policy: str = "adaptive"  # "adaptive" (confidence x load, DSpark) or "fixed" (draft_length every round)
    draft_length: int = 4  # tokens drafted and verified per round with the fixed policy
    max_draft_tokens: int = 8  # the adaptive policy's longest draft
    redis_url: str | None = None  # shared calibration and cost profiles; None = this process only
    max_batch_sessions: int = 64  # sessions per verify batch (per verifier replica)
    max_tokens_limit: int = 4096
    verify_timeout_s: float = 120.0  # a verifier slower than this is treated as lost
    draft_timeout_s: float = 30.0  # drafts later than this are skipped for the round
    connect_wait_s: float = 300.0  # how long start-up waits for a first verifier
    replica_cooldown_s: float = 5.0  # a failed replica is retried after this
    grace_s: float = 5.0
    metrics_port: int = 0  # serve Prometheus /metrics on host:metrics_port; 0 = off

    def __post_init__(self) -> None:
        if self.policy not in ("adaptive", "fixed"):
            raise ValueError(f"policy must be 'adaptive' or 'fixed', got {self.policy!r}")
        if not self.verifiers:
            raise ValueError("at least one verifier endpoint is required")
