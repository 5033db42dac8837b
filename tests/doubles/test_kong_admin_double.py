"""Pins the Kong Admin API contract double to Kong 3.x's documented behaviour.

Sources (see the double's module docstring): the Admin API reference 3.4 on
docs.konghq.com, the 3.x upgrade notes, and kong/api/endpoints.lua plus
kong/db/errors.lua for what the reference leaves implicit.
"""

from __future__ import annotations

import base64
import urllib.parse
import uuid
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncworker.sandbox.ports import PortAllocator
from tests.doubles.fixtures import running_kong_double
from tests.doubles.kong_admin_double import KongAdminDouble


@pytest.fixture
def api(kong: KongAdminDouble) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kong.url, timeout=5.0) as client:
        yield client


def _walk(api: httpx.Client, first: str) -> list[dict]:
    """Follow `next` links from `first` and return every page body."""
    pages, url = [], first
    while url is not None:
        resp = api.get(url)
        assert resp.status_code == 200, resp.text
        pages.append(resp.json())
        url = resp.json()["next"]
    return pages


# --------------------------------------------------------------------------- node information
def test_root_reports_a_kong_3x_node(api: httpx.Client) -> None:
    body = api.get("/").json()
    assert body["version"].startswith("3.")
    assert uuid.UUID(body["node_id"])
    assert api.get("/").headers["server"].startswith("kong/3.")


# --------------------------------------------------------------------------- services
def test_service_create_fills_documented_defaults(api: httpx.Client) -> None:
    resp = api.post("/services", json={"name": "billing", "host": "billing.internal"})
    assert resp.status_code == 201
    svc = resp.json()
    assert uuid.UUID(svc["id"])
    assert isinstance(svc["created_at"], int) and svc["updated_at"] >= svc["created_at"]
    # Admin API reference 3.4, service_body: defaults of retries, protocol, port, timeouts, enabled
    assert {k: svc[k] for k in ("retries", "protocol", "port", "connect_timeout", "write_timeout",
                                "read_timeout", "enabled")} == {
        "retries": 5, "protocol": "http", "port": 80, "connect_timeout": 60000, "write_timeout": 60000,
        "read_timeout": 60000, "enabled": True}
    # unset optional fields are returned as null, not omitted
    assert svc["path"] is None and svc["tags"] is None and svc["tls_verify"] is None


def test_service_url_shorthand_sets_protocol_host_port_path(api: httpx.Client) -> None:
    svc = api.post("/services", json={"name": "s", "url": "https://api.example.com:8443/v1"}).json()
    assert (svc["protocol"], svc["host"], svc["port"], svc["path"]) == ("https", "api.example.com", 8443, "/v1")
    assert "url" not in svc  # write-only shorthand


def test_service_crud_by_id_and_by_name(api: httpx.Client) -> None:
    created = api.post("/services", json={"name": "orders", "host": "orders.internal", "port": 8080}).json()
    assert api.get(f"/services/{created['id']}").json() == created
    assert api.get("/services/orders").json() == created

    patched = api.patch("/services/orders", json={"port": 9090, "tags": ["team-a"]})
    assert patched.status_code == 200
    assert patched.json()["port"] == 9090 and patched.json()["host"] == "orders.internal"
    assert patched.json()["tags"] == ["team-a"]

    assert api.delete(f"/services/{created['id']}").status_code == 204
    gone = api.get("/services/orders")
    assert gone.status_code == 404
    assert gone.json() == {"message": "Not found"}
    # kong/api/endpoints.lua delete_entity_endpoint: 204 even when there is nothing to delete
    assert api.delete("/services/orders").status_code == 204


def test_put_creates_then_replaces_by_endpoint_key(api: httpx.Client) -> None:
    first = api.put("/services/catalog", json={"host": "catalog.internal", "retries": 1})
    assert first.status_code == 200
    assert first.json()["name"] == "catalog"
    second = api.put("/services/catalog", json={"host": "catalog2.internal"})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["retries"] == 5  # PUT replaces: unspecified fields go back to defaults
    assert second.json()["host"] == "catalog2.internal"


