"""Settings of one verifier replica. Built once, at the entry point (CLI flags or env vars)."""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.replica_options import DEVICES, DTYPES, replica_problems  # noqa: F401 - re-exported

# Batch sizes (tokens per forward) measured at start-up. CPU forwards are slow, so stop at 64;
# on a GPU pass larger sizes (the scheduler interpolates between rows and extrapolates flat).
DEFAULT_PROFILE_BATCH_TOKENS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class VerifierConfig:
    # Model REF: hub id, local directory, GGUF file or a short name of a model shipped on PyPI.
    model: str
    host: str = "127.0.0.1"
    port: int = 0  # 0 = let the OS pick a free port (read it back from RunningVerifier.port)
    num_slots: int = 16  # sessions held at once (KV slots); least recently used is evicted beyond
    max_context: int = 2048  # tokens per session: committed history plus the draft being verified
    dtype: str = "float32"  # one of DTYPES; float32 keeps greedy output exact on any batching
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    idle_ttl_s: float = 600.0  # sessions idle this long are dropped (answer CACHE_MISS); 0 = never
    # How long the first Verify call of a forward waits for concurrent calls to merge with.
    batch_wait_ms: float = 2.0
    # A forward is started without waiting once merged calls bring this many tokens.
    max_batch_tokens: int = 1024
    profile_batch_tokens: tuple[int, ...] = DEFAULT_PROFILE_BATCH_TOKENS
    grace_s: float = 5.0  # in-flight calls get this long to finish on SIGTERM
    metrics_port: int = 0  # serve Prometheus /metrics on host:metrics_port; 0 = off

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.model:
            problems.append("model must name a model REF")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in [0, 65535], got {self.port}")
        if self.num_slots <= 0:
            problems.append(f"num_slots must be positive, got {self.num_slots}")
        if self.max_context <= 1:
            problems.append(f"max_context must be at least 2, got {self.max_context}")
        if self.max_batch_tokens <= 0:
            problems.append(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if not self.profile_batch_tokens or any(size <= 0 for size in self.profile_batch_tokens):
            problems.append(f"profile_batch_tokens must be positive sizes, got {self.profile_batch_tokens}")
        problems += replica_problems(dtype=self.dtype, device=self.device, idle_ttl_s=self.idle_ttl_s,
                                     batch_wait_ms=self.batch_wait_ms, grace_s=self.grace_s,
                                     metrics_port=self.metrics_port)
        if problems:
            raise ValueError("invalid verifier config: " + "; ".join(problems))

    @property
    def idle_ttl(self) -> float | None:
        """TTL for SessionSlots: None when eviction by age is off."""
        return self.idle_ttl_s if self.idle_ttl_s > 0 else None
