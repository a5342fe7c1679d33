"""A batched KV cache with one preallocated slot per session.

Each layer holds keys and values in tensors [num_slots + 1, num_kv_heads, max_tokens, head_dim]
allocated once. A forward pass writes the new tokens of every session in the batch straight
into that session's slot (index_put, no concatenation), and the attention reads the slot back.
Session length is plain Python bookkeeping, so rolling back the last n positions is O(1): the
stale positions are masked out and overwritten by the next write.

The extra slot at index num_slots is scratch space: padding positions of a ragged batch write
there so they can never clobber a real session.

It is handed to a transformers model as its cache: transformers 5.x calls
`update(key_states, value_states, layer_idx, ...)` in every attention layer and attends to what
it returns; the 4-D mask built by `ragged_forward` says which of those positions each query sees.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from specmesh.errors import CapacityError


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @staticmethod
    def from_config(config) -> "CacheShape":  # a transformers PretrainedConfig
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text_config.num_attention_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        return CacheShape(text_config.num_hidden_layers, num_kv_heads, head_dim)


class SlotKVCache:
    """Per-session KV slots. Not thread-safe: one forward pass at a time."""

    # Read by transformers in some code paths; this cache is never compiled as a whole.
    is_compileable = False

    def __init__(
        self,
        shape: CacheShape,
        num_slots: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots <= 0 or max_tokens <= 0:
            raise ValueError("num_slots and max_tokens must be positive")
        self.shape = shape
        self.num_slots = num_slots
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.scratch_slot = num_slots
        storage_shape = (num_slots + 1, shape.num_kv_heads, max_tokens, shape.head_dim)
        self.keys = [torch.zeros(storage_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(storage_shape, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.lengths = [0] * num_slots  # valid cached positions per slot
        # A min-heap: the lowest free slot is taken first, so live sessions stay packed at low
        # slot numbers (the packed path attends to slot rows [0, highest live slot]).
        self._free_slots = list(range(num_slots))
        # Set by begin_forward for the pass in flight.
        self._write_slots: torch.Tensor | None = None  # [B, Q] (or [1, N] packed) long
        self._write_positions: torch.Tensor | None = None  # same shape as _write_slots
        self._read_slots: list[int] = []
        self._read_rows = 0  # packed path: attend to slot rows [0, read_rows)
        self._read_length = 0

    # ---- slot lifecycle -------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def allocate(self) -> int:
        if not self._free_slots:
            raise CapacityError(f"all {self.num_slots} KV cache slots are in use")
        slot = heapq.heappop(self._free_slots)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        heapq.heappush(self._free_slots, slot)

    def truncate(self, slot: int, length: int) -> None:
        """Keep the first `length` positions of the slot: O(1)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    # ---- one forward pass -----------------------------------------------------------------
    def begin_forward(
        self,
        write_slots: torch.Tensor,
        write_positions: torch.Tensor,
        read_slots: list[int],
        read_length: int,
    ) -> None:
        """write_slots, write_positions: [B, Q] long, where each input token's K/V goes.
        read_slots: the slot of each batch row; read_length: positions [0, read_length) are read."""
        self._write_slots = write_slots
        self._write_positions = write_positions
        self._read_slots = read_slots
        self._read_rows = 0
        self._read_length = read_length

    def begin_packed_forward(self, write_slots: torch.Tensor, write_positions: torch.Tensor, read_rows: int,
                             read_length: int) -> None:
        """The packed path: write_slots, write_positions: [1, N] long for the flat tokens;
        attention reads slot rows [0, read_rows) and positions [0, read_length) as one view."""
        self._write_slots = write_slots
        self._write_positions = write_positions
        self._read_slots = []
        self._read_rows = read_rows
        self._read_length = read_length

    def end_forward(self, slots: list[int], new_lengths: list[int]) -> None:
        for slot, length in zip(slots, new_lengths):
            self.lengths[slot] = length
        self._write_slots = self._write_positions = None
        self._read_rows = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: [B, kv_heads, Q, head_dim] for this pass's input tokens.
        Returns keys and values [B, kv_heads, read_length, head_dim] to attend to."""
        assert self._write_slots is not None, "update() outside begin_forward/end_forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices around a slice put the indexed dims first: target is [B, Q, kv_heads, head_dim].
        keys[self._write_slots, :, self._write_positions] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._write_slots, :, self._write_positions] = value_states.transpose(1, 2).to(values.dtype)
        read = self._read_length
        if self._read_rows:
            # Slot rows [0, read_rows): a view of the storage, no copy (shapes fixed per bucket).
            return keys[: self._read_rows, :, :read], values[: self._read_rows, :, :read]
        slots = self._read_slots
        if len(slots) == 1 or slots == list(range(slots[0], slots[0] + len(slots))):
            # Contiguous slots: a view, no copy.
            first = slots[0]
            return keys[first : first + len(slots), :, :read], values[first : first + len(slots), :, :read]
        index = torch.tensor(slots, dtype=torch.long, device=keys.device)
        return keys[index, :, :read], values[index, :, :read]

    # transformers may ask these on some paths; the 4-D mask we pass makes them irrelevant.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.shape.num_layers
