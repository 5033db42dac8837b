"""CONTRACT DOUBLE of the Apache APISIX 3.x Admin API (v3 format): upstreams, routes, services. Not APISIX.

APISIX cannot run on this machine, so tests that sync into APISIX talk to this
in-process HTTP server instead. It follows the vendor's documentation and, where
the docs are silent, the Admin API source the docs describe:

* Admin API reference (apisix.apache.org/docs/apisix/3.x/admin-api, "V3 new
  feature"): no `action` field; one resource is `{"key", "value",
  "createdIndex", "modifiedIndex"}`; a list is `{"total": N, "list": [...]}`;
  paging with `page` (default 1) and `page_size` ([10, 500]); filtering lists
  by `name`, `label` and `uri`; `X-API-KEY` is the admin key; per resource:
  GET/PUT/POST/DELETE/PATCH and `PATCH /{id}/{path}` (e.g. `/upstreams/1/nodes`
  replaces the nodes); PATCH merges objects and a `null` deletes an attribute.
* `apisix/admin/init.lua`: 401 `{"error_msg": "failed to check token",
  "description": "missing apikey" | "wrong apikey"}`, the key may also come as
  `?api_key=` or an `X-API-KEY` cookie; a viewer key may only GET; bad JSON
  answers 400 `{"error_msg": "invalid request body: ...", "req_body": ...}`;
  unknown resources answer 404 `{"error_msg": "Unsupported resource type: x"}`;
  every reply carries `X-API-VERSION: v3`.
* `apisix/admin/resource.lua`: `check_conf` messages ("missing configurations",
  "missing upstream id", "wrong upstream id", "wrong upstream id, do not need
  it", "the property is forbidden:  create_time"), PUT answers 201 when it
  creates and 200 when it replaces, POST answers 201 with a generated id,
  DELETE answers 200 `{"deleted": "1", "key": ...}`, delete checks (an upstream
  a route still uses cannot be deleted unless `?force=true`).
* `apisix/core/etcd.lua`: a missing key answers 404 `{"message": "Key not
  found"}`; POST ids are the etcd revision zero-padded to 20 digits.
* `apisix/admin/v3_adapter.lua`: `total` counts after filtering, before paging;
  paging sorts by `createdIndex`; `page_size` out of range answers 400 with the
  plain-text body `page_size must be between 10 and 500`.
* `apisix/schema_def.lua` and `apisix/upstream.lua`: upstream `nodes` is either a
  `{"host:port": weight}` map or a list of `{host, port, weight, priority,
  metadata}` (host and weight required); defaults `type=roundrobin`,
  `scheme=http`, `pass_host=pass`, `hash_on=vars`, node `priority=0`; route
  defaults `priority=0`, `status=1`; `labels` values are non-blank strings.

Storage: in memory (an etcd-like key space with revisions), or - with
`etcd_url=` - a real etcd through its v3 JSON gateway, under `/apisix/` as
APISIX lays it out (`/apisix/upstreams/1` -> JSON value), so readers of the
etcd see what a real APISIX would have written.
"""

from __future__ import annotations

import base64
import copy
import http
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.doubles._server import DoubleServer, Reply, Request, json_reply

APISIX_VERSION = "3.9.1"
DEFAULT_ADMIN_KEY = "edd1c9f034335f136f87ad84b625c8f1"  # the key in APISIX's sample config.yaml
RESOURCES = {"upstreams": "upstream", "routes": "route", "services": "service"}

_ID_RE = re.compile(r"^[a-zA-Z0-9-_.]+$")
_HOST_RE = re.compile(r"^\*?[0-9a-zA-Z-._\[\]:]+$")
_LABEL_VALUE_RE = re.compile(r"^\S+$")
KEY_NOT_FOUND = {"message": "Key not found"}


# --------------------------------------------------------------------------- key-value storage
@dataclass
class Node:
    key: str
    value: Any
    create_revision: int
    mod_revision: int


class StorageError(RuntimeError):
    """The backing store failed; the double answers 503 {"error_msg": ...} as APISIX does."""


