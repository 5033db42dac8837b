"""Safe deletes: a pure guard between the planner and the executor.

A failed read never reaches here (the engine plans nothing then). What reaches
here is a successful read that would delete copies, and two situations are held
back, the way Eureka's self-preservation guards against a network split:

- the source suddenly reads empty while copies exist: every delete waits until
  the source has read empty for `empty_grace` seconds;
- a plan would delete more than `max_delete_ratio` of the copies at once: only
  that share goes now; the rest waits until it has been pending `ratio_grace`
  seconds (so a real mass removal still completes, just not in one blow).

The guard keeps no state of its own: it takes and returns `Pending`, the time
each held delete was first seen, so it is tested as a function of time.
"""

from __future__ import annotations

import dataclasses
import math

from syncworker import model
from syncworker.reconcile import planner


@dataclasses.dataclass(frozen=True)
class Policy:
    empty_grace: float = 60.0
    max_delete_ratio: float = 0.5
    ratio_grace: float = 30.0


#: address -> monotonic time when that delete was first held
Pending = dict[model.Address, float]


@dataclasses.dataclass(frozen=True)
class Verdict:
    plan: planner.Plan
    held: tuple[model.Instance, ...]
    pending: Pending
    reason: str = ""

    def recheck_in(self, now: float, policy: Policy) -> float | None:
        """Seconds until a held delete may go, for scheduling the next reconcile."""
        if not self.held:
            return None
        grace = policy.empty_grace if self.reason == "source-empty" else policy.ratio_grace
        first = min(self.pending.values())
        return max(0.0, first + grace - now)


def guard(p: planner.Plan, owned: int, desired: int, pending: Pending, now: float,
          policy: Policy) -> Verdict:
    deletes = list(p.deletes)
    if not deletes:
        return Verdict(p, (), {})
    since = {d.address: pending.get(d.address, now) for d in deletes}

    if desired == 0 and owned > 0:
        if all(now - t >= policy.empty_grace for t in since.values()):
            return Verdict(p, (), {})
        return Verdict(p.without_deletes(deletes), tuple(deletes), since, "source-empty")

    allowed_now = max(1, math.floor(owned * policy.max_delete_ratio))
    ripe = [d for d in deletes if now - since[d.address] >= policy.ratio_grace]
    fresh = [d for d in deletes if now - since[d.address] < policy.ratio_grace]
    budget = max(0, allowed_now - len(ripe))
    held = fresh[budget:]
    if not held:
        return Verdict(p, (), {})
    return Verdict(p.without_deletes(held), tuple(held),
                   {d.address: since[d.address] for d in held}, "delete-ratio")
