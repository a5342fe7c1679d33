"""The trained-drafter directory: write it, recognise it, load it back.

Layout (a standard HF directory plus two specmesh files):

    config.json, generation_config.json   LlamaForCausalLM config
    model.safetensors                      the drafter's own weights (float16); without the
                                           embedding and LM head when they are the verifier's
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    confidence_head.safetensors + .json    the confidence head (optional)
    draft_vocab.safetensors                int32 `token_ids` [K]: the draft vocabulary, when the
                                           drafter drafts from K tokens only (optional); its
                                           LM head rows are gathered from the full head at load
    specmesh_drafter.json                  format, verifier name and tokenizer fingerprint,
                                           which verifier tensors to rebuild, training summary
    eval.json, eval.png                    the held-out evaluation (optional)

A drafter that shares the verifier's embedding is loaded with the verifier: in the same process
(`specmesh generate`) the verifier's tensors are used as they are, costing no memory; in the
drafter service they are read from the verifier REF's safetensors (the GGUF cache copy for a
GGUF verifier), which takes a fraction of a second.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specmesh.drafter_training.model import (
    ConfidenceHead,
    DraftVocabHead,
    SharedTensors,
    attach_shared,
    draft_token_ids,
    restrict_vocabulary,
)
from specmesh.errors import ModelReferenceError

log = logging.getLogger(__name__)

FORMAT = "specmesh-drafter-v1"
MARKER = "specmesh_drafter.json"
WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "confidence_head.safetensors"
HEAD_CONFIG = "confidence_head.json"
EMBEDDING_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"
DRAFT_VOCAB = "draft_vocab.safetensors"
DRAFT_VOCAB_KEY = "token_ids"


def export_drafter(directory: Path | str, model: Any, tokenizer: Any, *, shared: SharedTensors | None,
                   head: ConfidenceHead | None, verifier_name: str, verifier_fingerprint: str,
                   summary: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write the drafter directory. Shared tensors are left out (rebuilt from the verifier at load)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    skip = {EMBEDDING_KEY, LM_HEAD_KEY} if shared is not None else set()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        skip.add(LM_HEAD_KEY)  # rebuilt by tying on load
    draft_ids = draft_token_ids(model)
    if draft_ids is not None:
        # The draft vocabulary's head rows are gathered at load from the full head (the verifier's
        # or the tied embedding); only a head that cannot be rebuilt ships, as its K rows.
        _write_draft_vocabulary(directory, draft_ids)
    elif (directory / DRAFT_VOCAB).exists():
        (directory / DRAFT_VOCAB).unlink()  # a stale one from an earlier export would restrict this drafter
    state = {name: tensor.detach().to("cpu", dtype).contiguous()
             for name, tensor in model.state_dict().items() if name not in skip}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    if head is not None:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()},
                  str(directory / HEAD_WEIGHTS), metadata={"format": "pt"})
        (directory / HEAD_CONFIG).write_text(json.dumps({
            "format": FORMAT, **head.head_config(),
            "input": "drafter logits at temperature 1: top-k probabilities, log of the largest, entropy",
            "target": "survival of a draft token, soft label 1 - 0.5 * |q - p|_1",
        }, indent=2))
    marker = {
        "format": FORMAT,
        "verifier": verifier_name,
        "verifier_tokenizer_sha256": verifier_fingerprint,
        "shared_verifier_tensors": ({"embedding": shared.embedding, "lm_head": shared.lm_head}
                                    if shared is not None else None),
        "draft_vocabulary": ({"file": DRAFT_VOCAB, "size": int(draft_ids.numel())} if draft_ids is not None
                             else None),
        "weights_dtype": str(dtype).replace("torch.", ""),
        "own_parameters": sum(t.numel() for t in state.values()),
        "summary": summary or {},
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=2))
    return directory


def _write_draft_vocabulary(directory: Path, token_ids: torch.Tensor | list[int]) -> None:
    ids = torch.as_tensor(token_ids).detach().to("cpu", torch.int32).contiguous()
    save_file({DRAFT_VOCAB_KEY: ids}, str(directory / DRAFT_VOCAB), metadata={"format": "pt"})


def set_draft_vocabulary(directory: Path | str, token_ids: list[int] | None) -> None:
    """Give an exported full-vocabulary drafter a draft vocabulary (None: take it away) without
    retraining: its layers are unchanged, its LM head is gathered to these rows at load."""
    directory = Path(directory)
    marker = read_marker(directory)
    if token_ids is None:
        (directory / DRAFT_VOCAB).unlink(missing_ok=True)
        marker["draft_vocabulary"] = None
    else:
        _write_draft_vocabulary(directory, token_ids)
        marker["draft_vocabulary"] = {"file": DRAFT_VOCAB, "size": len(token_ids)}
    (directory / MARKER).write_text(json.dumps(marker, indent=2))


def is_trained_drafter(ref: str | Path) -> bool:
    path = Path(ref)
    return path.is_dir() and (path / MARKER).is_file()


def read_marker(directory: Path | str) -> dict[str, Any]:
    return json.loads((Path(directory) / MARKER).read_text())


def load_confidence_head(directory: Path | str, device: str | torch.device = "cpu") -> ConfidenceHead | None:
    directory = Path(directory)
    if not (directory / HEAD_WEIGHTS).is_file():
        return None
    settings = json.loads((directory / HEAD_CONFIG).read_text()) if (directory / HEAD_CONFIG).is_file() else {}
    head = ConfidenceHead(num_top=int(settings.get("num_top", 8)), hidden=int(settings.get("hidden", 32)),
                          prior=bool(settings.get("prior", False)))  # absent: the first format, without prior
    head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS)))
    head.to(device).eval().requires_grad_(False)
    return head


def _safetensors_location(directory: Path, name: str) -> Path | None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        file = json.loads(index.read_text()).get("weight_map", {}).get(name)
        return directory / file if file else None
    single = directory / "model.safetensors"
    return single if single.is_file() else None


def read_verifier_tensors(verifier_ref: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of the verifier REF, read from its safetensors without loading the model
    (for a GGUF: the converted cache copy, made on first use). A tied LM head missing from the
    file is the embedding. Falls back to loading the whole model."""
    from specmesh.model_loading import ensure_converted, load_causal_lm
    from specmesh.model_refs import resolve_model_ref

    resolved = resolve_model_ref(verifier_ref)
    directory: Path | None = None
    if resolved.is_gguf:
        directory, _ = ensure_converted(resolved)
    elif resolved.kind == "directory":
        directory = Path(resolved.location)
    found: dict[str, torch.Tensor] = {}
    if directory is not None:
        for name in names:
            location = _safetensors_location(directory, name)
            if location is None:
                continue
            with safe_open(str(location), framework="pt") as handle:
                if name in handle.keys():
                    found[name] = handle.get_tensor(name)
        if len(names) == 2 and names[1] not in found and names[0] in found:
            found[names[1]] = found[names[0]]  # tied: the head is the embedding
    if len(found) < len(set(names)):
        params = dict(load_causal_lm(verifier_ref).model.named_parameters(remove_duplicate=False))
        missing = [n for n in names if n not in params]
        if missing:
            raise ModelReferenceError(f"verifier {verifier_ref!r} has no tensors {missing}: it is not the verifier "
                                      "this drafter was trained for")
        found = {n: params[n].detach() for n in names}
    return found


