"""Attention over KV slots for a ragged batch packed flat: the runner's fast path.

The model sees one flat sequence of N tokens ([1, N]): every token-wise layer (projections,
MLP, norms, rotary with per-token position ids) runs on exactly the real tokens, with no
padding to the longest request. Only attention needs to know which session a token belongs
to; this function, registered with transformers' AttentionInterface, scatters the flat queries
into a [rows, Q] grid where row = the session's KV slot, attends to that slot's keys (a view of
the preallocated cache, no gather, no copy) under a mask built from each row's cached length,
and gathers the outputs back to the flat order.

Grouped-query attention without repeating K/V: the g query heads that share one KV head are
stacked along the query axis ([rows, kv_heads, g * Q, head_dim]), so SDPA reads each KV head
once and can use its fused kernels (a mask rules out flash attention, not the efficient one).

Outside a runner forward (the same model object used by plain HF code: tests, `generate`) the
function delegates to the implementation the model had before, so registering it is invisible.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PackedBatch:
    """Index tensors of one packed forward (all on the model's device).

    pack_row, pack_col: [N] long, where each flat token sits in the [rows, Q] grid.
    rows, q_len: grid size; column q_len - 1 is a garbage column that padding tokens use.
    """

    pack_row: torch.Tensor
    pack_col: torch.Tensor
    rows: int
    q_len: int
    # Set for batch-invariant attention (PackedForward.batch_invariant): [rows] cached lengths;
    # each real query then attends alone, to exactly its row's cached keys and the batch's own
    # keys up to itself.
    row_cached: torch.Tensor | None = None
    _queries: list[tuple[int, int, int]] | None = None  # (flat index, row, keys) of real tokens

    def real_queries(self) -> list[tuple[int, int, int]]:
        if self._queries is None:
            cached = self.row_cached.tolist()
            self._queries = [(i, row, cached[row] + col + 1)
                             for i, (row, col) in enumerate(zip(self.pack_row.tolist(), self.pack_col.tolist()))
                             if col < self.q_len - 1]  # the last column holds padding tokens
        return self._queries


_active = threading.local()  # .batch: PackedBatch during a runner forward on this thread


class active_batch:
    """Context manager: the packed batch that slot attention uses on this thread."""

    def __init__(self, batch: PackedBatch) -> None:
        self.batch = batch

    def __enter__(self) -> PackedBatch:
        self._previous = getattr(_active, "batch", None)
        _active.batch = self.batch
        return self.batch

    def __exit__(self, *exc) -> None:
        _active.batch = self._previous


def build_packed_mask(row_cached: torch.Tensor, row_q_len: torch.Tensor, q_len: int, read_length: int,
                      group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [rows, 1, group * q_len, read_length] for the stacked-heads layout.

    row_cached, row_q_len: [rows] long. Query j of row b sees key t iff j < row_q_len[b] and
    t <= row_cached[b] + j. Padding queries (rows without a request, columns past a request's
    tokens, the garbage column) see only key 0: any finite row avoids NaN; their output is
    never read. Built with device ops only, so it can live inside a captured CUDA graph.
    """
    device = row_cached.device
    query = torch.arange(q_len, device=device).view(1, -1, 1)
    key = torch.arange(read_length, device=device).view(1, 1, -1)
    cached = row_cached.view(-1, 1, 1)
    valid = query < row_q_len.view(-1, 1, 1)
    visible = (valid & (key <= cached + query)) | (~valid & (key == 0))
    additive = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    rows = additive.shape[0]
    return additive.unsqueeze(1).expand(rows, group, q_len, read_length).reshape(rows, 1, group * q_len, read_length)


def slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor, scaling: float | None = None, **_: object):
    """query: [1, H, N, D] (flat tokens, rotary applied). key, value: [rows, kv_heads, R, D],
    the slot view the cache returned. attention_mask: from build_packed_mask.
    Returns ([1, N, H, D], None) as transformers' attention functions do."""
    batch: PackedBatch = _active.batch
    _, num_heads, num_tokens, head_dim = query.shape
    rows, num_kv_heads = key.shape[0], key.shape[1]
    group = num_heads // num_kv_heads
    if batch.row_cached is not None:
        flat = query[0].transpose(0, 1)  # [N, H, D]
        out = torch.zeros_like(flat)
        for index, row, keys in batch.real_queries():
            single = flat[index].view(1, num_kv_heads, group, head_dim)
            out[index] = F.scaled_dot_product_attention(single, key[row:row + 1, :, :keys], value[row:row + 1, :, :keys],
                                                        scale=scaling).reshape(num_heads, head_dim)
        return out.unsqueeze(0), None
    q_len = batch.q_len
    flat = query[0].transpose(0, 1)  # [N, H, D]
    grid = query.new_zeros((rows, q_len, num_heads, head_dim))
    grid[batch.pack_row, batch.pack_col] = flat
    # [rows, Q, kv, g, D] -> [rows, kv, g * Q, D]: heads h = kv_index * g + g_index share KV head kv_index.
    stacked = grid.view(rows, q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    stacked = stacked.reshape(rows, num_kv_heads, group * q_len, head_dim)
    out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=attention_mask, scale=scaling)
    out = out.view(rows, num_kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)  # [rows, Q, kv, g, D]
    out = out.reshape(rows, q_len, num_heads, head_dim)[batch.pack_row, batch.pack_col]  # [N, H, D]
    return out.unsqueeze(0), None


_REGISTERED: dict[str, str] = {}  # our name -> the implementation it delegates to


def _delegate(original: str) -> Callable:
    def fallback(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if original in ("eager", None):
            # Each model family has its own eager function (softcapping, sinks...).
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if eager is None:
                raise RuntimeError(f"no eager attention for {type(module).__name__}")
            return eager(module, query, key, value, attention_mask, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[original](module, query, key, value, attention_mask, **kwargs)

    def attention(module, query, key, value, attention_mask, **kwargs):
        if getattr(_active, "batch", None) is not None:
            return slot_attention(module, query, key, value, attention_mask, **kwargs)
        return fallback(module, query, key, value, attention_mask, **kwargs)

    return attention


def install(model: torch.nn.Module) -> bool:
    """Switch `model` to slot attention (delegating to its current implementation outside a
    runner forward). Returns False when the model cannot use it; the runner then keeps the
    padded path. Idempotent."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    config = model.config
    current = getattr(config, "_attn_implementation", None) or "eager"
    if current in _REGISTERED:
        return True
    if not isinstance(current, str) or current not in ("sdpa", "eager"):
        return False
    name = f"specmesh_slots_{current}"
    if name not in _REGISTERED:
        AttentionInterface.register(name, _delegate(current))
        mask_function = ALL_MASK_ATTENTION_FUNCTIONS[current] if current in ALL_MASK_ATTENTION_FUNCTIONS else None
        if mask_function is None:
            from transformers.masking_utils import eager_mask

            mask_function = eager_mask
        AttentionMaskInterface.register(name, mask_function)
        _REGISTERED[name] = current
    try:
        model.set_attn_implementation(name)
    except Exception:  # noqa: BLE001 - an architecture that refuses: keep the padded path
        return False
    return getattr(model.config, "_attn_implementation", None) == name
