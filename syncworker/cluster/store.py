"""Everything cluster mode shares, in Redis, behind one class.

Keys (all under the settings' `redis_prefix`, `P` below):

    P:config            hash text/version/digest: the config pushed with `syncworker config push`
    P:applied           hash text/version/digest/leader: the config the leader runs (workers read it)
    P:leader            the leader's identity (host:pid), renewed by the leader with a TTL
    P:alive:<id>        a live worker or scheduler (JSON info), renewed with a TTL
    P:units:<task>      hash unit key -> reference: the units the leader discovered for a task
    P:state             hash unit key -> JSON: the unit's state between runs and its last result
    P:lock:<unit>       the unit's lock: "<token>|<holder>", SET NX PX, renewed, released by compare-and-delete
    P:rerun:<unit>      a mark that came while the unit ran: its holder runs it once more
    P:queued            hash unit key -> {due, at, worker, ref}: dispatched, not started (coalescing)
    P:running           hash unit key -> {worker, started, ref}: started, not finished
    P:runs              stream of finished runs {unit, worker, start, end, outcome} (capped)
    P:lease:<duty>      a duty's lease {owner, token}, SET NX PX, renewed by its holder
    P:duty-sent:<duty>  a duty dispatch not yet picked up (keeps the leader from sending it twice)
    P:bucket:<task>     a task's write rate limit, one token bucket for the whole cluster
    P:cleanup           hash task -> its old config and units: a cleanup the leader still owes

Every compare-and-set is a Lua script, so two processes never interleave inside one.
Redis may be shared by several clusters: they differ by prefix. The config texts
hold the endpoints' credentials (workers need them), so Redis must be private to
the cluster; nothing here logs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from syncworker.cluster import codec
from syncworker.config import loader, models
from syncworker.config import settings as settings_mod
from syncworker.reconcile import unit as unit_mod

Json = dict[str, Any]

#: a finished-runs stream keeps about this many entries
RUNS_KEPT = 20000
#: a rerun flag outlives any run; it only bounds garbage from a holder that died
RERUN_TTL_MS = 3_600_000

#: KEYS lock, rerun[, queued, running]; ARGV value, ttl, rerun ttl[, unit, running entry]. With a run's
#: keys, the job leaves the queued set and (when it got the lock) enters the running set in the same step as
#: the lock, so a worker killed at any point leaves either its queued entry or its running entry behind for
#: the leader's sweep (a lock held with neither would strand the unit until its next pull).
_ACQUIRE_OR_DEFER = """
local got = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if #KEYS > 2 then redis.call('HDEL', KEYS[3], ARGV[4]) end
if got then
  if #KEYS > 2 then redis.call('HSET', KEYS[4], ARGV[4], ARGV[5]) end
  return {1, '', 0}
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if #KEYS > 2 then
  local cur = redis.call('HGET', KEYS[3], ARGV[2])
  if cur and cjson.decode(cur)['token'] == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[2]) end
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, 0} end
redis.call('DEL', KEYS[1])
if #KEYS > 1 and redis.call('GETDEL', KEYS[2]) then return {1, 1} end
return {1, 0}
"""
_QUEUE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cjson.decode(cur)['due']) <= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
_RECEIVED = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
local d = cjson.decode(cur)
d['worker'] = ARGV[2]
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(d))
return 1
"""
_TAKE = """
local rate, cap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(b[1]) or cap
local stamp = tonumber(b[2]) or now
tokens = math.min(cap, tokens + (now - stamp) * rate)
local need = math.min(n, cap)
local wait = 0
if tokens >= need then tokens = tokens - n else wait = (need - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
return tostring(wait)
"""


@dataclasses.dataclass(frozen=True)
class StoredConfig:
    text: str
    version: int
    digest: str
    leader: str = ""


@dataclasses.dataclass(frozen=True)
class Lock:
    """A held unit lock; `value` proves ownership to renew and release."""

    key: str
    value: str