class MemoryKV:
    """An etcd-shaped key space: every write bumps one global revision."""

    def __init__(self) -> None:
        self.revision = 1
        self._nodes: dict[str, Node] = {}

    def get(self, key: str) -> Node | None:
        node = self._nodes.get(key)
        return copy.deepcopy(node) if node else None

    def range(self, prefix: str) -> list[Node]:
        return [copy.deepcopy(n) for k, n in sorted(self._nodes.items()) if k.startswith(prefix)]

    def put(self, key: str, value: Any) -> tuple[bool, int]:
        self.revision += 1
        old = self._nodes.get(key)
        created = old is None
        self._nodes[key] = Node(key, copy.deepcopy(value), old.create_revision if old else self.revision,
                                self.revision)
        return created, self.revision

    def bump(self, key: str) -> int:
        """Write a throw-away key (APISIX's `/gen_id`) and return the new revision."""
        self.revision += 1
        return self.revision

    def delete(self, key: str) -> bool:
        if key not in self._nodes:
            return False
        self.revision += 1
        del self._nodes[key]
        return True

    def close(self) -> None:
        return


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class EtcdKV:
    """The same interface on a real etcd, through the v3 JSON gateway (`/v3/kv/...`, base64 keys/values)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def _call(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = self._client.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise StorageError(f"etcd unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise StorageError(f"etcd answered {resp.status_code}: {resp.text[:200]}")
        data: dict[str, Any] = resp.json()
        return data

    @staticmethod
    def _node(kv: dict[str, Any]) -> Node | None:
        try:
            value = json.loads(base64.b64decode(kv.get("value", "")))
        except ValueError:
            return None  # e.g. APISIX's "init_dir" placeholders
        return Node(base64.b64decode(kv["key"]).decode(), value, int(kv["create_revision"]),
                    int(kv["mod_revision"]))

    def get(self, key: str) -> Node | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return self._node(kvs[0]) if kvs else None

    def range(self, prefix: str) -> list[Node]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs", [])
        return [n for n in (self._node(kv) for kv in kvs) if n is not None]

    def put(self, key: str, value: Any) -> tuple[bool, int]:
        data = self._call("/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(value)), "prev_kv": True})
        return "prev_kv" not in data, int(data["header"]["revision"])

    def bump(self, key: str) -> int:
        data = self._call("/v3/kv/put", {"key": _b64(key), "value": _b64("1")})
        return int(data["header"]["revision"])

    def delete(self, key: str) -> bool:
        data = self._call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", "0")) > 0

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- schema checks
class Invalid(Exception):
    """A schema failure; the text is what APISIX's jsonschema puts after "invalid configuration: "."""


def _lua_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "userdata"
    return "table"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


PropSpec = dict[str, Any]


def _check_prop(name: str, spec: PropSpec, value: Any) -> None:
    def fail(detail: str) -> None:
        raise Invalid(f'property "{name}" validation failed: {detail}')

    typ = spec.get("type")
    ok = {
        None: True,
        "string": isinstance(value, str),
        "integer": isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer(),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[typ]
    if not ok:
        fail(f"wrong type: expected {typ}, got {_lua_type(value)}")
    if "enum" in spec and value not in spec["enum"]:
        fail("matches none of the enum values")
    if "minimum" in spec and value < spec["minimum"]:
        fail(f"expected {_num(value)} to be at least {_num(spec['minimum'])}")
    if "maximum" in spec and value > spec["maximum"]:
        fail(f"expected {_num(value)} to be at most {_num(spec['maximum'])}")
    if "exclusive_minimum" in spec and value <= spec["exclusive_minimum"]:
        fail(f"expected {_num(value)} to be greater than {_num(spec['exclusive_minimum'])}")
    if typ == "string":
        if "min_length" in spec and len(value) < spec["min_length"]:
            fail(f"string too short, expected at least {spec['min_length']}, got {len(value)}")
        if "max_length" in spec and len(value) > spec["max_length"]:
            fail(f"string too long, expected at most {spec['max_length']}, got {len(value)}")
        if "pattern" in spec and not re.search(spec["pattern"], value):
            fail(f'failed to match pattern "{spec["pattern"]}" with "{value}"')
    if typ == "array":
        if "min_items" in spec and len(value) < spec["min_items"]:
            fail(f"expect array to have at least {spec['min_items']} items")
        if spec.get("unique"):
            for i, item in enumerate(value):
                if item in value[:i]:
                    fail(f"expected unique items but items {value.index(item) + 1} and {i + 1} are equal")
        if "items" in spec:
            for item in value:
                try:
                    _check_prop(name, spec["items"], item)
                except Invalid as exc:
                    fail(f"failed to validate item: {str(exc).split(': ', 1)[-1]}")
    if "check" in spec:
        detail = spec["check"](value)
        if detail:
            fail(detail)


def _check_props(props: dict[str, PropSpec], conf: dict[str, Any]) -> None:
    for name in sorted(conf):
        if name in props and conf[name] is not None:
            _check_prop(name, props[name], conf[name])


def _labels_check(labels: dict[str, Any]) -> str | None:
    for key, value in labels.items():
        if not isinstance(value, str):
            return f'failed to validate {key} (matching ".*"): wrong type: expected string, got {_lua_type(value)}'
        if not 1 <= len(value) <= 256 or not _LABEL_VALUE_RE.match(value):
            return f'failed to validate {key} (matching ".*"): failed to match pattern "^\\S+$" with "{value}"'
    return None


def _id_check(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    if isinstance(value, str) and 1 <= len(value) <= 64 and _ID_RE.match(value):
        return None
    return "object matches none of the required"


def _nodes_ok(nodes: Any) -> bool:
    """schema_def.lua nodes: anyOf {"host:port": weight>=0} or [{host, port?, weight, priority?, metadata?}]."""
    if isinstance(nodes, dict):
        return all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in nodes.values())
    if not isinstance(nodes, list):
        return False
    for node in nodes:
        if not isinstance(node, dict) or "host" not in node or "weight" not in node:
            return False
        host, weight, port = node["host"], node["weight"], node.get("port")
        if not isinstance(host, str) or not _HOST_RE.match(host):
            return False
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            return False
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535):
            return False
        if "priority" in node and (not isinstance(node["priority"], int) or isinstance(node["priority"], bool)):
            return False
        if "metadata" in node and not isinstance(node["metadata"], dict):
            return False
    return True


