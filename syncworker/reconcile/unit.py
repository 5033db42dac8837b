"""One reconcile of one unit (task x service): read source, read destination, plan, guard, apply.

The function is idempotent and level-triggered: it never looks at what event
caused it, only at the two registries. A failed or incomplete read of either
side ends the run with a temporary error and no write at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

from syncworker import errors, marks, model
from syncworker.connectors import base
from syncworker.reconcile import desired as desired_mod
from syncworker.reconcile import planner, safety


@dataclasses.dataclass(frozen=True)
class Unit:
    task: str
    source_service: model.ServiceKey
    dest_service: model.ServiceKey
    rules: desired_mod.CopyRules
    #: gateways: the upstream name asked for in the config ("" lets the connector choose)
    upstream_name: str = ""

    @property
    def key(self) -> str:
        group = f"#{self.dest_service.group}" if self.dest_service.group != self.source_service.group else ""
        return f"{self.task}:{self.source_service}{group}"


@dataclasses.dataclass
class UnitState:
    """What the engine remembers between runs of one unit."""

    pending_deletes: safety.Pending = dataclasses.field(default_factory=dict)
    copies: tuple[model.Instance, ...] = ()
    last_run: float = 0.0
    last_ok: float = 0.0
    outcome: str = "never run"
    error: str = ""
    source_count: int = 0
    in_sync: int = 0
    clashes: int = 0
    skipped: int = 0
    held_deletes: int = 0
    ops: dict[str, int] = dataclasses.field(default_factory=lambda: {"create": 0, "update": 0, "delete": 0})
    runs: int = 0
    failures: int = 0


@dataclasses.dataclass(frozen=True)
class Result:
    ok: bool
    plan: planner.Plan
    outcomes: tuple[base.Outcome, ...] = ()
    error: str = ""
    temporary: bool = False
    #: seconds after which the unit must run again (held deletes, retries)
    recheck_in: float | None = None


Throttle = Callable[[int], Awaitable[None]]


async def _no_throttle(n: int) -> None:
    return None


async def reconcile(unit: Unit, source: base.Connector, dest: base.Connector, state: UnitState,
                    policy: safety.Policy, *, apply: bool = True, throttle: Throttle = _no_throttle,
                    clock: Callable[[], float] = time.monotonic) -> Result:
    now = clock()
    state.last_run = time.time()
    state.runs += 1
    dest.bind_upstream(unit.dest_service, unit.upstream_name)
    try:
        # both reads at once: a unit's latency is then the slower read, not their sum
        src, dst = await _both(source.list_instances(unit.source_service), dest.read_destination(unit.dest_service))
    except errors.SyncError as exc:
        return _failed(state, f"read failed, nothing changed: {exc}", temporary=isinstance(
            exc, errors.TemporaryError))
    except Exception as exc:  # an unmapped connector error is still a failed read
        return _failed(state, f"read failed, nothing changed: {type(exc).__name__}: {exc}", temporary=True)

    want = [dest.representable(i) for i in desired_mod.desired(src.instances, unit.rules)]
    owner = planner.Owner(unit.task, unit.rules.source)
    full = planner.plan(want, dst.instances, owner)
    owned = sum(1 for i in dst.instances if marks.owned_by(i, owner.task, owner.source))
    verdict = safety.guard(full, owned, len(want), state.pending_deletes, now, policy)
    state.pending_deletes = verdict.pending
    state.held_deletes = len(verdict.held)
    state.source_count = len(src.instances)
    state.skipped = len(src.skipped) + len(dst.skipped)
    state.clashes = len(full.clashes)

    p = verdict.plan
    outcomes: list[base.Outcome] = []
    if apply and not p.empty:
        await throttle(len(p.creates) + len(p.updates) + len(p.deletes))
        ctx = base.ApplyContext(task=unit.task, desired=tuple(want), upstream_name=unit.upstream_name)
        try:
            outcomes = await dest.apply(unit.dest_service, p, ctx)
        except errors.SyncError as exc:
            return _failed(state, f"apply failed: {exc}", temporary=isinstance(exc, errors.TemporaryError),
                           plan=p)
        except Exception as exc:
            return _failed(state, f"apply failed: {type(exc).__name__}: {exc}", temporary=True, plan=p)
    for o in outcomes:
        if o.ok:
            state.ops[o.op] = state.ops.get(o.op, 0) + 1
    failed = [o for o in outcomes if not o.ok]
    clashing = {c.address for c in full.clashes}
    state.copies = tuple(i for i in want if i.address not in clashing)
    wanted = {i.address for i in want} - clashing
    state.in_sync = len(wanted - {o.address for o in failed if o.op != "delete"})
    recheck = verdict.recheck_in(now, policy)
    if failed:
        msg = "; ".join(f"{o.op} {o.address[0]}:{o.address[1]}: {o.error}" for o in failed[:5])
        res = _failed(state, f"{len(failed)} of {len(outcomes)} writes failed: {msg}",
                      temporary=any(o.temporary for o in failed), plan=p)
        return dataclasses.replace(res, outcomes=tuple(outcomes))
    state.outcome = "held deletes" if verdict.held else "ok"
    state.error = (f"{len(verdict.held)} delete(s) held ({verdict.reason})" if verdict.held else "")
    state.last_ok = state.last_run
    return Result(True, p, tuple(outcomes), recheck_in=recheck)


async def _both(first: Awaitable[base.Listing], second: Awaitable[base.Listing]) -> tuple[base.Listing, base.Listing]:
    """Await both reads; if either fails, raise its error (the first one's when both do)."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    for got in (a, b):
        if isinstance(got, BaseException):
            raise got
    assert isinstance(a, base.Listing) and isinstance(b, base.Listing)
    return a, b


def _failed(state: UnitState, msg: str, *, temporary: bool, plan: planner.Plan | None = None) -> Result:
    state.outcome = "error"
    state.error = msg
    state.failures += 1
    return Result(False, plan or planner.Plan(), error=msg, temporary=temporary)
