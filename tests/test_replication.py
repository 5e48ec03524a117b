"""Replication through real processes: shards of a primary and a replica, writers on
every shard, and nodes killed under them (zkv.core.replication, zkv.replicator).

Every test checks acknowledged writes with tests/load.py's independent checker: a key
read back must hold its last acknowledged value (or a value whose write's outcome was
unknown), never an older one, and no acknowledged delete comes back.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import cbor2
import pytest
from conftest import Cluster, wait_until
from load import Load, Mix, read_back

import zkv
from zkv.core.ring import Ring

pytestmark = pytest.mark.timeout(120)

MIX = Mix(set=0.5, delete=0.1, mset=0.1, mget=0.1)


def replicated(make_cluster: Any, nodes: int = 3, **proxy: Any) -> Cluster:
    cluster: Cluster = make_cluster(nodes=nodes, replicas=1, defaults={"fsync": "always"},
                                    proxy={"timeout_ms": 3000, **proxy})
    wait_in_sync(cluster)
    return cluster


def rows(cluster: Cluster) -> list[dict[str, Any]]:
    c = cluster.client(timeout=3.0)
    try:
        return list(c.nodes())
    finally:
        c.close()


def wait_in_sync(cluster: Cluster, timeout: float = 20.0) -> None:
    """Until NODES shows every replica up and in sync."""
    def synced() -> bool:
        replicas = [r for r in rows(cluster) if r.get("role") == "replica"]
        return bool(replicas) and all(r["in_sync"] and r["state"] == "up" for r in replicas)

    wait_until(synced, timeout, what="every replica in sync")


def primary_of(cluster: Cluster, shard: str) -> str:
    return next(r["address"] for r in rows(cluster)
                if r.get("shard") == shard and r["role"] == "primary")


def keys_of(address: str) -> int:
    c = zkv.Client(address, timeout=3.0, retries=0)
    try:
        return int(c.info()["keys"])
    finally:
        c.close()


def test_writes_reach_the_replica_before_they_are_acknowledged(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client()
    for i in range(200):
        assert c.set(b"k%d" % i, b"v%d" % i)
    # acknowledged means held by the in-sync replica too: stop the primary's process
    # at once and the replica has every key
    cluster.nodes[shard].signal(signal.SIGSTOP)
    try:
        assert keys_of(replica) == 200
        # what it was shipped is counted and timed as its load (INFO, zkv top)
        raw = zkv.Client(replica, timeout=3.0, retries=0)
        try:
            info = raw.info()
        finally:
            raw.close()
        assert info["ops"]["XREPL"] >= 200 and sum(info["latency_buckets"]) >= 200 // 32
    finally:
        cluster.nodes[shard].signal(signal.SIGCONT)
    table = {r["address"]: r for r in rows(cluster)}
    assert table[shard]["role"] == "primary" and table[shard]["shard"] == shard
    assert table[replica]["role"] == "replica" and table[replica]["in_sync"] is True
    assert table[replica]["keys"] == 200
    # zkv cli NODES into a pipe: the whole table, not cut at rich's 80 columns
    shown = subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", cluster.address,
                            "NODES"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and shard in shown.stdout and replica in shown.stdout


def test_a_replica_refuses_clients_and_says_where_to_go(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1)
    replica = cluster.replica_addrs[cluster.node_addrs[0]][0]
    direct = zkv.Client(replica, timeout=2.0, retries=0)
    try:
        with pytest.raises(zkv.Unavailable, match="is a replica of shard"):
            direct.set(b"k", b"v")
        with pytest.raises(zkv.Unavailable, match="go to the shard's primary"):
            direct.get(b"k")
        assert direct.ping()  # not a data request: answered
    finally:
        direct.close()


@pytest.mark.timeout(180)
def test_killing_a_primary_loses_no_acknowledged_write(make_cluster: Any) -> None:
    """3 shards x 2 nodes, fsync always, writers on every shard: kill -9 each shard's
    primary in turn. Every acknowledged write is readable after each failover, only
    the shard whose primary died sees errors, and only for a few seconds."""
    kill_primaries(make_cluster, 3)


def kill_primaries(make_cluster: Any, kills: int) -> None:
    """The body of the test above, killing the primaries of the first ``kills`` shards
    (test_security runs it with CURVE on)."""
    cluster = replicated(make_cluster)
    c = cluster.client(timeout=3.0)
    probe = cluster.client(timeout=1.0)
    ring = Ring({a: 1.0 for a in cluster.node_addrs}, c.status()["vnodes"])
    probes = {ring.owner(b"probe-%d" % i): b"probe-%d" % i for i in range(200)}
    failovers = []
    with Load(cluster.address, MIX, workers=3, keys_each=200, pause=0.002) as load:
        for shard in cluster.node_addrs[:kills]:
            wait_in_sync(cluster, 30)
            victim = primary_of(cluster, shard)
            began = time.monotonic()
            cluster.kill_node(victim)
            # the failover time: from the kill until a write to this shard is taken
            wait_until(lambda key=probes[shard]: probe.set(key, b"x"), 15, interval=0.02,
                       what=f"writes to shard {shard} again")
            failovers.append(time.monotonic() - began)
            assert primary_of(cluster, shard) != victim
            time.sleep(0.5)
            cluster.start_node(victim)  # it comes back as a replica and syncs
        wait_in_sync(cluster, 30)
        time.sleep(0.5)
    load.check_threads()
    totals = load.totals()
    assert totals["acked_sets"] > 500, totals
    read_back(c.mget, load.possible())
    assert c.status()["failovers"] == kills
    # the failover time, detection plus promotion (the target: under 3 s with
    # the default heartbeats; these tests run 200 ms x 3)
    print(f"failover times: {[round(f, 2) for f in failovers]}")
    assert max(failovers) < 10


def test_only_the_failed_shards_keys_see_errors(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=2)
    c = cluster.client(timeout=3.0)
    ring = Ring({a: 1.0 for a in cluster.node_addrs}, c.status()["vnodes"])
    keys = [b"key-%d" % i for i in range(400)]
    victim_shard = cluster.node_addrs[0]
    other = [k for k in keys if ring.owner(k) != victim_shard][:50]
    mine = [k for k in keys if ring.owner(k) == victim_shard][:50]
    for k in other + mine:
        c.set(k, k)
    cluster.kill_node(victim_shard)
    deadline = time.monotonic() + 6.0
    errors_other = errors_mine = 0
    while time.monotonic() < deadline:
        for k in other[:10]:
            try:
                c.set(k, k)
            except zkv.Unavailable:
                errors_other += 1
        try:
            c.set(mine[0], mine[0])
        except zkv.Unavailable:
            errors_mine += 1
        time.sleep(0.02)
    assert errors_other == 0
    assert errors_mine > 0  # it did fail over (and was unavailable meanwhile)
    assert c.mget(mine) == mine  # every acknowledged write of the failed shard is there


@pytest.mark.timeout(180)
def test_a_dead_replica_leaves_the_in_sync_set_and_writes_go_on(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=3.0)
    with Load(cluster.address, MIX, workers=2, keys_each=200, pause=0.002) as load:
        time.sleep(0.5)
        cluster.kill_node(replica)
        wait_until(lambda: not next(r for r in rows(cluster)
                                    if r["address"] == replica)["in_sync"], 10,
                   what="the dead replica leaving the in-sync set")
        # NODES says it waits, down: not that it is catching up
        row = next(r for r in rows(cluster) if r["address"] == replica)
        assert (row["state"], row["replication"]) == ("down", "waiting"), row
        before = load.totals()
        time.sleep(1.5)
        after = load.totals()
        # once the set has shrunk, writes go on and none fails
        assert after["unknown"] == before["unknown"], (before, after)
        assert after["acked_sets"] > before["acked_sets"]
        cluster.start_node(replica)  # it syncs again and rejoins
        wait_in_sync(cluster, 30)
        time.sleep(0.5)
    load.check_threads()
    read_back(c.mget, load.possible())
    # the replica holds what the primary holds, then: stop the primary and compare
    assert keys_of(replica) == keys_of(shard)


def test_below_min_in_sync_writes_are_refused_and_reads_go_on(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1, min_in_sync=2)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=3.0)
    assert c.set(b"k", b"before")
    cluster.kill_node(replica)

    def refused() -> bool:
        try:
            c.set(b"k", b"during")
        except zkv.Unavailable as exc:
            return "min_in_sync" in str(exc)
        return False

    # (the first write may have been in flight when the replica died: it is applied on
    # the primary alone, so it is not acknowledged either: its outcome is unknown)
    wait_until(refused, 10, what="writes refused below min_in_sync")
    with pytest.raises(zkv.Unavailable, match="min_in_sync"):
        c.set(b"k", b"refused")
    assert c.get(b"k") in (b"before", b"during")  # reads are served; refused is not there
    cluster.start_node(replica)
    wait_in_sync(cluster, 30)
    wait_until(lambda: c.set(b"k", b"after"), 10, what="writes taken again")
    assert c.get(b"k") == b"after"
    with pytest.raises(zkv.ClusterError, match="fewer than min_in_sync"):
        c.call("REPLICA", "REMOVE", replica)  # its writes would be refused for good
    with pytest.raises(zkv.ClusterError, match="one copy, fewer than min_in_sync"):
        c.add_node("127.0.0.1:1", wait=False)  # (a shard of one copy: the same)
    assert c.status()["members"] == {shard: 1.0}
    assert primary_of(cluster, shard) == shard and c.set(b"k", b"kept")


@pytest.mark.timeout(90)
def test_failover_to_a_replica_that_just_died_is_refused(make_cluster: Any) -> None:
    """Its heartbeats still say it is up for a moment: promoting it would leave the
    shard with a dead primary and no copy in sync."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    assert c.set(b"k", b"v")
    cluster.kill_node(replica)
    with pytest.raises(zkv.ClusterError, match="does not answer"):
        c.failover(shard, replica)
    with pytest.raises(zkv.ClusterError, match="answers heartbeats|does not answer|no replica in"):
        c.failover(shard)  # none named: no live one to take
    assert primary_of(cluster, shard) == shard
    wait_until(lambda: c.set(b"k", b"w"), 10, what="writes on the old primary")
    assert c.get(b"k") == b"w"


