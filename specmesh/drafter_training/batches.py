"""Teacher-forced batches: samples padded into [B, T], and logits at the positions that matter.

The positions that matter are those that predict a completion token (the last prompt token
through the second-to-last token): the drafter only ever drafts continuations, and the prompt
is the user's text, not the verifier's. Only those positions go through the LM heads, which
over a 49k–262k vocabulary are most of the cost.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from specmesh.drafter_training.data import Sample
from specmesh.drafter_training.model import text_config


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T] 1 for real tokens
    rows: torch.Tensor  # [N] batch row of each scored position
    cols: torch.Tensor  # [N] position within the row
    prompt_sets: list[str]  # [N] the prompt set of each scored position's sample

    @property
    def num_positions(self) -> int:
        return int(self.rows.numel())


def make_batch(samples: Sequence[Sample], pad_token_id: int, device: torch.device | str) -> Batch:
    width = max(len(s.tokens) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    sets: list[str] = []
    for b, sample in enumerate(samples):
        n = len(sample.tokens)
        input_ids[b, :n] = torch.tensor(sample.tokens, dtype=torch.long)
        attention_mask[b, :n] = 1
        first = max(sample.prompt_length - 1, 0)
        rows += [b] * (n - 1 - first)
        cols += list(range(first, n - 1))
        sets += [sample.prompt_set] * (n - 1 - first)
    return Batch(input_ids.to(device), attention_mask.to(device), torch.tensor(rows, dtype=torch.long, device=device),
                 torch.tensor(cols, dtype=torch.long, device=device), sets)


def plan_batches(samples: Sequence[Sample], batch_tokens: int, seed: int) -> list[list[int]]:
    """Sample indices grouped into batches of at most batch_tokens padded tokens (similar
    lengths together, so little padding), in a seeded random order."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = len(samples[index].tokens)  # the longest so far: sorted ascending
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    random.Random(seed).shuffle(batches)
    return batches


def logits_at(model: Any, batch: Batch) -> torch.Tensor:
    """The model's logits at the batch's scored positions: [N, V] (the model's dtype)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # [B, T, H]
    logits = model.get_output_embeddings()(hidden[batch.rows, batch.cols])
    softcap = getattr(text_config(model.config), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def trim(samples: Sequence[Sample], max_tokens: int) -> list[Sample]:
    """Samples cut to at most max_tokens tokens (the prompt is kept whole when it fits)."""
    out = []
    for s in samples:
        if len(s.tokens) > max_tokens and s.prompt_length < max_tokens - 1:
            s = Sample(s.tokens[:max_tokens], s.prompt_length, s.prompt_set)
        if s.num_completion_tokens > 0 and len(s.tokens) <= max_tokens:
            out.append(s)
    return out
