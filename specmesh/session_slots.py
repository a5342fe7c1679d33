"""Session-id -> KV slot bookkeeping shared by the drafter and the verifier.

Both services hold per-session state as a cache, never as truth: the caller says how many
tokens it believes are cached, and `sync` either rolls the slot back to that length (the extra
positions were rejected drafts) or reports a miss, after which the caller resends everything.
Least-recently-used sessions are evicted when slots run out, and idle ones after a TTL.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Iterable

from specmesh.errors import CapacityError
from specmesh.kv_cache import SlotKVCache


class SessionSlots:
    def __init__(self, cache: SlotKVCache, idle_ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.cache = cache
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._slots: OrderedDict[str, int] = OrderedDict()  # LRU order, oldest first
        self._last_used: dict[str, float] = {}
        self.num_evictions = 0
        self.num_cache_misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._slots

    def session_ids(self) -> list[str]:
        return list(self._slots)

    def cached_length(self, session_id: str) -> int:
        return self.cache.lengths[self._slots[session_id]]

    def slot_of(self, session_id: str) -> int:
        return self._slots[session_id]

    def sync(self, session_id: str, num_cached_tokens: int, pinned: Iterable[str] = ()) -> int | None:
        """Make the session hold exactly num_cached_tokens cached positions; return its slot.

        Returns None (a cache miss) when the session is unknown or holds fewer positions.
        num_cached_tokens == 0 always succeeds: it (re)starts the session, evicting the least
        recently used session outside `pinned` if every slot is taken.
        """
        slot = self._slots.get(session_id)
        if slot is None:
            if num_cached_tokens != 0:
                self.num_cache_misses += 1
                return None
            slot = self._allocate(pinned)
            self._slots[session_id] = slot
        elif self.cache.lengths[slot] < num_cached_tokens:
            self.num_cache_misses += 1
            return None
        else:
            self.cache.truncate(slot, num_cached_tokens)
        self._slots.move_to_end(session_id)
        self._last_used[session_id] = self._clock()
        return slot

    def release(self, session_id: str) -> bool:
        slot = self._slots.pop(session_id, None)
        self._last_used.pop(session_id, None)
        if slot is None:
            return False
        self.cache.free(slot)
        return True

    def evict_idle(self) -> list[str]:
        if self.idle_ttl_s is None:
            return []
        deadline = self._clock() - self.idle_ttl_s
        idle = [sid for sid, used in self._last_used.items() if used < deadline]
        for session_id in idle:
            self.release(session_id)
            self.num_evictions += 1
        return idle

    def _allocate(self, pinned: Iterable[str]) -> int:
        if self.cache.num_free_slots == 0:
            pinned_set = set(pinned)
            victim = next((sid for sid in self._slots if sid not in pinned_set), None)
            if victim is None:
                raise CapacityError(f"all {self.cache.num_slots} session slots are in use by this batch")
            self.release(victim)
            self.num_evictions += 1
        return self.cache.allocate()
