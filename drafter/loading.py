"""Build the drafter core a DrafterConfig names: load the model (or none) and its tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from drafter.config import DrafterConfig
from drafter.context_copy import ContextCopyRule
from drafter.drafting import ModelDrafter
from drafter.prompt_lookup import PromptLookupDrafter
from specmesh.drafter_refs import early_exit_model, parse_drafter_ref
from specmesh.drafter_training.export import is_trained_drafter, load_trained_drafter
from specmesh.model_loading import check_tokenizers_compatible, load_causal_lm, load_tokenizer
from specmesh.model_runner import ModelRunner

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedDrafter:
    core: Any  # ModelDrafter | PromptLookupDrafter
    tokenizer: Any | None  # for the Profile fingerprint; None when unknown
    model_name: str


def load_drafter(config: DrafterConfig) -> LoadedDrafter:
    """Blocking (loads weights). Raises ModelReferenceError / TokenizerMismatchError."""
    spec = parse_drafter_ref(config.model)
    dtype = TORCH_DTYPES[config.dtype]
    if spec.kind == "prompt-lookup":
        tokenizer = load_tokenizer(config.verifier_model) if config.verifier_model else None
        return LoadedDrafter(PromptLookupDrafter(), tokenizer, config.model)
    if spec.kind == "early-exit":
        verifier = load_causal_lm(config.verifier_model, dtype=dtype, device=config.device)
        model = early_exit_model(verifier.model, spec.num_layers)
        return LoadedDrafter(_model_drafter(model, config, f"{verifier.name}/layers:{spec.num_layers}"),
                             verifier.tokenizer, config.model)
    if is_trained_drafter(spec.model_ref):  # `specmesh train-drafter` output: may share the verifier's embedding
        trained = load_trained_drafter(spec.model_ref, verifier_ref=config.verifier_model or None, dtype=dtype,
                                       device=config.device)
        if config.verifier_model:
            check_tokenizers_compatible(load_tokenizer(config.verifier_model), trained.tokenizer, None,
                                        int(trained.model.get_input_embeddings().num_embeddings))
        core = _model_drafter(trained.model, config, trained.name)
        core.confidence_head = trained.confidence_head
        return LoadedDrafter(core, trained.tokenizer, config.model)
    loaded = load_causal_lm(spec.model_ref, dtype=dtype, device=config.device)
    if config.verifier_model:
        check_tokenizers_compatible(load_tokenizer(config.verifier_model), loaded.tokenizer,
                                    None, loaded.embedding_rows)
    return LoadedDrafter(_model_drafter(loaded.model, config, loaded.name), loaded.tokenizer, config.model)


def _model_drafter(model: torch.nn.Module, config: DrafterConfig, name: str) -> ModelDrafter:
    runner = ModelRunner(model, config.num_slots, config.max_context)
    return ModelDrafter(runner, name=name, draft_top_k=config.draft_top_k, idle_ttl_s=config.idle_ttl,
                        context_copy=ContextCopyRule() if config.context_copy else None)
