"""Kubernetes discovery: watch the EndpointSlices of a Service with the official `kubernetes` client.

The informer pattern, for one Service: list the slices labelled
`kubernetes.io/service-name=<service>`, then watch from the list's resourceVersion (with
bookmarks, so a quiet Service still advances it). A watch that ends or breaks resumes from the
last resourceVersion seen; 410 Gone (history compacted) means list again; any other failure
retries with exponential backoff, keeping the last known endpoints meanwhile. An endpoint counts
only while its `conditions.ready` is not false (a terminating pod is not ready), on the port named
`--grpc-port-name` (or the only port).

The client is synchronous (urllib3), so each watcher runs in its own thread and hands every new
endpoint list to the event loop. Objects are read as plain JSON, not the client's typed models:
the API serves an empty slice as `"endpoints": null`, which the typed model refuses.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
from dataclasses import dataclass
from typing import Any, Callable

from scheduler.discovery import Backoff, WatchedEndpoints

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass
class KubernetesConfig:
    api_client_factory: Callable[[], Any]  # -> kubernetes.client.ApiClient (one per watcher thread)
    namespace: str  # the pod's namespace in-cluster, else the kubeconfig context's


def load_kubernetes_config(kubeconfig: str | None = None) -> KubernetesConfig:
    """In-cluster config (the pod's ServiceAccount) unless a kubeconfig is named; without either,
    the usual $KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    configuration = client.Configuration()
    namespace = "default"
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
        try:
            with open(IN_CLUSTER_NAMESPACE_FILE) as file:
                namespace = file.read().strip() or namespace
        except OSError:
            pass
    else:
        # $KUBECONFIG read now, not when the client was imported (it may be a list of files).
        kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = (active or {}).get("context", {}).get("namespace") or namespace
        except (config.ConfigException, OSError):
            pass
    return KubernetesConfig(lambda: client.ApiClient(configuration), namespace)


def _format(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def slice_endpoints(endpoint_slice: dict, port_name: str) -> list[str]:
    """host:port of the ready endpoints of one EndpointSlice (a JSON object)."""
    ports = endpoint_slice.get("ports") or []
    if port_name:
        port = next((p for p in ports if (p.get("name") or "") == port_name), None)
    else:
        port = ports[0] if len(ports) == 1 else None
    if port is None or port.get("port") is None:
        return []
    found = []
    for endpoint in endpoint_slice.get("endpoints") or []:
        # `ready` unset means unknown, which consumers should take as ready (API docs).
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        addresses = endpoint.get("addresses") or []
        if addresses:  # all addresses of an endpoint are the same pod: the first is enough
            found.append(_format(addresses[0], int(port["port"])))
    return found


def service_endpoints(slices: dict[str, dict], port_name: str) -> list[str]:
    """Every ready endpoint of a Service from all its slices. A dual-stack Service has IPv4 and
    IPv6 slices for the same pods: take one family (IPv4 when there is any) so no pod counts twice."""
    by_type: dict[str, list[dict]] = {}
    for endpoint_slice in slices.values():
        by_type.setdefault(endpoint_slice.get("addressType") or "IPv4", []).append(endpoint_slice)
    for address_type in ("IPv4", "IPv6", "FQDN"):
        if address_type in by_type:
            return sorted({e for s in by_type[address_type] for e in slice_endpoints(s, port_name)})
    return []


class ResourceExpired(Exception):
    """410 Gone: the resourceVersion we would resume from is no longer in the server's history."""


class EndpointSliceWatcher(WatchedEndpoints):
    def __init__(self, api_client_factory: Callable[[], Any], namespace: str, service: str, *,
                 port_name: str = "grpc", name: str | None = None, watch_timeout_s: float = 300.0,
                 request_timeout_s: float = 10.0, backoff: Backoff | None = None) -> None:
        super().__init__(name or f"Service {namespace}/{service}")
        self.namespace = namespace
        self.service = service
        self.port_name = port_name
        self.watch_timeout_s = watch_timeout_s  # the server ends each watch after about this long
        self.request_timeout_s = request_timeout_s  # connect timeout, and the read timeout of lists
        self.backoff = backoff or Backoff()
        self._api_client_factory = api_client_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._watch = None  # the kubernetes.watch.Watch in progress (stopped on close)
        self.resource_version: str | None = None
        self.num_lists = 0
        self.num_watches = 0
        self.num_expired = 0  # 410s: history compacted, re-listed
        self.num_failures = 0  # lists or watches that failed (retried with backoff)

    @property
    def label_selector(self) -> str:
        return f"{SERVICE_NAME_LABEL}={self.service}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"endpointslices-{self.service}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stopping.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # shuts the socket down, so a blocked read returns now
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    # ---- the watcher thread ------------------------------------------------------------------
    def _run(self) -> None:
        from kubernetes import client

        api_client = self._api_client_factory()
        api = client.DiscoveryV1Api(api_client)
        slices: dict[str, dict] = {}
        try:
            while not self._stopping.is_set():
                try:
                    if self.resource_version is None:
                        slices = self._list(api)
                        self._hand_over(slices)
                    self._watch_once(api, slices)
                    self.backoff.reset()  # the watch ran and ended normally: resume at once
                except ResourceExpired:
                    self.num_expired += 1
                    log.info("%s: resourceVersion %s expired (410); listing again", self.name, self.resource_version)
                    self.resource_version = None
                except Exception as error:  # noqa: BLE001 - any failure: keep the last endpoints, retry
                    if self._stopping.is_set():
                        break
                    if _status(error) == 410:
                        self.num_expired += 1
                        log.info("%s: resourceVersion %s expired (410); listing again", self.name,
                                 self.resource_version)
                        self.resource_version = None
                        continue
                    self.num_failures += 1
                    delay = self.backoff.next_delay()
                    log.warning("%s: %s; keeping %d known endpoints, retrying in %.1f s", self.name,
                                _describe(error), len(self.endpoints()), delay)
                    self._stopping.wait(delay)
        finally:
            api_client.close()

    def _list(self, api) -> dict[str, dict]:
        import json

        response = api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.label_selector, _preload_content=False,
            _request_timeout=self.request_timeout_s)
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        self.num_lists += 1
        self.resource_version = body["metadata"]["resourceVersion"]
        return {item["metadata"]["name"]: item for item in body.get("items") or []}

    def _watch_once(self, api, slices: dict[str, dict]) -> None:
        from kubernetes import watch

        # "object": events come back as plain dicts (see the module docstring).
        self._watch = watch.Watch(return_type="object")
        # Spread the reconnects of many schedulers; the read timeout catches a silent dead peer.
        timeout_s = int(self.watch_timeout_s * random.uniform(1.0, 1.2)) or 1
        self.num_watches += 1
        try:
            stream = self._watch.stream(
                api.list_namespaced_endpoint_slice, self.namespace, label_selector=self.label_selector,
                resource_version=self.resource_version, allow_watch_bookmarks=True, timeout_seconds=timeout_s,
                _request_timeout=(self.request_timeout_s, timeout_s + 30))
            for event in stream:
                if self._stopping.is_set():
                    return
                kind, obj = event["type"], event["raw_object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise ResourceExpired(obj.get("message", ""))
                    raise RuntimeError(f"watch error: {obj.get('reason')}: {obj.get('message')}")
                self.resource_version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    slices.pop(obj["metadata"]["name"], None)
                else:  # ADDED, MODIFIED
                    slices[obj["metadata"]["name"]] = obj
                self._hand_over(slices)
        finally:
            self._watch = None

    def _hand_over(self, slices: dict[str, dict]) -> None:
        endpoints = service_endpoints(slices, self.port_name)
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._publish, endpoints)
            except RuntimeError:  # the loop closed meanwhile
                pass


def _status(error: BaseException) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


def _describe(error: BaseException) -> str:
    status = _status(error)
    if status:
        return f"API server answered {status} {getattr(error, 'reason', '')}".strip()
    return f"{type(error).__name__}: {error}"
