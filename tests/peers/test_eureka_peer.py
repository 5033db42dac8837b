"""Smoke test: a real Eureka server from the sandbox; one instance registered, read back,
renewed by a heartbeat, deleted, gone."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.peers

APP = "SYNCWORKER-SMOKE"
INSTANCE_ID = "127.0.0.1:syncworker-smoke:18080"
JSON = {"Accept": "application/json", "Content-Type": "application/json"}


def _instance() -> dict[str, Any]:
    return {
        "instance": {
            "instanceId": INSTANCE_ID,
            "hostName": "127.0.0.1",
            "app": APP,
            "ipAddr": "127.0.0.1",
            "vipAddress": "syncworker-smoke",
            "status": "UP",
            "port": {"$": 18080, "@enabled": "true"},
            "securePort": {"$": 18443, "@enabled": "false"},
            "dataCenterInfo": {
                "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
                "name": "MyOwn",
            },
            "metadata": {"zone": "local", "weight": "10"},
        }
    }


def test_eureka_register_read_heartbeat_delete(peers) -> None:
    running = peers.get("eureka")
    with httpx.Client(base_url=running.endpoints["eureka"], headers=JSON, timeout=5.0) as client:
        resp = client.post(f"/apps/{APP}", json=_instance())
        assert resp.status_code == 204, resp.text

        resp = client.get(f"/apps/{APP}")
        assert resp.status_code == 200, resp.text
        application = resp.json()["application"]
        assert application["name"] == APP
        instances = application["instance"]
        assert [i["instanceId"] for i in instances] == [INSTANCE_ID]
        inst = instances[0]
        assert inst["status"] == "UP"
        assert inst["ipAddr"] == "127.0.0.1"
        assert int(inst["port"]["$"]) == 18080
        assert inst["port"]["@enabled"] == "true"
        assert inst["metadata"] == {"zone": "local", "weight": "10"}

        resp = client.get(f"/apps/{APP}/{INSTANCE_ID}")
        assert resp.status_code == 200, resp.text
        assert resp.json()["instance"]["instanceId"] == INSTANCE_ID

        resp = client.put(f"/apps/{APP}/{INSTANCE_ID}")
        assert resp.status_code == 200, resp.text

        resp = client.delete(f"/apps/{APP}/{INSTANCE_ID}")
        assert resp.status_code == 200, resp.text

        assert client.get(f"/apps/{APP}").status_code == 404
        assert client.get(f"/apps/{APP}/{INSTANCE_ID}").status_code == 404
        # a heartbeat for an unknown instance is answered 404: the client must register again
        assert client.put(f"/apps/{APP}/{INSTANCE_ID}").status_code == 404
