"""Nginx as a destination: one `upstream` block per unit in a file included inside `http {}`.

Files and options
-----------------
`options.upstreams_path` (or `addresses[0]` as `file:///etc/nginx/conf.d/sync-upstreams.conf`
or a plain path) is the file this connector rewrites; nginx's main config must
`include` it inside `http {}`. `options.conf_path` (`-c`), `options.prefix` (`-p`)
and `options.error_log` (`-e`) are passed to every `nginx` call when given, so that
`nginx -t` and `nginx -s reload` act on the running instance; `options.nginx` is the
binary (default: `nginx` on PATH or /usr/sbin/nginx); `options.reload` (default
true) can be turned off when something else reloads; `options.server_params`
(e.g. "max_fails=3 fail_timeout=10s") is appended to every `server` line;
`options.timeout` bounds each nginx call (default 30 s).

A write
-------
Under a lock (a thread lock in the process and `flock` on `.<file>.lock` across
processes) the file is read, this unit's block is re-rendered, the new file is
put in place atomically and checked with `nginx -t`. A render that fails the
check never stays: the previous file is put back, and the writes come back as
failed Outcomes (permanent) carrying nginx's own error text. When nginx blames a
line of the new render that holds a server this plan creates (a host name that
does not resolve, say), that one server is left out with a failed Outcome and
the rest is checked again, so one bad record does not hold back the others
(DESIGN: bad data skips the record and goes on). Only after a passing check is
nginx reloaded (`nginx -s reload`); a failed reload also puts the previous file
back (temporary error, retried), so the file never says what nginx does not run.
A render equal to the file does nothing (no reload).

Blocks and ownership
--------------------
Each block this connector writes is framed by marker comments::

    # syncworker task=T origin=O namespace=NS group=G service=NAME
    upstream default.orders {
        server 127.0.0.1:8080 weight=100; # syncworker {"enabled":true,...}
    }
    # syncworker end

(values are URL-quoted). Only blocks carrying this task's mark for this service
are changed; everything else in the file (hand-written upstreams and servers,
comments, other tasks' blocks) is kept byte for byte. A block name that is
already used by an upstream we do not own is a clash: the writes fail as a
permanent error and nothing is overwritten. The upstream name is
`ctx.upstream_name` when the config asks for one, else
`<namespace>.<name>[.<group>]` from the destination key (characters other than
letters, digits, `_`, `.`, `-` become `_`).

An empty upstream: nginx refuses an `upstream` with no servers, and a
`proxy_pass http://NAME` that names no upstream makes nginx resolve NAME as a
host and fail the check. So a unit whose copies are all gone has its block
removed when the config passes `nginx -t` without it (a removed task leaves
nothing behind), and otherwise keeps the block with one placeholder server
`server 127.0.0.1:1 down; # syncworker placeholder` (requests get 502, the config
stays valid). `list_instances` never returns the placeholder. The engine's
empty-source grace keeps a suddenly empty registry from getting this far.

Retiring a unit (`retire`, after a removed task's or unit's copies are deleted):
every block with this task's mark for the unit's service that holds no server
without this task's mark (an empty or placeholder block, say) is removed, under the
same lock, check and reload as a write: when `nginx -t` refuses the file without it
(a hand-written `proxy_pass` still names the upstream), the previous file is put back
and the block stays with its placeholder, and the log carries nginx's error: removing
it is then the operator's, together with what refers to it (a later cleanup of the
same unit removes it once nothing does). A block holding a server added by hand stays,
and the log says why; blocks and upstreams made by hand or by another task are never
touched. A failed read, write or reload puts the previous file back and changes
nothing more.

Servers (the representable law)
-------------------------------
* weight: nginx weights are integers >= 1 (default 1). Every server of a block
  written here is ours, so the scale is free: 100 per canonical 1.0
  (`default_weight`), which keeps weights to 1/100 as Polaris and Kong do (with
  nginx's default of 1, Nacos weights 0.5 and 1.0 would share traffic equally).
  `representable` rounds to 1/100, keeps a positive weight at least 0.01 and
  clamps at 10000.
* A server that must get no traffic (unhealthy, disabled or weight 0) is written
  `down`. The engine sends gateways only healthy, enabled instances anyway.
* metadata (with the ownership marks), healthy, enabled, protocol, cluster and a
  zero weight ride in the JSON comment at the end of the server line, so a read
  gives back exactly `representable(x)`. ephemeral is always False.
* Hosts must be an IP address or a DNS name (letters, digits, `.`, `-`, `_`);
  anything else (`;`, `{`, spaces...) would be config injection and fails its
  write with a permanent Outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlparse

from syncworker import errors, marks, model
from syncworker.connectors import base
from syncworker.reconcile import planner

WEIGHT_SCALE = 100
MAX_UNITS = 1_000_000
MARK = "# syncworker"
END = "# syncworker end"
PLACEHOLDER = "server 127.0.0.1:1 down; # syncworker placeholder"
#: how many servers of one plan may be left out for failing the check before the whole write fails
MAX_BLAMED = 5

_HOST = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")
_PARAMS = re.compile(r"^[A-Za-z0-9_=.:\s-]*$")
_SERVER = re.compile(r"^\s*server\s+(?P<addr>[^\s;#]+)(?P<params>[^;#]*);\s*(?:#\s*(?P<comment>.*?))?\s*$")
_UPSTREAM = re.compile(r"(?:^|[\s;{}])upstream\s+([^\s{;]+)\s*\{")
_PID = re.compile(r'^\s*pid\s+(?:"([^"]+)"|([^\s;]+))\s*;', re.MULTILINE)
_UPSTREAM_HEAD = re.compile(r"^\s*upstream\s+([^\s{;]+)\s*\{")


# ---- names and weights ------------------------------------------------------------------
def sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def upstream_name(service: model.ServiceKey) -> str:
    """`<namespace>.<name>[.<group>]`, sanitized (the namespace part is left out when empty)."""
    return sanitize(".".join(p for p in (service.namespace, service.name, service.group) if p))


def weight_units(weight: float) -> int:
    if weight != weight or weight <= 0:
        return 0
    if not math.isfinite(weight):
        return MAX_UNITS
    return max(1, min(MAX_UNITS, round(weight * WEIGHT_SCALE)))


def representable(inst: model.Instance) -> model.Instance:
    """`inst` as this connector stores it (see the module docstring)."""
    return inst.replace(weight=weight_units(inst.weight) / WEIGHT_SCALE, ephemeral=False, native_id="")


def safe_host(host: str) -> bool:
    if _HOST.match(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---- the file -----------------------------------------------------------------------------
@dataclasses.dataclass
class Block:
    """One upstream block framed by our marker comments."""

    fields: dict[str, str]
    name: str
    lines: list[str]

    @property
    def task(self) -> str:
        return self.fields.get("task", "")

    @property
    def service(self) -> model.ServiceKey:
        f = self.fields
        return model.ServiceKey(f.get("namespace", ""), f.get("group", ""), f.get("service", ""))

    @property
    def text(self) -> str:
        return "".join(self.lines)


Segment = str | Block


def parse(text: str, where: str) -> list[Segment]:
    """Split the file into verbatim text and our blocks; ReadError when a block is not closed."""
    out: list[Segment] = []
    lines = text.splitlines(keepends=True)
    verbatim: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(MARK + " ") and not stripped.startswith(END):
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(END):
                j += 1
            if j == len(lines):
                raise errors.ReadError(f"{where}:{i + 1}: a syncworker block is not closed by '{END}'; "
                                       "refusing to rewrite the file")
            fields = {}
            for token in stripped[len(MARK):].split():
                k, _, v = token.partition("=")
                fields[k] = unquote(v)
            name = next((m.group(1) for x in lines[i + 1:j] if (m := _UPSTREAM_HEAD.match(x))), "")
            if verbatim:
                out.append("".join(verbatim))
                verbatim = []
            out.append(Block(fields, name, lines[i:j + 1]))
            i = j + 1
            continue
        verbatim.append(line)
        i += 1
    if verbatim:
        out.append("".join(verbatim))
    return out


def upstream_names(text: str) -> set[str]:
    """Names of the upstreams defined in nginx config text (comments ignored)."""
    bare = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    return set(_UPSTREAM.findall(bare))


def server_line(inst: model.Instance, extra: str) -> str:
    units = weight_units(inst.weight)
    live = inst.healthy and inst.enabled and units > 0
    addr = f"[{inst.host}]:{inst.port}" if ":" in inst.host else f"{inst.host}:{inst.port}"
    params = [f"weight={max(1, units)}"] + ([] if live else ["down"]) + ([extra] if extra else [])
    tag = json.dumps({"metadata": dict(inst.metadata), "healthy": inst.healthy, "enabled": inst.enabled,
                      "protocol": inst.protocol, "cluster": inst.cluster, "zero_weight": units == 0},
                     sort_keys=True, separators=(",", ":"))
    return f"    server {addr} {' '.join(params)}; {MARK} {tag}\n"


def server_instance(line: str) -> model.Instance | None:
    """A `server` line as the canonical model; None for the placeholder; ValueError when malformed."""
    m = _SERVER.match(line)
    if m is None:
        raise ValueError(f"not a server line: {line.strip()!r}")
    comment = (m.group("comment") or "").strip()
    if comment == "syncworker placeholder":
        return None
    addr = m.group("addr")
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else "80"
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            host, port_text = addr, "80"
    params = m.group("params").split()
    units = next((int(p[7:]) for p in params if p.startswith("weight=")), 1)
    down = "down" in params
    if not comment.startswith("syncworker "):  # a server put there by hand: a native record
        return model.Instance(host=host, port=int(port_text), weight=units / WEIGHT_SCALE, healthy=not down)
    tag = json.loads(comment[len("syncworker "):])
    return model.Instance(
        host=host, port=int(port_text),
        weight=0.0 if tag.get("zero_weight") else units / WEIGHT_SCALE,
        healthy=bool(tag.get("healthy", True)), enabled=bool(tag.get("enabled", True)),
        metadata={str(k): str(v) for k, v in (tag.get("metadata") or {}).items()},
        protocol=str(tag.get("protocol", "")), cluster=str(tag.get("cluster", "")))


def block_instances(block: Block) -> tuple[list[model.Instance], list[str]]:
    out: list[model.Instance] = []
    bad: list[str] = []
    for line in block.lines:
        if not line.strip().startswith("server"):
            continue
        try:
            inst = server_instance(line)
        except (ValueError, TypeError, AttributeError) as exc:
            bad.append(f"upstream {block.name}: {exc}")
            continue
        if inst is not None:
            out.append(inst)
    return out, bad


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the in-process lock and the `flock` of `path` (one writer at a time, across processes)."""
    key = str(path.resolve())
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class NginxConnector(base.Connector):
    type_name = "nginx"
    capabilities: ClassVar[base.Capabilities] = base.Capabilities(source=False, destination=True, gateway=True)
    default_weight: ClassVar[float] = float(WEIGHT_SCALE)

    def __init__(self, endpoint: base.Endpoint) -> None:
        super().__init__(endpoint)
        opts: dict[str, Any] = dict(endpoint.options)
        path = opts.get("upstreams_path") or (_address_path(endpoint.addresses[0]) if endpoint.addresses else None)
        problems = []
        if not path:
            problems.append(errors.ConfigProblem(f"{endpoint.name}.options.upstreams_path",
                                                 "nginx needs the upstreams file (option or file:// address)"))
        self.server_params = str(opts.get("server_params", "")).strip()
        if not _PARAMS.match(self.server_params):
            problems.append(errors.ConfigProblem(f"{endpoint.name}.options.server_params",
                                                 "only server parameters like 'max_fails=3 fail_timeout=10s'"))
        if problems:
            raise errors.ConfigError(problems)
        self.path = Path(str(path))
        self.binary = str(opts.get("nginx") or shutil.which("nginx") or "/usr/sbin/nginx")
        self.reload = bool(opts.get("reload", True))
        self.timeout = float(opts.get("timeout", 30))
        self.reload_wait = float(opts.get("reload_wait", 5))
        self.pid_path = str(opts.get("pid_path", ""))
        self.conf_path = str(opts.get("conf_path", ""))
        self.prefix = str(opts.get("prefix", ""))
        self.base_args: list[str] = []
        for flag, key in (("-p", "prefix"), ("-c", "conf_path"), ("-e", "error_log")):
            if opts.get(key):
                self.base_args += [flag, str(opts[key])]

    def representable(self, inst: model.Instance) -> model.Instance:
        return representable(inst)

    # ---- nginx ---------------------------------------------------------------------------
    def _nginx(self, *args: str) -> str | None:
        """Run nginx with the instance's flags; None on success, else its error text."""
        argv = [self.binary, *self.base_args, *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(argv)}: {exc}"
        if proc.returncode == 0:
            return None
        out = (proc.stderr + proc.stdout).strip()
        return out[-2000:] or f"{' '.join(argv)} exited {proc.returncode}"

    def check(self) -> str | None:
        return self._nginx("-t", "-q")

    # ---- reads ---------------------------------------------------------------------------
    def _read(self) -> tuple[str, list[Segment]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise errors.ReadError(f"cannot read {self.path}: {exc}") from exc
        return text, parse(text, str(self.path))

    async def list_services(self, namespace: str) -> Sequence[model.ServiceKey]:
        return await asyncio.to_thread(self._list_services, namespace)

    def _list_services(self, namespace: str) -> list[model.ServiceKey]:
        with locked(self.path):
            _, segments = self._read()
        keys = {s.service for s in segments if isinstance(s, Block)}
        return sorted(k for k in keys if not namespace or k.namespace == namespace)

    async def list_instances(self, service: model.ServiceKey) -> base.Listing:
        return await asyncio.to_thread(self._list_instances, service)

    def _list_instances(self, service: model.ServiceKey) -> base.Listing:
        with locked(self.path):
            _, segments = self._read()
        found: list[model.Instance] = []
        skipped: list[str] = []
        for s in segments:
            if isinstance(s, Block) and s.service == service:
                insts, bad = block_instances(s)
                found.extend(insts)
                skipped.extend(bad)
        return base.Listing(tuple(found), tuple(skipped))

    # ---- writes --------------------------------------------------------------------------
    async def apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext
                    ) -> list[base.Outcome]:
        return await asyncio.to_thread(self._apply, service, plan, ctx)

    def _apply(self, service: model.ServiceKey, plan: planner.Plan, ctx: base.ApplyContext) -> list[base.Outcome]:
        ops = plan.operations()
        if not ops:
            return []
        refused = {c.address: f"host {c.host!r} cannot go into an nginx config"
                   for c in plan.creates if not safe_host(c.host)}
        target = sanitize(ctx.upstream_name) if ctx.upstream_name else upstream_name(service)

        def fail(msg: str, temporary: bool) -> list[base.Outcome]:
            return [base.Outcome(op, i.address, False, msg, temporary) for op, i in ops]

        try:
            with locked(self.path):
                text, segments = self._read()
                mine = [i for i, s in enumerate(segments)
                        if isinstance(s, Block) and s.task == ctx.task and s.service == service]
                taken: dict[str, str] = {}
                for i, s in enumerate(segments):
                    if isinstance(s, Block) and i not in mine:
                        taken[s.name] = f"task {s.task!r}"
                    elif isinstance(s, str):
                        taken.update(dict.fromkeys(upstream_names(s), "nobody (written by hand)"))
                if target in taken:
                    return fail(f"upstream {target!r} in {self.path} is owned by {taken[target]}; "
                                "not overwritten", False)
                current: dict[model.Address, model.Instance] = {}
                for i in mine:
                    block = segments[i]
                    assert isinstance(block, Block)
                    for inst in block_instances(block)[0]:
                        current.setdefault(inst.address, inst)
                wanted = {i.address for i in ctx.desired}
                for d in plan.deletes:
                    if d.address not in wanted:  # a duplicate at a wanted address goes by merging
                        current.pop(d.address, None)
                for u in plan.updates:
                    current[u.new.address] = u.new
                created = set()
                for c in plan.creates:
                    if c.address not in refused:
                        current[c.address] = c
                        created.add(c.address)
                error = self._write(text, segments, mine, target, service, ctx, current, created, refused)
                if error is not None:
                    return fail(*error)
        except errors.SyncError as exc:
            return fail(str(exc), isinstance(exc, errors.TemporaryError))
        except OSError as exc:
            return fail(f"cannot write {self.path}: {exc}", True)
        return [base.Outcome(op, i.address, False, refused[i.address], False)
                if op == "create" and i.address in refused else base.Outcome(op, i.address, True)
                for op, i in ops]

    def _render(self, segments: list[Segment], mine: list[int], block: str | None) -> str:
        parts: list[str] = []
        for i, s in enumerate(segments):
            if i in mine:
                if i == mine[0] and block is not None:
                    parts.append(block)
                continue
            parts.append(s.text if isinstance(s, Block) else s)
        if not mine and block is not None:
            if parts and not parts[-1].endswith("\n"):
                parts.append("\n")
            parts.append(block)
        return "".join(parts)

    def _block(self, name: str, service: model.ServiceKey, ctx: base.ApplyContext,
               servers: list[model.Instance]) -> str:
        origins = sorted({o for s in servers if (o := marks.origin(s.metadata))})
        fields = {"task": ctx.task, "origin": ",".join(origins), "namespace": service.namespace,
                  "group": service.group, "service": service.name}
        head = " ".join(f"{k}={quote(v, safe='')}" for k, v in fields.items())
        body = [server_line(s, self.server_params) for s in servers] or [f"    {PLACEHOLDER}\n"]
        return f"{MARK} {head}\nupstream {name} {{\n{''.join(body)}}}\n{END}\n"

    def _write(self, text: str, segments: list[Segment], mine: list[int], target: str,
               service: model.ServiceKey, ctx: base.ApplyContext, current: dict[model.Address, model.Instance],
               created: set[model.Address], refused: dict[model.Address, str]) -> tuple[str, bool] | None:
        """Render, check, reload; None on success, else (error, temporary) with the old file back."""
        for _ in range(MAX_BLAMED + 1):
            servers = [current[a] for a in sorted(current)]
            if servers:
                candidates = [self._render(segments, mine, self._block(target, service, ctx, servers))]
            else:  # remove the block; keep a placeholder when the config still refers to it
                candidates = [self._render(segments, mine, None),
                              self._render(segments, mine, self._block(target, service, ctx, []))]
            if candidates[0] == text:
                return None
            error = ""
            for candidate in candidates:
                write_atomic(self.path, candidate)
                found = self.check()
                if found is None:
                    break
                error = found
            else:
                self._restore(text)
                blamed = self._blame(error, candidates[-1], created)
                if blamed is None:
                    return f"nginx -t refused the new upstreams, the previous file stays: {error}", False
                refused[blamed] = f"nginx -t refused this server: {error}"
                del current[blamed]
                created.discard(blamed)
                continue
            failed = self._reload()
            if failed is not None:
                self._restore(text)
                return f"nginx reload failed, the previous file stays: {failed}", True
            return None
        self._restore(text)
        return f"nginx -t refused more than {MAX_BLAMED} new servers; the previous file stays", False

    def _reload(self) -> str | None:
        """`nginx -s reload` (unless turned off) and wait for the new workers; None, or nginx's error."""
        if not self.reload:
            return None
        master = self._master_pid()
        before = _children(master) if master else set()
        failed = self._nginx("-s", "reload")
        if failed is None and master:
            self._wait_new_workers(master, before)
        return failed

    def _master_pid(self) -> int | None:
        """The running master's pid: `options.pid_path`, else the `pid` directive of `conf_path`."""
        path = self.pid_path
        if not path and self.conf_path:
            try:
                conf = Path(self.conf_path).read_text()
            except OSError:
                return None
            m = _PID.search(conf)
            if m is None:
                return None
            path = m.group(1) or m.group(2)
            if not os.path.isabs(path) and self.prefix:
                path = os.path.join(self.prefix, path)
        if not path:
            return None
        try:
            return int(Path(path).read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_new_workers(self, master: int, before: set[int]) -> None:
        """After `nginx -s reload`: wait until only the new generation of workers accepts (Linux /proc).

        nginx re-reads its config asynchronously after the signal: it forks new workers,
        then tells the old ones to quit, and an old worker renames itself "worker process
        is shutting down" just before it closes its listening sockets. Waiting for that
        makes a finished apply mean "new connections get the new config". A master that
        does not get there within `reload_wait` seconds (it logs why) is not waited for.
        """
        deadline = time.monotonic() + self.reload_wait
        while time.monotonic() < deadline:
            now = _children(master)
            if not now:
                return
            if now - before and all(_shutting_down(pid) for pid in now & before):
                return
            time.sleep(0.01)

    def _blame(self, error: str, candidate: str, created: set[model.Address]) -> model.Address | None:
        """The created server on the line of our file that nginx names in `error`, if any."""
        m = re.search(re.escape(str(self.path)) + r":(\d+)", error)
        if m is None:
            return None
        lines = candidate.splitlines()
        n = int(m.group(1))
        if not 0 < n <= len(lines):
            return None
        try:
            inst = server_instance(lines[n - 1])
        except (ValueError, TypeError, AttributeError):
            return None
        return inst.address if inst is not None and inst.address in created else None

    def _restore(self, text: str) -> None:
        write_atomic(self.path, text)

    # ---- retiring a unit ----------------------------------------------------------------
    async def retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        return await asyncio.to_thread(self._retire, service, ctx)

    def _retire(self, service: model.ServiceKey, ctx: base.ApplyContext) -> list[base.Retired]:
        try:
            with locked(self.path):
                text, segments = self._read()
                done: list[base.Retired] = []
                gone: list[int] = []
                for i, s in enumerate(segments):
                    if not (isinstance(s, Block) and s.task == ctx.task and s.service == service):
                        continue
                    foreign = _foreign_servers(s, ctx.task)
                    if foreign:
                        done.append(base.Retired("block", s.name, base.KEPT, f"holds {len(foreign)} server(s) "
                                                 f"task {ctx.task!r} does not own: {', '.join(foreign[:5])}"))
                    else:
                        gone.append(i)
                if gone:
                    done += self._remove_blocks(text, segments, gone)
        except errors.SyncError as exc:
            return [base.Retired("block", upstream_name(service), base.FAILED, str(exc))]
        except OSError as exc:
            return [base.Retired("block", upstream_name(service), base.FAILED, f"cannot write {self.path}: {exc}")]
        return done

    def _remove_blocks(self, text: str, segments: list[Segment], gone: list[int]) -> list[base.Retired]:
        """Render without the `gone` blocks, check, reload; the previous file comes back on any failure."""
        names = [s.name for i, s in enumerate(segments) if i in gone and isinstance(s, Block)]
        write_atomic(self.path, self._render(segments, gone, None))
        refused = self.check()
        if refused is not None:
            self._restore(text)
            return [base.Retired("block", n, base.KEPT, f"nginx -t refuses the config without it: {refused}")
                    for n in names]
        failed = self._reload()
        if failed is not None:
            self._restore(text)
            return [base.Retired("block", n, base.FAILED, f"nginx reload failed, the previous file stays: {failed}")
                    for n in names]
        return [base.Retired("block", n, base.DELETED) for n in names]

    # ---- health --------------------------------------------------------------------------
    async def health(self) -> str | None:
        try:
            await self.list_services("")
        except Exception as exc:
            return str(exc)
        if not os.access(self.path.parent, os.W_OK):
            return f"{self.path.parent} is not writable"
        return await asyncio.to_thread(self.check)


def _foreign_servers(block: Block, task: str) -> list[str]:
    """The servers of one of our blocks that `task` does not own (and lines that do not parse)."""
    insts, bad = block_instances(block)
    return [f"{i.host}:{i.port}" for i in insts if i.metadata.get(marks.TASK) != task] + bad


def _children(pid: int | None) -> set[int]:
    """Live child processes of `pid` (nginx's workers); empty where /proc is missing."""
    found: set[int] = set()
    if not pid:
        return found
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _shutting_down(pid: int) -> bool:
    """True when an nginx worker is gone or is an old one on its way out."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"shutting down" in title or not title


def _address_path(address: str) -> str | None:
    if address.startswith("file://"):
        return unquote(urlparse(address).path)
    if address.startswith("/"):
        return address
    return None
