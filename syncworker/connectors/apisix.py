"""Apache APISIX 3.x over its Admin API (v3): a gateway destination (upstream nodes, optional routes).

Endpoint: `addresses` list Admin API addresses (`127.0.0.1:9180`, `http://...`,
`https://...`; `/apisix/admin` is appended unless the address has a path); they are
tried in order on connection errors. `token` is the admin key, sent as `X-API-KEY`.
`options`: `verify` (bool or CA bundle path), `timeout` (seconds, default 5),
`id_prefix` (first part of every upstream id, default none), `weight_scale` (the
APISIX weight of canonical 1.0, default 100), `scheme` (of created upstreams, default
"http"), `create_routes` (default false) and `route_uri` (default "/{service}/*";
`{service}` and `{namespace}` are filled in).

Units and ids. The engine hands a gateway one upstream per unit: dest key
`(namespace, group, name)`; group "" holds every healthy, enabled instance, other
groups the instances of one polaris-sync group. Each unit is the upstream with id
`[prefix.]<namespace or "default">.<service>.<group or "default">` when that is a valid
APISIX id (`[a-zA-Z0-9-_.]`, at most 64 characters); otherwise the invalid characters
become `-`, the text is cut to 51 characters and `-<12 hex of sha1(original)>` is
appended. The id depends on the dest key only, so listing needs no configuration; the
upstream's `name` is `ApplyContext.upstream_name` when the config gives one
(polaris-sync's `upstreamName`), else the readable id text (at most 100 characters).
With `create_routes: true`, the default unit also gets a route with the same id, `uri`
from `route_uri` and `upstream_id` the upstream; the route is created once and never
changed afterwards (it is the user's to edit).

Ownership. Upstreams and routes it creates carry the labels `managed-by: syncworker`
and `syncworker-task: <task>` (label values must match `^\\S+$`, 1..256 characters:
`%` and whitespace are percent-encoded, and a value still too long is cut and ends in
`~<16 hex of sha1>`). The nodes it owns are known by their own `metadata` (the list
form of `nodes`, `{host, port, weight, priority, metadata}`): a copy's node metadata is
the instance's metadata, with the marks `syncworker.task` and `syncworker.origin`.
Nodes without marks (added by hand, in either the list or the `"host:port": weight`
form) are listed without marks, so the planner never changes them; a write keeps every
node it does not own exactly as it was (map-form nodes become `{host, port, weight}`
items). No label listing or digest is needed, and there is no size limit: an upstream
of any size carries its ownership node by node. A sync deletes only nodes the plan
names, never an upstream or a route.

Retiring a unit (`retire`: its task was removed, or the unit left the config, and its
copies are deleted). The unit's upstream is deleted when it carries this task's labels
and holds no node without this task's mark (a node added by hand, or another task's,
keeps it, and the log says why); an upstream made by hand or by another task is never
deleted. The route with the upstream's id goes first (APISIX refuses to delete an
upstream a route or service still uses), and only when it carries this task's labels and
its `upstream_id` is still the unit's upstream: a route made by hand, or edited to point
elsewhere, stays. When anything else still uses the upstream, APISIX refuses the delete
and the upstream stays (the log carries APISIX's message). A failed read or write ends
the retirement of that unit: nothing more is deleted. A node added by hand between the
read and the delete goes with the upstream (one round trip).

Writes: one apply is one read-modify-write of the upstream: a fresh GET, then the
plan's deletes, updates and creates on its node list (a node is removed or replaced
only when it still equals what the plan saw; a create at an address that another node
took meanwhile is a clash), then `PATCH /upstreams/{id}/nodes` with the new node list (after a PUT that creates
the upstream, empty, when it is missing). The Admin API has no
compare-and-swap, so a hand edit landing between that GET and PATCH is lost (the
window is one round trip). Every operation of an apply shares the write's outcome.

Mapping: node weight = round(canonical * weight_scale) (integer, >= 0); with the default
100, Kong and Polaris defaults line up and weights keep 1/100 resolution (a hand-added
node needs weight 100 to take an equal share). IPv6 hosts are written `[addr]`.
`representable` keeps host (IPv6 compressed), port, that rounded weight and the
metadata; protocol and cluster are dropped, healthy and enabled are True.

Errors: a failed read (connection, 5xx, 401, anything but 200/404) raises
`errors.ReadError`; a missing upstream lists as empty. Writes: connection errors, 5xx
and 429 are temporary outcomes, other 4xx permanent ones with APISIX's `error_msg`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import httpx

from syncworker import errors, marks, model
from syncworker.connectors import base, http
from syncworker.reconcile import planner

log = logging.getLogger("syncworker.connectors.apisix")

ADMIN_PATH = "/apisix/admin"
DEFAULT_SCALE = 100
MAX_WEIGHT = 2**31 - 1
DEFAULT_GROUP = "default"
DEFAULT_NAMESPACE = "default"
MAX_ID = 64
MAX_NAME = 100
MAX_LABEL = 256
MANAGED_BY = "managed-by"
TASK_LABEL = "syncworker-task"

_ID_BAD = re.compile(r"[^a-zA-Z0-9\-_.]+")
_LABEL_UNSAFE = re.compile(r"[%\s]")
Json = dict[str, Any]


# ---- mapping (pure) ---------------------------------------------------------------------
def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def label_value(value: str) -> str:
    """A label value APISIX accepts (`^\\S+$`, 1..256 chars); see module doc."""
    out = _LABEL_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value) or "-"
    if len(out) > MAX_LABEL:
        out = out[:MAX_LABEL - 17] + "~" + _digest(value, 16)
    return out


def readable(parts: Sequence[str]) -> str:
    return ".".join(parts)


def upstream_id(parts: Sequence[str]) -> str:
    raw = readable(parts)
    clean = _ID_BAD.sub("-", raw)
    if clean == raw and 0 < len(raw) <= MAX_ID:
        return raw
    return f"{clean[:MAX_ID - 13]}-{_digest(raw, 12)}"


def normalize_host(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        return host
    return str(addr)


def split_address(text: str) -> tuple[str, int | None] | None:
    """(host, port or None) of `host`, `host:port`, `[v6]`, `[v6]:port`; None when malformed."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        rest = ":" + port
    else:
        host, rest = text, ""
    if not rest:
        return normalize_host(host), None
    if rest.startswith(":") and rest[1:].isdigit():
        return normalize_host(host), int(rest[1:])
    return None


