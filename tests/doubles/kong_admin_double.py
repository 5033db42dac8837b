"""CONTRACT DOUBLE of the Kong Gateway 3.x Admin API (services, upstreams, targets). Not Kong.

Kong cannot run on this machine, so tests that sync into Kong talk to this
in-process HTTP server instead. It was written from Kong's own documentation
and, where the docs are silent, from the Admin API source the docs are
generated from:

* Admin API reference 3.4 (docs.konghq.com, `app/_src/gateway/admin-api/admin-api-3.4.x.md`):
  entity bodies, defaults and example objects (Service, Upstream, Target),
  "Tags" (`?tags=a,b` is AND, `a/b` is OR, at most 5, no mixing, ignored on
  nested endpoints such as `/upstreams/{u}/targets`), PUT "Update or create"
  (a UUID in the URL names the id, anything else the endpoint key),
  `/upstreams/{name or id}/targets/all`, `DELETE` answering 204.
* Upgrade notes 3.x: "POST requests on /targets endpoints are no longer able to
  update existing entities" and "insert and update operations on duplicated
  targets return a 409 error".
* `kong/api/endpoints.lua`: pagination (`size` default 100, max 1000; the
  response carries `data`, `next` and - only when there is a next page -
  `offset`; top-level `next` keeps `tags` and `size`, nested `next` does not),
  error status mapping, `{"message": "Not found"}`, DELETE on an entity that
  does not exist still answering 204.
* `kong/db/errors.lua`: error bodies (`code`, `name`, `message`, `fields`),
  e.g. schema violation (code 2) and unique constraint violation (code 5, 409)
  with the message `UNIQUE violation detected on '{name="x"}'`.

What the double does not model: routes, consumers, plugins, certificates,
workspaces, DB-less mode, health endpoints' real balancer data.

Admin auth: start it with `admin_token=` to require the Enterprise RBAC header
`Kong-Admin-Token`, and/or `basic_auth=(user, password)` for an Admin API
fronted by a basic-auth protected loopback route; both answer 401 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import copy
import http
import ipaddress
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

from tests.doubles._server import DoubleServer, Reply, Request, json_reply

KONG_VERSION = "3.4.2"
DEFAULT_TARGET_PORT = 8000
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
MAX_TAGS_IN_FILTER = 5

_MISSING = object()
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_\-]*)(?:\.[A-Za-z0-9_\-]+)*\.?$")
# kong/api/endpoints.lua: printable ASCII 0x20-0x7E except ',' and '/', plus non-ASCII utf-8
_TAG_CHARS = r"\x20-\x2b\x2d\x2e\x30-\x7e\u0080-\U0010ffff"
_TAGS_AND = re.compile(f"^(?:[{_TAG_CHARS}]+(?:,|$))+$")
_TAGS_OR = re.compile(f"^(?:[{_TAG_CHARS}]+(?:/|$))+$")
_UTF8_NAME = re.compile(r"^[A-Za-z0-9.\-_~\u0080-\U0010ffff]+$")


def is_uuid(value: str) -> bool:
    return bool(_UUID_RE.match(value))


# --------------------------------------------------------------------------- error bodies (kong/db/errors.lua)
def _lua_pretty(value: Any) -> str:
    """Roughly penlight's pretty.write(value, "") as Kong's error messages show tables."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_lua_pretty(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "{" + ",".join(_lua_pretty(v) for v in value) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def schema_violation(errors: dict[str, Any]) -> dict[str, Any]:
    parts: list[str] = list(errors.get("@entity", []))
    for name in sorted(k for k in errors if k != "@entity"):
        value = errors[name]
        if isinstance(value, dict):
            for sub in sorted(value):
                sub_value = value[sub]
                shown = _lua_pretty(sub_value) if isinstance(sub_value, dict | list) else sub_value
                parts.append(f"{name}.{sub}: {shown}")
        elif isinstance(value, list):
            for index, sub_value in enumerate(value, start=1):
                if sub_value is not None:
                    parts.append(f"{name}.{index}: {sub_value}")
        else:
            parts.append(f"{name}: {value}")
    if len(parts) == 1:
        message = f"schema violation ({parts[0]})"
    else:
        message = f"{len(parts)} schema violations ({'; '.join(parts)})"
    return {"code": 2, "name": "schema violation", "message": message, "fields": errors}


def unique_violation(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "code": 5,
        "name": "unique constraint violation",
        "message": f"UNIQUE violation detected on '{_lua_pretty(fields)}'",
        "fields": fields,
    }


def _invalid_size(message: str) -> Reply:
    return json_reply(400, {"code": 9, "name": "invalid size", "message": message})


def _invalid_offset(offset: str, err: str) -> Reply:
    return json_reply(400, {"code": 7, "name": "invalid offset",
                            "message": f"'{offset}' is not a valid offset: {err}"})


def _invalid_options(errors: dict[str, str]) -> Reply:
    parts = [f"{k}: {v}" for k, v in sorted(errors.items())]
    message = f"invalid option ({parts[0]})" if len(parts) == 1 else \
        f"{len(parts)} option violations ({'; '.join(parts)})"
    return json_reply(400, {"code": 11, "name": "invalid options", "message": message, "options": errors})


NOT_FOUND = {"message": "Not found"}


# --------------------------------------------------------------------------- field validators
def _validate_host(value: str) -> str | None:
    try:
        ipaddress.ip_address(value.strip("[]"))
        return None
    except ValueError:
        pass
    return None if _HOST_RE.match(value) else f"invalid value: {value}"


def _validate_upstream_name(value: str) -> str | None:
    host, port = _split_host_port(value)
    if host is None:
        return "Invalid name; must be a valid hostname"
    try:
        ipaddress.ip_address(host.strip("[]"))
        return "Invalid name; no ip addresses allowed"
    except ValueError:
        pass
    if port is not None:
        return "Invalid name; no port allowed"
    return None


def _validate_utf8_name(value: str) -> str | None:
    if _UTF8_NAME.match(value):
        return None
    return (f"invalid value '{value}': the only accepted ascii characters are alphanumerics "
            "or ., -, _, and ~")


def _validate_path(value: str) -> str | None:
    return None if value.startswith("/") else "should start with: /"


def _validate_tag(value: str) -> str | None:
    if value and all(ch not in ",/" and (ord(ch) >= 0x20 and ord(ch) != 0x7F) for ch in value):
        return None
    return f"invalid tag '{value}': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"


def _split_host_port(value: str) -> tuple[str | None, int | None]:
    """(host, port) of "host", "host:port", "[v6]", "[v6]:port" or bare "v6"; (None, None) if malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None, None
        host, rest = value[: end + 1], value[end + 1:]
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None, None
        if not rest:
            return host, None
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None, None
        return host, int(rest[1:])
    if value.count(":") > 1:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return None, None
        return f"[{value}]", None
    host, sep, port = value.partition(":")
    if not host or (_validate_host(host) is not None):
        return None, None
    if sep:
        if not port.isdigit() or int(port) > 65535:
            return None, None
        return host, int(port)
    return host, None


def format_target(value: str) -> str | None:
    """Kong's format_target: "host" -> "host:8000"; None when not a hostname or IP (with optional port)."""
    host, port = _split_host_port(value)
    if host is None:
        return None
    return f"{host}:{DEFAULT_TARGET_PORT if port is None else port}"


# --------------------------------------------------------------------------- schemas
Spec = dict[str, Any]


def _f(typ: str, **kw: Any) -> Spec:
    return {"type": typ, **kw}


TAGS: Spec = _f("set", elements=_f("string", validator=_validate_tag))
HTTP_STATUSES = _f("array", elements=_f("integer", between=(100, 999)))
CHECK_TYPES = ["tcp", "http", "https", "grpc", "grpcs"]
HASH_ON = ["none", "consumer", "ip", "header", "cookie", "path", "query_arg", "uri_capture"]

HEALTHCHECKS_FIELDS: dict[str, Spec] = {
    "active": _f("record", fields={
        "type": _f("string", default="http", one_of=CHECK_TYPES),
        "timeout": _f("number", default=1, between=(0, 65535)),
        "concurrency": _f("integer", default=10, between=(1, 2**31)),
        "http_path": _f("string", default="/", validator=_validate_path),
        "https_sni": _f("string"),
        "https_verify_certificate": _f("boolean", default=True),
        "headers": _f("map"),
        "healthy": _f("record", fields={
            "interval": _f("number", default=0, between=(0, 65535)),
            "http_statuses": {**HTTP_STATUSES, "default": [200, 302]},
            "successes": _f("integer", default=0, between=(0, 255)),
        }),
        "unhealthy": _f("record", fields={
            "interval": _f("number", default=0, between=(0, 65535)),
            "http_statuses": {**HTTP_STATUSES, "default": [429, 404, 500, 501, 502, 503, 504, 505]},
            "tcp_failures": _f("integer", default=0, between=(0, 255)),
            "timeouts": _f("integer", default=0, between=(0, 255)),
            "http_failures": _f("integer", default=0, between=(0, 255)),
        }),
    }),
    "passive": _f("record", fields={
        "type": _f("string", default="http", one_of=CHECK_TYPES),
        "healthy": _f("record", fields={
            "http_statuses": {**HTTP_STATUSES, "default": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                                           300, 301, 302, 303, 304, 305, 306, 307, 308]},
            "successes": _f("integer", default=0, between=(0, 255)),
        }),
        "unhealthy": _f("record", fields={
            "http_statuses": {**HTTP_STATUSES, "default": [429, 500, 503]},
            "tcp_failures": _f("integer", default=0, between=(0, 255)),
            "timeouts": _f("integer", default=0, between=(0, 255)),
            "http_failures": _f("integer", default=0, between=(0, 255)),
        }),
    }),
    "threshold": _f("number", default=0, between=(0, 100)),
}

