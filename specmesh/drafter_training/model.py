"""The drafter model and its confidence head.

The drafter is a standard `LlamaForCausalLM` (the family of SmolLM2 and many other verifiers),
so every path that loads a HF causal LM loads it, and the model runner's packed forward and CUDA
graphs apply. It uses the verifier's tokenizer and vocabulary. When its hidden size equals the
verifier's, it shares (frozen) the verifier's input embedding and LM head: those are most of a
small model's parameters, they are already trained, and keeping them fixed means the drafter
only has to learn a few decoder layers. Its layers start as copies of the verifier's first
layers (an early-exit drafter) when the shapes match, else from random initialisation.

A drafter may draft from a reduced output vocabulary (FR-Spec, EAGLE-3's draft vocabulary):
its LM head holds only the rows of the K tokens the verifier generates most often
(`DraftVocabHead`, rows gathered from the verifier's LM head, so nothing big ships). On CPU the
full LM head is most of a small drafter's step (49k x 576 float32 rows are 113 MB read per
token; 8k rows fit in the last-level cache). The draft distribution q then has no mass outside
those K tokens, which verification's rejection rule handles like any other q: still lossless.

The confidence head predicts, from the drafter's logits alone, the probability that a draft
token survives verification (trained on the soft label 1 - ½‖q - p‖₁, DSpark eq. 8). Working on
logits rather than hidden states keeps the drafter's runtime unchanged: the runner already
returns the logits the head needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_parameters(config: Any) -> dict[str, Any]:
    """The verifier's RoPE settings for full attention, as transformers 5.x spells them."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_type" in rope or "rope_theta" in rope:
            return dict(rope)
        full = rope.get("full_attention")  # per-layer-type settings (Gemma 3)
        if isinstance(full, dict):
            return dict(full)
    return {"rope_type": "default", "rope_theta": float(getattr(config, "rope_theta", 10000.0))}


