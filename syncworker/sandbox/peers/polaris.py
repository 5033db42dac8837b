"""Polaris (polarismesh) built from its Go module: naming, config centre, boltdb store.

The tools module in `deploy/local/peers/polaris/` pins github.com/polarismesh/polaris
v1.18.1 (it repeats the `replace gopkg.in/yaml.v2` line of Polaris's own go.mod, which
a dependency's go.mod cannot carry). `install` builds `polaris-server` into the cache
and copies the release `conf/` (i18n messages, rate-limit rule file, reference
`polaris-server.yaml`) next to it.

Every start writes its own `conf/polaris-server.yaml` into the run directory, derived
from the release one: the boltdb file, the logs and the config dir live in the run
directory, every listener is on 127.0.0.1 with a port from the allocator, and the
Eureka-, Nacos- and xDS-compatible listeners are removed (they would take 8761,
8848/9848 and 15010 from the real servers running beside it).

Options:
  auth (bool, default True): console (OpenAPI) auth on, as users run it; the seeded
      admin token of the boltdb store is `credentials["token"]`, sent as `X-Polaris-Token`.
      False turns console and client auth off.
  client_auth (bool, default False): also check tokens on the client API (/v1/...,
      gRPC); only meaningful with auth=True.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import yaml

from syncworker.sandbox import base, ports

MODULE = "github.com/polarismesh/polaris"

#: Seeded by store/boltdb/default.go (user "polaris", type owner, password "polaris").
ADMIN_TOKEN = "nu/0WRA4EqSR1FagrjRj0fZwPXuGlMpX+zCuWu4uMqy8xr1vRjisSbA25aAC3mtU8MeeRsKhQiDAynUR09I="
ADMIN_USER = "polaris"
ADMIN_PASSWORD = "polaris"

#: Listeners that would clash with real Eureka, Nacos and an xDS control plane.
DROPPED_APISERVERS = frozenset({"service-eureka", "service-nacos", "xds-v3"})
#: apiserver name in polaris-server.yaml -> endpoint name
KEPT_APISERVERS = {"api-http": "http", "service-grpc": "grpc", "config-grpc": "config_grpc"}

STARTED_LINE = "finish starting server"


def _go() -> str:
    found = shutil.which("go")
    if found:
        return found
    fallback = Path("/usr/local/go/bin/go")
    if fallback.exists():
        return str(fallback)
    raise base.PeerError("go not found on PATH nor at /usr/local/go/bin/go; polaris is built from its Go module")


def _make_writable(root: Path) -> None:
    """Files copied out of the Go module cache are read-only; let later runs and `rm -r` touch them."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _flag(options: dict[str, object], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


