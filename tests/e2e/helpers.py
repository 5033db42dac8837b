"""Shared pieces of the acceptance tests: the `syncworker run` child, configs, natives, reads, checks.

The sync under test always runs as a child process (`python -m syncworker.cli run -c FILE
--no-live`, as `benchmarks.common.ChildRun` runs it) with its /status endpoint on a port
from the peer pool's allocator. The tests write natives straight into the registries
through the connectors (no marks: an application registering itself), and read both
registries to check what the child did. Every wait polls against a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from benchmarks import common
from syncworker import marks, model
from syncworker.connectors import base, registry
from syncworker.connectors import nacos as nacos_mod
from syncworker.reconcile import planner
from syncworker.sandbox import base as sandbox_base

#: endpoint and task names as in conf/sync-registry.json
NACOS = "nacos1"
POLARIS = "polaris1"
N2P = "nacos-to-polaris"
P2N = "polaris-to-nacos"
#: Nacos natives written by the tests are ephemeral (as SDKs register them) and stay
#: healthy this long without a heartbeat, so no test has to beat them
NATIVE_TTL = 3600

#: service name -> the records read from one namespace
Snapshot = dict[str, list[model.Instance]]
#: service name -> address -> a native as the test wrote it
Natives = dict[str, dict[model.Address, model.Instance]]


def fresh_namespace(prefix: str) -> str:
    return f"e2e-{prefix}-{uuid.uuid4().hex[:8]}"


def env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


# ---- configs -------------------------------------------------------------------------------
def nacos_endpoint(running: sandbox_base.Running, name: str = NACOS, **options: Any) -> dict[str, Any]:
    ep = common.endpoint(name, "nacos", running)
    if options:
        ep["options"] = dict(options)
    return ep


def polaris_endpoint(running: sandbox_base.Running, name: str = POLARIS, **options: Any) -> dict[str, Any]:
    ep = common.endpoint(name, "polaris", running)
    # both ports, as polaris-sync's files list them (the gRPC one is ignored)
    ep["addresses"] = [running.endpoints["http"], f"grpc://{running.endpoints['grpc']}"]
    if options:
        ep["options"] = dict(options)
    return ep


def task(name: str, source: dict[str, Any], destination: dict[str, Any], namespace: str, *,
         service: str = "*", safety: Mapping[str, Any] | None = None,
         match: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One task on one namespace (`match` adds to its match entry: dest_namespace, metadata...)."""
    out: dict[str, Any] = {"name": name, "enable": True, "source": source, "destination": destination,
                           "match": [{"namespace": namespace, "service": service, **(match or {})}]}
    if safety:
        out["safety"] = dict(safety)
    return out


def registry_config(tasks: Iterable[dict[str, Any]], *, pull: str = "5s") -> dict[str, Any]:
    return {"tasks": list(tasks),
            "methods": [{"type": "watch", "enable": True}, {"type": "pull", "enable": True, "interval": pull}],
            "health_check": {"enable": True}}