def test_put_with_uuid_uses_it_as_the_id(api: httpx.Client) -> None:
    wanted = str(uuid.uuid4())
    resp = api.put(f"/upstreams/{wanted}", json={"name": "pinned.v1"})
    assert resp.status_code == 200
    assert resp.json()["id"] == wanted
    assert api.get("/upstreams/pinned.v1").json()["id"] == wanted


def test_put_with_a_different_name_in_body_is_refused(api: httpx.Client) -> None:
    # Admin API reference, "Update or create": a different endpoint key in URL and body is not allowed
    resp = api.put("/upstreams/a.v1", json={"name": "b.v1"})
    assert resp.status_code == 400
    assert resp.json()["name"] == "schema violation"


# --------------------------------------------------------------------------- upstreams
DOC_HEALTHCHECKS = {
    "active": {
        "type": "http", "timeout": 1, "concurrency": 10, "http_path": "/", "https_sni": None,
        "https_verify_certificate": True, "headers": None,
        "healthy": {"interval": 0, "http_statuses": [200, 302], "successes": 0},
        "unhealthy": {"interval": 0, "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505],
                      "tcp_failures": 0, "timeouts": 0, "http_failures": 0},
    },
    "passive": {
        "type": "http",
        "healthy": {"http_statuses": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                      300, 301, 302, 303, 304, 305, 306, 307, 308], "successes": 0},
        "unhealthy": {"http_statuses": [429, 500, 503], "tcp_failures": 0, "timeouts": 0, "http_failures": 0},
    },
    "threshold": 0,
}


def test_upstream_defaults_match_the_reference_example(api: httpx.Client) -> None:
    up = api.post("/upstreams", json={"name": "my-upstream"}).json()
    # Admin API reference 3.4, upstream_json / upstream_body defaults
    assert up["algorithm"] == "round-robin"
    assert (up["hash_on"], up["hash_fallback"], up["hash_on_cookie_path"]) == ("none", "none", "/")
    assert up["slots"] == 10000
    assert up["use_srv_name"] is False
    assert up["healthchecks"] == DOC_HEALTHCHECKS
    for unset in ("hash_on_header", "hash_on_cookie", "hash_on_query_arg", "host_header", "client_certificate",
                  "tags"):
        assert up[unset] is None


def test_patch_merges_healthcheck_records(api: httpx.Client) -> None:
    api.post("/upstreams", json={"name": "hc.v1"})
    resp = api.patch("/upstreams/hc.v1", json={"healthchecks": {"active": {"healthy": {"interval": 5}}}})
    assert resp.status_code == 200
    active = resp.json()["healthchecks"]["active"]
    assert active["healthy"] == {"interval": 5, "http_statuses": [200, 302], "successes": 0}
    assert active["timeout"] == 1


def test_duplicate_upstream_name_is_409_with_kong_error_body(api: httpx.Client) -> None:
    assert api.post("/upstreams", json={"name": "upstream"}).status_code == 201
    resp = api.post("/upstreams", json={"name": "upstream"})
    assert resp.status_code == 409
    # kong/db/errors.lua unique_violation; same body as the real 409 quoted in Kong/docs.konghq.com#3601
    assert resp.json() == {
        "code": 5,
        "name": "unique constraint violation",
        "message": "UNIQUE violation detected on '{name=\"upstream\"}'",
        "fields": {"name": "upstream"},
    }