def drafter_config(verifier: nn.Module, num_layers: int, hidden_size: int | None = None) -> LlamaConfig:
    """A LlamaConfig for a drafter of `num_layers` layers with the verifier's vocabulary.

    hidden_size None (or equal to the verifier's) copies the verifier's layer shapes, which is
    what makes sharing its embedding and initialising from its layers possible.
    """
    if num_layers <= 0:
        raise ValueError(f"a drafter needs at least one layer, got {num_layers}")
    vc = text_config(verifier.config)
    vocab_rows = int(verifier.get_input_embeddings().num_embeddings)
    v_hidden = int(vc.hidden_size)
    hidden = int(hidden_size or v_hidden)
    if hidden == v_hidden:
        heads = int(vc.num_attention_heads)
        kv_heads = int(getattr(vc, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(vc, "head_dim", None) or hidden // heads)
        intermediate = int(vc.intermediate_size)
    else:
        if hidden % 32:
            raise ValueError(f"--hidden must be a multiple of 32, got {hidden}")
        head_dim = 64 if hidden % 64 == 0 else 32
        heads = hidden // head_dim
        kv_heads = max(1, heads // 3) if heads % 3 == 0 else max(1, heads // 4) if heads % 4 == 0 else heads
        ratio = float(vc.intermediate_size) / v_hidden
        intermediate = int(math.ceil(hidden * ratio / 64) * 64)
    return LlamaConfig(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(getattr(vc, "max_position_embeddings", 8192)),
        rms_norm_eps=float(getattr(vc, "rms_norm_eps", 1e-6)),
        rope_parameters=_rope_parameters(vc),
        bos_token_id=getattr(vc, "bos_token_id", None),
        eos_token_id=getattr(vc, "eos_token_id", None),
        pad_token_id=getattr(vc, "pad_token_id", None),
        tie_word_embeddings=bool(getattr(vc, "tie_word_embeddings", False)) if hidden == v_hidden else True,
        attention_bias=False,
        mlp_bias=False,
    )


@dataclass(frozen=True)
class SharedTensors:
    """Which verifier parameters the drafter uses as its embedding and LM head (frozen)."""

    embedding: str  # verifier parameter name, e.g. "model.embed_tokens.weight"
    lm_head: str  # the same name when the verifier ties them


def _parameter_name(model: nn.Module, tensor: torch.Tensor) -> str | None:
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter is tensor:
            return name
    return None


def sharable_tensors(verifier: nn.Module, hidden_size: int) -> SharedTensors | None:
    """The verifier's embedding and LM head names when a drafter of hidden_size can share them."""
    embedding = verifier.get_input_embeddings()
    head = verifier.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return None
    if embedding.weight.shape[1] != hidden_size or head.weight.shape != embedding.weight.shape:
        return None
    embedding_name = _parameter_name(verifier, embedding.weight)
    head_name = _parameter_name(verifier, head.weight)
    if embedding_name is None or head_name is None:
        return None
    return SharedTensors(embedding_name, head_name)


def attach_shared(drafter: LlamaForCausalLM, embedding: torch.Tensor, lm_head: torch.Tensor) -> None:
    """Make `embedding` [V, H] and `lm_head` [V, H] the drafter's (frozen) embedding and head.

    The tensors are used as they are (no copy), so a drafter in the verifier's process costs no
    memory for them. When they are one tensor (a tied verifier), the drafter stays tied.
    """
    shared_embedding = nn.Parameter(embedding, requires_grad=False)
    drafter.model.embed_tokens.weight = shared_embedding
    if lm_head is embedding:
        drafter.lm_head.weight = shared_embedding
    else:
        drafter.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)


def _init_from_verifier(drafter: LlamaForCausalLM, verifier: nn.Module) -> list[int]:
    """Copy the verifier's first layers (and its final norm) into the drafter; returns the verifier
    layer indices used, or [] when the layer shapes do not match."""
    source_layers = list(verifier.get_decoder().layers)
    target_layers = list(drafter.model.layers)
    # The first layers, as in an early-exit drafter: they read the embedding they were trained on
    # (evenly spaced layers were tried: a later layer on an early layer's output starts at 0% agreement).
    indices = list(range(min(len(target_layers), len(source_layers))))
    try:
        for j, i in enumerate(indices):
            target_layers[j].load_state_dict(source_layers[i].state_dict(), strict=True)
        norm = getattr(verifier.get_decoder(), "norm", None)
        if norm is not None:
            drafter.model.norm.load_state_dict(norm.state_dict(), strict=True)
    except (RuntimeError, KeyError):
        return []  # another architecture: keep the random initialisation
    return indices


def build_drafter_model(verifier: nn.Module, num_layers: int, hidden_size: int | None = None,
                        seed: int = 0) -> tuple[LlamaForCausalLM, SharedTensors | None, list[int]]:
    """A float32 drafter for `verifier`, in train mode, on the verifier's device.

    Returns (drafter, shared tensors or None, verifier layer indices it was initialised from).
    """
    config = drafter_config(verifier, num_layers, hidden_size)
    shared = sharable_tensors(verifier, config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        drafter = LlamaForCausalLM(config).to(torch.float32)
    init_layers = _init_from_verifier(drafter, verifier) if config.hidden_size == text_config(
        verifier.config).hidden_size else []
    device = verifier.get_input_embeddings().weight.device
    drafter.to(device)
    if shared is not None:
        embedding = verifier.get_input_embeddings().weight.detach().to(torch.float32)
        head_weight = verifier.get_output_embeddings().weight
        tied = head_weight is verifier.get_input_embeddings().weight
        lm_head = embedding if tied else head_weight.detach().to(torch.float32)
        attach_shared(drafter, embedding, lm_head)
    drafter.train()
    return drafter, shared, init_layers


# --------------------------------------------------------------------------- draft vocabulary


class DraftVocabHead(nn.Linear):
    """An LM head over a subset of the vocabulary: row i scores token `token_ids[i]`.

    Whoever samples from its logits maps a drafted index i back to the token id token_ids[i]
    (ModelDrafter does; see `draft_token_ids`). The rows are frozen copies of the full head's.
    """

    def __init__(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().__init__(rows.shape[1], rows.shape[0], bias=False, device=rows.device, dtype=rows.dtype)
        self.weight = nn.Parameter(rows.detach().clone(), requires_grad=False)
        self.register_buffer("token_ids", token_ids.to(device=rows.device, dtype=torch.long), persistent=False)


def restrict_vocabulary(drafter: nn.Module, token_ids: torch.Tensor | list[int]) -> DraftVocabHead:
    """Replace the drafter's LM head by the rows of `token_ids` (distinct ids of its vocabulary)
    of its current head; returns the new head."""
    full = drafter.get_output_embeddings()
    if isinstance(full, DraftVocabHead):
        raise ValueError("the drafter's vocabulary is already restricted")
    if getattr(full, "bias", None) is not None:
        raise ValueError("a draft vocabulary needs an LM head without bias")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    rows = full.weight.shape[0]
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= rows or ids.unique().numel() != ids.numel():
        raise ValueError(f"draft vocabulary must hold distinct token ids in [0, {rows})")
    head = DraftVocabHead(full.weight.detach()[ids.to(full.weight.device)], ids)
    drafter.set_output_embeddings(head)
    return head


def draft_token_ids(model: nn.Module) -> torch.Tensor | None:
    """Token id of each logit row of `model`'s LM head, or None when it covers the whole vocabulary."""
    head = model.get_output_embeddings()
    return head.token_ids if isinstance(head, DraftVocabHead) else None


def frequency_ranked_vocabulary(token_lists: Sequence[Sequence[int]], vocab_rows: int, size: int,
                                always: Sequence[int] = ()) -> list[int]:
    """The `size` most frequent ids of `token_lists` (most frequent first; ties by id), with the
    ids of `always` (end-of-sequence: a drafter must be able to draft the end) included. When
    fewer ids occur, the rest are the lowest unseen ids, so the size is always `size`."""
    size = min(size, vocab_rows)
    flat = [t for tokens in token_lists for t in tokens if 0 <= t < vocab_rows]
    counts = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=vocab_rows)
    for token in always:
        if 0 <= token < vocab_rows:
            counts[token] = counts.max() + 1  # first in rank, whatever the data says
    # A stable sort on -count keeps ties in id order.
    order = torch.sort(-counts, stable=True).indices
    return [int(i) for i in order[:size]]


# --------------------------------------------------------------------------- confidence head


class ConfidenceHead(nn.Module):
    """Survival probability of a draft token from the drafter's logits.

    Features (per position): the top `num_top` probabilities of the drafter's distribution at
    temperature 1, the log of the largest, and the entropy. The output is
    sigmoid(scale · logit(top probability) + bias + MLP(features)); with scale 1, bias 0 and the
    MLP's last layer at zero it starts as the default confidence (the top draft probability),
    and training only has to learn the correction.
    """

    def __init__(self, num_top: int = 8, hidden: int = 32, prior: bool = True) -> None:
        """prior False: the plain MLP (heads exported before the prior existed)."""
        super().__init__()
        self.num_top = num_top
        self.hidden = hidden
        self.prior = prior
        self.net = nn.Sequential(nn.Linear(num_top + 2, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        if prior:
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)
            self.scale = nn.Parameter(torch.ones(()))
            self.bias = nn.Parameter(torch.zeros(()))

    def features(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [N, V] -> features [N, num_top + 2] (float32)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.exp()
        top = torch.topk(probs, min(self.num_top, probs.shape[-1]), dim=-1).values
        if top.shape[-1] < self.num_top:
            top = torch.nn.functional.pad(top, (0, self.num_top - top.shape[-1]))
        entropy = -(probs * log_probs).sum(dim=-1, keepdim=True)
        return torch.cat([top, torch.log(top[:, :1].clamp_min(1e-9)), entropy], dim=-1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [N, V] -> confidence [N] in [0, 1]."""
        features = self.features(logits)
        correction = self.net(features.to(self.net[0].weight.dtype)).squeeze(-1).float()
        if not self.prior:
            return torch.sigmoid(correction)
        top1 = features[:, 0].clamp(1e-6, 1 - 1e-6)
        prior = torch.log(top1) - torch.log1p(-top1)  # logit of the top draft probability
        return torch.sigmoid(self.scale * prior + self.bias + correction)

    def head_config(self) -> dict[str, int | bool]:
        return {"num_top": self.num_top, "hidden": self.hidden, "prior": self.prior}
