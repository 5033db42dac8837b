"""Nacos 2.x and 3.x over HTTP: source, destination and watch (type "nacos").

Endpoint. `addresses` are `host[:port]` (http, port 8848 when left out) or
`http(s)://host[:port][/context]` (the scheme's port when left out); the context path
defaults to `/nacos` (option `context_path` overrides it); `grpc://` addresses are
ignored. Addresses are tried in order on connection errors and the
last one that answered is tried first afterwards. With `user`/`password` the
connector logs in (`POST /v3/auth/user/login`, on 2.x `/v1/auth/login`), sends the
token in the `accessToken` header (never in a URL), refreshes it at 80% of its
`tokenTtl` (at least 60 s early) and logs in again once when a request answers 403.
Login errors name the endpoint, the server and the user, never the password; Nacos
3.1 answers a wrong password for an existing user with a bare HTTP 500 (an unknown
user with 403), so the former is reported as temporary with a hint to check the
credentials. Options: `timeout` (s, default 5), `verify` (bool or CA bundle path, for
https), `api` ("v3" or "v1"; detected by default), `copies` ("auto", "persistent",
"ephemeral"; below), `heartbeat_interval` (5), `ephemeral_unhealthy_after` (60),
`ephemeral_delete_after` (600), `watch_interval` (0.1), `namespace_watch_interval`
(0.1), `watch_concurrency` (16); durations in seconds.

APIs. Nacos 3.x (detected by `GET /v3/admin/ns/service/list` answering) is used
through its v3 admin API: `/v3/admin/ns/service` (detail: clusters, service kind),
`/v3/admin/ns/instance/list` (one cluster per call, disabled and unhealthy instances
included), `/v3/admin/ns/service/list` (the catalog, paged, every group, optionally
with instances), `POST|DELETE /v3/admin/ns/instance`, `PUT /v3/admin/ns/cluster`,
and the v3 client API's heartbeat (`POST /v3/client/ns/instance?heartBeat=true`).
3.x switches most v1/v2 APIs off by default (410 Gone: the catalog, v1 update, v1
cluster), and the v1 client instance list hides disabled instances, so v1 is not an
option there. Nacos 2.x (the v3 path answers 404) is used through `/v1/ns/instance`
(POST, DELETE), `/v1/ns/instance/beat`, `PUT /v1/ns/cluster`, `/v1/ns/catalog/services`
and `/v2/ns/catalog/instances` (2.2+, lists disabled instances; before 2.2 the fallback
`/v1/ns/instance/list` cannot see disabled instances, so a disabled copy would be
written again on every reconcile). The 2.x path was run against Nacos 3.1 with the
compatibility switches on, not against a 2.x server.

Mapping between the canonical model and Nacos:

- namespace "" is Nacos "public" (2.x and 3.x both accept the id "public"; the config
  layer maps polaris-sync's "empty_ns" to ""). Keys handed back keep the caller's
  spelling, so "public" and "" both work.
- group "" is DEFAULT_GROUP (and DEFAULT_GROUP reads as ""); polaris-sync's
  `GROUP__service` names are split by the engine (`parse_service`).
- cluster "" is Nacos "DEFAULT" (and "DEFAULT" reads as ""), so copies between two
  Nacos land in the cluster they came from and a registry without clusters writes to
  DEFAULT. Other names are the same on both sides (Nacos allows [0-9a-zA-Z-]).
- weight: canonical = Nacos weight (Nacos's default is 1.0); `representable` clamps to
  Nacos's 0..10000; Nacos keeps a double, which round-trips exactly.
- healthy, enabled: the same. metadata: the same, minus the liveness keys below.
- protocol: Nacos has no field; it lives in the metadata key `protocol`. Writing, a
  protocol sets that key; reading, the key (if any) is the protocol and stays in the
  metadata too, so a Nacos native's `protocol` label travels both ways.
- native_id: the instanceId (3.x leaves it out of its answers: then Nacos's default
  `ip#port#cluster#group@@service`).
- ephemeral: natives read as Nacos stores them. Copies (records with an origin mark)
  read as ephemeral=True whatever Nacos holds, and `representable` says the same: the
  kind of record is the connector's choice per service (below), which `representable`
  cannot see, and this keeps `read(write(x)) == representable(x)` while making the
  engine hand every copy to `heartbeat()`, which beats the ones Nacos keeps ephemeral.
- the preserved keys `preserved.heart.beat.interval`, `preserved.heart.beat.timeout`
  and `preserved.ip.delete.timeout` are stripped from copies when read and from the
  metadata a copy is written from (a native's own liveness settings are not copied).
  Nacos adds no other metadata key of its own.

Ephemeral or persistent copies (the key choice). Nacos 2.x/3.x keep one kind of
instance per service and refuse the other kind ("Current service ... is persistent
service, can't register ephemeral instance", both ways; seen on 3.1). Ephemeral
records live only while heartbeated; persistent ones live until deleted. Copies must
not vanish when the sync process stops or crashes, which argues for persistent copies,
but a persistent copy locks its service: the applications being migrated register
themselves ephemeral (every SDK's default), and Nacos refuses them once the service
holds a persistent copy. Hot migration means exactly that: the copies of a service are
in Nacos when its first instances start there. So with `copies: auto` (the default):

- a service that exists follows its kind (from the service detail, or from its
  instances), and a refused create retries with the other kind;
- a new service gets ephemeral copies, written over HTTP with the preserved keys:
  heartbeat interval 5 s, unhealthy after 60 s and deleted after 600 s without a
  beat. `heartbeat()` (called by the engine every 5 s) beats them. A sync process
  that is down for less than a minute leaves them untouched; one down longer leaves
  them unhealthy (consumers skip them) until it is back, and after ten minutes Nacos
  deletes them, and the next reconcile writes them again. Measured on 3.1: beaten
  copies stay healthy indefinitely, unbeaten ones with default timeouts are untouched
  after 40 s, and with 6 s/12 s timeouts an unbeaten copy turns unhealthy and is then
  deleted, so the preserved keys are honoured. Unhealthy copies are not beaten (a beat
  marks an ephemeral instance healthy); they are deleted after the delete timeout and
  written again by the next reconcile.
- `copies: persistent` writes persistent copies (no heartbeat, they survive anything
  but a delete; the service then refuses ephemeral natives); `copies: ephemeral`
  always writes ephemeral ones (a persistent service then refuses them).

Nacos TCP-checks persistent instances and would overwrite the health carried from
the source (seen: a copy at an address nobody listens on turns unhealthy within
seconds), so after writing a persistent copy the connector switches the health check
of its cluster to NONE, unless that cluster holds persistent natives; then Nacos's
check stays on and decides the copies' health (a copy whose source health differs is
rewritten at every reconcile: a documented limitation of that rare mix).

Reads. `list_instances` reads the service detail, then each cluster's instances; a
missing service is an empty listing (told apart from a wrong URL by Nacos's own error
body); anything else that fails is a ReadError; malformed records are skipped into
`Listing.skipped`. `list_services` pages the catalog (every group, empty services
included) and raises ReadError when the catalog changes under the paging three times.
Nacos serves instance lists from a cache refreshed about 0.5-0.6 s after a write
(its push delay), so a read right after a write may not see it yet.

Writes. One Outcome per operation, deletes first, then updates, then creates; 5xx,
429 and connection failures are temporary, other refusals permanent. A create and an
update are one register each (POST with clusterName, ephemeral, weight, healthy,
enabled and metadata, marks included), and nothing else: the register takes every
field, and a register at an address that holds an instance replaces that record whole,
ephemeral and persistent alike (both APIs, the v1 one with 3.1's compatibility switch
on). The instance update API (PUT) is never used, because of what it does (read in
Nacos's source and seen on 3.1.0): it does not change the registration but stores
weight, enabled and metadata as "instance metadata" (NamingMetadataManager, keyed by
service and ip:port:cluster), which every read lays over whatever instance is
registered at that address: weight and enabled replace the instance's, metadata keys
are merged in over the instance's own. It outlives the instance: Nacos drops it only
about 60 s (`nacos.naming.clean.expired-metadata.expired-time`) after the address was
last deregistered, and any register there before that keeps it for good; no API
deletes it. Written with a copy, the overlay carried the ownership marks, so an
application that registered itself at a copy's address (over HTTP Nacos identifies an
ephemeral client by ip:port, so its record replaces the copy's) read back as the copy,
and the sync rewrote it and deleted it with its source. Without an overlay it reads as
the native it is, and the planner leaves it alone as a clash. Known limits: overlays
written by syncworker versions that did register + update, or by editing a copy in the
Nacos console, stay until the address has been free for about a minute; while they
last, they decide weight and enabled of whatever is registered there (a copy whose
weight or enabled then differs from its source is registered again at every reconcile
without effect) and keep the marks on it. A delete names the stored kind (a delete of
the wrong kind quietly deletes nothing in Nacos).

Watch. Polling, not the gRPC push of the Nacos SDK (nacos-sdk-python): the push goes
through the same server cache and delay, so it would gain at most the poll interval,
for a gRPC dependency with its own threads and connection state that would also need
its disabled-instance blind spot covered. Single services are polled every
`watch_interval` (detail + instance lists, `watch_concurrency` at a time); namespaces
watched with "*", and namespaces with more than 8 watched services, are read whole
from the catalog with instances every `namespace_watch_interval`, which also finds new
services. A service whose digest changed (or appeared, or vanished) is yielded; the
first event is None, once the baseline is read. A whole-namespace read waits at least
three times its own duration before the next one, so a namespace of thousands of
instances is polled less often (its changes show up later) instead of keeping a core
busy; and while the engine has more of the task's units waiting than it has workers
(`watch_busy`: an initial sync), whole-namespace reads wait, at most 10 s since the
last one: those units read the source when they run, and the next read still diffs
against the same baseline, so a change is seen later, never lost (the reads served
from the baseline can then be up to that old, and the change's event reconciles the
unit again). Three failed polls in a row end the
watch with the error (the engine backs off and resyncs). Measured on 3.1: a change
shows up 0.53-0.9 s after the write (median about 0.6 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar

import httpx

from syncworker import errors, jsonwire, marks, model
from syncworker.connectors import base
from syncworker.reconcile import planner

log = logging.getLogger("syncworker.connectors.nacos")

DEFAULT_PORT = 8848
DEFAULT_CONTEXT = "/nacos"
PUBLIC_NAMESPACE = "public"
DEFAULT_GROUP = "DEFAULT_GROUP"
DEFAULT_CLUSTER = "DEFAULT"
GROUP_SPLITTER = "@@"
MAX_WEIGHT = 10000.0
PAGE = 100
MAX_PAGES = 10000

#: where the canonical protocol lives in Nacos metadata (Nacos has no protocol field)
PROTOCOL_KEY = "protocol"
#: Nacos's preserved metadata keys that set the liveness of an ephemeral instance
BEAT_INTERVAL_KEY = "preserved.heart.beat.interval"
BEAT_TIMEOUT_KEY = "preserved.heart.beat.timeout"
DELETE_TIMEOUT_KEY = "preserved.ip.delete.timeout"
LIVENESS_KEYS = frozenset({BEAT_INTERVAL_KEY, BEAT_TIMEOUT_KEY, DELETE_TIMEOUT_KEY})

#: Nacos error codes (com.alibaba.nacos.api.model.v2.ErrorCode)
SERVICE_NOT_EXIST = 21008
INSTANCE_NOT_FOUND = 21003
#: the v1 beat's answer code for an instance that is gone
V1_NOT_FOUND = 20404

#: copies policy (option "copies")
AUTO, PERSISTENT, EPHEMERAL = "auto", "persistent", "ephemeral"

Json = dict[str, Any]


# ---- mapping (pure) -----------------------------------------------------------------------
def nacos_namespace(namespace: str) -> str:
    return namespace or PUBLIC_NAMESPACE


def nacos_group(group: str) -> str:
    return group or DEFAULT_GROUP


def canonical_group(group: str | None) -> str:
    return "" if not group or group == DEFAULT_GROUP else group


def nacos_cluster(cluster: str) -> str:
    return cluster or DEFAULT_CLUSTER


def canonical_cluster(cluster: str | None) -> str:
    return "" if not cluster or cluster == DEFAULT_CLUSTER else cluster


def clamp_weight(weight: float) -> float:
    if not math.isfinite(weight):
        return 1.0 if math.isnan(weight) else (MAX_WEIGHT if weight > 0 else 0.0)
    return min(MAX_WEIGHT, max(0.0, float(weight)))


def representable(inst: model.Instance) -> model.Instance:
    """`inst` as this connector stores a copy in Nacos (see the module docstring)."""
    meta = {k: v for k, v in inst.metadata.items() if k not in LIVENESS_KEYS}
    protocol = inst.protocol
    if protocol:
        meta[PROTOCOL_KEY] = protocol
    else:
        protocol = meta.get(PROTOCOL_KEY, "")
    return inst.replace(weight=clamp_weight(inst.weight), cluster=canonical_cluster(inst.cluster),
                        metadata=model.freeze(meta), protocol=protocol, ephemeral=True)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def parse_instance(rec: Mapping[str, Any], service: model.ServiceKey | None = None) -> model.Instance:
    """One Nacos instance record as the canonical model (a copy reads as `representable` wrote it)."""
    meta = _str_map(rec.get("metadata"))
    ephemeral = bool(rec.get("ephemeral", True))
    if marks.is_copy(meta):
        meta = {k: v for k, v in meta.items() if k not in LIVENESS_KEYS}
        ephemeral = True
    weight = rec.get("weight", 1.0)
    return model.Instance(
        host=str(rec.get("ip") or ""),
        port=int(rec.get("port") or 0),
        weight=float(1.0 if weight is None else weight),
        healthy=bool(rec.get("healthy", rec.get("valid", True))),
        enabled=bool(rec.get("enabled", True)),
        metadata=meta,
        protocol=meta.get(PROTOCOL_KEY, ""),
        cluster=canonical_cluster(rec.get("clusterName")),
        ephemeral=ephemeral,
        native_id=str(rec.get("instanceId") or "") or _instance_id(rec, service),
    )


def _instance_id(rec: Mapping[str, Any], service: model.ServiceKey | None) -> str:
    """Nacos's default instance id (`ip#port#cluster#group@@service`) when the record leaves it out."""
    grouped = str(rec.get("serviceName") or "")
    if GROUP_SPLITTER not in grouped and service is not None:
        grouped = f"{nacos_group(service.group)}{GROUP_SPLITTER}{service.name}"
    return f"{rec.get('ip')}#{rec.get('port')}#{rec.get('clusterName') or DEFAULT_CLUSTER}#{grouped}"


