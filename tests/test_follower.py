"""Follower proxies and routers at different epochs, on real processes.

A follower learns the configuration from the config manager (or from the nodes while
the manager is down) and routes with the same core. Nodes refuse what any router
routed by an older epoch, so two routers at different epochs during an ADD and a
REMOVE never have a write acknowledged that reads through the current view miss:
an independent model of the acknowledged writes checks it (tests/load.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import Cluster, Proc, free_port, wait_until
from load import Load, Mix, assert_counts_match_ring, read_back

import zkv

pytestmark = pytest.mark.timeout(180)

MIX = Mix(set=0.45, delete=0.15, mset=0.05, mget=0.1)


def start_follower(cluster: Cluster, poll: float | None = None) -> tuple[str, Proc]:
    port = free_port()
    env = {"ZKV_FOLLOWER_POLL": str(poll)} if poll else None
    proc = cluster.procs.start("proxy", "--config", str(cluster.topo.path), "--port", str(port),
                               "--follow", cluster.address, ready="zkv proxy ", env=env)
    return f"127.0.0.1:{port}", proc


def preload(c: zkv.Client, n: int = 5000) -> dict[bytes, bytes]:
    data = {b"pre-%05d" % i: b"v%05d" % i for i in range(n)}
    items = list(data.items())
    for i in range(0, n, 1000):
        c.mset(dict(items[i:i + 1000]))
    return data


def test_a_follower_serves_data_and_follows_every_change(make_cluster: Any, procs: Any,
                                                         tmp_path: Any) -> None:
    cluster: Cluster = make_cluster(nodes=2)
    address, proc = start_follower(cluster)
    assert f"follows={cluster.address}" in proc.output
    f = cluster.client(timeout=10, address=address)
    m = cluster.client(timeout=10)
    assert f.set("via", "follower") and m.get("via") == b"follower"
    assert m.set("via-m", "manager") and f.get("via-m") == b"manager"
    data = preload(f, 2000)
    assert f.mget(list(data)[:50]) == list(data.values())[:50]
    with f.pipeline() as p:
        for k in list(data)[:20]:
            p.get(k)
        assert p.execute() == list(data.values())[:20]
    assert f.info()["proxy"]["role"] == "follower"
    assert f.status()["epoch"] == m.status()["epoch"]
    # an ADD through the follower is the manager's: it runs there, and the follower follows
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    result = f.add_node(f"127.0.0.1:{port}", wait_timeout=60)
    assert isinstance(result, dict) and result["finished"]
    epoch = m.status()["epoch"]
    wait_until(lambda: f.call("CONFIG")["epoch"] == epoch, 1.5,
               what="the follower taking the new epoch within a second or so")
    assert f.mget(list(data)) == list(data.values())
    assert len(f.nodes()) == 3


def test_a_follower_started_before_its_manager_waits_for_it_quietly(
        make_cluster: Any) -> None:
    """zkv up and honcho start every process at once, so a follower often asks before
    its manager is listening: no warning for that, and it serves once the manager is up."""
    cluster: Cluster = make_cluster(nodes=2)
    cluster.kill_proxy()
    address, proc = start_follower(cluster)
    time.sleep(0.5)  # a few asks unanswered
    cluster.start_proxy()
    f = cluster.client(timeout=5, retries=2, address=address)
    assert f.set("k", "v") and f.get("k") == b"v"
    wait_until(lambda: f.info()["proxy"]["manager_up"], 10, what="the manager reached")
    assert f.status()["epoch"] >= 1
    assert "does not answer" not in proc.output and "WARNING" not in proc.output
    assert "waiting for the config manager" in proc.output
    # once it has answered, losing it is worth a warning
    cluster.kill_proxy()
    wait_until(lambda: "does not answer" in proc.output, 5,
               what="a warning that the config manager is gone")


def test_with_the_manager_killed_data_goes_on_through_a_follower(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=3)
    address, _ = start_follower(cluster)
    f = cluster.client(timeout=5, address=address)
    data = preload(f, 1000)
    cluster.kill_proxy()
    errors = 0
    deadline = time.monotonic() + 2.0
    n = 0
    while time.monotonic() < deadline:  # writes and reads with the manager gone
        n += 1
        key = b"after-%05d" % n
        try:
            assert f.set(key, b"x") and f.get(key) == b"x"
        except zkv.ZkvError:
            errors += 1
    assert errors == 0 and n > 50
    assert f.mget(list(data)) == list(data.values())
    with pytest.raises(zkv.ClusterError, match="config manager .* does not answer"):
        f.add_node("127.0.0.1:1")
    # NODES through the follower answers (and says nothing of the manager's moves)
    done = subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", address, "NODES"],
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert cluster.node_addrs[0] in done.stdout.decode()
    # the manager back: a change made there reaches the follower within a second
    cluster.start_proxy()
    m = cluster.client(timeout=5, retries=2)
    wait_until(m.ping, 10)
    before = m.status()["epoch"]
    victim = cluster.node_addrs[2]
    m.remove_node(victim, wait_timeout=60)
    assert m.status()["epoch"] > before
    epoch = m.status()["epoch"]
    wait_until(lambda: f.call("CONFIG")["epoch"] == epoch, 1.5, what="the follower catching up")
    assert f.mget(list(data)) == list(data.values())
    assert victim not in {n["address"] for n in f.nodes()}


def test_a_follower_started_without_its_manager_learns_from_the_nodes(
        make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=2)
    m = cluster.client(timeout=5)
    assert m.set("k", "v")
    epoch = m.status()["epoch"]
    cluster.kill_proxy()
    address, _ = start_follower(cluster)
    f = cluster.client(timeout=5, address=address)
    assert f.call("CONFIG")["epoch"] == epoch
    assert f.get("k") == b"v" and f.set("k2", "v2")


@pytest.mark.parametrize("lag", [None, 3.0], ids=["following", "lagging"])
def test_two_routers_at_different_epochs_through_an_add_and_a_remove_lose_nothing(
        make_cluster: Any, procs: Any, tmp_path: Any, lag: float | None) -> None:
    """Writers on the manager and on a follower at once through an ADD and a REMOVE;
    in the "lagging" run the follower asks for new configurations only every 3 s, so
    it routes by an older epoch for much of the move and its requests are refused
    and routed again. Afterwards every acknowledged write reads back, through either
    router, and no read returned a stale value."""
    cluster: Cluster = make_cluster(nodes=3, proxy={"timeout_ms": 2000})
    address, _ = start_follower(cluster, poll=lag)
    admin = cluster.client(timeout=10)
    initial = preload(admin, 5000)
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    new = f"127.0.0.1:{port}"
    with Load(cluster.address, MIX, initial, workers=2, keys_each=200, pause=0.002,
              prefix="mgr") as on_manager, \
            Load(address, MIX, initial, workers=2, keys_each=200, pause=0.002,
                 prefix="fol") as on_follower:
        admin.add_node(new, rate=20_000, wait_timeout=90)
        time.sleep(0.5)
        admin.remove_node(cluster.node_addrs[0], rate=20_000, wait_timeout=90)
        time.sleep(0.5)
    for load in (on_manager, on_follower):
        load.check_threads()  # no worker saw a stale read
    expected = {k: {v} for k, v in initial.items()}
    expected.update(on_manager.possible())
    expected.update(on_follower.possible())
    follower = cluster.client(timeout=10, address=address)
    wait_until(lambda: follower.call("CONFIG")["epoch"] == admin.status()["epoch"], 10)
    found = read_back(admin.mget, expected)
    assert read_back(follower.mget, expected) == found
    assert_counts_match_ring(admin, set(found))
    totals = {k: on_manager.totals()[k] + on_follower.totals()[k]
              for k in ("acked_sets", "acked_dels")}
    assert totals["acked_sets"] > 300, totals
