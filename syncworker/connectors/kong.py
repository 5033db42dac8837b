"""Kong Gateway 3.x over its Admin API: a gateway destination (services, upstreams, targets).

Endpoint: `addresses` list Admin API addresses (`127.0.0.1:8001`, `http://...`,
`https://...`, a path prefix is kept); they are tried in order on connection errors.
`token` is sent as `Kong-Admin-Token` (Enterprise RBAC), `user`/`password` as HTTP
basic auth (an Admin API behind a basic-auth protected route). `options`: `verify`
(bool or CA bundle path), `timeout` (seconds, default 5), `name_prefix` (first label
of every derived name, default none), `page_size` (targets per listing page, 1..1000,
default 1000), `concurrency` (parallel target writes, default 8), `service_port`
(default 80), `service_protocol` (default "http").

Units and names. The engine hands a gateway one upstream per unit: dest key
`(namespace, group, name)`; group "" is the default upstream with every healthy,
enabled instance, other groups hold the instances of one polaris-sync group. Names
follow polaris-sync's `<source>.<namespace>.<service>[.<group>]` with the source
replaced by the optional `name_prefix` (set it to the source's name to get
polaris-sync's own names):

- Kong service: `[prefix.]<namespace or "default">.<service>`, created when the
  default unit first writes, `host` = the default upstream's name, port
  `service_port`, protocol `service_protocol`;
- Kong upstream: `ApplyContext.upstream_name` when the config gives one
  (polaris-sync's `upstreamName`), else `[prefix.]<namespace>.<service>.<group or "default">`.

Derived names are valid hostnames: each label keeps `[A-Za-z0-9-]`, anything else
becomes `-`; when that changed the name, or it is longer than 200 characters, or it
reads as an IP address, the last label gets `-<8 hex of sha1(original)>` so two
different services never share a name.

`list_instances` takes only the key, so the connector finds a unit's upstream this way:
the name the config gives it, which the engine passes in `bind_upstream` before every
reconcile and cleanup read (so a fresh connector finds an upstream named by
`upstreamName`, even one made by hand); else a name learned from an earlier `apply` of
the same key; else the one upstream tagged `syncworker-unit:<16 hex of sha1(key)>`
(every upstream it creates carries that tag); else the derived name. When `apply` is
asked to write to another upstream than the one the listing came from (a caller that
did not bind the name), it writes nothing, remembers the name, and fails every
operation as temporary: the engine re-reads (0.5 s later) and plans against the right
upstream.

Ownership. Upstreams and services it creates carry the tags `syncworker`,
`syncworker-task:<task>` (and upstreams `syncworker-unit:<hash>` and
`syncworker-service:<16 hex of sha1(namespace, service)>`). Targets carry
`syncworker-task:<task>` and `syncworker-origin:<origin>`, which `list_instances`
decodes into the marks `syncworker.task` / `syncworker.origin`. Kong tags may hold any
UTF-8 but `,`, `/` and non-printable ASCII, so values are percent-encoded for `%`,
`,`, `/`, space and control characters: lossless, whatever the task name. A target
without those tags (added by hand) is listed without marks: the planner never updates
or deletes it and reports a clash when a copy wants its address. Targets in an
upstream that polaris-sync created (its name is `<source>.<namespace>.<service>.<group>`
and its tags are `[TYPE, source, namespace, service, group]`, no `syncworker` tag) are
listed with polaris-sync's mark `__sync__ = <source>`, so a task whose source has that
name adopts them instead of clashing. A sync deletes only targets the plan names (by
id), never a hand-added target.

Retiring a unit (`retire`: its task was removed, or the unit left the config, and its
copies are deleted). Its upstream is deleted when it carries this task's
`syncworker-task` tag and holds no target without that tag; an upstream made by hand,
by polaris-sync or by another task, or one holding a hand-added (or another task's)
target, stays as it is, and the log says why. For the default unit the Kong service
goes too, when it carries this task's tag, its `host` is the upstream just deleted (or
already gone), and no other upstream of the same registry service with this task's tag
remains (the engine retires group units before the default one); a service made by
hand is never deleted, and one that routes still use is kept (Kong refuses the delete,
the log carries its message). A failed read or write ends the retirement of that unit:
nothing more is deleted. Kong has no conditional delete, so a target added by hand
between the listing and the delete of an upstream goes with it (one round trip).
Upstreams made before the `syncworker-service` tag existed do not count as "other
upstreams of the service".

Mapping: a target is `host:port` (IPv6 as `[addr]:port`, compressed) and a weight;
Kong's default weight 100 is canonical 1.0, so weight = round(canonical * 100) clamped
to 0..65535. A target holds nothing else: `representable` keeps host, port, the weight
so rounded and the two ownership marks; metadata, protocol and cluster are dropped,
healthy and enabled are True (gateways only receive healthy, enabled instances).

Errors: listings that fail (connection, 5xx, 401/403, anything but 200/404) raise
`errors.ReadError`; a missing upstream lists as empty. Writes: connection errors, 5xx
and 429 are temporary outcomes, other 4xx permanent ones with Kong's message. A 409 on
a target create is looked at: our own target is updated in place, anyone else's is a
clash (permanent). 404 on a delete is success.
"""

