"""Where calibration tables live: in memory (one process) or in Redis (shared by all scheduler
replicas of a deployment).

Contract of a store (what the budget policy relies on):
- `table(model_pair)` returns the current estimate immediately, never blocks, never raises.
- `record(model_pair, observations)` takes a round's increments immediately, never raises;
  any I/O happens in the background.

Redis layout: one hash per model pair, key `{namespace}:calib:{geometry}:{model_pair}` (e.g.
`specmesh:v1:calib:16x10:smollm2->drafter2l`), fields `o:pos:bucket` / `a:pos:bucket` (decayed
counts) and `_t` (Redis server time the counts are valid at). Updates run as one Lua script,
atomically on the server: it decays the whole hash to the server's clock when `_t` is older
than `rebase_after_s`, otherwise scales the increments up by 2^(dt/half_life) (forward decay),
so increments from any number of replicas compose exactly whatever their order. Every update
is pipelined with the read of the hash and the server clock: one round trip per sync.

Outage: a sync that fails or exceeds `timeout_s` keeps its batch of increments locally;
estimates keep using the last shared snapshot plus everything learned locally since; after a
backoff the batch is retried under the same number (the script skips a number it has already
applied, so a write that timed out on our side but reached Redis is not counted twice), then
what accumulated meanwhile follows: the local increments merge back when Redis returns.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from redis.asyncio import Redis

from scheduler.calibration import CalibrationConfig, CalibrationTable, Observation
from specmesh.redis_link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "specmesh:v1"

# KEYS[1]: the counts hash; KEYS[2]: last batch number applied per writer.
# ARGV: half_life_s, rebase_after_s, ttl_s, writer id, batch number, then field/increment pairs.
# A batch whose number is not above the writer's last applied one was already applied (its
# first attempt timed out on our side but reached Redis): skipping it makes retries exactly-once.
_UPDATE_SCRIPT = """
local ttl = math.floor(tonumber(ARGV[3]))
local last_batch = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '0')
if tonumber(ARGV[5]) <= last_batch then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[2], ttl)
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local half_life = tonumber(ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], '_t'))
local factor = 1
if last == nil then
  redis.call('HSET', KEYS[1], '_t', string.format('%.17g', now))
elseif now - last > tonumber(ARGV[2]) then
  local decay = math.pow(0.5, (now - last) / half_life)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= '_t' then
      local value = tonumber(all[i + 1]) * decay
      if value < 1e-9 then
        redis.call('HDEL', KEYS[1], all[i])
      else
        redis.call('HSET', KEYS[1], all[i], string.format('%.17g', value))
      end
    end
  end
  redis.call('HSET', KEYS[1], '_t', string.format('%.17g', now))
elseif now > last then
  factor = math.pow(2, (now - last) / half_life)
