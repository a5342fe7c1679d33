"""Where the scheduler finds its drafters and verifiers, and how it follows them.

Three modes (`--discovery`):
- static: the `--verifiers` / `--drafters` lists (StaticEndpoints), fixed for the process' life;
- dns: the A/AAAA records of a headless Service (`--verifier-service NAME:PORT`), re-resolved
  every few seconds (scheduler/discovery_dns.py); the cluster DNS lists only ready pods;
- kubernetes: the EndpointSlices of the Services (`--verifier-service NAME`), watched through the
  API server (scheduler/discovery_kubernetes.py): ready endpoints only, changes within a second.

Dynamic sources are EndpointSources whose list changes on the event loop; `PoolFollower` keeps
the coordinator in step: a verifier that leaves has its sessions moved at once (the failover path,
Coordinator.endpoints_changed), a drafter that leaves has its sessions re-pinned on their next
round (DrafterRouter), a newcomer is vetted (tokenizer, cost profile) and gets new sessions, and
the clients of endpoints gone for a while are closed. During an outage of the source (API server
or DNS unreachable) the last known endpoints stay in use.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable, Iterable

from scheduler.backends import BackendUnavailable
from scheduler.config import SchedulerConfig
from scheduler.replica_pool import EndpointSource, StaticEndpoints

log = logging.getLogger(__name__)


class WatchedEndpoints:
    """An EndpointSource whose endpoints change at run time. Subclasses call `_publish` on the
    event loop; listeners run right after each change."""

    def __init__(self, name: str) -> None:
        self.name = name  # what logs call this source (e.g. "verifier Service specmesh-verifier")
        self._endpoints: tuple[str, ...] = ()
        self._listeners: list[Callable[[], None]] = []
        self.synced = asyncio.Event()  # set once a first complete list arrived
        self.num_changes = 0

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _publish(self, endpoints: Iterable[str]) -> None:
        new = tuple(sorted(set(endpoints)))
        self.synced.set()
        if new == self._endpoints:
            return
        added = sorted(set(new) - set(self._endpoints))
        removed = sorted(set(self._endpoints) - set(new))
        self._endpoints = new
        self.num_changes += 1
        log.info("%s: %d endpoints (+%s -%s)", self.name, len(new), added or "[]", removed or "[]")
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one listener's bug must not stop discovery
                log.exception("%s: endpoint listener failed", self.name)

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class Backoff:
    """Exponential backoff with full jitter, for reconnecting to a source that failed."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.max_s, self.initial_s * 2 ** (self.failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def make_endpoint_sources(config: SchedulerConfig) -> tuple[EndpointSource, EndpointSource | None]:
    """(verifier source, drafter source or None) for the configured discovery mode. Dynamic ones
    are VettedEndpoints, started (and checked) by a PoolFollower."""
    if config.discovery == "static":
        return (StaticEndpoints(list(config.verifiers)),
                StaticEndpoints(list(config.drafters)) if config.drafters else None)
    if config.discovery == "dns":
        from scheduler.discovery_dns import DnsEndpoints

        def dns(role: str, target: str) -> DnsEndpoints:
            return DnsEndpoints(target, refresh_s=config.dns_refresh_s, name=f"{role} DNS {target}")

        return (VettedEndpoints(dns("verifier", config.verifier_service)),
                VettedEndpoints(dns("drafter", config.drafter_service)) if config.drafter_service else None)
    from scheduler.discovery_kubernetes import EndpointSliceWatcher, load_kubernetes_config

    kube = load_kubernetes_config(config.kubeconfig or None)
    namespace = config.namespace or kube.namespace

    def watcher(role: str, service: str) -> EndpointSliceWatcher:
        return EndpointSliceWatcher(kube.api_client_factory, namespace, service, port_name=config.grpc_port_name,
                                    name=f"{role} Service {namespace}/{service}")

    return (VettedEndpoints(watcher("verifier", config.verifier_service)),
            VettedEndpoints(watcher("drafter", config.drafter_service)) if config.drafter_service else None)