class Polaris(base.Peer):
    name = "polaris"
    version = "v1.18.1"
    start_timeout = 60.0

    # ---- install -----------------------------------------------------------------
    def _install(self, target: Path) -> None:
        go = _go()
        tools = base.tools_dir(self.name)
        if not (tools / "go.mod").exists():
            raise base.PeerError(f"polaris tools module missing: {tools / 'go.mod'}")
        partial = target / "polaris-server.partial"
        base.run_checked([go, "build", "-trimpath", "-o", str(partial), MODULE],
                         "build polaris-server", cwd=tools, timeout=3600)
        module_dir = base.run_checked([go, "list", "-m", "-f", "{{.Dir}}", MODULE],
                                      "locate the polaris module", cwd=tools).strip()
        release_conf = Path(module_dir) / "release" / "conf"
        if not (release_conf / "polaris-server.yaml").exists():
            raise base.PeerError(f"polaris release config not found under {release_conf}")
        conf = target / "conf"
        if conf.exists():
            shutil.rmtree(conf)
        shutil.copytree(release_conf, conf)
        _make_writable(conf)
        partial.replace(target / "polaris-server")

    # ---- start -------------------------------------------------------------------
    def _config(self, run_dir: Path, listen: dict[str, int], auth: bool, client_auth: bool) -> dict[str, Any]:
        release = self.cache_dir() / "conf" / "polaris-server.yaml"
        cfg: dict[str, Any] = yaml.safe_load(release.read_text())

        boot = cfg["bootstrap"]
        for scope in boot["logger"].values():
            for key in ("rotateOutputPath", "errorRotateOutputPath"):
                if scope.get(key):
                    scope[key] = str(run_dir / scope[key])
            scope["compress"] = False
        # The server registers itself as polaris.checker; give it the loopback address
        # instead of letting it probe for one.
        boot["polaris_service"]["self_address"] = "127.0.0.1"

        kept = []
        for server in cfg["apiservers"]:
            name = server["name"]
            if name in DROPPED_APISERVERS:
                continue
            if name not in KEPT_APISERVERS:
                raise base.PeerError(f"polaris config has an apiserver this peer does not know: {name}")
            server["option"]["listenIP"] = "127.0.0.1"
            server["option"]["listenPort"] = listen[KEPT_APISERVERS[name]]
            if name == "api-http":
                server["option"]["enablePprof"] = False
            kept.append(server)
        cfg["apiservers"] = kept

        strategy = cfg["auth"]["strategy"]["option"]
        strategy["consoleOpen"] = auth
        strategy["consoleStrict"] = auth
        strategy["clientOpen"] = auth and client_auth
        strategy["clientStrict"] = auth and client_auth

        cfg["store"]["option"]["path"] = str(run_dir / "polaris.bolt")
        ratelimit = cfg["plugin"].get("ratelimit", {}).get("option")
        if ratelimit and ratelimit.get("rule-file"):
            ratelimit["rule-file"] = str(run_dir / "conf" / "plugin" / "ratelimit" / "rule.yaml")
        return cfg

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        auth = _flag(options, "auth", True)
        client_auth = _flag(options, "client_auth", False)
        unknown = set(options) - {"auth", "client_auth"}
        if unknown:
            raise base.PeerError(f"polaris: unknown options {sorted(unknown)}; known: auth, client_auth")

        listen = {endpoint: alloc.one() for endpoint in KEPT_APISERVERS.values()}
        conf = run_dir / "conf"
        if conf.exists():
            shutil.rmtree(conf)
        # i18n messages and plugin files are read from the directory of the config file.
        shutil.copytree(self.cache_dir() / "conf", conf)
        config_path = conf / "polaris-server.yaml"
        cfg = self._config(run_dir, listen, auth, client_auth)
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))

        binary = self.cache_dir() / "polaris-server"
        argv = [str(binary), "start", "-c", str(config_path)]
        endpoints = {
            "http": f"http://127.0.0.1:{listen['http']}",
            "grpc": f"127.0.0.1:{listen['grpc']}",
            "config_grpc": f"127.0.0.1:{listen['config_grpc']}",
        }
        credentials = {"token": ADMIN_TOKEN, "username": ADMIN_USER, "password": ADMIN_PASSWORD} if auth else {}
        extra: dict[str, object] = {
            "ports": dict(listen),
            "auth": auth,
            "client_auth": auth and client_auth,
            "config": str(config_path),
        }
        return base.spawn(self.name, self.version, argv, run_dir, endpoints,
                          credentials=credentials, extra=extra)

    def ready(self, running: base.Running) -> bool:
        # The HTTP listener opens before the server has registered itself; the line is
        # printed once start-up is complete.
        try:
            if STARTED_LINE not in running.log_path.read_text(errors="replace"):
                return False
        except OSError:
            return False
        headers = {}
        if running.credentials.get("token"):
            headers["X-Polaris-Token"] = running.credentials["token"]
        resp = httpx.get(f"{running.endpoints['http']}/naming/v1/namespaces", params={"name": "default"},
                         headers=headers, timeout=2.0)
        if resp.status_code != 200:
            return False
        body = resp.json()
        return body.get("code") == 200000 and any(
            ns.get("name") == "default" for ns in body.get("namespaces") or [])
