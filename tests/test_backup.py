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
from conftest import REPO, Cluster

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
    assert out.returncode == 1 and "MANIFEST.json is missing" in out.stderr
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
