"""The real scheduler with Kubernetes discovery, end to end, against the fake API server.

Real verifier and drafter servers (tiny models) listen on their own loopback addresses with one
port per pool, as pods behind a headless Service would; the fake API server holds the Services'
EndpointSlices; the scheduler watches them with the official `kubernetes` client through a
kubeconfig. While requests stream through a real gateway, the pools scale up, a verifier turns
not-ready and ready again, the watch is cut, the API server answers 410 and the pools scale down.
Every request must complete with exactly the verifier model's greedy output.
"""

from __future__ import annotations

import asyncio
import socket


from drafter.config import DrafterConfig
from drafter.server import start_drafter
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from scheduler.config import SchedulerConfig
from scheduler.server import start_scheduler
from specmesh.client import AsyncSpecmeshClient
from tests.fake_kube_api import FakeKubeAPI, endpoint_slice
from tests.test_cluster_e2e import MAX_CONTEXT, expected, model_dirs, oracle, prompts  # noqa: F401 - fixtures
from tests.test_discovery import eventually
from verifier.config import VerifierConfig
from verifier.server import start_verifier

NAMESPACE = "specmesh"
VERIFIERS = ("127.0.0.11", "127.0.0.12")  # one pod IP each, same port: one EndpointSlice per pool
DRAFTERS = ("127.0.0.21", "127.0.0.22")
MAX_TOKENS = 200