SERVICE_FIELDS: dict[str, Spec] = {
    "name": _f("string", unique=True, validator=_validate_utf8_name),
    "retries": _f("integer", default=5, between=(0, 32767)),
    "protocol": _f("string", default="http", required=True,
                   one_of=["grpc", "grpcs", "http", "https", "tcp", "tls", "tls_passthrough", "udp",
                           "ws", "wss"]),
    "host": _f("string", required=True, validator=_validate_host),
    "port": _f("integer", default=80, required=True, between=(0, 65535)),
    "path": _f("string", validator=_validate_path),
    "connect_timeout": _f("integer", default=60000, between=(1, 2**31 - 2)),
    "write_timeout": _f("integer", default=60000, between=(1, 2**31 - 2)),
    "read_timeout": _f("integer", default=60000, between=(1, 2**31 - 2)),
    "tags": TAGS,
    "client_certificate": _f("foreign"),
    "tls_verify": _f("boolean"),
    "tls_verify_depth": _f("integer", between=(0, 64)),
    "ca_certificates": _f("array", elements=_f("string")),
    "enabled": _f("boolean", default=True, required=True),
}

UPSTREAM_FIELDS: dict[str, Spec] = {
    "name": _f("string", required=True, unique=True, validator=_validate_upstream_name),
    "algorithm": _f("string", default="round-robin",
                    one_of=["consistent-hashing", "least-connections", "round-robin", "latency"]),
    "hash_on": _f("string", default="none", one_of=HASH_ON),
    "hash_fallback": _f("string", default="none", one_of=HASH_ON),
    "hash_on_header": _f("string"),
    "hash_fallback_header": _f("string"),
    "hash_on_cookie": _f("string"),
    "hash_on_cookie_path": _f("string", default="/", validator=_validate_path),
    "hash_on_query_arg": _f("string"),
    "hash_fallback_query_arg": _f("string"),
    "hash_on_uri_capture": _f("string"),
    "hash_fallback_uri_capture": _f("string"),
    "slots": _f("integer", default=10000, between=(10, 2**16)),
    "healthchecks": _f("record", fields=HEALTHCHECKS_FIELDS),
    "tags": TAGS,
    "host_header": _f("string", validator=_validate_host),
    "client_certificate": _f("foreign"),
    "use_srv_name": _f("boolean", default=False),
}

