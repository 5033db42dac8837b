"""The task file as pydantic models: polaris-sync's `sync-registry.json` plus our extensions.

Field names follow polaris-sync's `registry.proto` (tasks, source, destination,
match, groups, methods, health_check, report), so its files load unchanged.
Everything else is an optional extension with a default that keeps polaris-sync's
behaviour.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

#: polaris-sync writes the Nacos public namespace as "empty_ns"
EMPTY_NS = "empty_ns"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(value: str | float | int) -> float:
    """'60s', '1m', '500ms', '2h' or a number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 60s, 1m, 2h)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


class Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class EndpointConfig(Model):
    name: str
    type: str
    addresses: list[str]
    token: SecretStr = SecretStr("")
    user: str = ""
    password: SecretStr = SecretStr("")
    #: connector-specific options (TLS, timeouts, ephemeral policy...)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "type")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        cleaned = [a.strip() for a in v if a and a.strip()]
        if not cleaned:
            raise ValueError("at least one address is required")
        return cleaned


class GroupConfig(Model):
    name: str
    #: polaris-sync's registry.proto form: one key/value pair
    key: str = ""
    value: str = ""
    #: polaris-sync's README form: a metadata map
    metadata: dict[str, str] = Field(default_factory=dict)
    upstream_name: str = Field(default="", alias="upstreamName")

    def selector(self) -> dict[str, str]:
        sel = dict(self.metadata)
        if self.key:
            sel[self.key] = self.value
        return sel


class MatchConfig(Model):
    namespace: str = ""
    service: str
    groups: list[GroupConfig] = Field(default_factory=list)
    #: extension: name and namespace mapping at the destination
    dest_namespace: str | None = None
    dest_service: str | None = None
    #: extension: copy only instances whose metadata holds all these pairs
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return "" if v == EMPTY_NS else v

    @field_validator("service")
    @classmethod
    def _svc(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty (use \"*\" for every service of the namespace)")
        return v.strip()


class SafetyConfig(Model):
    empty_grace: str | float = "60s"
    max_delete_ratio: float = Field(default=0.5, gt=0, le=1)
    ratio_grace: str | float = "30s"


class TaskConfig(Model):
    name: str
    enable: bool = True
    source: EndpointConfig
    destination: EndpointConfig
    match: list[MatchConfig] = Field(min_length=1)
    relay: bool = False
    #: writes per second at the destination (0: unlimited)
    rate_limit: float = Field(default=0, ge=0)
    only_healthy: bool = False
    safety: SafetyConfig = Field(default_factory=SafetyConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()


class MethodConfig(Model):
    type: Literal["watch", "pull"]
    enable: bool = True
    interval: str = "60s"

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        parse_duration(v)
        return v


class HealthCheckConfig(Model):
    enable: bool = False
    interval: str = "30s"
    timeout: str = "5s"


class ReportTarget(Model):
    type: str = "file"
    enable: bool = True
    name: str = ""
    uri: str = ""
    options: dict[str, str] = Field(default_factory=dict)


class ReportConfig(Model):
    interval: str = "1m"
    targets: list[ReportTarget] = Field(default_factory=list)


class RegistryConfig(Model):
    """The root object (polaris-sync's `Registry`)."""

    tasks: list[TaskConfig] = Field(default_factory=list)
    methods: list[MethodConfig] = Field(
        default_factory=lambda: [MethodConfig(type="watch"), MethodConfig(type="pull", interval="60s")])
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    def enabled_tasks(self) -> list[TaskConfig]:
        return [t for t in self.tasks if t.enable]

    def method(self, kind: str) -> MethodConfig | None:
        for m in self.methods:
            if m.type == kind and m.enable:
                return m
        return None
