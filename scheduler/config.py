"""Scheduler settings: one frozen dataclass, built only at the entry point."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.draft_policy import check_policy_name


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
    # Rounds in flight at once per verifier replica (scheduler/speculation_loop.py): with enough
    # sessions, one lane's drafting and bookkeeping overlap another's verification.
    pipeline_lanes: int = 1
    lane_min_sessions: int = 8  # split into lanes only when each would get this many sessions
    max_tokens_limit: int = 4096
    verify_timeout_s: float = 120.0  # a verifier slower than this is treated as lost
    draft_timeout_s: float = 30.0  # drafts later than this are skipped for the round
    connect_wait_s: float = 300.0  # how long start-up waits for a first verifier
    replica_cooldown_s: float = 5.0  # a failed replica is retried after this
    grace_s: float = 5.0
    # Where verifiers and drafters come from (scheduler/discovery.py): "static" (the lists above),
    # "dns" (the services below are NAME:PORT of headless Services) or "kubernetes" (they are
    # Service names whose EndpointSlices are watched in `namespace`).
    discovery: str = "static"
    verifier_service: str = ""
    drafter_service: str = ""  # empty: no drafters (verifier alone)
    namespace: str = ""  # kubernetes: empty = the pod's own namespace, or the kubeconfig context's
    grpc_port_name: str = "grpc"  # kubernetes: the Service port to use (empty: its only port)
    kubeconfig: str = ""  # kubernetes: empty = in-cluster config, else $KUBECONFIG / ~/.kube/config
    dns_refresh_s: float = 5.0  # dns: how often names are resolved again
    metrics_port: int = 0  # serve Prometheus /metrics on host:metrics_port; 0 = off

    def __post_init__(self) -> None:
        check_policy_name(self.policy)
        if self.pipeline_lanes < 1 or self.lane_min_sessions < 1:
            raise ValueError("pipeline_lanes and lane_min_sessions must be >= 1")
        if self.discovery not in ("static", "dns", "kubernetes"):
            raise ValueError(f"discovery must be 'static', 'dns' or 'kubernetes', got {self.discovery!r}")
        if self.discovery != "static" and not self.verifier_service:
            raise ValueError(f"--discovery {self.discovery} needs --verifier-service")
        if self.discovery == "static" and not self.verifiers:
            raise ValueError("at least one verifier endpoint is required")
