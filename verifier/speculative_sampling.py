"""Lossless speculative sampling for one session. Pure tensor math, no I/O.

Standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft token x_i is
accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is
drawn from normalize(max(0, p_i - q_i)); if every draft is accepted a bonus token is drawn
from p_{n}. The committed tokens then follow p exactly, whatever q was. Greedy requests accept
a draft iff it equals the target argmax, which reproduces greedy decoding token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmesh.distributions import sample_from_probs, target_probs
from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams

# Below this total mass the residual max(0, p - q) is numerically empty (p == q up to float
# error), and a rejection there can only be rounding: fall back to p itself.
_EMPTY_RESIDUAL = 1e-12


@dataclass(frozen=True)
class Verdict:
    accepted_count: int
    next_token: int


def dense_from_sparse(dist: SparseDistribution, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] dense probabilities from a sparse q."""
    dense = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if dist.token_ids:
        index = torch.tensor(dist.token_ids, dtype=torch.long, device=device)
        dense.index_put_((index,), torch.tensor(dist.probs, dtype=torch.float32, device=device), accumulate=True)
    return dense


def num_uniforms(num_draft_tokens: int) -> int:
    """How many uniforms one verification consumes: one per draft and one for the final sample.

    Always drawn in full so the random stream does not depend on where rejection happened.
    """
    return num_draft_tokens + 1


def verify_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> Verdict:
    """target_logits: [n+1, V], row i predicts the token after draft i-1."""
    return verify_greedy_argmax(target_logits.argmax(dim=-1).tolist(), draft_tokens)


def verify_greedy_argmax(argmax: list[int], draft_tokens: list[int]) -> Verdict:
    """The same from the target's argmax of each row (n+1 of them). A batch takes the argmax
    of all its rows in one kernel and one transfer, then judges every session on the host."""
    for i, token in enumerate(draft_tokens):
        if token != argmax[i]:
            return Verdict(i, argmax[i])
    return Verdict(len(draft_tokens), argmax[len(draft_tokens)])


def verify_sampled(
    target_logits: torch.Tensor,
    draft_tokens: list[int],
    draft_distributions: list[SparseDistribution],
    params: SamplingParams,
    uniforms: torch.Tensor,
) -> Verdict:
    """target_logits: [n+1, V]; uniforms: [n+1] in [0, 1) (see num_uniforms)."""
    n = len(draft_tokens)
    if len(draft_distributions) != n:
        raise ValueError(f"{n} draft tokens but {len(draft_distributions)} draft distributions")
    p = target_probs(target_logits, params)  # [n+1, V]
    u = uniforms.tolist()
    for i, (token, q_dist) in enumerate(zip(draft_tokens, draft_distributions)):
        q_token = q_dist.prob_of(token)
        p_token = float(p[i, token].item())
        if q_token <= 0.0:
            # A token q could not produce means the drafter broke its contract; treating
            # it as a rejection keeps the output distributed as p regardless.
            accept = False
        else:
            accept = u[i] * q_token < p_token
        if not accept:
            q_dense = dense_from_sparse(q_dist, p.shape[-1], p.device)
            residual = (p[i] - q_dense).clamp_min(0.0)
            if float(residual.sum().item()) <= _EMPTY_RESIDUAL:
                residual = p[i]
            return Verdict(i, sample_from_probs(residual, uniforms[n]))
    return Verdict(n, sample_from_probs(p[n], uniforms[n]))
