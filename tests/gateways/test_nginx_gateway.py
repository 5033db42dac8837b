"""The nginx connector against a real nginx whose upstreams file the connector rewrites.

Contract: a plan applied gives back `representable(x)`, a second plan is empty, nginx
proxies to what was written, hand-written blocks survive byte for byte, a render
that fails `nginx -t` never replaces the working file. End to end: the engine syncs
a memory registry whose instances are real local backends into nginx, and real
requests through nginx follow the registry within two seconds. A removed task
retires its blocks (and nothing else), and never one that nginx still needs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from syncworker import errors, marks, model
from syncworker.config import models
from syncworker.connectors import base, memory, registry
from syncworker.connectors import nginx as nginx_mod
from syncworker.reconcile import engine as engine_mod
from syncworker.reconcile import planner
from syncworker.sandbox import base as sandbox_base
from syncworker.sandbox import harness
from syncworker.sandbox.peers.nginx import Nginx
from tests.gateways.conftest import (
    PROPAGATION_LIMIT,
    RawPolaris,
    client,
    config,
    polaris_source,
    running_engine,
    sample,
    time_until_gone,
    time_until_seen,
    wait_serving,
)
from tests.peers.backend import Backend

pytestmark = pytest.mark.peers

TASK = "gw-task"
OWNER = planner.Owner(TASK, "registry")
NS = "default"
BAD_HOST = "no-such-host.invalid"  # RFC 6761: never resolves, so `nginx -t` refuses it


@pytest.fixture(scope="module")
def nginx_run(peers: harness.PeerPool) -> Iterator[sandbox_base.Running]:
    running = peers.fresh("nginx")
    yield running
    running.stop()


def options(running: sandbox_base.Running) -> dict[str, object]:
    return {"upstreams_path": running.extra["upstreams_path"], "conf_path": running.extra["conf_path"],
            "prefix": running.extra["prefix"], "error_log": running.extra["error_log"]}


def connector(running: sandbox_base.Running) -> nginx_mod.NginxConnector:
    conn = registry.create(base.Endpoint(name="nginx", type="nginx", addresses=("file:///unused",),
                                         options=options(running)))
    assert isinstance(conn, nginx_mod.NginxConnector)
    return conn


def upstreams(running: sandbox_base.Running) -> Path:
    return Path(str(running.extra["upstreams_path"]))


def copy(backend_or_port: Backend | int, host: str = "127.0.0.1", **kw: object) -> model.Instance:
    port = backend_or_port if isinstance(backend_or_port, int) else backend_or_port.port
    meta = {"version": "1", **kw.pop("metadata", {})}  # type: ignore[dict-item]
    return marks.stamp(model.Instance(host=host, port=port, metadata=meta, **kw), TASK,  # type: ignore[arg-type]
                       "registry")


def hand_append(running: sandbox_base.Running, text: str) -> None:
    """Add hand-written config to the upstreams file the way an operator would (check + reload)."""
    Nginx().apply_upstreams(running, upstreams(running).read_text() + text)


def hand_remove(running: sandbox_base.Running, text: str) -> None:
    Nginx().apply_upstreams(running, upstreams(running).read_text().replace(text, ""))


def front(port: int, routes: dict[str, str]) -> str:
    locations = "".join(f"        location {prefix} {{ proxy_pass http://{name}; }}\n"
                        for prefix, name in routes.items())
    return f"server {{\n    listen 127.0.0.1:{port};\n{locations}}}\n"


async def converge(conn: nginx_mod.NginxConnector, svc: model.ServiceKey, want: list[model.Instance]
                   ) -> base.Listing:
    p = planner.plan(want, (await conn.list_instances(svc)).instances, OWNER)
    outcomes = await conn.apply(svc, p, base.ApplyContext(task=TASK, desired=tuple(want)))
    assert all(o.ok for o in outcomes), outcomes
    listing = await conn.list_instances(svc)
    assert sorted(listing.instances, key=lambda i: i.address) == sorted(want, key=lambda i: i.address)
    assert planner.plan(want, listing.instances, OWNER).empty
    return listing


# ---- the connector contract ------------------------------------------------------------------
def test_apply_reads_back_representable_and_nginx_proxies(nginx_run: sandbox_base.Running,
                                                          peers: harness.PeerPool,
                                                          backends: list[Backend]) -> None:
    conn = connector(nginx_run)
    hand = "# an operator's own upstream\nupstream hand_written {\n    server 127.0.0.1:9; # keep me\n}\n"
    hand_append(nginx_run, hand)
    svc = model.ServiceKey(NS, "", "contract-one")
    name = nginx_mod.upstream_name(svc)
    assert name == "default.contract-one"
    b0, b1, b2 = backends
    dead = peers.alloc.one()
    wanted = [conn.representable(i) for i in [
        copy(b0, weight=1.0),
        copy(b1, weight=0.5, metadata={"zone": "z1", "note": "a # b; c { d }"}, protocol="http", cluster="c1"),
        copy(b2, weight=2.337),                # -> 2.34
        copy(dead, weight=0.0),                # written `down`, read back as 0
    ]]
    assert [w.weight for w in wanted] == [1.0, 0.5, 2.34, 0.0]

    async def run() -> None:
        await converge(conn, svc, wanted)
        assert await conn.list_services(NS) == [svc]
        assert await conn.health() is None

    asyncio.run(run())
    text = upstreams(nginx_run).read_text()
    assert hand in text
    assert f"server 127.0.0.1:{b0.port} weight=100;" in text
    assert f"server 127.0.0.1:{b1.port} weight=50;" in text
    assert f"server 127.0.0.1:{b2.port} weight=234;" in text
    assert f"server 127.0.0.1:{dead} weight=1 down;" in text
    assert f"# syncworker task={TASK} origin=registry" in text

    port = peers.alloc.one()
    hand_append(nginx_run, front(port, {"/": name}))
    served = [httpx.get(f"http://127.0.0.1:{port}/x", timeout=5.0).headers.get("x-backend") for _ in range(40)]
    assert set(served) == {b0.name, b1.name, b2.name}, served
    # weights 100 : 50 : 234 with smooth round robin: exact shares over a full cycle of 384 would be
    # slow to check; the heaviest must get the most
    assert served.count(b2.name) > served.count(b0.name) > served.count(b1.name), served


def test_update_delete_and_empty_upstream(nginx_run: sandbox_base.Running, peers: harness.PeerPool,
                                          backends: list[Backend]) -> None:
    conn = connector(nginx_run)
    svc = model.ServiceKey(NS, "v2", "contract-two")
    name = nginx_mod.upstream_name(svc)
    assert name == "default.contract-two.v2"
    b0, b1, b2 = backends
    port = peers.alloc.one()
    url = f"http://127.0.0.1:{port}/"

    asyncio.run(converge(conn, svc, [conn.representable(copy(b)) for b in backends]))
    routes = front(port, {"/": name})
    hand_append(nginx_run, routes)
    assert {httpx.get(url, timeout=5.0).headers.get("x-backend") for _ in range(12)} == {b.name for b in backends}

    asyncio.run(converge(conn, svc, [conn.representable(copy(b0, weight=3.0)), conn.representable(copy(b2))]))
    assert {httpx.get(url, timeout=5.0).headers.get("x-backend") for _ in range(12)} == {b0.name, b2.name}
    assert f"server 127.0.0.1:{b0.port} weight=300;" in upstreams(nginx_run).read_text()

    # every copy gone while a hand-written server still proxies to the upstream: nginx would refuse
    # the config without the block, so it stays with a placeholder and answers 502
    asyncio.run(converge(conn, svc, []))
    text = upstreams(nginx_run).read_text()
    assert f"upstream {name} {{\n    {nginx_mod.PLACEHOLDER}\n}}" in text
    assert httpx.get(url, timeout=5.0).status_code == 502
    hand_remove(nginx_run, routes)

    # nothing refers to an upstream: when its copies go, the whole block goes
    other = model.ServiceKey(NS, "", "contract-three")
    asyncio.run(converge(conn, other, [conn.representable(copy(b1))]))
    assert f"upstream {nginx_mod.upstream_name(other)} {{" in upstreams(nginx_run).read_text()
    asyncio.run(converge(conn, other, []))
    assert nginx_mod.upstream_name(other) not in upstreams(nginx_run).read_text()


def test_a_render_nginx_refuses_never_replaces_the_working_file(nginx_run: sandbox_base.Running,
                                                                 peers: harness.PeerPool,
                                                                 backends: list[Backend]) -> None:
    conn = connector(nginx_run)
    svc = model.ServiceKey(NS, "", "contract-bad")
    b0, b1, _ = backends
    port = peers.alloc.one()
    asyncio.run(converge(conn, svc, [conn.representable(copy(b0))]))
    hand_append(nginx_run, front(port, {"/": nginx_mod.upstream_name(svc)}))
    url = f"http://127.0.0.1:{port}/"

    # one bad server among good ones: nginx blames its line, it is left out, the rest goes in
    good, bad = conn.representable(copy(b1)), conn.representable(copy(80, host=BAD_HOST))
    want = [conn.representable(copy(b0)), good, bad]

    async def with_bad() -> tuple[list[base.Outcome], base.Listing]:
        p = planner.plan(want, (await conn.list_instances(svc)).instances, OWNER)
        outcomes = await conn.apply(svc, p, base.ApplyContext(task=TASK, desired=tuple(want)))
        return outcomes, await conn.list_instances(svc)

    outcomes, listing = asyncio.run(with_bad())
    by_addr = {o.address: o for o in outcomes}
    assert by_addr[good.address].ok
    assert not by_addr[bad.address].ok and not by_addr[bad.address].temporary
    assert "host not found" in by_addr[bad.address].error, by_addr[bad.address].error
    assert {i.address for i in listing.instances} == {("127.0.0.1", b0.port), good.address}
    assert BAD_HOST not in upstreams(nginx_run).read_text()
    assert {httpx.get(url, timeout=5.0).headers.get("x-backend") for _ in range(10)} == {b0.name, b1.name}

    # a file nginx refuses for a reason outside the plan: nothing replaces it, the error is nginx's
    path = upstreams(nginx_run)
    working = path.read_text()
    broken = working + "upstream broken_by_hand { server ; }\n"
    path.write_text(broken)  # not reloaded: nginx keeps serving the working config
    try:
        extra = conn.representable(copy(peers.alloc.one()))
        outcomes = asyncio.run(conn.apply(svc, planner.Plan(creates=(extra,)),
                                          base.ApplyContext(task=TASK, desired=(*listing.instances, extra))))
        assert [o.ok for o in outcomes] == [False]
        assert not outcomes[0].temporary and "nginx" in outcomes[0].error and "server" in outcomes[0].error
        assert path.read_text() == broken
        assert {httpx.get(url, timeout=5.0).headers.get("x-backend") for _ in range(10)} == {b0.name, b1.name}
    finally:
        path.write_text(working)


def test_clash_and_unsafe_host_are_refused(nginx_run: sandbox_base.Running, peers: harness.PeerPool) -> None:
    conn = connector(nginx_run)
    svc = model.ServiceKey(NS, "", "clashing")
    hand_append(nginx_run, f"upstream {nginx_mod.upstream_name(svc)} {{ server 127.0.0.1:9; }}\n")
    before = upstreams(nginx_run).read_text()
    want = conn.representable(copy(peers.alloc.one()))

    async def run(target: model.ServiceKey, plan: planner.Plan) -> list[base.Outcome]:
        assert (await conn.list_instances(target)).instances == ()
        return await conn.apply(target, plan, base.ApplyContext(task=TASK, desired=plan.creates))

    outcomes = asyncio.run(run(svc, planner.Plan(creates=(want,))))
    assert [o.ok for o in outcomes] == [False]
    assert not outcomes[0].temporary and "written by hand" in outcomes[0].error
    injected = conn.representable(copy(80, host="10.0.0.1;include/etc/passwd"))
    outcomes = asyncio.run(run(model.ServiceKey(NS, "", "injected"), planner.Plan(creates=(injected,))))
    assert [o.ok for o in outcomes] == [False] and "cannot go into an nginx config" in outcomes[0].error
    assert upstreams(nginx_run).read_text() == before


def test_unclosed_block_fails_reads(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.conf"
    path.write_text("# syncworker task=t origin=o namespace=default group= service=x\nupstream default.x {\n")
    conn = registry.create(base.Endpoint(name="n", type="nginx", addresses=(f"file://{path}",)))
    with pytest.raises(errors.ReadError, match="not closed"):
        asyncio.run(conn.list_instances(model.ServiceKey("default", "", "x")))
    outcomes = asyncio.run(conn.apply(model.ServiceKey("default", "", "x"),
                                      planner.Plan(creates=(copy(8080),)), base.ApplyContext(task=TASK)))
    assert [o.ok for o in outcomes] == [False] and outcomes[0].temporary


# ---- end to end with the engine -----------------------------------------------------------------
def test_engine_feeds_nginx_from_a_registry(nginx_run: sandbox_base.Running, backends: list[Backend],
                                            store: tuple[str, memory.Store], peers: harness.PeerPool) -> None:
    address, mem = store
    svc = model.ServiceKey(NS, "", "orders")
    b0, b1, b2 = backends
    names = {b.name for b in backends}
    for b, version in ((b0, "1"), (b1, "1"), (b2, "2")):
        mem.put(svc, model.Instance(host="127.0.0.1", port=b.port, metadata={"version": version}))
    mem.services[svc][("127.0.0.9", 1)] = model.Instance(host="127.0.0.9", port=1, healthy=False)
    mem.services[svc][("127.0.0.9", 2)] = model.Instance(host="127.0.0.9", port=2, enabled=False)
    cfg = config("gw-nginx", address, {"name": "edge-nginx", "type": "nginx", "addresses": ["file:///unused"],
                                       "options": options(nginx_run)},
                 [{"namespace": NS, "service": "orders", "groups": [{"name": "v2", "metadata": {"version": "2"}}]}])
    port = peers.alloc.one()
    url, url_v2 = f"http://127.0.0.1:{port}/orders", f"http://127.0.0.1:{port}/v2/orders"
    path = upstreams(nginx_run)
    timings: dict[str, float] = {}

    async def scenario() -> None:
        async with running_engine(cfg) as eng, client() as c:
            deadline = time.monotonic() + 15
            while not ("upstream default.orders {" in path.read_text()
                       and "upstream default.orders.v2 {" in path.read_text()):
                assert time.monotonic() < deadline, path.read_text()
                await asyncio.sleep(0.05)
            assert await eng.settle()
            # the operator's own server block proxies to the upstreams the sync keeps
            await asyncio.to_thread(hand_append, nginx_run,
                                    front(port, {"/v2/": "default.orders.v2", "/": "default.orders"}))
            await wait_serving(c, url, names)
            await wait_serving(c, url_v2, {b2.name})
            assert "127.0.0.9" not in path.read_text()  # unhealthy and disabled never reach a gateway

            t0 = time.monotonic()
            mem.remove(svc, ("127.0.0.1", b1.port))
            timings["remove"] = await time_until_gone(c, url, b1.name, t0)
            assert set(await sample(c, url, 30)) == {b0.name, b2.name}

            t0 = time.monotonic()
            mem.put(svc, model.Instance(host="127.0.0.1", port=b1.port, metadata={"version": "1"}))
            timings["add"] = await time_until_seen(c, url, b1.name, t0)
            await wait_serving(c, url, names)

            # failed reads: nginx keeps its targets although the registry changed meanwhile
            before = path.read_bytes()
            mem.fail_reads = True
            mem.remove(svc, ("127.0.0.1", b0.port))
            seen: set[str] = set()
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                seen.update(await sample(c, url, 10))
            assert seen == names, seen
            assert path.read_bytes() == before
            mem.fail_reads = False
            t0 = time.monotonic()
            mem.notify(svc)
            timings["remove_after_outage"] = await time_until_gone(c, url, b0.name, t0)
            mem.put(svc, model.Instance(host="127.0.0.1", port=b0.port, metadata={"version": "1"}))
            await wait_serving(c, url, names)

            # a record nginx refuses: it never gets into the file, the unit reports nginx's words,
            # and traffic goes on to the good backends
            mem.put(svc, model.Instance(host=BAD_HOST, port=80))
            deadline = time.monotonic() + 10
            while True:
                rows = [r for r in eng.status() if r["destination"] == str(svc)]
                if rows and "host not found" in str(rows[0]["error"]):
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.05)
            assert rows[0]["outcome"] == "error"
            assert BAD_HOST not in path.read_text()
            assert set(await sample(c, url, 30)) == names
            # the good records still follow the registry while the bad one is refused
            t0 = time.monotonic()
            mem.remove(svc, ("127.0.0.1", b2.port))
            timings["remove_next_to_bad"] = await time_until_gone(c, url, b2.name, t0)
            mem.remove(svc, (BAD_HOST, 80))
            mem.put(svc, model.Instance(host="127.0.0.1", port=b2.port, metadata={"version": "2"}))
            await wait_serving(c, url, names)
        async with client() as c:  # the engine stopped: the copies stay
            assert set(await sample(c, url, 30)) == names

    asyncio.run(scenario())
    print(f"nginx propagation: {timings}")
    assert timings["remove"] < PROPAGATION_LIMIT, timings
    assert timings["add"] < PROPAGATION_LIMIT, timings
    assert timings["remove_after_outage"] < PROPAGATION_LIMIT, timings
    assert timings["remove_next_to_bad"] < PROPAGATION_LIMIT, timings


def test_polaris_to_nginx(nginx_run: sandbox_base.Running, backends: list[Backend], peers: harness.PeerPool) -> None:
    """A real registry as the source: natives registered in Polaris become nginx upstream servers."""
    pytest.importorskip("syncworker.connectors.polaris")
    polaris = peers.get("polaris")
    raw = RawPolaris(polaris)
    service = f"gw-nginx-{uuid.uuid4().hex[:8]}"
    upstream = f"default.{service}"
    b0, b1, b2 = backends
    cfg = config("polaris-nginx", polaris_source(polaris), {
        "name": "edge-nginx", "type": "nginx", "addresses": ["file:///unused"], "options": options(nginx_run),
    }, [{"namespace": "default", "service": service}])
    port = peers.alloc.one()
    url = f"http://127.0.0.1:{port}/"
    path = upstreams(nginx_run)
    timings: dict[str, float] = {}

    async def scenario() -> None:
        await raw.register("default", service, b0.port)
        await raw.register("default", service, b1.port, weight=200)
        try:
            async with running_engine(cfg) as eng, client() as c:
                deadline = time.monotonic() + 15
                while f"upstream {upstream} {{" not in path.read_text():
                    assert time.monotonic() < deadline, path.read_text()
                    await asyncio.sleep(0.05)
                assert await eng.settle()
                await asyncio.to_thread(hand_append, nginx_run, front(port, {"/": upstream}))
                await wait_serving(c, url, {b0.name, b1.name})
                text = path.read_text()
                assert f"server 127.0.0.1:{b1.port} weight=200;" in text
                assert f"server 127.0.0.1:{b0.port} weight=100;" in text

                t0 = time.monotonic()
                await raw.register("default", service, b2.port)
                timings["add"] = await time_until_seen(c, url, b2.name, t0)
                t0 = time.monotonic()
                await raw.deregister("default", service, b0.port)
                timings["remove"] = await time_until_gone(c, url, b0.name, t0)
                assert set(await sample(c, url, 30)) == {b1.name, b2.name}
        finally:
            for b in backends:
                await raw.deregister("default", service, b.port)

    asyncio.run(scenario())
    print(f"polaris -> nginx propagation: {timings}")
    assert timings["add"] < PROPAGATION_LIMIT, timings
    assert timings["remove"] < PROPAGATION_LIMIT, timings


# ---- a removed task retires its blocks ------------------------------------------------------------
def destination(running: sandbox_base.Running) -> dict[str, object]:
    return {"name": "nginx", "type": "nginx", "addresses": ["file:///unused"], "options": options(running)}


def cleanup(running: sandbox_base.Running, address: str, service: str) -> int:
    """`cleanup_units` for the units of a removed task, with connectors of its own (as after a restart)."""
    cfg = config(TASK, address, destination(running), [{"namespace": NS, "service": service}])
    return asyncio.run(engine_mod.Engine(registry.create).cleanup_task(cfg.tasks[0]))


def test_a_removed_task_leaves_none_of_its_blocks(nginx_run: sandbox_base.Running, peers: harness.PeerPool,
                                                  store: tuple[str, memory.Store]) -> None:
    address, mem = store
    svc = model.ServiceKey(NS, "", "retired")
    for version in ("1", "2"):
        mem.put(svc, model.Instance(host="127.0.0.1", port=peers.alloc.one(), metadata={"version": version}))
    hand = "upstream hand_retire {\n    server 127.0.0.1:9; # keep me\n}\n"
    hand_append(nginx_run, hand)
    other = model.ServiceKey(NS, "", "retire-other")
    other_copy = marks.stamp(model.Instance(host="127.0.0.1", port=peers.alloc.one()), "other-task", "registry")
    conn = connector(nginx_run)
    assert all(o.ok for o in asyncio.run(conn.apply(other, planner.Plan(creates=(other_copy,)),
                                                    base.ApplyContext(task="other-task", desired=(other_copy,)))))
    other_block = next(b.text for b in nginx_mod.parse(upstreams(nginx_run).read_text(), "")
                       if isinstance(b, nginx_mod.Block) and b.task == "other-task")
    cfg = config(TASK, address, destination(nginx_run), [{"namespace": NS, "service": "retired", "groups": [
        {"name": "v2", "metadata": {"version": "2"}, "upstreamName": "retired-custom"}]}])
    path = upstreams(nginx_run)

    async def scenario() -> None:
        async with running_engine(cfg) as eng:
            deadline = time.monotonic() + 15
            while not all(f"upstream {n} {{" in path.read_text() for n in ("default.retired", "retired-custom")):
                assert time.monotonic() < deadline, path.read_text()
                await asyncio.sleep(0.05)
            assert await eng.settle()
            assert (await eng.apply_config(models.RegistryConfig()))["removed"] == [TASK]

    asyncio.run(scenario())
    text = path.read_text()
    assert "default.retired " not in text and "retired-custom" not in text
    assert not [b for b in nginx_mod.parse(text, "") if isinstance(b, nginx_mod.Block) and b.service.name == "retired"]
    assert hand in text and other_block in text
    assert conn.check() is None


def test_a_block_nginx_still_needs_stays_until_nothing_refers_to_it(nginx_run: sandbox_base.Running,
                                                                    peers: harness.PeerPool,
                                                                    store: tuple[str, memory.Store]) -> None:
    address, _ = store
    conn = connector(nginx_run)
    svc = model.ServiceKey(NS, "", "retire-held")
    name = nginx_mod.upstream_name(svc)
    asyncio.run(converge(conn, svc, [conn.representable(copy(peers.alloc.one()))]))
    port = peers.alloc.one()
    routes = front(port, {"/": name})
    hand_append(nginx_run, routes)
    path = upstreams(nginx_run)

    # the task is removed: its copy goes, a hand-written proxy_pass still names the upstream, so
    # nginx -t refuses the file without it: the block stays with its placeholder (502)
    assert cleanup(nginx_run, address, "retire-held") == 1
    held = path.read_text()
    assert f"upstream {name} {{\n    {nginx_mod.PLACEHOLDER}\n}}" in held
    (kept,) = asyncio.run(conn.retire(svc, base.ApplyContext(task=TASK)))
    assert (kept.kind, kept.name, kept.action) == ("block", name, base.KEPT)
    assert "nginx -t refuses" in kept.reason and name in kept.reason
    assert path.read_text() == held
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5.0).status_code == 502

    # the operator drops the proxy_pass: a later cleanup of the unit retires the block, with no copy to delete
    hand_remove(nginx_run, routes)
    assert cleanup(nginx_run, address, "retire-held") == 0
    assert f"upstream {name} " not in path.read_text()
    assert conn.check() is None


def test_a_hand_added_server_keeps_its_block(nginx_run: sandbox_base.Running, peers: harness.PeerPool,
                                             store: tuple[str, memory.Store]) -> None:
    address, _ = store
    conn = connector(nginx_run)
    svc = model.ServiceKey(NS, "", "retire-kept")
    name = nginx_mod.upstream_name(svc)
    ours = conn.representable(copy(peers.alloc.one()))
    asyncio.run(converge(conn, svc, [ours]))
    hand_port = peers.alloc.one()
    text = upstreams(nginx_run).read_text()
    head = f"upstream {name} {{\n"
    Nginx().apply_upstreams(nginx_run, text.replace(head, f"{head}    server 127.0.0.1:{hand_port}; # by hand\n"))
    assert cleanup(nginx_run, address, "retire-kept") == 1
    # the block is rendered anew around the hand-added server (as a write keeps it), without the copy
    assert [(i.host, i.port, dict(i.metadata)) for i in asyncio.run(conn.list_instances(svc)).instances] == [
        ("127.0.0.1", hand_port, {})]
    assert f"upstream {name} {{" in upstreams(nginx_run).read_text()
    (kept,) = asyncio.run(conn.retire(svc, base.ApplyContext(task=TASK)))
    assert (kept.kind, kept.name, kept.action) == ("block", name, base.KEPT) and str(hand_port) in kept.reason
    assert conn.check() is None


def test_an_unreadable_file_fails_retiring_without_rewriting(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.conf"
    text = f"# syncworker task={TASK} origin=o namespace=default group= service=x\nupstream default.x {{\n"
    path.write_text(text)
    conn = registry.create(base.Endpoint(name="n", type="nginx", addresses=(f"file://{path}",)))
    (failed,) = asyncio.run(conn.retire(model.ServiceKey("default", "", "x"), base.ApplyContext(task=TASK)))
    assert failed.action == base.FAILED and "not closed" in failed.reason
    assert path.read_text() == text
