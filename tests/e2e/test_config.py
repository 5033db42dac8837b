"""Configuration changes under a running `syncworker run`: a removed task and a refused bad file.

A task removed from the file has its copies deleted at the next reload (every second),
and only its copies; a bad file is refused as a whole with every problem named, and the
running config stays in force.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from syncworker import marks, model
from syncworker.sandbox import base as sandbox_base
from tests.e2e.conftest import StartSync
from tests.e2e.helpers import (
    N2P,
    NACOS,
    P2N,
    POLARIS,
    RawReader,
    RecordKey,
    Side,
    converge,
    copy_records,
    fresh_namespace,
    nacos_endpoint,
    nacos_view,
    polaris_endpoint,
    polaris_view,
    task,
    two_way,
)

pytestmark = pytest.mark.peers

EXTRA = "nacos-b-to-polaris"


def inst(host: str, port: int, **fields: Any) -> model.Instance:
    return model.Instance(host=host, port=port, **fields)


def clone(config: dict[str, Any]) -> dict[str, Any]:
    """A deep copy that shares nothing (the two tasks of a config share their endpoint dicts)."""
    out: dict[str, Any] = json.loads(json.dumps(config))
    return out


def owners(records: dict[RecordKey, Any]) -> dict[RecordKey, str]:
    return {k: r["metadata"][marks.TASK] for k, r in copy_records(records).items()}


def test_task_removed_cleans_up_only_its_copies(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                                start_sync: StartSync) -> None:
    """Two tasks write into one Polaris namespace (one service even); removing one from the file deletes
    its copies within seconds and leaves the other task's copies and every native alone."""
    ns_a, ns_b = fresh_namespace("cfg-a"), fresh_namespace("cfg-b")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    both = two_way(n_ep, p_ep, ns_a, pull="5s")
    both["tasks"].append(task(EXTRA, n_ep, p_ep, ns_b, match={"dest_namespace": ns_a}))
    natives = {
        (ns_a, "shared"): inst("127.0.31.1", 80), (ns_a, "only-a"): inst("127.0.31.2", 80),
        (ns_b, "shared"): inst("127.0.32.1", 80), (ns_b, "only-b"): inst("127.0.32.2", 80),
    }
    pol_native = inst("127.0.33.1", 80)
    report: dict[str, float] = {}

    async def scenario() -> None:
        sides = {ns: await Side(NACOS, n_ep, ns, P2N).open() for ns in (ns_a, ns_b)}
        p = await Side(POLARIS, p_ep, ns_a, N2P).open()
        raw = RawReader(nacos, polaris)
        try:
            await asyncio.gather(*(sides[ns].put(svc, i) for (ns, svc), i in natives.items()),
                                 p.put("pol", pol_native))
            child = start_sync(both)
            want_p = {("shared", "127.0.31.1", 80): N2P, ("only-a", "127.0.31.2", 80): N2P,
                      ("shared", "127.0.32.1", 80): EXTRA, ("only-b", "127.0.32.2", 80): EXTRA}
            want_n = {("pol", "127.0.33.1", 80): P2N}

            async def both_tasks() -> list[str]:
                got_p, got_n = owners(await raw.polaris(ns_a)), owners(await raw.nacos(ns_a))
                return ([f"polaris copies {got_p} != {want_p}"] if got_p != want_p else []) + (
                    [f"nacos copies {got_n} != {want_n}"] if got_n != want_n else [])

            await converge(both_tasks, 60.0, "copies of all three tasks")
            await asyncio.sleep(1.0)  # Nacos's read cache
            p_recs, n_recs, nb_recs = await raw.polaris(ns_a), await raw.nacos(ns_a), await raw.nacos(ns_b)
            kept_p = {k: polaris_view(r) for k, r in p_recs.items() if want_p.get(k) != EXTRA}  # N2P copies, native
            kept_n = {k: nacos_view(r) for k, r in n_recs.items()}  # natives and the P2N copy
            kept_nb = {k: nacos_view(r) for k, r in nb_recs.items()}  # the extra task's source natives

            without = clone(both)
            without["tasks"] = [t for t in without["tasks"] if t["name"] != EXTRA]
            child.write_config(without)
            t0 = time.monotonic()
            gone_at: float | None = None
            while time.monotonic() - t0 < 20.0:
                p_now, n_now, nb_now = await asyncio.gather(raw.polaris(ns_a), raw.nacos(ns_a), raw.nacos(ns_b))
                for where, kept, now, view in (("polaris", kept_p, p_now, polaris_view),
                                               ("nacos", kept_n, n_now, nacos_view),
                                               ("nacos source", kept_nb, nb_now, nacos_view)):
                    for k, v in kept.items():
                        assert k in now, f"{where} {k} disappeared when another task was removed"
                        assert view(now[k]) == v, f"{where} {k} changed when another task was removed: {now[k]}"
                left = [k for k, owner in owners(p_now).items() if owner == EXTRA]
                if gone_at is None and not left:
                    gone_at = time.monotonic() - t0
                if gone_at is not None and time.monotonic() - t0 > gone_at + 3.0:
                    break  # gone, and the rest stayed as it was for 3 s more
                await asyncio.sleep(0.2)
            assert gone_at is not None, f"the removed task's copies are still there: {left}"
            report["cleaned up after (s)"] = round(gone_at, 2)
            assert gone_at < 10.0, report
            assert child.alive()
            applied = [r for r in child.log_records() if r.get("msg") == "config applied"]
            assert applied and applied[-1]["changes"]["removed"] == [EXTRA], applied
            assert sorted(applied[-1]["changes"]["kept"]) == sorted([N2P, P2N]), applied
        finally:
            await asyncio.gather(*(s.close() for s in sides.values()), p.close(), raw.close())

    asyncio.run(scenario())
    print(f"task removal: {report}")


