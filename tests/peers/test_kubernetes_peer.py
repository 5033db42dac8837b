"""Smoke tests: a real kube-apiserver (on its own etcd 3.6) from the sandbox.

No controller runs, so the test writes the Service's EndpointSlice itself, the
way syncworker will. A server-side dry run (`?dryRun=All`) must validate and
default a manifest without storing it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from syncworker.sandbox import base

pytestmark = pytest.mark.peers

# The first test to ask for the peer may build etcd 3.6 and kube-apiserver from
# source (about 15 min of wall clock on 2 shared cores), which exceeds the
# project-wide 900 s pytest timeout; later runs start from the cache in seconds.
first_start_may_build = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def kube(peers) -> base.Running:
    return peers.get("kubernetes")


@pytest.fixture()
def api(kube: base.Running) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {kube.credentials['token']}"}
    with httpx.Client(base_url=kube.endpoints["https"], headers=headers, verify=False,
                      timeout=30.0) as client:
        yield client


@pytest.fixture()
def namespace(api: httpx.Client) -> Iterator[str]:
    name = f"sw-{uuid.uuid4().hex[:8]}"
    resp = api.post("/api/v1/namespaces", json={
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    assert resp.status_code == 201, resp.text
    yield name
    # No namespace controller runs, so the namespace stays "Terminating"; that is fine.
    api.delete(f"/api/v1/namespaces/{name}")


@first_start_may_build
def test_kubernetes_service_and_endpointslice_round_trip(api: httpx.Client, namespace: str) -> None:
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "orders", "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }
    resp = api.post(f"/api/v1/namespaces/{namespace}/services", json=svc)
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["clusterIP"]  # allocated from --service-cluster-ip-range

    slices = f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
    eps = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "orders-syncworker",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": "orders",
                "endpointslice.kubernetes.io/managed-by": "syncworker.example",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.2.3"], "conditions": {"ready": True}}],
    }
    resp = api.post(slices, json=eps)
    assert resp.status_code == 201, resp.text

    resp = api.get(f"{slices}/orders-syncworker")
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["endpoints"][0]["addresses"] == ["10.1.2.3"]
    assert got["endpoints"][0]["conditions"]["ready"] is True
    assert got["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]

    listed = api.get(slices, params={"labelSelector": "kubernetes.io/service-name=orders"})
    assert listed.status_code == 200, listed.text
    assert [item["metadata"]["name"] for item in listed.json()["items"]] == ["orders-syncworker"]

    resp = api.delete(f"{slices}/orders-syncworker")
    assert resp.status_code == 200, resp.text
    resp = api.get(f"{slices}/orders-syncworker")
    assert resp.status_code == 404, resp.text
    assert resp.json()["reason"] == "NotFound"


@first_start_may_build
def test_kubernetes_server_side_dry_run_persists_nothing(api: httpx.Client, namespace: str) -> None:
    deployments = f"/apis/apps/v1/namespaces/{namespace}/deployments"
    manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
            },
        },
    }
    resp = api.post(deployments, params={"dryRun": "All"}, json=manifest)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    # Defaulted by the server, so the dry run really went through the API machinery.
    assert body["spec"]["strategy"]["type"] == "RollingUpdate"
    assert body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"

    assert api.get(f"{deployments}/web").status_code == 404
    assert api.get(deployments).json()["items"] == []

    # An invalid manifest is refused by the dry run with the server's own reason.
    bad = {**manifest, "spec": {**manifest["spec"], "selector": {"matchLabels": {"app": "other"}}}}
    resp = api.post(deployments, params={"dryRun": "All"}, json=bad)
    assert resp.status_code == 422, resp.text
    assert resp.json()["reason"] == "Invalid"


@first_start_may_build
def test_kubernetes_kubeconfig_points_at_the_server(kube: base.Running) -> None:
    config = yaml.safe_load(Path(str(kube.extra["kubeconfig"])).read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == kube.endpoints["https"]
    assert cluster["insecure-skip-tls-verify"] is True
    assert config["users"][0]["user"]["token"] == kube.credentials["token"]
    assert kube.children and kube.children[0].name == "etcd36" and kube.children[0].alive()