def _timeout_check(value: dict[str, Any]) -> str | None:
    for part in ("connect", "send", "read"):
        if part in value:
            v = value[part]
            if not isinstance(v, int | float) or isinstance(v, bool):
                return f'property "{part}" validation failed: wrong type: expected number, got {_lua_type(v)}'
            if v <= 0:
                return f'property "{part}" validation failed: expected {_num(v)} to be greater than 0'
    return None


COMMON_PROPS: dict[str, PropSpec] = {
    "id": {"check": _id_check},
    "name": {"type": "string", "min_length": 1, "max_length": 100},
    "desc": {"type": "string", "max_length": 256},
    "labels": {"type": "object", "check": _labels_check},
}

UPSTREAM_PROPS: dict[str, PropSpec] = {
    **COMMON_PROPS,
    "type": {"type": "string", "enum": ["roundrobin", "chash", "ewma", "least_conn"]},
    "nodes": {"check": lambda v: None if _nodes_ok(v) else "object matches none of the required"},
    "retries": {"type": "integer", "minimum": 0},
    "retry_timeout": {"type": "number", "minimum": 0},
    "timeout": {"type": "object", "check": _timeout_check},
    "scheme": {"type": "string", "enum": ["grpc", "grpcs", "http", "https", "tcp", "tls", "udp", "kafka"]},
    "pass_host": {"type": "string", "enum": ["pass", "node", "rewrite"]},
    "upstream_host": {"type": "string", "pattern": _HOST_RE.pattern},
    "hash_on": {"type": "string", "enum": ["vars", "header", "cookie", "consumer", "vars_combinations"]},
    "key": {"type": "string"},
    "service_name": {"type": "string", "min_length": 1, "max_length": 256},
    "discovery_type": {"type": "string"},
    "discovery_args": {"type": "object"},
    "checks": {"type": "object"},
    "keepalive_pool": {"type": "object"},
    "tls": {"type": "object"},
}
UPSTREAM_DEFAULTS = {"type": "roundrobin", "scheme": "http", "pass_host": "pass", "hash_on": "vars"}

