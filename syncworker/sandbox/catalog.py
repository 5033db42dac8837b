"""Which peers exist and where each one's module lives (imported only when asked for)."""

from __future__ import annotations

import importlib

from syncworker.sandbox import base

#: peer name -> "module:Class" in syncworker.sandbox.peers
PEERS: dict[str, str] = {
    "zookeeper": "zookeeper:ZooKeeper",
    "redis": "redis:Redis",
    "etcd": "etcd:Etcd",
    "nginx": "nginx:Nginx",
    "envoy": "envoy:Envoy",
    "traefik": "traefik:Traefik",
    "polaris": "polaris:Polaris",
    "nacos": "nacos:Nacos",
    "nacos-auth": "nacos:NacosAuth",
    "consul": "consul:Consul",
    "eureka": "eureka:Eureka",
    "kubernetes": "kubernetes:KubeApiServer",
}


def get(name: str) -> base.Peer:
    try:
        target = PEERS[name]
    except KeyError:
        known = ", ".join(sorted(PEERS))
        raise base.PeerError(f"unknown peer {name!r}; known peers: {known}") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(f"syncworker.sandbox.peers.{module_name}")
    peer: base.Peer = getattr(module, class_name)()
    return peer
