"""The source registry killed for a minute: every gateway's targets stay as they were for the whole outage.

A private Polaris feeds a real nginx, a real Envoy and the Kong and APISIX Admin API
contract doubles through a `syncworker run` child;
three real backends answer behind them. Polaris is SIGKILLed for SYNCWORKER_OUTAGE_SECONDS
(default 60): requests through both gateways keep reaching every backend and the rendered
targets (nginx's upstreams file, Envoy's CDS/EDS files and its live endpoints) do not
change. After Polaris comes back, a change there reaches both gateways with no manual step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from syncworker import model
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import catalog, harness
from syncworker.sandbox.peers.envoy import Envoy
from syncworker.sandbox.peers.nginx import Nginx
from tests.doubles.apisix_admin_double import ApisixAdminDouble
from tests.doubles.kong_admin_double import KongAdminDouble
from tests.e2e.conftest import StartSync
from tests.e2e.helpers import POLARIS, Side, env_seconds, polaris_endpoint, registry_config, task
from tests.gateways.conftest import client, sample, time_until_gone, wait_serving
from tests.peers.backend import Backend, running_backend

pytestmark = pytest.mark.peers

NS = "default"


@pytest.fixture
def backends(peers: harness.PeerPool) -> Iterator[list[Backend]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_backend(f"b{i}-{uuid.uuid4().hex[:4]}", peers.alloc.one()))
               for i in range(3)]


def front(port: int, upstream: str) -> str:
    return f"server {{\n    listen 127.0.0.1:{port};\n    location / {{ proxy_pass http://{upstream}; }}\n}}\n"


def envoy_endpoints(running: sandbox_base.Running, cluster: str) -> list[str]:
    """Envoy's live endpoints of one cluster (address, weight, health flags) from its admin page."""
    text = httpx.get(f"{running.endpoints['admin']}/clusters", timeout=5.0).text
    return sorted(line for line in text.splitlines()
                  if line.startswith(f"{cluster}::127.0.0.1:") and ("::weight::" in line or "::health_flags::" in line))


