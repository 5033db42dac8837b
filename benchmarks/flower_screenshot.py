"""Screenshot of Flower's task page listing executed sync jobs (docs/flower-tasks.png).

    python -m benchmarks.flower_screenshot [--out docs/flower-tasks.png] [--services 6]

Starts real Redis, ZooKeeper and Polaris from the sandbox, a scheduler, one
worker and `syncworker flower` (basic auth), all on loopback; pushes a small
Polaris -> Polaris task (one namespace copied into another), waits until Flower
lists the executed `syncworker.reconcile` jobs, then has headless Chromium
(Debian's `chromium`: `apt-get install -y chromium`) take a screenshot of
/tasks (with the args and kwargs columns shown), the basic-auth
credentials given in the URL. Every process is killed
(SIGKILL to its process group) at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common
from syncworker import model
from syncworker.connectors import base as connectors
from syncworker.sandbox import harness

REPO = Path(__file__).resolve().parents[1]
USER = "admin"


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def get(url: str, auth: tuple[str, str]) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


async def register(conn: connectors.Connector, natives: dict[model.ServiceKey, list[model.Instance]]) -> None:
    await conn.open()
    try:
        await common.write_all(conn, natives)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "flower-tasks.png"))
    parser.add_argument("--services", type=int, default=6)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium")

    tag = uuid.uuid4().hex[:6]
    src, dst = f"shop-{tag}", f"shop-mirror-{tag}"
    password = uuid.uuid4().hex[:12]
    tmp = Path(tempfile.mkdtemp(prefix="flower-shot-"))
    pool = harness.PeerPool()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis = pool.get("redis").endpoints["redis"]
        zookeeper = pool.get("zookeeper").endpoints["zookeeper"]
        polaris = pool.get("polaris")
        url, token = polaris.endpoints["http"], polaris.credentials.get("token", "")
        natives = {model.ServiceKey(src, "", f"svc-{s}"): [model.Instance(f"10.20.{s}.{i + 1}", 8080)
                                                           for i in range(3)] for s in range(args.services)}
        asyncio.run(register(common.native_writer(common.endpoint("natives", "polaris", polaris)), natives))
        port = pool.alloc.one()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "CELERY_"))}
        env.update({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
                    "SYNCWORKER_REDIS_URL": redis, "SYNCWORKER_REDIS_PREFIX": f"shot{tag}",
                    "SYNCWORKER_ZOOKEEPER": zookeeper, "SYNCWORKER_ZK_ROOT": f"/syncworker-shot/{tag}",
                    "SYNCWORKER_CONFIG_PROVIDER": "redis", "SYNCWORKER_LOG_LEVEL": "INFO"})

        def start(name: str, *argv: str, **extra: str) -> None:
            with (tmp / f"{name}.log").open("ab") as fh:
                procs.append(subprocess.Popen([sys.executable, "-m", "syncworker.cli", *argv], cwd=REPO,
                                              env={**env, **extra}, stdout=fh, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, start_new_session=True))

        auth = (USER, password)
        base = f"http://127.0.0.1:{port}"
        start("flower", "flower", "--port", str(port), "--address", "127.0.0.1",
              SYNCWORKER_FLOWER_AUTH=f"{USER}:{password}",
              # Flower's own option (--tasks-columns) from its environment: show each job's args and kwargs
              FLOWER_TASKS_COLUMNS="name,state,args,kwargs,received,runtime,worker")
        start("scheduler", "scheduler", "--status-port", "0")
        start("worker", "worker", "--concurrency", "4", "-n", "worker-1@%h")
        wait_for(lambda: json.loads(get(base + "/api/workers?refresh=1", auth)[1] or b"{}"), 90,
                 "Flower to see the worker")

        endpoint = {"type": "polaris", "addresses": [url], "token": token}
        cfg = {"tasks": [{"name": "shop-mirror", "source": {"name": "polaris-a", **endpoint},
                          "destination": {"name": "polaris-b", **endpoint},
                          "match": [{"namespace": src, "service": "*", "dest_namespace": dst}]}],
               "methods": [{"type": "watch"}, {"type": "pull", "interval": "300s"}]}
        (tmp / "tasks.json").write_text(json.dumps(cfg, indent=2))
        subprocess.run([sys.executable, "-m", "syncworker.cli", "config", "push", str(tmp / "tasks.json")],
                       cwd=REPO, env=env, check=True)

        def reconciled() -> int:
            status, body = get(base + "/api/tasks?taskname=syncworker.reconcile", auth)
            done = [t for t in (json.loads(body).values() if status == 200 else [])
                    if t.get("state") == "SUCCESS"]
            return len(done) if len(done) >= args.services else 0

        count = wait_for(reconciled, 60, "Flower to list the executed reconciles")
        print(f"Flower lists {count} executed syncworker.reconcile jobs")

        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
        profile = tempfile.mkdtemp(prefix="chromium-")
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--window-size=1400,900", "--hide-scrollbars",
               "--virtual-time-budget=8000", f"--screenshot={out}",
               f"http://{USER}:{password}@127.0.0.1:{port}/tasks"]
        shot = subprocess.run(cmd, capture_output=True, text=True, timeout=120, start_new_session=True)
        shutil.rmtree(profile, ignore_errors=True)
        if not out.exists():
            raise SystemExit(f"chromium wrote no screenshot (rc {shot.returncode}):\n{shot.stderr[-2000:]}")
        print(f"screenshot: {out} ({out.stat().st_size} bytes); logs in {tmp}")
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        pool.stop_all()


if __name__ == "__main__":
    common.exit_on_sigterm()
    main()