def test_a_primary_without_its_lease_serves_nothing(make_cluster: Any) -> None:
    """With the config manager gone, nobody can drop a silent replica from the in-sync
    set: its primary's lease runs out and it refuses reads and writes (a replica may be
    about to be promoted elsewhere); once the replica answers again, it serves."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    cluster.kill_proxy()
    direct = zkv.Client(shard, timeout=3.0, retries=0)
    try:
        assert direct.set(b"k", b"v1")  # the lease holds without the config manager
        cluster.nodes[replica].signal(signal.SIGSTOP)
        try:
            time.sleep(2.0)  # past the lease (1.2 s)
            with pytest.raises(zkv.Unavailable, match="no lease"):
                direct.get(b"k")
            with pytest.raises(zkv.Unavailable, match="no lease"):
                direct.set(b"k", b"v2")
        finally:
            cluster.nodes[replica].signal(signal.SIGCONT)
        wait_until(lambda: direct.get(b"k") == b"v1", 10, what="the lease renewed")
        assert direct.set(b"k", b"v3")
    finally:
        direct.close()


def test_a_restarted_primary_does_not_serve_until_reconfigured(make_cluster: Any) -> None:
    """kill -9 and an immediate restart (faster than the proxy notices): the new run has
    no session with its in-sync replica, so it serves nothing until the config manager
    promotes that replica (which holds every acknowledged write, where the restarted
    run may have lost its log's tail); the old primary then syncs back as a replica."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    c = cluster.client(timeout=3.0)
    for i in range(100):
        c.set(b"k%d" % i, b"v%d" % i)
    epoch = c.status()["epoch"]
    cluster.restart_node(shard)
    direct = zkv.Client(shard, timeout=3.0, retries=0)
    try:
        refusals = 0
        while c.status()["epoch"] == epoch:
            try:
                direct.get(b"k1")
            except zkv.Unavailable as exc:  # (or already told it is a replica now)
                assert "no lease" in str(exc) or "is a replica" in str(exc), exc
                refusals += 1
            time.sleep(0.02)
    finally:
        direct.close()
    # the replica is promoted (one epoch); the old primary syncs and joins (another)
    wait_until(lambda: c.status()["epoch"] >= epoch + 2, 20, what="the old primary in sync")
    wait_in_sync(cluster, 30)
    assert primary_of(cluster, shard) == cluster.replica_addrs[shard][0]
    # (a promoted replica serves once the lease its old primary may hold has run out)
    wait_until(lambda: c.mget([b"k%d" % i for i in range(100)])
               == [b"v%d" % i for i in range(100)], 10, what="every key read back")
    assert refusals > 0  # until then it served nothing


def test_the_direct_client_follows_a_failover(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    c = cluster.client(timeout=3.0, direct=True)
    assert c.set(b"k", b"v1")
    cluster.kill_node(shard)
    wait_until(lambda: primary_of(cluster, shard) != shard, 15, what="the failover")
    wait_until(lambda: c.set(b"k", b"v2"), 10, what="the direct client writing again")
    assert c.get(b"k") == b"v2"


def test_replicas_from_flags(procs: Any, tmp_path: Any) -> None:
    """zkv proxy --node P --replica P=R: the same shard as a topology's replicas:."""
    from conftest import free_port

    primary, replica, proxy = free_port(), free_port(), free_port()
    for port in (primary, replica):
        procs.node(port, str(tmp_path / f"n{port}"))
    p, r = f"127.0.0.1:{primary}", f"127.0.0.1:{replica}"
    procs.start("proxy", "--port", str(proxy), "--state-dir", str(tmp_path / "s"),
                "--node", p, "--replica", f"{p}={r}", "--min-in-sync", "2",
                ready="zkv proxy")
    c = zkv.Client(f"127.0.0.1:{proxy}", timeout=3.0)
    try:
        wait_until(lambda: any(n.get("in_sync") for n in c.nodes()), 20,
                   what="the replica in sync")
        assert c.set(b"k", b"v")  # two copies, as min_in_sync asks
        assert keys_of(r) == 1
    finally:
        c.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--replica", "127.0.0.1:1"], "expected PRIMARY=REPLICA"),
    (["--replica", "127.0.0.1:2=127.0.0.1:3"], "127.0.0.1:2 is not a node"),
    (["--replica", "127.0.0.1:1=127.0.0.1:1"], "already a node of the cluster"),
    (["--replica", "127.0.0.1:1=nowhere"], "--replica REPLICA"),
    # a shard with fewer copies than min_in_sync could never take a write
    (["--min-in-sync", "2"], "min_in_sync is 2, more copies than shard 127.0.0.1:1 (1 copy)"),
    (["--replica", "127.0.0.1:1=127.0.0.1:2", "--min-in-sync", "3"],
     "shard 127.0.0.1:1 (2 copies) has"),
    # a mistyped host would be a member down for ever (.invalid never resolves)
    (["--node", "no-such-host.invalid:5"], "node no-such-host.invalid:5: cannot resolve"),
    (["--replica", "127.0.0.1:1=replica.invalid:5"], "node replica.invalid:5: cannot resolve"),
])
def test_bad_replica_flags_are_one_clear_line(procs: Any, tmp_path: Any, args: list[str],
                                              message: str) -> None:
    proc = procs.start("proxy", "--state-dir", str(tmp_path / "s"), "--node", "127.0.0.1:1",
                       *args, ready=None)
    assert proc.wait_exit(15) != 0
    assert message in proc.output and "Traceback" not in proc.output
    assert not (tmp_path / "s" / "cluster.json").exists()  # nothing saved to start from