def _scaled(weight: float, scale: int) -> int:
    return int(min(MAX_WEIGHT, max(0, round(weight * scale))))


def representable(inst: model.Instance, scale: int = DEFAULT_SCALE) -> model.Instance:
    return model.Instance(normalize_host(inst.host), inst.port, weight=_scaled(inst.weight, scale) / scale,
                          metadata=dict(inst.metadata))


def node_of(inst: model.Instance, scale: int) -> Json:
    host = normalize_host(inst.host)
    node: Json = {"host": f"[{host}]" if ":" in host else host, "port": inst.port,
                  "weight": _scaled(inst.weight, scale), "priority": 0}
    if inst.metadata:
        node["metadata"] = dict(inst.metadata)
    return node


def nodes_as_list(nodes: Any, default_port: int) -> list[Json] | None:
    """The upstream's nodes in the list form (map form converted); None when unreadable."""
    if nodes is None:
        return []
    if isinstance(nodes, list):
        return [dict(n) for n in nodes if isinstance(n, dict)]
    if isinstance(nodes, dict):
        out: list[Json] = []
        for addr, weight in nodes.items():
            parsed = split_address(str(addr))
            if parsed is None:
                out.append({"host": str(addr), "weight": weight})  # kept as it is; skipped when read
                continue
            host, port = parsed
            out.append({"host": f"[{host}]" if ":" in host else host, "port": port or default_port,
                        "weight": weight})
        return out
    return None


def node_to_instance(node: Mapping[str, Any], scale: int, default_port: int) -> model.Instance | str:
    raw_host = node.get("host")
    if not isinstance(raw_host, str):
        return f"node {node!r}: no host"
    parsed = split_address(raw_host)
    if parsed is None:
        return f"node {raw_host!r}: not a host"
    port = node.get("port", parsed[1] or default_port)
    weight = node.get("weight")
    if not isinstance(port, int) or isinstance(port, bool):
        return f"node {raw_host!r}: port {port!r} is not a number"
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"node {raw_host}:{port}: weight {weight!r} is not a number"
    meta = node.get("metadata") or {}
    if not isinstance(meta, dict):
        return f"node {raw_host}:{port}: metadata is not an object"
    inst = model.Instance(parsed[0], port, weight=weight / scale,
                          metadata={str(k): v if isinstance(v, str) else str(v) for k, v in meta.items()})
    problem = model.validate_instance(inst)
    return f"node {raw_host}:{port}: {problem}" if problem else inst


