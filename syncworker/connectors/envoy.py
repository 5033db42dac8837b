"""Envoy as a destination: one EDS cluster per unit, served from files Envoy watches.

How Envoy gets the data (the xDS choice)
-----------------------------------------
Envoy takes dynamic resources from a management server (gRPC ADS or SotW gRPC,
REST-JSON polling) or from files it watches (`path_config_source`). This
connector writes files:

* No server in the sync process. A gRPC or REST xDS server would make the
  syncworker process a control plane: it would have to keep every cluster in
  memory, answer every Envoy, and be reachable from them. In cluster mode the
  reconciles run on whichever Celery worker takes the unit, so there is no single
  process that could serve a consistent snapshot without a shared store and a
  separate server process, i.e. a second product.
* The state survives a sync restart and an Envoy restart. The files are the
  state: a restarted Envoy reads them at once, with the sync process down or not;
  a restarted sync reads back what it wrote (`list_instances` parses the files),
  so a restart plans nothing and nothing flaps. With an in-memory xDS server a
  restarted Envoy would have no clusters until the sync process came back and
  rebuilt its snapshot.
* Writes are atomic (temporary file in the same directory, fsync, rename), which
  is exactly what Envoy's path watch reacts to (a file moved into place), so
  Envoy never sees a half-written file; a crashed write leaves the last good file.
* The price: the sync process must be able to write where Envoy reads. Deploy it
  next to Envoy: the embedded mode (`syncworker run`) as a sidecar in Envoy's pod
  or on Envoy's host with a shared directory (an `emptyDir` in Kubernetes), or a
  shared volume that every worker mounts (the file lock below is `flock`, which
  works on local disks and on NFSv4). For Envoys that the sync process cannot
  reach by file, run one small embedded syncworker per Envoy host; a gRPC ADS
  server can be added later as another connector type without changing this one.

Files and options
-----------------
`options.cds_path` is the CDS file (a DiscoveryResponse with the clusters; Envoy's
bootstrap points `cds_config.path_config_source` at it) and `options.eds_dir` the
directory of the per-cluster EDS files (`<cluster>.json`, one
ClusterLoadAssignment each; each cluster points at its file). Without options,
`addresses[0]` names a directory (`file:///etc/envoy/xds` or a plain path):
`<dir>/cds.json` and `<dir>/eds/`. `options.connect_timeout` (default "1s") goes
into every cluster this connector writes. A CDS file ending in `.yaml`/`.yml` is
read as YAML and written as JSON (JSON is YAML).

Clusters and ownership
----------------------
A unit's cluster is named `ctx.upstream_name` when the config asks for one, else
`<namespace>.<name>[.<group>]` from the destination key (characters other than
letters, digits, `_`, `.`, `-` become `_`). Every cluster this connector writes
carries `metadata.filter_metadata.syncworker = {task, origin, namespace, group,
service}`; only clusters with this task's mark for this service are changed or
removed. Every other cluster in the CDS file (written by hand, by another task)
is kept byte for byte in content and order. A cluster name already held by a
cluster we do not own fails the unit's writes as a permanent error (a clash,
reported, never overwritten). A unit whose copies are all gone has its cluster
removed from CDS (routes to it then answer 503), so removing a task leaves
nothing behind.

Retiring a unit (`retire`, after a removed task's or unit's copies are deleted):
every cluster with this task's mark for the unit's service that holds no endpoint
without this task's mark is dropped from CDS and its EDS file deleted (a cluster
left empty where no delete ran, e.g. its EDS file lost, goes too). A cluster
holding an endpoint put there by hand stays, and the log says why; clusters made
by hand or by another task are never looked at. A file that cannot be read or
written ends the retirement with nothing changed.

Endpoints (the representable law)
---------------------------------
* weight: Envoy's `load_balancing_weight` is an integer >= 1. Every endpoint of a
  cluster written here is ours, so the scale is free; it is 100 per canonical 1.0
  (`default_weight`), which keeps weights to 1/100 like Polaris and Kong (with
  Envoy's own default of 1, Nacos weights 0.5 and 1.0 would both become 1 and
  share traffic equally). `representable` rounds to 1/100, keeps a positive
  weight at least 0.01 and clamps at 10000.
* An endpoint that must get no traffic (unhealthy, disabled or weight 0) is
  written with `health_status: UNHEALTHY`, and clusters are written with
  `healthy_panic_threshold` 0, so Envoy never falls back to such endpoints. The
  engine sends gateways only healthy, enabled instances anyway.
* metadata (with the ownership marks), healthy, enabled, protocol, cluster and a
  zero weight are kept in the endpoint's `filter_metadata.syncworker`, so a read
  gives back exactly `representable(x)`. ephemeral is always False.
* EDS wants IP addresses: a copy whose host is a name fails with a permanent
  Outcome and the other writes go on.

Concurrency: the units of a task share the CDS file; every read-modify-write
holds a lock (a thread lock in the process and `flock` on `.<cds>.lock` next to
the CDS file across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

import yaml

from syncworker import errors, marks, model
from syncworker.connectors import base
from syncworker.reconcile import planner

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINTS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
META_KEY = "syncworker"
WEIGHT_SCALE = 100
MAX_UNITS = 1_000_000

Json = dict[str, Any]


# ---- names and weights ------------------------------------------------------------------
def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def cluster_name(service: model.ServiceKey) -> str:
    """`<namespace>.<name>[.<group>]`, sanitized (the namespace part is left out when empty)."""
    parts = [p for p in (service.namespace, service.name, service.group) if p]
    return sanitize(".".join(parts))


def weight_units(weight: float) -> int:
    """Canonical weight -> Envoy units (0 only for a zero weight)."""
    if weight != weight or weight <= 0:
        return 0
    if not math.isfinite(weight):
        return MAX_UNITS
    return max(1, min(MAX_UNITS, round(weight * WEIGHT_SCALE)))


def representable(inst: model.Instance) -> model.Instance:
    """`inst` as this connector stores it (see the module docstring)."""
    return inst.replace(weight=weight_units(inst.weight) / WEIGHT_SCALE, ephemeral=False, native_id="")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---- files --------------------------------------------------------------------------------
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the in-process lock and the `flock` of `path` (one writer at a time, across processes)."""
    key = str(path.resolve())
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old or the new file, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def discovery_response(resources: Sequence[Json]) -> str:
    canonical = json.dumps(list(resources), sort_keys=True)
    version = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return json.dumps({"version_info": version, "resources": list(resources)}, indent=1) + "\n"