def test_renaming_onto_an_existing_name_is_409(api: httpx.Client) -> None:
    api.post("/upstreams", json={"name": "one.v1"})
    api.post("/upstreams", json={"name": "two.v1"})
    resp = api.patch("/upstreams/two.v1", json={"name": "one.v1"})
    assert resp.status_code == 409
    assert resp.json()["fields"] == {"name": "one.v1"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"name": "required field missing"}),
        ({"name": "10.0.0.1"}, {"name": "Invalid name; no ip addresses allowed"}),
        ({"name": "svc.local:80"}, {"name": "Invalid name; no port allowed"}),
        ({"name": "ok.v1", "slots": 5}, {"slots": "value should be between 10 and 65536"}),
        ({"name": "ok.v1", "algorithm": "random"},
         {"algorithm": "expected one of: consistent-hashing, least-connections, round-robin, latency"}),
        ({"name": "ok.v1", "colour": "blue"}, {"colour": "unknown field"}),
        ({"name": "ok.v1", "slots": "many"}, {"slots": "expected an integer"}),
        ({"name": "ok.v1", "hash_on": "header"}, {"hash_on_header": "required field missing"}),
    ],
)
def test_upstream_schema_violations(api: httpx.Client, body: dict, fields: dict) -> None:
    resp = api.post("/upstreams", json=body)
    assert resp.status_code == 400
    err = resp.json()
    assert err["code"] == 2 and err["name"] == "schema violation"
    assert err["fields"] == fields
    (field, msg), = fields.items()
    assert err["message"] == f"schema violation ({field}: {msg})"


def test_several_violations_are_counted_in_the_message(api: httpx.Client) -> None:
    err = api.post("/upstreams", json={"slots": 1}).json()
    # kong/db/errors.lua schema_violation: "<n> schema violations (a: x; b: y)", fields sorted
    assert err["message"] == ("2 schema violations (name: required field missing; "
                              "slots: value should be between 10 and 65536)")


