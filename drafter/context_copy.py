"""Copying from the context where the drafter model is unsure.

A small trained drafter paraphrases where the verifier copies: asked to summarise or list the
facts of a passage, SmolLM2 repeats the passage's phrases, and its 2-layer drafter agrees with
it on ~21% of those tokens, while "the token that followed the last matching n-gram earlier in
the context" (prompt lookup) is right ~77% of the time. On ordinary chat the copy is right less
often than the model, except where the model itself is unsure. So a model drafter proposes the
copy only when the context has a match of at least `min_ngram` tokens and the model's own top
probability is below `below_probability`; everywhere else it drafts as before. On SmolLM2's
greedy text (the prompts of scripts/compare_drafters_cpu.py; thresholds 0.6-0.95 all within a
point of each other) this raised the shipped drafter's top-1 agreement from 58.8% to 61.3% on
held-out chat prompts, 43.5% to 48.0% on the bench's chat prompts, 55.0% to 57.9% on its code
prompts and 20.7% to 79.3% on its summarisation prompts.

Exactness: the decision to copy is a function of the path's tokens and the model's logits only
(never of the position's random draw), and a copied token is reported with q = the point mass
on it, which is exactly how it was proposed; under sampling it is accepted with probability
p(x), like any prompt-lookup draft. Draft-ahead stays output-neutral because the proposal at a
position depends on nothing but the tokens before it.

`NgramIndex` finds the same continuation as `prompt_lookup.find_continuation(tokens, max_ngram,
min_ngram, 1)` (longest suffix match first, then the most recent occurrence; among the MAX_CANDIDATES most
recent occurrences of the last bigram), from an index of bigram positions kept up to date as
the path grows, so a step costs O(matches), not O(context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

# Candidates examined per lookup, most recent first: a very common bigram (", the") would
# otherwise cost a scan of every occurrence; recent context predicts best anyway.
MAX_CANDIDATES = 64


@dataclass(frozen=True)
class ContextCopyRule:
    """When a model drafter copies from its context instead of drafting its own top token."""

    min_ngram: int = 2
    max_ngram: int = 8
    below_probability: float = 0.8  # the model's top probability (temperature 1) must be below this
    # Reported confidence of a copy whose match is n tokens long (entry n - 2; the last entry for
    # longer ones): how often such copies were right on SmolLM2's greedy text (1,060 copies by
    # the shipped drafter: n = 2: 44%, 3: 54%, 4: 57%, 5: 74%, 6: 65%, 7: 82%, 8: 88%), smoothed
    # to rise with n. A prior: the scheduler calibrates confidence against real acceptance.
    confidence_by_ngram: tuple[float, ...] = (0.45, 0.55, 0.6, 0.7, 0.72, 0.8, 0.88)

    def confidence(self, ngram: int) -> float:
        table = self.confidence_by_ngram
        return table[min(ngram - 2, len(table) - 1)]

    def match(self, index: "NgramIndex", tokens: Sequence[int]) -> tuple[int, int] | None:
        """(token, n) the context proposes after `tokens` (index brought up to date first)."""
        index.extend(tokens)
        return index.continuation(tokens, self.max_ngram, self.min_ngram)

    def copies(self, top_probability: float) -> bool:
        """Whether a match replaces the model's token, given the model's top probability."""
        return top_probability < self.below_probability

    def __post_init__(self) -> None:
        if not 2 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"context copy needs 2 <= min_ngram <= max_ngram, got {self.min_ngram}..{self.max_ngram}")
        if not self.below_probability > 0.0:  # above 1: copy wherever the context matches
            raise ValueError(f"below_probability must be positive, got {self.below_probability}")
        if not self.confidence_by_ngram or not all(0.0 <= c <= 1.0 for c in self.confidence_by_ngram):
            raise ValueError(f"confidence_by_ngram must be values in [0, 1], got {self.confidence_by_ngram}")


@dataclass
class NgramIndex:
    """Positions of every bigram of one token sequence: positions[(a, b)] lists, ascending, each
    i with tokens[i-1] == a and tokens[i] == b. Callers grow it with `extend` and must `truncate`
    it wherever the sequence was cut or rewritten."""

    positions: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    keys: list[tuple[int, int] | None] = field(default_factory=list)  # keys[i]: bigram ending at i

    def truncate(self, length: int) -> None:
        """Forget every position at or beyond `length`."""
        while len(self.keys) > max(length, 0):
            key = self.keys.pop()
            if key is not None:
                ends = self.positions[key]
                ends.pop()
                if not ends:
                    del self.positions[key]

    def extend(self, tokens: Sequence[int]) -> None:
        """Index tokens[len(self.keys):] (the tokens before must be what was indexed before)."""
        for i in range(len(self.keys), len(tokens)):
            if i == 0:
                self.keys.append(None)
                continue
            key = (tokens[i - 1], tokens[i])
            self.keys.append(key)
            self.positions.setdefault(key, []).append(i)

    def continuation(self, tokens: Sequence[int], max_ngram: int, min_ngram: int) -> tuple[int, int] | None:
        """(token, n): the token after the most recent earlier occurrence of the longest suffix
        n-gram of `tokens` (max_ngram >= n >= min_ngram >= 2), or None. `tokens` must be indexed."""
        length = len(tokens)
        if length < 3 or min_ngram > length - 1:
            return None
        ends = self.positions.get((tokens[-2], tokens[-1]))
        if not ends:
            return None
        longest = min(max_ngram, length - 1)
        best: tuple[int, int] | None = None  # (n, end)
        examined = 0
        for end in reversed(ends):
            if end >= length - 1:  # the suffix itself, and (after a cut) nothing is beyond it
                continue
            examined += 1
            n = 2
            while n < longest and end - n >= 0 and tokens[end - n] == tokens[length - 1 - n]:
                n += 1
            if best is None or n > best[0]:
                best = (n, end)
                if n == longest:
                    break
            if examined >= MAX_CANDIDATES:
                break
        if best is None or best[0] < min_ngram:
            return None
        return tokens[best[1] + 1], best[0]
