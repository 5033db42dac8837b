"""The one interface every external system is reached through.

A connector translates between one system's API and the canonical model in
`syncworker.model`. It lists services and instances (as a source or to read a
destination's current state), optionally watches for changes, and applies a
`Plan` (as a destination). It declares what it can do in `Capabilities`, and the
engine relies on nothing else. Connectors never import each other or the engine.

Errors: a listing that fails or is incomplete raises `errors.ReadError`; a write
that may succeed later raises `errors.TemporaryError`; anything else that is the
peer's final word raises `errors.PermanentError`. `apply` does not raise for a
single failed operation: it returns one `Outcome` per operation; `retire` does not
raise at all: a failed read or write is one `Retired` entry marked FAILED.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from syncworker import model
from syncworker.reconcile import planner


@dataclasses.dataclass(frozen=True)
class Capabilities:
    source: bool = True
    destination: bool = True
    watch: bool = False
    batch_writes: bool = False
    needs_heartbeats: bool = False
    #: a gateway: only healthy, enabled instances become targets, and a service's
    #: groups (polaris-sync `groups`) become separate upstreams, one unit each
    gateway: bool = False


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One configured system: what the task file says under `source` or `destination`."""

    name: str
    type: str
    addresses: tuple[str, ...]
    token: str = dataclasses.field(default="", repr=False)
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Outcome:
    op: str  # "create", "update", "delete"
    address: model.Address
    ok: bool
    error: str = ""
    temporary: bool = False


RetireAction = Literal["deleted", "kept", "failed"]
DELETED: RetireAction = "deleted"
KEPT: RetireAction = "kept"
FAILED: RetireAction = "failed"


@dataclasses.dataclass(frozen=True)
class Retired:
    """What `retire` did with one gateway object it had made for a unit."""

    kind: str  # "upstream", "service", "route", "cluster", "block"
    name: str
    action: RetireAction
    #: why it was kept, or what failed and where
    reason: str = ""


def not_made_by(task: str) -> str:
    """The reason `retire` gives for keeping an object without `task`'s mark."""
    return f"not made by task {task!r} (made by hand or by another task)"


@dataclasses.dataclass(frozen=True)
class Listing:
    """Instances of one service plus the records that were skipped as malformed."""

    instances: tuple[model.Instance, ...]
    skipped: tuple[str, ...] = ()
    revision: str = ""


@dataclasses.dataclass(frozen=True)
class ApplyContext:
    """What a destination may need beyond the plan: gateways build upstreams per group."""

    task: str
    #: every copy the task wants for this service after the plan
    desired: tuple[model.Instance, ...] = ()
    #: gateways: the upstream name the config asks for (polaris-sync `upstreamName`), or ""
    upstream_name: str = ""


#: a watch event: the service that changed, or None when the connector lost track
#: and everything it watches must be reconciled
WatchEvent = model.ServiceKey | None


class Connector(abc.ABC):
    type_name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: the weight that this system gives an instance by default (canonical 1.0)
    default_weight: ClassVar[float] = 1.0

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        #: set by the engine for a watched source: true while many of the task's units wait for a
        #: worker (an initial sync). A watch may then postpone its costly polls (whole-namespace
        #: reads) for a while: those units read the source themselves when they run, and a poll
        #: made later still diffs against the same baseline, so no change is lost, only seen later.
        self.watch_busy: Callable[[], bool] | None = None

    @property
    def name(self) -> str:
        return self.endpoint.name

    def representable(self, inst: model.Instance) -> model.Instance:
        """`inst` as this system can store it (weights rounded to its resolution, say).

        The law every connector keeps: listing what `apply` wrote gives back exactly
        `representable(inst)`, so a copy never differs from its plan and never flaps.
        """
        return inst

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect or log in; called once before first use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; must not delete or expire anything it wrote."""

    @abc.abstractmethod
    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        """Every service in `namespace`; raise ReadError when the listing is not complete."""

    @abc.abstractmethod
    async def list_instances(self, service: model.ServiceKey) -> Listing:
        """Every instance of `service` (empty when the service does not exist)."""

    async def read_destination(self, service: model.ServiceKey) -> Listing:
        """`list_instances` for a service this connector is about to write to.

        A destination may answer faster from what it knows about its own namespace (an
        initial sync reads thousands of services that do not exist yet); a source read must
        not, since a service that appeared a moment ago has to be read for real.
        """
        return await self.list_instances(service)

    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: ApplyContext
                    ) -> list[Outcome]:
        raise NotImplementedError(f"{self.type_name} cannot be a destination")

    def bind_upstream(self, service: model.ServiceKey, upstream_name: str) -> None:  # noqa: B027
        """Gateways: the upstream name the config gives this unit ("" for none), told before any read.

        `list_instances` takes only the key; a gateway that finds a unit's upstream by name
        (Kong) needs the configured one before it reads, or a fresh connector reads the
        derived name and misses an upstream the config named otherwise.
        """

    async def retire(self, service: model.ServiceKey, ctx: ApplyContext) -> list[Retired]:
        """Gateways: remove the objects this connector made for a unit whose copies are all gone.

        Called by `engine.cleanup_units` after a removed task's (or unit's) copies were
        deleted. Only objects carrying `ctx.task`'s mark and holding nothing that is not the
        task's go; everything else stays, with the reason in a KEPT entry. A failed read or
        write is a FAILED entry, nothing more is deleted after it, and nothing is raised.
        Registries have no such objects: nothing to do.
        """
        return []

    def watch(self, services: Sequence[model.ServiceKey], namespaces: Sequence[str]
              ) -> AsyncIterator[WatchEvent]:
        """Yield keys of services that changed; watch whole namespaces for new services."""
        raise NotImplementedError(f"{self.type_name} cannot watch")

    async def heartbeat(self, service: model.ServiceKey, instances: Sequence[model.Instance]) -> None:  # noqa: B027
        """Keep ephemeral copies alive (only for connectors that need heartbeats)."""

    async def health(self) -> str | None:
        """None when the system answers, or why it does not."""
        try:
            await self.list_services("")
        except Exception as exc:
            return str(exc)
        return None
