"""The shared store against a real Redis: locks under contention, rerun flags, leases, config push."""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from syncworker import errors, model
from syncworker.cluster import codec
from syncworker.cluster import store as store_mod
from syncworker.reconcile import unit as unit_mod

pytestmark = pytest.mark.peers

GOOD = """{
  // a comment, as polaris-sync files have them
  "tasks": [{"name": "a-to-b", "source": {"name": "A", "type": "memory", "addresses": ["mem-a"]},
             "destination": {"name": "B", "type": "memory", "addresses": ["mem-b"]},
             "match": [{"namespace": "ns", "service": "*"}]}]
}"""
BAD = """{"tasks": [{"name": "x", "source": {"name": "A", "type": "nope", "addresses": []},
                    "match": []}]}"""


@pytest.fixture
def st(redis_url: str) -> Iterator[store_mod.Store]:
    s = store_mod.Store.from_url(redis_url, f"t{uuid.uuid4().hex[:10]}")
    yield s
    s.flush()


def test_lock_is_exclusive_under_contention(st: store_mod.Store) -> None:
    """Eight threads race for one unit; their runs, recorded in the stream, never overlap."""
    busy = 0
    guard = threading.Lock()

    def contender(name: str) -> None:
        nonlocal busy
        for _ in range(40):
            got = st.lock_or_flag_rerun("u", name, ttl=5)
            if isinstance(got, store_mod.Busy):
                assert got.holder and got.holder != name
                with guard:
                    busy += 1
                time.sleep(random.uniform(0, 0.002))
                continue
            start = time.time()
            time.sleep(random.uniform(0, 0.003))
            end = time.time()
            st.release_lock(got)
            st.record_run("u", name, start, end, "ok")

    threads = [threading.Thread(target=contender, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = sorted(st.runs(), key=lambda r: r["start"])
    assert len(runs) > 20 and busy > 20, (len(runs), busy)
    for before, after in itertools.pairwise(runs):
        assert after["start"] >= before["end"], (before, after)


def test_a_mark_during_a_run_becomes_one_rerun(st: store_mod.Store) -> None:
    held = st.lock_or_flag_rerun("u", "a", ttl=5)
    assert isinstance(held, store_mod.Lock)
    for _ in range(3):  # a burst of marks while it runs
        busy = st.lock_or_flag_rerun("u", "b", ttl=5)
        assert isinstance(busy, store_mod.Busy) and busy.holder == "a" and 0 < busy.ttl <= 5
    assert st.release_lock(held) is True  # the holder runs it once more
    again = st.lock_or_flag_rerun("u", "a", ttl=5)
    assert isinstance(again, store_mod.Lock)
    assert st.release_lock(again) is False  # the flag was consumed: no second rerun


def test_lock_expires_renews_and_is_never_released_by_a_former_holder(st: store_mod.Store) -> None:
    first = st.lock_or_flag_rerun("u", "a", ttl=0.3)
    assert isinstance(first, store_mod.Lock)
    time.sleep(0.2)
    assert st.renew_lock(first, 0.3)
    time.sleep(0.2)
    assert st.lock_holder("u") == "a"  # renewed: still held past the first TTL
    time.sleep(0.4)
    assert st.lock_holder("u") is None  # not renewed: expired
    second = st.try_lock("u", "b", ttl=5)
    assert second is not None
    assert not st.renew_lock(first, 5)
    st.release_lock(first)  # compare-and-delete: b's lock stays
    assert st.lock_holder("u") == "b"


def test_lease_expires_and_another_worker_takes_over(st: store_mod.Store) -> None:
    a = st.acquire_lease("watch:t", "worker-a", ttl=0.4)
    assert a is not None
    assert st.acquire_lease("watch:t", "worker-b", ttl=0.4) is None
    time.sleep(0.25)
    assert st.renew_lease(a, 0.4)
    time.sleep(0.25)
    assert st.acquire_lease("watch:t", "worker-b", ttl=0.4) is None  # renewed in time
    time.sleep(0.5)  # worker-a stops renewing (it died)
    assert st.lease("watch:t") is None
    b = st.acquire_lease("watch:t", "worker-b", ttl=5)
    assert b is not None and st.lease("watch:t")["owner"] == "worker-b"  # type: ignore[index]
    assert not st.renew_lease(a, 5)  # the former holder learns it lost the duty
    st.release_lease(a)
    assert st.lease("watch:t")["owner"] == "worker-b"  # type: ignore[index]
    st.release_lease(b)
    assert st.lease("watch:t") is None


def test_config_push_refuses_a_bad_config_and_keeps_the_old_one(st: store_mod.Store) -> None:
    assert st.push_config(GOOD, "good.json") == 1
    with pytest.raises(errors.ConfigError) as exc:
        st.push_config(BAD, "bad.json")
    paths = {p.path.split(" ")[0] for p in exc.value.problems}
    assert {"tasks[0].source.addresses", "tasks[0].source.type", "tasks[0].destination",
            "tasks[0].match"} <= paths, exc.value.problems
    kept = st.pushed_config()
    assert kept is not None and kept.text == GOOD and kept.version == 1


def test_dispatches_coalesce_until_the_job_starts(st: store_mod.Store) -> None:
    ref = {"task": "t", "unit": "ns/svc", "service": ["ns", "", "svc"]}
    now = time.time()
    assert st.queue(ref, now + 5)  # a delayed retry
    assert st.queue(ref, now)  # an immediate mark goes ahead of it
    assert not st.queue(ref, now + 0.1)  # a burst of marks: one job
    assert not st.queue(ref, now + 10)
    st.received("t:ns/svc", "worker-a")
    assert st.queued()["t:ns/svc"]["worker"] == "worker-a"
    st.dequeue("t:ns/svc")  # the job starts
    assert st.queue(ref, now)  # a mark after the start is a new job


def test_cluster_rate_limit_is_shared(st: store_mod.Store) -> None:
    assert st.take_tokens("t", 10, rate=10) == 0
    wait = st.take_tokens("t", 5, rate=10)
    assert 0.3 < wait <= 0.6
    assert st.take_tokens("t", 5, rate=0) == 0  # unlimited


def test_unit_state_survives_between_runs(st: store_mod.Store) -> None:
    state = unit_mod.UnitState(
        pending_deletes={("10.0.0.1", 80): 1700000000.5},
        copies=(model.Instance("10.0.0.2", 81, 0.5, metadata={"k": "v"}, ephemeral=True, native_id="x"),),
        outcome="held deletes", held_deletes=1, failures=2, runs=7)
    state.ops["create"] = 3
    st.save_state("t:ns/svc", state, task="t", worker="w")
    loaded = st.load_state("t:ns/svc")
    assert loaded == state
    assert codec.state_from_json(codec.state_to_json(state)) == state


def test_a_started_run_is_never_invisible_to_the_sweep(st: store_mod.Store) -> None:
    """Lock, queued entry and running entry change together, so a worker killed between any two steps
    leaves a trace the leader's sweep acts on (before, a lock taken just before the kill stranded its unit)."""
    ref = {"task": "t", "unit": "ns/svc", "service": ["ns", "", "svc"]}
    assert st.queue(ref, time.time())
    held = st.start_run(ref, "a", ttl=5)
    assert isinstance(held, store_mod.Lock)
    assert "t:ns/svc" not in st.queued() and st.running()["t:ns/svc"]["worker"] == "a"
    assert st.queue(ref, time.time())  # a mark while it runs is a new job ...
    busy = st.start_run(ref, "b", ttl=5)  # ... which finds it busy, flags a rerun and leaves the queue
    assert isinstance(busy, store_mod.Busy) and busy.holder == "a"
    assert "t:ns/svc" not in st.queued() and st.running()["t:ns/svc"]["worker"] == "a"
    assert st.finish_run(held) is True
    assert st.running() == {} and st.lock_holder("t:ns/svc") is None


def test_a_run_that_lost_its_lock_leaves_the_new_holders_entry(st: store_mod.Store) -> None:
    ref = {"task": "t", "unit": "ns/svc", "service": ["ns", "", "svc"]}
    first = st.start_run(ref, "a", ttl=0.2)
    assert isinstance(first, store_mod.Lock)
    time.sleep(0.3)  # a stops renewing; its lock runs out
    second = st.start_run(ref, "b", ttl=5)
    assert isinstance(second, store_mod.Lock)
    assert st.finish_run(first) is False
    assert st.running()["t:ns/svc"]["worker"] == "b" and st.lock_holder("t:ns/svc") == "b"
    st.finish_run(second)
    assert st.running() == {}