def test_malformed_json_body(api: httpx.Client) -> None:
    resp = api.post("/upstreams", content=b'{"name": "x"', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json() == {"message": "Cannot parse JSON body"}


def test_form_urlencoded_bodies_are_accepted(api: httpx.Client) -> None:
    # Admin API reference, "Supported Content Types": dotted keys for records, repeated/[] keys for arrays
    resp = api.post("/upstreams", data={"name": "form.v1", "slots": "20", "tags[]": ["a", "b"],
                                        "healthchecks.active.timeout": "3"})
    assert resp.status_code == 201, resp.text
    up = resp.json()
    assert (up["slots"], up["tags"], up["healthchecks"]["active"]["timeout"]) == (20, ["a", "b"], 3)


def test_unknown_paths_and_methods(api: httpx.Client) -> None:
    assert api.get("/targets").status_code == 404  # /targets is not exposed; only nested under upstreams
    assert api.get("/nope").json() == {"message": "Not found"}
    resp = api.delete("/upstreams")
    assert resp.status_code == 405
    assert resp.json() == {"message": "Method not allowed"}


# --------------------------------------------------------------------------- targets
@pytest.fixture
def upstream(api: httpx.Client) -> dict:
    resp = api.post("/upstreams", json={"name": "orders.v1.svc"})
    assert resp.status_code == 201
    return resp.json()


def test_target_defaults_port_8000_and_weight_100(api: httpx.Client, upstream: dict) -> None:
    resp = api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.7"})
    assert resp.status_code == 201
    target = resp.json()
    assert target["target"] == "10.0.0.7:8000"
    assert target["weight"] == 100
    assert target["upstream"] == {"id": upstream["id"]}
    assert target["tags"] is None
    assert isinstance(target["created_at"], float)  # targets use millisecond timestamps
    assert uuid.UUID(target["id"])


def test_target_crud_by_host_port_and_by_id(api: httpx.Client, upstream: dict) -> None:
    base = f"/upstreams/{upstream['id']}/targets"
    target = api.post(base, json={"target": "a.internal:81", "weight": 5, "tags": ["x"]}).json()
    assert api.get(f"{base}/a.internal:81").json() == target
    assert api.get(f"{base}/{target['id']}").json() == target
    assert api.get(f"{base}/a.internal%3A81").json()["id"] == target["id"]

    patched = api.patch(f"{base}/a.internal:81", json={"weight": 50})
    assert patched.status_code == 200
    assert (patched.json()["weight"], patched.json()["tags"]) == (50, ["x"])
    put = api.put(f"{base}/{target['id']}", json={"weight": 7})
    assert put.status_code == 200 and put.json()["weight"] == 7

    assert api.delete(f"{base}/a.internal:81").status_code == 204
    assert api.get(f"{base}/a.internal:81").status_code == 404
    # unlike top-level entities, a missing target answers 404 on DELETE (upstreams.lua target_endpoint)
    assert api.delete(f"{base}/a.internal:81").json() == {"message": "Not found"}


def test_duplicate_target_in_one_upstream_is_409(api: httpx.Client, upstream: dict) -> None:
    assert api.post("/upstreams/orders.v1.svc/targets", json={"target": "www.example.com"}).status_code == 201
    # 3.x upgrade notes: POST no longer updates an existing target; duplicates answer 409.
    # Kong/deck#1556 quotes this exact message from Kong 3.9.
    resp = api.post("/upstreams/orders.v1.svc/targets", json={"target": "www.example.com:8000", "weight": 1})
    assert resp.status_code == 409
    assert resp.json()["message"] == (
        f"UNIQUE violation detected on '{{target=\"www.example.com:8000\",upstream={{id=\"{upstream['id']}\"}}}}'")
    assert resp.json()["code"] == 5
    assert [t["weight"] for t in api.get("/upstreams/orders.v1.svc/targets").json()["data"]] == [100]


def test_same_target_in_two_upstreams_is_fine(api: httpx.Client) -> None:
    api.post("/upstreams", json={"name": "a.v1"})
    api.post("/upstreams", json={"name": "b.v1"})
    assert api.post("/upstreams/a.v1/targets", json={"target": "10.1.1.1:80"}).status_code == 201
    assert api.post("/upstreams/b.v1/targets", json={"target": "10.1.1.1:80"}).status_code == 201


def test_patch_onto_an_existing_target_is_409(api: httpx.Client, upstream: dict) -> None:
    api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.1:80"})
    api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.2:80"})
    resp = api.patch("/upstreams/orders.v1.svc/targets/10.0.0.2:80", json={"target": "10.0.0.1:80"})
    assert resp.status_code == 409


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"weight": 0}, {"target": "required field missing"}),
        ({"target": "some invalid host name"}, {"target": "Invalid target; not a valid hostname or ip address"}),
        ({"target": "a.internal", "weight": 65536}, {"weight": "value should be between 0 and 65535"}),
    ],
)
def test_target_schema_violations(api: httpx.Client, upstream: dict, body: dict, fields: dict) -> None:
    resp = api.post("/upstreams/orders.v1.svc/targets", json=body)
    assert resp.status_code == 400
    assert resp.json()["name"] == "schema violation"
    assert resp.json()["fields"] == fields


def test_ipv6_targets_are_bracketed(api: httpx.Client, upstream: dict) -> None:
    assert api.post("/upstreams/orders.v1.svc/targets", json={"target": "::1"}).json()["target"] == "[::1]:8000"
    resp = api.post("/upstreams/orders.v1.svc/targets", json={"target": "[fe80::1]:9000"})
    assert resp.json()["target"] == "[fe80::1]:9000"


def test_targets_of_a_missing_upstream_are_404(api: httpx.Client) -> None:
    assert api.get("/upstreams/ghost.v1/targets").status_code == 404
    assert api.post("/upstreams/ghost.v1/targets", json={"target": "a:1"}).json() == {"message": "Not found"}


