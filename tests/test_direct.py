"""The direct-routing client (``zkv.Client(addr, direct=True)``) on real processes.

It routes with the proxy's own core straight to the nodes, so what it answers must be
what the proxy answers; with a stale view it is refused (STALE_EPOCH, MOVED) and
refreshes, never has a stale write acknowledged; a node it cannot reach sends it
through the proxy. An independent model of the acknowledged writes (tests/load.py)
checks the moves.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Cluster, free_port, wait_until
from load import Load, Mix, assert_counts_match_ring, read_back

import zkv

pytestmark = pytest.mark.timeout(180)

MIX = Mix(set=0.45, delete=0.15, mset=0.05, mget=0.1)


def preload(c: zkv.Client, n: int = 3000) -> dict[bytes, bytes]:
    data = {b"pre-%05d" % i: b"v%05d" % i for i in range(n)}
    items = list(data.items())
    for i in range(0, n, 1000):
        assert c.mset(dict(items[i:i + 1000]))
    return data


def node_requests(c: zkv.Client) -> dict[str, int]:
    return {addr: sum(n["ops"].get(op, 0) for op in ("GET", "SET"))
            for addr, n in c.info()["nodes"].items()}


def test_every_command_answers_as_through_the_proxy(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=3, limits={"max_value_bytes": 1000})
    d = cluster.client(timeout=5, direct=True)
    p = cluster.client(timeout=5)
    data = preload(d)
    assert p.mget(list(data)) == list(data.values())  # written direct, read via the proxy
    assert d.mget(list(data)) == list(data.values())
    assert d.set("k", "v") and d.get("k") == b"v" and p.get("k") == b"v"
    assert d.exists("k") and d.delete("k") and not d.exists("k") and not d.delete("k")
    assert d.get("missing") is None and d.ping()
    with d.pipeline() as pipe:
        pipe.set("a", "1").get("a").delete("a").exists("a").get("pre-00007").ping()
        assert pipe.execute() == [True, b"1", True, False, b"v00007", True]
    results = d.call_many([("SET", [b"c1", b"x"]), ("GET", [b"c1"]), ("GET", [b"nope"]),
                           ("NOSUCH", [])])
    assert results[:3] == ["OK", b"x", None]
    assert isinstance(results[3], zkv.UnknownCommand)
    assert sorted(d.scan_iter(match="pre-0000*")) == sorted(
        k for k in data if k.startswith(b"pre-0000"))
    assert sorted(d.keys("pre-0001*")) == sorted(p.keys("pre-0001*"))
    # what the core does not serve goes to the proxy
    assert d.info()["proxy"]["role"] == "proxy"
    assert d.status()["epoch"] == p.status()["epoch"]
    with pytest.raises(zkv.UnknownCommand):
        d.call("NOSUCH")
    with pytest.raises(zkv.LimitExceeded, match="over the limit of 1000") as via_direct:
        d.set("big", b"x" * 1001)
    with pytest.raises(zkv.LimitExceeded) as via_proxy:
        p.set("big", b"x" * 1001)
    assert str(via_direct.value) == str(via_proxy.value)


def test_transactions_through_the_proxy_and_direct(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=3)
    for direct in (False, True):
        c = cluster.client(timeout=5.0, direct=direct)
        tag = b"{d%d}" % direct
        with c.pipeline(transaction=True) as p:
            p.set(tag + b"a", b"1").incr(tag + b"a").get(tag + b"a").delete(tag + b"no")
            p.set(tag + b"text", b"abc").incr(tag + b"text").ping()
            got = p.execute(raise_on_error=False)
        assert got[:5] == [True, 2, b"2", False, True] and got[6] is True
        assert isinstance(got[5], zkv.CommandError)  # its own error: it undoes nothing
        keys = [b"x%d-%d" % (direct, i) for i in range(30)]  # on every node
        p = c.pipeline(transaction=True)
        for k in keys:
            p.set(k, b"v")
        with pytest.raises(zkv.CrossNode, match="hash tag"):
            p.execute()
        assert c.mget(keys) == [None] * len(keys)  # nothing ran
        assert c.pipeline(transaction=True).execute() == []
        c.close()


def test_requests_go_straight_to_the_nodes(make_cluster: Any) -> None:
    """The proxy forwards none of them: the nodes' request counts grow by what was sent,
    the proxy's by nothing but our INFO calls."""
    cluster: Cluster = make_cluster(nodes=3)
    d = cluster.client(timeout=5, direct=True)
    p = cluster.client(timeout=5)
    assert d.ping()
    proxy_before = p.info()["proxy"]["requests"]
    nodes_before = node_requests(p)
    for i in range(300):
        assert d.set(f"k{i}", "v")
    assert [d.get(f"k{i}") for i in range(300)] == [b"v"] * 300
    proxy_after = p.info()["proxy"]["requests"]
    nodes_after = node_requests(p)
    assert proxy_after - proxy_before <= 2  # the INFO calls themselves
    grew = {a: nodes_after[a] - nodes_before[a] for a in nodes_after}
    assert sum(grew.values()) >= 600 and all(n > 0 for n in grew.values()), grew


