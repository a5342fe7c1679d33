"""Start-up profile of a drafter replica: model, tokenizer, limits and forward-cost table.

The cost table is the wall time of one draft step (every session in the batch feeds one token
and drafts the next) per batch size, measured on this machine with this model at start-up,
so the scheduler can weigh what drafting k more tokens costs. The KV slots used for it are
freed afterwards: the replica starts empty.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from specmesh.model_loading import tokenizer_fingerprint
from specmesh.model_runner import ForwardRequest, ModelRunner

log = logging.getLogger(__name__)

# Context each dummy session holds before the timed steps (attention reads it).
CONTEXT_TOKENS = 32


@dataclass(frozen=True)
class DrafterProfile:
    """What Profile answers."""

    model_name: str
    vocab_size: int  # 0 when unknown (prompt lookup without a tokenizer)
    tokenizer_fingerprint: str  # "" when no tokenizer is known
    cost_table: tuple[tuple[int, float], ...]  # (batch_tokens, forward_seconds), ascending
    max_context_tokens: int  # 0 when unbounded
    max_sessions: int
    max_draft_tokens: int
    draft_top_k: int


def measure_step_costs(runner: ModelRunner, batch_sizes: Sequence[int], *, repeats: int = 3,
                       context_tokens: int = CONTEXT_TOKENS,
                       clock: Callable[[], float] = time.perf_counter) -> list[tuple[int, float]]:
    """[(sessions per step, median seconds of one step)], ascending. Needs free KV slots: sizes
    beyond them are skipped. Blocking; run it where forwards run, before the replica serves."""
    cache = runner.cache
    sizes = sorted({size for size in batch_sizes if 0 < size <= cache.num_free_slots})
    skipped = sorted(set(batch_sizes) - set(sizes))
    if skipped:
        log.warning("cost table: skipping batch sizes %s (only %d free KV slots)", skipped, cache.num_free_slots)
    if not sizes:
        return []
    context = max(1, min(context_tokens, runner.max_tokens - 1))
    slots = [cache.allocate() for _ in range(sizes[-1])]
    try:
        runner.forward([ForwardRequest(slot, [(7 * i + 3) % runner.vocab_size for i in range(context)],
                                       logits_from=context - 1) for slot in slots])
        table = []
        for size in sizes:
            step = [ForwardRequest(slot, [5 % runner.vocab_size]) for slot in slots[:size]]
            times = []
            for attempt in range(repeats + 1):  # the first is a warm-up
                start = clock()
                runner.forward(step)
                elapsed = clock() - start
                for slot in slots[:size]:
                    cache.truncate(slot, context)
                if attempt:
                    times.append(elapsed)
            table.append((size, statistics.median(times)))
        return table
    finally:
        for slot in slots:
            cache.free(slot)


def build_profile(core: Any, *, model_name: str, tokenizer: Any | None, max_draft_tokens: int,
                  batch_sizes: Sequence[int]) -> DrafterProfile:
    """Profile of a drafter core (a ModelDrafter, or a model-free one like prompt lookup)."""
    runner: ModelRunner | None = getattr(core, "runner", None)
    fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else ""
    if runner is not None:
        return DrafterProfile(
            model_name=model_name,
            vocab_size=int(getattr(core, "vocab_size", runner.vocab_size)),  # a draft vocabulary's input side is whole
            tokenizer_fingerprint=fingerprint,
            cost_table=tuple(measure_step_costs(runner, batch_sizes)),
            max_context_tokens=runner.max_tokens,
            max_sessions=runner.cache.num_slots,
            max_draft_tokens=max_draft_tokens,
            draft_top_k=int(getattr(core, "draft_top_k", 0)),
        )
    return DrafterProfile(
        model_name=model_name,
        vocab_size=len(tokenizer) if tokenizer is not None else 0,
        tokenizer_fingerprint=fingerprint,
        cost_table=(),
        max_context_tokens=0,
        max_sessions=int(getattr(core, "max_sessions", 0)),
        max_draft_tokens=max_draft_tokens,
        draft_top_k=1,  # a one-hot q per token
    )