TARGET_FIELDS: dict[str, Spec] = {
    "target": _f("string", required=True),
    "weight": _f("integer", default=100, between=(0, 65535)),
    "tags": TAGS,
}

_TYPE_NAMES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
               "set": "a set", "array": "an array", "record": "a record", "map": "a map",
               "foreign": "a record"}


def _type_ok(spec: Spec, value: Any) -> bool:
    typ = spec["type"]
    if typ == "string":
        return isinstance(value, str)
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ == "boolean":
        return isinstance(value, bool)
    if typ in ("set", "array"):
        return isinstance(value, list)
    return isinstance(value, dict)


def _check_value(spec: Spec, value: Any) -> tuple[Any, Any]:
    """(normalized value, error or None) for one non-null value."""
    if not _type_ok(spec, value):
        return value, f"expected {_TYPE_NAMES[spec['type']]}"
    typ = spec["type"]
    if typ == "string" and value == "":
        return value, "length must be at least 1"
    if "one_of" in spec and value not in spec["one_of"]:
        return value, "expected one of: " + ", ".join(spec["one_of"])
    if "between" in spec:
        low, high = spec["between"]
        if not low <= value <= high:
            return value, f"value should be between {low} and {high}"
    if "validator" in spec:
        err = spec["validator"](value)
        if err:
            return value, err
    if typ in ("set", "array"):
        element = spec["elements"]
        errors: list[Any] = []
        out = []
        for item in value:
            normalized, err = _check_value(element, item) if item is not None else (item, "required field missing")
            if typ == "set" and normalized in out:
                continue
            out.append(normalized)
            errors.append(err)
        if any(e is not None for e in errors):
            while errors and errors[-1] is None:
                errors.pop()
            return value, errors
        return out, None
    if typ == "record":
        return validate_fields(spec["fields"], value, fill_defaults=True)
    if typ == "foreign" and set(value) - {"id"}:
        return value, {k: "unknown field" for k in set(value) - {"id"}}
    return value, None


def _default_of(spec: Spec) -> Any:
    if spec["type"] == "record":
        return validate_fields(spec["fields"], {}, fill_defaults=True)[0]
    return copy.deepcopy(spec.get("default"))