@dataclass
class LoadedDrafterDir:
    model: Any  # LlamaForCausalLM, eval mode, requires_grad False
    tokenizer: Any
    confidence_head: ConfidenceHead | None
    name: str  # the directory's name
    marker: dict[str, Any]


def load_trained_drafter(directory: Path | str, *, verifier_model: Any = None, verifier_ref: str | None = None,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedDrafterDir:
    """The drafter (eval mode, no gradients), its tokenizer and confidence head (or None).

    A drafter that shares its verifier's embedding needs the verifier: `verifier_model` (an
    in-process model: its tensors are used as they are when dtype and device match) or
    `verifier_ref` (read from its files). Raises ModelReferenceError with the reason.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    try:
        marker = read_marker(directory)
        config = AutoConfig.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        own = load_file(str(directory / WEIGHTS))
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:  # any unreadable piece: one error naming the directory
        raise ModelReferenceError(f"cannot load trained drafter {str(directory)!r}: {type(error).__name__}: {error}"
                                  ) from error
    vocabulary = marker.get("draft_vocabulary")
    draft_ids: torch.Tensor | None = None
    own_reduced_head: torch.Tensor | None = None
    if vocabulary:
        try:
            draft_ids = load_file(str(directory / vocabulary.get("file", DRAFT_VOCAB)))[DRAFT_VOCAB_KEY].long()
        except Exception as error:
            raise ModelReferenceError(f"trained drafter {str(directory)!r}: unreadable draft vocabulary: {error}"
                                      ) from error
        if LM_HEAD_KEY in own and own[LM_HEAD_KEY].shape[0] == draft_ids.numel():
            own_reduced_head = own.pop(LM_HEAD_KEY)  # a head that could not be rebuilt shipped its K rows
    result = model.load_state_dict({k: v.to(dtype) for k, v in own.items()}, strict=False)
    shared_names = marker.get("shared_verifier_tensors")
    allowed_missing = {EMBEDDING_KEY, LM_HEAD_KEY} if shared_names else {LM_HEAD_KEY}
    if own_reduced_head is not None:
        allowed_missing = allowed_missing | {LM_HEAD_KEY}
    missing = [k for k in result.missing_keys if k not in allowed_missing]
    if missing or result.unexpected_keys:
        raise ModelReferenceError(f"trained drafter {str(directory)!r} has missing {missing[:3]} or unexpected "
                                  f"{result.unexpected_keys[:3]} weights")
    if shared_names:
        names = [shared_names["embedding"], shared_names["lm_head"]]
        if verifier_model is not None:
            params = dict(verifier_model.named_parameters(remove_duplicate=False))
            if any(n not in params for n in names):
                raise ModelReferenceError(f"drafter {str(directory)!r} shares tensors {names} that its verifier "
                                          "does not have: it was trained for another verifier")
            tensors = {n: params[n].detach() for n in names}
        elif verifier_ref:
            tensors = read_verifier_tensors(verifier_ref, names)
        else:
            raise ModelReferenceError(
                f"drafter {str(directory)!r} shares its verifier's embedding and LM head "
                f"(trained for {marker.get('verifier')!r}): it needs the verifier model too "
                "(the drafter service's --verifier-model)")
        rows, hidden = config.vocab_size, config.hidden_size
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != (rows, hidden):
                raise ModelReferenceError(f"verifier tensor {name} has shape {tuple(tensor.shape)}, the drafter "
                                          f"{str(directory)!r} needs {(rows, hidden)}: another verifier")
        embedding = tensors[names[0]].to(device=device, dtype=dtype)
        head = embedding if names[1] == names[0] else tensors[names[1]].to(device=device, dtype=dtype)
        attach_shared(model, embedding, head)
    elif getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if draft_ids is not None:
        try:
            if own_reduced_head is not None:
                model.set_output_embeddings(DraftVocabHead(own_reduced_head.to(dtype), draft_ids))
            else:
                restrict_vocabulary(model, draft_ids)
        except ValueError as error:
            raise ModelReferenceError(f"trained drafter {str(directory)!r}: {error}") from error
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedDrafterDir(model, tokenizer, load_confidence_head(directory, device), directory.name, marker)
