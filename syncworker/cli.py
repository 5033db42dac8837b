"""The `syncworker` command: check, plan and run task files; run a cluster; drive the local sandbox."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from syncworker import errors, logs
from syncworker.config import loader, settings
from syncworker.connectors import registry
from syncworker.reconcile import engine as engine_mod
from syncworker.reconcile import unit as unit_mod

app = typer.Typer(help="Keep service-discovery data in sync between registries and into gateways.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
sandbox_app = typer.Typer(help="Real registries and gateways on this machine, for trying syncworker.",
                          no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")
config_app = typer.Typer(help="The task config shared by a cluster, in Redis.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console()
err = Console(stderr=True)

ConfigOpt = typer.Option(None, "-c", "--config", help="task file (JSON or YAML); default from settings")


def _config_path(path: Path | None) -> str:
    return str(path) if path else settings.Settings().config_file


def _load_or_exit(path: str):  # type: ignore[no-untyped-def]
    try:
        return loader.load(path)
    except errors.ConfigError as exc:
        err.print(f"[red]config rejected[/red]: {exc}")
        raise typer.Exit(2) from None


@app.command()
def check(config: Path | None = ConfigOpt) -> None:
    """Validate a task file; exit 0, or 2 with every problem listed."""
    path = _config_path(config)
    cfg = _load_or_exit(path)
    tasks = cfg.enabled_tasks()
    console.print(f"{path}: OK, {len(tasks)} enabled task(s): " + ", ".join(t.name for t in tasks))


@app.command()
def plan(config: Path | None = ConfigOpt) -> None:
    """Print what a sync would change now; change nothing."""
    cfg = _load_or_exit(_config_path(config))
    rows = asyncio.run(_plan(cfg))
    table = Table("task", "service", "create", "update", "delete", "clash", "note")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    console.print(table)


async def _plan(cfg) -> list[tuple[object, ...]]:  # type: ignore[no-untyped-def]
    eng = engine_mod.Engine(registry.create, workers=1)
    rows: list[tuple[object, ...]] = []
    for task in cfg.enabled_tasks():
        src = registry.create(engine_mod.endpoint_of(task.source))
        dst = registry.create(engine_mod.endpoint_of(task.destination))
        await src.open()
        await dst.open()
        try:
            rt = engine_mod.TaskRuntime(task, src, dst, engine_mod.policy_of(task),
                                        engine_mod.ratelimit.TokenBucket(0))
            await eng._discover(rt)
            if rt.discovery_error:
                rows.append((task.name, "*", "", "", "", "", rt.discovery_error))
            for u in rt.units.values():
                state = unit_mod.UnitState()
                res = await unit_mod.reconcile(u, src, dst, state, rt.policy, apply=False)
                c = res.plan.counts()
                note = res.error or (state.error if state.held_deletes else "")
                rows.append((task.name, str(u.source_service), c["create"], c["update"], c["delete"],
                             c["clash"], note))
        finally:
            await src.close()
            await dst.close()
    return rows


def _status_table(rows: list[dict[str, object]]) -> Table:
    table = Table("task", "service", "source", "in sync", "clash", "held", "last sync", "outcome", "error",
                  title=f"syncworker  {time.strftime('%H:%M:%S')}")
    for r in rows:
        last = float(r["last_ok"] or 0)  # type: ignore[arg-type]
        ago = f"{time.time() - last:.0f}s ago" if last else "-"
        table.add_row(str(r["task"]), str(r["service"]), str(r["source_instances"]), str(r["in_sync"]),
                      str(r["clashes"]), str(r["held_deletes"]), ago, str(r["outcome"]), str(r["error"])[:80])
    return table


@app.command()
def run(config: Path | None = ConfigOpt,
        live: bool = typer.Option(None, help="live status table (default: when stdout is a terminal)")) -> None:
    """Run the sync in this process (the embedded default: no ZooKeeper, no Redis). Ctrl-C stops it."""
    from syncworker.runtime import embedded

    st = settings.Settings()
    logs.setup(st.log_level, st.log_format == "json")
    path = _config_path(config)
    _load_or_exit(path)
    show = sys.stdout.isatty() if live is None else live
    kwargs = {"workers": st.workers, "reload_interval": st.reload_interval, "report_file": st.report_file,
              "status_port": st.status_port, "status_host": st.status_host}
    try:
        if show:
            with Live(_status_table([]), console=console, refresh_per_second=2) as view:
                asyncio.run(embedded.run(path, st.backup_path(path), **kwargs,  # type: ignore[arg-type]
                                         status_sink=lambda rows: view.update(_status_table(rows))))
        else:
            asyncio.run(embedded.run(path, st.backup_path(path), **kwargs))  # type: ignore[arg-type]
    except errors.ConfigError as exc:
        err.print(f"[red]config rejected[/red]: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass


# ---- sandbox ---------------------------------------------------------------------------
def _state_file() -> Path:
    from syncworker.sandbox import base

    return base.run_root().parent / "state.json"


def _read_state() -> dict[str, dict[str, object]]:
    try:
        data: dict[str, dict[str, object]] = json.loads(_state_file().read_text())
        return data
    except (OSError, ValueError):
        return {}


@sandbox_app.command("up")
def sandbox_up(names: list[str] = typer.Argument(..., help="peers to start, e.g. nacos polaris")) -> None:
    """Install (once) and start peers on free loopback ports; print their addresses and credentials."""
    from syncworker.sandbox import base, harness

    state = _read_state()
    pool = harness.PeerPool()
    for name in names:
        if name in state and base.pid_alive(int(state[name]["pid"])):  # type: ignore[arg-type]
            console.print(f"{name}: already running")
            continue
        console.print(f"starting {name} ...")
        try:
            running = pool.fresh(name)
        except base.PeerError as exc:
            err.print(f"[red]{name} failed[/red]: {exc}")
            raise typer.Exit(1) from None
        state[name] = running.to_json()
        _state_file().parent.mkdir(parents=True, exist_ok=True)
        _state_file().write_text(json.dumps(state, indent=2))
    sandbox_status()


@sandbox_app.command("install")
def sandbox_install(names: list[str] = typer.Argument(None, help="peers to install (default: all)"),
                    keep_going: bool = typer.Option(False, help="report a failed install and go on")) -> None:
    """Install or build peers once into the cache (~/.cache/syncworker-peers), one after another."""
    from syncworker.sandbox import base, catalog

    failed = []
    for name in names or sorted(catalog.PEERS):
        peer = catalog.get(name)
        if peer.installed():
            console.print(f"{name} {peer.version}: cached")
            continue
        console.print(f"{name} {peer.version}: installing ...")
        t0 = time.monotonic()
        try:
            peer.install()
        except base.PeerError as exc:
            failed.append(name)
            err.print(f"[red]{name}: install failed[/red]: {exc}")
            if not keep_going:
                raise typer.Exit(1) from None
            continue
        console.print(f"{name} {peer.version}: installed in {time.monotonic() - t0:.0f}s")
    if failed:
        err.print(f"install failed for: {', '.join(failed)} (their tests will report why)")


@sandbox_app.command("down")
def sandbox_down() -> None:
    """Stop every peer the sandbox started."""
    from syncworker.sandbox import base

    state = _read_state()
    for name, info in state.items():
        for entry in [info, *info.get("children", [])]:  # type: ignore[list-item]
            base.stop_group(int(entry["pid"]), 15.0)  # type: ignore[index]
        console.print(f"{name}: stopped")
    _state_file().unlink(missing_ok=True)


@sandbox_app.command("status")
def sandbox_status() -> None:
    """Show the peers the sandbox started: state, addresses, credentials, log."""
    from syncworker.sandbox import base

    table = Table("peer", "version", "state", "endpoints", "credentials", "log")
    for name, info in _read_state().items():
        alive = base.pid_alive(int(info["pid"]))  # type: ignore[arg-type]
        table.add_row(name, str(info["version"]), "up" if alive else "down",
                      "\n".join(f"{k}={v}" for k, v in info["endpoints"].items()),  # type: ignore[union-attr]
                      "\n".join(f"{k}={v}" for k, v in info["credentials"].items()),  # type: ignore[union-attr]
                      str(info["log"]))
    console.print(table)


@sandbox_app.command("render")
def sandbox_render(config: Path = typer.Argument(..., help="a task file whose endpoints name sandbox peers' types"),
                   out: Path = typer.Option(..., "-o", "--out", help="where to write the rendered file")) -> None:
    """Point a task file's endpoints at the running sandbox peers (same types), and write it as JSON."""
    from syncworker.config import loader as config_loader

    data, _ = config_loader.parse_text(config.read_text(), str(config))
    state = _read_state()
    for task in data.get("tasks", []):
        for role in ("source", "destination"):
            ep = task.get(role, {})
            peer = next((state[n] for n in (ep.get("type"), f"{ep.get('type')}-auth") if n in state), None)
            if peer is None:
                continue
            endpoints: dict[str, str] = peer["endpoints"]  # type: ignore[assignment]
            creds: dict[str, str] = peer["credentials"]  # type: ignore[assignment]
            ep["addresses"] = [endpoints.get("http") or next(iter(endpoints.values()))]
            if "token" in creds:
                ep["token"] = creds["token"]
            if "username" in creds:
                ep["user"], ep["password"] = creds["username"], creds.get("password", "")
    config_loader.validate(data, str(out))
    out.write_text(json.dumps(data, indent=2))
    console.print(f"wrote {out}")