def validate_fields(fields: dict[str, Spec], data: dict[str, Any], *, fill_defaults: bool) -> tuple[dict, Any]:
    """Normalize `data` against `fields` the way Kong's schema does; (entity, errors or None)."""
    errors: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for key in data:
        if key not in fields:
            errors[key] = "unknown field"
    for key, spec in fields.items():
        value = data.get(key, _MISSING)
        if value is _MISSING:
            value = _default_of(spec) if fill_defaults else None
        if value is None:
            if spec.get("required"):
                errors[key] = "required field missing"
            out[key] = None
            continue
        normalized, err = _check_value(spec, value)
        if err is not None:
            errors[key] = err
        out[key] = normalized
    return out, (errors or None)


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """PATCH semantics of Kong: records merge field by field, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------- request bodies
def _coerce(spec: Spec | None, value: Any) -> Any:
    """Infer typed values from form-encoded strings, as Kong's `arguments.infer` does."""
    if spec is None:
        return value
    typ = spec["type"]
    if isinstance(value, str):
        if typ == "integer" and re.fullmatch(r"-?\d+", value):
            return int(value)
        if typ == "number":
            try:
                return float(value) if "." in value else int(value)
            except ValueError:
                return value
        if typ == "boolean" and value in ("true", "false"):
            return value == "true"
        if typ in ("set", "array"):
            return [_coerce(spec["elements"], value)]
        return value
    if isinstance(value, list) and typ in ("set", "array"):
        return [_coerce(spec["elements"], v) for v in value]
    if isinstance(value, dict) and typ == "record":
        return {k: _coerce(spec["fields"].get(k), v) for k, v in value.items()}
    return value


def decode_form(raw: str, fields: dict[str, Spec]) -> dict[str, Any]:
    """application/x-www-form-urlencoded with Kong's conventions: dotted keys, `a[]`, `a[1]`, repeats."""
    out: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(raw, keep_blank_values=True):
        is_array = bool(re.search(r"\[\d*\]$", key))
        path = re.sub(r"\[\d*\]", "", key).split(".")
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = path[-1]
        existing = node.get(last, _MISSING)
        if existing is _MISSING:
            node[last] = [value] if is_array else value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            node[last] = [existing, value]
    return {k: _coerce(fields.get(k), v) for k, v in out.items()}


class BadBody(Exception):
    pass


def parse_body(request: Request, fields: dict[str, Spec]) -> dict[str, Any]:
    ctype = (request.header("Content-Type") or "").lower()
    text = request.body.decode("utf-8", errors="replace")
    if "application/x-www-form-urlencoded" in ctype:
        return decode_form(text, fields)
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise BadBody from None
    if not isinstance(data, dict):
        raise BadBody
    return data