def stored_ephemeral(rec: Mapping[str, Any]) -> bool:
    return bool(rec.get("ephemeral", True))


def _digest(instances: Iterable[model.Instance]) -> str:
    rows = sorted((i.host, i.port, i.cluster, i.weight, i.healthy, i.enabled, i.ephemeral,
                   tuple(i.metadata.items())) for i in instances)
    return hashlib.sha1(repr(rows).encode()).hexdigest()


#: the record fields `parse_instance` reads: a change anywhere else cannot change a sync
_READ_FIELDS = ("ip", "port", "clusterName", "weight", "healthy", "valid", "enabled", "ephemeral", "instanceId",
                "serviceName")


def _records_digest(records: Iterable[Mapping[str, Any]]) -> int:
    """A fingerprint of what the sync reads from these records, compared only within one watch (one
    process): a namespace watch takes one per service and round, so it is Python's own hash of the read
    fields, several times cheaper than serialising whole records."""
    rows = []
    for r in records:
        meta = r.get("metadata")
        try:
            rows.append(hash((tuple(map(r.get, _READ_FIELDS)),
                              frozenset(meta.items()) if isinstance(meta, Mapping) else meta)))
        except TypeError:  # an unhashable value in a malformed record
            rows.append(hash(json.dumps(r, sort_keys=True, default=str)))
    return hash(tuple(sorted(rows)))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- errors -------------------------------------------------------------------------------
