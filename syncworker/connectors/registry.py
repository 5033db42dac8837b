"""Maps a config `type` to the connector module that implements it.

The engine asks this registry for a connector class by type name and never
imports a connector module itself. A new system is one new module plus one line
here (and its contract tests).
"""

from __future__ import annotations

import importlib

from syncworker.connectors import base

#: type name -> "module:Class" under syncworker.connectors
TYPES: dict[str, str] = {
    "memory": "memory:MemoryConnector",
    "envoy": "envoy:EnvoyConnector",
    "nginx": "nginx:NginxConnector",
    "polaris": "polaris:PolarisConnector",
    "kong": "kong:KongConnector",
    "apisix": "apisix:ApisixConnector",
    "nacos": "nacos:NacosConnector",
}


def known_types() -> list[str]:
    return sorted(TYPES)


def connector_class(type_name: str) -> type[base.Connector]:
    try:
        target = TYPES[type_name]
    except KeyError:
        raise KeyError(f"unknown connector type {type_name!r}; known: {', '.join(known_types())}") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(f"syncworker.connectors.{module_name}")
    cls: type[base.Connector] = getattr(module, class_name)
    return cls


def create(endpoint: base.Endpoint) -> base.Connector:
    return connector_class(endpoint.type)(endpoint)
