"""Polaris (polarismesh) over its HTTP OpenAPI: source, destination and watch.

Endpoint: `addresses` may list `host:port` (http), `http://...`, `https://...` and
`grpc://...`; polaris-sync configs list both the HTTP and the gRPC port, and the gRPC
ones are ignored here. Addresses are tried in order on connection errors and the
last one that answered is used first afterwards. `token` is sent as
`X-Polaris-Token` on every request. `options`: `verify` (bool or a CA bundle path),
`timeout` (seconds, default 5), `touch_before_delete` (default true),
`skip_absent_reads` (default true; see Reads), and for the
watch `watch_interval` (default 0.1 s), `watch_gate` (default true), `watch_concurrency`
(default 16), `services_interval` (default 1 s), `watch_fail_after` (default 30 s); see
below.

Mapping between the canonical model and Polaris:

- namespace: canonical "" is Polaris "default" (and Polaris "default" is canonical
  ""); other names are the same on both sides. Keys this connector hands back
  (`list_services`, `watch`) keep the namespace spelling the caller used, so a task
  that says "default" and one that says "" both recognise their own keys.
- service: `ServiceKey(ns, group, name)` is Polaris service `group__name` when the
  group is not empty (polaris-sync's `GROUP__service` form), else `name`. A Polaris
  name is split at its first `__` when both sides are non-empty, so a canonical
  name that itself contains `__` in the empty group does not round-trip.
- weight: Polaris weights are integers with default 100 (`default_weight`):
  canonical = polaris / 100. `representable` rounds to 1/100 and clamps to
  0..655.35 (Polaris refuses weights above 65535).
- healthy = healthy, enabled = not isolate, protocol = protocol, ephemeral is always
  False (Polaris keeps a record without heartbeats unless it asked for a health
  check; copies are written with health checks off).
- metadata: Polaris treats `version`, `protocol`, `region`, `zone` and `campus` as
  instance fields (the server copies them into the labels clients see, and its
  OpenAPI strips them from the metadata it returns). So canonical metadata `version`
  is the Polaris `version` field, `region`/`zone`/`campus` are the Polaris location,
  and a metadata `protocol` is the protocol when the canonical protocol is empty
  (otherwise the protocol field wins and the key is dropped). Empty values of
  these keys are not kept. The server-managed key `internal-lastheartbeat` is never
  read nor written.
- cluster: Polaris has no cluster. A non-empty canonical cluster is carried in the
  metadata key `cluster`; reading, a `cluster` metadata key becomes the canonical
  cluster (so a native Polaris `cluster` label maps to a Nacos cluster). A metadata
  key `cluster` next to a non-empty cluster is dropped (the cluster wins).
- native_id is the Polaris instance id; updates and deletes address records by it.

`representable(x)` applies exactly these rules, so `read(write(x)) == representable(x)`.

Reads use the console OpenAPI (`GET /naming/v1/instances`, `/naming/v1/services`).
Those queries make the server refresh its caches from the store before answering, so
a read sees every write that returned. Instances are paged 100 at a time; Polaris
orders them by modification time only, so when the pages do not add up (records
modified in the same instant can swap places between pages) the listing is taken in
one piece from the client Discover API instead, right after a cache refresh. As a
destination (`read_destination`), a namespace read for 8 or more services within 5 s is
listed whole (again every 30 s, in the background), and a service missing from that
list reads as empty with no request of its own, so an initial sync into an empty
namespace costs one paged list instead of one read per service. The list may be old:
the first create into a service read that way must create the service itself, and if
Polaris says it exists already (someone else made it meanwhile) nothing is written, the
creates fail as temporary, and the retry reads the service.
Writes go in batches of 100 (the server's limit): deletes first, then updates, then
creates; a create is an upsert in Polaris. Namespace and service are created first
when missing ("existed resource" counts as success).

Deletes: Polaris 1.18's standalone store (boltdb) does not let its caches see the delete of
a record last written more than ~5 s before (it keeps the old modification time), so
every read API goes on showing it until the record is purged ten minutes later. `apply`
therefore isolates each record (marked `syncworker.deleting`) right before deleting it
(`touch_before_delete`, default on); a native record deleted by its own application in
such a Polaris stays visible, and no client can tell. MySQL-backed Polaris is not affected.

Watch: every `watch_interval` (0.1 s) one console query per namespace of interest
(`GET /naming/v1/instances?namespace=..&limit=100`) refreshes the server's caches and
shows the instance count and the most recently modified records (Polaris sorts by
modification time). Every write gives the record it touches a new revision and the
newest modification time, so a create or an update appears on that page as a new
(id, revision) pair naming its service; a changed page or count also fetches the
per-service instance counts (`GET /naming/v1/services`), which name the services that
gained or lost records. When that cannot be decided (the query failed, the whole page
is new, or the page is one modification second that may continue on the next page),
every watched service of the namespace is polled through the client Discover API
(`POST /v1/Discover` with its last revision; "data not change" is 200001) for the next
2 s, `watch_concurrency` at a time. So a quiet namespace costs one request per round
however many services it holds, and changes surface in about 0.1-0.7 s. Services that
appear in or leave a namespace watched with "*" are yielded and watched from then on.
`watch_gate: false` polls every watched service every round instead (and re-lists "*"
namespaces every `services_interval`). The first event is None (everything must be
reconciled once): it closes the gap between the engine's first reconcile and the
watch's baseline. A watch whose every query has failed for `watch_fail_after` seconds
(default 30) raises TemporaryError; one the server refuses (unauthorised, client API
closed) raises PermanentError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import httpx

from syncworker import errors, jsonwire, model
from syncworker.connectors import base, http
from syncworker.reconcile import planner

log = logging.getLogger("syncworker.connectors.polaris")

DEFAULT_NAMESPACE = "default"
GROUP_SEP = "__"
#: Polaris's own default weight: canonical 1.0
POLARIS_DEFAULT_WEIGHT = 100
MAX_WEIGHT = 65535
#: the server refuses more per batch write and returns at most this many per page
BATCH = 100
PAGE = 100

#: metadata keys that Polaris keeps as instance fields
VERSION_KEY = "version"
PROTOCOL_KEY = "protocol"
LOCATION_KEYS = ("region", "zone", "campus")
FIELD_KEYS = frozenset({VERSION_KEY, PROTOCOL_KEY, *LOCATION_KEYS})
#: metadata keys the server sets by itself
SERVER_KEYS = frozenset({"internal-lastheartbeat"})
#: where a canonical cluster lives in Polaris metadata
CLUSTER_KEY = "cluster"
#: set (with isolate) on a record in the moment before it is deleted
DELETING_KEY = "syncworker.deleting"

# Polaris response codes (polarismesh/specification api/v1/model/code.proto)
EXECUTE_SUCCESS = 200000
DATA_NO_CHANGE = 200001
NO_NEED_UPDATE = 200002
EXISTED_RESOURCE = 400201
NOT_FOUND_RESOURCE = 400202
SAME_INSTANCE_REQUEST = 400208
NOT_FOUND_SERVICE = 400301
NOT_FOUND_INSTANCE = 400303
NOT_FOUND_NAMESPACE = 400305
CLIENT_API_NOT_OPEN = 400401
DATA_CONFLICT = 409000
GONE = frozenset({NOT_FOUND_RESOURCE, NOT_FOUND_SERVICE, NOT_FOUND_INSTANCE, NOT_FOUND_NAMESPACE})
#: the codes with which a service list says the namespace holds nothing
NO_NAMESPACE = frozenset({NOT_FOUND_NAMESPACE, NOT_FOUND_RESOURCE})

Json = dict[str, Any]
#: the service name of the watch's cache-refresh query (it need not exist)
REFRESH_PROBE = "syncworker.watch-refresh"
#: seconds the watch waits after a cache refresh for the server's revision workers
REVISION_SETTLE = 0.02
#: seconds during which every watched service of a namespace is polled after an ambiguous look
HOT_WINDOW = 2.0
#: a namespace read as a destination for this many services within LIST_WINDOW seconds is listed whole,
#: so that services it does not hold are answered empty without a read each
CATALOG_AFTER = 8
LIST_WINDOW = 5.0
#: a namespace's service list is taken again (in the background) once it is this old
LIST_REFRESH = 30.0


# ---- mapping (pure) ---------------------------------------------------------------------
def polaris_namespace(namespace: str) -> str:
    return namespace or DEFAULT_NAMESPACE


def canonical_namespace(namespace: str) -> str:
    return "" if namespace == DEFAULT_NAMESPACE else namespace


def polaris_service_name(service: model.ServiceKey) -> str:
    return f"{service.group}{GROUP_SEP}{service.name}" if service.group else service.name


def split_service_name(name: str) -> tuple[str, str]:
    """(group, name) of a Polaris service name: `GROUP__service` or a plain name."""
    group, sep, rest = name.partition(GROUP_SEP)
    if sep and group and rest:
        return group, rest
    return "", name


def to_polaris_weight(weight: float) -> int:
    if not math.isfinite(weight):
        raise ValueError(f"weight {weight} is not a finite number")
    return max(0, min(MAX_WEIGHT, round(weight * POLARIS_DEFAULT_WEIGHT)))


def from_polaris_weight(weight: int) -> float:
    return weight / POLARIS_DEFAULT_WEIGHT


@dataclasses.dataclass(frozen=True)
class _Fields:
    """A canonical instance split the way Polaris stores it."""

    metadata: dict[str, str]
    protocol: str
    version: str
    location: dict[str, str]
    cluster: str


def _split(inst: model.Instance) -> _Fields:
    meta = {k: v for k, v in inst.metadata.items() if k not in SERVER_KEYS}
    meta_protocol = meta.pop(PROTOCOL_KEY, "")
    meta_cluster = meta.pop(CLUSTER_KEY, "")
    version = meta.pop(VERSION_KEY, "")
    location = {k: meta.pop(k, "") for k in LOCATION_KEYS}
    return _Fields(meta, inst.protocol or meta_protocol, version, location, inst.cluster or meta_cluster)


def representable(inst: model.Instance) -> model.Instance:
    """`inst` as Polaris stores it (see the module docstring)."""
    f = _split(inst)
    meta = dict(f.metadata)
    if f.version:
        meta[VERSION_KEY] = f.version
    meta.update({k: v for k, v in f.location.items() if v})
    weight = inst.weight
    if math.isfinite(weight):
        weight = from_polaris_weight(to_polaris_weight(weight))
    return inst.replace(weight=weight, protocol=f.protocol, cluster=f.cluster, metadata=model.freeze(meta),
                        ephemeral=False)


def instance_to_polaris(inst: model.Instance, namespace: str, service: str, *, with_id: bool = False) -> Json:
    """The OpenAPI body of one instance; `with_id` addresses an existing record by its id."""
    f = _split(inst)
    meta = dict(f.metadata)
    if f.cluster:
        meta[CLUSTER_KEY] = f.cluster
    body: Json = {
        "namespace": namespace,
        "service": service,
        "host": inst.host,
        "port": inst.port,
        "weight": to_polaris_weight(inst.weight),
        "healthy": inst.healthy,
        "isolate": not inst.enabled,
        "protocol": f.protocol,
        "version": f.version,
        "location": f.location,
        "metadata": meta,
        "enable_health_check": False,
    }
    if with_id and inst.native_id:
        body["id"] = inst.native_id
    return body


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} is not a number: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{what} is not a number: {value!r}")


def instance_from_polaris(raw: Mapping[str, Any]) -> model.Instance:
    """One OpenAPI or Discover instance record; ValueError when it cannot be read at all."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"instance record is not an object: {raw!r}")
    host = raw.get("host")
    if not isinstance(host, str):
        raise ValueError(f"host is not a string: {host!r}")
    port_raw = raw.get("port")
    port = 0 if port_raw is None else _int(port_raw, "port")
    weight_raw = raw.get("weight")
    weight = POLARIS_DEFAULT_WEIGHT if weight_raw is None else _int(weight_raw, "weight")
    healthy = raw.get("healthy")
    isolate = raw.get("isolate")
    metadata = raw.get("metadata") or {}
    location = raw.get("location") or {}
    if not isinstance(metadata, Mapping) or not isinstance(location, Mapping):
        raise ValueError("metadata or location is not an object")
    meta = {str(k): str(v) for k, v in metadata.items() if k not in FIELD_KEYS and k not in SERVER_KEYS}
    cluster = meta.pop(CLUSTER_KEY, "")
    version = raw.get("version") or ""
    if version:
        meta[VERSION_KEY] = str(version)
    for key in LOCATION_KEYS:
        value = location.get(key)
        if value:
            meta[key] = str(value)
    return model.Instance(
        host=host,
        port=port,
        weight=from_polaris_weight(weight),
        healthy=True if healthy is None else bool(healthy),
        enabled=not bool(isolate),
        metadata=meta,
        protocol=str(raw.get("protocol") or ""),
        cluster=cluster,
        ephemeral=False,
        native_id=str(raw.get("id") or ""),
    )