def test_a_replica_survives_malformed_replication_messages(make_cluster: Any) -> None:
    """XREPL is internal, but whoever can reach a node can send it: anything malformed
    gets an error reply, changes nothing, and the shard goes on as before."""
    from zkv.core import wal

    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=3.0)
    assert c.set(b"k", b"v")
    raw = zkv.Client(replica, timeout=3.0, retries=0)
    epoch = c.status()["epoch"]
    good = {"epoch": epoch, "session": "x", "seq": 0, "shard": shard, "from": shard}
    bad = [
        [],
        ["not a map"],
        [{**good, "data": "text"}],
        [{**good, "data": b"", "epoch": "1"}],
        [{**good, "data": b"", "epoch": 0}],  # an older epoch: a deposed primary
        [{**good, "data": b"\x00" * 20}],  # not log records
        [{**good, "data": wal.encode([wal.SET, "text", 5])}],  # records of the wrong shape
        [{**good, "data": b"", "session": 7}],
        [{**good, "data": b"", "seq": 5}],  # no such session
        [{**good, "data": b"", "sync": True, "from": "127.0.0.1:1"}],  # not its primary
    ]
    try:
        for args in bad:
            with pytest.raises(zkv.ZkvError):
                raw.call("XREPL", *args)
        # well formed, but not of the session the replica follows: refused too
        with pytest.raises(zkv.Unavailable, match="no session x here"):
            raw.call("XREPL", {**good, "data": wal.encode([wal.SET, b"k", b"evil"])})
    finally:
        raw.close()
    assert c.set(b"k2", b"v2") and c.get(b"k") == b"v"
    assert keys_of(replica) == 2  # its session with the primary went on throughout
    table = {r["address"]: r for r in rows(cluster)}
    assert table[replica]["in_sync"] and table[replica]["replication"] == "in_sync"