# ---- a bad config -----------------------------------------------------------------------------
def check(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="300")
    return subprocess.run([sys.executable, "-m", "syncworker.cli", "check", "-c", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)


def bad_configs(good: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    """name -> (file text, what the refusal must name)."""
    unknown = clone(good)
    unknown["tasks"][0]["source"]["type"] = "nosuch"
    duplicate = clone(good)
    duplicate["tasks"][1]["name"] = duplicate["tasks"][0]["name"]
    empty = clone(good)
    empty["tasks"][1]["destination"]["addresses"] = []
    every = clone(good)
    every["tasks"][0]["source"]["type"] = "nosuch"
    every["tasks"][1]["name"] = every["tasks"][0]["name"]
    every["tasks"][1]["destination"]["addresses"] = []
    text = json.dumps(good, indent=1)
    return {
        "invalid JSON": (text[: len(text) // 2], ["invalid JSON"]),
        "unknown type": (json.dumps(unknown, indent=1), ["tasks[0].source.type", "unknown type 'nosuch'"]),
        "duplicate task name": (json.dumps(duplicate, indent=1), ["tasks[1].name", "duplicate task name"]),
        "empty addresses": (json.dumps(empty, indent=1), ["tasks[1].destination.addresses"]),
        "all at once": (json.dumps(every, indent=1),
                        ["tasks[0].source.type", "tasks[1].name", "tasks[1].destination.addresses"]),
    }


def test_bad_config_refused_running_config_stays(nacos: sandbox_base.Running, polaris: sandbox_base.Running,
                                                 start_sync: StartSync, tmp_path: Path) -> None:
    ns = fresh_namespace("badcfg")
    n_ep, p_ep = nacos_endpoint(nacos), polaris_endpoint(polaris)
    good = two_way(n_ep, p_ep, ns, pull="5s")
    cases = bad_configs(good)

    # `syncworker check`: exit 2, every problem named by its path
    ok = tmp_path / "good.json"
    ok.write_text(json.dumps(good))
    assert check(ok).returncode == 0
    for name, (text, named) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.json"
        path.write_text(text)
        res = check(path)
        out = " ".join((res.stdout + res.stderr).split())
        assert res.returncode == 2, (name, res.returncode, out)
        for needle in named:
            assert needle in out, f"{name}: {needle!r} not named in: {out}"
    assert "3 problem(s)" in " ".join((check(path).stderr).split())

    async def scenario() -> None:
        n = await Side(NACOS, n_ep, ns, P2N).open()
        p = await Side(POLARIS, p_ep, ns, N2P).open()
        raw = RawReader(nacos, polaris)

        async def copied(side: str, service: str, native: model.Instance) -> None:
            async def look() -> list[str]:
                recs = await (raw.polaris(ns) if side == POLARIS else raw.nacos(ns))
                rec = recs.get((service, native.host, native.port))
                return [] if rec and marks.is_copy(rec["metadata"]) else [f"no copy of {native} in {side}"]

            await converge(look, 30.0, f"copy in {side}")

        try:
            await n.put("before", inst("127.0.41.1", 80))
            child = start_sync(good)
            await copied(POLARIS, "before", inst("127.0.41.1", 80))
            backup = Path(f"{child.config_path}.last-good")
            saved = backup.read_text()

            def refusals() -> list[dict[str, Any]]:
                return [r for r in child.log_records() if str(r.get("msg", "")).startswith("config change refused")]

            for count, name in enumerate(("invalid JSON", "all at once"), 1):
                child.write_config(cases[name][0])

                async def refused(count: int = count) -> list[str]:
                    got = len(refusals())
                    return [] if got >= count else [f"{got} refusal(s) logged, want {count}"]

                await converge(refused, 15.0, f"refusal of the {name} file")
                assert child.alive(), child.log_tail()
            logged = refusals()
            problems = " ".join(logged[-1]["problems"])
            for needle in cases["all at once"][1]:
                assert needle in problems, (needle, logged[-1])
            assert backup.read_text() == saved  # the last good config is still the backup

            # the old config still runs, both ways
            await asyncio.gather(n.put("after", inst("127.0.41.2", 80)), p.put("after", inst("127.0.42.1", 80)))
            await copied(POLARIS, "after", inst("127.0.41.2", 80))
            await copied(NACOS, "after", inst("127.0.42.1", 80))
            assert child.alive()
            rows = child.status() or []
            assert {r["task"] for r in rows} == {N2P, P2N}, rows
        finally:
            await asyncio.gather(n.close(), p.close(), raw.close())

    asyncio.run(scenario())

