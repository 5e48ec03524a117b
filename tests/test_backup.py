"""`zkv backup` and `zkv restore` through real processes: a loaded 3-node cluster
restored into a 5-node one holds every key; a backup taken while a writer runs holds,
per node, a prefix of its acknowledged writes; and the refusals are clear."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Cluster, wait_until

import zkv
from zkv.core import wal
from zkv.core.ring import Ring

pytestmark = pytest.mark.timeout(120)


def zkv_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zkv", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_a_3_node_backup_restored_into_5_nodes_holds_every_key(make_cluster: Any,
                                                               tmp_path: Path) -> None:
    source: Cluster = make_cluster(3)
    c = source.client(timeout=10)
    expected = {f"b{i}".encode(): bytes([i % 256]) * (i % 300) + b"\x00\r\n"
                for i in range(6000)}
    items = list(expected.items())
    for i in range(0, len(items), 1000):
        c.mset(dict(items[i : i + 1000]))
    timed = [f"b{i}".encode() for i in range(0, 6000, 7)]  # some with deadlines
    deadline = int(time.time() * 1000) + 3_600_000
    with c.pipeline() as p:
        for i, k in enumerate(timed):
            p.pexpireat(k, deadline + i)
        p.execute()
    out = zkv_cmd("backup", "--proxy", source.address, str(tmp_path / "bk"))
    assert out.returncode == 0, out.stderr
    assert "backed up 6000 keys of 3 nodes" in out.stdout
    manifest = json.loads((tmp_path / "bk" / "MANIFEST.json").read_text())
    assert manifest["keys"] == 6000 and set(manifest["nodes"]) == set(source.node_addrs)
    assert sum(n["keys"] for n in manifest["nodes"].values()) == 6000

    target: Cluster = make_cluster(5)
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", target.address)
    assert out.returncode == 0, out.stderr
    assert "restored 6000 keys" in out.stdout
    t = target.client(timeout=10)
    keys = list(expected)
    for i in range(0, len(keys), 1000):
        assert t.mget(keys[i : i + 1000]) == [expected[k] for k in keys[i : i + 1000]]
    with t.pipeline() as p:  # the same deadlines, as absolute times
        for k in timed:
            p.pexpiretime(k)
        assert p.execute() == [deadline + i for i in range(len(timed))]
    assert t.ttl(b"b1") == -1
    counts = {n["address"]: n["keys"] for n in t.nodes()}
    assert len(counts) == 5 and sum(counts.values()) == 6000  # placed by the new ring
    assert all(n > 0 for n in counts.values())

    again = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", target.address)
    assert again.returncode == 1 and "restore needs an empty cluster" in again.stderr


def test_a_backup_under_a_writer_holds_a_prefix_per_node(make_cluster: Any,
                                                         tmp_path: Path) -> None:
    cluster: Cluster = make_cluster(3)
    c = cluster.client(timeout=10)
    acked: list[bytes] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set() and i < 200_000:
            key = f"w{i:07d}".encode()
            c.set(key, b"x")
            acked.append(key)  # in the order the writes were acknowledged
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(acked) < 2000:
            threading.Event().wait(0.05)
        out = zkv_cmd("backup", "--proxy", cluster.address, str(tmp_path / "bk"))
        assert out.returncode == 0, out.stderr
    finally:
        stop.set()
        writer.join(30)
    manifest = json.loads((tmp_path / "bk" / "MANIFEST.json").read_text())
    ring = Ring(manifest["config"]["members"], manifest["config"]["vnodes"])
    for node, entry in manifest["nodes"].items():
        held: set[bytes] = set()
        for _, item in wal.LogScan((tmp_path / "bk" / entry["file"]).read_bytes()):
            if item[0] == wal.CHUNK:
                held.update(item[1][0::2])
        mine = [k for k in acked if ring.owner(k) == node]
        prefix = mine[: len(held)]
        assert held == set(prefix), f"{node}: the backup is not a prefix of its writes"
    assert 0 < manifest["keys"] < len(acked)  # taken while the writer ran


def test_refusals_are_clear(cluster: Cluster, tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    out = zkv_cmd("backup", "--proxy", cluster.address, str(full))
    assert out.returncode == 1 and "is not empty" in out.stderr
    # an address of some other machine to listen on: said, and no directory left behind
    out = zkv_cmd("backup", "--proxy", cluster.address, "--listen", "192.0.2.1",
                  str(tmp_path / "elsewhere"))
    assert out.returncode == 1 and "cannot listen on '192.0.2.1'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "elsewhere").exists()
    out = zkv_cmd("restore", str(tmp_path / "nothing-here"), "--proxy", cluster.address)
    assert out.returncode == 1 and "nothing-here: no such directory" in out.stderr
    (tmp_path / "empty").mkdir()
    out = zkv_cmd("restore", str(tmp_path / "empty"), "--proxy", cluster.address)
    assert out.returncode == 1 and "MANIFEST.json is missing" in out.stderr
    assert out.stdout == ""  # (no blank line from a progress bar not shown)
    c = cluster.client()
    c.mset({f"r{i}": "v" for i in range(500)})
    assert zkv_cmd("backup", "--proxy", cluster.address, str(tmp_path / "bk")).returncode == 0
    for i in range(500):  # empty again, for the restore to be tried
        c.delete(f"r{i}")
    victim = sorted((tmp_path / "bk").glob("node-*.zkv"))[0]
    victim.write_bytes(victim.read_bytes()[:-20])  # cut its end
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", cluster.address)
    assert out.returncode == 1 and victim.name in out.stderr
    assert "nothing was restored" in out.stderr and c.keys() == []  # checked before writing
    assert "Traceback" not in out.stderr
    manifest = tmp_path / "bk" / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"keys": ', '"keys": "x", "k": '))
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", cluster.address)
    assert out.returncode == 1 and "not a zkv backup manifest" in out.stderr
    assert "Traceback" not in out.stderr
    plain = tmp_path / "a-file"
    plain.write_text("x")
    out = zkv_cmd("backup", "--proxy", cluster.address, str(plain))
    assert out.returncode == 1 and "is not a directory" in out.stderr
    # a node's address given for the proxy's: said so (zkv cli's STATUS alike)
    node = cluster.node_addrs[0]
    for out in (zkv_cmd("backup", "--proxy", node, str(tmp_path / "bk2")),
                zkv_cmd("cli", "--proxy", node, "STATUS")):
        assert out.returncode == 1, out
        assert f"storage node ({node}): send it to the cluster's proxy" in out.stderr


def test_keys_that_expire_while_a_node_streams_them_do_not_fail_the_backup(
        tmp_path: Path) -> None:
    """A node counts its keys when the backup starts and skips those that have expired
    by the time it streams them: fewer keys than counted, every batch there, is a whole
    backup (a cache-style workload could never be backed up otherwise)."""
    import zmq

    from zkv import backup as B
    from zkv.core.transfer import SnapshotStream

    now_ms = int(time.time() * 1000)
    items = [(b"k%04d" % i, b"v") for i in range(2500)]
    expiring = {k: now_ms - 1 for k, _ in items[::10]}  # due by the time they are sent
    stream = SnapshotStream("bk-1", "127.0.0.1:1", items, dict(expiring), batch_keys=1000)
    ctx: zmq.Context[Any] = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind("inproc://bk")
        push.connect("inproc://bk")
        while (batch := stream.next_batch({}, 0.0, expiring, now_ms)) is not None:
            push.send(batch)
        with open(tmp_path / "f", "wb") as f:
            got = B._receive(pull, "bk-1", {"127.0.0.1:1": f}, {"127.0.0.1:1": len(items)},
                             2.0, None, len(items))
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()
    assert got == {"127.0.0.1:1": len(items) - len(expiring)}


def test_a_backup_refuses_a_cluster_that_changed_under_it(make_cluster: Any, tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    """A REMOVE that lands between the configuration read and the last node's copy
    could leave a node's keys out (it handed them on first): the backup fails, keeps
    nothing, and a backup run again holds every key."""
    from zkv import backup as B

    cluster: Cluster = make_cluster(3)
    c = cluster.client(timeout=10)
    data = {b"c%05d" % i: b"v%05d" % i for i in range(3000)}
    c.mset(data)
    real = B._receive

    def remove_first(*args: Any) -> Any:
        got = real(*args)
        assert c.remove_node(cluster.node_addrs[2], wait_timeout=60)["finished"]
        return got

    monkeypatch.setattr(B, "_receive", remove_first)
    with pytest.raises(zkv.ClusterError, match="configuration changed during the backup"):
        B.backup(cluster.address, str(tmp_path / "bk"))
    assert not (tmp_path / "bk").exists()  # nothing kept: no files without a manifest
    monkeypatch.setattr(B, "_receive", real)
    manifest = B.backup(cluster.address, str(tmp_path / "bk"))
    assert manifest["keys"] == len(data) and len(manifest["nodes"]) == 2


def test_a_restore_checks_the_target_before_writing_anything(make_cluster: Any,
                                                             tmp_path: Path) -> None:
    source: Cluster = make_cluster(2)
    c = source.client(timeout=10)
    c.mset({b"small%03d" % i: b"v" for i in range(300)})
    c.set(b"big", b"x" * 3000)
    assert zkv_cmd("backup", "--proxy", source.address, str(tmp_path / "bk")).returncode == 0
    # a target whose limits the backup's values are over
    target: Cluster = make_cluster(2, limits={"max_value_bytes": 2048})
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", target.address)
    assert out.returncode == 1 and "over the max_value_bytes (2048)" in out.stderr, out.stderr
    t = target.client(timeout=10)
    assert t.dbsize() == 0 and "nothing was restored" in out.stderr
    # a target with a node down: its keys would not be counted, nor could they be written
    other: Cluster = make_cluster(2)
    other.kill_node(other.node_addrs[1])
    o = other.client(timeout=5)
    wait_until(lambda: any(n["state"] != "up" for n in o.nodes()), 15, what="a node down")
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", other.address)
    assert out.returncode == 1 and "is down; restore needs every node up" in out.stderr
    # a node file whose batch holds something other than bytes (its checksums right)
    victim = sorted((tmp_path / "bk").glob("node-*.zkv"))[0]
    records = [item for _, item in wal.LogScan(victim.read_bytes())]
    chunk = next(i for i, r in enumerate(records) if r[0] == wal.CHUNK)
    records[chunk] = (wal.CHUNK, [[1, 2], b"v", *records[chunk][1][2:]])
    victim.write_bytes(b"".join(wal.encode(tuple(r)) for r in records))
    out = zkv_cmd("restore", str(tmp_path / "bk"), "--proxy", target.address)
    assert out.returncode == 1 and "not keys and values" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and t.dbsize() == 0


def test_a_backup_after_a_failover_reads_each_shards_primary(make_cluster: Any,
                                                            tmp_path: Path) -> None:
    """After a FAILOVER a shard's first node is a replica, or dead: the backup asks the
    shard's primary now, and holds every key."""
    from test_replication import replicated, wait_in_sync

    cluster = replicated(make_cluster, nodes=2)
    c = cluster.client(timeout=10)
    data = {b"f%04d" % i: b"v%04d" % i for i in range(2000)}
    c.mset(data)
    shard = cluster.node_addrs[0]
    replica = cluster.replica_addrs[shard][0]
    assert c.failover(shard, replica)["primary"] == replica
    wait_in_sync(cluster)
    cluster.kill_node(shard)  # the old primary, a replica now: gone
    out = zkv_cmd("backup", "--proxy", cluster.address, "--timeout", "5", str(tmp_path / "bk"))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "bk" / "MANIFEST.json").read_text())
    assert manifest["keys"] == len(data) and set(manifest["nodes"]) == set(cluster.node_addrs)


def test_a_stopped_node_fails_the_backup_within_its_timeout(cluster: Cluster,
                                                              tmp_path: Path) -> None:
    """--timeout is what a node that does not answer costs: one try of each request,
    not one per retry, and no closing word sent to a node that never opened a stream."""
    import signal

    cluster.client().set("k", "v")
    victim = sorted(cluster.node_addrs)[-1]
    cluster.nodes[victim].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = zkv_cmd("backup", "--proxy", cluster.address, "--timeout", "1",
                      str(tmp_path / "bk"))
        took = time.monotonic() - started
    finally:
        cluster.nodes[victim].signal(signal.SIGCONT)
    assert out.returncode == 1 and victim in out.stderr and "in time" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bk").exists()
    assert took < 1.0 + 3.0, took  # (before: 3 tries and 3 closing tries, over 9 s)
