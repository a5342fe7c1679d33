"""Checks on one Verify call, run before the call joins a merged forward pass.

Everything that could make the batched forward or the rejection sampler raise is refused
here, per call, so a bad call fails alone and never takes the other merged calls down with it:
- malformed input (token ids outside the vocabulary, draft/distribution count mismatch,
  a broken sparse q, a session listed twice) fails the whole call (InvalidRequestError);
- an item that cannot fit this replica (context too long, more sessions in one call than KV
  slots) is refused alone with a CAPACITY outcome; the call's other items still run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from specmesh.errors import CapacityError, InvalidRequestError
from specmesh.records import VerifyItem
from verifier.verification import validate_item


@dataclass(frozen=True)
class RefusedItem:
    """An item that was not served; the verifier's state for the session is unchanged."""

    session_id: str
    status: Literal["capacity", "invalid"]
    message: str


def validate_distributions(item: VerifyItem, vocab_size: int) -> None:
    """The sparse q of a sampled item must be a well-formed distribution over the vocabulary.

    Greedy items are exempt: their distributions are never read.
    """
    if item.params.greedy:
        return
    for position, dist in enumerate(item.draft_distributions):
        where = f"session {item.session_id!r}, draft distribution {position}"
        if len(dist.token_ids) != len(dist.probs):
            raise InvalidRequestError(f"{where}: {len(dist.token_ids)} token ids but {len(dist.probs)} probs")
        if len(set(dist.token_ids)) != len(dist.token_ids):
            raise InvalidRequestError(f"{where}: duplicate token ids")
        for token in dist.token_ids:
            if not 0 <= token < vocab_size:
                raise InvalidRequestError(f"{where}: token id {token} outside the vocabulary [0, {vocab_size})")
        if any(not math.isfinite(p) or p < 0 for p in dist.probs):
            raise InvalidRequestError(f"{where}: probabilities must be finite and >= 0")
        if not dist.probs or sum(dist.probs) <= 0:
            raise InvalidRequestError(f"{where}: no probability mass")


def validate_call(
    items: Sequence[VerifyItem], vocab_size: int, max_context: int, max_sessions: int
) -> list[RefusedItem | None]:
    """Per item: None when it may join a forward, else why it is refused.

    Raises InvalidRequestError when any item is malformed (the whole call fails).
    """
    refusals: list[RefusedItem | None] = []
    seen: set[str] = set()
    admitted = 0
    for item in items:
        if item.session_id in seen:
            raise InvalidRequestError(f"session {item.session_id!r} appears twice in one Verify call")
        seen.add(item.session_id)
        too_long: str | None = None
        try:
            validate_item(item, vocab_size, max_context)
        except CapacityError as error:
            too_long = str(error)
        # validate_item checks capacity before the sampling parameters: malformed input must
        # fail the call even when the item is also too long.
        item.params.validate()
        validate_distributions(item, vocab_size)
        if too_long is not None:
            refusals.append(RefusedItem(item.session_id, "capacity", too_long))
            continue
        if admitted >= max_sessions:
            # One forward pass can hold at most one session per KV slot.
            refusals.append(RefusedItem(
                item.session_id, "capacity", f"one Verify call may carry at most {max_sessions} sessions"))
            continue
        admitted += 1
        refusals.append(None)
    return refusals