from __future__ import annotations

import asyncio
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

log = logging.getLogger("syncworker.connectors.kong")

KONG_DEFAULT_WEIGHT = 100
MAX_WEIGHT = 65535
DEFAULT_PORT = 8000  # Kong's port for a target given without one
DEFAULT_GROUP = "default"
DEFAULT_NAMESPACE = "default"

TAG = "syncworker"
TASK_TAG = "syncworker-task:"
ORIGIN_TAG = "syncworker-origin:"
UNIT_TAG = "syncworker-unit:"
SERVICE_TAG = "syncworker-service:"

MAX_NAME = 200
#: polaris-sync's RegistryType names, the first tag of the upstreams it writes
POLARIS_SYNC_TYPES = frozenset({"polaris", "nacos", "consul", "kong", "kubernetes", "zookeeper", "eureka",
                                "apollo", "etcd", "unknown"})
Json = dict[str, Any]

_TAG_UNSAFE = re.compile(r"[%,/\x00-\x20\x7f]")
_LABEL_BAD = re.compile(r"[^A-Za-z0-9-]+")


# ---- mapping (pure) ---------------------------------------------------------------------
def encode_tag(value: str) -> str:
    """Percent-encode what a Kong tag may not hold (`,` `/` space, control chars) and `%`."""
    return _TAG_UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), value)


def decode_tag(value: str) -> str:
    return urllib.parse.unquote(value)