class NacosRefused(errors.PermanentError):
    """The server answered a request with a 4xx or a failure code."""

    def __init__(self, message: str, status: int, code: int | None, detail: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail


class NacosUnavailable(errors.TemporaryError):
    """No server answered, or one answered 5xx."""

    def __init__(self, message: str, status: int = 0, code: int | None = None, detail: str = "") -> None:
        super().__init__(message, delay=1.0)
        self.status = status
        self.code = code
        self.detail = detail


class NacosAuthError(errors.PermanentError):
    """Login was refused (wrong user or password, or no such user)."""


# ---- endpoint -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Server:
    base: str  # scheme://host:port/context, no trailing slash
    display: str  # host:port, for messages


def parse_address(address: str, context: str | None = None) -> Server:
    """`host:port` (http, port 8848 when left out) or `http(s)://host[:port][/context]`."""
    text = address.strip()
    bare = "://" not in text
    parts = urllib.parse.urlsplit("http://" + text if bare else text)
    if parts.scheme not in ("http", "https"):
        raise errors.PermanentError(f"unsupported scheme in Nacos address {address!r} (use http or https)")
    try:
        port = parts.port
    except ValueError:
        raise errors.PermanentError(f"bad port in Nacos address {address!r}") from None
    host = parts.hostname
    if not host:
        raise errors.PermanentError(f"no host in Nacos address {address!r}")
    if port is None:
        port = DEFAULT_PORT if bare else (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    ctx = context if context is not None else (path or DEFAULT_CONTEXT)
    ctx = "/" + ctx.strip("/") if ctx.strip("/") else ""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Server(f"{parts.scheme}://{shown}{ctx}", shown)


def _float_option(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise errors.PermanentError(f"nacos option {key!r} must be a number, not {value!r}") from None


# ---- the connector ------------------------------------------------------------------------
class NacosConnector(base.Connector):
    type_name = "nacos"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(watch=True, needs_heartbeats=True)
    default_weight = 1.0

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        opts = endpoint.options
        context = opts.get("context_path")
        self.servers = [parse_address(a, str(context) if context is not None else None)
                        for a in endpoint.addresses if not a.strip().startswith("grpc://")]
        if not self.servers:
            raise errors.PermanentError(f"nacos {self.name}: no address configured")
        self.timeout = _float_option(opts, "timeout", 5.0)
        self.verify: bool | ssl.SSLContext = True
        verify = opts.get("verify", True)
        if isinstance(verify, str) and verify.lower() not in ("true", "false"):
            try:
                self.verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as exc:
                raise errors.PermanentError(f"nacos {self.name}: option verify: cannot load CA bundle "
                                            f"{verify!r}: {exc}") from exc
        elif isinstance(verify, str):
            self.verify = verify.lower() == "true"
        else:
            self.verify = bool(verify)
        api = str(opts.get("api", "")).lower()
        if api not in ("", "v1", "v3"):
            raise errors.PermanentError(f"nacos {self.name}: option api must be 'v1' or 'v3', not {api!r}")
        self._api = api or None
        policy = str(opts.get("copies", AUTO)).lower()
        if policy not in (AUTO, PERSISTENT, EPHEMERAL):
            raise errors.PermanentError(
                f"nacos {self.name}: option copies must be auto, persistent or ephemeral, not {policy!r}")
        self.copies_policy = policy
        self.beat_interval = _float_option(opts, "heartbeat_interval", 5.0)
        self.unhealthy_after = _float_option(opts, "ephemeral_unhealthy_after", 60.0)
        self.delete_after = _float_option(opts, "ephemeral_delete_after", 600.0)
        if not 0 < self.beat_interval < self.unhealthy_after <= self.delete_after:
            # Nacos refuses an instance whose beat interval is not below both timeouts
            raise errors.PermanentError(
                f"nacos {self.name}: options must keep 0 < heartbeat_interval < ephemeral_unhealthy_after "
                f"<= ephemeral_delete_after (seconds)")
        self.watch_interval = _float_option(opts, "watch_interval", 0.1)
        self.namespace_watch_interval = _float_option(opts, "namespace_watch_interval", 0.1)
        self.watch_concurrency = max(1, int(_float_option(opts, "watch_concurrency", 16)))
        self._client: httpx.AsyncClient | None = None
        #: records of whole-namespace watch baselines, each handed to one list_instances (see `watch`)
        self._primed: dict[model.ServiceKey, tuple[float, list[Json]]] = {}
        self._current = 0
        self._token = ""
        self._token_expires = 0.0
        self._login_lock = asyncio.Lock()
        self._detect_lock = asyncio.Lock()
        #: True when the Nacos service holds ephemeral instances (2.x/3.x refuse mixing)
        self._modes: dict[model.ServiceKey, bool] = {}
        #: clusters of each service as last read (health checker, check port, metadata)
        self._clusters: dict[model.ServiceKey, dict[str, _ClusterInfo]] = {}
        #: clusters of each service that hold persistent natives (their health check stays on)
        self._native_persistent: dict[model.ServiceKey, set[str]] = {}
        #: Nacos 2.2+ has /v2/ns/catalog/instances (every instance, disabled ones too)
        self._v2_catalog = True

    # ---- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        self._http()

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, verify=self.verify,
                                             headers={"User-Agent": "syncworker-nacos"})
        return self._client

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst)

    # ---- HTTP -------------------------------------------------------------------------
    def _where(self) -> str:
        return f"nacos {self.name} ({', '.join(s.display for s in self.servers)})"

    async def _send(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None, what: str, auth: bool = True) -> httpx.Response:
        """One request, tried on each address in turn while the transport fails."""
        client = self._http()
        failures: list[str] = []
        n = len(self.servers)
        logged_in_again = False
        step = 0
        while step < n:
            index = (self._current + step) % n
            server = self.servers[index]
            headers = {}
            if auth and self.endpoint.user:
                headers["accessToken"] = await self._ensure_token()
            try:
                resp = await client.request(method, server.base + path, params=_clean(params),
                                            data=_clean(data), headers=headers)
            except httpx.TransportError as exc:
                failures.append(f"{server.display}: {_describe(exc)}")
                step += 1
                continue
            self._current = index
            if resp.status_code == 403 and auth and self.endpoint.user and not logged_in_again:
                # the token may be gone before its tokenTtl (server restart, new secret): log in again once
                logged_in_again = True
                self._token = ""
                continue
            return resp
        raise NacosUnavailable(f"{self._where()}: {what}: no server answered ({'; '.join(failures)})")

    async def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None, what: str, auth: bool = True) -> Any:
        """The answer of a request: the `data` of a v2/v3 Result, parsed JSON, or text; errors raised."""
        resp = await self._send(method, path, params=params, data=data, what=what, auth=auth)
        body: Any
        try:
            body = jsonwire.loads(resp.content)
        except ValueError:
            body = resp.text
        code: int | None = None
        message = ""
        if isinstance(body, dict) and "code" in body and ("data" in body or "message" in body):
            with contextlib.suppress(TypeError, ValueError):
                code = int(body["code"])
            message = str(body.get("message") or "")
            if isinstance(body.get("data"), str) and body["data"] and code not in (0, 200):
                message = f"{message}: {body['data']}" if message else body["data"]
        if resp.status_code >= 400 or (code is not None and code not in (0, 200)):
            detail = message or (_short(body) if not isinstance(body, dict) else _short(
                body.get("message") or body.get("error") or body))
            text = f"{self._where()}: {what}: HTTP {resp.status_code}"
            if code is not None and code not in (0, 200, resp.status_code):
                text += f" code {code}"
            if detail:
                text += f": {detail}"
            if resp.status_code >= 500 or resp.status_code == 429:
                raise NacosUnavailable(text, resp.status_code, code, detail)
            raise NacosRefused(text, resp.status_code, code, detail)
        if code is not None and isinstance(body, dict) and "data" in body:
            return body["data"]
        return body

    async def _ensure_token(self) -> str:
        if self._token and time.monotonic() < self._token_expires:
            return self._token
        async with self._login_lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
            self._token, ttl = await self._login()
            # refresh well before the server's tokenTtl runs out
            self._token_expires = time.monotonic() + max(5.0, min(ttl * 0.8, ttl - 60.0))
            return self._token

    async def _login(self) -> tuple[str, float]:
        client = self._http()
        form = {"username": self.endpoint.user, "password": self.endpoint.password}
        paths = ["/v3/auth/user/login", "/v1/auth/login"] if self._api != "v1" else ["/v1/auth/login"]
        failures: list[str] = []
        who = f"login as user {self.endpoint.user!r}"
        n = len(self.servers)
        for step in range(n):
            index = (self._current + step) % n
            server = self.servers[index]
            for path in paths:
                try:
                    resp = await client.post(server.base + path, data=form)
                except httpx.TransportError as exc:
                    failures.append(f"{server.display}: {_describe(exc)}")
                    break
                if resp.status_code in (404, 405):
                    continue  # the other generation's login path
                self._current = index
                try:
                    body = jsonwire.loads(resp.content)
                except ValueError:
                    body = {}
                if resp.status_code == 200 and isinstance(body, dict) and body.get("accessToken"):
                    ttl = float(body.get("tokenTtl") or 18000)
                    return str(body["accessToken"]), ttl
                detail = _short(body.get("message") if isinstance(body, dict) and body.get("message")
                                else resp.text)
                if resp.status_code >= 500:
                    # Nacos 3.1 answers a wrong password for an existing user with a bare 500
                    raise NacosUnavailable(f"nacos {self.name} at {server.display}: {who} failed (HTTP "
                                           f"{resp.status_code}: {detail}); check the user and password, "
                                           f"or the server's log if they are right")
                raise NacosAuthError(f"nacos {self.name} at {server.display}: {who} was refused "
                                     f"(HTTP {resp.status_code}: {detail}); check the user and password")
            else:
                raise NacosRefused(f"nacos {self.name} at {server.display}: {who}: no login API found "
                                   f"under {server.base}", 404, None, "")
        raise NacosUnavailable(f"{self._where()}: {who}: no server answered ({'; '.join(failures)})")

    async def api(self) -> str:
        """'v3' (Nacos 3.x admin API) or 'v1' (Nacos 2.x open and catalog APIs)."""
        if self._api is not None:
            return self._api
        async with self._detect_lock:
            if self._api is None:
                try:
                    await self._call("GET", "/v3/admin/ns/service/list",
                                     params={"namespaceId": PUBLIC_NAMESPACE, "pageNo": 1, "pageSize": 1},
                                     what="probe the v3 admin API")
                    self._api = "v3"
                except NacosRefused as exc:
                    if exc.status != 404:
                        raise
                    self._api = "v1"
        return self._api

    # ---- reads ------------------------------------------------------------------------
    async def _catalog_page(self, namespace: str, page: int, *, with_instances: bool) -> tuple[list[Json], int | None]:
        """One page of the catalog (services, optionally with their instances) and the total count."""
        params: dict[str, Any] = {"namespaceId": nacos_namespace(namespace), "pageNo": page, "pageSize": PAGE,
                                  "groupNameParam": "", "serviceNameParam": "",
                                  "withInstances": str(with_instances).lower(), "ignoreEmptyService": "false"}
        what = f"list services of namespace {nacos_namespace(namespace)!r}"
        if await self.api() == "v3":
            data = await self._call("GET", "/v3/admin/ns/service/list", params=params, what=what)
        else:
            params["hasIpCount"] = "false"
            data = await self._call("GET", "/v1/ns/catalog/services", params=params, what=what)
        return _page_items(data)

    async def _catalog(self, namespace: str, *, with_instances: bool
                       ) -> list[Json]:
        """Every catalog entry that matches; paged until complete, else ReadError."""
        for _attempt in range(3):
            items: list[Json] = []
            total: int | None = None
            page = 1
            while True:
                got, count = await self._catalog_page(namespace, page, with_instances=with_instances)
                if total is None:
                    total = count
                elif count is not None and count != total:
                    break  # the catalog changed while it was paged: start over
                items.extend(got)
                if len(got) < PAGE or (total is not None and len(items) >= total):
                    if total is None or len(items) == total:
                        return items
                    break
                page += 1
                if page > MAX_PAGES:
                    raise errors.ReadError(f"{self._where()}: the service list of namespace "
                                           f"{nacos_namespace(namespace)!r} did not end after {MAX_PAGES} pages")
        raise errors.ReadError(f"{self._where()}: the service list of namespace "
                               f"{nacos_namespace(namespace)!r} kept changing while it was paged; try again")

    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        try:
            items = await self._catalog(namespace, with_instances=False)
        except errors.ReadError:
            raise
        except errors.SyncError as exc:
            raise errors.ReadError(str(exc)) from exc
        keys = set()
        for item in items:
            key = _item_key(item, namespace)
            if key is not None:
                keys.add(key)
        return sorted(keys)

    async def _records(self, service: model.ServiceKey) -> list[Json] | None:
        """Raw instance records of one service, disabled and unhealthy ones included; None when absent."""
        if await self.api() == "v3":
            return await self._records_v3(service)
        return await self._records_v1(service)

    async def _records_v3(self, service: model.ServiceKey) -> list[Json] | None:
        """The service's detail (its clusters, its kind) and the instances of each cluster.

        /v3/admin/ns/instance/list lists one cluster (DEFAULT when none is named) and keeps
        disabled instances; the detail names the clusters. The clusters seen last time (DEFAULT
        the first time) are listed while the detail is read, so a read costs one round trip,
        not two; a cluster the detail names that was not guessed is listed after it.
        """
        form = self._service_form(service)
        what = f"read service {service}"

        async def one(cluster: str) -> list[Json]:
            try:
                data = await self._call("GET", "/v3/admin/ns/instance/list", what=f"list instances of {service}",
                                        params={**form, "clusterName": cluster, "healthyOnly": "false"})
            except NacosRefused as exc:
                if _not_found(exc):
                    return []  # the cluster or the service went away meanwhile
                raise
            if not isinstance(data, list):
                raise errors.ReadError(f"{self._where()}: list instances of {service}: unexpected answer "
                                       f"{_short(data)}")
            return [h for h in data if isinstance(h, dict)]

        guessed = sorted(self._clusters.get(service) or {DEFAULT_CLUSTER: _ClusterInfo()})
        early = {c: asyncio.ensure_future(one(c)) for c in guessed}
        try:
            detail = await self._call("GET", "/v3/admin/ns/service", params=form, what=what)
        except NacosRefused as exc:
            await _drain(early.values())
            if _not_found(exc):
                self._forget(service)
                return None
            raise
        except BaseException:
            await _drain(early.values())
            raise
        if not isinstance(detail, dict) or not isinstance(detail.get("clusterMap") or {}, dict):
            await _drain(early.values())
            raise errors.ReadError(f"{self._where()}: {what}: unexpected answer {_short(detail)}")
        clusters = detail.get("clusterMap") or {}
        self._clusters[service] = {str(name): _ClusterInfo.of(info) for name, info in clusters.items()}
        if isinstance(detail.get("ephemeral"), bool):
            self._modes[service] = detail["ephemeral"]
        try:
            lists = await asyncio.gather(*(early[c] if c in early else one(c) for c in clusters))
        finally:
            await _drain(early.values())  # the guesses the detail did not name, and any left on an error
        return [rec for recs in lists for rec in recs]

    async def _records_v1(self, service: model.ServiceKey) -> list[Json] | None:
        grouped = f"{nacos_group(service.group)}{GROUP_SPLITTER}{service.name}"
        what = f"list instances of {service}"
        namespace = nacos_namespace(service.namespace)
        if self._v2_catalog:
            try:
                records: list[Json] = []
                page = 1
                while True:
                    data = await self._call("GET", "/v2/ns/catalog/instances", what=what, params={
                        "namespaceId": namespace, "serviceName": grouped, "pageNo": page, "pageSize": PAGE})
                    got = [h for h in (data or {}).get("instances") or [] if isinstance(h, dict)]
                    count = int((data or {}).get("count") or 0)
                    records.extend(got)
                    if len(records) >= count or not got:
                        if len(records) != count:
                            raise errors.ReadError(f"{self._where()}: {what}: the list changed while it was paged")
                        return records or None
                    page += 1
            except NacosRefused as exc:
                if exc.status not in (404, 410):
                    raise
                self._v2_catalog = False  # before Nacos 2.2 (or switched off): the open API
        try:
            data = await self._call("GET", "/v1/ns/instance/list", what=what, params={
                "namespaceId": namespace, "serviceName": grouped, "healthyOnly": "false"})
        except NacosRefused as exc:
            if _not_found(exc):
                return None
            raise
        hosts = data.get("hosts") if isinstance(data, dict) else None
        if not isinstance(hosts, list):
            raise errors.ReadError(f"{self._where()}: {what}: unexpected answer {_short(data)}")
        return [h for h in hosts if isinstance(h, dict)] or None

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        primed = self._primed.pop(service, None)
        if primed is not None and time.monotonic() - primed[0] <= PRIMED_TTL:
            return self._listing(service, primed[1])
        try:
            records = await self._records(service)
        except errors.ReadError:
            raise
        except errors.SyncError as exc:
            raise errors.ReadError(str(exc)) from exc
        return self._listing(service, records or [])

    def _forget(self, service: model.ServiceKey) -> None:
        self._modes.pop(service, None)
        self._clusters.pop(service, None)
        self._native_persistent.pop(service, None)

    def _listing(self, service: model.ServiceKey, records: list[Json]) -> base.Listing:
        instances: list[model.Instance] = []
        skipped: list[str] = []
        for rec in records:
            try:
                inst = parse_instance(rec, service)
            except (TypeError, ValueError) as exc:
                skipped.append(f"{service}: unreadable record {_short(rec)}: {exc}")
                continue
            problem = model.validate_instance(inst)
            if problem:
                skipped.append(f"{service}: {inst.host}:{inst.port}: {problem}")
                continue
            instances.append(inst)
        if records:
            self._modes[service] = any(stored_ephemeral(r) for r in records)
        self._native_persistent[service] = {
            nacos_cluster(canonical_cluster(r.get("clusterName"))) for r in records
            if not stored_ephemeral(r) and not marks.is_copy(_str_map(r.get("metadata")))}
        return base.Listing(tuple(instances), tuple(skipped), _digest(instances))

    # ---- writes -----------------------------------------------------------------------
    @staticmethod
    def _service_form(service: model.ServiceKey) -> dict[str, Any]:
        return {"namespaceId": nacos_namespace(service.namespace), "groupName": nacos_group(service.group),
                "serviceName": service.name}

    def _form(self, service: model.ServiceKey, inst: model.Instance, ephemeral: bool) -> dict[str, Any]:
        meta = dict(representable(inst).metadata)
        if ephemeral:
            meta[BEAT_INTERVAL_KEY] = str(int(self.beat_interval * 1000))
            meta[BEAT_TIMEOUT_KEY] = str(int(self.unhealthy_after * 1000))
            meta[DELETE_TIMEOUT_KEY] = str(int(self.delete_after * 1000))
        return {
            **self._service_form(service),
            "ip": inst.host,
            "port": inst.port,
            "clusterName": nacos_cluster(inst.cluster),
            "weight": repr(clamp_weight(inst.weight)),
            "healthy": str(inst.healthy).lower(),
            "enabled": str(inst.enabled).lower(),
            "ephemeral": str(ephemeral).lower(),
            "metadata": json.dumps(meta, ensure_ascii=False, separators=(",", ":")),
        }

    async def _write(self, method: str, form: Mapping[str, Any], what: str) -> None:
        if await self.api() == "v3":
            await self._call(method, "/v3/admin/ns/instance", data=form, what=what)
            return
        body = dict(form)
        body["serviceName"] = f"{form['groupName']}{GROUP_SPLITTER}{form['serviceName']}"
        if method == "POST":
            await self._call(method, "/v1/ns/instance", data=body, what=what)
        else:  # the v1 delete (like the v1 update) reads its parameters from the query string
            await self._call(method, "/v1/ns/instance", params=body, what=what)

    def _new_copy_ephemeral(self, service: model.ServiceKey) -> bool:
        if self.copies_policy == EPHEMERAL:
            return True
        if self.copies_policy == PERSISTENT:
            return False
        known = self._modes.get(service)
        return True if known is None else known

    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        outcomes: list[base.Outcome] = []
        ops = plan.operations()
        for op, inst in ops:
            try:
                await self._apply_one(service, op, inst)
            except errors.SyncError as exc:
                outcomes.append(base.Outcome(op, inst.address, False, str(exc),
                                             temporary=isinstance(exc, errors.TemporaryError)))
            else:
                outcomes.append(base.Outcome(op, inst.address, True))
        return outcomes

    async def _apply_one(self, service: model.ServiceKey, op: str, inst: model.Instance) -> None:
        what = f"{op} {inst.host}:{inst.port} in {service}"
        if op == "delete":
            # the kind must match the stored record, or Nacos quietly deletes nothing
            ephemeral = self._modes.get(service, self._new_copy_ephemeral(service))
            await self._write("DELETE", self._form(service, inst, ephemeral), what)
            return
        ephemeral = self._modes.get(service) if op == "update" else None
        if ephemeral is None:
            ephemeral = self._new_copy_ephemeral(service)
        try:
            await self._write("POST", self._form(service, inst, ephemeral), what)
        except NacosRefused as exc:
            if self.copies_policy != AUTO or not _refuses_mixing(exc):
                raise
            # the service holds the other kind of instance (2.x/3.x refuse mixing): follow it
            ephemeral = not ephemeral
            await self._write("POST", self._form(service, inst, ephemeral), what)
        self._modes[service] = ephemeral
        # The register alone writes the whole record (and a register again replaces it). No
        # update (PUT): Nacos keeps what an update sets as an overlay keyed by the address, lays
        # it over whatever registers there later (an application too) and keeps it after a
        # delete, so a native at a copy's address would read as the copy (module docstring).
        if not ephemeral:
            await self._health_checks_off(service, nacos_cluster(inst.cluster))

    async def _health_checks_off(self, service: model.ServiceKey, cluster: str) -> None:
        """Switch Nacos's own health check off for a cluster that holds only persistent copies.

        Nacos TCP-checks persistent instances by default and would overwrite the health
        carried from the source. A cluster that also holds persistent natives keeps its check.
        """
        info = self._clusters.get(service, {}).get(cluster)
        if info is not None and info.checker == "NONE":
            return
        if cluster in self._native_persistent.get(service, set()):
            return
        info = info or _ClusterInfo()
        form = {**self._service_form(service), "clusterName": cluster, "checkPort": info.check_port,
                "useInstancePort4Check": str(info.use_instance_port).lower(),
                "healthChecker": json.dumps({"type": "NONE"}),
                "metadata": json.dumps(info.metadata, ensure_ascii=False)}
        what = f"switch the health check off for cluster {cluster} of {service}"
        if await self.api() == "v3":
            await self._call("PUT", "/v3/admin/ns/cluster", data=form, what=what)
        else:
            form["serviceName"] = f"{form['groupName']}{GROUP_SPLITTER}{service.name}"
            await self._call("PUT", "/v1/ns/cluster", params=form, what=what)
        self._clusters.setdefault(service, {})[cluster] = dataclasses.replace(info, checker="NONE")

    # ---- heartbeats -------------------------------------------------------------------
    async def heartbeat(self, service: model.ServiceKey, instances: Sequence[model.Instance]) -> None:
        """Beat the copies of `service` that Nacos keeps as ephemeral instances.

        Unhealthy copies are not beaten: a beat marks an ephemeral instance healthy.
        """
        if service not in self._modes:
            await self.list_instances(service)
        if not self._modes.get(service):
            return
        limit = asyncio.Semaphore(8)

        async def one(inst: model.Instance) -> str:
            async with limit:
                try:
                    await self._beat(service, inst)
                except errors.SyncError as exc:
                    return str(exc)
                return ""

        # unhealthy copies are left alone: a beat would mark them healthy
        failures = [f for f in await asyncio.gather(*(one(i) for i in instances if i.healthy)) if f]
        if failures:
            raise errors.TemporaryError(f"{len(failures)} heartbeat(s) failed, first: {failures[0]}")

    async def _beat(self, service: model.ServiceKey, inst: model.Instance) -> None:
        what = f"heartbeat {inst.host}:{inst.port} in {service}"
        form = {**self._service_form(service), "ip": inst.host, "port": inst.port,
                "clusterName": nacos_cluster(inst.cluster)}
        if await self.api() == "v3":
            # answers code 21003 when the instance is gone (then the next reconcile writes it again)
            await self._call("POST", "/v3/client/ns/instance", data={**form, "heartBeat": "true"}, what=what)
            return
        form["serviceName"] = f"{form['groupName']}{GROUP_SPLITTER}{service.name}"
        answer = await self._call("PUT", "/v1/ns/instance/beat", params=form, what=what)
        if isinstance(answer, dict) and answer.get("code") == V1_NOT_FOUND:
            raise NacosRefused(f"{self._where()}: {what}: the instance is gone", 200, V1_NOT_FOUND, "not found")

    # ---- watch ------------------------------------------------------------------------
    async def watch(self, services: Sequence[model.ServiceKey], namespaces: Sequence[str]
                    ) -> AsyncIterator[base.WatchEvent]:
        """Poll what is watched and yield the services whose instances changed.

        Single services are polled every `watch_interval`, whole namespaces (and namespaces
        with many watched services) every `namespace_watch_interval`. The first event is
        None, once the baseline is read: everything is reconciled once, which closes the
        gap between the engine's first reconcile and the baseline.

        A whole-namespace baseline (one paged catalog read with every instance) also primes
        `list_instances`: the next read of each of its services is answered from it, once,
        instead of two requests per service. That answer is as fresh as the watch: a service
        that changes after the baseline is yielded, and its primed records are dropped before
        it is, so the reconcile the event causes reads it for real; when the watch ends, every
        primed record is dropped. (An initial sync of a 1,000-service namespace reads its
        source this way with about ten requests.)
        """
        spaces = list(dict.fromkeys(namespaces))
        explicit = [k for k in dict.fromkeys(services) if k.namespace not in spaces]
        loop = asyncio.get_running_loop()
        baseline: dict[model.ServiceKey, int] | None = None
        plan: tuple[list[model.ServiceKey], dict[str, set[model.ServiceKey]]] | None = None
        wide: dict[model.ServiceKey, int] = {}
        alone: dict[model.ServiceKey, int] = {}
        singles: list[model.ServiceKey] = []
        grouped: dict[str, set[model.ServiceKey]] = {}
        wide_due = singles_due = wide_done = 0.0
        failures = 0
        try:
            while True:
                started = loop.time()
                try:
                    if plan is None:
                        plan = await self._watch_plan(explicit)
                    singles, grouped = plan
                    if started >= wide_due:
                        if self._postpone_wide(baseline is None, started, wide_done):
                            wide_due = started + self.namespace_watch_interval
                        else:
                            wide = await self._poll_namespaces(spaces, grouped, prime=baseline is None)
                            wide_done = started
                            # a whole-namespace read grows with the namespace: keep its duty cycle
                            # at most a third, so a large idle namespace does not keep a core busy
                            spent = loop.time() - started
                            wide_due = started + max(self.namespace_watch_interval, WIDE_DUTY * spent)
                    if started >= singles_due:
                        alone = await self._poll_services(singles)
                        singles_due = started + self.watch_interval
                    snapshot = {**wide, **alone}
                except errors.SyncError as exc:
                    failures += 1
                    if failures >= 3:
                        raise
                    # try again after the usual interval, not at once
                    wide_due = max(wide_due, started + self.namespace_watch_interval)
                    singles_due = max(singles_due, started + self.watch_interval)
                    log.debug("watch poll failed", extra={"endpoint": self.name, "error": str(exc)})
                else:
                    failures = 0
                    if baseline is None:
                        baseline = snapshot
                        yield None
                    else:
                        changed = [k for k, d in snapshot.items() if baseline.get(k) != d]
                        changed += [k for k in baseline if k not in snapshot]
                        baseline = snapshot
                        for key in changed:
                            self._primed.pop(key, None)
                        for key in sorted(changed):
                            yield key
                # each kind of poll wakes the loop at its own time (a namespace poll does not wait
                # for the next single-service round, nor the other way round)
                wake = min(singles_due if singles else math.inf, wide_due if spaces or grouped else math.inf,
                           started + max(self.watch_interval, self.namespace_watch_interval))
                await asyncio.sleep(max(0.0, wake - loop.time()))
        finally:
            self._primed.clear()  # nobody diffs them any more

    def _postpone_wide(self, first: bool, now: float, last: float) -> bool:
        """Whether to skip a whole-namespace poll now: the engine is busy with a backlog of this
        task's units (an initial sync reads them all anyway), for at most WIDE_POSTPONE_MAX seconds
        since the last poll. Never the first (baseline) poll."""
        busy = self.watch_busy
        return not first and busy is not None and now - last < WIDE_POSTPONE_MAX and busy()

    async def _watch_plan(self, explicit: Sequence[model.ServiceKey]
                          ) -> tuple[list[model.ServiceKey], dict[str, set[model.ServiceKey]]]:
        """Split watched services into ones polled alone and namespaces polled whole (v3 only)."""
        by_namespace: dict[str, set[model.ServiceKey]] = {}
        for key in explicit:
            by_namespace.setdefault(key.namespace, set()).add(key)
        if await self.api() != "v3":
            return list(explicit), {}
        grouped = {ns: keys for ns, keys in by_namespace.items() if len(keys) > WHOLE_NAMESPACE_AT}
        return [k for k in explicit if k.namespace not in grouped], grouped

    async def _poll_services(self, keys: Iterable[model.ServiceKey]) -> dict[model.ServiceKey, int]:
        limit = asyncio.Semaphore(max(1, self.watch_concurrency))

        async def one(key: model.ServiceKey) -> tuple[model.ServiceKey, int]:
            async with limit:
                return key, _records_digest(await self._records(key) or [])

        return dict(await asyncio.gather(*(one(k) for k in dict.fromkeys(keys))))

    async def _poll_namespaces(self, spaces: Sequence[str], grouped: Mapping[str, set[model.ServiceKey]],
                               prime: bool = False) -> dict[model.ServiceKey, int]:
        """Digests of every service of `spaces`, and of the watched services of `grouped` namespaces;
        `prime`: keep their records for `list_instances` too (a baseline)."""
        out: dict[model.ServiceKey, int] = {}
        if await self.api() != "v3":
            # 2.x: the service list, then each service alone
            for namespace in spaces:
                out.update(await self._poll_services(await self.list_services(namespace)))
            return out
        for namespace in spaces:
            out.update(await self._namespace_digests(namespace, prime=None if prime else set()))
        for namespace, keys in grouped.items():
            found = await self._namespace_digests(namespace, prime=keys if prime else set())
            out.update({k: found.get(k, _records_digest(())) for k in keys})
        return out

    async def _namespace_digests(self, namespace: str, prime: AbstractSet[model.ServiceKey] | None = frozenset()
                                 ) -> dict[model.ServiceKey, int]:
        """One paged catalog read with instances: every service of the namespace and its digest; the
        records of the services in `prime` (of all when None) are kept for `list_instances`."""
        items = await self._catalog(namespace, with_instances=True)
        taken = time.monotonic()
        out: dict[model.ServiceKey, int] = {}
        for item in items:
            key = _item_key(item, namespace)
            if key is not None:
                hosts = _hosts_of(item)
                out[key] = _records_digest(hosts)
                if prime is None or key in prime:
                    self._primed[key] = (taken, hosts)
        return out


