"""The verifier's core: check a ragged batch of sessions' drafts in one forward pass.

No gRPC here; verifier/servicer.py is a thin shell around VerifierCore.
"""

from __future__ import annotations

from typing import Sequence

import torch

from specmesh.distributions import reseed
from specmesh.errors import CapacityError, InvalidRequestError
from specmesh.model_runner import ForwardRequest, ModelRunner
from specmesh.records import VerifyItem, VerifyResult
from specmesh.session_slots import SessionSlots
from verifier.batch_judging import Case, judge_batch
from verifier.speculative_sampling import num_uniforms

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
    drafts = item.draft_tokens
    # min/max run at C speed; the loop only names the first bad token.
    if min(item.new_tokens) < 0 or max(item.new_tokens) >= vocab_size or (
            drafts and (min(drafts) < 0 or max(drafts) >= vocab_size)):
        for token in (*item.new_tokens, *drafts):
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
        self._generator = torch.Generator()  # CPU; reseeded for every sampled session (_case)

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
        results: list[VerifyResult | None] = [None] * len(items)
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
            logits, _ = self.runner.forward_flat([request for _, request in forward])
            # Every session judged at once: batched kernels and one read back from the device
            # (verifier/batch_judging.py), not a kernel chain and a synchronisation per session.
            judgements = judge_batch(logits, [self._case(items[index]) for index, _ in forward])
            truncate = self.runner.cache.truncate
            for (index, request), judgement in zip(forward, judgements):
                item = items[index]
                kept = item.committed_length + judgement.verdict.accepted_count
                # Keep committed tokens and accepted drafts; the rest were rejected (O(1) rollback).
                truncate(request.slot, kept)
                results[index] = VerifyResult(
                    session_id=item.session_id,
                    accepted_count=judgement.verdict.accepted_count,
                    next_token=judgement.verdict.next_token,
                    logprobs=judgement.logprobs,
                    num_cached_tokens=kept,
                )
        return results  # type: ignore[return-value]  # every index was filled

    def _case(self, item: VerifyItem) -> Case:
        uniforms = None
        if not item.params.greedy:
            # Keyed by seed and position only, so a seeded request replays however it is batched.
            generator = reseed(self._generator, item.params.seed, RANDOM_STREAM, item.committed_length)
            uniforms = torch.rand(num_uniforms(len(item.draft_tokens)), generator=generator)
        return Case(item.draft_tokens, item.draft_distributions, item.params, uniforms, item.want_logprobs)