def test_target_id_of_another_upstream_is_404(api: httpx.Client) -> None:
    api.post("/upstreams", json={"name": "a.v1"})
    api.post("/upstreams", json={"name": "b.v1"})
    target = api.post("/upstreams/a.v1/targets", json={"target": "10.1.1.1:80"}).json()
    assert api.get(f"/upstreams/b.v1/targets/{target['id']}").status_code == 404


def test_targets_all_lists_the_same_targets(api: httpx.Client, upstream: dict) -> None:
    for i in range(3):
        api.post("/upstreams/orders.v1.svc/targets", json={"target": f"10.0.0.{i}:80"})
    listed = api.get("/upstreams/orders.v1.svc/targets").json()["data"]
    # Admin API reference 3.4, "List All Targets": GET /upstreams/{name or id}/targets/all
    assert api.get("/upstreams/orders.v1.svc/targets/all").json()["data"] == listed
    assert len(listed) == 3


def test_health_endpoints_mark_a_target(api: httpx.Client, kong: KongAdminDouble, upstream: dict) -> None:
    target = api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.9:80"}).json()
    assert api.put("/upstreams/orders.v1.svc/targets/10.0.0.9:80/unhealthy").status_code == 204
    assert kong.health() == {target["id"]: "UNHEALTHY"}
    assert api.post(f"/upstreams/orders.v1.svc/targets/{target['id']}/healthy").status_code == 204
    assert kong.health() == {target["id"]: "HEALTHY"}


def test_deleting_an_upstream_deletes_its_targets(api: httpx.Client, kong: KongAdminDouble,
                                                  upstream: dict) -> None:
    api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.1:80"})
    assert len(kong.targets_of("orders.v1.svc")) == 1
    assert api.delete("/upstreams/orders.v1.svc").status_code == 204
    assert kong.state()["targets"] == []  # targets.upstream is on_delete = "cascade"


# --------------------------------------------------------------------------- pagination
def test_walking_more_than_250_targets_with_next(api: httpx.Client, upstream: dict) -> None:
    expected = set()
    for i in range(260):
        target = f"10.2.{i // 200}.{i % 200}:8080"
        assert api.post("/upstreams/orders.v1.svc/targets", json={"target": target}).status_code == 201
        expected.add(target)

    pages = _walk(api, "/upstreams/orders.v1.svc/targets")
    # kong/api/endpoints.lua: default page size 100; `offset` only while there is a next page
    assert [len(p["data"]) for p in pages] == [100, 100, 60]
    assert all("offset" in p for p in pages[:-1]) and "offset" not in pages[-1]
    assert pages[-1]["next"] is None
    assert pages[0]["next"].startswith("/upstreams/orders.v1.svc/targets?offset=")
    seen = [t["target"] for p in pages for t in p["data"]]
    assert len(seen) == len(set(seen)) == 260
    assert set(seen) == expected


def test_nested_next_link_drops_size(api: httpx.Client, upstream: dict) -> None:
    for i in range(5):
        api.post("/upstreams/orders.v1.svc/targets", json={"target": f"10.3.0.{i}:80"})
    first = api.get("/upstreams/orders.v1.svc/targets", params={"size": 2}).json()
    assert len(first["data"]) == 2
    # kong/api/endpoints.lua get_collection_endpoint (foreign branch): next carries only the offset
    assert "size=" not in first["next"]
    second = api.get(first["next"]).json()
    assert len(second["data"]) == 3 and second["next"] is None


def test_top_level_next_keeps_size_and_tags(api: httpx.Client) -> None:
    for i in range(7):
        api.post("/services", json={"name": f"s{i}", "host": "h.internal", "tags": ["sync", "x y"]})
    first = api.get("/services", params={"size": 3, "tags": "sync"}).json()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(first["next"]).query)
    assert query["size"] == ["3"] and query["tags"] == ["sync"]
    assert query["offset"] == [first["offset"]]  # the offset is percent-encoded in the link
    pages = _walk(api, first["next"])
    assert [len(p["data"]) for p in pages] == [3, 1]


