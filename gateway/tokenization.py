"""Text to token ids the way the verifier's own `generate` would see them, and the token ids
that end a generation. No gRPC here.

`prompt` is tokenized as is (with the tokenizer's special tokens, e.g. BOS); `messages` go
through the model's chat template with the generation prompt, tokenized without adding
special tokens again (the template writes them). Both match specmesh.engine.Engine.encode.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from gateway.records import ChatMessage
from specmesh.errors import InvalidRequestError
from specmesh.model_loading import eos_token_ids

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_messages(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; send `prompt` instead of `messages`")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as error:  # noqa: BLE001 - templates raise for conversations they reject
        raise InvalidRequestError(f"messages rejected by the model's chat template: {error}") from error
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def stop_token_ids(model_ref: str, tokenizer: Any) -> list[int]:
    """End-of-sequence ids as the verifier uses them: the model's generation config first,
    then the tokenizer's (specmesh.model_loading.eos_token_ids), read without the weights.
    Falls back to the tokenizer alone when the model's config cannot be read."""
    holder = None
    try:
        holder = _generation_config_holder(model_ref)
    except Exception as error:  # noqa: BLE001 - best effort: the tokenizer still names an EOS
        log.warning("cannot read the generation config of %s (%s); using the tokenizer's EOS only", model_ref, error)
    return eos_token_ids(holder, tokenizer)


class _ConfigHolder:
    """Looks like a model to eos_token_ids: .generation_config and .config."""

    def __init__(self, generation_config: Any, config: Any) -> None:
        self.generation_config = generation_config
        self.config = config


def _generation_config_holder(model_ref: str) -> _ConfigHolder | None:
    from transformers import AutoConfig, GenerationConfig

    from specmesh.model_loading import _is_complete, gguf_cache_entry
    from specmesh.model_refs import resolve_model_ref

    resolved = resolve_model_ref(model_ref)
    if resolved.kind == "hub":
        location, gguf_file = resolved.location, None
    elif resolved.gguf_path is not None:
        entry = gguf_cache_entry(resolved)
        if _is_complete(entry):
            location, gguf_file = str(entry), None
        else:
            location, gguf_file = str(resolved.gguf_path.parent), resolved.gguf_path.name
    else:
        location, gguf_file = resolved.location, None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(location, **kwargs)
    try:
        generation_config = GenerationConfig.from_pretrained(location, **kwargs)
    except Exception:  # noqa: BLE001 - no generation_config.json: derive it like transformers does
        generation_config = GenerationConfig.from_model_config(config)
    return _ConfigHolder(generation_config, config)