def parse_instances(records: Iterable[Any]) -> tuple[list[model.Instance], list[str]]:
    """Usable instances and a note for each record skipped as malformed."""
    good: list[model.Instance] = []
    skipped: list[str] = []
    for raw in records:
        try:
            inst = instance_from_polaris(raw)
        except (TypeError, ValueError) as exc:
            ident = raw.get("id", "?") if isinstance(raw, Mapping) else "?"
            skipped.append(f"instance {ident}: unreadable: {exc}")
            continue
        why = model.validate_instance(inst)
        if why is not None:
            skipped.append(f"{inst.host!r}:{inst.port} (id {inst.native_id or '?'}): {why}")
            continue
        good.append(inst)
    return good, skipped


def parse_addresses(addresses: Iterable[str]) -> list[str]:
    """HTTP(S) base URLs of the configured addresses; grpc:// and other schemes are skipped."""
    return http.base_urls(addresses)


def code_of(body: Mapping[str, Any], status: int) -> int:
    """The Polaris code of a response; derived from the HTTP status when the body has none."""
    code = body.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    return status * 1000


def write_verdict(op: str, code: int) -> tuple[bool, bool]:
    """(ok, temporary) of one write's Polaris code."""
    if 200000 <= code < 300000:
        return True, False
    if op == "create" and code == EXISTED_RESOURCE:
        return True, False
    if op == "delete" and code in GONE:
        return True, False
    temporary = (code >= 500000 or code // 1000 == 429 or code in (SAME_INSTANCE_REQUEST, DATA_CONFLICT)
                 # an update of a record that vanished: the next reconcile creates it
                 or (op == "update" and code in GONE)
                 # the service or namespace went away between our check and the write
                 or (op == "create" and code in GONE))
    return False, temporary