end
for i = 6, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]) * factor)
end
redis.call('EXPIRE', KEYS[1], ttl)
return 1
"""


class CalibrationStore(Protocol):
    config: CalibrationConfig

    def table(self, model_pair: str) -> CalibrationTable: ...

    async def record(self, model_pair: str, observations: Sequence[Observation]) -> None: ...

    async def close(self) -> None: ...


class InMemoryCalibrationStore:
    """Tables in this process only (the local cluster, tests, or no --redis-url)."""

    def __init__(self, config: CalibrationConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CalibrationConfig()
        self.clock = clock
        self._tables: dict[str, CalibrationTable] = {}

    def table(self, model_pair: str) -> CalibrationTable:
        now = self.clock()
        table = self._tables.get(model_pair)
        if table is None:
            table = self._tables[model_pair] = CalibrationTable(self.config, now)
        return table.decay_to(now)

    async def record(self, model_pair: str, observations: Sequence[Observation]) -> None:
        if observations:
            self.table(model_pair).add(observations, self.clock())

    async def close(self) -> None:
        return None


@dataclass
class _PairState:
    shared: CalibrationTable  # last snapshot read from Redis (everyone's counts)
    pending: CalibrationTable  # learned here, not yet sealed into a batch
    # A sealed batch (number, counts) not yet confirmed written. At most one exists: it is
    # retried unchanged (same number) until Redis confirms it, while pending keeps growing.
    unconfirmed: tuple[int, CalibrationTable] | None = None
    last_read: float = -math.inf  # local clock of the last successful read
    task: asyncio.Task | None = None
    view: CalibrationTable | None = None  # cached shared + unconfirmed + pending
    view_dirty: bool = True
    num_syncs: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one sync at a time per pair


class RedisCalibrationStore:
    """Calibration shared through Redis, with local fallback (see module docstring)."""

    def __init__(self, url: str | None = None, config: CalibrationConfig | None = None, *,
                 client: Redis | None = None, namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 0.1,
                 refresh_interval_s: float = 1.0, rebase_after_s: float = 1.0, ttl_s: float | None = None,
                 min_backoff_s: float = 0.2, max_backoff_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config or CalibrationConfig()
        self.namespace = namespace
        self.refresh_interval_s = refresh_interval_s
        self.rebase_after_s = rebase_after_s
        # Idle tables disappear once they have decayed to nothing worth keeping.
        self.ttl_s = ttl_s if ttl_s is not None else max(86_400.0, 20 * self.config.half_life_s)
        self.clock = clock
        self.link = RedisLink(url, client=client, timeout_s=timeout_s, min_backoff_s=min_backoff_s,
                              max_backoff_s=max_backoff_s, clock=clock)
        self.writer_id = uuid.uuid4().hex  # numbers this instance's batches
        self._next_batch = 1
        self._pairs: dict[str, _PairState] = {}

    def key(self, model_pair: str) -> str:
        return f"{self.namespace}:calib:{self.config.geometry}:{model_pair}"

    @property
    def available(self) -> bool:
        return self.link.available

    # ---- the store contract ------------------------------------------------------------------
    def table(self, model_pair: str) -> CalibrationTable:
        state = self._state(model_pair)
        self._kick(model_pair, state)
        now = self.clock()
        if state.view is None or state.view_dirty:
            view = state.shared.copy().merge(state.pending, now)
            if state.unconfirmed is not None:
                view.merge(state.unconfirmed[1], now)
            state.view, state.view_dirty = view, False
        return state.view.decay_to(now)

    async def record(self, model_pair: str, observations: Sequence[Observation]) -> None:
        if not observations:
            return
        state = self._state(model_pair)
        state.pending.add(observations, self.clock())
        state.view_dirty = True
        self._kick(model_pair, state)

    async def close(self) -> None:
        """Stop background work, write what is pending (each attempt bounded), then stop."""
        tasks = [s.task for s in self._pairs.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for model_pair, state in self._pairs.items():
            for _ in range(2):  # an unconfirmed batch, then the pending one
                if not self._has_news(state) or not await self.sync(model_pair):
                    break
        await self.link.close()

    # ---- explicit sync (background work calls this; tests may too) ---------------------------
    async def sync(self, model_pair: str) -> bool:
        """One round trip: write one batch of local increments (if any), read everyone's
        counts and the server clock. True on success; never raises RedisUnavailable."""
        state = self._state(model_pair)
        async with state.lock:
            if state.unconfirmed is None and not state.pending.is_empty():
                state.unconfirmed = (self._next_batch, state.pending)
                self._next_batch += 1
                state.pending = CalibrationTable(self.config, self.clock())
            batch = state.unconfirmed
            # Counts as of now: the script adds them as increments at the server's "now".
            fields = batch[1].copy().decay_to(self.clock()).to_fields() if batch is not None else {}
            try:
                raw, server_time = await self.link.call(
                    lambda client: self._round_trip(client, model_pair, batch[0] if batch else 0, fields))
            except RedisUnavailable as error:
                log.debug("calibration sync for %s failed: %s", model_pair, error)
                return False
            if state.unconfirmed is batch:
                state.unconfirmed = None
            state.shared = self._decode(raw, server_time)
            state.view_dirty = True
            state.last_read = self.clock()
            state.num_syncs += 1
            return True

    async def wait_idle(self) -> None:
        await self.link.wait_idle()

    # ---- internals ---------------------------------------------------------------------------
    def _state(self, model_pair: str) -> _PairState:
        state = self._pairs.get(model_pair)
        if state is None:
            now = self.clock()
            state = self._pairs[model_pair] = _PairState(CalibrationTable(self.config, now),
                                                         CalibrationTable(self.config, now))
        return state

    @staticmethod
    def _has_news(state: _PairState) -> bool:
        return state.unconfirmed is not None or not state.pending.is_empty()

    def _kick(self, model_pair: str, state: _PairState) -> None:
        """Start a background sync when one is due and none is running."""
        if state.task is not None and not state.task.done():
            return
        if not self.link.ready:
            return
        if not self._has_news(state) and self.clock() - state.last_read < self.refresh_interval_s:
            return
        state.task = self.link.spawn(self._background_sync(model_pair))

    async def _background_sync(self, model_pair: str) -> None:
        """Sync until nothing local is left to write. While Redis is down, retry after each
        backoff (so increments merge back even if this replica goes idle); rounds never wait."""
        state = self._state(model_pair)
        while True:
            ok = await self.sync(model_pair)
            if not self._has_news(state):
                return
            if not ok:
                await asyncio.sleep(max(self.link.retry_at - self.clock(), 0.0) + 0.001)

    async def _round_trip(self, client: Redis, model_pair: str, batch_number: int,
                          fields: dict[str, float]) -> tuple[dict, list]:
        key = self.key(model_pair)
        pipe = client.pipeline(transaction=False)
        if batch_number:
            args: list[str | float | int] = [self.config.half_life_s, self.rebase_after_s, self.ttl_s,
                                             self.writer_id, batch_number]
            for name, value in fields.items():
                args += [name, repr(value)]
            pipe.eval(_UPDATE_SCRIPT, 2, key, f"{key}:batches", *args)
        pipe.hgetall(key)
        pipe.time()
        results = await pipe.execute()
        return results[-2], results[-1]

    def _decode(self, raw: dict, server_time: Sequence[int]) -> CalibrationTable:
        """The hash as a table valid now: counts decayed from `_t` to the server's clock."""
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in raw.items()}
        server_now = float(server_time[0]) + float(server_time[1]) / 1e6
        try:
            stamped = float(fields.get("_t", server_now))
        except ValueError:
            stamped = server_now
        # Counts are stored as of `_t` (later increments were scaled up to match): decay them
        # from there to the server's clock now.
        scale = math.pow(0.5, (server_now - stamped) / self.config.half_life_s)
        return CalibrationTable.from_fields(self.config, fields, as_of=self.clock(), scale=scale)


def open_calibration_store(redis_url: str | None, config: CalibrationConfig | None = None,
                           **redis_options) -> InMemoryCalibrationStore | RedisCalibrationStore:
    """The store for a deployment: shared through Redis when given a URL, else in memory."""
    if redis_url:
        return RedisCalibrationStore(redis_url, config, **redis_options)
    return InMemoryCalibrationStore(config)
