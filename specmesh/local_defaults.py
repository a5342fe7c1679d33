"""What `specmesh up`, `generate` and `bench` run when the user names no precision or drafter.

Measured on a 2-core CPU with native bfloat16 (AVX512-BF16), SmolLM2-135M, greedy, concurrency 1
(`specmesh bench --workload chat|mixed`, docs/cpu-benchmarks.md):

- bfloat16 decodes 1.4x faster than float32 (29.4 against 20.8 tokens/s with speculation off),
  and its matrix kernels cost nearly the same for 1 to 8 rows (verifying 4 drafts: 30.6 ms
  against 27.3 for one token; float32: 59 against 41), which is what speculation needs. The
  runner keeps it exact: speculation on commits the same bits as off (batch-invariant layout,
  PackedForward.batch_invariant).
- With it the shipped trained drafter beats prompt lookup (1.18-1.19x against 1.04-1.18x);
  in float32 neither pays (0.95x and 0.99x), and prompt lookup costs least.

So: bfloat16 where the CPU computes it natively (elsewhere it is emulated and slower than
float32) for the verifiers we ship a drafter for, float32 otherwise; the trained drafter shipped
for the verifier when running in bfloat16, prompt lookup otherwise. Other models stay float32 on
CPU because the batch-invariant layout lives in the packed path, which models with sliding-window
attention (Gemma 3) do not take: there bfloat16 would not be exact.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch

from specmesh.model_refs import find_short_name

AUTO = "auto"
# Verifier short name -> the drafter shipped for it (specmesh/drafters/, specmesh.drafter_refs).
SHIPPED_DRAFTER_FOR = {"smollm2-135m": "smollm2-135m-drafter"}


def native_bfloat16_cpu() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume not
        return False


def _shipped_drafter(verifier: str) -> str | None:
    short = find_short_name(verifier)
    return SHIPPED_DRAFTER_FOR.get(short.canonical) if short is not None else None


def resolve_dtype(dtype: str, device: str = "cpu", verifier: str | None = None) -> str:
    """`auto` -> bfloat16 on CUDA, or on a CPU with native bfloat16 for a verifier we ship a
    drafter for; float32 otherwise."""
    if dtype != AUTO:
        return dtype
    if device.startswith("cuda"):  # "cuda" or "cuda:N"
        return "bfloat16"
    return "bfloat16" if native_bfloat16_cpu() and verifier is not None and _shipped_drafter(verifier) else "float32"


def local_choice(verifier: str, drafter: str, dtype: str, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(drafter, dtype) for a local run (`up`, `generate`, `bench`). A precision or device set
    for the verifier in the environment (SPECMESH_VERIFIER_DTYPE / SPECMESH_VERIFIER_DEVICE, the
    services' own settings) wins over `auto`: the user said it where the services read it."""
    if dtype == AUTO and environ.get("SPECMESH_VERIFIER_DTYPE"):
        dtype = environ["SPECMESH_VERIFIER_DTYPE"]
    dtype = resolve_dtype(dtype, environ.get("SPECMESH_VERIFIER_DEVICE", "cpu"), verifier)
    return resolve_drafter(drafter, verifier, dtype), dtype


def resolve_drafter(drafter: str, verifier: str, dtype: str) -> str:
    """`auto` -> the drafter shipped for this verifier when running in bfloat16, else prompt lookup."""
    if drafter != AUTO:
        return drafter
    shipped = _shipped_drafter(verifier)
    return shipped if shipped is not None and dtype == "bfloat16" else "prompt-lookup"
