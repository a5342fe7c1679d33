"""A fake Kubernetes API server on loopback, speaking the real HTTP wire format.

What real clients need from it: `kubectl apply -f deploy/` (discovery, OpenAPI v3 index, get,
create with strict field validation, an unchanged second apply, get/list) and the scheduler's
EndpointSlice discovery through the official `kubernetes` client (list, watch from a
resourceVersion, label selectors, chunked watch streams, bookmarks, 410 Expired both as an HTTP
status on a stale resume and as an ERROR event on an open watch). Test controls break it on
purpose: cut every open watch without ending its stream, answer 503 to everything for a while
(`outage`), compact the history so stale resumes get 410, send ERROR 410 on open watches.

Assumptions, which a real API server does not share:
- no authentication, no authorization (RBAC is never enforced), no admission and no defaulting:
  objects are stored as sent plus metadata (uid, resourceVersion, generation, creationTimestamp);
  the one admission rule kept is NamespaceLifecycle's, so that order matters: a namespaced
  object cannot be created before its namespace exists;
- no controllers: nothing creates Pods, EndpointSlices or ReplicaSets; tests write
  EndpointSlices themselves (`endpoint_slice`) as the EndpointSlice controller would;
- one in-memory store with one integer resourceVersion counter; the history is never trimmed
  (compaction only refuses watches that start from before it);
- strict field validation (kubectl's default) is checked against the 1.33 schemas bundled with
  kubernetes-validate; the OpenAPI v3 documents hold no schemas, so kubectl computes apply
  patches from its compiled-in types;
- a strategic merge patch is applied like a JSON merge patch when it has no lists and no
  $directives, and refused (415) otherwise; JSON merge patch works; JSON patch does not;
- JSON only (no protobuf or CBOR), plain HTTP, field selectors ignored, no server-side apply.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:  # what NotFound messages call it ("deployments.apps")
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES = (
    Resource("", "v1", "namespaces", "Namespace", False),
    Resource("", "v1", "configmaps", "ConfigMap", True),
    Resource("", "v1", "secrets", "Secret", True),
    Resource("", "v1", "services", "Service", True),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", True),
    Resource("", "v1", "pods", "Pod", True),
    Resource("apps", "v1", "deployments", "Deployment", True),
    Resource("apps", "v1", "statefulsets", "StatefulSet", True),
    Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True),
    Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True),
    Resource("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    Resource("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
)
SHORT_NAMES = {"namespaces": ["ns"], "configmaps": ["cm"], "services": ["svc"], "serviceaccounts": ["sa"],
               "pods": ["po"], "deployments": ["deploy"], "statefulsets": ["sts"], "horizontalpodautoscalers": ["hpa"],
               "poddisruptionbudgets": ["pdb"]}
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

Key = tuple[str, str, str]  # (group/version/plural, namespace or "", name)


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


def _not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.qualified} "{name}" not found',
                    {"name": name, "group": resource.group, "kind": resource.plural})


# ---- label selectors (the string form: a=b, a!=b, a, !a, a in (x,y), a notin (x,y)) -------
_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def label_selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for requirement in _split_requirements(selector or ""):
        match = _SET_RE.match(requirement)
        if match:
            key, op, values = match.group(1), match.group(2), {v.strip() for v in match.group(3).split(",")}
            if (op == "in") != (key in labels and labels[key] in values):
                return False
        elif "!=" in requirement:
            key, value = (s.strip() for s in requirement.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in requirement:
            key, value = (s.strip() for s in requirement.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif requirement.startswith("!"):
            if requirement[1:].strip() in labels:
                return False
        elif requirement not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class _Watch:
    """One open watch stream: what a test control asks of it."""

    connection: socket.socket
    cut: bool = False  # drop the connection without ending the chunked stream
    expire: bool = False  # send ERROR 410 Expired, then end the stream


@dataclass
class _Event:
    resource_version: int
    type: str
    key: Key
    obj: dict


@dataclass
class FakeKubeAPI:
    """Start with `start()`; `url` is the server; `write_kubeconfig()` points clients at it."""

    bookmark_interval_s: float = 1.0
    host: str = "127.0.0.1"
    _objects: dict[Key, dict] = field(default_factory=dict)
    _history: list[_Event] = field(default_factory=list)
    _rv: int = 100
    _compacted_rv: int = 0  # watches from an older resourceVersion get 410 Expired
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _watches: list[_Watch] = field(default_factory=list)
    _connections: set = field(default_factory=set)
    outage: bool = False  # every request is answered 503 while set
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path?query)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # ---- life cycle ----------------------------------------------------------------------------
    def start(self) -> "FakeKubeAPI":
        api = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request, client_address):
                with api._lock:
                    api._connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with api._lock:
                    api._connections.discard(request)
                super().shutdown_request(request)

        class Handler(_Handler):
            fake = api

        self._server = Server((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-kube-api", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            for watch in self._watches:
                watch.cut = True
            connections = list(self._connections)
            self._lock.notify_all()
        for connection in connections:
            _shutdown(connection)
        self._server.server_close()
        self._server = None

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
        }))
        return path

    # ---- the store, for tests (the same operations the HTTP verbs use) -----------------------
    @property
    def resource_version(self) -> int:
        return self._rv

    def resource(self, api_version: str, kind: str) -> Resource:
        for resource in RESOURCES:
            if resource.group_version == api_version and resource.kind == kind:
                return resource
        raise KeyError(f"{api_version} {kind} is not served by the fake")

    def objects(self, kind: str | None = None) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for o in self._objects.values() if kind is None or o.get("kind") == kind]

    def get(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict | None:
        resource = self.resource(api_version, kind)
        with self._lock:
            obj = self._objects.get(self._key(resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def apply(self, obj: dict) -> dict:
        """Create the object, or replace it (ignoring resourceVersion), as a controller would."""
        resource = self.resource(obj["apiVersion"], obj["kind"])
        namespace = obj["metadata"].get("namespace", "") if resource.namespaced else ""
        with self._lock:
            if self._key(resource, namespace, obj["metadata"]["name"]) in self._objects:
                body = copy.deepcopy(obj)
                body["metadata"].pop("resourceVersion", None)
                return self.replace(resource, namespace, obj["metadata"]["name"], body)
            return self.create(resource, namespace, copy.deepcopy(obj))

    def delete_object(self, api_version: str, kind: str, name: str, namespace: str = "") -> dict:
        return self.delete(self.resource(api_version, kind), namespace, name)

    def create(self, resource: Resource, namespace: str, body: dict) -> dict:
        metadata = body.setdefault("metadata", {})
        name = metadata.get("name") or ""
        if not name and metadata.get("generateName"):
            name = metadata["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if resource.namespaced:
            if metadata.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            metadata["namespace"] = namespace
        with self._lock:
            if resource.namespaced and self._key(self.resource("v1", "Namespace"), "", namespace) not in self._objects:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            key = self._key(resource, namespace, name)
            if key in self._objects:
                raise ApiError(409, "AlreadyExists", f'{resource.qualified} "{name}" already exists',
                               {"name": name, "group": resource.group, "kind": resource.plural})
            body["apiVersion"], body["kind"] = resource.group_version, resource.kind
            metadata.update(name=name, uid=str(uuid.uuid4()), generation=1,
                            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            return self._record("ADDED", key, body)

    def replace(self, resource: Resource, namespace: str, name: str, body: dict) -> dict:
        with self._lock:
            key = self._key(resource, namespace, name)
            current = self._objects.get(key)
            if current is None:
                raise _not_found(resource, name)
            wanted_rv = body.get("metadata", {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.qualified} "{name}": '
                                                "the object has been modified; please apply your changes to the "
                                                "latest version and try again")
            body = copy.deepcopy(body)
            body["apiVersion"], body["kind"] = resource.group_version, resource.kind
            metadata = body.setdefault("metadata", {})
            for preserved in ("uid", "creationTimestamp", "namespace", "name"):
                if preserved in current["metadata"]:
                    metadata[preserved] = current["metadata"][preserved]
            generation = current["metadata"].get("generation", 1)
            if body.get("spec") != current.get("spec"):
                generation += 1
            metadata["generation"] = generation
            return self._record("MODIFIED", key, body)

    def delete(self, resource: Resource, namespace: str, name: str) -> dict:
        with self._lock:
            key = self._key(resource, namespace, name)
            if key not in self._objects:
                raise _not_found(resource, name)
            return self._record("DELETED", key, copy.deepcopy(self._objects[key]))

    def list(self, resource: Resource, namespace: str, selector: str) -> tuple[list[dict], int]:
        with self._lock:
            return [copy.deepcopy(o) for k, o in sorted(self._objects.items())
                    if self._matches(resource, namespace, selector, k, o)], self._rv

    # ---- test controls -------------------------------------------------------------------------
    def num_open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_for_watches(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._watches) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._watches)} open watches, wanted {count}")
                self._lock.wait(remaining)

    def cut_watches(self) -> int:
        """Drop every open watch connection abruptly (no end of the chunked stream)."""
        with self._lock:
            watches = list(self._watches)
            for watch in watches:
                watch.cut = True
            self._lock.notify_all()
        for watch in watches:
            _shutdown(watch.connection)
        return len(watches)

    def compact(self) -> None:
        """Forget the history so far: a watch that resumes from an older resourceVersion gets 410."""
        with self._lock:
            self._compacted_rv = self._rv  # (open watches keep streaming, as from a watch cache)

    def expire_watches(self) -> int:
        """Compact, and answer every open watch with ERROR 410 Expired (the client must re-list)."""
        with self._lock:
            self._compacted_rv = self._rv  # a fresh list's resourceVersion stays valid to watch from
            for watch in self._watches:
                watch.expire = True
            self._lock.notify_all()
            return len(self._watches)

    # ---- internals -----------------------------------------------------------------------------
    @staticmethod
    def _key(resource: Resource, namespace: str, name: str) -> Key:
        return (f"{resource.group_version}/{resource.plural}", namespace if resource.namespaced else "", name)

    @staticmethod
    def _matches(resource: Resource, namespace: str, selector: str, key: Key, obj: dict) -> bool:
        if key[0] != f"{resource.group_version}/{resource.plural}":
            return False
        if namespace and key[1] != namespace:
            return False
        return label_selector_matches(selector, obj.get("metadata", {}).get("labels") or {})

    def _record(self, event_type: str, key: Key, obj: dict) -> dict:
        # Caller holds the lock.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event_type == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj
        self._history.append(_Event(self._rv, event_type, key, copy.deepcopy(obj)))
        self._lock.notify_all()
        return copy.deepcopy(obj)


def _needs_merge_keys(patch: Any) -> bool:
    """A strategic merge patch the plain merge patch rules would get wrong: one with lists
    (merged by key in a strategic patch) or $directives."""
    if isinstance(patch, list):
        return True
    if isinstance(patch, dict):
        return any(k.startswith("$") or _needs_merge_keys(v) for k, v in patch.items())
    return False


def _shutdown(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _discovery_documents() -> dict[str, dict]:
    groups: dict[str, list[Resource]] = {}
    for resource in RESOURCES:
        groups.setdefault(resource.group_version, []).append(resource)
    docs: dict[str, dict] = {
        "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"},
        "/api": {"kind": "APIVersions", "versions": ["v1"],
                 "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": group_version.split("/")[0],
             "versions": [{"groupVersion": group_version, "version": group_version.split("/")[1]}],
             "preferredVersion": {"groupVersion": group_version, "version": group_version.split("/")[1]}}
            for group_version in groups if "/" in group_version]},
    }
    for group_version, resources in groups.items():
        path = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        docs[path] = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": [
            {"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced, "kind": r.kind,
             "verbs": VERBS if r.plural != "namespaces" else [v for v in VERBS if v != "deletecollection"],
             **({"shortNames": SHORT_NAMES[r.plural]} if r.plural in SHORT_NAMES else {})}
            for r in resources]}
    return docs


def _openapi_v3_documents() -> dict[str, dict]:
    """Just enough OpenAPI v3 for kubectl: one document per group/version whose PATCH
    operations declare the `fieldValidation` query parameter, so that `kubectl apply` (whose
    default is --validate=strict) leaves validation to the server instead of downloading
    schemas. There are no schemas in it: kubectl then computes apply patches from its own types."""
    docs: dict[str, dict] = {}
    index: dict[str, dict] = {}
    for resource in RESOURCES:
        root = "api/v1" if resource.group_version == "v1" else f"apis/{resource.group_version}"
        index[root] = {"serverRelativeURL": f"/openapi/v3/{root}?hash=fake"}
        doc = docs.setdefault(f"/openapi/v3/{root}", {
            "openapi": "3.0.0", "info": {"title": "Kubernetes (fake)", "version": "v1.33.0"},
            "paths": {}, "components": {"schemas": {}}})
        scope = "/namespaces/{namespace}" if resource.namespaced else ""
        doc["paths"][f"/{root}{scope}/{resource.plural}/{{name}}"] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": resource.group, "version": resource.version,
                                                "kind": resource.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}}}}
    docs["/openapi/v3"] = {"paths": index}
    return docs


DISCOVERY = {**_discovery_documents(), **_openapi_v3_documents()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeKubeAPI

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---- plumbing --------------------------------------------------------------------------------
    def _send_json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except json.JSONDecodeError:
            raise ApiError(400, "BadRequest", "the request body is not JSON (the fake speaks JSON only)") from None

    def _route(self) -> tuple[Resource, str, str | None, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        segments = [s for s in parts.path.split("/") if s]
        if segments[:2] == ["api", "v1"]:
            group_version, rest = "v1", segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group_version, rest = f"{segments[1]}/{segments[2]}", segments[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        for resource in RESOURCES:
            if resource.group_version == group_version and resource.plural == rest[0]:
                if namespace and not resource.namespaced:
                    break
                return resource, namespace, rest[1] if len(rest) == 2 else None, query
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _handle(self, method: str) -> None:
        self.fake.requests.append((method, self.path))
        try:
            if self.fake.outage:
                raise ApiError(503, "ServiceUnavailable", "the fake API server is in an outage")
            path = urlsplit(self.path).path.rstrip("/") or "/"
            if method == "GET" and path in DISCOVERY:
                self._send_json(200, DISCOVERY[path])
                return
            resource, namespace, name, query = self._route()
            fake = self.fake
            if method == "GET" and name is not None:
                obj = fake.get(resource.group_version, resource.kind, name, namespace)
                if obj is None:
                    raise _not_found(resource, name)
                self._send_json(200, obj)
            elif method == "GET" and query.get("watch", [""])[0] in ("true", "1"):
                self._watch(resource, namespace, query)
            elif method == "GET":
                items, rv = fake.list(resource, namespace, query.get("labelSelector", [""])[0])
                for item in items:  # items of a typed list carry no kind/apiVersion
                    item.pop("kind", None)
                    item.pop("apiVersion", None)
                self._send_json(200, {"kind": f"{resource.kind}List", "apiVersion": resource.group_version,
                                      "metadata": {"resourceVersion": str(rv)}, "items": items})
            elif method == "POST" and name is None:
                body = self._read_body()
                self._check_kind(resource, body)
                self._validate(body, query)
                self._send_json(201, fake.create(resource, namespace, body))
            elif method == "PUT" and name is not None:
                body = self._read_body()
                self._check_kind(resource, body)
                self._validate(body, query)
                self._send_json(200, fake.replace(resource, namespace, name, body))
            elif method == "PATCH" and name is not None:
                patch = self._read_body()
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if content_type == "application/strategic-merge-patch+json" and _needs_merge_keys(patch):
                    raise ApiError(415, "UnsupportedMediaType", "the fake merges strategic patches of maps and "
                                                                "scalars only (no lists, no $directives)")
                if content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    raise ApiError(415, "UnsupportedMediaType", f"the fake does not implement {content_type}")
                with fake._lock:
                    current = fake.get(resource.group_version, resource.kind, name, namespace)
                    if current is None:
                        raise _not_found(resource, name)
                    patched = merge_patch(current, patch)
                    if patched == current:  # a no-op patch writes nothing (no new resourceVersion)
                        self._send_json(200, current)
                    else:
                        self._validate(patched, query)
                        patched["metadata"].pop("resourceVersion", None)
                        self._send_json(200, fake.replace(resource, namespace, name, patched))
            elif method == "DELETE" and name is not None:
                self._read_body()
                fake.delete(resource, namespace, name)
                self._send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                      "details": {"name": name, "group": resource.group, "kind": resource.plural}})
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {self.path}")
        except ApiError as error:
            self._send_json(error.code, error.status())
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    @staticmethod
    def _check_kind(resource: Resource, body: Any) -> None:
        if not isinstance(body, dict) or body.get("kind") != resource.kind or \
                body.get("apiVersion") != resource.group_version:
            raise ApiError(400, "BadRequest", f"expected {resource.group_version} {resource.kind} in the body")

    @staticmethod
    def _validate(body: dict, query: dict[str, list[str]]) -> None:
        """fieldValidation=Strict: reject unknown or mistyped fields, against the Kubernetes 1.33
        schemas that kubernetes-validate bundles (as the real server does from its own types)."""
        if query.get("fieldValidation", [""])[0] != "Strict":
            return
        import kubernetes_validate

        try:
            kubernetes_validate.validate(body, "1.33.0", strict=True)
        except kubernetes_validate.ValidationError as error:
            raise ApiError(400, "BadRequest", f"strict decoding error: {error.message}") from None

    def _watch(self, resource: Resource, namespace: str, query: dict[str, list[str]]) -> None:
        fake = self.fake
        selector = query.get("labelSelector", [""])[0]
        bookmarks = query.get("allowWatchBookmarks", [""])[0] in ("true", "1")
        timeout_s = float(query.get("timeoutSeconds", ["1800"])[0])
        since = query.get("resourceVersion", [""])[0]
        deadline = time.monotonic() + timeout_s
        watch = _Watch(self.connection)
        initial: list[tuple[str, dict]] = []
        with fake._lock:
            if since in ("", "0"):
                # No resourceVersion: the current state as ADDED events, then changes.
                initial = [("ADDED", copy.deepcopy(o)) for k, o in sorted(fake._objects.items())
                           if fake._matches(resource, namespace, selector, k, o)]
                position = fake._rv
            else:
                position = int(since)
            expired = position < fake._compacted_rv
            if not expired:
                fake._watches.append(watch)
                fake._lock.notify_all()
        if expired:
            # Starting from a compacted resourceVersion is refused outright (HTTP 410); a watch
            # that is already streaming gets an ERROR event instead (below).
            raise ApiError(410, "Expired", _expired(position, fake._compacted_rv)["message"])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True  # a watch connection is not reused
        try:
            for event_type, obj in initial:
                self._event({"type": event_type, "object": obj})
            last_bookmark = time.monotonic()
            while True:
                with fake._lock:
                    pending = [e for e in fake._history if e.resource_version > position
                               and fake._matches(resource, namespace, selector, e.key, e.obj)]
                    if not pending and not watch.cut and not watch.expire:
                        wait = min(deadline, last_bookmark + fake.bookmark_interval_s) - time.monotonic()
                        if wait > 0:
                            fake._lock.wait(wait)
                        pending = [e for e in fake._history if e.resource_version > position
                                   and fake._matches(resource, namespace, selector, e.key, e.obj)]
                    newest = fake._rv
                    compacted = fake._compacted_rv
                if watch.cut:
                    return  # the connection is already shut down: no terminating chunk
                if watch.expire:
                    self._event({"type": "ERROR", "object": _expired(position, compacted)})
                    self._end_chunks()
                    return
                for event in pending:
                    self._event({"type": event.type, "object": event.obj})
                    position = event.resource_version
                now = time.monotonic()
                if now >= deadline:
                    self._end_chunks()
                    return
                if bookmarks and now - last_bookmark >= fake.bookmark_interval_s:
                    position = max(position, newest)
                    self._event({"type": "BOOKMARK", "object": {
                        "kind": resource.kind, "apiVersion": resource.group_version,
                        "metadata": {"resourceVersion": str(position)}}})
                    last_bookmark = now
        except OSError:
            pass
        finally:
            with fake._lock:
                if watch in fake._watches:
                    fake._watches.remove(watch)

    def _event(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")


def _expired(requested: int, oldest: int) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": f"too old resource version: {requested} ({oldest})", "reason": "Expired", "code": 410}


def endpoint_slice(service: str, name: str, addresses: dict[str, bool], port: int, namespace: str = "specmesh",
                   port_name: str = "grpc", terminating: frozenset[str] = frozenset()) -> dict:
    """An EndpointSlice as the EndpointSlice controller writes it for a headless Service:
    address -> ready. An empty slice has `endpoints: null`, as the real API serves it."""
    endpoints = [{"addresses": [address],
                  "conditions": {"ready": ready, "serving": ready or address in terminating,
                                 "terminating": address in terminating},
                  "targetRef": {"kind": "Pod", "namespace": namespace, "name": f"{service}-{address}"}}
                 for address, ready in addresses.items()]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": endpoints or None,
        "ports": [{"name": port_name, "port": port, "protocol": "TCP", "appProtocol": "grpc"}],
    }
