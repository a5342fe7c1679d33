"""Settings every model-holding replica (drafter, verifier) shares: checked and parsed once."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def replica_problems(*, dtype: str, device: str, idle_ttl_s: float, batch_wait_ms: float, grace_s: float,
                     metrics_port: int) -> list[str]:
    """What is wrong with the settings drafter and verifier configs have in common."""
    problems = []
    if dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.split(":")[0] not in DEVICES:
        problems.append(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if idle_ttl_s < 0:
        problems.append(f"idle_ttl_s must be >= 0 (0 disables eviction), got {idle_ttl_s}")
    if batch_wait_ms < 0:
        problems.append(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
    if grace_s < 0:
        problems.append(f"grace_s must be >= 0, got {grace_s}")
    if not 0 <= metrics_port <= 65535:
        problems.append(f"metrics_port must be in [0, 65535], got {metrics_port}")
    return problems


def parse_sizes(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4); ValueError names the bad input."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