def test_a_stale_direct_client_refreshes_and_loses_nothing(make_cluster: Any, procs: Any,
                                                           tmp_path: Any) -> None:
    """A direct client that learned the configuration before an ADD and a REMOVE keeps
    working after both: the nodes refuse its stale requests, it refreshes, and every
    write it had acknowledged reads back."""
    cluster: Cluster = make_cluster(nodes=2)
    d = cluster.client(timeout=5, direct=True)
    admin = cluster.client(timeout=10)
    data = preload(d, 2000)
    epoch = d._direct.epoch
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    admin.add_node(f"127.0.0.1:{port}", wait_timeout=60)
    admin.remove_node(cluster.node_addrs[0], wait_timeout=60)
    assert d._direct.epoch == epoch  # nothing told it yet
    assert d.mget(list(data)) == list(data.values())
    assert d._direct.epoch == admin.status()["epoch"]
    assert d.set("after", "x") and admin.get("after") == b"x"


def test_a_node_it_cannot_reach_sends_it_through_the_proxy(make_cluster: Any) -> None:
    """With one node's port closed the direct client's requests for it go through the
    proxy, which answers as it would anyone (NODE_DOWN: nothing lost, nothing
    pretended); the other nodes' keys are served, through the proxy meanwhile, and
    straight again once the node is back."""
    cluster: Cluster = make_cluster(nodes=3)
    d = cluster.client(timeout=3, direct=True)
    p = cluster.client(timeout=3)
    data = preload(d, 600)
    victim = cluster.node_addrs[0]
    ring = zkv.core.ring.Ring(p.status()["members"], p.status()["vnodes"])
    theirs = [k for k in data if ring.owner(k) == victim]
    others = [k for k in data if ring.owner(k) != victim]
    cluster.kill_node(victim)
    before = p.info()["proxy"]["requests"]
    with pytest.raises(zkv.NodeUnavailable):
        d.get(theirs[0])
    # it went through the proxy (counted there; the fallback's second may be over by
    # now on a loaded machine, so its window is not what is checked)
    assert p.info()["proxy"]["requests"] - before >= 2
    assert [d.get(k) for k in others[:50]] == [data[k] for k in others[:50]]
    cluster.restart_node(victim)
    cluster.wait_all_up()
    wait_until(lambda: d.get(theirs[0]) == data[theirs[0]], 10)
    time.sleep(1.1)  # the fallback lasts a second
    before = p.info()["proxy"]["requests"]
    assert [d.get(k) for k in theirs[:50]] == [data[k] for k in theirs[:50]]
    assert p.info()["proxy"]["requests"] - before <= 1


def test_with_the_proxy_gone_a_direct_client_goes_on(make_cluster: Any) -> None:
    """It needs the proxy only for its first configuration (and the nodes give newer
    ones while the proxy is down)."""
    cluster: Cluster = make_cluster(nodes=3)
    d = cluster.client(timeout=3, direct=True)
    data = preload(d, 500)
    cluster.kill_proxy()
    assert d.mget(list(data)) == list(data.values())
    assert d.set("k", "v") and d.get("k") == b"v"
    with pytest.raises(zkv.NotSent):
        d.info()  # the proxy's own command: said plainly


def test_without_a_proxy_it_says_so(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=1)
    cluster.kill_proxy()
    d = zkv.Client(cluster.address, timeout=1, retries=0, direct=True)
    try:
        with pytest.raises(zkv.NotSent, match="no cluster configuration"):
            d.get("k")
    finally:
        d.close()


def test_direct_clients_through_an_add_and_a_remove_under_load_lose_nothing(
        make_cluster: Any, procs: Any, tmp_path: Any) -> None:
    """Direct-routing writers beside proxy writers through a full ADD and REMOVE. The
    direct clients learn each epoch only from the nodes' refusals of what they routed
    by the one before. Afterwards every acknowledged write reads back through both, no
    read was stale, and every node holds exactly its share."""
    cluster: Cluster = make_cluster(nodes=3, proxy={"timeout_ms": 2000})
    admin = cluster.client(timeout=10)
    initial = preload(admin, 4000)
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    new = f"127.0.0.1:{port}"
    with Load(cluster.address, MIX, initial, workers=2, keys_each=200, pause=0.002,
              prefix="dir", direct=True) as direct, \
            Load(cluster.address, MIX, initial, workers=1, keys_each=200, pause=0.002,
                 prefix="pxy") as proxied:
        admin.add_node(new, rate=20_000, wait_timeout=90)
        time.sleep(0.5)
        admin.remove_node(cluster.node_addrs[0], rate=20_000, wait_timeout=90)
        time.sleep(0.5)
    for load in (direct, proxied):
        load.check_threads()
    expected = {k: {v} for k, v in initial.items()}
    expected.update(direct.possible())
    expected.update(proxied.possible())
    d = cluster.client(timeout=10, direct=True)
    found = read_back(admin.mget, expected)
    assert read_back(d.mget, expected) == found
    assert_counts_match_ring(admin, set(found))
    totals = direct.totals()
    assert totals["acked_sets"] > 200 and totals["reads"] > 200, totals
    # each learned the new epochs from the nodes' refusals, several times over
    assert all(w.client._direct.refreshes >= 3 for w in direct.workers)
