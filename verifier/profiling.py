"""Start-up profile of a verifier replica: its model, tokenizer and forward-cost table.

The cost table is DSpark's SPS(B) curve: the wall time of one verify forward for each batch
size B in tokens. The scheduler's load-aware budget divides expected committed tokens by it,
so it is measured on this machine, with this model, at start-up, through the same
VerifierCore.verify the service runs (forward, LM head and the greedy judge included).

Each batch is laid out like real verify traffic: sessions that already hold some context,
each feeding its last committed token plus a few drafts. The dummy sessions are released
afterwards, so the replica starts empty.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from specmesh.records import VerifyItem
from specmesh.sampling_params import SamplingParams
from verifier.verification import VerifierCore

log = logging.getLogger(__name__)

PROFILE_SESSION_PREFIX = "__specmesh_profile_"
# Tokens each dummy session feeds per forward: 1 committed token + 3 drafts, a typical round.
TOKENS_PER_SESSION = 4
# Context each dummy session holds before the timed forwards (attention reads it).
CONTEXT_TOKENS = 64


@dataclass(frozen=True)
class ReplicaProfile:
    """What Profile answers: static facts about this replica, measured at start-up."""

    model_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_context_tokens: int
    max_sessions: int
    cost_table: tuple[tuple[int, float], ...]  # (batch_tokens, forward_seconds), ascending


def batch_layout(batch_tokens: int, num_slots: int, tokens_per_session: int = TOKENS_PER_SESSION) -> list[int]:
    """Tokens per session for a batch of `batch_tokens`: as many sessions of
    `tokens_per_session` as fit the slots, the tokens spread evenly (ragged by at most 1)."""
    sessions = max(1, min(num_slots, math.ceil(batch_tokens / tokens_per_session), batch_tokens))
    base, extra = divmod(batch_tokens, sessions)
    return [base + 1 if i < extra else base for i in range(sessions)]


def measure_forward_costs(
    core: VerifierCore,
    batch_sizes: Sequence[int],
    *,
    repeats: int = 3,
    context_tokens: int = CONTEXT_TOKENS,
    clock: Callable[[], float] = time.perf_counter,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[tuple[int, float]]:
    """[(batch_tokens, median seconds of one verify forward)], ascending by batch_tokens.

    One untimed warm-up forward per size, then the median of `repeats`. Sizes that do not fit
    the KV cache (context too long for max_context) are skipped with a warning. Blocking:
    run it where forwards run (VerifyBatcher.run_exclusive) before the replica serves.
    `should_stop` is polled between sizes, so a SIGTERM during start-up need not wait for
    the whole profile.
    """
    runner = core.runner
    num_slots = runner.cache.num_slots
    layouts = {size: batch_layout(size, num_slots) for size in sorted(set(batch_sizes))}
    longest = max(max(layout) for layout in layouts.values())
    context = max(0, min(context_tokens, runner.max_tokens - longest))
    vocab = runner.vocab_size
    greedy = SamplingParams()
    session_ids = [f"{PROFILE_SESSION_PREFIX}{i}" for i in range(max(len(layout) for layout in layouts.values()))]

    def token(i: int) -> int:
        return (7 * i + 3) % vocab  # any ids work: cost does not depend on the values

    table: list[tuple[int, float]] = []
    try:
        if context:
            prefix = tuple(token(i) for i in range(context))
            core.verify([VerifyItem(sid, 0, prefix, (), (), greedy) for sid in session_ids])
        for size, layout in layouts.items():
            if should_stop():
                break
            if context + max(layout) > runner.max_tokens:
                log.warning("skipping batch size %d in the cost profile: it does not fit max_context %d",
                            size, runner.max_tokens)
                continue
            # num_cached_tokens = context rolls each session back to its prefix every run.
            items = [
                VerifyItem(sid, context, (token(context),), tuple(token(context + 1 + j) for j in range(n - 1)), (), greedy)
                for sid, n in zip(session_ids, layout)
            ]
            core.verify(items)  # warm-up
            seconds = []
            for _ in range(repeats):
                start = clock()
                core.verify(items)
                seconds.append(clock() - start)
            table.append((size, statistics.median(seconds)))
            log.info("cost profile: %d tokens (%d sessions) %.2f ms", size, len(layout), 1000 * table[-1][1])
    finally:
        core.release(session_ids)
    return table