@pytest.mark.timeout(180)
def test_add_and_remove_move_keys_between_replicated_shards(make_cluster: Any,
                                                             procs: Any, tmp_path: Any) -> None:
    """A move streams primary to primary; what a destination takes, and what a source
    drops, reaches their replicas like any write. ADD of a plain node, then REMOVE of
    a replicated shard, under writers: nothing acknowledged is lost, and each remaining
    replica holds exactly what its primary holds."""
    from conftest import free_port

    cluster = replicated(make_cluster, nodes=2)
    c = cluster.client(timeout=10.0)
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    new = f"127.0.0.1:{port}"
    with Load(cluster.address, MIX, workers=2, keys_each=300, pause=0.002) as load:
        time.sleep(0.5)
        c.add_node(new)
        gone = cluster.node_addrs[0]
        c.remove_node(gone)
        time.sleep(0.5)
    load.check_threads()
    read_back(c.mget, load.possible())
    status = c.status()
    assert sorted(status["members"]) == sorted([cluster.node_addrs[1], new])
    stay = cluster.node_addrs[1]
    wait_in_sync(cluster, 30)
    replica = cluster.replica_addrs[stay][0]
    assert keys_of(replica) == keys_of(primary_of(cluster, stay))
    table = rows(cluster)
    assert {r["address"] for r in table} == {stay, replica, new}  # the removed shard's gone


@pytest.mark.timeout(180)
def test_a_dead_node_is_replaced_with_replica_add_and_remove(make_cluster: Any, procs: Any,
                                                             tmp_path: Any) -> None:
    """The primary dies for good (its replica takes over), then a new empty node is
    attached with REPLICA ADD and the dead one detached with REPLICA REMOVE, while
    writers run: the copy count is back to two, and nothing acknowledged is lost."""
    from conftest import free_port

    cluster = replicated(make_cluster, nodes=2)
    shard = cluster.node_addrs[0]
    c = cluster.client(timeout=10.0)
    with Load(cluster.address, MIX, workers=2, keys_each=300, pause=0.002) as load:
        time.sleep(0.5)
        cluster.kill_node(shard)  # gone for good
        wait_until(lambda: primary_of(cluster, shard) != shard, 15, what="the failover")
        port = free_port()
        procs.node(port, str(tmp_path / "fresh"))
        fresh = f"127.0.0.1:{port}"
        row = c.add_replica(shard, fresh, wait_timeout=60)
        assert row["in_sync"] and row["shard"] == shard
        assert c.remove_replica(shard)["removed"] == shard  # the dead machine's node
        time.sleep(0.5)
    load.check_threads()
    read_back(c.mget, load.possible())
    table = {r["address"]: r for r in rows(cluster)}
    mine = {a: r for a, r in table.items() if r.get("shard") == shard}
    assert sorted(mine) == sorted([cluster.replica_addrs[shard][0], fresh])
    assert mine[fresh]["in_sync"] and mine[fresh]["role"] == "replica"
    assert keys_of(fresh) == keys_of(primary_of(cluster, shard))


def wait_told_out(replica: str, timeout: float) -> None:
    """Until the node at ``replica`` says it is in no cluster (REPLICA REMOVE told it)."""
    def told() -> bool:
        with zkv.Client(replica, timeout=3.0, retries=0) as direct:
            return direct.info()["in_cluster"] is False

    wait_until(told, timeout, what="the removed node told it is out")


def test_a_removed_replica_stays_out_across_a_proxy_restart(make_cluster: Any) -> None:
    """REPLICA REMOVE is told to the node (it no longer takes itself for a replica),
    and a restart of the proxy with a topology that still lists it does not add it
    back: only REPLICA ADD does, which refuses a node that holds keys."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    assert c.set(b"k", b"v")
    assert c.remove_replica(replica)["removed"] == replica

    wait_told_out(replica, 10)
    epoch = c.status()["epoch"]
    cluster.restart_proxy()  # the topology still lists the replica
    c = cluster.client(timeout=5.0)
    assert [r["address"] for r in rows(cluster)] == [shard]
    assert c.status()["epoch"] == epoch
    assert c.get(b"k") == b"v" and c.set(b"k", b"w")  # the shard serves, with one copy
    with pytest.raises(zkv.ClusterError, match="already holds 1 keys"):
        c.call("REPLICA", "ADD", shard, replica)
    # a removed.json that cannot be read stops the proxy, rather than letting the
    # topology's replicas back in
    removed = next(cluster.topo.path.parent.glob("**/removed.json"))
    removed.write_text("garbage{")
    cluster.kill_proxy()
    proc = cluster.procs.start("proxy", "--config", str(cluster.topo.path), ready=None)
    assert proc.wait_exit(15) == 1
    assert "removed.json: cannot read" in proc.output and "Traceback" not in proc.output
    removed.write_text('{"replicas": {"garbage": {"shard": "x"}}}')  # (edited by hand)
    proc = cluster.procs.start("proxy", "--config", str(cluster.topo.path), ready=None)
    assert proc.wait_exit(15) == 1
    assert "removed.json: a replica's address" in proc.output and "garbage" in proc.output
    assert "Traceback" not in proc.output


def test_a_replica_removed_while_down_is_told_once_it_is_back(make_cluster: Any) -> None:
    """REPLICA REMOVE of a dead machine's replica: the node cannot be told then. When
    it comes back (after a restart of the proxy, too) it is told it is out, rather
    than taking itself for a replica forever."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    assert c.set(b"k", b"v")
    cluster.kill_node(replica)
    assert c.remove_replica(replica)["removed"] == replica
    cluster.restart_proxy()
    c = cluster.client(timeout=5.0)
    cluster.start_node(replica)

    wait_told_out(replica, 15)
    assert cluster.proxy is not None
    wait_until(lambda: "was told it is out" in cluster.proxy.output, 5,
               what="the proxy saying so")
    removed = next(cluster.topo.path.parent.glob("**/removed.json"))
    assert json.loads(removed.read_text())["replicas"][replica]["told"] is True
    assert c.get(b"k") == b"v"
    # the node says so, when told and at each start after (not "a primary of shard")
    out = f"node {replica} is no longer in the cluster"
    wait_until(lambda: out in cluster.nodes[replica].output, 5, what="the node saying so")
    cluster.kill_node(replica)
    cluster.start_node(replica)
    wait_until(lambda: out in cluster.nodes[replica].output, 10, what="it saying so again")
    assert "is the primary of shard" not in cluster.nodes[replica].output


