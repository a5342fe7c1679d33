"""Run any HF decoder over a ragged batch of sessions, each appending to its own KV slot.

Two layouts, same results:

- Packed (decoders with full attention; specmesh/packed_forward.py): the batch's tokens are
  packed flat into one [1, N] sequence with per-token positions, so projections and MLP run on
  the real tokens only; attention reads each slot's keys as a view of the preallocated cache.
  On CUDA, decode-shaped forwards (a few tokens per session) replay captured CUDA graphs.
- Padded (sliding-window or softcapped attention, or models that refuse a custom attention):
  the batch is padded to [B, Q] (Q = the longest input in the batch); padding writes to the
  cache's scratch slot and is masked out.

Either way positions and the attention mask are built from each session's own cached length,
so sessions of any lengths share one forward pass and each sees exactly what an unbatched
forward would.

Logits are computed only for the positions a caller asks for (the LM head over a 49k-262k
vocabulary is the most expensive part of a short forward on CPU).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from specmesh import fused_ops, slot_attention
from specmesh.errors import CapacityError
from specmesh.kv_cache import CacheShape, SlotKVCache
from specmesh.packed_forward import PackedForward


@dataclass(frozen=True)
class ForwardRequest:
    """Append `tokens` to `slot` after its cached positions; return logits for tokens[logits_from:]."""

    slot: int
    tokens: Sequence[int]
    logits_from: int = 0


def _cache_argument_name(module: torch.nn.Module) -> str:
    # transformers 5.2x renamed the forward argument `past_key_values` to `cache`.
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def model_thread_initializer(core) -> Callable[[], None] | None:
    """For the one worker thread that runs a service's model: make the model's GPU the thread's
    current device, so anything that defaults to the current device (kernels, streams, graph
    capture) lands on the model's GPU when it is not GPU 0. None when there is nothing to do."""
    runner = getattr(core, "runner", None)
    device = getattr(runner, "device", None)
    if device is None or device.type != "cuda" or device.index is None:
        return None
    return lambda: torch.cuda.set_device(device)


