"""The Kubernetes manifests in deploy/kubernetes/: static checks, and a server-side dry run of every object.

The dry run goes to a real kube-apiserver v1.36.3 from the sandbox: the namespace
is created for real from 00-namespace.yaml, then every other object is POSTed to
its REST path (found through the server's own discovery, by apiVersion and kind)
with `?dryRun=All`, which validates, defaults and runs admission (Pod Security
"restricted" included, through the namespace's warn label) but stores nothing.
A deliberately broken copy must come back 422, so the check is known to bite.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from syncworker.config import loader, settings
from syncworker.sandbox import base

pytestmark = pytest.mark.peers

# The first test to ask for the peer may build etcd 3.6 and kube-apiserver from
# source (see tests/peers/test_kubernetes_peer.py); later runs start from the cache.
first_start_may_build = pytest.mark.timeout(3600)

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
NAMESPACE = "syncworker"
#: settings the deployment files set that syncworker/config/settings.py may not define yet (cluster mode)
CLUSTER_MODE_PENDING = {"SYNCWORKER_STATUS_HOST", "SYNCWORKER_FLOWER_AUTH"}
Doc = dict[str, Any]


# ---- loading ---------------------------------------------------------------------------
def load_docs() -> list[tuple[str, Doc]]:
    """Every YAML document under deploy/kubernetes/ (demo/ and templates/ included), with its file."""
    docs = []
    for path in sorted([*MANIFESTS.rglob("*.yaml"), *MANIFESTS.rglob("*.yml")]):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


DOCS = load_docs()


def ident(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def find(kind: str, name: str) -> Doc:
    hits = [d for _, d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name} under deploy/kubernetes/, found {len(hits)}"
    return hits[0]


def workloads() -> list[Doc]:
    return [d for _, d in DOCS if "template" in d.get("spec", {}) and "spec" in d["spec"]["template"]]


def containers(workload: Doc) -> list[Doc]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def project_version() -> str:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


# ---- static checks ---------------------------------------------------------------------
def test_kubernetes_manifests_are_well_formed() -> None:
    assert len(DOCS) >= 10, [ident(d) for _, d in DOCS]
    seen = set()
    for path, doc in DOCS:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path}: a document without {key}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path}: {ident(doc)} outside {NAMESPACE}"
        assert ident(doc) not in seen, f"{path}: {ident(doc)} defined twice"
        seen.add(ident(doc))
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Deployment", "Service",
            "HorizontalPodAutoscaler"} <= kinds


def test_kubernetes_every_container_has_requests_limits_and_probes() -> None:
    assert workloads(), "no workload found"
    for wl in workloads():
        for c in containers(wl):
            where = f"{ident(wl)} container {c['name']}"
            requests = c.get("resources", {}).get("requests", {})
            limits = c.get("resources", {}).get("limits", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: resources.requests needs cpu and memory"
            assert "memory" in limits, f"{where}: resources.limits.memory missing"
            assert "readinessProbe" in c, f"{where}: no readinessProbe"
            assert "livenessProbe" in c, f"{where}: no livenessProbe"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped"
        pod = wl["spec"]["template"]["spec"]
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{ident(wl)}: may run as root"


def test_kubernetes_probes_use_declared_ports() -> None:
    for wl in workloads():
        for c in containers(wl):
            names = {p["name"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind, {})
                for action in ("httpGet", "tcpSocket"):
                    if action in probe:
                        port = probe[action]["port"]
                        assert port in names | numbers, f"{ident(wl)} {c['name']} {kind}: port {port} undeclared"


def test_kubernetes_scheduler_runs_standbys_and_serves_status() -> None:
    sched = find("Deployment", "syncworker-scheduler")
    assert sched["spec"]["replicas"] >= 2, "leader election needs standbys"
    rolling = sched["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] == 1, "schedulers must roll one at a time"
    (c,) = sched["spec"]["template"]["spec"]["containers"]
    assert c["args"][0] == "scheduler"
    port = c["args"][c["args"].index("--status-port") + 1]
    assert {"name": "metrics", "containerPort": int(port), "protocol": "TCP"} in c["ports"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    pdb = find("PodDisruptionBudget", "syncworker-scheduler")
    assert pdb["spec"]["selector"]["matchLabels"] == sched["spec"]["selector"]["matchLabels"]


def test_kubernetes_status_service_exposes_metrics_to_prometheus() -> None:
    svc = find("Service", "syncworker-status")
    sched = find("Deployment", "syncworker-scheduler")
    labels = sched["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), "the status Service selects no scheduler"
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "metrics"]
    assert port["targetPort"] == "metrics"
    ann = svc["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == port["port"]
    assert sched["spec"]["template"]["metadata"]["annotations"] == ann


def test_kubernetes_worker_deployment_is_scaled_by_a_cpu_hpa() -> None:
    worker = find("Deployment", "syncworker-worker")
    assert "replicas" not in worker["spec"], "the HPA owns the worker count; a fixed one fights it on apply"
    hpas = [d for _, d in DOCS if d["kind"] == "HorizontalPodAutoscaler"
            and d["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": "syncworker-worker"}]
    assert len(hpas) == 1, "the worker Deployment needs exactly one HorizontalPodAutoscaler"
    (hpa,) = hpas
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert resources == ["cpu"]
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert "cpu" in c["resources"]["requests"], "CPU utilization is measured against the CPU request"
    assert c["args"][0] == "worker"
    # a Celery worker has no HTTP port: the probes ask this pod's own node for a pong
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(c[probe]["exec"]["command"])
        assert "inspect ping" in command and "syncworker@$HOSTNAME" in command


def test_kubernetes_flower_has_basic_auth_from_the_secret() -> None:
    flower = find("Deployment", "syncworker-flower")
    (c,) = flower["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    auth = env["SYNCWORKER_FLOWER_AUTH"]
    assert "value" not in auth, "basic auth must come from a Secret, not a literal"
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "syncworker-credentials", "key": "flower-auth"}
    # `syncworker flower` listens on 127.0.0.1 by default: the kubelet and the Service need the pod's address
    args = c["args"]
    assert args[0] == "flower" and args[args.index("--address") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == c["ports"][0]["containerPort"]
    svc = find("Service", "syncworker-flower")
    assert svc["spec"]["selector"].items() <= flower["spec"]["template"]["metadata"]["labels"].items()


def test_kubernetes_references_resolve_within_the_manifests() -> None:
    defined = {(d["kind"], d["metadata"]["name"]) for _, d in DOCS}
    secret_keys = {key for _, d in DOCS if d["kind"] == "Secret" for key in d.get("stringData", {})}
    configmap_keys = {key for _, d in DOCS if d["kind"] == "ConfigMap" for key in d.get("data", {})}
    for wl in workloads():
        pod = wl["spec"]["template"]["spec"]
        if "serviceAccountName" in pod:
            assert ("ServiceAccount", pod["serviceAccountName"]) in defined
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in defined, f"{ident(wl)}: {vol}"
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in defined, f"{ident(wl)}: {vol}"
        for c in containers(wl):
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert ("ConfigMap", src["configMapRef"]["name"]) in defined
                if "secretRef" in src:
                    assert ("Secret", src["secretRef"]["name"]) in defined
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ("Secret", ref["secretKeyRef"]["name"]) in defined, f"{ident(wl)}: {e}"
                    assert ref["secretKeyRef"]["key"] in secret_keys, f"{ident(wl)}: {e}"
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in configmap_keys, f"{ident(wl)}: {e}"
    for _, svc in DOCS:
        if svc["kind"] == "Service":
            matched = [wl for wl in workloads()
                       if svc["spec"]["selector"].items() <= wl["spec"]["template"]["metadata"]["labels"].items()]
            assert matched, f"{ident(svc)} selects no pod template"


def test_kubernetes_images_carry_the_project_version() -> None:
    ours = f"syncworker:{project_version()}"
    for wl in workloads():
        if wl["metadata"]["labels"].get("app.kubernetes.io/name") == "syncworker":
            for c in containers(wl):
                assert c["image"] == ours, f"{ident(wl)} {c['name']}: {c['image']} (want {ours})"
                assert wl["metadata"]["labels"]["app.kubernetes.io/version"] == project_version()


def test_kubernetes_secret_is_a_template_without_real_values() -> None:
    secrets = [(path, d) for path, d in DOCS if d["kind"] == "Secret"]
    assert secrets
    for path, secret in secrets:
        # a subdirectory: `kubectl apply -f deploy/kubernetes/` (no -R) never applies it by accident
        assert Path(path).parent.name == "templates", f"{path}: a Secret outside templates/"
        assert "data" not in secret, f"{path}: base64 data looks like a real value; use placeholders"
        values = secret["stringData"]
        assert values["flower-auth"].endswith(":CHANGE-ME")
        assert "@" not in values["redis-url"], "no password in the template's Redis URL"


def test_kubernetes_task_configmap_is_a_valid_task_file() -> None:
    text = find("ConfigMap", "syncworker-tasks")["data"]["sync-registry.json"]
    config = loader.load_text(text, "sync-registry.json")
    example = loader.load(ROOT / "conf" / "sync-registry.json")
    assert [(t.name, t.source.type, t.destination.type) for t in config.enabled_tasks()] == [
        (t.name, t.source.type, t.destination.type) for t in example.enabled_tasks()]
    settings = find("ConfigMap", "syncworker-settings")["data"]
    mount_dirs = {m["mountPath"] for wl in workloads() for c in containers(wl)
                  for m in c.get("volumeMounts", []) if m["name"] == "tasks"}
    assert mount_dirs == {str(Path(settings["SYNCWORKER_CONFIG_FILE"]).parent)}
    assert not settings["SYNCWORKER_CONFIG_BACKUP"].startswith("/etc/syncworker/"), "backup on a read-only mount"


def test_kubernetes_settings_are_ones_syncworker_reads() -> None:
    known = set(CLUSTER_MODE_PENDING)
    for field in settings.Settings.model_fields.values():
        known.update(a for a in getattr(field.validation_alias, "choices", []) if isinstance(a, str))
    names = set(find("ConfigMap", "syncworker-settings")["data"])
    names |= {e["name"] for wl in workloads() for c in containers(wl) for e in c.get("env", [])}
    unknown = {n for n in names if n.startswith("SYNCWORKER_")} - known
    assert not unknown, f"settings that syncworker does not read: {unknown}"


# ---- the real API server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def kube(peers) -> base.Running:
    return peers.get("kubernetes")


@pytest.fixture(scope="module")
def api(kube: base.Running) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {kube.credentials['token']}"}
    with httpx.Client(base_url=kube.endpoints["https"], headers=headers, verify=False,
                      timeout=30.0) as client:
        yield client


class Paths:
    """REST paths by apiVersion and kind, from the server's own discovery documents."""

    def __init__(self, api: httpx.Client) -> None:
        self.api = api
        self._lists: dict[str, dict[str, tuple[str, bool]]] = {}

    def prefix(self, api_version: str) -> str:
        return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"

    def collection(self, doc: Doc) -> str:
        version = doc["apiVersion"]
        if version not in self._lists:
            resp = self.api.get(self.prefix(version))
            assert resp.status_code == 200, f"discovery of {version}: {resp.status_code} {resp.text}"
            self._lists[version] = {r["kind"]: (r["name"], r["namespaced"])
                                    for r in resp.json()["resources"] if "/" not in r["name"]}
        kinds = self._lists[version]
        assert doc["kind"] in kinds, f"{version} has no kind {doc['kind']} on this server"
        plural, namespaced = kinds[doc["kind"]]
        if namespaced:
            return f"{self.prefix(version)}/namespaces/{doc['metadata']['namespace']}/{plural}"
        return f"{self.prefix(version)}/{plural}"


