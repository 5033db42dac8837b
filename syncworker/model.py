"""The canonical model every connector translates to and from.

Weights are canonical: 1.0 means "the registry's default weight". Each connector
converts with its own default (Nacos 1.0, Polaris 100, Kong 100), so a Nacos
instance of weight 1 becomes a Polaris instance of weight 100, and copies share
traffic with natives as they did at home.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

Address = tuple[str, int]


@dataclasses.dataclass(frozen=True, order=True)
class ServiceKey:
    namespace: str
    group: str
    name: str

    def __str__(self) -> str:
        group = f"{self.group}/" if self.group else ""
        return f"{self.namespace}/{group}{self.name}"


def freeze(meta: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(sorted((meta or {}).items())))


@dataclasses.dataclass(frozen=True)
class Instance:
    host: str
    port: int
    weight: float = 1.0
    healthy: bool = True
    enabled: bool = True
    metadata: Mapping[str, str] = dataclasses.field(default_factory=lambda: freeze({}))
    protocol: str = ""
    cluster: str = ""
    #: Nacos-style liveness: True when the record lives only while heartbeated
    ephemeral: bool = False
    #: the registry's own id, when it has one (not compared, not copied)
    native_id: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        # always re-freeze: a read-only mapping handed in may be unsorted, and the hash
        # (metadata items in order) must agree with == (order-insensitive)
        object.__setattr__(self, "metadata", freeze(self.metadata))

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def replace(self, **changes: object) -> Instance:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def __hash__(self) -> int:
        return hash((self.host, self.port, self.weight, self.healthy, self.enabled,
                     tuple(self.metadata.items()), self.protocol, self.cluster, self.ephemeral))


def validate_instance(inst: Instance) -> str | None:
    """Why a record read from a registry is unusable, or None when it is fine."""
    if not inst.host or any(c.isspace() for c in inst.host):
        return f"bad host {inst.host!r}"
    if not (0 < inst.port < 65536):
        return f"port {inst.port} out of range"
    if inst.weight < 0 or inst.weight != inst.weight:
        return f"weight {inst.weight} is negative or not a number"
    return None
