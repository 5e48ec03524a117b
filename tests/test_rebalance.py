"""Online rebalancing on real processes: ADD and REMOVE under load, kills mid-move.

The contract (DESIGN.md section 3): no acknowledged write is lost or reverted, no
deleted key comes back, reads return the latest acknowledged value, and a move
that a kill -9 interrupts finishes once the process is back. Every test starts
its own nodes and proxy on free loopback ports and checks, key by key, what a
model of the acknowledged operations says must be there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Proc, Procs, free_port, wait_until
from load import Load, Mix, Possible, assert_counts_match_ring, read_back

import zkv
from zkv.core import protocol as P

PRELOAD = 20_000  # keys loaded before a move, so that it has something to carry
PROXY_TIMEOUT_MS = 1000


# -- a small cluster of our own --------------------------------------------------------


class Rig:
    """Nodes and one proxy, started with command-line flags under ``root``."""

    def __init__(self, procs: Procs, root: Path) -> None:
        self.procs = procs
        self.root = root
        self.nodes: dict[str, Proc] = {}
        self.proxy: Proc | None = None
        self.proxy_port = free_port()
        self.state_dir = root / "proxy-state"
        self.clients: list[zkv.Client] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def data_dir(self, addr: str) -> str:
        return str(self.root / f"node-{addr.rsplit(':', 1)[1]}")

    def start_node(self, addr: str | None = None, bind: str | None = None) -> str:
        """A node named ``addr`` in the ring (127.0.0.1:free port), bound to ``bind``
        (its host, unless given: 0.0.0.0, say)."""
        addr = addr or f"127.0.0.1:{free_port()}"
        port = int(addr.rsplit(":", 1)[1])
        # (off loopback a node needs CURVE or, as here, --insecure: a test of binding)
        extra = ("--host", bind, "--insecure") if bind else ()
        self.nodes[addr] = self.procs.node(port, self.data_dir(addr), "--fsync", "no", *extra)
        return addr

    def start_proxy(self, members: list[str]) -> Proc:
        args = ["proxy", "--port", str(self.proxy_port), "--state-dir", str(self.state_dir),
                "--timeout-ms", str(PROXY_TIMEOUT_MS)]
        for m in members:
            args += ["--node", m]
        self.proxy = self.procs.start(*args, ready="zkv proxy", timeout=20)
        return self.proxy

    def client(self, timeout: float = 5.0) -> zkv.Client:
        c = zkv.Client(self.address, timeout=timeout, retries=1)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()


@pytest.fixture
def rig(procs: Procs, tmp_path: Path) -> Any:
    made = Rig(procs, tmp_path)
    try:
        yield made
    finally:
        made.close()


def cluster_of(rig: Rig, n: int) -> list[str]:
    addrs = [rig.start_node() for _ in range(n)]
    rig.start_proxy(addrs)
    return addrs


def preload(client: zkv.Client, n: int = PRELOAD) -> dict[bytes, bytes]:
    data = {b"pre-%06d" % i: b"v%06d-" % i + b"x" * 40 for i in range(n)}
    items = list(data.items())
    for i in range(0, n, 1000):
        client.mset(dict(items[i:i + 1000]))
    return data


def wait_move_done(client: zkv.Client, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status = client.status()
        except zkv.ZkvError as exc:  # the proxy is coming back
            last = exc
        else:
            if status["move"] is None:
                return status
            last = status["move"]
        time.sleep(0.1)
    raise AssertionError(f"the move did not finish within {timeout}s; last: {last!r}")


def wait_copy_progress(client: zkv.Client, min_keys: int, timeout: float = 20.0) -> dict[str, Any]:
    """STATUS once the move is in its copy phase with at least ``min_keys`` moved."""
    deadline = time.monotonic() + timeout
    move: Any = None
    while time.monotonic() < deadline:
        move = client.status()["move"]
        assert move is not None, "the move finished before it could be interrupted"
        if move["phase"] == "copy" and sum(s["keys"] for s in move["streams"]) >= min_keys:
            return dict(move)
        time.sleep(0.05)
    raise AssertionError(f"no copy progress within {timeout}s: {move!r}")


# -- the load: writers and deleters on disjoint key sets --------------------------------


MIX = Mix(set=0.45, delete=0.20, mset=0.05, mget=0.05)


def check_after(admin: zkv.Client, load: Load, initial: dict[bytes, bytes],
                name: str) -> dict[str, int]:
    """Once the load has stopped: no worker failed or read a stale value, every key
    (preloaded or the load's) holds one of its possible values, and every node holds
    exactly its share of the ring. Returns the nodes' key counts."""
    load.check_threads()
    expected: Possible = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    found = read_back(admin.mget, expected)
    counts = assert_counts_match_ring(admin, set(found))
    print(f"\n{name}: {load.totals()} keys checked={len(expected)} losses=0")
    return counts


# -- 1. ADD then REMOVE under load -----------------------------------------------------


@pytest.mark.timeout(90)
def test_add_then_remove_under_load_loses_nothing(rig: Rig) -> None:
    a, b, c = cluster_of(rig, 3)
    admin = rig.client(timeout=5.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, MIX, initial) as load:
        plan = admin.add_node(d, rate=4000, wait_timeout=60)
        assert isinstance(plan, dict) and plan["finished"]
        time.sleep(0.3)
        plan = admin.remove_node(a, rate=4000, wait_timeout=60)
        assert isinstance(plan, dict) and plan["finished"]
        time.sleep(0.3)
    counts = check_after(admin, load, initial, "add+remove under load")
    totals = load.totals()
    assert totals["acked_sets"] > 500 and totals["acked_dels"] > 200, totals
    assert sorted(admin.status()["members"]) == sorted([b, c, d])
    assert a not in counts


# -- 2./3. kill -9 mid-move ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_proxy_killed_mid_move_resumes_and_loses_nothing(rig: Rig) -> None:
    members = cluster_of(rig, 3)
    admin = rig.client(timeout=2.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, MIX, initial) as load:
        handle = admin.add_node(d, rate=500, wait=False)
        assert isinstance(handle, zkv.client.MoveHandle)
        move = wait_copy_progress(admin, 300)
        epoch = admin.status()["epoch"]
        assert rig.proxy is not None
        rig.proxy.kill()
        time.sleep(0.5)
        rig.start_proxy(members)  # the flags are ignored: the state directory wins
        status = admin.status()
        assert status["epoch"] == epoch
        assert status["move"] is not None and status["move"]["id"] == move["id"]
        final = wait_move_done(admin, 60)
        assert final["epoch"] == epoch + 2  # (every change is an epoch: cleanup, then done)
        time.sleep(0.3)
    check_after(admin, load, initial, "proxy kill -9 mid-move")
    assert sorted(final["members"]) == sorted([*members, d])


@pytest.mark.timeout(90)
def test_destination_killed_mid_move_resumes_and_loses_nothing(rig: Rig) -> None:
    members = cluster_of(rig, 3)
    admin = rig.client(timeout=2.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, MIX, initial) as load:
        admin.add_node(d, rate=500, wait=False)
        wait_copy_progress(admin, 300)
        rig.nodes[d].kill()
        time.sleep(2.0)  # long enough for the proxy to see it down
        rig.start_node(d)  # same port, same data directory
        final = wait_move_done(admin, 60)
        time.sleep(0.3)
    check_after(admin, load, initial, "destination kill -9 mid-move")
    assert sorted(final["members"]) == sorted([*members, d])


# -- 4. key counts follow the ring ------------------------------------------------------


@pytest.mark.timeout(60)
def test_key_counts_match_ring_shares_after_add_and_remove(rig: Rig) -> None:
    a, b = cluster_of(rig, 2)
    admin = rig.client()
    data = preload(admin)
    before = {n["address"]: n["keys"] for n in admin.nodes()}
    c = rig.start_node()
    admin.add_node(c, wait_timeout=30)
    after_add = assert_counts_match_ring(admin, set(data))
    assert after_add[c] > 0
    for addr in (a, b):  # the moved keys left their old owners
        assert after_add[addr] < before[addr]
    assert sum(after_add.values()) == len(data)
    admin.remove_node(a, wait_timeout=30)
    after_remove = assert_counts_match_ring(admin, set(data))
    assert set(after_remove) == {b, c}
    assert sum(after_remove.values()) == len(data)
    assert read_back(admin.mget, {k: {v} for k, v in data.items()}) == data


# -- 5. clear errors that change nothing; dry runs ------------------------------------


def assert_refused(admin: zkv.Client, call: Any, words: str) -> None:
    before = admin.status()
    with pytest.raises(zkv.ClusterError, match=words):
        call()
    after = admin.status()
    assert after["epoch"] == before["epoch"]
    assert after["members"] == before["members"]


@pytest.mark.timeout(60)
def test_refused_changes_leave_everything_as_it_was(rig: Rig) -> None:
    (a,) = cluster_of(rig, 1)
    admin = rig.client()
    admin.set("k", "v")
    nowhere = f"127.0.0.1:{free_port()}"
    assert_refused(admin, lambda: admin.add_node(nowhere), "does not answer")
    assert_refused(admin, lambda: admin.add_node(a), "already a member")
    assert_refused(admin, lambda: admin.remove_node(nowhere), "not a member")
    assert_refused(admin, lambda: admin.remove_node(a), "last node")
    status = admin.status()
    assert status["epoch"] == 1 and status["move"] is None
    assert admin.get("k") == b"v"
    assert [n["address"] for n in admin.nodes()] == [a]


@pytest.mark.timeout(60)
def test_one_node_cannot_join_twice_and_a_proxy_cannot_join(rig: Rig) -> None:
    # localhost:P is the node 127.0.0.1:P already serving: as a second member, the
    # REMOVE of either name would have its cleanup delete keys the other still owns
    (a,) = cluster_of(rig, 1)
    admin = rig.client()
    admin.mset({f"k{i}": "v" for i in range(200)})
    alias = "localhost:" + a.rsplit(":", 1)[1]
    assert_refused(admin, lambda: admin.add_node(alias), "under another address")
    assert_refused(admin, lambda: admin.add_node(rig.address), "not a storage node")
    assert [n["address"] for n in admin.nodes()] == [a]
    assert admin.dbsize() == 200


@pytest.mark.timeout(60)
def test_a_second_proxy_cannot_take_over_another_clusters_node(rig: Rig) -> None:
    # a proxy with a state directory of its own, pointed at a node of this cluster:
    # the node keeps its own cluster's configuration, and routes by it alone
    a, b = cluster_of(rig, 2)
    admin = rig.client()
    owner = {addr: admin.ring(f"k{i}")["owner"] for i in range(200)
             for addr in [f"k{i}"]}
    rogue_port = free_port()
    rogue = rig.procs.start("proxy", "--port", str(rogue_port), "--state-dir",
                            str(rig.root / "rogue-state"), "--node", a,
                            "--timeout-ms", str(PROXY_TIMEOUT_MS), ready="zkv proxy",
                            timeout=20)
    rogue.wait_for("belongs to cluster", 15)
    with zkv.Client(f"127.0.0.1:{rogue_port}", timeout=2.0) as other:
        for key in owner:
            try:
                other.set(key, "rogue")
            except zkv.ZkvError:
                pass  # refused: fine; acknowledged: it must be this cluster's key, below
        with pytest.raises(zkv.ClusterError, match="belongs to another cluster"):
            other.add_node(b)  # this cluster's other node cannot join that one either
    for key, node in owner.items():
        value = admin.get(key)
        # a write the rogue had acknowledged is this cluster's, on its owner
        assert value in (None, b"rogue") and (value is None or node == a)
    assert admin.dbsize() == sum(1 for k in owner if admin.get(k) is not None)
    before = admin.status()["epoch"]
    c = rig.start_node()
    admin.add_node(c, wait_timeout=30)  # this cluster's own changes go on as before
    assert admin.status()["epoch"] > before


@pytest.mark.timeout(90)
def test_the_cli_says_why_a_move_it_follows_is_stuck(rig: Rig) -> None:
    """zkv cli ADD follows the move with a progress bar; a step the move keeps retrying
    (its new node died) is said, once, and the command ends when the move does."""
    (a,) = cluster_of(rig, 1)
    admin = rig.client()
    preload(admin, 5000)
    c = rig.start_node()
    cli = rig.procs.start("cli", "--proxy", rig.address, "ADD", c, "--rate=400")
    wait_until(lambda: (admin.status()["move"] or {}).get("phase") == "copy", 20)
    rig.nodes[c].kill()
    wait_until(lambda: (admin.status()["move"] or {}).get("error"), 20,
               what="the move's error")
    cli.wait_for("it is retried", 20)
    rig.start_node(c)  # back: the move resumes and finishes, and so does the command
    assert cli.wait_exit(60) == 0
    assert "done" in cli.output and cli.output.count("it is retried") <= 3
    assert sorted(admin.status()["members"]) == sorted([a, c])


@pytest.mark.timeout(60)
def test_second_change_while_a_move_is_under_way_is_refused(rig: Rig) -> None:
    a, b = cluster_of(rig, 2)
    admin = rig.client()
    preload(admin, 5000)
    c, d = rig.start_node(), rig.start_node()
    handle = admin.add_node(c, rate=500, wait=False)
    assert isinstance(handle, zkv.client.MoveHandle)
    during = admin.status()
    assert during["move"] is not None
    for call in (lambda: admin.add_node(d), lambda: admin.remove_node(b),
                 lambda: admin.add_node(d, dry_run=False)):
        with pytest.raises(zkv.ClusterError, match="move is under way"):
            call()
        now = admin.status()
        # the running move itself may have gone from prepare (old ring) to copy (its
        # own epoch, with c in); the refused change must have added nothing of its own
        assert now["move"] is not None and now["move"]["id"] == during["move"]["id"]
        assert sorted(now["members"]) in (sorted([a, b]), sorted([a, b, c]))
        # (every phase of the move is an epoch: it may have advanced, by itself)
        assert during["epoch"] <= now["epoch"] <= during["epoch"] + 3
    handle.wait(30)
    assert sorted(admin.status()["members"]) == sorted([a, b, c])


@pytest.mark.timeout(60)
def test_dry_run_reports_the_plan_and_moves_nothing(rig: Rig) -> None:
    members = cluster_of(rig, 3)
    admin = rig.client()
    preload(admin, 5000)
    before_status = admin.status()
    before_nodes = {n["address"]: n["keys"] for n in admin.nodes()}
    new = rig.start_node()

    plan = admin.add_node(new, dry_run=True)
    assert isinstance(plan, dict) and plan["dry_run"] is True
    assert abs(plan["moved"] - 1 / 4) < 0.08, plan
    assert {t["dest"] for t in plan["transfers"]} == {new}
    assert {t["source"] for t in plan["transfers"]} <= set(members)
    assert abs(sum(t["fraction"] for t in plan["transfers"]) - plan["moved"]) < 1e-3

    plan = admin.remove_node(members[0], dry_run=True)
    assert isinstance(plan, dict) and plan["dry_run"] is True
    assert abs(plan["moved"] - 1 / 3) < 0.08, plan
    assert {t["source"] for t in plan["transfers"]} == {members[0]}

    after_status = admin.status()
    assert after_status["epoch"] == before_status["epoch"]
    assert after_status["members"] == before_status["members"]
    assert after_status["move"] is None
    assert {n["address"]: n["keys"] for n in admin.nodes()} == before_nodes
    assert new not in after_status["members"]


# -- 6. ADD on an empty proxy ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_add_on_an_empty_proxy_registers_the_node(rig: Rig) -> None:
    rig.start_proxy([])
    admin = rig.client()
    status = admin.status()
    assert status["epoch"] == 0 and status["members"] == {}
    a = rig.start_node()
    result = admin.add_node(a, wait_timeout=10)
    assert isinstance(result, dict)
    status = admin.status()
    assert status["epoch"] == 1 and list(status["members"]) == [a] and status["move"] is None
    nodes = admin.nodes()
    assert [n["address"] for n in nodes] == [a] and nodes[0]["state"] == "up"
    admin.set("hello", "world")
    assert admin.get("hello") == b"world"
    assert admin.mget(["hello", "nope"]) == [b"world", None]
    assert admin.delete("hello") is True and admin.get("hello") is None


@pytest.mark.timeout(120)
def test_nodes_bound_to_every_interface_move_keys_both_ways(rig: Rig) -> None:
    """A node bound to 0.0.0.0 advertised tcp://0.0.0.0:PORT as its PULL endpoint and
    named itself 0.0.0.0:PORT in its streams, so moves to or from it never finished.
    The proxy now reaches a PULL port at the host it knows the node by, and tells a
    source the name the ring gives it."""
    a = rig.start_node(bind="0.0.0.0")
    b = rig.start_node(bind="0.0.0.0")
    rig.start_proxy([a])
    admin = rig.client(timeout=10)
    data = preload(admin, 5000)
    admin.add_node(b, wait_timeout=60)  # to a wildcard-bound destination
    assert set(admin.status()["members"]) == {a, b}
    admin.remove_node(a, wait_timeout=60)  # from a wildcard-bound source
    assert list(admin.status()["members"]) == [b]
    assert admin.mget(list(data)) == list(data.values())


# -- a source node stays responsive while it starts a large stream ------------------------


@pytest.mark.timeout(60)
def test_source_node_answers_while_starting_a_large_stream(procs: Procs, tmp_path: Path,
                                                           raw: Any) -> None:
    """Finding the keys of the ranges to stream hashes every key; the node does it a
    bounded step at a time between requests, so it keeps answering (and the proxy's
    heartbeats keep it up) while a large stream is starting."""
    from zkv.core.ring import HASH_SPACE

    port = free_port()
    procs.node(port, str(tmp_path / "src"), "--fsync", "no")
    node = raw(f"127.0.0.1:{port}", 10_000)
    value = b"x" * 100
    for start in range(0, 100_000, 1000):
        assert node.call("MSET", [x for i in range(start, start + 1000)
                                  for x in (b"key-%08d" % i, value)]) == "OK"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 1)
    try:
        sink = pull.bind_to_random_port("tcp://127.0.0.1")
        node.send(P.encode_request("XSEND", {
            "id": "m1", "dest": "127.0.0.1:1", "pull": f"tcp://127.0.0.1:{sink}",
            "ranges": [[0, HASH_SPACE]], "batch_keys": 1000, "batch_bytes": 1 << 20,
            "rate": None}))
        node.send(P.encode_request("PING"))
        node.send(P.encode_request("XSTAT"))
        replies = [P.decode_reply(node.recv()[-1]) for _ in range(3)]
        assert replies[:2] == ["OK", "PONG"]
        (out,) = replies[2]["outgoing"]
        # answered while the scan of the 100,000 keys is still under way
        assert out["total_keys"] is None
        assert out["sent_keys"] < 100_000
    finally:
        pull.close(0)
        ctx.term()
