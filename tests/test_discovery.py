"""Scheduler discovery without models: the EndpointSlice watcher (the real `kubernetes` client
through a kubeconfig, against the fake API server on loopback), DNS of a headless Service, and
the vetting of newcomers.
"""

from __future__ import annotations

import asyncio
import socket
from urllib.parse import parse_qs, urlsplit

import pytest

from scheduler.discovery import Backoff, VettedEndpoints, WatchedEndpoints
from scheduler.discovery_dns import DnsEndpoints, split_target
from scheduler.discovery_kubernetes import (
    EndpointSliceWatcher,
    load_kubernetes_config,
    service_endpoints,
    slice_endpoints,
)
from tests.fake_kube_api import FakeKubeAPI, endpoint_slice, label_selector_matches

NAMESPACE = "specmesh"


async def eventually(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def fake():
    api = FakeKubeAPI(bookmark_interval_s=0.3).start()
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    yield api
    api.stop()


@pytest.fixture
def kube(fake, tmp_path):
    return load_kubernetes_config(str(fake.write_kubeconfig(tmp_path / "kubeconfig", namespace=NAMESPACE)))


def watch_requests(fake: FakeKubeAPI, service: str) -> list[dict[str, str]]:
    found = []
    for method, path in list(fake.requests):
        query = {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}
        if method == "GET" and "endpointslices" in path and query.get("watch") == "true" and \
                query.get("labelSelector") == f"kubernetes.io/service-name={service}":
            found.append(query)
    return found


def test_slice_parsing_follows_the_api_semantics():
    ready = endpoint_slice("v", "v-1", {"10.0.0.1": True, "10.0.0.2": False}, 50053)
    ready["endpoints"].append({"addresses": ["10.0.0.3"], "conditions": {}})  # unknown = ready
    ready["endpoints"].append({"addresses": ["10.0.0.4", "10.0.0.5"]})  # first address only
    assert slice_endpoints(ready, "grpc") == ["10.0.0.1:50053", "10.0.0.3:50053", "10.0.0.4:50053"]
    assert slice_endpoints(ready, "http") == []  # no such port
    assert slice_endpoints(ready, "") == slice_endpoints(ready, "grpc")  # the only port
    empty = endpoint_slice("v", "v-2", {}, 50053)
    assert empty["endpoints"] is None and slice_endpoints(empty, "grpc") == []
    v6 = endpoint_slice("v", "v-3", {"fd00::1": True}, 50053)
    v6["addressType"] = "IPv6"
    assert slice_endpoints(v6, "grpc") == ["[fd00::1]:50053"]
    # Dual stack: the same pods in both families count once (IPv4).
    assert service_endpoints({"a": ready, "b": v6}, "grpc") == slice_endpoints(ready, "grpc")
    assert service_endpoints({"b": v6}, "grpc") == ["[fd00::1]:50053"]


def test_fake_label_selectors():
    labels = {"app": "x", "tier": "gpu"}
    assert label_selector_matches("app=x", labels) and label_selector_matches("app==x,tier", labels)
    assert not label_selector_matches("app!=x", labels) and label_selector_matches("!missing", labels)
    assert label_selector_matches("tier in (cpu, gpu)", labels)
    assert not label_selector_matches("tier notin (gpu),app=x", labels)
    assert label_selector_matches("", labels)


async def test_watcher_follows_scale_readiness_and_other_services_stay_out(fake, kube):
    fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True, "10.0.0.2": False}, 50053))
    fake.apply(endpoint_slice("drafter", "drafter-a", {"10.0.1.1": True}, 50054))
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=30)
    changes = []
    watcher.subscribe(lambda: changes.append(watcher.endpoints()))
    await watcher.start()
    try:
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053"], what="initial list")
        assert kube.namespace == NAMESPACE
        # Scale up: a second slice, then readiness of a pending pod.
        fake.apply(endpoint_slice("verifier", "verifier-b", {"10.0.0.3": True}, 50053))
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053", "10.0.0.3:50053"], what="scale up")
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True, "10.0.0.2": True}, 50053))
        await eventually(lambda: "10.0.0.2:50053" in watcher.endpoints(), what="became ready")
        # Readiness lost (terminating) and scale down (slice emptied, then deleted).
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": False, "10.0.0.2": True}, 50053,
                                  terminating=frozenset({"10.0.0.1"})))
        await eventually(lambda: "10.0.0.1:50053" not in watcher.endpoints(), what="not ready")
        fake.apply(endpoint_slice("verifier", "verifier-b", {}, 50053))
        await eventually(lambda: watcher.endpoints() == ["10.0.0.2:50053"], what="empty slice")
        fake.delete_object("discovery.k8s.io/v1", "EndpointSlice", "verifier-a", NAMESPACE)
        await eventually(lambda: watcher.endpoints() == [], what="slice deleted")
        # The drafter Service's slices never showed up here.
        assert all("10.0.1.1:50054" not in c for c in changes)
        # One list, then one long watch from its resourceVersion, with bookmarks asked for.
        assert watcher.num_lists == 1 and watcher.num_failures == 0
        first = watch_requests(fake, "verifier")[0]
        assert first["allowWatchBookmarks"] == "true" and first["resourceVersion"] and "timeoutSeconds" in first
    finally:
        await watcher.close()