def two_way(nacos_ep: dict[str, Any], polaris_ep: dict[str, Any], namespace: str, *, pull: str = "5s",
            safety: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """conf/sync-registry.json's two tasks, on one namespace (every service)."""
    return registry_config([task(N2P, nacos_ep, polaris_ep, namespace, safety=safety),
                            task(P2N, polaris_ep, nacos_ep, namespace, safety=safety)], pull=pull)


# ---- the child process ---------------------------------------------------------------------
class SyncChild:
    """`syncworker run -c FILE --no-live` in a child process, with its /status endpoint and log."""

    def __init__(self, workdir: Path, config: dict[str, Any] | str, status_port: int) -> None:
        self.workdir = workdir
        self.config_path = workdir / "sync-registry.json"
        self.log_path = workdir / "syncworker.log"
        self.port = status_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(config)
        self.start()

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replace the config file atomically (the child reloads it within a second)."""
        text = config if isinstance(config, str) else json.dumps(config, indent=1)
        tmp = self.config_path.with_name(".sync-registry.json.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "the child is still running"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SYNCWORKER_", "POLARIS_SYNC_")) or k.startswith("SYNCWORKER_PEER_")}
        env.update(SYNCWORKER_STATUS_PORT=str(self.port), SYNCWORKER_LOG_LEVEL="INFO",
                   SYNCWORKER_LOG_FORMAT="json", SYNCWORKER_REPORT_FILE=str(self.workdir / "report.jsonl"))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "syncworker.cli", "run", "-c", str(self.config_path), "--no-live"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(self.workdir))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> list[dict[str, Any]] | None:
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.port}/status", timeout=2)
            rows: list[dict[str, Any]] = resp.json()
            return rows
        except (httpx.HTTPError, ValueError):
            return None

    def wait_up(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"syncworker run exited with {self.proc and self.proc.returncode}:\n"
                                     f"{self.log_tail()}")
            rows = self.status()
            if rows is not None:
                return rows
            time.sleep(0.1)
        raise AssertionError(f"syncworker run served no /status within {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing runs on the way out."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def rows_of(rows: Iterable[Mapping[str, Any]], task_name: str, namespace: str, service: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["task"] == task_name and r["service"] == f"{namespace}/{service}"]


def total_ops(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for r in rows:
        out.update({k: int(v) for k, v in dict(r["ops"]).items()})
    return dict(out)


# ---- one registry as the tests see it ------------------------------------------------------
class Side:
    """A registry: where natives are written (no marks) and whose namespace is read whole."""

    def __init__(self, name: str, endpoint: Mapping[str, Any], namespace: str, task_in: str) -> None:
        options = dict(endpoint.get("options") or {})
        if endpoint["type"] == "nacos":
            options.update(ephemeral_unhealthy_after=NATIVE_TTL, ephemeral_delete_after=NATIVE_TTL)
        self.name = name
        self.namespace = namespace
        #: the task that writes copies into this registry
        self.task_in = task_in
        self.conn = registry.create(base.Endpoint(
            name=name, type=endpoint["type"], addresses=tuple(endpoint["addresses"]),
            token=endpoint.get("token", ""), user=endpoint.get("user", ""), password=endpoint.get("password", ""),
            options=options))

    async def open(self) -> Side:
        await self.conn.open()
        return self

    async def close(self) -> None:
        await self.conn.close()

    def key(self, service: str) -> model.ServiceKey:
        return model.ServiceKey(self.namespace, "", service)

    async def listing(self, service: str) -> list[model.Instance]:
        return list((await self.conn.list_instances(self.key(service))).instances)

    async def _apply(self, service: str, make: Callable[[dict[model.Address, model.Instance]], planner.Plan],
                     what: str) -> None:
        last: list[base.Outcome] = []
        for attempt in range(8):
            current = {i.address: i for i in await self.listing(service)}
            p = make(current)
            last = await self.conn.apply(self.key(service), p, base.ApplyContext(task="e2e-natives"))
            if all(o.ok for o in last):
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError(f"{self.name}: {what} in {service} failed: {last}")

    async def put(self, service: str, inst: model.Instance) -> None:
        """Register or change a native (an application's own record: no marks)."""
        assert not marks.is_copy(inst.metadata)

        def make(current: dict[model.Address, model.Instance]) -> planner.Plan:
            old = current.get(inst.address)
            if old is None:
                return planner.Plan(creates=(inst,))
            return planner.Plan(updates=(planner.Update(old, inst.replace(native_id=old.native_id)),))

        await self._apply(service, make, f"put {inst.host}:{inst.port}")

    async def remove(self, service: str, inst: model.Instance) -> None:
        """Deregister a native (through the connector: Polaris 1.18 needs its touch before a delete)."""
        await self._apply(service, lambda cur: planner.Plan(deletes=(cur.get(inst.address, inst),)),
                          f"remove {inst.host}:{inst.port}")

    async def snapshot(self) -> Snapshot:
        services = [s for s in await self.conn.list_services(self.namespace) if not s.group]
        listings = await asyncio.gather(*(self.conn.list_instances(s) for s in services))
        return {s.name: list(li.instances) for s, li in zip(services, listings, strict=True) if li.instances}


def natives_of(snap: Snapshot) -> Snapshot:
    return {s: [i for i in recs if not marks.is_copy(i.metadata)] for s, recs in snap.items()}


def copies_of(snap: Snapshot) -> Snapshot:
    return {s: [i for i in recs if marks.is_copy(i.metadata)] for s, recs in snap.items()}


def expected_copy(dest: Side, native: model.Instance, origin: str) -> model.Instance:
    """The copy of `native` that `dest.task_in` must keep in `dest`, as `dest` stores it."""
    return dest.conn.representable(marks.stamp(native.replace(native_id=""), dest.task_in, origin))


def norm(inst: model.Instance) -> tuple[object, ...]:
    """A native's fields as written (Nacos adds its liveness keys to an ephemeral record's metadata)."""
    meta = tuple(sorted((k, v) for k, v in inst.metadata.items() if k not in nacos_mod.LIVENESS_KEYS))
    return (inst.host, inst.port, round(inst.weight, 4), inst.healthy, inst.enabled, meta, inst.cluster)


def registry_problems(side: Side, snap: Snapshot, other: Side, other_snap: Snapshot,
                      natives: Natives | None = None) -> list[str]:
    """Everything that keeps `side` from holding exactly its natives plus copies of `other`'s natives."""
    out: list[str] = []
    for svc, recs in sorted(snap.items()):
        for addr, n in collections.Counter(r.address for r in recs).items():
            if n > 1:
                out.append(f"{side.name} {svc}: {n} records at {addr[0]}:{addr[1]}")
        for r in recs:
            origin = marks.origin(r.metadata)
            if origin is None:
                continue
            where = f"{side.name} {svc} {r.host}:{r.port}"
            if origin == side.name:
                out.append(f"{where}: a record marked as coming from this very registry (a copy went home)")
            elif origin != other.name:
                out.append(f"{where}: a copy whose origin is {origin!r}, not {other.name!r}")
            elif marks.owner(r.metadata) != side.task_in:
                out.append(f"{where}: a copy owned by {marks.owner(r.metadata)!r}, not {side.task_in!r}")
    if natives is not None:
        have = {(s, r.address): r for s, recs in snap.items() for r in recs if not marks.is_copy(r.metadata)}
        want = {(s, a): i for s, m in natives.items() for a, i in m.items()}
        for k in sorted(want.keys() - have.keys()):
            out.append(f"{side.name} {k[0]}: native {k[1]} missing")
        for k in sorted(have.keys() - want.keys()):
            out.append(f"{side.name} {k[0]}: unexpected native {k[1]}: {have[k]}")
        for k in sorted(want.keys() & have.keys()):
            if norm(have[k]) != norm(want[k]):
                out.append(f"{side.name} {k[0]}: native {k[1]} is {norm(have[k])}, written as {norm(want[k])}")
    want_c = {(s, r.address): expected_copy(side, r, other.name)
              for s, recs in other_snap.items() for r in recs if not marks.is_copy(r.metadata)}
    have_c = {(s, r.address): r for s, recs in snap.items() for r in recs if marks.is_copy(r.metadata)}
    for k in sorted(want_c.keys() - have_c.keys()):
        out.append(f"{side.name} {k[0]}: copy of {other.name} native {k[1]} missing")
    for k in sorted(have_c.keys() - want_c.keys()):
        out.append(f"{side.name} {k[0]}: copy {k[1]} has no native in {other.name}")
    for k in sorted(want_c.keys() & have_c.keys()):
        if have_c[k] != want_c[k]:
            out.append(f"{side.name} {k[0]}: copy {k[1]} is {have_c[k]}, want {want_c[k]}")
    return out


async def two_way_problems(nacos: Side, polaris: Side, natives: Mapping[str, Natives] | None = None) -> list[str]:
    """Problems on both sides, from one read of each (natives: side name -> what the test wrote)."""
    n_snap, p_snap = await asyncio.gather(nacos.snapshot(), polaris.snapshot())
    models = natives or {}
    return (registry_problems(nacos, n_snap, polaris, p_snap, models.get(nacos.name))
            + registry_problems(polaris, p_snap, nacos, n_snap, models.get(polaris.name)))


# ---- waiting -------------------------------------------------------------------------------
async def converge(check: Callable[[], Awaitable[list[str]]], timeout: float, what: str,
                   interval: float = 0.2) -> float:
    """Poll `check` (a list of problems) until it is empty; seconds taken. Fails with the last problems."""
    t0 = time.monotonic()
    problems: list[str] = []
    while True:
        try:
            problems = await check()
        except Exception as exc:  # a read failing now and then (a peer restarting) is one more poll
            problems = [f"check failed: {type(exc).__name__}: {exc}"]
        if not problems:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            shown = "\n  ".join(problems[:25])
            raise AssertionError(f"{what}: not within {timeout:.0f}s; {len(problems)} problem(s):\n  {shown}")
        await asyncio.sleep(interval)


# ---- raw whole-namespace reads (one request per registry, for polling every 100 ms) ----------
RecordKey = tuple[str, str, int]  # service, host, port


class RawReader:
    """Every record of a namespace in one request: Nacos's catalog with instances, Polaris's console list."""

    def __init__(self, nacos: sandbox_base.Running | None = None, polaris: sandbox_base.Running | None = None
                 ) -> None:
        self.nacos_base = nacos_mod.parse_address(nacos.endpoints["http"]).base if nacos else ""
        self.polaris_base = polaris.endpoints["http"].rstrip("/") if polaris else ""
        token = polaris.credentials.get("token", "") if polaris else ""
        self.client = httpx.AsyncClient(timeout=5.0, trust_env=False,
                                        headers={"X-Polaris-Token": token} if token else {})

    async def close(self) -> None:
        await self.client.aclose()

    async def nacos(self, namespace: str) -> dict[RecordKey, dict[str, Any]]:
        out: dict[RecordKey, dict[str, Any]] = {}
        page = 1
        while True:
            resp = await self.client.get(f"{self.nacos_base}/v3/admin/ns/service/list", params={
                "namespaceId": namespace, "withInstances": "true", "pageNo": page, "pageSize": 100})
            resp.raise_for_status()
            data = resp.json()["data"]
            items = data.get("pageItems") or []
            for item in items:
                if item.get("groupName") != "DEFAULT_GROUP":
                    continue
                for rec in nacos_mod._hosts_of(item):
                    out[(str(item["serviceName"]), str(rec["ip"]), int(rec["port"]))] = rec
            if not items or page * 100 >= int(data.get("totalCount") or 0):
                return out
            page += 1

    async def polaris(self, namespace: str) -> dict[RecordKey, dict[str, Any]]:
        out: dict[RecordKey, dict[str, Any]] = {}
        offset = 0
        while True:
            resp = await self.client.get(f"{self.polaris_base}/naming/v1/instances", params={
                "namespace": namespace, "offset": offset, "limit": 100})
            body = resp.json()
            if body.get("code") != 200000:
                raise RuntimeError(f"polaris list of {namespace}: {body.get('code')} {body.get('info')}")
            recs = body.get("instances") or []
            for rec in recs:
                out[(str(rec["service"]), str(rec["host"]), int(rec["port"]))] = rec
            offset += len(recs)
            if not recs or offset >= int(body.get("amount") or 0):
                return out


def polaris_view(rec: Mapping[str, Any]) -> tuple[object, ...]:
    """What no one but the record's writer may change in a Polaris record (any write renews the revision)."""
    return (rec.get("id"), rec["weight"], rec["healthy"], rec["isolate"], sorted(rec["metadata"].items()),
            rec.get("revision"), rec.get("mtime"))


def nacos_view(rec: Mapping[str, Any]) -> tuple[object, ...]:
    """What no one but the record's writer may change in a Nacos record."""
    return (rec["weight"], rec["healthy"], rec["enabled"], rec["ephemeral"], sorted(rec["metadata"].items()))


def copy_records(records: Mapping[RecordKey, Mapping[str, Any]]) -> dict[RecordKey, Mapping[str, Any]]:
    return {k: r for k, r in records.items() if marks.is_copy({str(a): str(b) for a, b in
                                                               (r.get("metadata") or {}).items()})}