def test_a_shards_first_node_comes_back_to_it_after_a_failover_and_removal(
        make_cluster: Any, tmp_path: Any) -> None:
    """A shard is named by its first node: after a FAILOVER and REPLICA REMOVE of that
    node, REPLICA ADD of it (emptied) to its own shard takes it back."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    assert c.set(b"k", b"v")
    assert c.failover(shard, replica)["primary"] == replica
    wait_in_sync(cluster)
    assert c.remove_replica(shard)["removed"] == shard
    cluster.kill_node(shard)
    shutil.rmtree(cluster.topo.data_dirs[shard])
    cluster.start_node(shard)
    row = c.add_replica(shard, shard, wait_timeout=30)
    assert row["in_sync"] and row["address"] == shard
    assert keys_of(shard) == 1 and c.get(b"k") == b"v"


def test_replica_commands_refuse_mistakes_and_change_nothing(make_cluster: Any, procs: Any,
                                                             tmp_path: Any) -> None:
    from conftest import free_port

    cluster = replicated(make_cluster, nodes=2)
    a, b = cluster.node_addrs
    ra = cluster.replica_addrs[a][0]
    c = cluster.client(timeout=5.0)
    epoch = c.status()["epoch"]
    busy = free_port()
    procs.node(busy, str(tmp_path / "busy"))
    with zkv.Client(f"127.0.0.1:{busy}", timeout=3.0) as other:
        other.set(b"someone else's", b"data")
    cases = [
        (("ADD", a, b), "already a node of this cluster"),
        (("ADD", a, ra), "already a node of this cluster"),
        (("ADD", "127.0.0.1:1", f"127.0.0.1:{busy}"), "is not a shard"),
        (("ADD", a, f"127.0.0.1:{busy}"), "already holds 1 keys"),
        (("ADD", a, f"127.0.0.1:{free_port()}"), "does not answer"),
        (("ADD", a), "usage: REPLICA ADD"),
        (("REMOVE", a), "is the primary of shard"),
        (("REMOVE", "127.0.0.1:1"), "not a replica of any shard"),
    ]
    for args, message in cases:
        with pytest.raises(zkv.ClusterError, match=message):
            c.call("REPLICA", *args)
    with pytest.raises(zkv.ZkvError, match="REPLICA takes ADD"):
        c.call("REPLICA", "JOIN", a, ra)
    with pytest.raises(zkv.ClusterError, match="already a node of this cluster"):
        c.add_node(ra)  # a replica as a ring member of its own
    for args, message in [((b, b), "the primary already"), ((a, b), "not a replica of it"),
                          (("127.0.0.1:1",), "not a shard")]:
        with pytest.raises(zkv.ClusterError, match=message):
            c.failover(*args)
    assert c.status()["epoch"] == epoch  # nothing changed
    wait_in_sync(cluster)


@pytest.mark.timeout(180)
def test_a_planned_failover_loses_nothing_and_is_quick(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=2)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    probe = cluster.client(timeout=1.0)
    ring = Ring({a: 1.0 for a in cluster.node_addrs}, c.status()["vnodes"])
    key = next(b"p%d" % i for i in range(100) if ring.owner(b"p%d" % i) == shard)
    with Load(cluster.address, MIX, workers=2, keys_each=300, pause=0.002) as load:
        time.sleep(0.5)
        began = time.monotonic()
        reply = c.failover(shard, replica)
        assert reply["primary"] == replica and reply["was"] == shard
        wait_until(lambda: probe.set(key, b"x"), 10, interval=0.02, what="writes again")
        took = time.monotonic() - began
        wait_in_sync(cluster, 30)  # the old primary syncs back as a replica
        time.sleep(0.3)
    load.check_threads()
    read_back(c.mget, load.possible())
    assert primary_of(cluster, shard) == replica
    assert c.status()["handovers"] == 1 and c.status()["failovers"] == 0
    print(f"planned failover: writes taken again after {took:.2f} s")
    assert took < 5


@pytest.mark.timeout(120)
def test_a_planned_failover_shows_a_client_with_default_retries_no_error(
        make_cluster: Any) -> None:
    """The old primary steps down and says so: the new one serves at once instead of
    waiting out the old one's lease (1.2 s, longer than a client's default retries), so
    a writer on the shard sees no error through two handovers, and loses nothing."""
    import threading

    cluster = replicated(make_cluster, nodes=2)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    admin = cluster.client(timeout=5.0)
    ring = Ring({a: 1.0 for a in cluster.node_addrs}, admin.status()["vnodes"])
    keys = [k for k in (b"h%d" % i for i in range(400)) if ring.owner(k) == shard][:40]
    acked: dict[bytes, bytes] = {}
    errors: list[str] = []
    stop = threading.Event()

    def write() -> None:
        c = zkv.Client(cluster.address, timeout=3.0)  # the default retries
        n = 0
        try:
            while not stop.is_set():
                n += 1
                key, value = keys[n % len(keys)], b"v%d" % n
                try:
                    c.set(key, value)
                    acked[key] = value
                    assert c.get(key) == value
                except zkv.ZkvError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    acked.pop(key, None)  # (its outcome is unknown)
                time.sleep(0.002)
        finally:
            c.close()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        assert admin.failover(shard, replica)["primary"] == replica
        time.sleep(1.0)
        wait_in_sync(cluster, 30)  # the old primary is a replica again, in sync
        assert admin.failover(shard, shard)["primary"] == shard
        time.sleep(1.0)
    finally:
        stop.set()
        writer.join(10)
    assert not writer.is_alive()
    assert errors == []
    assert len(acked) == len(keys)
    assert admin.mget(list(acked)) == list(acked.values())
    assert admin.status()["handovers"] == 2


@pytest.mark.timeout(120)
def test_a_planned_failover_shows_clients_that_never_retry_no_error(make_cluster: Any) -> None:
    """Redis clients do not retry, and neither does a zkv.Client with retries=0: the old
    primary holds its requests (XHANDOVER) until its replica has every write made
    before, and those held go to the new primary; the proxy keeps its link to the old
    one open for what is in flight there. So through two handovers no client sees an
    error, and each counter holds exactly the INCRs acknowledged to it (an INCR whose
    outcome was unknown would show as an error or a count that does not add up)."""
    import threading

    import redis
    from conftest import free_port

    port = free_port()
    cluster = replicated(make_cluster, nodes=2, resp_port=port)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    admin = cluster.client(timeout=5.0)
    ring = Ring({a: 1.0 for a in cluster.node_addrs}, admin.status()["vnodes"])
    counters = [k for k in (b"n%d" % i for i in range(400)) if ring.owner(k) == shard][:6]
    acked = [0] * len(counters)
    errors: list[str] = []
    stop = threading.Event()

    def count(i: int) -> None:
        key = counters[i]
        if i % 2:
            r = redis.Redis(port=port, socket_timeout=10)
            incr, close = r.incr, r.close
            fails: tuple[type[Exception], ...] = (redis.RedisError,)
        else:
            c = zkv.Client(cluster.address, timeout=5.0, retries=0)
            incr, close, fails = c.incr, c.close, (zkv.ZkvError,)
        try:
            while not stop.is_set():
                try:
                    incr(key)
                    acked[i] += 1
                except fails as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.001)
        finally:
            close()

    sized = [0]

    def size() -> None:  # whole-cluster reads, through both fronts, as the epochs change
        r = redis.Redis(port=port, socket_timeout=10)
        c = zkv.Client(cluster.address, timeout=5.0, retries=0)
        try:
            while not stop.is_set():
                try:
                    assert r.dbsize() >= 0 and c.dbsize() >= 0
                    assert isinstance(c.keys("n*"), list)
                    sized[0] += 1
                except (redis.RedisError, zkv.ZkvError) as exc:
                    errors.append(f"DBSIZE or KEYS: {type(exc).__name__}: {exc}")
                time.sleep(0.002)
        finally:
            r.close()
            c.close()

    threads = [threading.Thread(target=count, args=(i,), daemon=True)
               for i in range(len(counters))]
    threads.append(threading.Thread(target=size, daemon=True))
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert admin.failover(shard, replica)["primary"] == replica
        time.sleep(0.5)
        wait_in_sync(cluster, 30)
        assert admin.failover(shard, shard)["primary"] == shard
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert errors == []
    assert admin.mget(counters) == [b"%d" % n for n in acked]
    assert min(acked) > 0 and sized[0] > 0


# Each (phase, victim) pair of the matrix, three moves per kind: every run kills
# one victim at each phase of the same move, so the faults also pile up.
SCHEDULES = [
    (("prepare", "primary"), ("copy", "replica"), ("cleanup", "proxy")),
    (("prepare", "replica"), ("copy", "proxy"), ("cleanup", "primary")),
    (("prepare", "proxy"), ("copy", "primary"), ("cleanup", "replica")),
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("schedule", SCHEDULES,
                         ids=["-".join(v for _, v in s) for s in SCHEDULES])
@pytest.mark.parametrize("kind", ["add", "remove"])
def test_kill9_at_every_phase_of_a_move_between_replicated_shards(
        make_cluster: Any, procs: Any, tmp_path: Any, kind: str,
        schedule: tuple[tuple[str, str], ...]) -> None:
    """kill -9 of a source shard's primary (kept down until its replica takes over),
    of its replica, or of the proxy, at each phase of an ADD and a REMOVE, under
    writers: the move finishes, and no acknowledged write is lost."""
    import threading

    from conftest import free_port
    from test_faults import wait_move_done, wait_phase

    cluster: Cluster = make_cluster(nodes=2, replicas=1, defaults={"fsync": "always"},
                                    proxy={"timeout_ms": 3000},
                                    proxy_env={"ZKV_MOVE_PHASE_PAUSE": "1.5"})
    wait_in_sync(cluster)
    c = cluster.client(timeout=10.0)
    initial = {b"pre-%05d" % i: b"v%05d" % i for i in range(2000)}
    c.mset(initial)
    source = cluster.node_addrs[0]
    if kind == "add":
        port = free_port()
        procs.node(port, str(tmp_path / "joining"))
        target = f"127.0.0.1:{port}"
    restarts: list[threading.Timer] = []
    with Load(cluster.address, MIX, workers=2, keys_each=150, pause=0.005) as load:
        with zkv.Client(cluster.address, timeout=10.0) as admin:
            if kind == "add":
                admin.add_node(target, wait=False)
            else:
                admin.remove_node(source, wait=False)
        for phase, victim in schedule:
            move = wait_phase(cluster.address, phase)
            if kind == "add":
                source = move["streams"][0]["source"]
            if victim == "proxy":
                cluster.kill_proxy()
                time.sleep(0.3)
                cluster.start_proxy()
                continue
            node = primary_of(cluster, source) if victim == "primary" \
                else next(r["address"] for r in rows(cluster)
                          if r.get("shard") == source and r["role"] == "replica")
            cluster.kill_node(node)
            # a primary stays down until its replica takes over; the next phase's kill
            # does not wait for it to be back
            timer = threading.Timer(2.5 if victim == "primary" else 0.3,
                                    cluster.start_node, (node,))
            timer.start()
            restarts.append(timer)
        for timer in restarts:
            timer.join(30)
        final = wait_move_done(cluster.address, 90)
        time.sleep(0.3)
    load.check_threads()
    expected = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    read_back(c.mget, expected)
    want = [*cluster.node_addrs, target] if kind == "add" else cluster.node_addrs[1:]
    assert sorted(final["members"]) == sorted(want)
    wait_in_sync(cluster, 30)
    for row in rows(cluster):  # every copy of every shard holds what its primary holds
        if row.get("role") == "replica":
            assert keys_of(row["address"]) == keys_of(primary_of(cluster, row["shard"]))


def test_a_follower_routes_to_the_new_primary_and_needs_no_manager(
        make_cluster: Any) -> None:
    """A follower proxy learns a failover from the config manager and routes to the new
    primary; with the manager killed, reads and writes through it go on (the lease is
    between a primary and its replicas)."""
    from test_follower import start_follower

    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    address, _ = start_follower(cluster)
    f = cluster.client(timeout=3.0, address=address)
    assert f.set(b"k", b"v1")
    cluster.kill_node(shard)
    wait_until(lambda: f.set(b"k", b"v2"), 15, interval=0.05,
               what="writes through the follower after the failover")
    assert f.get(b"k") == b"v2"
    cluster.kill_proxy()  # the config manager is gone
    for i in range(20):
        assert f.set(b"k%d" % i, b"x")
    assert f.mget([b"k%d" % i for i in range(20)]) == [b"x"] * 20


def test_keys_dropped_while_a_replica_syncs_do_not_come_back(make_cluster: Any, procs: Any,
                                                            tmp_path: Any) -> None:
    """A FLUSHALL (logged as drops, which leave no tombstone) while a new replica's copy
    is still streaming in: the copy's later batches must not bring the keys back."""
    from conftest import free_port

    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    c = cluster.client(timeout=10.0)
    for start in range(0, 100_000, 1000):
        c.mset({b"k%06d" % i: b"v" * 50 for i in range(start, start + 1000)})
    port = free_port()
    fresh_proc = procs.node(port, str(tmp_path / "fresh"))
    fresh = f"127.0.0.1:{port}"
    primary_proc = cluster.nodes[shard]
    c.add_replica(shard, fresh, wait=False)
    wait_until(lambda: f"copying 100000 keys to replica {fresh}" in primary_proc.output, 10,
               interval=0.005, what="the copy starting")
    fresh_proc.signal(signal.SIGSTOP)  # the rest of the copy waits behind it
    try:
        direct = zkv.Client(shard, timeout=5.0, retries=0)
        assert direct.call("XFLUSH") == 100_000
        direct.close()
    finally:
        fresh_proc.signal(signal.SIGCONT)
    wait_until(lambda: next(r for r in rows(cluster) if r["address"] == fresh)["in_sync"],
               30, what="the new replica in sync")
    assert keys_of(fresh) == keys_of(shard) == 0


