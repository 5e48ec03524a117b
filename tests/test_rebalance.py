"""Online rebalancing on real processes: ADD and REMOVE under load, kills mid-move.

The contract (DESIGN.md section 3): no acknowledged write is lost or reverted, no
deleted key comes back, reads return the latest acknowledged value, and a move
that a kill -9 interrupts finishes once the process is back. Every test starts
its own nodes and proxy on free loopback ports and checks, key by key, what a
model of the acknowledged operations says must be there.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any, Self

import pytest
import zmq
from conftest import Proc, Procs, free_port

import zkv
from zkv import protocol as P
from zkv.ring import Ring

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

    def start_node(self, addr: str | None = None) -> str:
        addr = addr or f"127.0.0.1:{free_port()}"
        port = int(addr.rsplit(":", 1)[1])
        self.nodes[addr] = self.procs.node(port, self.data_dir(addr), "--fsync", "no")
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


class Worker(threading.Thread):
    """SET, DEL, GET, MSET and MGET on its own keys with its own client. For every key it keeps
    the values the key may hold: exactly one after an acknowledged call, more after
    calls whose outcome is unknown (they raised), None meaning deleted."""

    def __init__(self, address: str, wid: int, keys: int, stop: threading.Event,
                 initial: dict[bytes, bytes]) -> None:
        super().__init__(daemon=True, name=f"worker-{wid}")
        self.client = zkv.Client(address, timeout=2.0, retries=0)
        self.keys = [b"w%d-%05d" % (wid, i) for i in range(keys)]
        self.rng = random.Random(wid)
        self.stop = stop
        self.wid = wid
        self.possible: dict[bytes, set[bytes | None]] = {
            k: {initial.get(k)} for k in self.keys
        }
        self.acked_sets = 0
        self.acked_dels = 0
        self.unknown = 0  # writes that raised
        self.reads = 0
        self.read_errors = 0
        self.stale_reads: list[tuple[bytes, Any, set[Any]]] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                key = self.rng.choice(self.keys)
                r = self.rng.random()
                if r < 0.45:
                    value = b"%d-%d-%s" % (self.wid, n, key)
                    self._write(key, value, self.client.set, key, value)
                elif r < 0.65:
                    self._write(key, None, self.client.delete, key)
                elif r < 0.70:
                    self._mset(list(set(self.rng.sample(self.keys, 3))), n)
                elif r < 0.75:
                    self._mget(self.rng.sample(self.keys, 3))
                else:
                    self._read(key)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            self.failure = exc
        finally:
            self.client.close()

    def _write(self, key: bytes, value: bytes | None, call: Any, *args: bytes) -> None:
        try:
            call(*args)
        except (zkv.Timeout, zkv.Unavailable, zkv.NodeUnavailable):
            self.unknown += 1
            self.possible[key].add(value)
            time.sleep(0.02)
            return
        self.possible[key] = {value}
        if value is None:
            self.acked_dels += 1
        else:
            self.acked_sets += 1

    def _read(self, key: bytes) -> None:
        try:
            got = self.client.get(key)
        except (zkv.Timeout, zkv.Unavailable, zkv.NodeUnavailable):
            self.read_errors += 1
            time.sleep(0.02)
            return
        self.reads += 1
        if got not in self.possible[key]:
            self.stale_reads.append((key, got, set(self.possible[key])))

    def _mset(self, keys: list[bytes], n: int) -> None:
        values: dict[Any, Any] = {k: b"%d-%d-m-%s" % (self.wid, n, k) for k in keys}
        try:
            self.client.mset(values)
        except (zkv.Timeout, zkv.Unavailable, zkv.NodeUnavailable):
            self.unknown += 1
            for k, v in values.items():
                self.possible[k].add(v)
            time.sleep(0.02)
            return
        for k, v in values.items():
            self.possible[k] = {v}
        self.acked_sets += len(keys)

    def _mget(self, keys: list[bytes]) -> None:
        try:
            got = self.client.mget(keys)
        except (zkv.Timeout, zkv.Unavailable, zkv.NodeUnavailable):
            self.read_errors += 1
            time.sleep(0.02)
            return
        self.reads += len(keys)
        for k, v in zip(keys, got):
            if v not in self.possible[k]:
                self.stale_reads.append((k, v, set(self.possible[k])))


class Load:
    def __init__(self, address: str, initial: dict[bytes, bytes], workers: int = 4,
                 keys_each: int = 500) -> None:
        self.stop = threading.Event()
        self.workers = [Worker(address, w, keys_each, self.stop, initial) for w in range(workers)]

    def __enter__(self) -> Self:
        for w in self.workers:
            w.start()
        time.sleep(0.3)  # let the load get going before anything changes
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(15)

    def possible(self) -> dict[bytes, set[bytes | None]]:
        out: dict[bytes, set[bytes | None]] = {}
        for w in self.workers:
            out.update(w.possible)
        return out

    def totals(self) -> dict[str, int]:
        return {
            "acked_sets": sum(w.acked_sets for w in self.workers),
            "acked_dels": sum(w.acked_dels for w in self.workers),
            "unknown": sum(w.unknown for w in self.workers),
            "reads": sum(w.reads for w in self.workers),
            "read_errors": sum(w.read_errors for w in self.workers),
            "stale_reads": sum(len(w.stale_reads) for w in self.workers),
        }

    def check_threads(self) -> None:
        for w in self.workers:
            assert not w.is_alive(), f"{w.name} did not stop"
            assert w.failure is None, f"{w.name} failed: {w.failure!r}"
        stale = [s for w in self.workers for s in w.stale_reads]
        assert not stale, f"{len(stale)} reads did not return the latest acknowledged value: " \
                          f"{stale[:5]}"


def verify(client: zkv.Client, expected: dict[bytes, set[bytes | None]]) -> dict[bytes, bytes]:
    """Read every key back; each must hold one of its possible values. Returns what exists."""
    keys = sorted(expected)
    found: dict[bytes, bytes] = {}
    losses: list[tuple[bytes, Any, Any]] = []
    for i in range(0, len(keys), 1000):
        chunk = keys[i:i + 1000]
        for key, got in zip(chunk, client.mget(chunk)):
            if got not in expected[key]:
                losses.append((key, got, expected[key]))
            if got is not None:
                found[key] = got
    assert not losses, f"{len(losses)} keys lost or reverted, e.g. {losses[:5]}"
    return found


def assert_counts_match_ring(client: zkv.Client, present: set[bytes]) -> dict[str, int]:
    """Every node holds exactly the keys the ring gives it (no leftovers on old owners)."""
    status = client.status()
    assert status["move"] is None
    ring = Ring(status["members"], status["vnodes"])
    want = {m: 0 for m in ring.members}
    for key in present:
        want[ring.owner(key)] += 1
    have = {n["address"]: n["keys"] for n in client.nodes()}
    assert have == want, f"node key counts {have} != ring shares {want}"
    return have


def report(name: str, load: Load, keys_checked: int) -> None:
    print(f"\n{name}: {load.totals()} keys checked={keys_checked} losses=0")


# -- 1. ADD then REMOVE under load -----------------------------------------------------


@pytest.mark.timeout(90)
def test_add_then_remove_under_load_loses_nothing(rig: Rig) -> None:
    a, b, c = cluster_of(rig, 3)
    admin = rig.client(timeout=5.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, initial) as load:
        plan = admin.add_node(d, rate=4000, wait_timeout=60)
        assert isinstance(plan, dict) and plan["finished"]
        time.sleep(0.3)
        plan = admin.remove_node(a, rate=4000, wait_timeout=60)
        assert isinstance(plan, dict) and plan["finished"]
        time.sleep(0.3)
    load.check_threads()
    totals = load.totals()
    assert totals["acked_sets"] > 500 and totals["acked_dels"] > 200, totals

    expected: dict[bytes, set[bytes | None]] = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    found = verify(admin, expected)
    status = admin.status()
    assert sorted(status["members"]) == sorted([b, c, d])
    counts = assert_counts_match_ring(admin, set(found))
    assert a not in counts
    report("add+remove under load", load, len(expected))


# -- 2./3. kill -9 mid-move ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_proxy_killed_mid_move_resumes_and_loses_nothing(rig: Rig) -> None:
    members = cluster_of(rig, 3)
    admin = rig.client(timeout=2.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, initial) as load:
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
        assert final["epoch"] == epoch
        time.sleep(0.3)
    load.check_threads()
    assert sorted(final["members"]) == sorted([*members, d])
    expected: dict[bytes, set[bytes | None]] = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    found = verify(admin, expected)
    assert_counts_match_ring(admin, set(found))
    report("proxy kill -9 mid-move", load, len(expected))


@pytest.mark.timeout(90)
def test_destination_killed_mid_move_resumes_and_loses_nothing(rig: Rig) -> None:
    members = cluster_of(rig, 3)
    admin = rig.client(timeout=2.0)
    initial = preload(admin)
    d = rig.start_node()
    with Load(rig.address, initial) as load:
        admin.add_node(d, rate=500, wait=False)
        wait_copy_progress(admin, 300)
        rig.nodes[d].kill()
        time.sleep(2.0)  # long enough for the proxy to see it down
        rig.start_node(d)  # same port, same data directory
        final = wait_move_done(admin, 60)
        time.sleep(0.3)
    load.check_threads()
    assert sorted(final["members"]) == sorted([*members, d])
    expected: dict[bytes, set[bytes | None]] = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    found = verify(admin, expected)
    assert_counts_match_ring(admin, set(found))
    report("destination kill -9 mid-move", load, len(expected))


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
    assert verify(admin, {k: {v} for k, v in data.items()}) == data


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
        assert now["epoch"] in (during["epoch"], during["epoch"] + 1)
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


# -- a source node stays responsive while it starts a large stream ------------------------


@pytest.mark.timeout(60)
def test_source_node_answers_while_starting_a_large_stream(procs: Procs, tmp_path: Path,
                                                           raw: Any) -> None:
    """Finding the keys of the ranges to stream hashes every key; the node does it a
    bounded step at a time between requests, so it keeps answering (and the proxy's
    heartbeats keep it up) while a large stream is starting."""
    from zkv.ring import HASH_SPACE

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