class VettedEndpoints(WatchedEndpoints):
    """The endpoints of a dynamic source that passed a check (they answer Profile, with the
    verifiers' tokenizer): removals pass through at once, newcomers once checked. A newcomer that
    does not answer yet is checked again every `retry_s` while its source still lists it."""

    # endpoint -> True (use it), False (never: wrong model), None (not answering yet)
    Check = Callable[[str], Awaitable["bool | None"]]

    def __init__(self, inner: WatchedEndpoints, check: "VettedEndpoints.Check | None" = None,
                 retry_s: float = 2.0) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.check = check
        self.retry_s = retry_s
        self._vetted: set[str] = set()
        self._refused: set[str] = set()
        self._checking: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        self.inner.subscribe(self._inner_changed)
        await self.inner.start()
        self._inner_changed()

    def _inner_changed(self) -> None:
        present = set(self.inner.endpoints())
        self._vetted &= present
        self._refused &= present  # a pod that comes back at that address is checked afresh
        for endpoint in list(self._checking):
            if endpoint not in present:
                self._checking.pop(endpoint).cancel()
        for endpoint in sorted(present - self._vetted - self._refused - set(self._checking)):
            task = asyncio.get_running_loop().create_task(self._vet(endpoint))
            self._checking[endpoint] = task
        if self.inner.synced.is_set():
            self._publish(self._vetted)

    async def _vet(self, endpoint: str) -> None:
        try:
            while True:
                try:
                    verdict = True if self.check is None else await self.check(endpoint)
                except Exception:  # noqa: BLE001 - a check that breaks counts as "not answering yet"
                    log.exception("%s: checking %s failed", self.name, endpoint)
                    verdict = None
                if verdict is not None:
                    break
                await asyncio.sleep(self.retry_s)
        finally:
            if self._checking.get(endpoint) is asyncio.current_task():
                del self._checking[endpoint]
        if endpoint not in self.inner.endpoints():
            return  # left while being checked
        if verdict:
            self._vetted.add(endpoint)
        else:
            self._refused.add(endpoint)
        self._publish(self._vetted)

    async def close(self) -> None:
        for task in list(self._checking.values()):
            task.cancel()
        self._checking.clear()
        await self.inner.close()


class PoolFollower:
    """Keeps a Coordinator in step with dynamic pools (VettedEndpoints sources; static pools are
    left alone): vets newcomers against the verifiers' tokenizer (and keeps a verifier's cost
    profile), tells the coordinator about every change, and closes the clients of endpoints that
    stayed away for `forget_after_s`."""

    def __init__(self, coordinator, forget_after_s: float = 30.0) -> None:  # scheduler.coordinator.Coordinator
        self.coordinator = coordinator
        self.forget_after_s = forget_after_s
        pools = [coordinator.verifiers] + ([coordinator.drafters.pool] if coordinator.drafters else [])
        self._pools = [pool for pool in pools if isinstance(pool.source, VettedEndpoints)]
        self._known: dict[int, set[str]] = {id(pool): set() for pool in self._pools}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        for pool in self._pools:
            pool.source.check = self._checker(pool)
            pool.source.subscribe(self._changed)

    async def start(self) -> None:
        for pool in self._pools:
            await pool.source.start()

    def _checker(self, pool) -> VettedEndpoints.Check:
        coordinator = self.coordinator

        async def check(endpoint: str) -> bool | None:
            try:
                profile = await pool.client(endpoint).profile()
            except BackendUnavailable as error:
                log.info("%s not answering Profile yet (%s)", endpoint, error)
                return None
            expected = coordinator.tokenizer_fingerprint  # None until connect(): it compares the first ones
            if expected and profile.tokenizer_fingerprint and profile.tokenizer_fingerprint != expected:
                log.error("refusing %s (%s): its tokenizer differs from the verifiers'", endpoint, profile.model_name)
                return False
            if pool is coordinator.verifiers and coordinator.cost_registry is not None and profile.cost_table:
                from scheduler.cost_model import CostProfile

                coordinator.cost_registry.set_local(endpoint, CostProfile.from_table(
                    (p.batch_tokens, p.forward_seconds) for p in profile.cost_table))
            return True

        return check

    def _changed(self) -> None:
        if self._closed:
            return
        self.coordinator.endpoints_changed()
        for pool in self._pools:
            present = set(pool.source.endpoints())
            for endpoint in sorted(self._known[id(pool)] - present):
                self._spawn(self._forget_later(pool, endpoint))
            self._known[id(pool)] = present

    async def _forget_later(self, pool, endpoint: str) -> None:
        """Close the client of an endpoint that stayed away: replaced pods get new addresses, so
        without this, channels to dead pods would pile up."""
        await asyncio.sleep(self.forget_after_s)
        if endpoint in pool.source.endpoints():
            return
        if pool is self.coordinator.verifiers and self.coordinator.cost_registry is not None:
            self.coordinator.cost_registry.remove_local(endpoint)
        client = pool.forget(endpoint)
        if client is not None:
            log.info("closing the client of %s (gone for %.0f s)", endpoint, self.forget_after_s)
            await client.close()

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                pass
        for pool in self._pools:
            await pool.source.close()
