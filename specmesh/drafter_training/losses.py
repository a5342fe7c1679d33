"""Losses of drafter training. Pure tensor math.

- Distillation: forward KL(p ‖ q) from the verifier's distribution p to the drafter's q, plus
  total variation ½‖p − q‖₁ (DeepSpec trains on both). TV is what speculative sampling pays
  for: a draft token drawn from q survives with probability exactly 1 − TV(p, q).
- Confidence: binary cross-entropy of the head's output against the soft label 1 − TV
  (DSpark eq. 8), with the label and the head's input detached, so the head learns to predict
  survival without pushing the drafter anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DistillationTerms:
    kl: torch.Tensor  # [N] KL(p ‖ q) per position, nats
    tv: torch.Tensor  # [N] ½‖p − q‖₁ per position, in [0, 1]
    agree: torch.Tensor  # [N] bool: argmax q == argmax p


def distillation_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       draft_ids: torch.Tensor | None = None) -> DistillationTerms:
    """student_logits [N, V] (or [N, K] over the draft vocabulary `draft_ids` [K]),
    teacher_logits [N, V] (any float dtype; computed in float32).

    With a draft vocabulary q has no mass outside it, so KL(p ‖ q) would be infinite: the KL
    term is taken against p restricted to the draft vocabulary and renormalised (what q can
    learn), while TV stays the true ½‖p − q‖₁ over the whole vocabulary (p's mass outside
    counts in full: it is what verification rejects), and agreement compares token ids.
    """
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    p = log_p.exp()
    teacher_top = teacher_logits.argmax(dim=-1)
    if draft_ids is None:
        kl = (p * (log_p - log_q)).sum(dim=-1)
        tv = 0.5 * (p - log_q.exp()).abs().sum(dim=-1)
        return DistillationTerms(kl, tv, student_logits.argmax(dim=-1) == teacher_top)
    log_p_in = log_p[:, draft_ids]  # [N, K]
    log_mass = torch.logsumexp(log_p_in, dim=-1, keepdim=True)  # log p(draft vocabulary)
    p_in = log_p_in.exp()
    kl = (p_in / log_mass.exp() * (log_p_in - log_mass - log_q)).sum(dim=-1)
    outside = (1.0 - p_in.sum(dim=-1)).clamp_min(0.0)
    tv = 0.5 * ((p_in - log_q.exp()).abs().sum(dim=-1) + outside)
    agree = draft_ids[student_logits.argmax(dim=-1)] == teacher_top
    return DistillationTerms(kl, tv, agree)


def distillation_loss(terms: DistillationTerms, tv_weight: float = 1.0) -> torch.Tensor:
    """Scalar: mean KL + tv_weight · mean TV."""
    return terms.kl.mean() + tv_weight * terms.tv.mean()


def survival_label(tv: torch.Tensor) -> torch.Tensor:
    """tv: [N] -> soft label 1 − ½‖q − p‖₁ [N], detached and clamped to [0, 1]."""
    return (1.0 - tv.detach()).clamp(0.0, 1.0)


def confidence_loss(confidence: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """confidence: [N] in [0, 1] (the head's output); tv: [N]. Scalar BCE against 1 − TV."""
    label = survival_label(tv)
    return torch.nn.functional.binary_cross_entropy(confidence.float().clamp(1e-6, 1 - 1e-6), label)