_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE"]
ROUTE_PROPS: dict[str, PropSpec] = {
    **COMMON_PROPS,
    "uri": {"type": "string", "min_length": 1, "max_length": 4096},
    "uris": {"type": "array", "min_items": 1, "unique": True,
             "items": {"type": "string", "min_length": 1, "max_length": 4096}},
    "methods": {"type": "array", "unique": True, "items": {"type": "string", "enum": _METHODS}},
    "host": {"type": "string", "pattern": r"^\*?[0-9a-zA-Z-._]+$"},
    "hosts": {"type": "array", "min_items": 1, "unique": True,
              "items": {"type": "string", "pattern": r"^\*?[0-9a-zA-Z-._]+$"}},
    "remote_addr": {"type": "string"},
    "remote_addrs": {"type": "array", "min_items": 1, "items": {"type": "string"}},
    "priority": {"type": "integer"},
    "status": {"type": "integer", "enum": [1, 0]},
    "vars": {"type": "array"},
    "plugins": {"type": "object"},
    "upstream": {"type": "object"},
    "upstream_id": {"check": _id_check},
    "service_id": {"check": _id_check},
    "plugin_config_id": {"check": _id_check},
    "timeout": {"type": "object", "check": _timeout_check},
    "enable_websocket": {"type": "boolean"},
    "filter_func": {"type": "string", "pattern": r"^function"},
    "script": {"type": "string", "min_length": 10, "max_length": 102400},
}
ROUTE_DEFAULTS = {"priority": 0, "status": 1}

SERVICE_PROPS: dict[str, PropSpec] = {
    **COMMON_PROPS,
    "upstream": {"type": "object"},
    "upstream_id": {"check": _id_check},
    "plugins": {"type": "object"},
    "hosts": {"type": "array", "min_items": 1, "unique": True,
              "items": {"type": "string", "pattern": r"^\*?[0-9a-zA-Z-._]+$"}},
    "enable_websocket": {"type": "boolean"},
    "script": {"type": "string", "min_length": 10, "max_length": 102400},
}


def check_upstream_schema(conf: dict[str, Any]) -> None:
    """Validate and fill defaults in place; raises Invalid."""
    _check_props(UPSTREAM_PROPS, conf)
    has_nodes = "nodes" in conf
    has_discovery = "service_name" in conf and "discovery_type" in conf
    if has_nodes and has_discovery:
        raise Invalid("value should match only one schema, but matches both schemas 1 and 2")
    if not has_nodes and not has_discovery:
        raise Invalid("value should match only one schema, but matches none")
    for key, value in UPSTREAM_DEFAULTS.items():
        conf.setdefault(key, value)
    if isinstance(conf.get("nodes"), list):
        for node in conf["nodes"]:
            node.setdefault("priority", 0)


def upstream_extra_checks(conf: dict[str, Any]) -> str | None:
    """apisix/upstream.lua check_upstream_conf after the schema."""
    if conf.get("pass_host") == "node" and isinstance(conf.get("nodes"), dict | list) and len(conf["nodes"]) != 1:
        return "only support single node for `node` mode currently"
    if conf.get("pass_host") == "rewrite" and not conf.get("upstream_host"):
        return "`upstream_host` can't be empty when `pass_host` is `rewrite`"
    if conf.get("type") == "chash" and conf.get("hash_on") != "consumer" and not conf.get("key"):
        return "missing key"
    return None