def test_a_replica_keeps_nothing_of_a_message_it_refuses(tmp_path: Any) -> None:
    """In process, no socket: a replica's short path for its primary's records
    (Replicator.steady) keeps nothing of a message it refuses part-way, as the general
    path does; a bug in applying one is an error reply, not a dead node; and a session
    that ended takes no more records, whatever they claim to continue."""
    from zkv.core import protocol as P
    from zkv.core import wal
    from zkv.core.replication import Replica
    from zkv.node import Node

    node = Node("127.0.0.1", 1, str(tmp_path / "r"), fsync="no")
    node.recovery = node.storage.open()
    try:
        node.repl.shard = "S"
        node.repl.replica = Replica(session="s", next_seq=3, synced=True, started=0.0)

        def send(session: str, seq: int, data: bytes) -> Any:
            body = P.encode_request("XREPL", {"epoch": node.epoch, "session": session,
                                              "seq": seq, "shard": "S", "data": data})
            [[_, reply]] = node.handle([b"primary", body])
            node.commit()
            return cbor2.loads(reply)

        good = wal.encode((wal.SET, b"k", b"v"))
        assert send("s", 3, good) == [P.OK, {"seq": 3, "synced": True}]
        # the next message: a good record, then one of the wrong shape
        refused = send("s", 4, wal.encode((wal.SET, b"k2", b"v2"))
                       + wal.encode((wal.SET, b"k3", 5)))
        assert refused[0] == P.ERR and "wrong shape" in refused[2]
        assert node.storage.keyspace.data == {b"k": b"v"}  # k2 is not kept
        assert node.repl.replica.session == ""  # the session ended: the primary syncs it
        # "" is no session: nothing continues the one that ended
        again = send("", 5, wal.encode((wal.SET, b"evil", b"x")))
        assert again[0] == P.ERR and "no session" in again[2]
        # a bug while applying is an error reply; the node goes on
        node.repl.replica = Replica(session="t", next_seq=0, synced=True, started=0.0)
        from zkv.core.keyspace import Keyspace

        def broken(self: Any, item: Any) -> Any:
            raise RuntimeError("a bug")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Keyspace, "apply_live", broken)
            failed = send("t", 0, good)
        assert failed[0] == P.ERR and failed[1] == "INTERNAL" and "a bug" in failed[2]
        assert node.storage.keyspace.data == {b"k": b"v"}
    finally:
        node.storage.close()