class ModelRunner:
    """Owns a model and its slot KV cache. One forward pass at a time."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_tokens: int, *,
                 packed: bool | None = None, cuda_graphs: bool | None = None) -> None:
        """packed: use the packed layout where the model allows it (None: yes, unless the
        environment says SPECMESH_PACKED=0). cuda_graphs: replay captured CUDA graphs for
        decode-shaped forwards (None: on CUDA, unless SPECMESH_CUDA_GRAPHS=0)."""
        self.model = model
        self.config = model.config
        parameter = next(model.parameters())
        self.device = parameter.device
        self.dtype = parameter.dtype
        self.cache = SlotKVCache(CacheShape.from_config(model.config), num_slots, max_tokens, self.dtype, self.device)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self._cache_argument = _cache_argument_name(self.decoder)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size: int = self.lm_head.weight.shape[0]
        self._softcap: float | None = getattr(text_config, "final_logit_softcapping", None)
        layer_types = getattr(text_config, "layer_types", None) or []
        self._sliding_window: int | None = (
            getattr(text_config, "sliding_window", None) if "sliding_attention" in layer_types else None
        )
        # On CUDA the runner's work goes to its own stream, made the current stream of the thread
        # that runs forwards (each service runs every forward and its sampler on one worker
        # thread): a drafter and a verifier sharing a GPU then overlap instead of queueing
        # behind each other on the one legacy default stream.
        # CUDA, half precision: fused kernels where HF runs chains of tiny ones (fused_ops.py).
        self.num_fused_modules = fused_ops.install(model) if os.environ.get("SPECMESH_FUSED_OPS", "1") != "0" else 0
        self.stream: torch.cuda.Stream | None = None
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
            torch.cuda.synchronize(self.device)  # weights and cache were written on another stream
        self.packed: PackedForward | None = None
        if packed is None:
            packed = os.environ.get("SPECMESH_PACKED", "1") != "0"
        if (packed and self._sliding_window is None and not getattr(text_config, "attn_logit_softcapping", None)
                and slot_attention.install(model)):
            if cuda_graphs is None:
                cuda_graphs = self.device.type == "cuda" and os.environ.get("SPECMESH_CUDA_GRAPHS", "1") != "0"
            kv_group = text_config.num_attention_heads // self.cache.shape.num_kv_heads
            # On CPU, cuda_graphs=True runs the graphed shapes eagerly (tests of the bucketing).
            self.packed = PackedForward(self, kv_group, cuda_graphs=cuda_graphs)

    @property
    def max_tokens(self) -> int:
        return self.cache.max_tokens

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, H] hidden rows -> [R, V] float32 logits (soft-capped where the model does).

        On CPU, 2 or 3 rows go through the LM head as 4 (zero rows added, then dropped):
        PyTorch's CPU linear runs fewer than 4 rows as one matrix-vector product each, and for a
        large vocabulary one matrix product of 4 rows costs less than 2 rows done that way
        (SmolLM2's 49k x 576 head on 2 cores: 1 row 7.1 ms, 2 rows 14.9, 3 rows 22.5, 4 rows
        12.5). Verifying 1-2 drafts is exactly that case.
        """
        rows = hidden.shape[0]
        # Half precision on CPU: one row as two as well, so that a row's logits are the same bits
        # whatever else is in the forward (PackedForward.batch_invariant).
        padded_rows = {1: 2 if self.dtype != torch.float32 else 1, 2: 4, 3: 4}.get(rows, rows)
        if self.device.type == "cpu" and padded_rows != rows:
            padded = torch.cat([hidden, hidden.new_zeros(padded_rows - rows, hidden.shape[1])])
            logits = self.lm_head(padded)[:rows].float()
        else:
            logits = self.lm_head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def _masks(self, cached: list[int], lengths: list[int], read_length: int, q_len: int):
        """Additive masks [B, 1, Q, R]: query j of row b sees key t iff t <= cached[b] + j.
        Padding queries see only key 0 (any finite row avoids NaN; their output is discarded)."""
        device = self.device
        cached_t = torch.tensor(cached, device=device).view(-1, 1, 1)
        lengths_t = torch.tensor(lengths, device=device).view(-1, 1, 1)
        query = torch.arange(q_len, device=device).view(1, -1, 1)
        key = torch.arange(read_length, device=device).view(1, 1, -1)
        query_position = cached_t + query
        valid_query = query < lengths_t
        visible = (key <= query_position) & valid_query
        padding_rows = (~valid_query) & (key == 0)
        full = visible | padding_rows
        masks = {"full_attention": full}
        if self._sliding_window is not None:
            masks["sliding_attention"] = (visible & (key > query_position - self._sliding_window)) | padding_rows
        minimum = torch.finfo(self.dtype).min
        additive = {
            name: torch.zeros(m.shape, dtype=self.dtype, device=device).masked_fill(~m, minimum).unsqueeze(1)
            for name, m in masks.items()
        }
        return additive if self._sliding_window is not None else additive["full_attention"]

    def forward(self, requests: Sequence[ForwardRequest]) -> list[torch.Tensor]:
        """Returns, per request, logits [len(tokens) - logits_from, V] (float32)."""
        if not requests:
            return []
        logits, counts = self.forward_flat(requests)
        return list(torch.split(logits, counts))

    @torch.inference_mode()
    def forward_flat(self, requests: Sequence[ForwardRequest]) -> tuple[torch.Tensor, list[int]]:
        """All requested logits as one tensor [sum(counts), V] (float32), request after request,
        and each request's row count. On the packed path it never synchronises with the device:
        the caller's first read of the logits does (one transfer for a whole batch)."""
        if not requests:
            return torch.empty((0, self.vocab_size), device=self.device), []
        if self.stream is not None and torch.cuda.current_stream(self.device) != self.stream:
            torch.cuda.current_stream(self.device).synchronize()  # earlier work of this thread
            torch.cuda.set_stream(self.stream)
        cache = self.cache
        cache_lengths, max_tokens = cache.lengths, cache.max_tokens
        # One pass over the requests (it runs on every draft step, for every session).
        slots, cached, lengths, counts, new_lengths = [], [], [], [], []
        for r in requests:
            slot, n, logits_from = r.slot, len(r.tokens), r.logits_from
            c = cache_lengths[slot]
            if n == 0:
                raise ValueError(f"slot {slot}: empty forward request")
            if c + n > max_tokens:
                raise CapacityError(f"context of {c + n} tokens exceeds the KV slot size {max_tokens}")
            if not 0 <= logits_from <= n:
                raise ValueError(f"slot {slot}: logits_from {logits_from} outside [0, {n}]")
            slots.append(slot)
            cached.append(c)
            lengths.append(n)
            counts.append(n - logits_from)
            new_lengths.append(c + n)
        if len(set(slots)) != len(slots):
            raise ValueError("a forward may hold each slot only once")
        try:
            if self.packed is not None:
                return self.packed.forward(requests, cached, lengths, sum(counts)), counts
            return self._forward_padded(requests, cached, lengths), counts
        finally:
            cache.end_forward(slots, new_lengths)

    def _forward_padded(self, requests: Sequence[ForwardRequest], cached: list[int], lengths: list[int]) -> torch.Tensor:
        cache = self.cache
        batch, q_len = len(requests), max(lengths)
        device = self.device
        input_ids = torch.zeros((batch, q_len), dtype=torch.long, device=device)
        write_slots = torch.full((batch, q_len), cache.scratch_slot, dtype=torch.long, device=device)
        offsets = torch.arange(q_len, device=device)
        write_positions = offsets.repeat(batch, 1)
        position_ids = torch.empty((batch, q_len), dtype=torch.long, device=device)
        for b, (r, c, n) in enumerate(zip(requests, cached, lengths)):
            input_ids[b, :n] = torch.tensor(list(r.tokens), dtype=torch.long)
            write_slots[b, :n] = r.slot
            write_positions[b, :n] = offsets[:n] + c
            position_ids[b] = offsets + c
        read_length = max(c + n for c, n in zip(cached, lengths))
        slots = [r.slot for r in requests]
        cache.begin_forward(write_slots, write_positions, slots, read_length)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=self._masks(cached, lengths, read_length, q_len),
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_argument: cache},
        )
        hidden = out.last_hidden_state  # [B, Q, H]
        rows = torch.cat([torch.full((n - r.logits_from,), b) for b, (r, n) in enumerate(zip(requests, lengths))])
        cols = torch.cat([torch.arange(r.logits_from, n) for r, n in zip(requests, lengths)])
        logits = self.head_logits(hidden[rows.to(device), cols.to(device)])
        return logits