async def test_bookmarks_advance_the_resource_version(fake, kube):
    fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True}, 50053))
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=30)
    await watcher.start()
    try:
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053"])
        listed = int(watcher.resource_version)
        # Objects of another Service change: no event for us, but bookmarks carry the new version.
        for i in range(3):
            fake.apply(endpoint_slice("other", f"other-{i}", {f"10.9.0.{i}": True}, 1))
        await eventually(lambda: int(watcher.resource_version) >= fake.resource_version, what="bookmark")
        assert int(watcher.resource_version) > listed and watcher.num_lists == 1
    finally:
        await watcher.close()


async def test_cut_watch_resumes_from_the_last_resource_version(fake, kube):
    fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True}, 50053))
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=30,
                                   backoff=Backoff(initial_s=0.05, max_s=0.2))
    await watcher.start()
    try:
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053"])
        await asyncio.to_thread(fake.wait_for_watches, 1)
        seen = watcher.resource_version
        assert fake.cut_watches() == 1
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True, "10.0.0.2": True}, 50053))
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053", "10.0.0.2:50053"], what="resume")
        assert watcher.num_lists == 1  # resumed, not re-listed
        resumed = watch_requests(fake, "verifier")[1]
        assert int(resumed["resourceVersion"]) >= int(seen)
    finally:
        await watcher.close()


async def test_410_on_an_open_watch_and_on_resume_means_list_again(fake, kube):
    fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True}, 50053))
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=30,
                                   backoff=Backoff(initial_s=0.05, max_s=0.2))
    await watcher.start()
    try:
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053"])
        await asyncio.to_thread(fake.wait_for_watches, 1)
        # 1) ERROR 410 Expired on the open watch.
        fake.expire_watches()
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.2": True}, 50053))
        await eventually(lambda: watcher.endpoints() == ["10.0.0.2:50053"], what="re-list after ERROR 410")
        assert watcher.num_expired >= 1 and watcher.num_lists >= 2
        # 2) The watch breaks while the API server is down; history is compacted meanwhile, so
        #    the resume is refused with HTTP 410 and the watcher lists again.
        await asyncio.to_thread(fake.wait_for_watches, 1)
        expired_before, lists_before = watcher.num_expired, watcher.num_lists
        fake.outage = True
        fake.cut_watches()
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.3": True}, 50053))
        fake.compact()
        await eventually(lambda: watcher.num_failures >= 1, what="a failed reconnect")
        assert watcher.endpoints() == ["10.0.0.2:50053"]  # last known, kept through the outage
        fake.outage = False
        await eventually(lambda: watcher.endpoints() == ["10.0.0.3:50053"], what="re-list after HTTP 410")
        assert watcher.num_expired > expired_before and watcher.num_lists > lists_before
    finally:
        await watcher.close()


async def test_outage_keeps_the_last_endpoints_and_backs_off(fake, kube):
    fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True}, 50053))
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=30,
                                   backoff=Backoff(initial_s=0.05, max_s=0.4))
    await watcher.start()
    try:
        await eventually(lambda: watcher.endpoints() == ["10.0.0.1:50053"])
        await asyncio.to_thread(fake.wait_for_watches, 1)
        fake.outage = True
        fake.cut_watches()
        await asyncio.sleep(1.0)
        failures = watcher.num_failures
        assert failures >= 2 and watcher.endpoints() == ["10.0.0.1:50053"]
        assert failures < 20  # backed off, not a hot loop
        fake.outage = False
        fake.apply(endpoint_slice("verifier", "verifier-a", {"10.0.0.1": True, "10.0.0.9": True}, 50053))
        await eventually(lambda: "10.0.0.9:50053" in watcher.endpoints(), what="recovery")
    finally:
        await watcher.close()


async def test_watcher_close_is_prompt(fake, kube):
    watcher = EndpointSliceWatcher(kube.api_client_factory, kube.namespace, "verifier", watch_timeout_s=300)
    await watcher.start()
    await asyncio.to_thread(fake.wait_for_watches, 1)
    started = asyncio.get_running_loop().time()
    await watcher.close()
    assert asyncio.get_running_loop().time() - started < 2.0
    assert not watcher._thread.is_alive()