def _fingerprint(records: Iterable[Any]) -> str:
    parts = sorted(f"{r.get('id', '')}:{r.get('revision', '')}" for r in records if isinstance(r, Mapping))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


_describe = http.describe


def _info(body: Mapping[str, Any]) -> str:
    info = body.get("info")
    return str(info) if info else ""


# ---- watch state --------------------------------------------------------------------------
@dataclasses.dataclass
class _Tracked:
    """One watched Polaris service."""

    keys: set[model.ServiceKey]
    explicit: bool = False
    revision: str = ""
    fingerprint: str | None = None
    #: None until the first answer (the baseline), then whether the service exists
    exists: bool | None = None
    failing: bool = False


@dataclasses.dataclass
class _Namespace:
    """A namespace with watched services: what the last look at its instance list showed."""

    #: the caller's spellings when the namespace is watched with "*" (else empty)
    spellings: set[str]
    #: (instance count, (id, revision) of the newest records) of the last look
    signature: tuple[int, frozenset[tuple[str, str]]] | None = None
    #: instances per service name, when known
    counts: dict[str, int] | None = None
    #: every watched service of the namespace is polled until then (loop time)
    hot_until: float = 0.0
    #: the modification second of an ambiguous newest page already answered with a sweep
    tie: str = ""

    @property
    def star(self) -> bool:
        return bool(self.spellings)

    def keys_of(self, name: str) -> set[model.ServiceKey]:
        return {model.ServiceKey(ns, *split_service_name(name)) for ns in self.spellings}