# --------------------------------------------------------------------------- the double
class ApisixAdminDouble(DoubleServer):
    """APISIX 3.x Admin API (v3) contract double. `state()` returns what it holds; see module docstring."""

    server_name = f"APISIX/{APISIX_VERSION}"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, api_key: str | None = DEFAULT_ADMIN_KEY,
                 viewer_key: str | None = None, etcd_url: str | None = None, prefix: str = "/apisix",
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(host=host, port=port)
        self.api_key = api_key
        self.viewer_key = viewer_key
        self.prefix = prefix.rstrip("/")
        self.clock = clock
        self.kv: MemoryKV | EtcdKV = EtcdKV(etcd_url) if etcd_url else MemoryKV()
        self._lock = threading.RLock()

    def close(self) -> None:
        """Stop serving and release the etcd client (if any)."""
        self.stop()
        self.kv.close()

    # ----------------------------------------------------------------- assertions
    def state(self) -> dict[str, dict[str, dict[str, Any]]]:
        """resource -> id -> stored value (deep copies), read from the backing store."""
        with self._lock:
            out: dict[str, dict[str, dict[str, Any]]] = {}
            for res in RESOURCES:
                base = f"{self.prefix}/{res}/"
                out[res] = {n.key[len(base):]: n.value for n in self.kv.range(base)}
            return out

    def key_of(self, res: str, rid: str) -> str:
        return f"{self.prefix}/{res}/{rid}"

    # ----------------------------------------------------------------- plumbing
    def extra_headers(self) -> dict[str, str]:
        return {"X-API-VERSION": "v3"}

    def unavailable_reply(self, status: int) -> Reply:
        phrase = http.HTTPStatus(status).phrase
        return json_reply(status, {"error_msg": f"{status} {phrase}"})

    def _now(self) -> int:
        return int(self.clock())

    def _check_token(self, request: Request) -> str | None:
        if self.api_key is None:
            return None
        token = request.header("X-API-KEY") or request.arg("api_key")
        if token is None:
            for part in (request.header("Cookie") or "").split(";"):
                name, _, value = part.strip().partition("=")
                if name.lower() == "x_api_key" or name.lower() == "x-api-key":
                    token = value
        if token is None:
            return "missing apikey"
        if token == self.api_key:
            return None
        if self.viewer_key is not None and token == self.viewer_key:
            return None if request.method in ("GET", "HEAD") else "invalid method for role viewer"
        return "wrong apikey"

    def handle(self, request: Request) -> Reply:
        seg = request.segments
        if seg[:2] != ["apisix", "admin"]:
            return json_reply(404, {"error_msg": "404 Route Not Found"})
        denied = self._check_token(request)
        if denied:
            return json_reply(401, {"error_msg": "failed to check token", "description": denied})
        if len(seg) == 2:
            return Reply(200) if request.method == "HEAD" else json_reply(404, {"error_msg": "not found"})
        res = seg[2]
        if res not in RESOURCES:
            # only upstreams, routes and services are modelled; the rest answers like an unknown type
            return json_reply(404, {"error_msg": f"Unsupported resource type: {res}"})
        method = request.method.lower()
        if method not in ("get", "put", "post", "delete", "patch"):
            return json_reply(404, {"error_msg": "not found"})
        conf: Any = None
        if request.body:
            try:
                conf = json.loads(request.body)
            except ValueError as exc:
                return json_reply(400, {"error_msg": f"invalid request body: {exc}",
                                        "req_body": request.body.decode(errors="replace")})
        ttl = request.arg("ttl")
        if ttl is not None:
            try:
                float(ttl)
            except ValueError:
                return json_reply(400, {"error_msg": "invalid argument ttl: should be a number"})
        rid = seg[3] if len(seg) > 3 else None
        sub_path = "/".join(seg[4:])
        try:
            with self._lock:
                return getattr(self, f"_{method}")(res, rid, conf, sub_path, request)
        except StorageError as exc:
            return json_reply(503, {"error_msg": str(exc)})

    # ----------------------------------------------------------------- formatting
    def _item(self, node: Node) -> dict[str, Any]:
        return {"key": node.key, "value": node.value, "createdIndex": node.create_revision,
                "modifiedIndex": node.mod_revision}

    # ----------------------------------------------------------------- checks
    def _check_conf(self, res: str, rid: str | None, conf: Any, need_id: bool,
                    allow_time: bool = False) -> tuple[str | bool | None, dict[str, Any] | None]:
        kind = RESOURCES[res]
        if conf is None:
            return None, {"error_msg": "missing configurations"}
        if not isinstance(conf, dict):
            return None, {"error_msg": "invalid configuration: wrong type: expected object, got "
                                       f"{_lua_type(conf)}"}
        the_id = rid if rid is not None else conf.get("id")
        if need_id and the_id is None:
            return None, {"error_msg": f"missing {kind} id"}
        if not need_id and the_id is not None:
            return None, {"error_msg": f"wrong {kind} id, do not need it"}
        if need_id and conf.get("id") is not None and str(conf["id"]) != str(the_id):
            return None, {"error_msg": f"wrong {kind} id"}
        conf["id"] = the_id
        if conf["id"] is None:
            del conf["id"]
        if not allow_time:
            for where, obj in (("", conf), ("upstream.", conf.get("upstream")), ("plugins.", conf.get("plugins"))):
                if isinstance(obj, dict):
                    for prop in ("create_time", "update_time"):
                        if obj.get(prop):
                            # resource.lua: "the property is forbidden: " .. " " .. name (two spaces)
                            return None, {"error_msg": f"the property is forbidden:  {where}{prop}"}
        err = getattr(self, f"_check_{res}")(conf)
        if err:
            return None, {"error_msg": err}
        return (str(the_id) if need_id else True), None

    def _check_upstreams(self, conf: dict[str, Any]) -> str | None:
        try:
            check_upstream_schema(conf)
        except Invalid as exc:
            return f"invalid configuration: {exc}"
        return upstream_extra_checks(conf)

    def _inline_upstream(self, conf: dict[str, Any]) -> str | None:
        upstream = conf.get("upstream")
        if upstream is None:
            return None
        try:
            check_upstream_schema(upstream)
        except Invalid as exc:
            return f'invalid configuration: property "upstream" validation failed: {exc}'
        return upstream_extra_checks(upstream)

    def _exists(self, res: str, rid: Any) -> bool:
        return self.kv.get(self.key_of(res, str(rid))) is not None

    def _check_routes(self, conf: dict[str, Any]) -> str | None:
        try:
            _check_props(ROUTE_PROPS, conf)
        except Invalid as exc:
            return f"invalid configuration: {exc}"
        matchers = [k for k in ("uri", "uris") if k in conf]
        targets = [k for k in ("plugins", "upstream", "upstream_id", "service_id", "plugin_config_id", "script")
                   if k in conf]
        if len(matchers) != 1 or not targets:
            return "invalid configuration: value should match only one schema, but matches none"
        for key, value in ROUTE_DEFAULTS.items():
            conf.setdefault(key, value)
        if "host" in conf and "hosts" in conf:
            return "only one of host or hosts is allowed"
        if "remote_addr" in conf and "remote_addrs" in conf:
            return "only one of remote_addr or remote_addrs is allowed"
        err = self._inline_upstream(conf)
        if err:
            return err
        if "upstream_id" in conf and not self._exists("upstreams", conf["upstream_id"]):
            return f"failed to fetch upstream info by upstream id [{conf['upstream_id']}], response code: 404"
        if "service_id" in conf and not self._exists("services", conf["service_id"]):
            return f"failed to fetch service info by service id [{conf['service_id']}], response code: 404"
        if "plugin_config_id" in conf:
            return (f"failed to fetch plugin config info by plugin config id [{conf['plugin_config_id']}], "
                    "response code: 404")
        return None

    def _check_services(self, conf: dict[str, Any]) -> str | None:
        try:
            _check_props(SERVICE_PROPS, conf)
        except Invalid as exc:
            return f"invalid configuration: {exc}"
        err = self._inline_upstream(conf)
        if err:
            return err
        if "upstream_id" in conf and not self._exists("upstreams", conf["upstream_id"]):
            return f"failed to fetch upstream info by upstream id [{conf['upstream_id']}], response code: 404"
        return None

    def _delete_checker(self, res: str, rid: str) -> str | None:
        if res == "upstreams":
            for user in ("routes", "services"):
                for node in self.kv.range(f"{self.prefix}/{user}/"):
                    if str(node.value.get("upstream_id")) == rid:
                        return (f"can not delete this upstream, {RESOURCES[user]} "
                                f"[{node.value.get('id')}] is still using it now")
        if res == "services":
            for node in self.kv.range(f"{self.prefix}/routes/"):
                if str(node.value.get("service_id")) == rid:
                    return f"can not delete this service directly, route [{node.value.get('id')}] is still using it now"
        return None

    def _stamp(self, conf: dict[str, Any], prev: Node | None, *, patch: Any = None) -> None:
        """utils.inject_timestamp: keep create_time, refresh update_time unless the request set it."""
        if not conf.get("create_time"):
            conf["create_time"] = (prev.value.get("create_time") if prev else None) or self._now()
        if not conf.get("update_time") or (patch is not None and (patch is True or "update_time" not in patch)):
            conf["update_time"] = self._now()

    # ----------------------------------------------------------------- methods
    def _get(self, res: str, rid: str | None, _conf: Any, _sub: str, request: Request) -> Reply:
        if rid is not None:
            node = self.kv.get(self.key_of(res, rid))
            if node is None:
                return json_reply(404, KEY_NOT_FOUND)
            return json_reply(200, self._item(node))
        items = [self._item(n) for n in self.kv.range(f"{self.prefix}/{res}/")]
        items = self._filter(items, request)
        body: dict[str, Any] = {"total": len(items), "list": items}
        page, page_size = request.arg("page"), request.arg("page_size")
        if page is not None and page_size is not None:
            try:
                size = int(float(page_size))
                number = int(float(page))
            except ValueError:
                return json_reply(200, body)
            if not 10 <= size <= 500:
                return Reply(400, "page_size must be between 10 and 500")
            number = max(number, 1)
            ordered = sorted(items, key=lambda i: i["createdIndex"])
            body["list"] = ordered[(number - 1) * size: number * size]
        return json_reply(200, body)

    @staticmethod
    def _filter(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
        name, label, uri = request.arg("name"), request.arg("label"), request.arg("uri")
        out = []
        for item in items:
            value = item["value"]
            if name is not None and not (isinstance(value.get("name"), str) and re.search(name, value["name"])):
                continue
            if label is not None and label not in (value.get("labels") or {}):
                continue
            if uri is not None:
                uris = ([value["uri"]] if isinstance(value.get("uri"), str) else []) + list(value.get("uris") or [])
                if not any(re.search(uri, u) for u in uris):
                    continue
            out.append(item)
        return out

    def _put(self, res: str, rid: str | None, conf: Any, _sub: str, _request: Request) -> Reply:
        the_id, err = self._check_conf(res, rid, conf, need_id=True)
        if err is not None:
            return json_reply(400, err)
        key = self.key_of(res, str(the_id))
        self._stamp(conf, self.kv.get(key))
        created, _rev = self.kv.put(key, conf)
        return json_reply(201 if created else 200, {"key": key, "value": conf})

    def _post(self, res: str, rid: str | None, conf: Any, _sub: str, _request: Request) -> Reply:
        _ok, err = self._check_conf(res, rid, conf, need_id=False)
        if err is not None:
            return json_reply(400, err)
        self._stamp(conf, None)
        new_id = f"{self.kv.bump(f'{self.prefix}/gen_id'):020d}"
        conf["id"] = new_id
        key = self.key_of(res, new_id)
        self.kv.put(key, conf)
        return json_reply(201, {"key": key, "value": conf})

    def _delete(self, res: str, rid: str | None, _conf: Any, _sub: str, request: Request) -> Reply:
        if rid is None:
            return json_reply(400, {"error_msg": f"missing {RESOURCES[res]} id"})
        if request.arg("force") != "true":
            err = self._delete_checker(res, rid)
            if err:
                return json_reply(400, {"error_msg": err})
        key = self.key_of(res, rid)
        if not self.kv.delete(key):
            return json_reply(404, KEY_NOT_FOUND)
        return json_reply(200, {"deleted": "1", "key": key})

    def _patch(self, res: str, rid: str | None, conf: Any, sub_path: str, _request: Request) -> Reply:
        if rid is None:
            return json_reply(400, {"error_msg": f"missing {RESOURCES[res]} id"})
        if conf is None:
            return json_reply(400, {"error_msg": "missing new configuration"})
        if not sub_path and not isinstance(conf, dict):
            return json_reply(400, {"error_msg": "invalid configuration"})
        key = self.key_of(res, rid)
        old = self.kv.get(key)
        if old is None:
            return json_reply(404, KEY_NOT_FOUND)
        value = copy.deepcopy(old.value)
        if sub_path:
            value, err = _patch_sub_path(value, sub_path, conf)
            if err:
                return json_reply(400, {"error_msg": err})
            self._stamp(value, None, patch=True)
        else:
            value = merge(value, conf)
            self._stamp(value, None, patch=conf)
        _the_id, error = self._check_conf(res, rid, value, need_id=True, allow_time=True)
        if error is not None:
            return json_reply(400, error)
        self.kv.put(key, value)
        return json_reply(200, {"key": key, "value": value})


def merge(origin: dict[str, Any], extend: dict[str, Any]) -> dict[str, Any]:
    """apisix/core/table.lua merge: objects merge recursively, arrays are replaced, null deletes."""
    for key, value in extend.items():
        if isinstance(value, dict) and isinstance(origin.get(key), dict):
            merge(origin[key], value)
        elif value is None:
            origin.pop(key, None)
        else:
            origin[key] = copy.deepcopy(value)
    return origin


def _patch_sub_path(value: dict[str, Any], sub_path: str, conf: Any) -> tuple[Any, str | None]:
    """apisix/core/table.lua patch: replace the value found at `sub_path` (e.g. "nodes") by `conf`."""
    parts = sub_path.split("/")
    node: Any = value
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            return value, "invalid sub-path: /" + "/".join(parts[: i + 1])
    if not isinstance(node, dict):
        return value, "invalid sub-path: /" + sub_path
    node[parts[-1]] = copy.deepcopy(conf)
    return value, None