@pytest.fixture(scope="module")
def paths(api: httpx.Client) -> Paths:
    return Paths(api)


@pytest.fixture(scope="module")
def namespace(api: httpx.Client, paths: Paths) -> str:
    """The namespace, created for real from 00-namespace.yaml (a dry-run object needs a real namespace)."""
    (ns,) = [d for _, d in DOCS if d["kind"] == "Namespace"]
    resp = api.post(paths.collection(ns), json=ns)
    assert resp.status_code in (201, 409), resp.text  # 409: an earlier test of this session made it
    got = api.get(f"{paths.collection(ns)}/{ns['metadata']['name']}")
    assert got.status_code == 200, got.text
    assert ns["metadata"]["labels"].items() <= got.json()["metadata"]["labels"].items()
    return str(ns["metadata"]["name"])


def dry_run(api: httpx.Client, paths: Paths, doc: Doc) -> httpx.Response:
    return api.post(paths.collection(doc), params={"dryRun": "All", "fieldValidation": "Strict"}, json=doc)


@first_start_may_build
def test_kubernetes_manifests_pass_a_server_side_dry_run(api: httpx.Client, paths: Paths, namespace: str) -> None:
    problems = []
    checked = 0
    for path, doc in DOCS:
        if doc["kind"] == "Namespace":
            continue  # created for real by the fixture
        resp = dry_run(api, paths, doc)
        checked += 1
        if resp.status_code not in (200, 201):
            problems.append(f"{path} {ident(doc)}: {resp.status_code} {resp.text[:500]}")
            continue
        # strict field validation turns unknown fields into errors; admission (Pod
        # Security "restricted" in warn mode, deprecations) answers with Warning headers
        warnings = resp.headers.get_list("warning")
        if warnings:
            problems.append(f"{path} {ident(doc)}: warnings {warnings}")
        stored = api.get(f"{paths.collection(doc)}/{doc['metadata']['name']}")
        if stored.status_code != 404:
            problems.append(f"{path} {ident(doc)}: a dry run stored the object ({stored.status_code})")
    assert checked == len(DOCS) - 1
    assert not problems, "\n".join(problems)


