"""DNS discovery: the addresses of a headless Service, re-resolved every few seconds.

A headless Service (`clusterIP: None`) resolves to one A/AAAA record per ready pod, so readiness
is the cluster DNS's business here. Simpler than watching EndpointSlices (no API access, no RBAC)
but slower to notice changes (DNS caching plus the refresh period). A failed lookup keeps the last
known addresses; NXDOMAIN (a Service with no ready pod) is an empty pool, not an outage.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

from scheduler.discovery import Backoff, WatchedEndpoints

log = logging.getLogger(__name__)

# host, port -> IP addresses; the default asks the system resolver (getaddrinfo).
Resolver = Callable[[str, int], Awaitable[list[str]]]


def split_target(target: str) -> tuple[str, int]:
    """'name:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"DNS discovery needs NAME:PORT (e.g. specmesh-verifier:50053), got {target!r}")
    return host.strip("[]"), int(port)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class DnsEndpoints(WatchedEndpoints):
    def __init__(self, target: str, refresh_s: float = 5.0, resolver: Resolver | None = None,
                 name: str | None = None, backoff: Backoff | None = None) -> None:
        super().__init__(name or f"DNS {target}")
        self.host, self.port = split_target(target)
        self.refresh_s = refresh_s
        self._resolve = resolver or system_resolver
        self.backoff = backoff or Backoff(initial_s=min(1.0, refresh_s), max_s=max(30.0, refresh_s))
        self._task: asyncio.Task | None = None
        self.num_failures = 0

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"dns-{self.host}")

    async def refresh(self) -> bool:
        """Resolve once; True when the answer was used (found, or definitely no such name)."""
        try:
            addresses = await self._resolve(self.host, self.port)
        except socket.gaierror as error:
            if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                addresses = []  # the Service exists but has no ready pod (or no such Service)
            else:
                return self._failed(error)
        except OSError as error:
            return self._failed(error)
        # IPv4 when there is any, so a dual-stack pod is not counted twice.
        v4 = [a for a in addresses if ":" not in a]
        chosen = v4 or addresses
        self._publish(f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}" for a in chosen)
        self.backoff.reset()
        return True

    def _failed(self, error: BaseException) -> bool:
        self.num_failures += 1
        log.warning("%s: lookup failed (%s); keeping %d known endpoints", self.name, error, len(self.endpoints()))
        return False

    async def _run(self) -> None:
        ok = self.synced.is_set()  # start() has just tried once
        while True:
            await asyncio.sleep(self.refresh_s if ok else self.backoff.next_delay())
            ok = await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