def _port_free_on_all(hosts: tuple[str, ...]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every address")


class Pools:
    """The EndpointSlices of the two headless Services, as the EndpointSlice controller keeps them."""

    def __init__(self, fake: FakeKubeAPI, verifier_port: int, drafter_port: int) -> None:
        self.fake = fake
        self.ports = {"specmesh-verifier": verifier_port, "specmesh-drafter": drafter_port}

    def set(self, service: str, ready: dict[str, bool]) -> None:
        self.fake.apply(endpoint_slice(service, f"{service}-x7k2p", ready, self.ports[service], namespace=NAMESPACE))


async def _streams(client: AsyncSpecmeshClient, texts: list[str], started: asyncio.Event) -> list[list[int]]:
    count = {"started": 0}

    async def one(text: str) -> list[int]:
        tokens: list[int] = []
        async for delta in client.stream(prompt=text, max_tokens=MAX_TOKENS):
            if not tokens and delta.token_ids:
                count["started"] += 1
                if count["started"] == len(texts):
                    started.set()
            tokens += list(delta.token_ids)
        return tokens

    return await asyncio.gather(*(one(t) for t in texts))


async def test_scheduler_follows_endpointslices_without_failing_a_request(model_dirs, oracle, tmp_path):
    verifier_port, drafter_port = _port_free_on_all(VERIFIERS), _port_free_on_all(DRAFTERS)
    fake = FakeKubeAPI(bookmark_interval_s=0.5).start()
    services = []
    try:
        fake.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
        for host in VERIFIERS:
            services.append(await start_verifier(VerifierConfig(
                model=str(model_dirs["verifier"]), host=host, port=verifier_port, max_context=MAX_CONTEXT,
                num_slots=32, profile_batch_tokens=(1, 8))))
        for host in DRAFTERS:
            services.append(await start_drafter(DrafterConfig(
                model=str(model_dirs["drafter"]), host=host, port=drafter_port, max_context=MAX_CONTEXT,
                num_slots=32, profile_batch_sizes=(1,))))
        v0, v1 = (f"{h}:{verifier_port}" for h in VERIFIERS)
        d0, d1 = (f"{h}:{drafter_port}" for h in DRAFTERS)
        pools = Pools(fake, verifier_port, drafter_port)
        pools.set("specmesh-verifier", {VERIFIERS[0]: True, VERIFIERS[1]: False})  # v1 still loading
        pools.set("specmesh-drafter", {DRAFTERS[0]: True})
        # Another Service's slice in the namespace: the label selector must keep it out.
        fake.apply(endpoint_slice("specmesh-gateway", "specmesh-gateway-q1", {"127.0.0.99": True}, 50051))

        scheduler = await start_scheduler(SchedulerConfig(
            verifiers=(), discovery="kubernetes", verifier_service="specmesh-verifier",
            drafter_service="specmesh-drafter", namespace=NAMESPACE,
            kubeconfig=str(fake.write_kubeconfig(tmp_path / "kubeconfig")), connect_wait_s=30))
        services.append(scheduler)
        gateway = await start_gateway(GatewayConfig(model=str(model_dirs["verifier"]), scheduler=scheduler.address))
        services.append(gateway)
        coordinator = scheduler.coordinator
        verifier_pool, drafter_pool = coordinator.verifiers, coordinator.drafters.pool
        verifier_watch, drafter_watch = verifier_pool.source.inner, drafter_pool.source.inner
        assert verifier_pool.source.endpoints() == [v0] and drafter_pool.source.endpoints() == [d0]

        texts = prompts(8)
        outputs: dict[str, list[int]] = {}
        batches: list[tuple[list[str], asyncio.Task]] = []
        async with AsyncSpecmeshClient(gateway.address) as client:

            async def launch(batch: list[str]) -> None:
                started = asyncio.Event()
                task = asyncio.ensure_future(_streams(client, batch, started))
                batches.append((batch, task))
                await asyncio.wait_for(started.wait(), 60)

            def homes() -> set[str]:
                return set(coordinator._home.values())

            # 1. Scale up both pools while sessions run: newcomers get new sessions.
            await launch(texts[:4])
            assert homes() == {v0}
            pools.set("specmesh-verifier", {VERIFIERS[0]: True, VERIFIERS[1]: True})
            pools.set("specmesh-drafter", {DRAFTERS[0]: True, DRAFTERS[1]: True})
            await eventually(lambda: verifier_pool.source.endpoints() == [v0, v1], what="verifier scale-up")
            await eventually(lambda: drafter_pool.source.endpoints() == [d0, d1], what="drafter scale-up")
            await launch(texts[4:8])
            assert v1 in homes(), "a new verifier pod got no new session"
            assert d1 in set(coordinator.drafters.assignment.values()), "a new drafter pod got no session"

            # 2. v0 turns not ready (e.g. terminating): its sessions move to v1 at once.
            failovers = coordinator.num_verifier_failovers
            await launch(texts[:6])
            on_v0 = {sid for sid, home in coordinator._home.items() if home == v0}
            assert on_v0, "no session on v0 to move"
            pools.set("specmesh-verifier", {VERIFIERS[0]: False, VERIFIERS[1]: True})
            await eventually(lambda: v0 not in homes() and v0 not in coordinator._loops, what="sessions off v0")
            assert coordinator.num_verifier_failovers > failovers

            # 3. Cut the watch, with the API server down for a moment; v0 turns ready meanwhile.
            lists_before = verifier_watch.num_lists
            fake.outage = True
            fake.cut_watches()
            pools.set("specmesh-verifier", {VERIFIERS[0]: True, VERIFIERS[1]: True})
            await eventually(lambda: verifier_watch.num_failures >= 1, what="a failed reconnect")
            assert verifier_pool.source.endpoints() == [v1]  # the last known endpoints stay in use
            await launch(texts[6:8])  # requests keep working through the outage
            fake.outage = False
            await eventually(lambda: verifier_pool.source.endpoints() == [v0, v1], what="resumed watch")
            assert verifier_watch.num_lists == lists_before, "a cut watch must resume, not re-list"

            # 4. 410 Expired on the open watches, and the drafter pool shrinks meanwhile.
            await asyncio.to_thread(fake.wait_for_watches, 2)
            await launch(texts[2:8])
            drafter_failovers = coordinator.drafters.num_failovers
            assert d0 in set(coordinator.drafters.assignment.values()), "no session on d0 to move"
            expired_before = drafter_watch.num_expired
            fake.expire_watches()
            pools.set("specmesh-drafter", {DRAFTERS[1]: True})
            await eventually(lambda: drafter_pool.source.endpoints() == [d1], what="re-list after 410")
            assert drafter_watch.num_expired > expired_before and verifier_watch.num_expired >= 1
            await eventually(lambda: d0 not in set(coordinator.drafters.assignment.values()),
                             what="drafter sessions re-pinned")
            assert coordinator.drafters.num_failovers > drafter_failovers

            # 5. Scale the verifier pool down to v0 while v1 has sessions.
            await launch(texts[:8])
            assert v1 in homes()
            pools.set("specmesh-verifier", {VERIFIERS[0]: True})
            await eventually(lambda: v1 not in homes(), what="sessions off v1")

            for batch, task in batches:
                results = await asyncio.wait_for(task, 120)  # raises if any request failed
                for text, tokens in zip(batch, results):
                    outputs.setdefault(text, tokens)
                    assert tokens == outputs[text], text
        for text, tokens in outputs.items():
            assert tokens == expected(oracle, text, MAX_TOKENS), text
        assert sum(len(b) for b, _ in batches) == 30
    finally:
        for service in reversed(services):
            await service.stop()
        fake.stop()


async def test_dns_discovery_through_the_system_resolver(model_dirs, oracle):
    """--discovery dns: `localhost:PORT` stands for a headless Service's name (it resolves to
    127.0.0.1, and to ::1, which is skipped since an IPv4 address exists)."""
    verifier = await start_verifier(VerifierConfig(model=str(model_dirs["verifier"]), max_context=MAX_CONTEXT,
                                                   num_slots=32, profile_batch_tokens=(1, 8)))
    drafter = await start_drafter(DrafterConfig(model=str(model_dirs["drafter"]), max_context=MAX_CONTEXT,
                                                num_slots=32, profile_batch_sizes=(1,)))
    services = [drafter, verifier]
    try:
        scheduler = await start_scheduler(SchedulerConfig(
            verifiers=(), discovery="dns", verifier_service=f"localhost:{verifier.port}",
            drafter_service=f"localhost:{drafter.port}", dns_refresh_s=0.2, connect_wait_s=30))
        services.insert(0, scheduler)
        gateway = await start_gateway(GatewayConfig(model=str(model_dirs["verifier"]), scheduler=scheduler.address))
        services.insert(0, gateway)
        coordinator = scheduler.coordinator
        assert coordinator.verifiers.source.endpoints() == [f"127.0.0.1:{verifier.port}"]
        assert coordinator.drafters.pool.source.endpoints() == [f"127.0.0.1:{drafter.port}"]
        texts = prompts(4)
        async with AsyncSpecmeshClient(gateway.address) as client:
            results = await asyncio.gather(*(client.generate(prompt=t, max_tokens=60) for t in texts))
        for text, result in zip(texts, results):
            assert list(result.token_ids) == expected(oracle, text, 60), text
        assert sum(r.speculation.accepted_tokens for r in results) > 0  # the drafter was found and used
    finally:
        for service in services:
            await service.stop()