#: a namespace with more watched services than this is polled whole (one paged request)
WHOLE_NAMESPACE_AT = 8
#: a whole-namespace poll waits at least this many times its own duration before the next
WIDE_DUTY = 3.0
#: a whole-namespace poll is postponed while the engine has a backlog (`watch_busy`), for at most this long
WIDE_POSTPONE_MAX = 10.0
#: primed records older than this are not used (the watch drops changed ones long before)
PRIMED_TTL = 120.0


@dataclasses.dataclass(frozen=True)
class _ClusterInfo:
    checker: str = ""
    check_port: int = 80
    use_instance_port: bool = True
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, info: Any) -> _ClusterInfo:
        if not isinstance(info, Mapping):
            return cls()
        checker = info.get("healthChecker")
        kind = str(checker.get("type") or "") if isinstance(checker, Mapping) else ""
        try:
            port = int(info.get("healthyCheckPort") or 80)
        except (TypeError, ValueError):
            port = 80
        return cls(kind.upper(), port, bool(info.get("useInstancePortForCheck", True)),
                   _str_map(info.get("metadata")))


async def _drain(jobs: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel reads whose answer is not needed and collect them, so no error goes unretrieved."""
    jobs = list(jobs)
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)


def _not_found(exc: NacosRefused) -> bool:
    """A missing service or cluster (a Nacos answer, not an unknown URL)."""
    if exc.code is None:
        return False
    text = exc.detail.lower()
    return exc.code == SERVICE_NOT_EXIST or "not found" in text or "not exist" in text


def _refuses_mixing(exc: NacosRefused) -> bool:
    text = exc.detail.lower()
    return "ephemeral service" in text or "persistent service" in text or "persistent instance" in text


def _clean(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if values is None:
        return None
    return {k: v for k, v in values.items() if v is not None}


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _page_items(data: Any) -> tuple[list[Json], int | None]:
    """Items and total count of a catalog page, in any of the shapes 2.x and 3.x answer."""
    if isinstance(data, list):
        return [i for i in data if isinstance(i, dict)], None
    if not isinstance(data, dict):
        raise errors.ReadError(f"unexpected catalog answer: {_short(data)}")
    for key in ("pageItems", "serviceList", "services"):
        if isinstance(data.get(key), list):
            items = [i for i in data[key] if isinstance(i, dict)]
            count = data.get("totalCount", data.get("count"))
            return items, int(count) if count is not None else None
    if data.get("totalCount") == 0 or data.get("count") == 0:
        return [], 0
    raise errors.ReadError(f"unexpected catalog answer: {_short(data)}")


def _item_key(item: Mapping[str, Any], namespace: str) -> model.ServiceKey | None:
    name = str(item.get("serviceName") or item.get("name") or "")
    if not name:
        return None
    group = item.get("groupName")
    if not group and GROUP_SPLITTER in name:
        group, _, name = name.partition(GROUP_SPLITTER)
    return model.ServiceKey(namespace, canonical_group(str(group or "")), name)


def _hosts_of(item: Mapping[str, Any]) -> list[Json]:
    hosts: list[Json] = []
    clusters = item.get("clusterMap") or item.get("clusters") or {}
    if isinstance(clusters, Mapping):
        clusters = list(clusters.values())
    for cluster in clusters or []:
        if isinstance(cluster, Mapping):
            hosts.extend(h for h in cluster.get("hosts") or [] if isinstance(h, dict))
    return hosts