class PolarisConnector(http.HttpConnector):
    type_name = "polaris"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(
        source=True, destination=True, watch=True, batch_writes=True, needs_heartbeats=False)
    default_weight: ClassVar[float] = float(POLARIS_DEFAULT_WEIGHT)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        bases = parse_addresses(endpoint.addresses)
        if not bases:
            raise errors.ConfigError([errors.ConfigProblem(
                "addresses", "no HTTP(S) address for Polaris (host:port, http://... or https://...)")],
                source=endpoint.name)
        opts = dict(endpoint.options or {})
        self.timeout = float(opts.get("timeout", 5.0))
        self.verify: Any = opts.get("verify", True)
        self.watch_interval = float(opts.get("watch_interval", 0.1))
        self.services_interval = float(opts.get("services_interval", 1.0))
        self.watch_concurrency = max(1, int(opts.get("watch_concurrency", 16)))
        self.watch_gate = bool(opts.get("watch_gate", True))
        self.touch_before_delete = bool(opts.get("touch_before_delete", True))
        #: seconds of failing watch polls after which the watch gives up (the engine resyncs and restarts it)
        self.watch_fail_after = float(opts.get("watch_fail_after", 30.0))
        self._ensured: set[tuple[str, str]] = set()
        self._namespaces: set[str] = {DEFAULT_NAMESPACE}
        self.skip_absent = bool(opts.get("skip_absent_reads", True))
        #: namespace -> (monotonic time listed, service names then present)
        self._present: dict[str, tuple[float, set[str]]] = {}
        self._reads: dict[str, list[float]] = {}
        self._listing: dict[str, asyncio.Lock] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        #: services answered empty from a service list: the next create checks that they are still new
        self._unverified: set[tuple[str, str]] = set()
        headers = {"X-Polaris-Token": self.endpoint.token} if self.endpoint.token else {}
        self.http = http.Transport(bases, timeout=self.timeout, verify=self.verify, headers=headers,
                                   auth=None, max_connections=max(32, self.watch_concurrency * 2))

    # ---- lifecycle ------------------------------------------------------------------
    async def close(self) -> None:
        jobs = list(self._refreshing.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await super().close()

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst)

    @staticmethod
    def _body(resp: httpx.Response) -> Json:
        try:
            data = jsonwire.loads(resp.content)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    async def _read(self, method: str, path: str, what: str, *, params: Mapping[str, Any] | None = None,
                    body: Any = None) -> tuple[int, Json]:
        """(Polaris code, body) of a read; transport failures and 5xx are a ReadError."""
        try:
            resp = await self._send(method, path, params=params, body=body, idempotent=True)
        except httpx.HTTPError as exc:
            raise errors.ReadError(f"polaris {self.name}: {what}: {_describe(exc)}") from exc
        data = self._body(resp)
        if "code" not in data:
            raise errors.ReadError(f"polaris {self.name}: {what}: HTTP {resp.status_code} without a Polaris answer")
        code = code_of(data, resp.status_code)
        if resp.status_code >= 500 or code >= 500000:
            raise errors.ReadError(f"polaris {self.name}: {what}: HTTP {resp.status_code} code {code}"
                                   f" {_info(data)}".rstrip())
        return code, data

    async def _write(self, method: str, path: str, body: Any, what: str) -> tuple[int, Json]:
        """(Polaris code, body) of a write; transport failures are a TemporaryError."""
        try:
            resp = await self._send(method, path, body=body, idempotent=False)
        except httpx.HTTPError as exc:
            raise errors.TemporaryError(f"polaris {self.name}: {what}: {_describe(exc)}") from exc
        data = self._body(resp)
        if "code" in data:
            return code_of(data, resp.status_code), data
        # not a Polaris answer (a proxy's page, say): a client error is final, anything else
        # leaves the write's fate unknown, and writes are idempotent, so it is worth a retry
        status = resp.status_code
        return (status * 1000 if 400 <= status < 500 else 500000), {}

    def _page(self, data: Mapping[str, Any], field: str, what: str) -> tuple[int, list[Any]]:
        """(amount, records) of one page of a console listing."""
        try:
            total = _int(data.get("amount") or 0, "amount")
        except ValueError as exc:
            raise errors.ReadError(f"polaris {self.name}: {what}: {exc}") from exc
        page = data.get(field) or []
        if not isinstance(page, list):
            raise errors.ReadError(f"polaris {self.name}: {what}: {field} is not a list")
        return total, page

    def _where(self, service: model.ServiceKey) -> tuple[str, str]:
        return polaris_namespace(service.namespace), polaris_service_name(service)

    async def health(self) -> str | None:
        """None when Polaris answers a console query with this token (a cheap exact-name lookup)."""
        try:
            code, data = await self._read("GET", "/naming/v1/services", "health check",
                                          params={"namespace": DEFAULT_NAMESPACE, "name": REFRESH_PROBE})
        except errors.SyncError as exc:
            return str(exc)
        if code != EXECUTE_SUCCESS:
            return f"polaris {self.name}: health check: code {code} {_info(data)}".rstrip()
        return None

    # ---- reads ----------------------------------------------------------------------
    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        for _attempt in range(3):
            counts = await self._service_counts(polaris_namespace(namespace), gone=NO_NAMESPACE)
            if counts is not None:
                return sorted(model.ServiceKey(namespace, *split_service_name(n)) for n in counts)
        raise errors.ReadError(f"polaris {self.name}: list services of namespace {polaris_namespace(namespace)}: "
                               "the list changed while it was paged; try again")

    async def read_destination(self, service: model.ServiceKey) -> base.Listing:
        pns, pname = self._where(service)
        if self.skip_absent and await self._listed_absent(pns, pname):
            self._unverified.add((pns, pname))
            return base.Listing(())
        return await self.list_instances(service)

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        pns, pname = self._where(service)
        records = await self._instance_records(pns, pname)
        good, skipped = parse_instances(records)
        if skipped:
            log.warning("skipped malformed polaris instances", extra={
                "endpoint": self.name, "service": str(service), "count": len(skipped), "first": skipped[0]})
        return base.Listing(tuple(good), tuple(skipped))

    async def _listed_absent(self, pns: str, pname: str) -> bool:
        """Whether the namespace's service list says `pname` does not exist (then it is not read).

        An initial sync reads thousands of destination services that do not exist yet. A
        namespace read for CATALOG_AFTER services within LIST_WINDOW is listed whole once,
        and again in the background every LIST_REFRESH; services missing from it read as
        empty. The list may be old, which is safe: a service someone created since then is
        caught before anything is written to it, because the first create into a service
        answered this way must create the service itself (`apply`): when Polaris says it
        exists already, the creates fail as temporary, the service counts as present, and
        the retry reads it. An empty listing plans no update and no delete.
        """
        if (pns, pname) in self._ensured:
            return False
        known = self._present.get(pns)
        if known is None:
            now = time.monotonic()
            recent = [t for t in self._reads.get(pns, []) if now - t <= LIST_WINDOW]
            recent.append(now)
            self._reads[pns] = recent[-CATALOG_AFTER:]
            if len(recent) < CATALOG_AFTER:
                return False
            async with self._listing.setdefault(pns, asyncio.Lock()):
                known = self._present.get(pns)
                if known is None:
                    await self._list_present(pns)
                    known = self._present.get(pns)
                    if known is None:
                        return False
        elif time.monotonic() - known[0] > LIST_REFRESH and pns not in self._refreshing:
            job = asyncio.ensure_future(self._list_present(pns))
            self._refreshing[pns] = job
            job.add_done_callback(lambda _: self._refreshing.pop(pns, None))
        return pname not in known[1]

    async def _list_present(self, pns: str) -> None:
        """List the namespace's services into `_present` (a failed list leaves what was known)."""
        started = time.monotonic()
        try:
            # not strict: a service missed while the namespace changed under the paging is
            # answered absent, which is safe (see `_listed_absent`); a strict list of a namespace
            # an initial sync is filling came out inconsistent again and again, each try paging
            # the whole namespace while every destination read waited for it
            names = set(await self._service_counts(pns, strict=False, gone=NO_NAMESPACE) or ())
        except errors.SyncError as exc:
            log.debug("polaris: service list failed", extra={"endpoint": self.name, "error": str(exc)})
            return
        known = self._present.get(pns)
        if known is not None:  # what became present while the list was read stays present (safe when gone)
            names |= known[1]
        self._present[pns] = (started, names)

    def _mark_present(self, pns: str, pname: str) -> None:
        known = self._present.get(pns)
        if known is not None:
            known[1].add(pname)

    async def _instance_records(self, pns: str, pname: str) -> list[Any]:
        what = f"list instances of {pns}/{pname}"
        seen: dict[str, Any] = {}
        amount: int | None = None
        offset = 0
        while True:
            code, data = await self._read("GET", "/naming/v1/instances", what,
                                          params={"namespace": pns, "service": pname,
                                                  "offset": offset, "limit": PAGE})
            if code in GONE:
                return []
            if code != EXECUTE_SUCCESS:
                raise errors.ReadError(f"polaris {self.name}: {what}: code {code} {_info(data)}".rstrip())
            total, page = self._page(data, "instances", what)
            if amount is None:
                amount = total
            elif total != amount:
                break
            for i, raw in enumerate(page):
                ident = raw.get("id") if isinstance(raw, Mapping) else None
                seen[str(ident) if ident else f"#{offset + i}"] = raw
            offset += len(page)
            if not page or offset >= total:
                break
        if amount is not None and len(seen) == amount and offset == amount:
            return list(seen.values())
        # Pages overlapped or the set changed underneath: take one complete snapshot.
        return await self._discover_records(pns, pname, what)

    async def _discover_records(self, pns: str, pname: str, what: str) -> list[Any]:
        # the Discover API serves the server's caches: bring them up to date with the store first
        await self._read("GET", "/naming/v1/services", what, params={"namespace": pns, "name": pname})
        body = {"type": "INSTANCE", "service": {"name": pname, "namespace": pns}}
        code, data = await self._read("POST", "/v1/Discover", what, body=body)
        if code != EXECUTE_SUCCESS:
            raise errors.ReadError(f"polaris {self.name}: {what}: discover answered code {code}"
                                   f" {_info(data)}".rstrip())
        return list(data.get("instances") or [])

    # ---- writes ---------------------------------------------------------------------
    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        pns, pname = self._where(service)
        outcomes: list[base.Outcome] = []
        deletes = [("delete", d) for d in plan.deletes]
        updates = [("update", u.new) for u in plan.updates]
        creates = [("create", c) for c in plan.creates]
        for chunk in _chunks(deletes, BATCH):
            if self.touch_before_delete:
                await self._touch(pns, pname, [inst for _, inst in chunk])
            outcomes += await self._batch("POST", "/naming/v1/instances/delete", pns, pname, chunk)
        for chunk in _chunks(updates, BATCH):
            outcomes += await self._batch("PUT", "/naming/v1/instances", pns, pname, chunk)
        if creates:
            fresh = (pns, pname) in self._unverified and (pns, pname) not in self._ensured
            problem = await self._ensure_service(pns, pname, must_be_new=fresh)
            if problem is not None:
                error, temporary = problem
                return outcomes + [base.Outcome(op, inst.address, False, error, temporary)
                                   for op, inst in creates]
        for chunk in _chunks(creates, BATCH):
            outcomes += await self._batch("POST", "/naming/v1/instances", pns, pname, chunk)
        return outcomes

    async def _batch(self, method: str, path: str, pns: str, pname: str,
                     items: list[tuple[str, model.Instance]]) -> list[base.Outcome]:
        op = items[0][0]
        what = f"{op} {len(items)} instance(s) of {pns}/{pname}"
        bodies: list[Json] = []
        failed: dict[int, base.Outcome] = {}
        for i, (o, inst) in enumerate(items):
            try:
                bodies.append(instance_to_polaris(inst, pns, pname, with_id=o != "create"))
            except ValueError as exc:
                failed[i] = base.Outcome(o, inst.address, False, str(exc), temporary=False)
        sendable = [(i, item) for i, item in enumerate(items) if i not in failed]
        results: dict[int, base.Outcome] = dict(failed)
        if sendable:
            try:
                top, data = await self._write(method, path, bodies, what)
            except errors.TemporaryError as exc:
                for i, (o, inst) in sendable:
                    results[i] = base.Outcome(o, inst.address, False, str(exc), temporary=True)
            else:
                responses = data.get("responses")
                per_item = isinstance(responses, list) and len(responses) == len(sendable)
                for n, (i, (o, inst)) in enumerate(sendable):
                    item: Mapping[str, Any] = responses[n] if per_item else {}  # type: ignore[index]
                    if not isinstance(item, Mapping):
                        item = {}
                    code = code_of(item, 0) if item.get("code") is not None else top
                    ok, temporary = write_verdict(o, code)
                    error = "" if ok else f"polaris code {code} {_info(item) or _info(data)}".rstrip()
                    if not ok and o == "create" and code in GONE:
                        self._ensured.discard((pns, pname))
                        self._namespaces.discard(pns)
                    results[i] = base.Outcome(o, inst.address, ok, error, temporary)
        if not all(r.ok for r in results.values()):
            self._mark_present(pns, pname)
        return [results[i] for i in range(len(items))]

    async def _touch(self, pns: str, pname: str, doomed: list[model.Instance]) -> None:
        """Isolate and mark records about to be deleted, so that the delete becomes visible.

        Polaris 1.18's standalone store (boltdb) marks a deleted record without renewing the
        modification time its caches read changes by, so the delete of a record last written
        more than ~5 s before never reaches the caches behind every read API (until the record
        is purged, 10 min later). An update renews that time; the delete right after is seen.
        Isolating first also drains traffic from the record before it goes.
        """
        bodies = []
        for inst in doomed:
            try:
                body = instance_to_polaris(inst, pns, pname, with_id=True)
            except ValueError:
                continue
            body["isolate"] = True
            body["metadata"] = {**body["metadata"], DELETING_KEY: "true"}
            bodies.append(body)
        if not bodies:
            return
        try:
            await self._write("PUT", "/naming/v1/instances", bodies, f"isolate {len(bodies)} instance(s) before delete")
        except errors.TemporaryError as exc:
            log.debug("polaris: touch before delete failed", extra={"endpoint": self.name, "error": str(exc)})

    async def _ensure_service(self, pns: str, pname: str, must_be_new: bool = False) -> tuple[str, bool] | None:
        """Create the namespace and the service when missing; (error, temporary) when that failed.

        `must_be_new`: the service was read as empty from a service list only (`_listed_absent`), so
        it must not exist yet; when it does, that is a temporary error and the retry reads it.
        """
        if (pns, pname) in self._ensured:
            return None
        # one creation of a service at a time in this process (see `_creation_lock`)
        async with _creation_lock(tuple(self.bases), pns, pname):
            if (pns, pname) in self._ensured:
                return None
            return await self._create_service(pns, pname, must_be_new)

    async def _create_service(self, pns: str, pname: str, must_be_new: bool) -> tuple[str, bool] | None:
        if pns not in self._namespaces:
            async with _creation_lock(tuple(self.bases), pns, ""):
                if pns not in self._namespaces:
                    _, problem = await self._create("/naming/v1/namespaces", {"name": pns},
                                                    f"create namespace {pns}")
                    if problem is not None:
                        return problem
                    self._namespaces.add(pns)
        code, problem = await self._create("/naming/v1/services", {"name": pname, "namespace": pns},
                                           f"create service {pns}/{pname}")
        if problem is not None:
            return problem
        self._unverified.discard((pns, pname))
        self._mark_present(pns, pname)
        if must_be_new and code == EXISTED_RESOURCE:
            return (f"polaris {self.name}: service {pns}/{pname} was created by someone else after its "
                    "namespace was listed; it is read before anything is written to it", True)
        self._ensured.add((pns, pname))
        return None

    async def _create(self, path: str, body: Json, what: str) -> tuple[int, tuple[str, bool] | None]:
        """POST one resource; (its code, None) when it exists now (made or there already), else the problem
        as (error, temporary)."""
        try:
            top, data = await self._write("POST", path, [body], what)
        except errors.TemporaryError as exc:
            return 0, (str(exc), True)
        responses = data.get("responses")
        item = responses[0] if isinstance(responses, list) and responses and isinstance(
            responses[0], Mapping) else {}
        code = code_of(item, 0) if item.get("code") is not None else top
        if not (200000 <= code < 300000 or code == EXISTED_RESOURCE):
            _ok, temporary = write_verdict("create", code)
            return code, (f"polaris {self.name}: {what}: code {code} {_info(item) or _info(data)}".rstrip(), temporary)
        return code, None

    # ---- watch ----------------------------------------------------------------------
    async def watch(self, services: Sequence[model.ServiceKey], namespaces: Sequence[str]
                    ) -> AsyncIterator[base.WatchEvent]:
        tracked: dict[tuple[str, str], _Tracked] = {}
        spaces: dict[str, _Namespace] = {}
        for key in services:
            where = self._where(key)
            tracked.setdefault(where, _Tracked(set(), explicit=True)).keys.add(key)
            spaces.setdefault(where[0], _Namespace(set()))
        for ns in namespaces:
            spaces.setdefault(polaris_namespace(ns), _Namespace(set())).spellings.add(ns)
        loop = asyncio.get_running_loop()
        baseline = True
        failing_since: float | None = None
        degraded = False
        next_recount = 0.0
        while True:
            started = loop.time()
            events: list[model.ServiceKey] = []
            hot: set[str] = set()
            calls = failures = 0
            recount = started >= next_recount
            if recount:
                next_recount = started + self.services_interval
            for pns, space in spaces.items():
                names: set[str] = set()
                calls += 1
                try:
                    if self.watch_gate:
                        names, sweep = await self._gate(pns, space, started)
                    else:
                        sweep = True
                        if space.star and recount:
                            names = await self._recount(pns, space)
                except errors.TemporaryError as exc:
                    failures += 1
                    sweep = True
                    log.debug("polaris watch: namespace query failed", extra={
                        "endpoint": self.name, "namespace": pns, "error": str(exc)})
                if sweep:
                    space.hot_until = started + HOT_WINDOW
                if started < space.hot_until:
                    hot.add(pns)
                events += self._attribute(pns, space, names, tracked)
            due = [(w, t) for w, t in tracked.items() if t.exists is None or w[0] in hot]
            if due:
                await self._refresh_server_cache()
                calls += len(due)
                for (where, t), res in zip(due, await self._poll_all(due), strict=True):
                    if isinstance(res, BaseException):
                        failures += 1
                        if not t.failing:
                            t.failing = True
                            log.debug("polaris watch: poll failed", extra={
                                "endpoint": self.name, "service": f"{where[0]}/{where[1]}", "error": str(res)})
                        continue
                    t.failing = False
                    if res:
                        events += sorted(t.keys)
            if bool(failures) != degraded:
                degraded = bool(failures)
                if degraded:
                    log.warning("polaris watch: queries failing; changes may show late", extra={
                        "endpoint": self.name, "failed": failures, "of": calls})
                else:
                    log.info("polaris watch: queries answer again", extra={"endpoint": self.name})
            if calls and failures == calls:
                failing_since = failing_since if failing_since is not None else started
                if loop.time() - failing_since > self.watch_fail_after:
                    raise errors.TemporaryError(
                        f"polaris {self.name}: watch: every query failed for {self.watch_fail_after:.0f}s")
            else:
                failing_since = None
            if baseline:
                baseline = False
                yield None
            seen: set[model.ServiceKey] = set()
            for key in events:
                if key not in seen:
                    seen.add(key)
                    yield key
            await asyncio.sleep(max(0.0, self.watch_interval - (loop.time() - started)))

    async def _gate(self, pns: str, space: _Namespace, now: float) -> tuple[set[str], bool]:
        """(services seen changing, whether every watched service of `pns` must be polled).

        One console query gives the namespace's instance count and its most recently modified
        instances (Polaris orders by modification time, newest first). Every write gives the
        record it touches a new revision and the newest modification time, so a create or an
        update shows as a new (id, revision) pair on that page, naming its service, and a delete
        changes the count; then the per-service instance counts tell which services gained or
        lost records. The answer is ambiguous when the page cannot hold every record of the
        newest modification second (all on it share one `mtime`): then, and whenever the page
        is all new or a query fails, every watched service is polled for a while instead.
        """
        what = f"watch namespace {pns}"
        code, data = await self._read("GET", "/naming/v1/instances", what,
                                      params={"namespace": pns, "offset": 0, "limit": PAGE})
        if code in GONE:
            code, data = EXECUTE_SUCCESS, {"amount": 0, "instances": []}
        if code != EXECUTE_SUCCESS:
            self._fatal_watch_code(code, data)
            raise errors.TemporaryError(f"polaris {self.name}: {what}: code {code} {_info(data)}".rstrip())
        total, page = self._page(data, "instances", what)
        records = [r for r in page if isinstance(r, Mapping)]
        sweep = False
        kept = records
        if len(records) >= PAGE:
            # records of the oldest second on a full page may trade places with ones on the next page
            floor = str(records[-1].get("mtime") or "")
            kept = [r for r in records if str(r.get("mtime") or "") != floor]
            if not kept and floor != space.tie:
                space.tie = floor
                sweep = True
        pairs = frozenset((str(r.get("id") or ""), str(r.get("revision") or "")) for r in kept)
        signature = (total, pairs)
        names: set[str] = set()
        if space.signature is None:
            await self._recount(pns, space)
            sweep = True
        elif signature != space.signature:
            fresh = [r for r in kept if (str(r.get("id") or ""), str(r.get("revision") or ""))
                     not in space.signature[1]]
            names.update(str(r["service"]) for r in fresh if r.get("service"))
            if kept and len(fresh) == len(kept) and len(records) >= PAGE:
                sweep = True  # more may have changed than one page shows
            had_counts = space.counts is not None
            try:
                names |= await self._recount(pns, space)
            except errors.TemporaryError:
                space.counts = None
            if not had_counts or space.counts is None:
                sweep = True  # deletes cannot be told apart without counts from before and after
        space.signature = signature
        return names, sweep

    async def _recount(self, pns: str, space: _Namespace) -> set[str]:
        """Refresh the per-service instance counts of `pns`; the services whose count changed."""
        counts = await self._service_counts(pns)
        before, space.counts = space.counts, counts
        if before is None or counts is None:
            return set()
        return {n for n in before.keys() | counts.keys() if before.get(n) != counts.get(n)}

    async def _service_counts(self, pns: str, *, strict: bool = True, gone: frozenset[int] = GONE
                              ) -> dict[str, int] | None:
        """Instances per service of `pns` (console service list) in one paged pass; {} when Polaris
        answers a code in `gone`; None (`strict`) when the list changed while it was paged.

        Not strict: whatever the pages held, even when services were created during the pass
        (an initial sync creates them all the time, so a strict list of a busy namespace may
        never come out consistent).
        """
        what = f"list services of namespace {pns}"
        counts: dict[str, int] = {}
        amount: int | None = None
        offset = 0
        while True:
            code, data = await self._read("GET", "/naming/v1/services", what,
                                          params={"namespace": pns, "offset": offset, "limit": PAGE})
            if code in gone:
                return {}
            if code != EXECUTE_SUCCESS:
                raise errors.ReadError(f"polaris {self.name}: {what}: code {code} {_info(data)}".rstrip())
            total, page = self._page(data, "services", what)
            if amount is None:
                amount = total
            elif total != amount and strict:
                return None
            for svc in page:
                if isinstance(svc, Mapping) and svc.get("name") and svc.get("namespace", pns) == pns:
                    count = svc.get("total_instance_count", svc.get("totalInstanceCount", 0))
                    counts[str(svc["name"])] = count if isinstance(count, int) else 0
            offset += len(page)
            if not page or offset >= total:
                break
        return counts if not strict or len(counts) == amount else None

    def _attribute(self, pns: str, space: _Namespace, names: set[str],
                   tracked: dict[tuple[str, str], _Tracked]) -> list[model.ServiceKey]:
        """Keys of the changed services `names`; services appearing in or leaving a "*" namespace."""
        out: list[model.ServiceKey] = []
        for name in sorted(names):
            where = (pns, name)
            t = tracked.get(where)
            present = space.counts is None or name in space.counts
            if t is None:
                if not space.star or not present:
                    continue
                t = tracked[where] = _Tracked(space.keys_of(name))
            out += sorted(t.keys)
            if not present and not t.explicit:
                del tracked[where]
        if space.star and space.counts is not None:
            # services of a "*" namespace are watched too (found at the baseline; new ones above)
            for name in space.counts:
                if (pns, name) not in tracked:
                    tracked[(pns, name)] = _Tracked(space.keys_of(name))
                else:
                    tracked[(pns, name)].keys |= space.keys_of(name)
        return out

    async def _poll_all(self, due: list[tuple[tuple[str, str], _Tracked]]) -> list[bool | BaseException]:
        gate = asyncio.Semaphore(self.watch_concurrency)

        async def poll(where: tuple[str, str], t: _Tracked) -> bool | BaseException:
            async with gate:
                try:
                    return await self._poll_instances(where, t)
                except errors.TemporaryError as exc:
                    return exc

        return list(await asyncio.gather(*(poll(w, t) for w, t in due)))

    async def _refresh_server_cache(self) -> None:
        """Have Polaris load what changed in its store into the cache its Discover API serves.

        Console queries refresh the server's service and instance caches before they answer
        (that is what makes them read-after-write); an exact-name service query is the cheapest
        of them. Without it the cache follows its own one-second tick.
        """
        try:
            await self._read("GET", "/naming/v1/services", "refresh",
                             params={"namespace": DEFAULT_NAMESPACE, "name": REFRESH_PROBE})
        except errors.ReadError as exc:
            log.debug("polaris watch: cache refresh query failed", extra={"endpoint": self.name, "error": str(exc)})
            return
        # the server computes service revisions right after the refresh, asynchronously
        await asyncio.sleep(REVISION_SETTLE)

    async def _poll_instances(self, where: tuple[str, str], t: _Tracked) -> bool:
        """True when the service changed since the last poll (never on the first answer)."""
        pns, pname = where
        body = {"type": "INSTANCE", "service": {"name": pname, "namespace": pns, "revision": t.revision}}
        code, data = await self._read("POST", "/v1/Discover", f"watch {pns}/{pname}", body=body)
        if code == DATA_NO_CHANGE:
            return False
        if code in GONE:
            changed = t.exists is True
            t.exists, t.revision, t.fingerprint = False, "", None
            return changed
        if code != EXECUTE_SUCCESS:
            self._fatal_watch_code(code, data)
            raise errors.TemporaryError(f"polaris {self.name}: watch {pns}/{pname}: code {code} {_info(data)}")
        svc = data.get("service") or {}
        fingerprint = _fingerprint(data.get("instances") or [])
        changed = t.exists is False or (t.exists is True and fingerprint != t.fingerprint)
        t.exists, t.fingerprint = True, fingerprint
        t.revision = str(svc.get("revision") or "") if isinstance(svc, Mapping) else ""
        return changed

    def _fatal_watch_code(self, code: int, data: Mapping[str, Any]) -> None:
        if code == CLIENT_API_NOT_OPEN or code // 1000 in (401, 403):
            raise errors.PermanentError(
                f"polaris {self.name}: the watch is refused: code {code} {_info(data)}".rstrip())


_CREATION_LOCKS: dict[tuple[int, tuple[str, ...], str, str], asyncio.Lock] = {}


def _creation_lock(bases: tuple[str, ...], pns: str, pname: str) -> asyncio.Lock:
    """The lock that serialises creating one service on one Polaris, per event loop.

    Polaris 1.18.1's standalone store loses a service when two requests create it at the same
    instant: the instances written meanwhile point at a service id the store no longer has,
    and from then on every instance query of that namespace panics in the server (seen in
    this project's CI: two applies into one new service at once). Connectors of one process
    (tasks, units, tests) therefore never create the same service concurrently; another
    client doing so at the same instant can still trigger it.
    """
    key = (id(asyncio.get_running_loop()), bases, pns, pname)
    lock = _CREATION_LOCKS.get(key)
    if lock is None:
        lock = _CREATION_LOCKS[key] = asyncio.Lock()
    return lock


def _chunks(items: list[tuple[str, model.Instance]], size: int) -> Iterable[list[tuple[str, model.Instance]]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]

