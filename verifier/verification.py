"""The verifier's core: check a ragged batch of sessions' drafts in one forward pass.

No gRPC here; verifier/servicer.py is a thin shell around VerifierCore.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specmesh.distributions import make_generator
from specmesh.errors import CapacityError, InvalidRequestError
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.records import VerifyItem, VerifyResult
from specmesh.session_slots import SessionSlots
from verifier.speculative_sampling import num_uniforms, verify_greedy_argmax, verify_sampled

RANDOM_STREAM = "verify"


def validate_item(item: VerifyItem, vocab_size: int, max_tokens: int) -> None:
    """Refuse malformed items before they join a batch, so they can't fail anyone else's."""
    if not item.session_id:
        raise InvalidRequestError("session_id must not be empty")
    if item.num_cached_tokens < 0:
        raise InvalidRequestError(f"num_cached_tokens must be >= 0, got {item.num_cached_tokens}")
    if not item.new_tokens:
        raise InvalidRequestError("new_tokens must hold at least the last committed token")
    if len(item.draft_distributions) != len(item.draft_tokens) and not item.params.greedy:
        raise InvalidRequestError(
            f"{len(item.draft_tokens)} draft tokens but {len(item.draft_distributions)} draft distributions"
        )
    for token in (*item.new_tokens, *item.draft_tokens):
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"token id {token} outside the vocabulary [0, {vocab_size})")
    if not item.params.greedy and item.params.seed is None:
        raise InvalidRequestError("sampled verification needs a seed (the scheduler assigns one)")
    total = item.committed_length + len(item.draft_tokens)
    if total > max_tokens:
        raise CapacityError(f"session {item.session_id}: {total} tokens exceed the context limit {max_tokens}")
    item.params.validate()


class VerifierCore:
    def __init__(self, runner: ModelRunner, idle_ttl_s: float | None = None) -> None:
        self.runner = runner
        self.slots = SessionSlots(runner.cache, idle_ttl_s=idle_ttl_s)

    @property
    def num_sessions(self) -> int:
        return len(self.slots)

    @property
    def max_context(self) -> int:
        return self.runner.max_tokens

    def release(self, session_ids: Sequence[str]) -> int:
        return sum(self.slots.release(sid) for sid in session_ids)

    def verify(self, items: Sequence[VerifyItem]) -> list[VerifyResult]:
        """One forward pass over every item; results in the same order as items."""
        seen: set[str] = set()
        for item in items:
            validate_item(item, self.runner.vocab_size, self.runner.max_tokens)
            if item.session_id in seen:
                raise InvalidRequestError(f"session {item.session_id!r} appears twice in one verify batch")
            seen.add(item.session_id)
        self.slots.evict_idle()
        results: dict[int, VerifyResult] = {}
        forward: list[tuple[int, ForwardRequest]] = []
        batch_ids = [item.session_id for item in items]
        for index, item in enumerate(items):
            slot = self.slots.sync(item.session_id, item.num_cached_tokens, pinned=batch_ids)
            if slot is None:
                results[index] = VerifyResult(item.session_id, cache_miss=True)
                continue
            # Rows: the last committed token (predicts draft 1), then each draft (predicts the next).
            tokens = (*item.new_tokens, *item.draft_tokens)
            forward.append((index, ForwardRequest(slot, tokens, logits_from=len(item.new_tokens) - 1)))
        if forward:
            logits, counts = self.runner.forward_flat([request for _, request in forward])
            # Greedy sessions need only the argmax of their rows: one kernel and one transfer
            # for the whole batch (no per-session synchronisation with the device).
            argmax = logits.argmax(dim=-1).tolist() if any(items[i].params.greedy for i, _ in forward) else []
            offset = 0
            for (index, request), count in zip(forward, counts):
                rows = slice(offset, offset + count)
                results[index] = self._judge(items[index], request.slot, logits[rows], argmax[rows])
                offset += count
        return [results[i] for i in range(len(items))]

    def _judge(self, item: VerifyItem, slot: int, logits: torch.Tensor, argmax: list[int]) -> VerifyResult:
        """logits: [n+1, V] for one session; argmax: their argmax (greedy items)."""
        drafts = list(item.draft_tokens)
        if item.params.greedy:
            verdict = verify_greedy_argmax(argmax, drafts)
        else:
            generator = make_generator(item.params.seed, RANDOM_STREAM, item.committed_length)
            uniforms = torch.rand(num_uniforms(len(drafts)), generator=generator).to(logits.device)
            verdict = verify_sampled(logits, drafts, list(item.draft_distributions), item.params, uniforms)
        kept = item.committed_length + verdict.accepted_count
        # Keep committed tokens and accepted drafts; the rest were rejected (O(1) rollback).
        self.runner.cache.truncate(slot, kept)
        logprobs: tuple[float, ...] = ()
        if item.want_logprobs:
            committed = drafts[: verdict.accepted_count] + [verdict.next_token]
            rows = logits[: len(committed)].log_softmax(dim=-1)
            logprobs = tuple(rows[torch.arange(len(committed)), torch.tensor(committed)].tolist())
        return VerifyResult(
            session_id=item.session_id,
            accepted_count=verdict.accepted_count,
            next_token=verdict.next_token,
            logprobs=logprobs,
            num_cached_tokens=kept,
        )