def _digest(text: str, n: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def hostname(parts: Sequence[str]) -> str:
    """A valid hostname from `parts` joined with dots, unique per input (see module doc)."""
    raw = ".".join(parts)
    labels = [_LABEL_BAD.sub("-", label).strip("-") for label in raw.split(".")]
    name = ".".join(label for label in labels if label)
    bad = name != raw or len(name) > MAX_NAME or not name or _is_ip(name)
    if bad:
        name = name[:MAX_NAME - 9].rstrip(".-")
        name = f"{name}-{_digest(raw, 8)}" if name else f"svc-{_digest(raw, 8)}"
    return name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def unit_tag(key: model.ServiceKey) -> str:
    return UNIT_TAG + _digest(f"{key.namespace}\x00{key.group}\x00{key.name}", 16)


def service_tag(key: model.ServiceKey) -> str:
    """The tag shared by every upstream (default and groups) of one registry service."""
    return SERVICE_TAG + _digest(f"{key.namespace}\x00{key.name}", 16)


def kong_weight(weight: float) -> int:
    return int(min(MAX_WEIGHT, max(0, round(weight * KONG_DEFAULT_WEIGHT))))


def normalize_host(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        return host
    return str(addr)


def target_of(inst: model.Instance) -> str:
    host = normalize_host(inst.host)
    return f"[{host}]:{inst.port}" if ":" in host else f"{host}:{inst.port}"


def split_target(target: str) -> tuple[str, int] | None:
    """(host, port) of Kong's `host:port` / `[v6]:port`; None when malformed."""
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            return None
        host, rest = target[1:end], target[end + 1:]
    else:
        host, sep, port = target.rpartition(":")
        if not sep:
            host, rest = target, ""
        else:
            rest = ":" + port
    if not rest:
        port_num = DEFAULT_PORT
    elif rest.startswith(":") and rest[1:].isdigit():
        port_num = int(rest[1:])
    else:
        return None
    return normalize_host(host), port_num


def representable(inst: model.Instance) -> model.Instance:
    meta = {k: inst.metadata[k] for k in (marks.TASK, marks.ORIGIN) if k in inst.metadata}
    return model.Instance(normalize_host(inst.host), inst.port, weight=kong_weight(inst.weight) / KONG_DEFAULT_WEIGHT,
                          metadata=meta)


def target_tags(inst: model.Instance) -> list[str]:
    tags = []
    if inst.metadata.get(marks.TASK):
        tags.append(TASK_TAG + encode_tag(inst.metadata[marks.TASK]))
    if inst.metadata.get(marks.ORIGIN):
        tags.append(ORIGIN_TAG + encode_tag(inst.metadata[marks.ORIGIN]))
    return tags


def marks_of(tags: Sequence[str] | None) -> dict[str, str]:
    meta: dict[str, str] = {}
    for tag in tags or ():
        if tag.startswith(TASK_TAG):
            meta[marks.TASK] = decode_tag(tag[len(TASK_TAG):])
        elif tag.startswith(ORIGIN_TAG):
            meta[marks.ORIGIN] = decode_tag(tag[len(ORIGIN_TAG):])
    return meta


def polaris_sync_source(upstream: Mapping[str, Any]) -> str | None:
    """The source name when polaris-sync created this upstream (module doc), else None.

    polaris-sync tags its upstreams `[TYPE, source, namespace, service, group]`; Kong keeps
    tags as a set, so a repeated value (namespace "default", group "default") is kept once.
    """
    tags = [str(t) for t in upstream.get("tags") or []]
    if len(tags) < 3 or tags[0].lower() not in POLARIS_SYNC_TYPES or any(t.startswith(TAG) for t in tags):
        return None
    source = tags[1]
    name = urllib.parse.unquote(str(upstream.get("name") or ""))
    if not name.startswith(source + "."):
        return None
    namespace, _, rest = name[len(source) + 1:].partition(".")
    service, _, group = rest.rpartition(".")
    if not (namespace and service and group) or not {namespace, service, group} <= set(tags[2:]):
        return None
    return source


def target_to_instance(target: Mapping[str, Any], adopt_from: str | None) -> model.Instance | str:
    """The canonical instance of one Kong target, or why it is unusable."""
    raw = target.get("target")
    parsed = split_target(raw) if isinstance(raw, str) else None
    if parsed is None:
        return f"target {raw!r}: not host:port"
    weight = target.get("weight", KONG_DEFAULT_WEIGHT)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        return f"target {raw!r}: weight {weight!r} is not a number"
    meta = marks_of(target.get("tags"))
    if not meta and adopt_from:
        meta = {marks.POLARIS_SYNC: adopt_from}
    inst = model.Instance(parsed[0], parsed[1], weight=weight / KONG_DEFAULT_WEIGHT, metadata=meta,
                          native_id=str(target.get("id") or ""))
    problem = model.validate_instance(inst)
    return f"target {raw!r}: {problem}" if problem else inst


def parse_addresses(addresses: Iterable[str]) -> list[str]:
    """HTTP(S) base URLs of the configured addresses; grpc:// and other schemes are skipped."""
    return http.base_urls(addresses)


def _message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return f"HTTP {resp.status_code}: {str(data['message'])[:300]}"
    return f"HTTP {resp.status_code}"


def _error_name(resp: httpx.Response) -> str:
    """The `name` of a Kong error body (kong/db/errors.lua), or ""."""
    try:
        data = resp.json()
    except ValueError:
        return ""
    return str(data.get("name") or "") if isinstance(data, dict) else ""


_temporary_status = http.temporary_status


_describe = http.describe


_WriteFailed = http.WriteFailed


# ---- the connector ----------------------------------------------------------------------
class KongConnector(http.HttpConnector):
    type_name = "kong"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(
        source=False, destination=True, watch=False, batch_writes=False, gateway=True)
    default_weight: ClassVar[float] = float(KONG_DEFAULT_WEIGHT)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        bases = parse_addresses(endpoint.addresses)
        if not bases:
            raise errors.ConfigError([errors.ConfigProblem(
                "addresses", "no Kong Admin API address (host:port, http://... or https://...)")],
                source=endpoint.name)
        opts = dict(endpoint.options or {})
        self.timeout = float(opts.get("timeout", 5.0))
        self.verify: Any = opts.get("verify", True)
        self.prefix = str(opts.get("name_prefix", "") or "")
        self.page_size = min(1000, max(1, int(opts.get("page_size", 1000))))
        self.concurrency = max(1, int(opts.get("concurrency", 8)))
        self.service_port = int(opts.get("service_port", 80))
        self.service_protocol = str(opts.get("service_protocol", "http"))
        #: dest key -> upstream name learned from apply or found by tag
        self._names: dict[model.ServiceKey, str] = {}
        #: dest key -> upstream name the last listing read
        self._listed: dict[model.ServiceKey, str] = {}
        #: upstream names known to exist
        self._exists: set[str] = set()
        headers = {"Kong-Admin-Token": self.endpoint.token} if self.endpoint.token else {}
        self.http = http.Transport(bases, timeout=self.timeout, verify=self.verify, headers=headers,
                                   auth=(self.endpoint.user, self.endpoint.password) if self.endpoint.user else None,
                                   max_connections=max(16, self.concurrency * 2))

    # ---- naming ---------------------------------------------------------------------
    def _base_parts(self, key: model.ServiceKey) -> list[str]:
        return [*([self.prefix] if self.prefix else []), key.namespace or DEFAULT_NAMESPACE, key.name]

    def service_name(self, key: model.ServiceKey) -> str:
        return hostname(self._base_parts(key))

    def upstream_name(self, key: model.ServiceKey, asked: str = "") -> str:
        """The upstream a unit writes to: the configured name, else the derived one."""
        return asked or hostname([*self._base_parts(key), key.group or DEFAULT_GROUP])

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst)

    def bind_upstream(self, service: model.ServiceKey, upstream_name: str) -> None:
        if upstream_name:
            self._names[service] = upstream_name

    # ---- lifecycle ------------------------------------------------------------------
    async def _read(self, path: str, what: str, params: Mapping[str, Any] | None = None) -> Json | None:
        """The JSON body of a GET; None on 404; ReadError on anything else but 200."""
        try:
            resp = await self._send("GET", path, params=params)
        except httpx.HTTPError as exc:
            raise errors.ReadError(f"kong {self.name}: {what}: {_describe(exc)}") from exc
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise errors.ReadError(f"kong {self.name}: {what}: {_message(resp)}")
        try:
            data = resp.json()
        except ValueError as exc:
            raise errors.ReadError(f"kong {self.name}: {what}: the answer is not JSON") from exc
        if not isinstance(data, dict):
            raise errors.ReadError(f"kong {self.name}: {what}: unexpected answer")
        return data

    async def _write(self, method: str, path: str, what: str, body: Any = None,
                     ok: tuple[int, ...] = (200, 201, 204)) -> httpx.Response:
        """A write; returns the response when its status is in `ok` or 404/409 (left to the caller)."""
        try:
            resp = await self._send(method, path, body=body)
        except httpx.HTTPError as exc:
            raise _WriteFailed(f"{what}: {_describe(exc)}", temporary=True) from exc
        if resp.status_code in ok or resp.status_code in (404, 409):
            return resp
        raise _WriteFailed(f"{what}: {_message(resp)}", temporary=_temporary_status(resp.status_code))

    async def _pages(self, path: str, what: str, params: Mapping[str, Any] | None = None) -> list[Json] | None:
        """Every item of a paged listing (following `offset`); None when the parent is missing."""
        items: list[Json] = []
        query: dict[str, Any] = {**(params or {}), "size": self.page_size}
        seen: set[str] = set()
        while True:
            page = await self._read(path, what, query)
            if page is None:
                if items:  # the parent went away in the middle of the listing
                    raise errors.ReadError(f"kong {self.name}: {what}: vanished while paging")
                return None
            data = page.get("data")
            if not isinstance(data, list):
                raise errors.ReadError(f"kong {self.name}: {what}: no data in the answer")
            items.extend(d for d in data if isinstance(d, dict))
            offset = page.get("offset")
            if not offset:
                return items
            if offset in seen:
                raise errors.ReadError(f"kong {self.name}: {what}: paging does not advance")
            seen.add(offset)
            query = {**(params or {}), "size": self.page_size, "offset": offset}

    # ---- reads ----------------------------------------------------------------------
    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        """Kong is a destination only: there is nothing to copy from it (checks that it answers)."""
        await self._read("/", "node info")
        return []

    async def health(self) -> str | None:
        try:
            await self._read("/", "node info")
        except errors.SyncError as exc:
            return str(exc)
        return None

    async def _resolve(self, key: model.ServiceKey) -> str:
        name = self._names.get(key)
        if name:
            return name
        tagged = await self._pages("/upstreams", f"upstreams of {key}", {"tags": unit_tag(key)}) or []
        names = sorted(str(u["name"]) for u in tagged if u.get("name"))
        name = names[0] if len(names) == 1 else self.upstream_name(key)
        self._names[key] = name
        return name

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        name = await self._resolve(service)
        self._listed[service] = name
        quoted = urllib.parse.quote(name, safe="")
        upstream = await self._read(f"/upstreams/{quoted}", f"upstream {name}")
        if upstream is None:
            self._exists.discard(name)
            return base.Listing(())
        self._exists.add(name)
        targets = await self._pages(f"/upstreams/{quoted}/targets", f"targets of upstream {name}")
        if targets is None:
            self._exists.discard(name)
            return base.Listing(())
        adopt = polaris_sync_source(upstream)
        out: list[model.Instance] = []
        skipped: list[str] = []
        for t in targets:
            inst = target_to_instance(t, adopt)
            if isinstance(inst, str):
                skipped.append(inst)
            else:
                out.append(inst)
        return base.Listing(tuple(out), tuple(skipped))

    # ---- writes ---------------------------------------------------------------------
    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        ops: list[tuple[str, model.Instance, model.Instance | None]] = (
            [("delete", d, None) for d in plan.deletes]
            + [("update", u.new, u.old) for u in plan.updates]
            + [("create", c, None) for c in plan.creates])
        if not ops:
            return []
        name = self.upstream_name(service, ctx.upstream_name)
        listed = self._listed.get(service)
        if listed is not None and listed != name:
            # the plan was made from another upstream: learn the name and let the engine re-read
            self._names[service] = name
            self._listed.pop(service, None)
            msg = f"upstream of {service} is {name!r}, the listing came from {listed!r}: re-reading"
            return [base.Outcome(op, inst.address, False, msg, temporary=True) for op, inst, _ in ops]
        self._names[service] = name
        try:
            await self._ensure_upstream(service, name, ctx.task)
            if not service.group:
                await self._ensure_service(service, name, ctx.task)
        except _WriteFailed as exc:
            return [base.Outcome(op, inst.address, False, str(exc), temporary=exc.temporary) for op, inst, _ in ops]
        quoted = urllib.parse.quote(name, safe="")
        sem = asyncio.Semaphore(self.concurrency)

        async def one(op: str, inst: model.Instance, old: model.Instance | None) -> base.Outcome:
            async with sem:
                try:
                    if op == "delete":
                        await self._delete_target(quoted, inst)
                    elif op == "update":
                        await self._update_target(quoted, inst, old, ctx.task)
                    else:
                        await self._create_target(quoted, inst, ctx.task)
                except _WriteFailed as exc:
                    return base.Outcome(op, inst.address, False, str(exc), temporary=exc.temporary)
                return base.Outcome(op, inst.address, True)

        outcomes: list[base.Outcome] = []
        for phase in ("delete", "update", "create"):  # deletes first: an address may move between records
            outcomes.extend(await asyncio.gather(*(one(op, i, o) for op, i, o in ops if op == phase)))
        if any(not o.ok and "upstream gone" in o.error for o in outcomes):
            self._exists.discard(name)
        return outcomes

    def _owner_tags(self, task: str) -> list[str]:
        return [TAG, TASK_TAG + encode_tag(task)]

    async def _ensure_upstream(self, key: model.ServiceKey, name: str, task: str) -> None:
        if name in self._exists:
            return
        body = {"name": name, "tags": [*self._owner_tags(task), unit_tag(key), service_tag(key)]}
        resp = await self._write("POST", "/upstreams", f"create upstream {name}", body)
        if resp.status_code == 404:
            raise _WriteFailed(f"create upstream {name}: {_message(resp)}", temporary=False)
        # 409: it exists already (made by hand, by another worker, or listed before): fine
        self._exists.add(name)

    async def _ensure_service(self, key: model.ServiceKey, upstream: str, task: str) -> None:
        name = self.service_name(key)
        quoted = urllib.parse.quote(name, safe="")
        try:
            found = await self._read(f"/services/{quoted}", f"service {name}")
        except errors.ReadError as exc:
            raise _WriteFailed(str(exc), temporary=True) from exc
        if found is None:
            body = {"name": name, "host": upstream, "port": self.service_port, "protocol": self.service_protocol,
                    "tags": self._owner_tags(task)}
            resp = await self._write("POST", "/services", f"create service {name}", body)
            if resp.status_code == 404:
                raise _WriteFailed(f"create service {name}: {_message(resp)}", temporary=False)
            return
        mine = TASK_TAG + encode_tag(task) in (found.get("tags") or [])
        if mine and found.get("host") != upstream:
            resp = await self._write("PATCH", f"/services/{quoted}", f"point service {name} at {upstream}",
                                     {"host": upstream})
            if resp.status_code in (404, 409):
                raise _WriteFailed(f"point service {name} at {upstream}: {_message(resp)}", temporary=True)

    async def _delete_target(self, upstream: str, inst: model.Instance) -> None:
        key = urllib.parse.quote(inst.native_id or target_of(inst), safe="")
        # 404: already gone, which is what we wanted
        await self._write("DELETE", f"/upstreams/{upstream}/targets/{key}", f"delete {target_of(inst)}")

    async def _update_target(self, upstream: str, inst: model.Instance, old: model.Instance | None,
                             task: str) -> None:
        ref = inst.native_id or (old.native_id if old else "") or target_of(inst)
        body = {"weight": kong_weight(inst.weight), "tags": target_tags(inst)}
        what = f"update {target_of(inst)}"
        resp = await self._write("PATCH", f"/upstreams/{upstream}/targets/{urllib.parse.quote(ref, safe='')}",
                                 what, body)
        if resp.status_code == 404:  # gone since the listing: write it anew
            await self._create_target(upstream, inst, task)
        elif resp.status_code == 409:
            raise _WriteFailed(f"{what}: {_message(resp)}", temporary=True)

    async def _create_target(self, upstream: str, inst: model.Instance, task: str) -> None:
        target = target_of(inst)
        body = {"target": target, "weight": kong_weight(inst.weight), "tags": target_tags(inst)}
        what = f"create {target}"
        resp = await self._write("POST", f"/upstreams/{upstream}/targets", what, body)
        if resp.status_code == 404:
            raise _WriteFailed(f"{what}: upstream gone, will recreate it", temporary=True)
        if resp.status_code != 409:
            return
        # Kong 3.x: a duplicate target answers 409; ours (a write that raced a listing) is updated
        quoted = urllib.parse.quote(target, safe="")
        try:
            held = await self._read(f"/upstreams/{upstream}/targets/{quoted}", f"target {target}")
        except errors.ReadError as exc:
            raise _WriteFailed(str(exc), temporary=True) from exc
        if held is None:
            raise _WriteFailed(f"{what}: {_message(resp)}", temporary=True)
        if marks_of(held.get("tags")).get(marks.TASK) != task:
            raise _WriteFailed(f"{what}: clash: a target this task does not own holds {target}", temporary=False)
        resp = await self._write("PATCH", f"/upstreams/{upstream}/targets/{quoted}", what,
                                 {"weight": body["weight"], "tags": body["tags"]})
        if resp.status_code in (404, 409):
            raise _WriteFailed(f"{what}: {_message(resp)}", temporary=True)

    # ---- retiring a unit ------------------------------------------------------------------
    async def retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        try:
            name = ctx.upstream_name or await self._resolve(service)
        except errors.ReadError as exc:
            return [base.Retired("upstream", self.upstream_name(service), base.FAILED, str(exc))]
        upstream = await self._retire_upstream(name, ctx.task)
        done = [upstream] if upstream is not None else []
        if service.group or (upstream is not None and upstream.action != base.DELETED):
            return done  # only a default unit has a service, and only a gone upstream lets it go
        found = await self._retire_service(service, name, ctx.task)
        return [*done, found] if found is not None else done

    def _mine(self, entity: Mapping[str, Any], task: str) -> bool:
        return TASK_TAG + encode_tag(task) in (entity.get("tags") or [])

    async def _retire_upstream(self, name: str, task: str) -> base.Retired | None:
        """Delete upstream `name` when it is this task's and holds only its targets; None when absent."""
        quoted = urllib.parse.quote(name, safe="")
        try:
            found = await self._read(f"/upstreams/{quoted}", f"upstream {name}")
            if found is None:
                return None
            if not self._mine(found, task):
                return base.Retired("upstream", name, base.KEPT, base.not_made_by(task))
            held = await self._pages(f"/upstreams/{quoted}/targets", f"targets of upstream {name}") or []
        except errors.ReadError as exc:
            return base.Retired("upstream", name, base.FAILED, str(exc))
        foreign = [str(t.get("target")) for t in held if marks_of(t.get("tags")).get(marks.TASK) != task]
        if foreign:
            return base.Retired("upstream", name, base.KEPT,
                                f"holds {len(foreign)} target(s) task {task!r} does not own: {', '.join(foreign[:5])}")
        self._exists.discard(name)
        return await self._remove("upstream", name, found)

    async def _retire_service(self, key: model.ServiceKey, upstream: str, task: str) -> base.Retired | None:
        """Delete the unit's Kong service when it is this task's and nothing of it is left; None when absent."""
        name = self.service_name(key)
        try:
            found = await self._read(f"/services/{urllib.parse.quote(name, safe='')}", f"service {name}")
            if found is None:
                return None
            if not self._mine(found, task):
                return base.Retired("service", name, base.KEPT, base.not_made_by(task))
            if found.get("host") != upstream:
                return base.Retired("service", name, base.KEPT,
                                    f"points at {found.get('host')!r}, not at the retired upstream {upstream!r}")
            tags = f"{TASK_TAG}{encode_tag(task)},{service_tag(key)}"
            siblings = await self._pages("/upstreams", f"upstreams of service {name}", {"tags": tags}) or []
        except errors.ReadError as exc:
            return base.Retired("service", name, base.FAILED, str(exc))
        left = sorted(str(u.get("name")) for u in siblings if u.get("name") != upstream)
        if left:
            return base.Retired("service", name, base.KEPT,
                                f"upstreams task {task!r} made for it remain: {', '.join(left[:5])}")
        return await self._remove("service", name, found)

    async def _remove(self, kind: str, name: str, entity: Mapping[str, Any]) -> base.Retired:
        """DELETE one upstream or service (by id, as read): Kong's answer as a Retired entry."""
        what = f"delete {kind} {name}"
        ref = urllib.parse.quote(str(entity.get("id") or name), safe="")
        try:
            resp = await self._send("DELETE", f"/{kind}s/{ref}")
        except httpx.HTTPError as exc:
            return base.Retired(kind, name, base.FAILED, f"kong {self.name}: {what}: {_describe(exc)}")
        if resp.status_code in (200, 204, 404):
            return base.Retired(kind, name, base.DELETED)
        if resp.status_code == 400 and _error_name(resp) == "foreign key violation":
            # e.g. routes still use the service: Kong keeps it, and so do we
            return base.Retired(kind, name, base.KEPT, f"Kong refuses the delete: {_message(resp)}")
        return base.Retired(kind, name, base.FAILED, f"kong {self.name}: {what}: {_message(resp)}")