# -- a node restarted on a wiped (or another) data directory ---------------------------------
def wipe(cluster: Cluster, addr: str) -> None:
    """kill -9 the node and delete its data directory (a dead disk, a new machine)."""
    cluster.kill_node(addr)
    shutil.rmtree(cluster.topo.data_dirs[addr])


def shard_row(cluster: Cluster, shard: str) -> dict[str, Any]:
    return next(r for r in rows(cluster) if r.get("shard") == shard and r["role"] == "primary")


def test_a_primary_back_on_a_wiped_disk_serves_nothing_until_its_replica_takes_over(
        make_cluster: Any) -> None:
    """The primary's disk is gone and its in-sync replica is down too. The primary comes
    back empty: serving would answer from nothing, and the replica, once back, would
    sync from it and throw the shard's last copy away. It serves nothing, says why, and
    the replica takes over as soon as it answers."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=3.0)
    keys = [b"k%d" % i for i in range(200)]
    assert c.mset({k: b"v-" + k for k in keys})
    cluster.kill_node(replica)
    wipe(cluster, shard)
    cluster.start_node(shard)

    def refused() -> bool:
        try:
            c.get(keys[0])
        except zkv.Unavailable as exc:
            return "data directory" in str(exc)
        raise AssertionError("a primary on a wiped disk answered a read")

    wait_until(refused, 15, what="the wiped primary refusing reads")
    with pytest.raises(zkv.Unavailable, match="data directory"):
        c.set(b"new", b"x")
    wait_until(lambda: shard_row(cluster, shard).get("replication") == "lost", 10,
               what="NODES showing the primary lost")
    time.sleep(1.0)  # (a few heartbeats: its report must not shrink the in-sync set)
    assert shard in cluster.client(timeout=3.0).status()["shards"][shard]["primary"]
    cluster.start_node(replica)
    wait_until(lambda: primary_of(cluster, shard) == replica, 15, what="the replica promoted")
    wait_until(lambda: c.mget(keys) == [b"v-" + k for k in keys], 10, what="every key back")
    wait_in_sync(cluster, 30)  # the wiped node syncs from the replica's copy
    assert keys_of(shard) == len(keys)


def test_an_in_sync_replica_back_on_a_wiped_disk_is_never_promoted(make_cluster: Any) -> None:
    """The replica's disk is gone and its primary dies: the replica comes back empty,
    silent from its primary for longer than the grace period. Promoting it would serve
    nothing where the primary's disk still holds the shard."""
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=3.0)
    keys = [b"k%d" % i for i in range(200)]
    assert c.mset({k: b"v-" + k for k in keys})
    wipe(cluster, replica)
    cluster.kill_node(shard)
    cluster.start_node(replica)
    wait_until(lambda: next(r for r in rows(cluster) if r["address"] == replica)
               .get("replication") == "lost", 10, what="NODES showing the replica lost")
    time.sleep(3.0)  # past the grace period (1.8 s) and a few heartbeats
    assert primary_of(cluster, shard) == shard
    with pytest.raises(zkv.Unavailable):
        c.get(keys[0])
    cluster.start_node(shard)
    wait_until(lambda: c.mget(keys) == [b"v-" + k for k in keys], 15, what="every key back")
    wait_in_sync(cluster, 30)
    assert primary_of(cluster, shard) == shard and keys_of(replica) == len(keys)