def _selector_mismatch(doc: Doc) -> str:
    doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "not-the-worker"
    return "spec.template.metadata.labels"


def _request_above_limit(doc: Doc) -> str:
    doc["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "4"
    return "spec.template.spec.containers[0].resources.requests"


@first_start_may_build
@pytest.mark.parametrize("breakage", [_selector_mismatch, _request_above_limit], ids=["selector", "requests"])
def test_kubernetes_dry_run_rejects_a_broken_manifest(api: httpx.Client, paths: Paths, namespace: str,
                                                      breakage) -> None:
    broken = copy.deepcopy(find("Deployment", "syncworker-worker"))
    field = breakage(broken)
    resp = dry_run(api, paths, broken)
    assert resp.status_code == 422, resp.text
    status = resp.json()
    assert status["reason"] == "Invalid"
    fields = [c.get("field", "") for c in status["details"]["causes"]]
    assert any(f.startswith(field) for f in fields), fields
    # and the intact original still passes, so the 422 is the breakage's doing
    assert dry_run(api, paths, find("Deployment", "syncworker-worker")).status_code == 201


@first_start_may_build
def test_kubernetes_strict_dry_run_rejects_an_unknown_field(api: httpx.Client, paths: Paths,
                                                            namespace: str) -> None:
    broken = copy.deepcopy(find("Service", "syncworker-status"))
    broken["spec"]["ports"][0]["targetPortt"] = "metrics"
    resp = dry_run(api, paths, broken)
    assert resp.status_code == 400, resp.text
    assert "targetPortt" in resp.text


@first_start_may_build
def test_kubernetes_dry_run_warns_about_a_pod_that_breaks_restricted(api: httpx.Client, paths: Paths,
                                                                     namespace: str) -> None:
    """The warnings the dry-run test refuses do come: Pod Security flags a privileged template."""
    loose = copy.deepcopy(find("Deployment", "syncworker-scheduler"))
    pod = loose["spec"]["template"]["spec"]
    del pod["securityContext"]
    del pod["containers"][0]["securityContext"]
    resp = dry_run(api, paths, loose)
    assert resp.status_code == 201, resp.text
    warnings = " ".join(resp.headers.get_list("warning"))
    assert "restricted" in warnings and "runAsNonRoot" in warnings, warnings
