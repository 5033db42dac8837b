"""Pins the APISIX Admin API contract double to APISIX 3.x's documented v3 behaviour.

Sources (see the double's module docstring): the Admin API reference
(apisix.apache.org/docs/apisix/3.x/admin-api) and, where it is silent,
apisix/admin/{init,resource,v3_adapter,utils}.lua, apisix/core/{etcd,table}.lua
and apisix/schema_def.lua.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncworker.sandbox.ports import PortAllocator
from tests.doubles.apisix_admin_double import DEFAULT_ADMIN_KEY, ApisixAdminDouble
from tests.doubles.fixtures import running_apisix_double

NODE_MAP = {"127.0.0.1:1980": 1}


@pytest.fixture
def api(apisix: ApisixAdminDouble) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{apisix.url}/apisix/admin", headers={"X-API-KEY": DEFAULT_ADMIN_KEY},
                      timeout=5.0) as client:
        yield client


# --------------------------------------------------------------------------- API key
def test_missing_api_key_is_401(apisix: ApisixAdminDouble) -> None:
    resp = httpx.get(f"{apisix.url}/apisix/admin/upstreams")
    assert resp.status_code == 401
    # apisix/admin/init.lua set_ctx_and_check_token
    assert resp.json() == {"error_msg": "failed to check token", "description": "missing apikey"}


def test_wrong_api_key_is_401(apisix: ApisixAdminDouble) -> None:
    resp = httpx.put(f"{apisix.url}/apisix/admin/upstreams/1", json={"nodes": NODE_MAP},
                     headers={"X-API-KEY": "not-the-key"})
    assert resp.status_code == 401
    assert resp.json() == {"error_msg": "failed to check token", "description": "wrong apikey"}
    assert apisix.state()["upstreams"] == {}


def test_api_key_as_query_argument(apisix: ApisixAdminDouble) -> None:
    resp = httpx.get(f"{apisix.url}/apisix/admin/upstreams", params={"api_key": DEFAULT_ADMIN_KEY})
    assert resp.status_code == 200


def test_viewer_key_may_only_read(double_ports: PortAllocator) -> None:
    with running_apisix_double(double_ports, api_key="admin-key", viewer_key="viewer-key") as apisix:
        url = f"{apisix.url}/apisix/admin/upstreams"
        assert httpx.get(url, headers={"X-API-KEY": "viewer-key"}).status_code == 200
        denied = httpx.put(f"{url}/1", json={"nodes": NODE_MAP}, headers={"X-API-KEY": "viewer-key"})
        assert denied.status_code == 401
        assert denied.json()["description"] == "invalid method for role viewer"


def test_every_admin_reply_says_v3(api: httpx.Client) -> None:
    assert api.get("/upstreams").headers["x-api-version"] == "v3"


# --------------------------------------------------------------------------- upstream CRUD
def test_put_creates_with_201_then_replaces_with_200(api: httpx.Client) -> None:
    created = api.put("/upstreams/1", json={"nodes": NODE_MAP})
    assert created.status_code == 201
    body = created.json()
    assert body["key"] == "/apisix/upstreams/1"
    value = body["value"]
    assert value["id"] == "1" and value["nodes"] == NODE_MAP
    # schema_def.lua defaults, injected by the schema check
    assert (value["type"], value["scheme"], value["pass_host"], value["hash_on"]) == (
        "roundrobin", "http", "pass", "vars")
    assert isinstance(value["create_time"], int) and value["update_time"] >= value["create_time"]
    assert "action" not in body  # v3: no action field

    replaced = api.put("/upstreams/1", json={"nodes": {"127.0.0.2:80": 2}})
    assert replaced.status_code == 200
    assert replaced.json()["value"]["nodes"] == {"127.0.0.2:80": 2}
    assert replaced.json()["value"]["create_time"] == value["create_time"]  # utils.inject_timestamp keeps it


def test_get_one_has_key_value_and_indexes(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP})
    api.put("/upstreams/1", json={"nodes": NODE_MAP, "name": "renamed"})
    got = api.get("/upstreams/1").json()
    assert set(got) == {"key", "value", "createdIndex", "modifiedIndex"}
    assert got["modifiedIndex"] > got["createdIndex"]
    assert got["value"]["name"] == "renamed"


def test_missing_key_is_404_key_not_found(api: httpx.Client) -> None:
    # apisix/core/etcd.lua not_found()
    for resp in (api.get("/upstreams/nope"), api.delete("/upstreams/nope"),
                 api.patch("/upstreams/nope", json={"name": "x"})):
        assert resp.status_code == 404
        assert resp.json() == {"message": "Key not found"}


def test_post_generates_a_20_digit_id(api: httpx.Client) -> None:
    resp = api.post("/upstreams", json={"nodes": NODE_MAP})
    assert resp.status_code == 201
    new_id = resp.json()["value"]["id"]
    # apisix/core/etcd.lua push(): the etcd revision formatted with %020d
    assert len(new_id) == 20 and new_id.isdigit()
    assert resp.json()["key"] == f"/apisix/upstreams/{new_id}"
    assert api.get(f"/upstreams/{new_id}").json()["value"]["nodes"] == NODE_MAP


def test_id_rules(api: httpx.Client) -> None:
    # apisix/admin/resource.lua check_conf
    assert api.put("/upstreams", json={"nodes": NODE_MAP}).json() == {"error_msg": "missing upstream id"}
    assert api.put("/upstreams/1", json={"id": "2", "nodes": NODE_MAP}).json() == {
        "error_msg": "wrong upstream id"}
    assert api.post("/upstreams/1", json={"nodes": NODE_MAP}).json() == {
        "error_msg": "wrong upstream id, do not need it"}
    assert api.post("/upstreams", json={"id": "9", "nodes": NODE_MAP}).status_code == 400
    assert api.put("/upstreams/1").json() == {"error_msg": "missing configurations"}
    assert api.delete("/upstreams").json() == {"error_msg": "missing upstream id"}


def test_timestamps_cannot_be_set_by_the_client(api: httpx.Client) -> None:
    resp = api.put("/upstreams/1", json={"nodes": NODE_MAP, "create_time": 1})
    assert resp.status_code == 400
    # resource.lua check_forbidden_properties (the message has two spaces)
    assert resp.json() == {"error_msg": "the property is forbidden:  create_time"}


def test_delete_returns_deleted_and_key(api: httpx.Client, apisix: ApisixAdminDouble) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP})
    resp = api.delete("/upstreams/1")
    assert resp.status_code == 200
    assert resp.json() == {"deleted": "1", "key": "/apisix/upstreams/1"}
    assert api.get("/upstreams/1").status_code == 404
    assert apisix.state()["upstreams"] == {}


def test_invalid_json_body(api: httpx.Client) -> None:
    resp = api.put("/upstreams/1", content=b'{"nodes": ', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error_msg"].startswith("invalid request body: ")
    assert resp.json()["req_body"] == '{"nodes": '


def test_unknown_resource_and_path(api: httpx.Client, apisix: ApisixAdminDouble) -> None:
    assert api.get("/dragons").json() == {"error_msg": "Unsupported resource type: dragons"}
    outside = httpx.get(f"{apisix.url}/not-admin")
    assert outside.status_code == 404
    assert outside.json() == {"error_msg": "404 Route Not Found"}


# --------------------------------------------------------------------------- node formats
def test_nodes_as_a_list_get_priority_default(api: httpx.Client) -> None:
    nodes = [{"host": "10.0.0.1", "port": 8080, "weight": 3}, {"host": "svc.internal", "weight": 1}]
    value = api.put("/upstreams/1", json={"nodes": nodes}).json()["value"]
    assert value["nodes"] == [{"host": "10.0.0.1", "port": 8080, "weight": 3, "priority": 0},
                              {"host": "svc.internal", "weight": 1, "priority": 0}]


def test_nodes_as_a_host_port_weight_map_are_kept_as_a_map(api: httpx.Client) -> None:
    nodes = {"10.0.0.1:8080": 3, "10.0.0.2:8080": 0}
    assert api.put("/upstreams/1", json={"nodes": nodes}).json()["value"]["nodes"] == nodes


@pytest.mark.parametrize(
    "nodes",
    [
        [{"host": "10.0.0.1", "port": 80}],                      # weight is required
        [{"port": 80, "weight": 1}],                             # host is required
        [{"host": "10.0.0.1", "port": 0, "weight": 1}],          # port 1..65535
        [{"host": "10.0.0.1", "port": 80, "weight": -1}],        # weight >= 0
        [{"host": "bad host", "port": 80, "weight": 1}],         # host pattern
        {"10.0.0.1:80": "heavy"},                                # map weights are integers
        "10.0.0.1:80",
    ],
)
def test_bad_nodes_are_rejected(api: httpx.Client, nodes: object) -> None:
    resp = api.put("/upstreams/1", json={"nodes": nodes})
    assert resp.status_code == 400
    # schema_def.lua nodes is an anyOf, whose failure is reported without detail
    assert resp.json() == {"error_msg": 'invalid configuration: property "nodes" validation failed: '
                                        "object matches none of the required"}


def test_upstream_needs_nodes_or_discovery(api: httpx.Client) -> None:
    resp = api.put("/upstreams/1", json={"type": "roundrobin"})
    assert resp.json() == {"error_msg": "invalid configuration: value should match only one schema, "
                                        "but matches none"}
    ok = api.put("/upstreams/2", json={"service_name": "orders", "discovery_type": "nacos"})
    assert ok.status_code == 201


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"nodes": NODE_MAP, "type": "random"},
         'invalid configuration: property "type" validation failed: matches none of the enum values'),
        ({"nodes": NODE_MAP, "retries": -1},
         'invalid configuration: property "retries" validation failed: expected -1 to be at least 0'),
        ({"nodes": NODE_MAP, "scheme": 7},
         'invalid configuration: property "scheme" validation failed: wrong type: expected string, got number'),
        ({"nodes": NODE_MAP, "type": "chash"}, "missing key"),
        ({"nodes": NODE_MAP, "pass_host": "rewrite"}, "`upstream_host` can't be empty when `pass_host` is `rewrite`"),
    ],
)
def test_upstream_schema_errors(api: httpx.Client, body: dict, message: str) -> None:
    resp = api.put("/upstreams/1", json=body)
    assert resp.status_code == 400
    assert resp.json() == {"error_msg": message}


@given(nodes=st.dictionaries(
    st.from_regex(r"\A[a-z0-9.\-]{1,20}:[1-9][0-9]{0,3}\Z"), st.integers(min_value=0, max_value=10_000),
    max_size=6))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_valid_node_map_round_trips(api: httpx.Client, nodes: dict[str, int]) -> None:
    assert api.put("/upstreams/prop", json={"nodes": nodes}).status_code in (200, 201)
    assert api.get("/upstreams/prop").json()["value"]["nodes"] == nodes


# --------------------------------------------------------------------------- labels
def test_labels_are_stored_and_filterable(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP, "labels": {"managed-by": "syncworker", "env": "prod"}})
    api.put("/upstreams/2", json={"nodes": NODE_MAP, "labels": {"env": "dev"}})
    assert api.get("/upstreams/1").json()["value"]["labels"] == {"managed-by": "syncworker", "env": "prod"}
    # v3_adapter.lua filter: `label` matches a label key
    found = api.get("/upstreams", params={"label": "managed-by"}).json()
    assert found["total"] == 1 and [i["value"]["id"] for i in found["list"]] == ["1"]


def test_blank_label_values_are_rejected(api: httpx.Client) -> None:
    resp = api.put("/upstreams/1", json={"nodes": NODE_MAP, "labels": {"env": "has space"}})
    assert resp.status_code == 400
    assert resp.json()["error_msg"].startswith('invalid configuration: property "labels" validation failed')


def test_name_filter(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP, "name": "orders-v1"})
    api.put("/upstreams/2", json={"nodes": NODE_MAP, "name": "billing"})
    assert [i["value"]["id"] for i in api.get("/upstreams", params={"name": "orders"}).json()["list"]] == ["1"]


# --------------------------------------------------------------------------- list format and paging
def test_empty_list(api: httpx.Client) -> None:
    assert api.get("/upstreams").json() == {"total": 0, "list": []}


def test_list_format(api: httpx.Client) -> None:
    api.put("/upstreams/a", json={"nodes": NODE_MAP})
    api.put("/upstreams/b", json={"nodes": NODE_MAP})
    body = api.get("/upstreams").json()
    assert body["total"] == 2
    assert [set(item) for item in body["list"]] == [{"key", "value", "createdIndex", "modifiedIndex"}] * 2
    assert [item["key"] for item in body["list"]] == ["/apisix/upstreams/a", "/apisix/upstreams/b"]


def test_paging_sorts_by_created_index_and_total_counts_all(api: httpx.Client) -> None:
    ids = [f"u{i:02d}" for i in range(25)]
    for rid in reversed(ids):  # created in reverse key order
        api.put(f"/upstreams/{rid}", json={"nodes": NODE_MAP})
    pages = [api.get("/upstreams", params={"page": p, "page_size": 10}).json() for p in (1, 2, 3, 4)]
    assert [p["total"] for p in pages] == [25] * 4
    assert [len(p["list"]) for p in pages] == [10, 10, 5, 0]
    walked = [i["value"]["id"] for p in pages for i in p["list"]]
    assert walked == list(reversed(ids))  # v3_adapter.lua pagination: by createdIndex, not by key


def test_page_size_bounds(api: httpx.Client) -> None:
    for size in (9, 501):
        resp = api.get("/upstreams", params={"page": 1, "page_size": size})
        assert resp.status_code == 400
        assert resp.text == "page_size must be between 10 and 500"  # v3_adapter.lua: a plain string body
    # paging only applies when both page and page_size are given
    assert api.get("/upstreams", params={"page_size": 3}).status_code == 200


# --------------------------------------------------------------------------- PATCH
def test_patch_merges_nodes_and_null_deletes(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": {"127.0.0.1:80": 1}})
    # Admin API reference, Upstream PATCH examples: maps merge, a null weight removes the node
    added = api.patch("/upstreams/1", json={"nodes": {"127.0.0.1:8080": 1}})
    assert added.status_code == 200
    assert added.json()["value"]["nodes"] == {"127.0.0.1:80": 1, "127.0.0.1:8080": 1}
    removed = api.patch("/upstreams/1", json={"nodes": {"127.0.0.1:80": None}})
    assert removed.json()["value"]["nodes"] == {"127.0.0.1:8080": 1}


def test_patch_sub_path_replaces_the_nodes(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": {"127.0.0.1:80": 1}, "name": "keep"})
    resp = api.patch("/upstreams/1/nodes", json=[{"host": "10.0.0.9", "port": 81, "weight": 2}])
    assert resp.status_code == 200
    assert resp.json()["key"] == "/apisix/upstreams/1"
    value = api.get("/upstreams/1").json()["value"]
    assert value["nodes"] == [{"host": "10.0.0.9", "port": 81, "weight": 2, "priority": 0}]
    assert value["name"] == "keep"


def test_patch_arrays_are_replaced_not_merged(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": [{"host": "a", "weight": 1}, {"host": "b", "weight": 1}]})
    value = api.patch("/upstreams/1", json={"nodes": [{"host": "c", "weight": 5}]}).json()["value"]
    assert value["nodes"] == [{"host": "c", "weight": 5, "priority": 0}]


def test_patch_is_validated_after_merging(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP})
    resp = api.patch("/upstreams/1", json={"nodes": {"127.0.0.1:80": -5}})
    assert resp.status_code == 400
    assert api.get("/upstreams/1").json()["value"]["nodes"] == NODE_MAP


def test_patch_without_body(api: httpx.Client) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP})
    assert api.patch("/upstreams/1").json() == {"error_msg": "missing new configuration"}


# --------------------------------------------------------------------------- routes and services
def test_route_and_service_reference_checks(api: httpx.Client) -> None:
    missing = api.put("/routes/r1", json={"uri": "/orders/*", "upstream_id": "u1"})
    assert missing.status_code == 400
    assert missing.json() == {"error_msg": "failed to fetch upstream info by upstream id [u1], response code: 404"}

    api.put("/upstreams/u1", json={"nodes": NODE_MAP})
    svc = api.put("/services/s1", json={"upstream_id": "u1", "name": "orders"})
    assert svc.status_code == 201
    route = api.put("/routes/r1", json={"uri": "/orders/*", "service_id": "s1"})
    assert route.status_code == 201
    assert (route.json()["value"]["priority"], route.json()["value"]["status"]) == (0, 1)

    # resource.lua delete_checker: still referenced -> 400, unless ?force=true
    assert api.delete("/services/s1").json() == {
        "error_msg": "can not delete this service directly, route [r1] is still using it now"}
    assert api.delete("/upstreams/u1").json() == {
        "error_msg": "can not delete this upstream, service [s1] is still using it now"}
    assert api.delete("/upstreams/u1", params={"force": "true"}).status_code == 200


def test_route_needs_exactly_one_of_uri_and_uris(api: httpx.Client) -> None:
    for body in ({"upstream": {"nodes": NODE_MAP}},
                 {"uri": "/a", "uris": ["/b"], "upstream": {"nodes": NODE_MAP}}):
        resp = api.put("/routes/1", json=body)
        assert resp.status_code == 400
        assert "value should match only one schema" in resp.json()["error_msg"]


def test_route_inline_upstream_is_checked_and_defaulted(api: httpx.Client) -> None:
    bad = api.put("/routes/1", json={"uri": "/a", "upstream": {"nodes": [{"host": "a"}]}})
    assert bad.json()["error_msg"] == ('invalid configuration: property "upstream" validation failed: '
                                       'property "nodes" validation failed: object matches none of the required')
    good = api.put("/routes/1", json={"uri": "/a", "upstream": {"nodes": NODE_MAP}})
    assert good.json()["value"]["upstream"]["type"] == "roundrobin"


def test_uri_filter_on_routes(api: httpx.Client) -> None:
    api.put("/routes/1", json={"uri": "/orders/*", "plugins": {}})
    api.put("/routes/2", json={"uris": ["/billing", "/invoices"], "plugins": {}})
    assert [i["value"]["id"] for i in api.get("/routes", params={"uri": "invoices"}).json()["list"]] == ["2"]


# --------------------------------------------------------------------------- faults
def test_set_down_answers_503_then_recovers(api: httpx.Client, apisix: ApisixAdminDouble) -> None:
    api.put("/upstreams/1", json={"nodes": NODE_MAP})
    apisix.set_down(True)
    resp = api.get("/upstreams/1")
    assert resp.status_code == 503
    assert "error_msg" in resp.json()
    apisix.set_down(False)
    assert api.get("/upstreams/1").status_code == 200


def test_set_down_refuse(api: httpx.Client, apisix: ApisixAdminDouble) -> None:
    apisix.set_down(True, mode="refuse")
    with pytest.raises(httpx.ConnectError):
        api.get("/upstreams")
    apisix.set_down(False)
    assert api.get("/upstreams").json() == {"total": 0, "list": []}


def test_etcd_failure_answers_503(double_ports: PortAllocator) -> None:
    # apisix/admin/resource.lua: a failing etcd call answers 503 {"error_msg": ...}
    with running_apisix_double(double_ports, etcd_url="http://127.0.0.1:9") as apisix:
        resp = httpx.get(f"{apisix.url}/apisix/admin/upstreams", headers={"X-API-KEY": DEFAULT_ADMIN_KEY})
        assert resp.status_code == 503
        assert resp.json()["error_msg"].startswith("etcd unreachable")