# --------------------------------------------------------------------------- the double
class KongAdminDouble(DoubleServer):
    """Kong 3.x Admin API contract double. `state()` returns what it holds; see module docstring."""

    server_name = f"kong/{KONG_VERSION}"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, admin_token: str | None = None,
                 basic_auth: tuple[str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(host=host, port=port)
        self.admin_token = admin_token
        self.basic_auth = basic_auth
        self.clock = clock
        self.node_id = str(uuid.uuid4())
        self._lock = threading.RLock()
        self._services: dict[str, dict[str, Any]] = {}
        self._upstreams: dict[str, dict[str, Any]] = {}
        self._targets: dict[str, dict[str, Any]] = {}
        self._health: dict[str, str] = {}

    # ----------------------------------------------------------------- assertions
    def state(self) -> dict[str, list[dict[str, Any]]]:
        """A deep copy of every entity, each collection in Kong's listing order (by id)."""
        with self._lock:
            return {
                "services": [copy.deepcopy(e) for _, e in sorted(self._services.items())],
                "upstreams": [copy.deepcopy(e) for _, e in sorted(self._upstreams.items())],
                "targets": [copy.deepcopy(e) for _, e in sorted(self._targets.items())],
            }

    def targets_of(self, upstream: str) -> list[dict[str, Any]]:
        with self._lock:
            found = self._find(self._upstreams, upstream, "name")
            if found is None:
                return []
            return [copy.deepcopy(t) for _, t in sorted(self._targets.items())
                    if t["upstream"]["id"] == found["id"]]

    def reset(self) -> None:
        with self._lock:
            self._services.clear()
            self._upstreams.clear()
            self._targets.clear()
            self._health.clear()

    # ----------------------------------------------------------------- plumbing
    def extra_headers(self) -> dict[str, str]:
        return {"X-Kong-Admin-Latency": "0", "Access-Control-Allow-Origin": "*"}

    def unavailable_reply(self, status: int) -> Reply:
        if status == 500:
            return json_reply(500, {"message": "An unexpected error occurred"})
        return json_reply(status, {"message": http.HTTPStatus(status).phrase})

    def _now(self) -> int:
        return int(self.clock())

    def _now_ms(self) -> float:
        return round(self.clock(), 3)

    def _auth(self, request: Request) -> Reply | None:
        if self.admin_token is not None and request.header("Kong-Admin-Token") != self.admin_token:
            return json_reply(401, {"message": "Invalid credentials. Token or User credentials required"})
        if self.basic_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.basic_auth).encode()).decode()
            if request.header("Authorization") != expected:
                return json_reply(401, {"message": "Unauthorized"},
                                  **{"WWW-Authenticate": 'Basic realm="kong"'})
        return None

    def handle(self, request: Request) -> Reply:
        denied = self._auth(request)
        if denied is not None:
            return denied
        method = "GET" if request.method == "HEAD" else request.method
        seg = request.segments
        with self._lock:
            if method == "OPTIONS":
                return Reply(204, None, {"Allow": "GET, HEAD, OPTIONS, PATCH, POST, PUT, DELETE",
                                         "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS, PATCH, "
                                                                         "POST, PUT, DELETE"})
            if not seg:
                return self._allow(method, {"GET": self._root})(request)
            if seg == ["status"]:
                return self._allow(method, {"GET": self._status})(request)
            if seg[0] == "services" and len(seg) <= 2:
                return self._entity_routes("services", request, method)
            if seg[0] == "upstreams":
                if len(seg) <= 2:
                    return self._entity_routes("upstreams", request, method)
                if seg[2] == "targets":
                    return self._target_routes(request, method)
            return json_reply(404, NOT_FOUND)

    @staticmethod
    def _allow(method: str, table: dict[str, Callable[[Request], Reply]]) -> Callable[[Request], Reply]:
        handler = table.get(method)
        if handler is None:
            return lambda _r: json_reply(405, {"message": "Method not allowed"})
        return handler

    def _root(self, _request: Request) -> Reply:
        return json_reply(200, {
            "version": KONG_VERSION, "edition": "community", "tagline": "Welcome to kong",
            "node_id": self.node_id, "hostname": "kong-admin-double", "lua_version": "LuaJIT 2.1.0",
            "configuration": {"database": "postgres", "role": "traditional"},
            "plugins": {"available_on_server": {}, "enabled_in_cluster": []},
        })

    def _status(self, _request: Request) -> Reply:
        return json_reply(200, {"database": {"reachable": True},
                                "server": {"connections_active": 1, "total_requests": len(self.requests)}})

    # ----------------------------------------------------------------- generic entities
    def _collection(self, name: str) -> tuple[dict[str, dict[str, Any]], dict[str, Spec], str]:
        if name == "services":
            return self._services, SERVICE_FIELDS, "name"
        return self._upstreams, UPSTREAM_FIELDS, "name"

    @staticmethod
    def _find(store: dict[str, dict[str, Any]], key: str, endpoint_key: str) -> dict[str, Any] | None:
        if is_uuid(key):
            return store.get(key.lower())
        for entity in store.values():
            if entity.get(endpoint_key) == key:
                return entity
        return None

    def _entity_routes(self, coll: str, request: Request, method: str) -> Reply:
        seg = request.segments
        if len(seg) == 1:
            return self._allow(method, {
                "GET": lambda r: self._list(coll, r),
                "POST": lambda r: self._create(coll, r),
            })(request)
        key = seg[1]
        return self._allow(method, {
            "GET": lambda r: self._get(coll, key),
            "PATCH": lambda r: self._update(coll, key, r),
            "PUT": lambda r: self._upsert(coll, key, r),
            "DELETE": lambda r: self._delete(coll, key),
        })(request)

    def _body(self, request: Request, fields: dict[str, Spec]) -> dict[str, Any] | Reply:
        try:
            return parse_body(request, fields)
        except BadBody:
            return json_reply(400, {"message": "Cannot parse JSON body"})

    def _expand_url(self, data: dict[str, Any]) -> dict[str, Any] | Reply:
        """The write-only `url` shorthand of services sets protocol, host, port and path at once."""
        if "url" not in data:
            return data
        data = dict(data)
        url = data.pop("url")
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or not parts.scheme or not parts.hostname:
            return json_reply(400, schema_violation({"url": "missing host in url"}))
        data["protocol"] = parts.scheme
        data["host"] = parts.hostname
        data["port"] = parts.port or (443 if parts.scheme in ("https", "grpcs", "wss", "tls") else 80)
        data["path"] = parts.path or None
        return data

    def _check(self, coll: str, data: dict[str, Any], *, current_id: str | None) -> tuple[dict, Reply | None]:
        store, fields, _ = self._collection(coll)
        entity, errors = validate_fields(fields, data, fill_defaults=True)
        if errors is None and coll == "upstreams":
            errors = self._upstream_entity_checks(entity)
        if errors:
            return entity, json_reply(400, schema_violation(errors))
        for name, spec in fields.items():
            value = entity.get(name)
            if spec.get("unique") and value is not None:
                for other in store.values():
                    if other["id"] != current_id and other.get(name) == value:
                        return entity, json_reply(409, unique_violation({name: value}))
        return entity, None

    @staticmethod
    def _upstream_entity_checks(entity: dict[str, Any]) -> dict[str, Any] | None:
        errors: dict[str, Any] = {}
        for prefix in ("hash_on", "hash_fallback"):
            mode = entity[prefix]
            needed = {"header": f"{prefix}_header", "query_arg": f"{prefix}_query_arg",
                      "uri_capture": f"{prefix}_uri_capture", "cookie": "hash_on_cookie"}.get(mode)
            if needed and entity.get(needed) is None:
                errors[needed] = "required field missing"
        if entity["hash_on"] in ("none", "cookie") and entity["hash_fallback"] != "none":
            errors["hash_fallback"] = "expected one of: none"
        if entity["algorithm"] == "least-connections" and entity["hash_on"] != "none":
            errors["hash_on"] = "value must be none"
        return errors or None

    def _stamp_new(self, entity: dict[str, Any], *, ms: bool = False, entity_id: str | None = None) -> dict:
        now = self._now_ms() if ms else self._now()
        return {"id": entity_id or str(uuid.uuid4()), "created_at": now, "updated_at": now, **entity}

    def _create(self, coll: str, request: Request) -> Reply:
        data = self._body(request, self._collection(coll)[1])
        if isinstance(data, Reply):
            return data
        if coll == "services":
            data = self._expand_url(data)
            if isinstance(data, Reply):
                return data
        given_id = data.pop("id", None)
        if given_id is not None and (not isinstance(given_id, str) or not is_uuid(given_id)):
            return json_reply(400, schema_violation({"id": "expected a valid UUID"}))
        for auto in ("created_at", "updated_at"):
            data.pop(auto, None)
        store = self._collection(coll)[0]
        if given_id is not None and given_id.lower() in store:
            return json_reply(409, {"code": 3, "name": "primary key violation",
                                    "message": f"primary key violation on key '{{id=\"{given_id}\"}}'",
                                    "fields": {"id": given_id}})
        entity, error = self._check(coll, data, current_id=None)
        if error is not None:
            return error
        entity = self._stamp_new(entity, entity_id=given_id.lower() if given_id else None)
        store[entity["id"]] = entity
        return json_reply(201, copy.deepcopy(entity))

    def _get(self, coll: str, key: str) -> Reply:
        store, _, endpoint_key = self._collection(coll)
        entity = self._find(store, key, endpoint_key)
        if entity is None:
            return json_reply(404, NOT_FOUND)
        return json_reply(200, copy.deepcopy(entity))

    def _update(self, coll: str, key: str, request: Request) -> Reply:
        store, fields, endpoint_key = self._collection(coll)
        data = self._body(request, fields)
        if isinstance(data, Reply):
            return data
        entity = self._find(store, key, endpoint_key)
        if entity is None:
            return json_reply(404, NOT_FOUND)
        if coll == "services":
            data = self._expand_url(data)
            if isinstance(data, Reply):
                return data
        for auto in ("id", "created_at", "updated_at"):
            data.pop(auto, None)
        current = {k: v for k, v in entity.items() if k not in ("id", "created_at", "updated_at")}
        merged, error = self._check(coll, deep_merge(current, data), current_id=entity["id"])
        if error is not None:
            return error
        entity.update(merged)
        entity["updated_at"] = max(self._now(), entity["created_at"])
        return json_reply(200, copy.deepcopy(entity))

    def _upsert(self, coll: str, key: str, request: Request) -> Reply:
        """PUT: insert or replace; a UUID key is the id, anything else the endpoint key (name)."""
        store, fields, endpoint_key = self._collection(coll)
        data = self._body(request, fields)
        if isinstance(data, Reply):
            return data
        if coll == "services":
            data = self._expand_url(data)
            if isinstance(data, Reply):
                return data
        for auto in ("created_at", "updated_at"):
            data.pop(auto, None)
        body_id = data.pop("id", None)
        if is_uuid(key):
            if body_id is not None and str(body_id).lower() != key.lower():
                return json_reply(400, schema_violation({"id": "must match the id in the URL"}))
            existing = store.get(key.lower())
            entity_id = key.lower()
        else:
            if data.get(endpoint_key) is not None and data[endpoint_key] != key:
                # Admin API reference, "Update or create": a different endpoint key in body and URL is not allowed
                return json_reply(400, schema_violation({endpoint_key: f"must match the {endpoint_key} in the URL"}))
            data[endpoint_key] = key
            existing = self._find(store, key, endpoint_key)
            entity_id = existing["id"] if existing else str(uuid.uuid4())
        entity, error = self._check(coll, data, current_id=entity_id)
        if error is not None:
            return error
        if existing is not None:
            created = existing["created_at"]
            store.pop(existing["id"], None)
            stored = {"id": entity_id, "created_at": created, "updated_at": max(self._now(), created), **entity}
        else:
            stored = self._stamp_new(entity, entity_id=entity_id)
        store[entity_id] = stored
        return json_reply(200, copy.deepcopy(stored))

    def _delete(self, coll: str, key: str) -> Reply:
        # kong/api/endpoints.lua delete_entity_endpoint: 204 whether or not the entity existed
        store, _, endpoint_key = self._collection(coll)
        entity = self._find(store, key, endpoint_key)
        if entity is not None:
            store.pop(entity["id"])
            if coll == "upstreams":  # targets.upstream is `on_delete = "cascade"`
                for tid in [t for t, v in self._targets.items() if v["upstream"]["id"] == entity["id"]]:
                    del self._targets[tid]
        return Reply(204)

    # ----------------------------------------------------------------- listing
    def _list(self, coll: str, request: Request) -> Reply:
        store = self._collection(coll)[0]
        items = [e for _, e in sorted(store.items())]
        tags_arg = request.arg("tags")
        if tags_arg is not None:
            tags, cond, err = self._parse_tags(tags_arg)
            if err:
                return _invalid_options({"tags": err})
            if cond == "and":
                items = [e for e in items if e.get("tags") and all(t in e["tags"] for t in tags)]
            else:
                items = [e for e in items if e.get("tags") and any(t in e["tags"] for t in tags)]
        suffix = ""
        if tags_arg is not None:
            suffix += "&tags=" + urllib.parse.quote(tags_arg, safe="")
        if request.arg("size") is not None:
            suffix += "&size=" + str(request.arg("size"))
        return self._page(items, request, f"/{coll}", suffix)

    @staticmethod
    def _parse_tags(raw: str) -> tuple[list[str], str, str | None]:
        if _TAGS_AND.match(raw):
            tags, cond = raw.split(","), "and"
        elif _TAGS_OR.match(raw):
            tags, cond = raw.split("/"), "or"
        else:
            return [], "", "invalid filter syntax"
        tags = [t for t in tags if t]
        if len(tags) > MAX_TAGS_IN_FILTER:
            return tags, cond, f"cannot query more than {MAX_TAGS_IN_FILTER} tags"
        return tags, cond, None

    @staticmethod
    def _encode_offset(last_id: str) -> str:
        return base64.b64encode(json.dumps([last_id]).encode()).decode()

    def _page(self, items: list[dict[str, Any]], request: Request, base: str, suffix: str) -> Reply:
        size_arg = request.arg("size")
        size = PAGE_SIZE
        if size_arg is not None:
            try:
                number = float(size_arg)
            except ValueError:
                return _invalid_size("size must be a number")
            if number != int(number) or not 1 <= number <= MAX_PAGE_SIZE:
                return _invalid_size(f"size must be an integer between 1 and {MAX_PAGE_SIZE}")
            size = int(number)
        offset_arg = request.arg("offset")
        if offset_arg:
            try:
                decoded = json.loads(base64.b64decode(offset_arg, validate=True))
                last_id = decoded[0]
                if not isinstance(last_id, str):
                    raise ValueError
            except (binascii.Error, ValueError, TypeError, IndexError, KeyError):
                return _invalid_offset(offset_arg, "bad base64 encoding")
            items = [e for e in items if e["id"] > last_id]  # keyset pagination on the primary key
        page = items[:size]
        body: dict[str, Any] = {"data": [copy.deepcopy(e) for e in page], "next": None}
        if len(items) > size:
            offset = self._encode_offset(page[-1]["id"])
            body["offset"] = offset
            body["next"] = f"{base}?offset={urllib.parse.quote(offset, safe='')}{suffix}"
        return json_reply(200, body)

    # ----------------------------------------------------------------- targets
    def _target_routes(self, request: Request, method: str) -> Reply:
        seg = request.segments
        upstream = self._find(self._upstreams, seg[1], "name")
        if len(seg) == 3:
            return self._allow(method, {
                "GET": lambda r: self._list_targets(upstream, seg[1], r),
                "POST": lambda r: self._create_target(upstream, r),
            })(request)
        if len(seg) == 4 and seg[3] == "all":
            # Admin API reference 3.4, "List All Targets": GET /upstreams/{name or id}/targets/all
            return self._allow(method, {"GET": lambda r: self._list_targets(upstream, seg[1], r, path="all")})(
                request)
        if len(seg) == 4:
            key = seg[3]
            return self._allow(method, {
                "GET": lambda r: self._target_action(upstream, key, r, "get"),
                "PATCH": lambda r: self._target_action(upstream, key, r, "update"),
                "PUT": lambda r: self._target_action(upstream, key, r, "update"),
                "DELETE": lambda r: self._target_action(upstream, key, r, "delete"),
            })(request)
        if len(seg) == 5 and seg[4] in ("healthy", "unhealthy"):
            # Admin API reference 3.4, "Set Target As Healthy/Unhealthy" (documented as PUT; the
            # route source answers POST): 204, the state is node-local and kept in `health()`.
            key, healthy = seg[3], seg[4] == "healthy"
            return self._allow(method, {
                "PUT": lambda r: self._set_health(upstream, key, healthy),
                "POST": lambda r: self._set_health(upstream, key, healthy),
            })(request)
        return json_reply(404, NOT_FOUND)

    def health(self) -> dict[str, str]:
        """target id -> "HEALTHY" / "UNHEALTHY" as last set through the healthy/unhealthy endpoints."""
        with self._lock:
            return dict(self._health)

    def _set_health(self, upstream: dict[str, Any] | None, key: str, healthy: bool) -> Reply:
        target = self._lookup_target(upstream, key)
        if target is None:
            return json_reply(404, NOT_FOUND)
        self._health[target["id"]] = "HEALTHY" if healthy else "UNHEALTHY"
        return Reply(204)

    def _lookup_target(self, upstream: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
        if upstream is None:
            return None
        if is_uuid(key):
            target = self._targets.get(key.lower())
        else:
            target = next((t for t in self._targets_for(upstream) if t["target"] == key), None)
        if target is None or target["upstream"]["id"] != upstream["id"]:
            return None
        return target

    def _targets_for(self, upstream: dict[str, Any]) -> list[dict[str, Any]]:
        return [t for _, t in sorted(self._targets.items()) if t["upstream"]["id"] == upstream["id"]]

    def _list_targets(self, upstream: dict[str, Any] | None, key: str, request: Request,
                      path: str = "") -> Reply:
        if upstream is None:
            return json_reply(404, NOT_FOUND)
        # Admin API reference, "Tags": filtering by tags is not supported on foreign-key (nested)
        # endpoints and `tags` is ignored there. kong/api/endpoints.lua: the nested `next` link
        # carries only the offset.
        base = f"/upstreams/{urllib.parse.quote(key, safe='')}/targets" + (f"/{path}" if path else "")
        return self._page(self._targets_for(upstream), request, base, "")

    def _check_target(self, data: dict[str, Any], upstream: dict[str, Any],
                      current_id: str | None) -> tuple[dict, Reply | None]:
        entity, errors = validate_fields(TARGET_FIELDS, data, fill_defaults=True)
        if errors is None:
            formatted = format_target(entity["target"])
            if formatted is None:
                errors = {"target": "Invalid target; not a valid hostname or ip address"}
            else:
                entity["target"] = formatted
        if errors:
            return entity, json_reply(400, schema_violation(errors))
        for other in self._targets_for(upstream):
            if other["id"] != current_id and other["target"] == entity["target"]:
                # Kong 3.x targets carry cache_key (upstream, target): duplicates answer 409
                return entity, json_reply(409, unique_violation(
                    {"target": entity["target"], "upstream": {"id": upstream["id"]}}))
        return entity, None

    def _create_target(self, upstream: dict[str, Any] | None, request: Request) -> Reply:
        if upstream is None:
            return json_reply(404, NOT_FOUND)
        data = self._body(request, TARGET_FIELDS)
        if isinstance(data, Reply):
            return data
        for auto in ("id", "created_at", "updated_at", "upstream"):
            data.pop(auto, None)
        entity, error = self._check_target(data, upstream, None)
        if error is not None:
            return error
        now = self._now_ms()
        target = {"id": str(uuid.uuid4()), "created_at": now, "updated_at": now,
                  "upstream": {"id": upstream["id"]}, **entity}
        self._targets[target["id"]] = target
        return json_reply(201, copy.deepcopy(target))

    def _target_action(self, upstream: dict[str, Any] | None, key: str, request: Request, action: str) -> Reply:
        target = self._lookup_target(upstream, key)
        if target is None:
            return json_reply(404, NOT_FOUND)
        if action == "get":
            return json_reply(200, copy.deepcopy(target))
        if action == "delete":
            del self._targets[target["id"]]
            self._health.pop(target["id"], None)
            return Reply(204)
        data = self._body(request, TARGET_FIELDS)
        if isinstance(data, Reply):
            return data
        for auto in ("id", "created_at", "updated_at", "upstream"):
            data.pop(auto, None)
        current = {k: target[k] for k in TARGET_FIELDS}
        entity, error = self._check_target({**current, **data}, upstream, target["id"])
        if error is not None:
            return error
        target.update(entity)
        target["updated_at"] = max(self._now_ms(), target["created_at"])
        return json_reply(200, copy.deepcopy(target))