def test_size_limits(api: httpx.Client) -> None:
    for size in ("0", "1001", "2.5"):
        resp = api.get("/services", params={"size": size})
        assert resp.status_code == 400
        assert resp.json() == {"code": 9, "name": "invalid size",
                               "message": "size must be an integer between 1 and 1000"}
    assert api.get("/services", params={"size": "lots"}).json()["message"] == "size must be a number"
    assert api.get("/services", params={"size": "1000"}).status_code == 200


def test_bad_offset_is_400(api: httpx.Client) -> None:
    resp = api.get("/services", params={"offset": "not*base64"})
    assert resp.status_code == 400
    assert resp.json()["code"] == 7 and resp.json()["name"] == "invalid offset"


def test_offset_survives_deletion_of_the_last_seen_entity(api: httpx.Client) -> None:
    for i in range(4):
        api.post("/services", json={"name": f"s{i}", "host": "h.internal"})
    first = api.get("/services", params={"size": 2}).json()
    api.delete(f"/services/{first['data'][-1]['id']}")
    rest = _walk(api, first["next"])
    names = [s["name"] for p in rest for s in p["data"]]
    assert len(names) == 2 and not {n for n in names} & {s["name"] for s in first["data"]}


def test_empty_collection(api: httpx.Client) -> None:
    assert api.get("/upstreams").json() == {"data": [], "next": None}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(min_value=0, max_value=40), size=st.integers(min_value=1, max_value=15))
