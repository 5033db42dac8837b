"""Helpers for the Nacos contract tests: raw HTTP access to the real server, beside the connector.

Natives are registered here the way an application's client would register them, so
the tests can check what the connector does next to records it did not write.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from syncworker import model
from syncworker.connectors import base, nacos


def endpoint(http: str, *, name: str = "nacos-contract", user: str = "", password: str = "",
             **options: Any) -> base.Endpoint:
    return base.Endpoint(name=name, type="nacos", addresses=(http,), user=user, password=password,
                         options=options)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Raw:
    """Plain HTTP to the Nacos v3 admin and client APIs (for natives and for checks)."""

    def __init__(self, http: str, user: str = "", password: str = "") -> None:
        server = nacos.parse_address(http)
        self.client = httpx.Client(base_url=server.base, timeout=10.0)
        self.headers: dict[str, str] = {}
        if user:
            resp = self.client.post("/v3/auth/user/login", data={"username": user, "password": password})
            resp.raise_for_status()
            self.headers["accessToken"] = resp.json()["accessToken"]

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, **form: Any) -> dict[str, Any]:
        if method == "GET":
            resp = self.client.get(path, params=form, headers=self.headers)
        else:
            resp = self.client.request(method, path, data=form, headers=self.headers)
        return {"status": resp.status_code, **(resp.json() if resp.content.startswith(b"{") else
                                                 {"text": resp.text})}

    def register(self, svc: model.ServiceKey, ip: str, port: int, *, ephemeral: bool,
                 metadata: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
        return self.call("POST", "/v3/admin/ns/instance", **self._form(svc, ip, port), ephemeral=str(ephemeral).lower(),
                         metadata=json.dumps(metadata or {}), **extra)

    def deregister(self, svc: model.ServiceKey, ip: str, port: int, *, ephemeral: bool) -> dict[str, Any]:
        return self.call("DELETE", "/v3/admin/ns/instance", **self._form(svc, ip, port),
                         ephemeral=str(ephemeral).lower())

    def beat(self, svc: model.ServiceKey, ip: str, port: int) -> dict[str, Any]:
        return self.call("POST", "/v3/client/ns/instance", **self._form(svc, ip, port), heartBeat="true")

    def records(self, svc: model.ServiceKey) -> list[dict[str, Any]]:
        """Every instance record of the service, as the catalog holds it."""
        body = self.call("GET", "/v3/admin/ns/service/list", namespaceId=nacos.nacos_namespace(svc.namespace),
                         groupNameParam=nacos.nacos_group(svc.group), serviceNameParam=svc.name,
                         withInstances="true", pageNo=1, pageSize=100)
        for item in body["data"]["pageItems"]:
            if item.get("serviceName") == svc.name and item.get("groupName") == nacos.nacos_group(svc.group):
                return nacos._hosts_of(item)
        return []

    def checker(self, svc: model.ServiceKey, cluster: str = "DEFAULT") -> str:
        """The health checker type of one cluster of the service ("TCP", "NONE", ...)."""
        body = self.call("GET", "/v3/admin/ns/service", namespaceId=nacos.nacos_namespace(svc.namespace),
                         groupName=nacos.nacos_group(svc.group), serviceName=svc.name)
        info = body["data"]["clusterMap"].get(cluster) or {}
        return str((info.get("healthChecker") or {}).get("type") or "")

    @staticmethod
    def _form(svc: model.ServiceKey, ip: str, port: int) -> dict[str, Any]:
        return {"namespaceId": nacos.nacos_namespace(svc.namespace), "groupName": nacos.nacos_group(svc.group),
                "serviceName": svc.name, "ip": ip, "port": port}


@contextlib.contextmanager
def raw(http: str, user: str = "", password: str = "") -> Iterator[Raw]:
    r = Raw(http, user, password)
    try:
        yield r
    finally:
        r.close()


def wait_for(check: Callable[[], Any], timeout: float = 15.0, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(step)
