"""deploy/: the manifests against the Kubernetes 1.33 schemas, against each other, against the
services' flags, and through `kubectl apply -f deploy/` (kubectl from PyPI) on the fake API server.
No cluster and no Docker engine exist here; what only a real cluster could show is listed in
tests/fake_kube_api.py's assumptions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from tests.fake_kube_api import FakeKubeAPI, label_selector_matches

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
NAMESPACE = "specmesh"
KUBERNETES_VERSION = "1.33.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
SERVICES = ("gateway", "scheduler", "drafter", "verifier")


def manifest_files(folder: Path = DEPLOY) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def load(files: list[Path]) -> list[dict]:
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return load(manifest_files())


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is a dev dependency: pip install -e '.[dev]'"
    return str(path)


# ---- layout and schemas ---------------------------------------------------------------------------
def test_apply_order_and_layout(docs):
    names = [p.name for p in DEPLOY.iterdir()]
    assert not any(n.lower().startswith("kustomization") for n in names), "kubectl apply would apply it"
    assert docs[0]["kind"] == "Namespace" and docs[0]["metadata"]["name"] == NAMESPACE
    for doc in docs[1:]:
        assert doc["kind"] != "Namespace"
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    # The Role and the ConfigMap/Secret come before the workloads that use them.
    order = [(d["kind"], d["metadata"]["name"]) for d in docs]
    first_workload = min(i for i, (kind, _) in enumerate(order) if kind in WORKLOAD_KINDS)
    for needed in ("ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret"):
        assert max(i for i, (kind, _) in enumerate(order) if kind == needed) < first_workload, needed
    assert (DEPLOY / "Dockerfile").exists()


@pytest.mark.parametrize("folder", [DEPLOY, DEPLOY / "optional"], ids=["deploy", "optional"])
def test_manifests_validate_strictly_against_kubernetes_1_33(folder):
    files = manifest_files(folder)
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet",
                             *map(str, files)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    import kubernetes_validate

    for doc in load(files):  # the same through the library, one document at a time
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"clusterIp": "None"}}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict really rejects a typo
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


# ---- cross references -----------------------------------------------------------------------------
def test_every_service_selects_pods_on_declared_ports(docs):
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    for service in by_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        selected = [w for w in workloads
                    if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        ports = {p["name"]: p["containerPort"] for c in containers(selected[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), (service["metadata"]["name"], target)
    for workload in workloads:
        template_labels = workload["spec"]["template"]["metadata"]["labels"]
        selector = ",".join(f"{k}={v}" for k, v in workload["spec"]["selector"]["matchLabels"].items())
        assert label_selector_matches(selector, template_labels), workload["metadata"]["name"]


def test_headless_services_for_the_pools(docs):
    for name in ("specmesh-verifier", "specmesh-drafter", "specmesh-scheduler", "specmesh-redis"):
        service = find(docs, "Service", name)
        assert service["spec"].get("clusterIP") == "None", name
        assert not service["spec"].get("publishNotReadyAddresses"), "discovery must see ready pods only"
    assert find(docs, "StatefulSet", "specmesh-redis")["spec"]["serviceName"] == "specmesh-redis"
    # The scheduler dials the port its discovery is told to use.
    scheduler = containers(find(docs, "Deployment", "specmesh-scheduler"))[0]
    scheduler_env = {e["name"]: e.get("value") for e in scheduler["env"]}
    port_name = scheduler_env["SPECMESH_SCHEDULER_GRPC_PORT_NAME"]
    for role in ("VERIFIER", "DRAFTER"):
        service = find(docs, "Service", scheduler_env[f"SPECMESH_SCHEDULER_{role}_SERVICE"])
        assert port_name in [p["name"] for p in service["spec"]["ports"]]
    assert scheduler_env["SPECMESH_SCHEDULER_DISCOVERY"] == "kubernetes"


def test_autoscalers_target_existing_deployments_with_separate_metrics_and_bounds(docs):
    hpas = {h["metadata"]["name"]: h for h in by_kind(docs, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"specmesh-verifier", "specmesh-drafter"}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["apiVersion"] == "apps/v1"
        find(docs, target["kind"], target["name"])
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    def metric_names(hpa: dict) -> set[str]:
        return {m.get("pods", {}).get("metric", {}).get("name") or m.get("resource", {}).get("name")
                for m in hpa["spec"]["metrics"]}

    verifier, drafter = hpas["specmesh-verifier"], hpas["specmesh-drafter"]
    assert metric_names(verifier) != metric_names(drafter)
    assert (verifier["spec"]["minReplicas"], verifier["spec"]["maxReplicas"]) != \
           (drafter["spec"]["minReplicas"], drafter["spec"]["maxReplicas"])
    # The HPA owns replicas; no PDB may block every eviction of a pool it scales.
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        selected = [w for w in by_kind(docs, "Deployment")
                    if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v
                           for k, v in pdb["spec"]["selector"]["matchLabels"].items())]
        assert len(selected) == 1, pdb["metadata"]["name"]
        if "minAvailable" in pdb["spec"]:
            assert pdb["spec"]["minAvailable"] < selected[0]["spec"]["replicas"], pdb["metadata"]["name"]


def test_gpu_pools_and_resources(docs):
    for name, pool in (("specmesh-verifier", "high-end"), ("specmesh-drafter", "cheap")):
        pod = find(docs, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["nodeSelector"]["specmesh.io/gpu-pool"] == pool
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    for workload in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        for container in containers(workload):
            resources = container["resources"]
            assert resources["requests"]["memory"] and resources["limits"]["memory"], workload["metadata"]["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_probes_use_grpc_health_on_the_service_port(docs):
    for service in SERVICES:
        workload = find(docs, "Deployment", f"specmesh-{service}")
        container = containers(workload)[0]
        assert container["args"] == ["serve", service]  # the image's entrypoint is `specmesh`
        env = {e["name"]: e.get("value") for e in container["env"]}
        port = int(env[f"SPECMESH_{service.upper()}_PORT"])
        assert env[f"SPECMESH_{service.upper()}_HOST"] == "0.0.0.0"
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (service, probe)
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loads take minutes"
        grace = workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
        config = find(docs, "ConfigMap", "specmesh-config")["data"]
        assert grace > float(config.get(f"SPECMESH_{service.upper()}_GRACE_S", 5)), service


def test_the_scheduler_may_watch_endpointslices(docs):
    deployment = find(docs, "Deployment", "specmesh-scheduler")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert deployment["spec"]["template"]["spec"].get("automountServiceAccountToken", True)
    find(docs, "ServiceAccount", account)
    bindings = [b for b in by_kind(docs, "RoleBinding")
                if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]]
    assert bindings
    granted = set()
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        role = find(docs, "Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "discovery.k8s.io" in rule["apiGroups"] and "endpointslices" in rule["resources"]:
                granted |= set(rule["verbs"])
    assert {"get", "list", "watch"} <= granted
    # Nobody else gets an API token.
    for workload in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        if workload is not deployment:
            assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def _flag_env_vars(service: str) -> set[str]:
    module = __import__(f"{service}.__main__", fromlist=["app"])
    command = typer.main.get_command(module.app)
    names = set()
    for param in command.params:
        envvar = getattr(param, "envvar", None)
        names.update([envvar] if isinstance(envvar, str) else envvar or [])
    return names


def test_every_specmesh_variable_is_a_flag_of_its_service(docs):
    flags = {service: _flag_env_vars(service) for service in SERVICES}
    configured: dict[str, set[str]] = {s: set() for s in SERVICES}
    for name in find(docs, "ConfigMap", "specmesh-config")["data"]:
        if name.startswith("SPECMESH_"):
            configured[name.split("_")[1].lower()].add(name)
    for service in SERVICES:
        for env in containers(find(docs, "Deployment", f"specmesh-{service}"))[0]["env"]:
            if env["name"].startswith("SPECMESH_"):
                assert env["name"].startswith(f"SPECMESH_{service.upper()}_"), env["name"]
                configured[service].add(env["name"])
    for service in SERVICES:
        unknown = configured[service] - flags[service]
        assert not unknown, f"{service} has no flag for {sorted(unknown)}"
    # The gateway reads the mounted Secret.
    gateway = find(docs, "Deployment", "specmesh-gateway")
    env = {e["name"]: e.get("value") for e in containers(gateway)[0]["env"]}
    mount = next(m for m in containers(gateway)[0]["volumeMounts"] if m["name"] == "api-keys")
    secret = find(docs, "Secret", "specmesh-api-keys")
    assert env["SPECMESH_GATEWAY_API_KEYS_FILE"] == f"{mount['mountPath']}/{next(iter(secret['stringData']))}"


def test_dockerfile_runs_specmesh_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE=") and any(line.startswith("FROM ") for line in lines)
    assert 'ENTRYPOINT ["specmesh"]' in lines
    user = [line for line in lines if line.startswith("USER ")]
    assert user and user[-1] != "USER root" and not user[-1].startswith("USER 0")
    for package in ("specmesh", "gateway", "scheduler", "drafter", "verifier"):
        assert f"COPY {package} ./{package}" in lines, package
    assert "VOLUME" in text and "/var/cache/specmesh" in text


# ---- kubectl against the fake API server ------------------------------------------------------------
@pytest.fixture
def kubectl(tmp_path):
    fake = FakeKubeAPI().start()
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([tool("kubectl"), "--cache-dir", str(tmp_path / "cache"), *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=REPO)

    run.fake = fake
    yield run
    fake.stop()


def test_kubectl_apply_creates_everything_and_a_second_apply_changes_nothing(kubectl, docs):
    fake = kubectl.fake
    # The order matters: a namespaced object alone fails before its namespace exists.
    early = kubectl("apply", "-f", "deploy/20-verifier.yaml")
    assert early.returncode != 0 and 'namespaces "specmesh" not found' in early.stderr

    first = kubectl("apply", "-f", "deploy/")
    assert first.returncode == 0, first.stderr
    created = [line for line in first.stdout.splitlines() if line.strip()]
    assert len(created) == len(docs) and all(line.endswith(" created") for line in created), first.stdout
    stored = {(o["kind"], o["metadata"]["name"]): o for o in fake.objects()}
    for doc in docs:
        obj = stored[(doc["kind"], doc["metadata"]["name"])]
        assert obj["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
        assert obj.get("spec") == doc.get("spec") and obj.get("data") == doc.get("data")
    versions = {key: o["metadata"]["resourceVersion"] for key, o in stored.items()}
    # kubectl asked for strict server-side field validation, which the fake enforces.
    assert all("fieldValidation=Strict" in path for method, path in fake.requests if method == "POST")

    second = kubectl("apply", "-f", "deploy/")
    assert second.returncode == 0, second.stderr
    for line in second.stdout.splitlines():
        if not line.strip():
            continue
        # kubectl itself always sends a PodDisruptionBudget's spec.selector (its patch strategy
        # is "replace"), so it prints "configured" for them; the object is unchanged all the same.
        expected_word = "configured" if line.startswith("poddisruptionbudget.") else "unchanged"
        assert line.endswith(" " + expected_word), line
    assert {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in fake.objects()} == versions
    assert not [p for m, p in fake.requests if m in ("PUT", "DELETE")]

    listed = kubectl("get", "deployments,statefulsets,services,hpa,pdb", "-n", NAMESPACE, "-o", "name")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.split()) == sum(1 for d in docs if d["kind"] in (
        "Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"))

    optional = kubectl("apply", "-f", "deploy/optional/")
    assert optional.returncode == 0, optional.stderr
    assert all(line.endswith(" created") for line in optional.stdout.splitlines() if line.strip())