# ---- cluster mode ----------------------------------------------------------------------
StatusPortOpt = typer.Option(None, "--status-port",
                             help="serve /status, /metrics, /cluster, /healthz on 127.0.0.1 (0: any free port; "
                                  "default SYNCWORKER_STATUS_PORT)")


@app.command()
def scheduler(config: Path | None = typer.Option(
                  None, "-c", "--config", help="task file when SYNCWORKER_CONFIG_PROVIDER=file (default: settings)"),
              status_port: int | None = StatusPortOpt) -> None:
    """Run a cluster scheduler: stand by, lead when ZooKeeper elects it, dispatch work to the workers."""
    from scheduler import main as scheduler_main

    st = settings.Settings()
    logs.setup(st.log_level, st.log_format == "json")
    path = None
    if st.config_provider == "file":
        path = _config_path(config)
        _load_or_exit(path)
    port = status_port if status_port is not None else st.status_port
    try:
        asyncio.run(scheduler_main.run(st, path, port))
    except errors.ConfigError as exc:
        err.print(f"[red]config rejected[/red]: {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass


@app.command()
def worker(concurrency: int | None = typer.Option(
               None, "--concurrency", min=1, help="jobs at once (default SYNCWORKER_WORKER_CONCURRENCY, 8)"),
           hostname: str | None = typer.Option(
               None, "-n", "--hostname", help="Celery node name (default syncworker@<host>)"),
           pool: str | None = typer.Option(
               None, "--pool", help="threads (default), prefork or solo (default SYNCWORKER_WORKER_POOL)"),
           supervise: bool = typer.Option(
               True, "--supervise/--no-supervise",
               help="run the Celery worker as a child process and start it again when it exits unexpectedly "
                    "(a Redis restart makes Celery 5.7 exit)")) -> None:
    """Run a cluster worker: a Celery worker taking reconciles and duties from the cluster's Redis."""
    st = settings.Settings()
    logs.setup(st.log_level, st.log_format == "json")
    opts = [f"--concurrency={concurrency or st.worker_concurrency}", f"--pool={pool or st.worker_pool}",
            f"--hostname={hostname or 'syncworker@%h'}"]
    if supervise:
        from syncworker.cluster import supervise as supervise_mod

        child = [sys.executable, "-m", "syncworker.cli", "worker", "--no-supervise", *opts]
        raise typer.Exit(supervise_mod.supervise(child))

    from syncworker.cluster import celery_app
    from syncworker.cluster import tasks as _tasks  # noqa: F401 - registers the tasks

    celery_app.app.worker_main(["worker", *opts, f"--queues={st.redis_prefix}", f"--loglevel={st.log_level.upper()}",
                                "--without-gossip", "--without-mingle", "--task-events"])


@app.command()
def flower(port: int = typer.Option(5555, "--port", help="port to serve Flower on"),
           address: str = typer.Option("127.0.0.1", "--address", help="address to serve Flower on")) -> None:
    """Run Flower against the cluster's broker, behind basic auth from SYNCWORKER_FLOWER_AUTH (user:password)."""
    import os

    from syncworker.cluster import celery_app

    st = settings.Settings()
    logs.setup(st.log_level, st.log_format == "json")
    auth = st.flower_auth.get_secret_value()
    user, sep, password = auth.partition(":")
    if not (user and sep and password):
        err.print("[red]refused[/red]: set SYNCWORKER_FLOWER_AUTH=user:password (Flower is never served without it)")
        raise typer.Exit(2)
    os.environ["FLOWER_BASIC_AUTH"] = auth  # read by Flower itself: never on a command line, never printed
    console.print(f"Flower on http://{address}:{port} (basic auth, user {user!r})")
    celery_app.app.start(["flower", f"--port={port}", f"--address={address}"])


def _store():  # type: ignore[no-untyped-def]
    from syncworker.cluster import store

    return store.Store.from_settings(settings.Settings())


@config_app.command("push")
def config_push(file: Path = typer.Argument(..., help="task file (JSON or YAML) to run cluster-wide")) -> None:
    """Validate a task file and make it the cluster's config; a bad one is refused and the old one stays."""
    cfg = _load_or_exit(str(file))
    version = _store().push_config(file.read_text(encoding="utf-8"), str(file))
    tasks = cfg.enabled_tasks()
    console.print(f"{file}: pushed as version {version}, {len(tasks)} enabled task(s): "
                  + ", ".join(t.name for t in tasks))
    if settings.Settings().config_provider != "redis":
        err.print("note: schedulers read Redis only with SYNCWORKER_CONFIG_PROVIDER=redis")


@config_app.command("get")
def config_get(raw: bool = typer.Option(False, "--raw", help="the text as pushed, secrets included")) -> None:
    """Print the cluster's pushed config (secrets masked unless --raw), and the versions pushed and applied."""
    st = _store()
    stored = st.pushed_config()
    if stored is None:
        err.print("no config pushed yet (syncworker config push FILE)")
        raise typer.Exit(1)
    if raw:
        sys.stdout.write(stored.text if stored.text.endswith("\n") else stored.text + "\n")
    else:
        console.print_json(loader.dump(loader.load_text(stored.text, f"<pushed v{stored.version}>")))
    err.print(f"pushed version {stored.version}; applied version {st.applied_version()}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables")) -> None:
    """Show the cluster from the store: leader, workers, duties, and every unit's last result."""
    from scheduler import status as cluster_status

    st = _store()
    info = cluster_status.cluster_info(st)
    rows = st.status_rows()
    if as_json:
        console.print_json(json.dumps({"cluster": info, "units": rows}, default=str))
        return
    console.print(f"leader: [bold]{info['leader'] or '-'}[/bold]   config: pushed v{info['pushed_version']}, "
                  f"applied v{info['applied_version']}   queued {info['queued']}, running {info['running']}")
    members = Table("member", "role", "detail")
    for role in ("schedulers", "workers"):
        for ident, about in info[role].items():  # type: ignore[attr-defined]
            detail = ", ".join(f"{k}={v}" for k, v in about.items() if k not in ("at", "role"))
            members.add_row(ident, role[:-1], detail)
    for duty, lease in info["duties"].items():  # type: ignore[attr-defined]
        members.add_row(duty, "duty", f"held by {lease.get('owner', '?')}")
    console.print(members)
    console.print(_status_table(rows))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