def test_gateway_targets_survive_source_outage(peers: harness.PeerPool, backends: list[Backend],
                                               start_sync: StartSync) -> None:
    outage = env_seconds("SYNCWORKER_OUTAGE_SECONDS", 60.0)
    source = peers.fresh("polaris")
    nginx_run = peers.fresh("nginx")
    envoy_run = peers.fresh("envoy")
    kong = KongAdminDouble(port=peers.alloc.one()).start()
    apisix = ApisixAdminDouble(port=peers.alloc.one(), api_key="edge-key").start()
    service = f"edge-{uuid.uuid4().hex[:8]}"
    upstream = f"{NS}.{service}"
    p_ep = polaris_endpoint(source)
    config = registry_config([
        task("polaris-to-nginx", p_ep, {
            "name": "edge-nginx", "type": "nginx", "addresses": ["file:///unused"],
            "options": {k: str(nginx_run.extra[k]) for k in ("upstreams_path", "conf_path", "prefix", "error_log")},
        }, NS, service=service),
        task("polaris-to-envoy", p_ep, {
            "name": "edge-envoy", "type": "envoy", "addresses": ["file:///unused"],
            "options": {"cds_path": str(envoy_run.extra["cds_path"]), "eds_dir": str(envoy_run.extra["eds_dir"])},
        }, NS, service=service),
        task("polaris-to-kong", p_ep, {"name": "edge-kong", "type": "kong", "addresses": [kong.url]},
             NS, service=service),
        task("polaris-to-apisix", p_ep, {"name": "edge-apisix", "type": "apisix", "addresses": [apisix.url],
                                         "token": "edge-key"}, NS, service=service),
    ], pull="5s")

    def double_targets() -> dict[str, object]:
        """What the Kong and APISIX doubles hold for this service: targets and nodes with weights."""
        kong_targets = sorted((t["target"], t["weight"]) for up in kong.state()["upstreams"]
                              if service in up["name"] for t in kong.targets_of(up["name"]))
        nodes = sorted((n["host"], n["port"], n["weight"]) for rid, up in apisix.state()["upstreams"].items()
                       if service in rid for n in up.get("nodes", []))
        return {"kong targets": kong_targets, "apisix nodes": nodes}
    upstreams = Path(str(nginx_run.extra["upstreams_path"]))
    cds = Path(str(envoy_run.extra["cds_path"]))
    eds = Path(str(envoy_run.extra["eds_dir"])) / f"{upstream}.json"
    nginx_port = peers.alloc.one()
    urls = {"nginx": f"http://127.0.0.1:{nginx_port}/", "envoy": f"{envoy_run.endpoints['http']}/{service}"}
    names = {b.name for b in backends}
    report: dict[str, object] = {}

    async def scenario() -> None:
        p = await Side(POLARIS, p_ep, NS, "").open()
        try:
            await asyncio.gather(*(p.put(service, model.Instance("127.0.0.1", b.port)) for b in backends))
            Envoy().set_routes(envoy_run, [(f"/{service}", upstream)])
            start_sync(config)
            deadline = time.monotonic() + 30
            while f"upstream {upstream} {{" not in upstreams.read_text() or not eds.exists():
                assert time.monotonic() < deadline, upstreams.read_text()
                await asyncio.sleep(0.05)
            await asyncio.to_thread(Nginx().apply_upstreams, nginx_run, upstreams.read_text() + front(nginx_port,
                                                                                                        upstream))
            async with client() as c:
                for url in urls.values():
                    await wait_serving(c, url, names)
                deadline = time.monotonic() + 30
                while any(len(v) != len(backends) for v in double_targets().values()):  # type: ignore[arg-type]
                    assert time.monotonic() < deadline, double_targets()
                    await asyncio.sleep(0.1)
                rendered = {"nginx upstreams": upstreams.read_text(), "envoy cds": cds.read_text(),
                            "envoy eds": eds.read_text(), **double_targets()}
                live = await asyncio.to_thread(envoy_endpoints, envoy_run, upstream)
                assert len([x for x in live if "::weight::" in x]) == 3, live

                source.kill()
                killed = time.monotonic()
                answers: dict[str, list[tuple[float, str]]] = {g: [] for g in urls}
                changed: list[str] = []
                last_live = 0.0
                while time.monotonic() - killed < outage:
                    for gateway, url in urls.items():
                        t = time.monotonic() - killed
                        answers[gateway] += [(t, a) for a in await sample(c, url, 3)]
                    now = {"nginx upstreams": upstreams.read_text(), "envoy cds": cds.read_text(),
                           "envoy eds": eds.read_text() if eds.exists() else "<gone>", **double_targets()}
                    changed += [f"t+{time.monotonic() - killed:.1f}s {k} changed" for k in rendered
                                if now[k] != rendered[k]]
                    if time.monotonic() - last_live > 1.0:
                        last_live = time.monotonic()
                        got = await asyncio.to_thread(envoy_endpoints, envoy_run, upstream)
                        if got != live:
                            changed.append(f"t+{last_live - killed:.1f}s envoy endpoints: {got}")
                    await asyncio.sleep(0.2)
                report["down (s)"] = round(time.monotonic() - killed, 1)
                assert not changed, "rendered targets changed during the outage:\n  " + "\n  ".join(changed[:20])
                for gateway, got in answers.items():
                    report[f"{gateway} requests"] = len(got)
                    failed = [(round(t, 1), a) for t, a in got if a not in names]
                    assert not failed, f"{gateway}: {len(failed)} request(s) failed during the outage: {failed[:10]}"
                    buckets: dict[int, set[str]] = collections.defaultdict(set)
                    for t, a in got:
                        buckets[int(t // 5)].add(a)
                    short = {b * 5: sorted(s) for b, s in buckets.items() if s != names and (b + 1) * 5 <= outage}
                    assert not short, f"{gateway}: 5 s windows that missed a backend: {short}"

                await asyncio.to_thread(source.restart)
                await asyncio.to_thread(catalog.get("polaris").wait_ready, source)
                # a change at the source after its return reaches both gateways
                t0 = time.monotonic()
                await p.remove(service, model.Instance("127.0.0.1", backends[0].port))
                for gateway, url in urls.items():
                    report[f"{gateway}: removal seen after (s)"] = round(
                        await time_until_gone(c, url, backends[0].name, t0, timeout=30.0), 2)
                for url in urls.values():
                    assert set(await sample(c, url, 12)) == names - {backends[0].name}
                deadline = time.monotonic() + 10
                while any(len(v) != len(backends) - 1 for v in double_targets().values()):  # type: ignore[arg-type]
                    assert time.monotonic() < deadline, double_targets()
                    await asyncio.sleep(0.1)
        finally:
            await p.close()

    try:
        asyncio.run(scenario())
    finally:
        for running in (source, nginx_run, envoy_run):
            running.stop()
        kong.stop()
        apisix.close()
    print(f"gateway source outage: {report}")
