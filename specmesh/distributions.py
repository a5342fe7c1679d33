"""Turning logits into the distributions we sample from. Pure tensor math, no I/O.

The target distribution p (verifier) and the draft distribution q (drafter) are both built
here so that temperature / top-k / top-p mean exactly the same thing on both sides. The order
matches HF transformers' `generate`: temperature, then top-k, then top-p.
"""

from __future__ import annotations

import hashlib

import torch

from specmesh.records import SparseDistribution
from specmesh.sampling_params import SamplingParams


def derive_seed(seed: int, *salts: int | str) -> int:
    """A 63-bit seed that depends only on (seed, salts).

    Every random draw in specmesh comes from a generator seeded this way with the request seed
    and the committed length it continues, so a seeded request replays exactly no matter how
    sessions were batched, and drafter and verifier never share random numbers.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    for salt in salts:
        h.update(b"\x00" + str(salt).encode())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def make_generator(seed: int, *salts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    return reseed(torch.Generator(device=device), seed, *salts)


def reseed(generator: torch.Generator, seed: int, *salts: int | str) -> torch.Generator:
    """generator, now drawing the stream make_generator(seed, *salts) draws (reusing one
    generator where a fresh one per draw would be host work)."""
    generator.manual_seed(derive_seed(seed, *salts))
    return generator


def warp_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scaled and truncated logits; removed tokens are -inf.

    logits: [..., V]. Requires params.temperature > 0.
    """
    x = logits.float() / params.temperature
    vocab_size = x.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth_largest = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(x, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return x


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution p the output must follow. logits: [..., V] -> probs [..., V] (float32)."""
    return warp_logits(logits, params).softmax(dim=-1)


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> int:
    """Inverse-CDF sample. probs: [V] (need not be normalised), uniform: [] in [0, 1)."""
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, (uniform * cdf[-1]).reshape(1), right=True)
    return int(index.clamp(max=probs.shape[-1] - 1).item())


def draft_distribution(
    logits: torch.Tensor, params: SamplingParams, draft_top_k: int, uniform: torch.Tensor
) -> tuple[int, float, SparseDistribution]:
    """Pick one draft token and describe exactly the distribution it was drawn from.

    logits: [V] of the drafter. uniform: [] in [0, 1).
    Returns (token, confidence, q). When sampling, the token is drawn from q itself — the
    temperature-scaled distribution truncated to the top draft_top_k tokens (and the request's
    top-k/top-p) — so the sparse q sent to the verifier is the true q and verification stays
    lossless. When greedy, see `greedy_drafts`.
    """
    if params.greedy:
        return greedy_drafts(logits.reshape(1, -1))[0]
    k = draft_top_k if params.top_k <= 0 else min(draft_top_k, params.top_k)
    k = min(k, logits.shape[-1])
    scaled = logits.float() / params.temperature
    top = torch.topk(scaled, k)
    truncated = SamplingParams(temperature=1.0, top_p=params.top_p, top_k=0)
    q_probs = target_probs(top.values, truncated)
    keep = q_probs > 0
    token_ids = top.indices[keep]
    q_probs = q_probs[keep] / q_probs[keep].sum()
    choice = sample_from_probs(q_probs, uniform)
    ids, probs = token_ids.tolist(), q_probs.tolist()  # the chosen entries read from these: 2 transfers, not 4
    return ids[choice], probs[choice], SparseDistribution(tuple(ids), tuple(probs))


def point_mass(token: int) -> SparseDistribution:
    """q = the point mass on `token` (greedy drafts, context copies). Immutable, so one object
    per token id is shared (cached): building one per draft token was host work on every step."""
    q = _POINT_MASSES.get(token)
    if q is None:
        if len(_POINT_MASSES) >= _MAX_POINT_MASSES:
            _POINT_MASSES.clear()
        q = _POINT_MASSES[token] = SparseDistribution((token,), (1.0,))
    return q


_POINT_MASSES: dict[int, SparseDistribution] = {}
_MAX_POINT_MASSES = 1 << 18


def greedy_tokens(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Each row's argmax and the draft model's probability of it. logits: [B, V], B >= 1.

    One softmax-max over the batch and ONE device-to-host transfer (ids exact in float64)."""
    best = logits.float().softmax(dim=-1).max(dim=-1)
    rows = best.indices.shape[0]
    flat = torch.cat([best.indices.double(), best.values.double()]).tolist()
    return list(map(int, flat[:rows])), flat[rows:]


def greedy_drafts(logits: torch.Tensor) -> list[tuple[int, float, SparseDistribution]]:
    """Greedy draft tokens for a batch of rows. logits: [B, V].

    Each row's token is its argmax, its confidence the draft model's probability of it, and its
    q the point mass on it: exactly what greedy drafting draws from (greedy verification never
    reads q). One softmax-max over the batch and ONE device-to-host transfer (ids exact in
    float64); no top-k and no per-row distribution to build, on the drafter's critical path.
    """
    if logits.shape[0] == 0:
        return []
    tokens, confidences = greedy_tokens(logits)
    return [(token, confidence, point_mass(token)) for token, confidence in zip(tokens, confidences)]
