"""The drafter's core: continue many sessions by k tokens each, batched step by step.

Every draft token comes with its confidence (by default the draft probability of the drafted
token) and the exact sparse distribution q it was drawn from, which is what makes verification
lossless. No gRPC here.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from specmesh.distributions import draft_distribution, make_generator
from specmesh.errors import InvalidRequestError
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.records import DraftChunk, DraftRequest, SparseDistribution
from specmesh.session_slots import SessionSlots

RANDOM_STREAM = "draft"
DEFAULT_DRAFT_TOP_K = 8


def draft_uniform(seed: int, position: int) -> torch.Tensor:
    """The uniform that draws the draft token at absolute sequence position `position`.

    Keyed by position, not by round, so a token drafted ahead of time equals the token that
    would be drafted on demand from the same prefix: draft-ahead and batching never change what
    a seeded request produces. (The verifier uses its own, independent stream.)
    """
    return torch.rand((), generator=make_generator(seed, RANDOM_STREAM, position))


class Drafter(Protocol):
    """What the scheduler needs from any drafter (a model, prompt lookup, ...)."""

    name: str

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]: ...

    def release(self, session_ids: Sequence[str]) -> int: ...

    @property
    def num_sessions(self) -> int: ...


def validate_request(request: DraftRequest, vocab_size: int) -> None:
    if not request.session_id:
        raise InvalidRequestError("session_id must not be empty")
    if request.num_cached_tokens < 0 or request.num_draft_tokens < 0:
        raise InvalidRequestError("num_cached_tokens and num_draft_tokens must be >= 0")
    if request.num_draft_tokens > 0 and not request.new_tokens:
        raise InvalidRequestError("new_tokens must hold at least the last committed token")
    for token in request.new_tokens:
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"token id {token} outside the vocabulary [0, {vocab_size})")
    if not request.params.greedy and request.params.seed is None:
        raise InvalidRequestError("sampled drafting needs a seed (the scheduler assigns one)")


class ModelDrafter:
    """Drafts with a small causal LM holding a KV slot per session."""

    def __init__(self, runner: ModelRunner, name: str = "model", draft_top_k: int = DEFAULT_DRAFT_TOP_K,
                 idle_ttl_s: float | None = None) -> None:
        self.runner = runner
        self.name = name
        self.draft_top_k = draft_top_k
        self.slots = SessionSlots(runner.cache, idle_ttl_s=idle_ttl_s)

    @property
    def num_sessions(self) -> int:
        return len(self.slots)

    def release(self, session_ids: Sequence[str]) -> int:
        return sum(self.slots.release(sid) for sid in session_ids)

    def draft(self, requests: Sequence[DraftRequest]) -> list[DraftChunk]:
        for request in requests:
            validate_request(request, self.runner.vocab_size)
        self.slots.evict_idle()
        batch_ids = [r.session_id for r in requests]
        chunks: dict[int, DraftChunk] = {}
        active: list[tuple[int, DraftRequest, int]] = []  # (index, request, slot)
        for index, request in enumerate(requests):
            base_length = request.num_cached_tokens + len(request.new_tokens)
            slot = self.slots.sync(request.session_id, request.num_cached_tokens, pinned=batch_ids)
            if slot is None:
                chunks[index] = DraftChunk(request.session_id, base_length, cache_miss=True)
                continue
            # Never draft past the slot: the verifier's context is what really limits length.
            room = self.runner.max_tokens - base_length + 1
            if request.num_draft_tokens == 0 or room <= 1:
                chunks[index] = DraftChunk(request.session_id, base_length,
                                           num_cached_tokens=request.num_cached_tokens)
                continue
            active.append((index, request, slot))
        drafted: dict[int, list[tuple[int, float, SparseDistribution]]] = {index: [] for index, _, _ in active}
        step_inputs = {index: tuple(request.new_tokens) for index, request, _ in active}
        limits = {
            index: min(request.num_draft_tokens,
                       self.runner.max_tokens - (request.num_cached_tokens + len(request.new_tokens)) + 1)
            for index, request, _ in active
        }
        running = list(active)
        while running:
            logits = self.runner.forward(
                [ForwardRequest(slot, step_inputs[index], logits_from=len(step_inputs[index]) - 1)
                 for index, _, slot in running]
            )
            still_running = []
            for (index, request, slot), row in zip(running, logits):
                position = request.num_cached_tokens + len(request.new_tokens) + len(drafted[index])
                uniform = draft_uniform(request.params.seed or 0, position)
                token, confidence, q = draft_distribution(row[-1], request.params, self.draft_top_k, uniform)
                drafted[index].append((token, confidence, q))
                if len(drafted[index]) < limits[index]:
                    step_inputs[index] = (token,)
                    still_running.append((index, request, slot))
            running = still_running
        for index, request, slot in active:
            tokens = drafted[index]
            chunks[index] = DraftChunk(
                session_id=request.session_id,
                base_length=request.num_cached_tokens + len(request.new_tokens),
                tokens=tuple(t for t, _, _ in tokens),
                confidences=tuple(c for _, c, _ in tokens),
                distributions=tuple(q for _, _, q in tokens),
                num_cached_tokens=self.runner.cache.lengths[slot],
            )
        return [chunks[i] for i in range(len(requests))]
