"""A real kube-apiserver (no controller-manager, no scheduler, no kubelet) on its own etcd 3.6.

Built once from the Go tools module in deploy/local/peers/kubernetes/ (see its
NOTES.md): `k8s.io/kubernetes/cmd/kube-apiserver` with every `k8s.io/*` staging
module replaced by its published tag. Each start gets a fresh etcd 3.6 (a child
of the returned `Running`, stopped after the API server), a fresh service-account
signing key, a static bearer token in group `system:masters`, a self-signed
serving certificate and a kubeconfig, all inside the run directory.

Nothing reconciles objects: tests create Services and EndpointSlices themselves.
Authorization is AlwaysAllow; the ServiceAccount admission plugin is off since
no controller creates the `default` service account that it would demand.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import httpx
import yaml

from syncworker.sandbox import base, ports
from syncworker.sandbox.peers.etcd36 import Etcd36, go_build

KUBE_VERSION = "v1.36.3"
TOKEN_USER = "syncworker-admin"


def _version_ldflags(version: str) -> str:
    """What kubernetes' hack/lib/version.sh stamps into a release build (plus -s -w)."""
    major, minor = version.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{key}={val}" for key, val in values.items()]
    return " ".join(flags)


class KubeApiServer(base.Peer):
    name = "kubernetes"
    version = KUBE_VERSION
    # etcd start + apiserver post-start hooks (RBAC bootstrap, priority classes, ...);
    # on 2 busy cores the first readyz "ok" can take a while.
    start_timeout = 180.0

    def binary(self) -> Path:
        return self.cache_dir() / "kube-apiserver"

    def install(self) -> None:
        Etcd36().install()
        super().install()

    def _install(self, target: Path) -> None:
        go_build(base.tools_dir("kubernetes"), "k8s.io/kubernetes/cmd/kube-apiserver",
                 target / "kube-apiserver", f"building kube-apiserver {self.version}",
                 ldflags=_version_ldflags(self.version))

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        etcd = Etcd36().start(alloc, run_dir / "etcd")
        try:
            return self._start_apiserver(alloc, run_dir, etcd)
        except BaseException:
            etcd.stop()
            raise

    def _start_apiserver(self, alloc: ports.PortAllocator, run_dir: Path,
                         etcd: base.Running) -> base.Running:
        port = alloc.one()
        server = f"https://127.0.0.1:{port}"
        sa_key, sa_pub = run_dir / "sa.key", run_dir / "sa.pub"
        openssl = base.which("openssl", "install it with: apt-get install -y openssl")
        base.run_checked([openssl, "genrsa", "-out", str(sa_key), "2048"],
                         "generating the service-account signing key")
        base.run_checked([openssl, "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                         "extracting the service-account public key")
        token = secrets.token_hex(24)
        token_file = run_dir / "tokens.csv"
        token_file.write_text(f'{token},{TOKEN_USER},{TOKEN_USER}-uid,"system:masters"\n')
        token_file.chmod(0o600)
        cert_dir = run_dir / "certs"
        cert_dir.mkdir(exist_ok=True)
        kubeconfig = run_dir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(_kubeconfig(server, token), sort_keys=False))
        kubeconfig.chmod(0o600)

        argv = [
            str(self.binary()),
            f"--etcd-servers={etcd.endpoints['client']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--authorization-mode=AlwaysAllow",
            f"--token-auth-file={token_file}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # The "kubernetes" Service's Endpoints would point at 127.0.0.1, which
            # Endpoints validation refuses (loopback); nothing here needs them.
            "--endpoint-reconciler-type=none",
            # Needs the "default" ServiceAccount, which only kube-controller-manager creates.
            "--disable-admission-plugins=ServiceAccount",
            "--profiling=false",
            "--logging-format=text",
        ]
        running = base.spawn(
            self.name, self.version, argv, run_dir, {"https": server},
            credentials={"token": token, "user": TOKEN_USER},
            extra={"kubeconfig": str(kubeconfig), "port": port, "cert_dir": str(cert_dir),
                   "etcd": etcd.endpoints["client"]},
        )
        running.children.append(etcd)
        return running

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(
            running.endpoints["https"] + "/readyz",
            headers={"Authorization": f"Bearer {running.credentials['token']}"},
            verify=False, timeout=3.0,
        )
        return resp.status_code == 200 and resp.text.strip() == "ok"


def _kubeconfig(server: str, token: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sandbox",
                      "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": TOKEN_USER, "user": {"token": token}}],
        "contexts": [{"name": "sandbox",
                      "context": {"cluster": "sandbox", "user": TOKEN_USER, "namespace": "default"}}],
        "current-context": "sandbox",
        "preferences": {},
    }