@dataclasses.dataclass(frozen=True)
class Busy:
    """The lock is held: a rerun was flagged for its holder."""

    holder: str
    ttl: float


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class Store:
    def __init__(self, client: redis.Redis, prefix: str = "syncworker") -> None:
        self.r = client
        self.prefix = prefix
        self._acquire = client.register_script(_ACQUIRE_OR_DEFER)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._queue = client.register_script(_QUEUE)
        self._received = client.register_script(_RECEIVED)
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(cls, url: str, prefix: str = "syncworker") -> Store:
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5,
                                      health_check_interval=30, retry_on_timeout=True)
        return cls(client, prefix)

    @classmethod
    def from_settings(cls, st: settings_mod.Settings | None = None) -> Store:
        st = st or settings_mod.Settings()
        return cls.from_url(st.redis_url.get_secret_value(), st.redis_prefix)

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ---- config ------------------------------------------------------------------------
    def push_config(self, text: str, name: str = "<pushed>") -> int:
        """Validate as a whole (raises ConfigError listing every problem) and store; the old one stays on error."""
        loader.load_text(text, name)
        return self._put_config(self.k("config"), text)

    def pushed_config(self) -> StoredConfig | None:
        return self._get_config(self.k("config"))

    def pushed_version(self) -> int:
        return int(self.r.hget(self.k("config"), "version") or 0)

    def publish_applied(self, text: str, leader: str) -> int:
        """What the leader runs from now on; workers load it by version."""
        return self._put_config(self.k("applied"), text, leader=leader)

    def applied_config(self) -> StoredConfig | None:
        return self._get_config(self.k("applied"))

    def applied_version(self) -> int:
        return int(self.r.hget(self.k("applied"), "version") or 0)

    def _put_config(self, key: str, text: str, **extra: str) -> int:
        with self.r.pipeline() as p:
            p.hincrby(key, "version", 1)
            p.hset(key, mapping={"text": text, "digest": digest(text), "at": str(time.time()), **extra})
            version, _ = p.execute()
        return int(version)

    def _get_config(self, key: str) -> StoredConfig | None:
        d = self.r.hgetall(key)
        if not d.get("text"):
            return None
        return StoredConfig(d["text"], int(d.get("version", 0)), d.get("digest", ""), d.get("leader", ""))

    # ---- leader and liveness -----------------------------------------------------------
    def set_leader(self, identity: str, ttl: float) -> None:
        self.r.set(self.k("leader"), identity, px=_ms(ttl))

    def leader(self) -> str | None:
        value: str | None = self.r.get(self.k("leader"))
        return value

    def drop_leader(self, identity: str) -> None:
        self._release(keys=[self.k("leader")], args=[identity])

    def say_alive(self, identity: str, ttl: float, **info: object) -> None:
        self.r.set(self.k("alive", identity), json.dumps({"at": time.time(), **info}), px=_ms(ttl))

    def alive(self, identity: str) -> bool:
        return bool(identity) and bool(self.r.exists(self.k("alive", identity)))

    def members(self) -> dict[str, Json]:
        """Every live worker and scheduler with what it said about itself."""
        out: dict[str, Json] = {}
        prefix = self.k("alive", "")
        for key in self.r.scan_iter(match=prefix + "*", count=500):
            raw = self.r.get(key)
            if raw:
                out[key[len(prefix):]] = json.loads(raw)
        return out

    # ---- unit locks --------------------------------------------------------------------
    def lock_or_flag_rerun(self, unit: str, holder: str, ttl: float) -> Lock | Busy:
        """Take the unit's lock, or, when another holds it, flag a rerun for that holder (atomically)."""
        value = f"{secrets.token_hex(8)}|{holder}"
        got, current, pttl = self._acquire(keys=[self.k("lock", unit), self.k("rerun", unit)],
                                           args=[value, _ms(ttl), RERUN_TTL_MS])
        if got:
            return Lock(unit, value)
        return Busy(str(current).partition("|")[2], max(0, int(pttl)) / 1000)

    def start_run(self, ref: Mapping[str, Any], holder: str, ttl: float) -> Lock | Busy:
        """A job starts: as `lock_or_flag_rerun`, and in the same step its queued entry goes and, when it got
        the lock, its running entry is written."""
        unit = codec.key_of(ref)
        value = f"{secrets.token_hex(8)}|{holder}"
        entry = json.dumps({"worker": holder, "started": time.time(), "ref": dict(ref), "token": value})
        got, current, pttl = self._acquire(
            keys=[self.k("lock", unit), self.k("rerun", unit), self.k("queued"), self.k("running")],
            args=[value, _ms(ttl), RERUN_TTL_MS, unit, entry])
        if got:
            return Lock(unit, value)
        return Busy(str(current).partition("|")[2], max(0, int(pttl)) / 1000)

    def finish_run(self, lock: Lock) -> bool:
        """A job ends: its running entry (if still its own) goes and its lock is released in one step; True
        when a rerun was flagged meanwhile (it is consumed)."""
        _, rerun = self._release(keys=[self.k("lock", lock.key), self.k("rerun", lock.key), self.k("running")],
                                 args=[lock.value, lock.key])
        return bool(rerun)

    def try_lock(self, unit: str, holder: str, ttl: float) -> Lock | None:
        """Take the unit's lock if free; flags nothing."""
        value = f"{secrets.token_hex(8)}|{holder}"
        return Lock(unit, value) if self.r.set(self.k("lock", unit), value, nx=True, px=_ms(ttl)) else None

    def renew_lock(self, lock: Lock, ttl: float) -> bool:
        return bool(self._renew(keys=[self.k("lock", lock.key)], args=[lock.value, _ms(ttl)]))

    def release_lock(self, lock: Lock) -> bool:
        """Release (only if still ours); True when a rerun was flagged meanwhile (it is consumed)."""
        _, rerun = self._release(keys=[self.k("lock", lock.key), self.k("rerun", lock.key)], args=[lock.value])
        return bool(rerun)

    def lock_holder(self, unit: str) -> str | None:
        value = self.r.get(self.k("lock", unit))
        return str(value).partition("|")[2] if value else None

    # ---- dispatch bookkeeping ----------------------------------------------------------
    def queue(self, ref: Mapping[str, Any], due: float) -> bool:
        """Record a dispatch; False when one due no later is already queued (the mark coalesces)."""
        entry = json.dumps({"due": due, "at": time.time(), "worker": "", "ref": dict(ref)})
        return bool(self._queue(keys=[self.k("queued")], args=[codec.key_of(ref), repr(due), entry]))

    def received(self, unit: str, worker: str) -> None:
        """A worker took the message (maybe holding it until its countdown)."""
        self._received(keys=[self.k("queued")], args=[unit, worker])

    def dequeue(self, unit: str) -> None:
        self.r.hdel(self.k("queued"), unit)

    def queued(self) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.k("queued")).items()}

    def broker_backlog(self) -> int:
        """Messages waiting in this cluster's Celery queue (kombu's Redis lists, one per priority step)."""
        names = [self.prefix, *(f"{self.prefix}\x06\x16{step}" for step in (3, 6, 9))]
        with self.r.pipeline(transaction=False) as p:
            for name in names:
                p.llen(name)
            return sum(int(n) for n in p.execute())

    def set_running(self, ref: Mapping[str, Any], worker: str) -> None:
        self.r.hset(self.k("running"), codec.key_of(ref),
                    json.dumps({"worker": worker, "started": time.time(), "ref": dict(ref)}))

    def clear_running(self, unit: str) -> None:
        self.r.hdel(self.k("running"), unit)

    def running(self) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.k("running")).items()}

    def record_run(self, unit: str, worker: str, start: float, end: float, outcome: str) -> None:
        self.r.xadd(self.k("runs"), {"unit": unit, "worker": worker, "start": repr(start), "end": repr(end),
                                     "outcome": outcome}, maxlen=RUNS_KEPT, approximate=True)

    def runs(self, count: int = RUNS_KEPT) -> list[Json]:
        out = []
        for _, fields in self.r.xrange(self.k("runs"), count=count):
            out.append({**fields, "start": float(fields["start"]), "end": float(fields["end"])})
        return out

    # ---- units and their state ---------------------------------------------------------
    def set_units(self, task: str, refs: Iterable[Mapping[str, Any]]) -> None:
        """Replace the task's unit list."""
        mapping = {codec.key_of(r): json.dumps(dict(r)) for r in refs}
        with self.r.pipeline() as p:
            p.delete(self.k("units", task))
            if mapping:
                p.hset(self.k("units", task), mapping=mapping)
            p.execute()

    def add_units(self, task: str, refs: Iterable[Mapping[str, Any]]) -> None:
        mapping = {codec.key_of(r): json.dumps(dict(r)) for r in refs}
        if mapping:
            self.r.hset(self.k("units", task), mapping=mapping)

    def units(self, task: str) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.k("units", task)).items()}

    def drop_units(self, task: str, keys: Iterable[str] | None = None) -> None:
        if keys is None:
            self.r.delete(self.k("units", task))
            return
        keys = list(keys)
        if keys:
            self.r.hdel(self.k("units", task), *keys)

    def load_state(self, unit: str) -> unit_mod.UnitState | None:
        raw = self.r.hget(self.k("state"), unit)
        return codec.state_from_json(json.loads(raw)["state"]) if raw else None

    def save_state(self, unit: str, state: unit_mod.UnitState, **info: object) -> None:
        """The unit's state and its last result (`info`: task, service, destination, worker...)."""
        doc = {"state": codec.state_to_json(state), "updated": time.time(), **info}
        self.r.hset(self.k("state"), unit, json.dumps(doc, default=str))

    def unit_docs(self) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.k("state")).items()}

    def drop_states(self, units: Iterable[str]) -> None:
        units = list(units)
        if units:
            self.r.hdel(self.k("state"), *units)

    # ---- duty leases -------------------------------------------------------------------
    def acquire_lease(self, duty: str, owner: str, ttl: float) -> Lock | None:
        value = json.dumps({"owner": owner, "token": secrets.token_hex(8), "since": time.time()})
        return Lock(duty, value) if self.r.set(self.k("lease", duty), value, nx=True, px=_ms(ttl)) else None

    def renew_lease(self, lease: Lock, ttl: float) -> bool:
        return bool(self._renew(keys=[self.k("lease", lease.key)], args=[lease.value, _ms(ttl)]))

    def release_lease(self, lease: Lock) -> None:
        self._release(keys=[self.k("lease", lease.key)], args=[lease.value])

    def lease(self, duty: str) -> Json | None:
        raw = self.r.get(self.k("lease", duty))
        return json.loads(raw) if raw else None

    def leases(self) -> dict[str, Json]:
        out: dict[str, Json] = {}
        prefix = self.k("lease", "")
        for key in self.r.scan_iter(match=prefix + "*", count=500):
            raw = self.r.get(key)
            if raw:
                out[key[len(prefix):]] = json.loads(raw)
        return out

    def drop_lease(self, duty: str) -> None:
        """Take a duty away from its holder (its next renewal fails and it stops)."""
        self.r.delete(self.k("lease", duty))

    def duty_sent(self, duty: str, ttl: float) -> bool:
        """Note a duty dispatch; False when one was sent less than `ttl` ago."""
        return bool(self.r.set(self.k("duty-sent", duty), "1", nx=True, px=_ms(ttl)))

    def duty_started(self, duty: str) -> None:
        self.r.delete(self.k("duty-sent", duty))

    # ---- rate limit --------------------------------------------------------------------
    def take_tokens(self, task: str, n: int, rate: float) -> float:
        """Take `n` write tokens from the task's cluster-wide bucket; seconds to wait first (0: go)."""
        if rate <= 0 or n <= 0:
            return 0.0
        return float(self._take(keys=[self.k("bucket", task)], args=[repr(rate), repr(max(rate, 1.0)), n]))

    # ---- cleanups of removed or changed tasks ------------------------------------------
    def add_cleanup(self, task: str, config_text: str, refs: Iterable[Mapping[str, Any]]) -> None:
        """Note, before the new config is published, what a removed or changed task ran (its old
        config and units), so the copies it owned are cleaned up even if the leader dies meanwhile."""
        self.r.hset(self.k("cleanup"), task, json.dumps({"config": config_text, "units": [dict(r) for r in refs],
                                                         "at": time.time()}))

    def cleanups(self) -> dict[str, Json]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.k("cleanup")).items()}

    def cleanup_done(self, task: str) -> None:
        self.r.hdel(self.k("cleanup"), task)

    # ---- housekeeping ------------------------------------------------------------------
    def forget_task(self, task: str, units: Iterable[str]) -> None:
        """Drop what the store keeps for a removed task's units."""
        units = list(units)
        self.drop_states(units)
        if units:
            self.r.hdel(self.k("queued"), *units)
        self.drop_units(task)

    def status_rows(self) -> list[dict[str, object]]:
        """Every unit of the applied config with its last result (the rows of /status)."""
        applied = self.applied_config()
        if applied is None:
            return []
        try:
            config = loader.load_text(applied.text, "<applied>")
        except Exception:
            return []
        docs = self.unit_docs()
        rows: list[dict[str, object]] = []
        for task in sorted(t.name for t in config.enabled_tasks()):
            for key, ref in sorted(self.units(task).items()):
                doc = docs.get(key)
                state = codec.state_from_json(doc["state"]) if doc else unit_mod.UnitState()
                rows.append(codec.status_row(
                    task, str(codec.service_of(ref)), str((doc or {}).get("destination", "")), state,
                    unit=key, worker=(doc or {}).get("worker", "")))
        return rows

    def flush(self) -> None:
        """Delete every key under this prefix (tests)."""
        for key in self.r.scan_iter(match=self.k("*"), count=1000):
            self.r.delete(key)


def parse_applied(stored: StoredConfig) -> models.RegistryConfig:
    return loader.load_text(stored.text, f"<applied v{stored.version}>")