def test_any_page_size_visits_every_entity_once(kong: KongAdminDouble, count: int, size: int) -> None:
    kong.reset()
    with httpx.Client(base_url=kong.url, timeout=5.0) as api:
        for i in range(count):
            api.post("/upstreams", json={"name": f"u{i}.svc"})
        pages = _walk(api, f"/upstreams?size={size}")
        assert all(len(p["data"]) <= size for p in pages)
        names = [u["name"] for p in pages for u in p["data"]]
        assert sorted(names) == sorted(f"u{i}.svc" for i in range(count))
        assert len(pages) == max(1, -(-count // size))


# --------------------------------------------------------------------------- tags
@pytest.fixture
def tagged(api: httpx.Client) -> None:
    for name, tags in (("a.svc", ["sync", "prod"]), ("b.svc", ["sync"]), ("c.svc", ["prod"]), ("d.svc", None)):
        assert api.post("/upstreams", json={"name": name, "tags": tags}).status_code == 201


def _names(api: httpx.Client, tags: str) -> set[str]:
    resp = api.get("/upstreams", params={"tags": tags})
    assert resp.status_code == 200, resp.text
    return {u["name"] for u in resp.json()["data"]}


def test_tags_comma_is_and(api: httpx.Client, tagged: None) -> None:
    assert _names(api, "sync,prod") == {"a.svc"}
    assert _names(api, "sync") == {"a.svc", "b.svc"}


def test_tags_slash_is_or(api: httpx.Client, tagged: None) -> None:
    assert _names(api, "sync/prod") == {"a.svc", "b.svc", "c.svc"}


def test_tag_filter_errors(api: httpx.Client, tagged: None) -> None:
    # Admin API reference, "Tags": mixing operators is an error; at most 5 tags per query
    mixed = api.get("/upstreams", params={"tags": "sync,prod/x"})
    assert mixed.status_code == 400
    assert mixed.json() == {"code": 11, "name": "invalid options",
                            "message": "invalid option (tags: invalid filter syntax)",
                            "options": {"tags": "invalid filter syntax"}}
    many = api.get("/upstreams", params={"tags": "a,b,c,d,e,f"})
    assert many.status_code == 400
    assert many.json()["options"] == {"tags": "cannot query more than 5 tags"}


def test_tags_are_ignored_on_nested_target_listing(api: httpx.Client, upstream: dict) -> None:
    api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.1:80", "tags": ["keep"]})
    api.post("/upstreams/orders.v1.svc/targets", json={"target": "10.0.0.2:80", "tags": ["other"]})
    # Admin API reference, "Tags": filtering is not supported on foreign key relationship endpoints
    data = api.get("/upstreams/orders.v1.svc/targets", params={"tags": "keep"}).json()["data"]
    assert len(data) == 2


def test_invalid_tags_are_rejected(api: httpx.Client) -> None:
    resp = api.post("/upstreams", json={"name": "t.svc", "tags": ["ok", "a,b"]})
    assert resp.status_code == 400
    assert resp.json()["fields"]["tags"][1].startswith("invalid tag 'a,b'")


# --------------------------------------------------------------------------- auth
def test_admin_token_is_required_when_configured(double_ports: PortAllocator) -> None:
    with running_kong_double(double_ports, admin_token="s3cret") as kong, \
            httpx.Client(base_url=kong.url) as api:
        missing = api.get("/services")
        assert missing.status_code == 401
        assert missing.json() == {"message": "Invalid credentials. Token or User credentials required"}
        assert api.get("/services", headers={"Kong-Admin-Token": "wrong"}).status_code == 401
        assert api.get("/services", headers={"Kong-Admin-Token": "s3cret"}).status_code == 200
        assert kong.state()["services"] == []


def test_basic_auth_when_configured(double_ports: PortAllocator) -> None:
    with running_kong_double(double_ports, basic_auth=("admin", "pw")) as kong, \
            httpx.Client(base_url=kong.url) as api:
        refused = api.get("/upstreams")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Basic realm="kong"'
        assert api.get("/upstreams", auth=("admin", "nope")).status_code == 401
        assert api.get("/upstreams", auth=("admin", "pw")).status_code == 200


# --------------------------------------------------------------------------- faults and state
def test_set_down_answers_503_and_keeps_state(api: httpx.Client, kong: KongAdminDouble) -> None:
    api.post("/upstreams", json={"name": "keep.v1"})
    kong.set_down(True)
    assert api.get("/upstreams").status_code == 503
    kong.set_down(False)
    assert [u["name"] for u in api.get("/upstreams").json()["data"]] == ["keep.v1"]


def test_set_down_refuse_closes_the_port_until_back(api: httpx.Client, kong: KongAdminDouble) -> None:
    api.post("/upstreams", json={"name": "keep.v1"})
    port = kong.port
    kong.set_down(True, mode="refuse")
    with pytest.raises(httpx.ConnectError):
        api.get("/upstreams")
    kong.set_down(False)
    assert kong.port == port
    assert api.get("/upstreams/keep.v1").status_code == 200


def test_fail_next_injects_errors_then_recovers(api: httpx.Client, kong: KongAdminDouble) -> None:
    kong.fail_next(2, status=500)
    assert api.get("/upstreams").json() == {"message": "An unexpected error occurred"}
    assert api.get("/upstreams").status_code == 500
    assert api.get("/upstreams").status_code == 200


def test_state_and_request_log(api: httpx.Client, kong: KongAdminDouble) -> None:
    up = api.post("/upstreams", json={"name": "s.v1"}).json()
    api.post("/upstreams/s.v1/targets", json={"target": "1.2.3.4:5"})
    state = kong.state()
    assert [u["id"] for u in state["upstreams"]] == [up["id"]]
    assert [t["target"] for t in state["targets"]] == ["1.2.3.4:5"]
    assert ("POST", "/upstreams/s.v1/targets") in kong.requests
    state["upstreams"].clear()
    assert kong.state()["upstreams"]  # state() hands out copies


def test_offsets_are_opaque_base64(api: httpx.Client) -> None:
    for i in range(3):
        api.post("/upstreams", json={"name": f"o{i}.svc"})
    offset = api.get("/upstreams", params={"size": 1}).json()["offset"]
    assert base64.b64decode(offset, validate=True)