def parse_addresses(addresses: Iterable[str]) -> list[str]:
    """HTTP(S) base URLs of the configured addresses; grpc:// and other schemes are skipped."""
    return http.base_urls(addresses, ADMIN_PATH)


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        msg = data.get("error_msg") or data.get("message")
        if msg:
            return f"HTTP {resp.status_code}: {str(msg)[:300]}"
    elif resp.text.strip():
        return f"HTTP {resp.status_code}: {resp.text.strip()[:300]}"
    return f"HTTP {resp.status_code}"


_temporary_status = http.temporary_status


_describe = http.describe


_WriteFailed = http.WriteFailed


# ---- the connector ----------------------------------------------------------------------
class ApisixConnector(http.HttpConnector):
    type_name = "apisix"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(
        source=False, destination=True, watch=False, batch_writes=True, gateway=True)
    default_weight: ClassVar[float] = float(DEFAULT_SCALE)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        bases = parse_addresses(endpoint.addresses)
        if not bases:
            raise errors.ConfigError([errors.ConfigProblem(
                "addresses", "no APISIX Admin API address (host:port, http://... or https://...)")],
                source=endpoint.name)
        opts = dict(endpoint.options or {})
        self.timeout = float(opts.get("timeout", 5.0))
        self.verify: Any = opts.get("verify", True)
        self.prefix = str(opts.get("id_prefix", "") or "")
        self.scale = max(1, int(opts.get("weight_scale", DEFAULT_SCALE)))
        self.default_weight = float(self.scale)  # type: ignore[misc]
        self.scheme = str(opts.get("scheme", "http"))
        self.default_port = 443 if self.scheme in ("https", "grpcs") else 80
        self.create_routes = bool(opts.get("create_routes", False))
        self.route_uri = str(opts.get("route_uri", "/{service}/*"))
        headers = {"X-API-KEY": self.endpoint.token} if self.endpoint.token else {}
        self.http = http.Transport(bases, timeout=self.timeout, verify=self.verify, headers=headers,
                                   auth=None, max_connections=16)

    # ---- naming ---------------------------------------------------------------------
    def _parts(self, key: model.ServiceKey) -> list[str]:
        return [*([self.prefix] if self.prefix else []), key.namespace or DEFAULT_NAMESPACE, key.name,
                key.group or DEFAULT_GROUP]

    def upstream_id(self, key: model.ServiceKey) -> str:
        return upstream_id(self._parts(key))

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst, self.scale)

    # ---- lifecycle ------------------------------------------------------------------
    async def _get(self, path: str, what: str, params: Mapping[str, Any] | None = None) -> Json | None:
        """The JSON body of a GET; None on 404; ReadError on anything else but 200."""
        try:
            resp = await self._send("GET", path, params=params)
        except httpx.HTTPError as exc:
            raise errors.ReadError(f"apisix {self.name}: {what}: {_describe(exc)}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise errors.ReadError(f"apisix {self.name}: {what}: {_message(resp)}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise errors.ReadError(f"apisix {self.name}: {what}: the answer is not JSON") from exc
        if not isinstance(data, dict):
            raise errors.ReadError(f"apisix {self.name}: {what}: unexpected answer")
        return data

    async def _write(self, method: str, path: str, what: str, body: Any) -> httpx.Response:
        try:
            resp = await self._send(method, path, body=body)
        except httpx.HTTPError as exc:
            raise _WriteFailed(f"{what}: {_describe(exc)}", temporary=True) from exc
        if resp.status_code in (200, 201):
            return resp
        raise _WriteFailed(f"{what}: {_message(resp)}", temporary=_temporary_status(resp.status_code))

    async def _upstream(self, uid: str) -> Json | None:
        """The stored value of upstream `uid`, or None when it does not exist."""
        item = await self._get(f"/upstreams/{urllib.parse.quote(uid, safe='')}", f"upstream {uid}")
        if item is None:
            return None
        value = item.get("value")
        if not isinstance(value, dict):
            raise errors.ReadError(f"apisix {self.name}: upstream {uid}: no value in the answer")
        return value

    # ---- reads ----------------------------------------------------------------------
    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        """APISIX is a destination only: there is nothing to copy from it (checks that it answers)."""
        await self._get("/upstreams", "upstreams", {"page": 1, "page_size": 10})
        return []

    async def health(self) -> str | None:
        try:
            await self._get("/upstreams", "upstreams", {"page": 1, "page_size": 10})
        except errors.SyncError as exc:
            return str(exc)
        return None

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        uid = self.upstream_id(service)
        value = await self._upstream(uid)
        if value is None:
            return base.Listing(())
        nodes = nodes_as_list(value.get("nodes"), self.default_port)
        if nodes is None:
            raise errors.ReadError(f"apisix {self.name}: upstream {uid}: nodes are neither a list nor a map")
        out: list[model.Instance] = []
        skipped: list[str] = []
        for node in nodes:
            inst = node_to_instance(node, self.scale, self.default_port)
            if isinstance(inst, str):
                skipped.append(inst)
            else:
                out.append(inst)
        return base.Listing(tuple(out), tuple(skipped))

    # ---- writes ---------------------------------------------------------------------
    def _labels(self, task: str) -> dict[str, str]:
        return {MANAGED_BY: "syncworker", TASK_LABEL: label_value(task)}

    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        ops = plan.operations()
        if not ops:
            return []
        uid = self.upstream_id(service)
        path = f"/upstreams/{urllib.parse.quote(uid, safe='')}"
        try:
            try:
                current = await self._upstream(uid)
            except errors.ReadError as exc:
                raise _WriteFailed(str(exc), temporary=True) from exc
            if current is None:
                # create it empty first, so that a route can point at it before any node is written
                body = {"id": uid, "name": (ctx.upstream_name or readable(self._parts(service)))[:MAX_NAME],
                        "desc": f"synced by syncworker from {service}"[:256], "type": "roundrobin",
                        "scheme": self.scheme, "nodes": {}, "labels": self._labels(ctx.task)}
                await self._write("PUT", path, f"create upstream {uid}", body)
                current = {"nodes": []}
            if self.create_routes and not service.group:
                await self._ensure_route(service, uid, ctx.task)
            nodes = nodes_as_list(current.get("nodes"), self.default_port)
            if nodes is None:
                raise _WriteFailed(f"upstream {uid}: nodes are neither a list nor a map", temporary=False)
        except _WriteFailed as exc:
            return [base.Outcome(op, inst.address, False, str(exc), temporary=exc.temporary) for op, inst in ops]

        outcomes: list[base.Outcome] = []

        def seen(node: Json) -> model.Instance | None:
            inst = node_to_instance(node, self.scale, self.default_port)
            return inst if isinstance(inst, model.Instance) else None

        def index_of(inst: model.Instance) -> int | None:
            for i, node in enumerate(nodes):
                if seen(node) == inst:
                    return i
            return None

        changed = False
        for d in plan.deletes:
            i = index_of(d)
            if i is not None:
                del nodes[i]
                changed = True
            outcomes.append(base.Outcome("delete", d.address, True))
        for u in plan.updates:
            i = index_of(u.old)
            if i is None:
                outcomes.append(base.Outcome("update", u.new.address, False,
                                             "the node changed since it was read", temporary=True))
                continue
            nodes[i] = node_of(u.new, self.scale)
            changed = True
            outcomes.append(base.Outcome("update", u.new.address, True))
        for c in plan.creates:
            taken = [n for n in nodes if (s := seen(n)) is not None and s.address == c.address]
            if taken:
                outcomes.append(base.Outcome("create", c.address, False,
                                             f"clash: a node this task does not own holds {c.host}:{c.port}"))
                continue
            nodes.append(node_of(c, self.scale))
            changed = True
            outcomes.append(base.Outcome("create", c.address, True))
        if not changed:
            return outcomes
        try:
            # the sub-path PATCH replaces the node list as a whole (a PATCH of the upstream would
            # merge a map into a map); an empty upstream is the empty map
            await self._write("PATCH", f"{path}/nodes", f"write nodes of upstream {uid}", nodes or {})
        except _WriteFailed as exc:
            return [base.Outcome(o.op, o.address, False, o.error or str(exc),
                                 temporary=exc.temporary if o.ok else o.temporary) for o in outcomes]
        return outcomes

    async def _ensure_route(self, service: model.ServiceKey, uid: str, task: str) -> None:
        path = f"/routes/{urllib.parse.quote(uid, safe='')}"
        try:
            found = await self._get(path, f"route {uid}")
        except errors.ReadError as exc:
            raise _WriteFailed(str(exc), temporary=True) from exc
        if found is not None:
            return
        uri = self.route_uri.replace("{service}", service.name).replace(
            "{namespace}", service.namespace or DEFAULT_NAMESPACE)
        body = {"id": uid, "name": readable(self._parts(service))[:MAX_NAME], "uri": uri, "upstream_id": uid,
                "labels": self._labels(task)}
        await self._write("PUT", path, f"create route {uid}", body)

    # ---- retiring a unit ------------------------------------------------------------------
    def _mine(self, value: Mapping[str, Any], task: str) -> bool:
        labels = value.get("labels")
        return (isinstance(labels, dict) and labels.get(MANAGED_BY) == "syncworker"
                and labels.get(TASK_LABEL) == label_value(task))

    def _foreign_nodes(self, value: Mapping[str, Any], task: str) -> list[str]:
        """The nodes of an upstream that `task` does not own (all of them when unreadable)."""
        nodes = nodes_as_list(value.get("nodes"), self.default_port)
        if nodes is None:
            return ["nodes that are neither a list nor a map"]
        out: list[str] = []
        for node in nodes:
            inst = node_to_instance(node, self.scale, self.default_port)
            if isinstance(inst, str):
                out.append(inst)
            elif inst.metadata.get(marks.TASK) != task:
                out.append(f"{inst.host}:{inst.port}")
        return out

    async def retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        uid = self.upstream_id(service)
        try:
            value = await self._upstream(uid)
        except errors.ReadError as exc:
            return [base.Retired("upstream", uid, base.FAILED, str(exc))]
        if value is not None:
            if not self._mine(value, ctx.task):
                return [base.Retired("upstream", uid, base.KEPT, base.not_made_by(ctx.task))]
            foreign = self._foreign_nodes(value, ctx.task)
            if foreign:
                return [base.Retired("upstream", uid, base.KEPT, f"holds {len(foreign)} node(s) task "
                                     f"{ctx.task!r} does not own: {', '.join(foreign[:5])}")]
        route = await self._retire_route(uid, ctx.task)
        done = [route] if route is not None else []
        if value is None or (route is not None and route.action == base.FAILED):
            return done
        return [*done, await self._remove("upstream", uid)]

    async def _retire_route(self, uid: str, task: str) -> base.Retired | None:
        """Delete the route with the upstream's id when it is this task's and points at it; None when absent."""
        try:
            item = await self._get(f"/routes/{urllib.parse.quote(uid, safe='')}", f"route {uid}")
        except errors.ReadError as exc:
            return base.Retired("route", uid, base.FAILED, str(exc))
        if item is None:
            return None
        value = item.get("value")
        if not isinstance(value, dict) or not self._mine(value, task):
            return base.Retired("route", uid, base.KEPT, base.not_made_by(task))
        if str(value.get("upstream_id")) != uid:
            return base.Retired("route", uid, base.KEPT,
                                f"points at upstream {value.get('upstream_id')!r}, not {uid!r}")
        return await self._remove("route", uid)

    async def _remove(self, kind: str, rid: str) -> base.Retired:
        what = f"delete {kind} {rid}"
        try:
            resp = await self._send("DELETE", f"/{kind}s/{urllib.parse.quote(rid, safe='')}")
        except httpx.HTTPError as exc:
            return base.Retired(kind, rid, base.FAILED, f"apisix {self.name}: {what}: {_describe(exc)}")
        if resp.status_code in (200, 204, 404):
            return base.Retired(kind, rid, base.DELETED)
        message = _message(resp)
        if resp.status_code == 400 and "still using it" in message:
            # a route or service made by hand uses the upstream: APISIX keeps it, and so do we
            return base.Retired(kind, rid, base.KEPT, f"APISIX refuses the delete: {message}")
        return base.Retired(kind, rid, base.FAILED, f"apisix {self.name}: {what}: {message}")
