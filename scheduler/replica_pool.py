"""The replicas of one kind (drafters or verifiers) this scheduler can use, and which are live.

Endpoints come from an EndpointSource: a static list, or discovery (DNS of a headless Service,
or watched EndpointSlices; scheduler/discovery.py) behind the same interface. A replica that
fails is benched for a cooldown and then tried again, so a restarted pod rejoins without anyone
telling us.
"""

from __future__ import annotations

import time
from typing import Callable, Generic, Protocol, TypeVar

Client = TypeVar("Client")


class EndpointSource(Protocol):
    def endpoints(self) -> list[str]: ...


class StaticEndpoints:
    def __init__(self, endpoints: list[str]) -> None:
        self._endpoints = [e.strip() for e in endpoints if e.strip()]

    def endpoints(self) -> list[str]:
        return list(self._endpoints)


class ReplicaPool(Generic[Client]):
    def __init__(self, source: EndpointSource, connect: Callable[[str], Client], cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self._connect = connect
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._clients: dict[str, Client] = {}
        self._benched_until: dict[str, float] = {}
        self.num_failures: dict[str, int] = {}  # per endpoint, for metrics and tests
        self._rejected: set[str] = set()  # permanently unusable (e.g. wrong tokenizer)

    def client(self, endpoint: str) -> Client:
        if endpoint not in self._clients:
            self._clients[endpoint] = self._connect(endpoint)
        return self._clients[endpoint]

    def live_endpoints(self) -> list[str]:
        now = self._clock()
        return [e for e in self.source.endpoints()
                if e not in self._rejected and self._benched_until.get(e, 0.0) <= now]

    def mark_failed(self, endpoint: str) -> None:
        self._benched_until[endpoint] = self._clock() + self.cooldown_s
        self.num_failures[endpoint] = self.num_failures.get(endpoint, 0) + 1

    def mark_ok(self, endpoint: str) -> None:
        self._benched_until.pop(endpoint, None)

    def reject(self, endpoint: str) -> None:
        self._rejected.add(endpoint)

    def pick_least_loaded(self, load: Callable[[str], int], exclude: set[str] = frozenset()) -> str | None:
        candidates = [e for e in self.live_endpoints() if e not in exclude]
        if not candidates:
            return None
        # Stable tie-break by endpoint so placement is deterministic in tests.
        return min(candidates, key=lambda e: (load(e), e))

    def clients(self) -> dict[str, Client]:
        return dict(self._clients)

    def forget(self, endpoint: str) -> Client | None:
        """Drop what is known of an endpoint that left (discovery); returns its client to close."""
        self._benched_until.pop(endpoint, None)
        return self._clients.pop(endpoint, None)
