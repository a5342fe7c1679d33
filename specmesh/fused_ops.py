"""Fewer, fused kernels for HF decoders on CUDA, patched onto one model instance.

A decode-shaped forward is a long chain of tiny kernels; under a CUDA graph their launch cost
is gone but each still costs a few microseconds of GPU time. HF's RMSNorm is seven of them
(cast, square, mean, add, rsqrt, multiply, cast and scale); `F.rms_norm` on CUDA is one fused
kernel. Two norms per layer: about 12 kernels per layer fewer (measured in scripts/gpu_bench.py).

Numerics: the fused kernel scales by the weight before rounding to the model dtype once, where
HF rounds the normalised activations first: a last-bit difference in bf16. Hence CUDA only,
never for float32 on CPU (the paths the exactness tests run), and only for norm classes known
to compute `weight * x / rms(x)` (Gemma's `(1 + weight)` variant is left alone).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# RMSNorm classes whose forward is exactly weight * normalise(x) with `variance_epsilon`.
_PLAIN_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                    "GraniteRMSNorm", "OlmoRMSNorm", "SmolLM3RMSNorm", "Olmo2RMSNorm"}


def _fused_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def install(model: torch.nn.Module) -> int:
    """Patch the plain RMSNorms of `model` (CUDA, half precision only). Returns how many."""
    parameter = next(model.parameters())
    if parameter.device.type != "cuda" or parameter.dtype not in (torch.bfloat16, torch.float16):
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ in _PLAIN_RMS_NORMS and hasattr(module, "variance_epsilon") \
                and getattr(module, "weight", None) is not None and "_specmesh_original_forward" not in vars(module):
            module._specmesh_original_forward = module.forward
            module.forward = types.MethodType(_fused_rms_norm, module)
            count += 1
    return count


def uninstall(model: torch.nn.Module) -> int:
    """Undo `install` (for measuring what it buys)."""
    count = 0
    for module in model.modules():
        if vars(module).pop("_specmesh_original_forward", None) is not None:
            vars(module).pop("forward", None)  # the class's forward again
            count += 1
    return count