def read_resources(path: Path) -> list[Json] | None:
    """The resources of a DiscoveryResponse file; None when the file does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise errors.ReadError(f"cannot read {path}: {exc}") from exc
    try:
        body = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise errors.ReadError(f"{path} is not valid {'YAML' if path.suffix != '.json' else 'JSON'}: "
                               f"{exc}; refusing to rewrite it") from exc
    if body is None:
        return []
    resources = body.get("resources", []) if isinstance(body, dict) else None
    if not isinstance(resources, list) or not all(isinstance(r, dict) for r in resources):
        raise errors.ReadError(f"{path} holds no DiscoveryResponse (a `resources` list); refusing to rewrite it")
    return resources


# ---- clusters ------------------------------------------------------------------------------
def cluster_mark(cluster: Json) -> Json | None:
    meta = cluster.get("metadata")
    if not isinstance(meta, dict):
        return None
    fm = meta.get("filter_metadata")
    mark = fm.get(META_KEY) if isinstance(fm, dict) else None
    return mark if isinstance(mark, dict) and mark.get("task") else None


def mark_service(mark: Json) -> model.ServiceKey:
    return model.ServiceKey(str(mark.get("namespace", "")), str(mark.get("group", "")),
                            str(mark.get("service", "")))


def eds_path_of(cluster: Json) -> Path | None:
    try:
        return Path(cluster["eds_cluster_config"]["eds_config"]["path_config_source"]["path"])
    except (KeyError, TypeError):
        return None


def endpoint_json(inst: model.Instance) -> Json:
    units = weight_units(inst.weight)
    live = inst.healthy and inst.enabled and units > 0
    return {
        "endpoint": {"address": {"socket_address": {"address": inst.host, "port_value": inst.port}}},
        "load_balancing_weight": max(1, units),
        "health_status": "HEALTHY" if live else "UNHEALTHY",
        "metadata": {"filter_metadata": {META_KEY: {
            "metadata": dict(inst.metadata),
            "healthy": inst.healthy,
            "enabled": inst.enabled,
            "protocol": inst.protocol,
            "cluster": inst.cluster,
            "zero_weight": units == 0,
        }}},
    }


def endpoint_instance(lb: Json) -> model.Instance:
    """One LbEndpoint as the canonical model; ValueError when it is malformed."""
    try:
        sock = lb["endpoint"]["address"]["socket_address"]
        host, port = str(sock["address"]), int(sock["port_value"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"endpoint without socket address: {lb!r}"[:200]) from exc
    units = int(lb.get("load_balancing_weight", 1))
    fm = (lb.get("metadata") or {}).get("filter_metadata") or {}
    sw = fm.get(META_KEY) if isinstance(fm, dict) else None
    if not isinstance(sw, dict):  # put there by hand: a native record in our cluster
        return model.Instance(host=host, port=port, weight=units / WEIGHT_SCALE,
                              healthy=lb.get("health_status", "HEALTHY") in ("HEALTHY", "UNKNOWN"))
    meta = sw.get("metadata") or {}
    return model.Instance(
        host=host, port=port,
        weight=0.0 if sw.get("zero_weight") else units / WEIGHT_SCALE,
        healthy=bool(sw.get("healthy", True)), enabled=bool(sw.get("enabled", True)),
        metadata={str(k): str(v) for k, v in meta.items()},
        protocol=str(sw.get("protocol", "")), cluster=str(sw.get("cluster", "")))


class EnvoyConnector(base.Connector):
    type_name = "envoy"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(source=False, destination=True, gateway=True)
    default_weight: ClassVar[float] = float(WEIGHT_SCALE)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        opts = endpoint.options
        root = _address_dir(endpoint.addresses[0]) if endpoint.addresses else None
        cds = opts.get("cds_path") or (root / "cds.json" if root else None)
        eds = opts.get("eds_dir") or (root / "eds" if root else None)
        if not cds or not eds:
            raise errors.ConfigError([errors.ConfigProblem(
                f"{endpoint.name}.options", "envoy needs options cds_path and eds_dir, or a file:// directory "
                "address")])
        self.cds_path = Path(cds)
        self.eds_dir = Path(eds)
        self.connect_timeout = str(opts.get("connect_timeout", "1s"))

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst)

    # ---- reads ---------------------------------------------------------------------------
    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        return await asyncio.to_thread(self._list_services, namespace)

    def _list_services(self, namespace: str) -> list[model.ServiceKey]:
        with locked(self.cds_path):
            clusters = read_resources(self.cds_path) or []
        keys = {mark_service(m) for c in clusters if (m := cluster_mark(c)) is not None}
        return sorted(k for k in keys if not namespace or k.namespace == namespace)

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        return await asyncio.to_thread(self._list_instances, service)

    def _list_instances(self, service: model.ServiceKey) -> base.Listing:
        with locked(self.cds_path):
            clusters = read_resources(self.cds_path) or []
            found: list[model.Instance] = []
            skipped: list[str] = []
            for c in clusters:
                mark = cluster_mark(c)
                if mark is not None and mark_service(mark) == service:
                    insts, bad = self._endpoints(c)
                    found.extend(insts)
                    skipped.extend(bad)
        return base.Listing(tuple(found), tuple(skipped))

    def _endpoints(self, cluster: Json) -> tuple[list[model.Instance], list[str]]:
        """The endpoints in a cluster's EDS file (a missing file reads as none, and is rewritten)."""
        path = eds_path_of(cluster)
        if path is None:
            raise errors.ReadError(f"cluster {cluster.get('name')!r} in {self.cds_path} has no EDS path")
        resources = read_resources(path) or []
        out: list[model.Instance] = []
        bad: list[str] = []
        for cla in resources:
            for locality in cla.get("endpoints") or []:
                for lb in locality.get("lb_endpoints") or []:
                    try:
                        out.append(endpoint_instance(lb))
                    except ValueError as exc:
                        bad.append(f"{path}: {exc}")
        return out, bad

    # ---- writes --------------------------------------------------------------------------
    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        return await asyncio.to_thread(self._apply, service, plan, ctx)

    def _apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext) -> list[base.Outcome]:
        ops = plan.operations()
        if not ops:
            return []
        refused = {c.address: f"Envoy EDS needs an IP address, not {c.host!r}"
                   for c in plan.creates if not is_ip(c.host)}
        target = sanitize(ctx.upstream_name) if ctx.upstream_name else cluster_name(service)

        def fail(msg: str, temporary: bool) -> list[base.Outcome]:
            return [base.Outcome(op, i.address, False, msg, temporary) for op, i in ops]

        try:
            with locked(self.cds_path):
                clusters = read_resources(self.cds_path) or []
                mine = [i for i, c in enumerate(clusters) if (m := cluster_mark(c)) is not None
                        and m.get("task") == ctx.task and mark_service(m) == service]
                holder = next((c for i, c in enumerate(clusters) if c.get("name") == target and i not in mine),
                              None)
                if holder is not None:
                    who = cluster_mark(holder)
                    owner = f"task {who.get('task')!r}" if who else "nobody (written by hand)"
                    return fail(f"cluster {target!r} in {self.cds_path} is owned by {owner}; not overwritten",
                                False)
                current: dict[model.Address, model.Instance] = {}
                for i in mine:
                    for inst in self._endpoints(clusters[i])[0]:
                        current.setdefault(inst.address, inst)
                wanted = {i.address for i in ctx.desired}
                for d in plan.deletes:
                    # a delete of a duplicate at a wanted address is done by merging into one cluster
                    if d.address not in wanted:
                        current.pop(d.address, None)
                for u in plan.updates:
                    current[u.new.address] = u.new
                for c in plan.creates:
                    if c.address not in refused:
                        current[c.address] = c
                self._write(service, target, clusters, mine, [current[a] for a in sorted(current)], ctx)
        except errors.SyncError as exc:
            return fail(str(exc), isinstance(exc, errors.TemporaryError))
        except OSError as exc:
            return fail(f"cannot write Envoy files: {exc}", True)
        return [base.Outcome(op, i.address, False, refused[i.address], False) if i.address in refused and
                op == "create" else base.Outcome(op, i.address, True) for op, i in ops]

    def _write(self, service: model.ServiceKey, target: str, clusters: list[Json], mine: list[int],
               endpoints: list[model.Instance], ctx: base.ApplyContext) -> None:
        """EDS file first (Envoy refuses a cluster whose file is missing), then CDS, then stale EDS files."""
        old_files = {p for i in mine if (p := eds_path_of(clusters[i])) is not None}
        keep = [c for i, c in enumerate(clusters) if i not in mine]
        new_file: Path | None = None
        if endpoints:
            new_file = self.eds_dir / f"{target}.json"
            self.eds_dir.mkdir(parents=True, exist_ok=True)
            body = discovery_response([{
                "@type": ENDPOINTS_TYPE,
                "cluster_name": target,
                "endpoints": [{"lb_endpoints": [endpoint_json(e) for e in endpoints]}],
            }])
            try:
                same = new_file.read_text() == body
            except OSError:
                same = False
            if not same:
                write_atomic(new_file, body)
            origins = sorted({o for e in endpoints if (o := marks.origin(e.metadata))})
            cluster = {
                "@type": CLUSTER_TYPE,
                "name": target,
                "type": "EDS",
                "connect_timeout": self.connect_timeout,
                "eds_cluster_config": {"service_name": target, "eds_config": {
                    "resource_api_version": "V3", "path_config_source": {"path": str(new_file)}}},
                "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
                "metadata": {"filter_metadata": {META_KEY: {
                    "task": ctx.task, "origin": ",".join(origins), "namespace": service.namespace,
                    "group": service.group, "service": service.name}}},
            }
            keep.insert(mine[0] if mine else len(keep), cluster)
        if keep != clusters:
            write_atomic(self.cds_path, discovery_response(keep))
        for path in old_files - {new_file}:
            if path.parent.resolve() == self.eds_dir.resolve():  # only files we put there
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ---- retiring a unit ----------------------------------------------------------------
    async def retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        return await asyncio.to_thread(self._retire, service, ctx)

    def _retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        try:
            with locked(self.cds_path):
                clusters = read_resources(self.cds_path) or []
                mine = [i for i, c in enumerate(clusters) if (m := cluster_mark(c)) is not None
                        and m.get("task") == ctx.task and mark_service(m) == service]
                done: list[base.Retired] = []
                gone: list[int] = []
                for i in mine:
                    foreign = self._foreign_endpoints(clusters[i], ctx.task)
                    if foreign:
                        done.append(base.Retired("cluster", str(clusters[i].get("name")), base.KEPT,
                                                 f"holds {len(foreign)} endpoint(s) task {ctx.task!r} does not "
                                                 f"own: {', '.join(foreign[:5])}"))
                    else:
                        gone.append(i)
                if gone:
                    self._drop(clusters, gone)
        except errors.SyncError as exc:
            return [base.Retired("cluster", cluster_name(service), base.FAILED, str(exc))]
        except OSError as exc:
            return [base.Retired("cluster", cluster_name(service), base.FAILED, f"cannot write Envoy files: {exc}")]
        return done + [base.Retired("cluster", str(clusters[i].get("name")), base.DELETED) for i in gone]

    def _foreign_endpoints(self, cluster: Json, task: str) -> list[str]:
        insts, bad = self._endpoints(cluster)
        return [f"{i.host}:{i.port}" for i in insts if i.metadata.get(marks.TASK) != task] + bad

    def _drop(self, clusters: list[Json], gone: list[int]) -> None:
        """CDS without the `gone` clusters first, then their EDS files (only those in `eds_dir`)."""
        write_atomic(self.cds_path, discovery_response([c for i, c in enumerate(clusters) if i not in gone]))
        for i in gone:
            path = eds_path_of(clusters[i])
            if path is not None and path.parent.resolve() == self.eds_dir.resolve():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ---- health --------------------------------------------------------------------------
    async def health(self) -> str | None:
        try:
            await self.list_services("")
        except Exception as exc:
            return str(exc)
        for d in (self.cds_path.parent, self.eds_dir):
            if not os.access(d, os.W_OK):
                return f"{d} is not writable"
        return None


def _address_dir(address: str) -> Path | None:
    if address.startswith("file://"):
        return Path(unquote(urlparse(address).path))
    if address.startswith("/"):
        return Path(address)
    return None