def test_failover_force_adopts_a_copy_when_no_in_sync_one_is_left(make_cluster: Any) -> None:
    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    c = cluster.client(timeout=5.0)
    assert c.set(b"k", b"v")
    with pytest.raises(zkv.ClusterError, match="is up and serving"):
        c.failover(shard, replica, force=True)
    with pytest.raises(zkv.ClusterError, match="needs the address"):
        c.failover(shard, force=True)
    wipe(cluster, replica)
    wipe(cluster, shard)
    cluster.start_node(shard)
    cluster.start_node(replica)
    wait_until(lambda: shard_row(cluster, shard).get("replication") == "lost", 15,
               what="NODES showing the primary lost")
    with pytest.raises(zkv.Unavailable, match="data directory"):
        c.get(b"k")
    with pytest.raises(zkv.ClusterError, match="not a node of shard"):
        c.failover(shard, "127.0.0.1:1", force=True)
    def zkv_cli(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", cluster.address,
                               *words], capture_output=True, text=True, timeout=30, check=False)

    usage = zkv_cli("FAILOVER", shard, "--force")
    assert usage.returncode == 2 and "needs the node" in usage.stderr + usage.stdout
    runs: list[subprocess.CompletedProcess[str]] = []
    wait_until(lambda: runs.append(zkv_cli("FAILOVER", shard, shard, "--force"))
               or "not reported" not in runs[-1].stdout + runs[-1].stderr, 10,
               what="the replica's report at this epoch")  # (it restarted: a moment)
    done = runs[-1]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forced" in done.stdout and "lost" in done.stdout, done.stdout
    wait_until(lambda: c.set(b"k", b"after"), 10, what="writes on the adopted copy")
    assert c.get(b"k") == b"after"
    wait_in_sync(cluster, 30)


def test_zkv_cli_replica_add_without_a_terminal_prints_two_plain_lines(
        make_cluster: Any, procs: Any, tmp_path: Any) -> None:
    """REPLICA ADD through zkv cli with its output to a pipe: what it did, then that
    the replica is in sync; no blank line where a terminal's progress bar would be."""
    from conftest import free_port

    cluster = replicated(make_cluster, nodes=1)
    shard = cluster.node_addrs[0]
    cluster.client().mset({f"k{i}": "v" for i in range(200)})
    port = free_port()
    procs.node(port, str(tmp_path / "fresh"))
    fresh = f"127.0.0.1:{port}"
    done = subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", cluster.address,
                           "REPLICA", "ADD", shard, fresh], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(lines), done.stdout
    assert lines[0].startswith(f"REPLICA ADD {fresh}: joins shard {shard}")
    assert lines[1].startswith(f"REPLICA ADD {fresh}: in sync")
    assert keys_of(fresh) == 200