# ---- DNS ----------------------------------------------------------------------------------------
async def test_dns_follows_answers_and_keeps_the_last_on_failure():
    answers: list = [["10.1.0.2", "10.1.0.1", "10.1.0.1"]]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("specmesh-verifier", 50053)
        answer = answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    source = DnsEndpoints("specmesh-verifier:50053", refresh_s=0.05, resolver=resolver,
                          backoff=Backoff(initial_s=0.05, max_s=0.1))
    await source.start()
    try:
        assert source.endpoints() == ["10.1.0.1:50053", "10.1.0.2:50053"]
        answers[0] = ["10.1.0.1", "fd00::1"]  # dual stack: IPv4 wins
        await eventually(lambda: source.endpoints() == ["10.1.0.1:50053"])
        answers[0] = socket.gaierror(socket.EAI_AGAIN, "temporary failure")
        await eventually(lambda: source.num_failures >= 2)
        assert source.endpoints() == ["10.1.0.1:50053"]
        answers[0] = socket.gaierror(socket.EAI_NONAME, "no such name")  # no ready pod at all
        await eventually(lambda: source.endpoints() == [])
        answers[0] = ["fd00::2"]
        await eventually(lambda: source.endpoints() == ["[fd00::2]:50053"])
    finally:
        await source.close()


async def test_dns_with_the_system_resolver():
    source = DnsEndpoints("127.0.0.1:50999", refresh_s=10)
    await source.start()
    await source.close()
    assert source.endpoints() == ["127.0.0.1:50999"]
    with pytest.raises(ValueError):
        split_target("specmesh-verifier")


# ---- vetting ------------------------------------------------------------------------------------
class ListSource(WatchedEndpoints):
    def __init__(self) -> None:
        super().__init__("list")

    def set(self, endpoints: list[str]) -> None:
        self._publish(endpoints)

    async def start(self) -> None:
        self.set([])

    async def close(self) -> None:
        pass


async def test_newcomers_are_used_once_checked_and_leavers_go_at_once():
    inner = ListSource()
    verdicts = {"a": True, "b": None, "c": False}
    calls: list[str] = []

    async def check(endpoint: str):
        calls.append(endpoint)
        return verdicts[endpoint]

    vetted = VettedEndpoints(inner, check, retry_s=0.02)
    await vetted.start()
    inner.set(["a", "b", "c"])
    await eventually(lambda: vetted.endpoints() == ["a"])
    await eventually(lambda: calls.count("b") >= 3)  # not answering yet: asked again
    verdicts["b"] = True
    await eventually(lambda: vetted.endpoints() == ["a", "b"])
    assert calls.count("c") == 1  # refused once, not asked again while it stays
    inner.set(["b", "c"])
    assert vetted.endpoints() == ["b"]  # a removal needs no check
    inner.set(["b"])
    verdicts["c"] = True
    inner.set(["b", "c"])  # back at the same address: checked afresh
    await eventually(lambda: vetted.endpoints() == ["b", "c"])
    await vetted.close()


def test_scheduler_flags_for_discovery(tmp_path):
    from scheduler.config import SchedulerConfig

    with pytest.raises(ValueError, match="verifier-service"):
        SchedulerConfig(verifiers=(), discovery="kubernetes")
    with pytest.raises(ValueError, match="discovery must be"):
        SchedulerConfig(verifiers=("a:1",), discovery="consul")
    with pytest.raises(ValueError, match="at least one verifier"):
        SchedulerConfig(verifiers=())
    config = SchedulerConfig(verifiers=(), discovery="dns", verifier_service="specmesh-verifier:50053")
    assert config.drafter_service == "" and config.grpc_port_name == "grpc"

    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "specmesh.cli", "serve", "scheduler", "--discovery", "kubernetes"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--verifier-service" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "specmesh.cli", "serve", "scheduler", "--help"],
                               capture_output=True, text=True, timeout=60).stdout
    for flag in ("--discovery", "--verifier-service", "--drafter-service", "--namespace", "--grpc-port-name",
                 "--kubeconfig"):
        assert flag in help_text, flag


def test_kubeconfig_context_namespace_and_in_cluster_fallback(fake, tmp_path, monkeypatch):
    path = fake.write_kubeconfig(tmp_path / "kubeconfig", namespace="team-a")
    assert load_kubernetes_config(str(path)).namespace == "team-a"
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = load_kubernetes_config(None)  # no in-cluster environment: the usual kubeconfig
    assert kube.namespace == "team-a"
    kube.api_client_factory().close()
