"""Faults on real processes (DESIGN.md sections 2-4): what zkv survives.

* kill -9 of storage nodes and of the proxy, again and again, under a mixed load;
* a frozen node (SIGSTOP longer than the proxy's deadline and heartbeat window);
* a node whose disk fills up (its data directory on a tiny tmpfs);
* kill -9 of the source, the destination or the proxy at every phase of a move.

Every test starts its own nodes (``--fsync always``: an acknowledged write is on
disk) and proxy on free loopback ports. A load of threads, each with its own
client and its own keys, keeps for every key the set of values it may hold: one
after an acknowledged call, more after calls that raised (their outcome is
unknown), None meaning deleted. Afterwards every key is read back and must hold
one of its possible values: nothing acknowledged lost, no acknowledged delete
undone. The kills are counted across the module; the last test checks the total.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
from conftest import PROXY_READY, Proc, Procs, Topo, free_port, wait_until
from load import Load, Mix, Possible, assert_counts_match_ring, read_back

import zkv
from zkv.core.ring import Ring

# -- module-wide figures ------------------------------------------------------------------

KILLS: dict[str, int] = {}  # "node" / "proxy" -> kill -9s survived (each followed by a restart)
TOTALS = {"keys_checked": 0, "acked_writes": 0, "unknown_writes": 0, "losses": 0}
PASSED: set[str] = set()  # the kill tests whose checks all held
KILL_TESTS = 2 + 9  # the kill storm, the disk test and the nine move cases
MIN_KILLS = 20


def kill9(proc: Proc, kind: str) -> None:
    """kill -9 a zkv process (and reap it), counting it."""
    assert proc.popen.poll() is None, f"the {kind} died before it was killed:\n{proc.output}"
    proc.kill()
    KILLS[kind] = KILLS.get(kind, 0) + 1


# -- a small cluster of our own ---------------------------------------------------------------


class Rig:
    """Storage nodes (``--fsync always``) and a proxy whose settings come from a topology
    file, so that its deadline and heartbeats are short; the proxy may get extra
    environment (``ZKV_MOVE_PHASE_PAUSE``)."""

    def __init__(self, procs: Procs, root: Path, nodes: int, *, timeout_ms: int = 1000,
                 proxy_env: dict[str, str] | None = None) -> None:
        self.procs = procs
        self.topo = Topo(root, nodes, proxy={"timeout_ms": timeout_ms, "heartbeat_ms": 200,
                                             "heartbeat_misses": 3},
                         defaults={"fsync": "always"})
        self.proxy_env = proxy_env
        self.nodes: dict[str, Proc] = {}
        self.data_dirs: dict[str, Path] = dict(self.topo.data_dirs)
        self.proxy: Proc | None = None
        self.clients: list[zkv.Client] = []

    @property
    def address(self) -> str:
        return self.topo.proxy_addr

    @property
    def members(self) -> list[str]:
        return list(self.topo.node_addrs)

    def start(self) -> Self:
        for addr in self.members:
            self.start_node(addr, wait=False)
        for addr in self.members:
            self.nodes[addr].wait_for("zkv node ", 30)
        self.start_proxy()
        return self

    def start_node(self, addr: str | None = None, wait: bool = True) -> str:
        """Start (or restart, on its old data directory) the node at ``addr``; a new
        node on a free port when ``addr`` is None."""
        if addr is None:
            addr = f"127.0.0.1:{free_port()}"
            self.data_dirs[addr] = self.topo.dir / "data" / f"node-{addr.rsplit(':', 1)[1]}"
        port = int(addr.rsplit(":", 1)[1])
        self.nodes[addr] = self.procs.node(port, str(self.data_dirs[addr]), "--fsync", "always",
                                           ready=False)
        if wait:
            self.nodes[addr].wait_for("zkv node ", 30)
        return addr

    def start_proxy(self) -> Proc:
        self.proxy = self.procs.start("proxy", "--config", str(self.topo.path),
                                      ready=PROXY_READY, timeout=30, env=self.proxy_env)
        return self.proxy

    def client(self, timeout: float = 5.0, retries: int = 0) -> zkv.Client:
        c = zkv.Client(self.address, timeout=timeout, retries=retries)
        self.clients.append(c)
        return c

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Until the proxy answers and reaches every member (after a start or restart)."""
        def reached() -> bool:
            with zkv.Client(self.address, timeout=2.0, retries=0) as c:
                infos = c.info()["nodes"]
                states = {n["address"]: n["state"] for n in c.nodes()}
            return bool(infos) and all("error" not in i for i in infos.values()) \
                and set(states.values()) == {"up"}

        wait_until(reached, timeout, interval=0.1, what="the proxy reaching every node")

    def states(self) -> dict[str, str]:
        with zkv.Client(self.address, timeout=3.0, retries=0) as c:
            return {n["address"]: n["state"] for n in c.nodes()}

    def wait_state(self, addr: str, state: str, timeout: float = 20.0) -> None:
        wait_until(lambda: self.states().get(addr) == state, timeout, interval=0.05,
                   what=f"NODES showing {addr} {state}")

    def ring(self) -> Ring:
        with zkv.Client(self.address, timeout=5.0, retries=2) as c:
            status = c.status()
        return Ring(status["members"], status["vnodes"])

    def close(self) -> None:
        for c in self.clients:
            c.close()


@pytest.fixture
def make_rig(procs: Procs, tmp_path: Path) -> Iterator[Any]:
    made: list[Rig] = []

    def make(nodes: int = 3, start: bool = True, **settings: Any) -> Rig:
        rig = Rig(procs, tmp_path / f"rig{len(made)}", nodes, **settings)
        made.append(rig)
        if start:
            rig.start().wait_serving()
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.close()


# -- the load: each thread its own client and its own keys ------------------------------------


MIX = Mix(set=0.45, delete=0.20, mset=0.07, mget=0.06)


def verify(address: str, expected: Possible) -> dict[bytes, bytes]:
    """:func:`load.read_back` through a client of its own, waiting for each MGET to be
    answered; the keys checked and the losses count in TOTALS."""
    with zkv.Client(address, timeout=10.0, retries=3) as c:
        def mget(chunk: list[bytes]) -> Any:
            return wait_until(lambda: c.mget(chunk), 30, interval=0.2, what="an MGET answering")

        return read_back(mget, expected, TOTALS)


def count(load: Load) -> dict[str, int]:
    totals = load.totals()
    TOTALS["acked_writes"] += totals["acked_sets"] + totals["acked_dels"]
    TOTALS["unknown_writes"] += totals["unknown"]
    return totals


def keys_owned(ring: Ring, owner: str, prefix: str, n: int) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while len(out) < n:
        key = b"%s-%06d" % (prefix.encode(), i)
        if ring.owner(key) == owner:
            out.append(key)
        i += 1
    return out


# -- 1. kill -9 again and again under a mixed load ------------------------------------------


STORM_KILLS = 8  # each node killed twice, the proxy three times


@pytest.mark.timeout(150)
def test_repeated_kill9_of_nodes_and_proxy_loses_no_acknowledged_write(make_rig: Any) -> None:
    rig: Rig = make_rig(3)
    a, b, c = rig.members
    schedule = [a, "proxy", b, c, "proxy", a, b, "proxy", c, a, "proxy", b][:STORM_KILLS]
    rng = random.Random(6)
    with Load(rig.address, MIX, workers=4, keys_each=300) as load:
        for victim in schedule:
            time.sleep(rng.uniform(0.4, 1.0))  # let writes land between kills
            if victim == "proxy":
                assert rig.proxy is not None
                kill9(rig.proxy, "proxy")
                time.sleep(rng.uniform(0.0, 0.5))
                rig.start_proxy()
            else:
                kill9(rig.nodes[victim], "node")
                time.sleep(rng.uniform(0.0, 0.5))
                rig.start_node(victim)
            rig.wait_serving()
        time.sleep(1.0)  # writes after the last restart
    load.check_threads()
    totals = count(load)
    assert totals["acked_sets"] > 200 and totals["acked_dels"] > 50, totals
    verify(rig.address, load.possible())

    # and once more with every node killed at once: all of it was on disk
    for addr in rig.members:
        kill9(rig.nodes[addr], "node")
    for addr in rig.members:
        rig.start_node(addr, wait=False)
    for addr in rig.members:
        rig.nodes[addr].wait_for("zkv node ", 30)
    rig.wait_serving()
    found = verify(rig.address, load.possible())
    with zkv.Client(rig.address, timeout=10.0) as cl:
        assert sum(n["keys"] for n in cl.nodes()) == len(found)
    print(f"\nkill storm: {len(schedule) + 3} kills, {totals}, keys checked="
          f"{len(load.possible())}, losses=0")
    PASSED.add("storm")


# -- 2. a frozen node ---------------------------------------------------------------------------


def _value(i: int) -> bytes:
    return b"%08d" % i


@pytest.mark.timeout(90)
def test_a_frozen_node_fails_fast_then_serves_again_without_replaying_old_writes(
    make_rig: Any,
) -> None:
    deadline_s, window_s = 0.8, 0.2 * 3
    rig: Rig = make_rig(3, timeout_ms=int(deadline_s * 1000))
    victim, other1, other2 = rig.members
    ring = rig.ring()
    (key,) = keys_owned(ring, victim, "frozen", 1)
    elsewhere = keys_owned(ring, other1, "thawed", 3) + keys_owned(ring, other2, "thawed", 3)
    client_timeout = 5.0
    c = rig.client(timeout=client_timeout)
    assert c.set(key, _value(0))
    last_acked = 0
    forwarded: list[int] = []  # SETs the proxy passed to the frozen node (outcome unknown)
    refused: list[int] = []  # SETs refused at the proxy because the node was marked down

    def classify(i: int, result: Any) -> None:
        nonlocal last_acked
        if not isinstance(result, zkv.ZkvError):
            last_acked = i  # cannot happen while it is stopped, but would be allowed
            return
        assert isinstance(result, zkv.Unavailable), repr(result)
        assert victim in str(result), f"the error does not name {victim}: {result}"
        if "is down" in str(result) or "not connected" in str(result):
            refused.append(i)
        else:  # "did not answer in time" / "went down with this request in flight"
            forwarded.append(i)

    proc = rig.nodes[victim]
    proc.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # 30 SETs of increasing values in flight at once, queued towards the frozen node
        started = time.monotonic()
        results = c.call_many([("SET", [key, _value(i)]) for i in range(1, 31)])
        assert time.monotonic() - started < client_timeout, "the proxy did not answer in time"
        for i, result in enumerate(results, 1):
            classify(i, result)
        assert forwarded, "no SET reached the frozen node"

        rig.wait_state(victim, "down", timeout=20)
        for i in range(31, 41):  # one by one: each fails fast, naming the node
            started = time.monotonic()
            try:
                c.set(key, _value(i))
            except zkv.ZkvError as exc:
                classify(i, exc)
                assert time.monotonic() - started < client_timeout
            else:
                classify(i, "OK")
        with pytest.raises(zkv.Unavailable, match=victim):
            c.get(key)
        # the other nodes' keys keep working
        for k in elsewhere:
            assert c.set(k, b"fine") and c.get(k) == b"fine"
        states = rig.states()
        assert states[victim] == "down", states
        assert all(states[a] == "up" for a in (other1, other2)), states
        # stay frozen well past the deadline and the heartbeat window
        time.sleep(max(0.0, 2 * (deadline_s + window_s) - (time.monotonic() - frozen_at)))
    finally:
        proc.signal(signal.SIGCONT)

    rig.wait_state(victim, "up", timeout=20)
    got = wait_until(lambda: [c.get(key)], 20, what="a GET of the thawed node's key")[0]
    sent = {_value(i) for i in [0, *forwarded, *refused]}
    assert got in sent, got
    assert int(got) >= last_acked, (got, last_acked)
    assert int(got) not in refused, f"{got!r} was refused at the proxy, yet it was applied"
    # The link to the node stayed open, so everything forwarded reached it, in order:
    # the last forwarded SET is the one that holds.
    assert int(got) == max(forwarded), (got, forwarded)

    # No queued request is applied again after a later acknowledged write.
    assert c.set(key, _value(100))
    for n in range(101, 121):  # pipelined, all acknowledged, applied in order
        results = c.call_many([("SET", [key, _value(n)])])
        assert results == ["OK"], results
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        assert c.get(key) == _value(120)
        time.sleep(0.05)
    with zkv.Client(rig.address, timeout=5.0) as fresh:
        assert fresh.get(key) == _value(120)
        assert all(fresh.get(k) == b"fine" for k in elsewhere)
    print(f"\nfrozen node: {len(forwarded)} SETs forwarded while frozen, {len(refused)} "
          f"refused fast; final value {got!r} (the last forwarded)")


# -- 3. a node whose disk fills up -------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Any]:
    """``tiny_disk(path, users)`` mounts a 2 MiB tmpfs on ``path`` (or skips the test);
    at the end the processes in ``users`` are killed and the tmpfs is unmounted."""
    mounted: list[tuple[Path, list[Proc]]] = []

    def mount(path: Path, users: list[Proc]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append((path, users))

    try:
        yield mount
    finally:
        for path, users in mounted:
            for proc in users:
                proc.signal(signal.SIGCONT)
                proc.kill()
            if subprocess.run(["umount", str(path)], check=False,
                              capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.timeout(90)
def test_a_full_disk_refuses_writes_clearly_and_loses_nothing(make_rig: Any,
                                                              tiny_disk: Any) -> None:
    rig: Rig = make_rig(2, start=False)
    victim, other = rig.members
    data_dir = rig.data_dirs[victim]
    users: list[Proc] = []
    tiny_disk(data_dir, users)
    rig.start()
    users.append(rig.nodes[victim])
    rig.wait_serving()
    ring = rig.ring()
    keys = keys_owned(ring, victim, "disk", 20)
    safe = keys_owned(ring, other, "disk", 5)
    c = rig.client(timeout=5.0)

    acked: dict[bytes, bytes] = {}
    for k in keys[:5]:  # some writes before the disk fills
        assert c.set(k, b"early-" + k)
        acked[k] = b"early-" + k
    filler = data_dir / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(data_dir) - 48 * 1024))
    assert free_bytes(data_dir) <= 64 * 1024

    failures: list[zkv.ZkvError] = []
    n = 0
    while len(failures) < 5:
        n += 1
        assert n < 2000, "the disk never filled up"
        k = keys[n % len(keys)]
        value = b"%06d-" % n + b"x" * 2000
        try:
            c.set(k, value)
        except zkv.ZkvError as exc:
            failures.append(exc)
            assert isinstance(exc, zkv.StorageError), repr(exc)
            assert exc.code == "STORAGE"
            assert "space" in str(exc).lower() and "not applied" in str(exc), str(exc)
            assert c.get(k) == acked.get(k), "a refused write is visible"
            continue
        acked[k] = value
    # reads keep working, on the full node and elsewhere; other nodes take writes
    assert c.mget(keys) == [acked.get(k) for k in keys]
    for k in safe:
        assert c.set(k, b"safe") and c.get(k) == b"safe"
    with pytest.raises(zkv.StorageError):
        c.set(keys[0], b"y" * 4000)
    assert c.get(keys[0]) == acked.get(keys[0])
    assert rig.states()[victim] == "up"

    filler.unlink()
    for k in keys:  # the disk has room again: writes succeed again
        value = b"after-" + k
        assert c.set(k, value)
        acked[k] = value
    assert c.delete(keys[-1])
    acked.pop(keys[-1])

    kill9(rig.nodes[victim], "node")
    rig.start_node(victim)
    users.append(rig.nodes[victim])
    rig.wait_serving()
    expected: Possible = {k: {acked.get(k)} for k in keys}
    expected.update({k: {b"safe"} for k in safe})
    verify(rig.address, expected)
    TOTALS["acked_writes"] += n - len(failures) + len(keys) + 6
    print(f"\nfull disk: {len(failures)} writes refused with STORAGE "
          f"({failures[0]}), {n - len(failures)} acknowledged, none lost")
    PASSED.add("disk")


# -- 4. kill -9 at every phase of a move --------------------------------------------------------

PHASE_PAUSE = 1.5
MOVE_KEYS = 3000


def wait_phase(address: str, phase: str, timeout: float = 30.0) -> dict[str, Any]:
    def seen() -> Any:
        with zkv.Client(address, timeout=2.0, retries=0) as c:
            move = c.status()["move"]
        assert move is not None, f"the move finished before its {phase} phase was seen"
        return move if move["phase"] == phase else None

    move: dict[str, Any] = wait_until(seen, timeout, interval=0.05,
                                      what=f"STATUS showing phase {phase}")
    return move


def wait_move_done(address: str, timeout: float = 90.0) -> dict[str, Any]:
    def done() -> Any:
        with zkv.Client(address, timeout=2.0, retries=0) as c:
            status = c.status()
        return status if status["move"] is None else None

    status: dict[str, Any] = wait_until(done, timeout, interval=0.2, what="the move finishing")
    return status


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["source", "destination", "proxy"])
@pytest.mark.parametrize("phase", ["prepare", "copy", "cleanup"])
def test_kill9_at_every_phase_of_a_move(make_rig: Any, phase: str, victim: str) -> None:
    rig: Rig = make_rig(2, proxy_env={"ZKV_MOVE_PHASE_PAUSE": f"{phase}={PHASE_PAUSE}"})
    initial = {b"pre-%05d" % i: b"v%05d-" % i + b"x" * 30 for i in range(MOVE_KEYS)}
    with zkv.Client(rig.address, timeout=10.0) as c:
        items = list(initial.items())
        for i in range(0, len(items), 1000):
            assert c.mset(dict(items[i:i + 1000]))
    new = rig.start_node()
    with Load(rig.address, MIX, workers=2, keys_each=150, pause=0.005,
              prefix=f"m{phase[:2]}") as load:
        with zkv.Client(rig.address, timeout=10.0) as admin:
            handle = admin.add_node(new, wait=False)
            assert isinstance(handle, zkv.client.MoveHandle)
        move = wait_phase(rig.address, phase)
        if victim == "proxy":
            assert rig.proxy is not None
            kill9(rig.proxy, "proxy")
            time.sleep(0.3)
            rig.start_proxy()
        else:
            target = new if victim == "destination" else move["streams"][0]["source"]
            assert target != new or victim == "destination"
            kill9(rig.nodes[target], "node")
            time.sleep(0.3)
            rig.start_node(target)
        final = wait_move_done(rig.address)
        time.sleep(0.3)
    load.check_threads()
    count(load)
    assert sorted(final["members"]) == sorted([*rig.members, new])
    expected: Possible = {k: {v} for k, v in initial.items()}
    expected.update(load.possible())
    found = verify(rig.address, expected)
    with zkv.Client(rig.address, timeout=10.0, retries=3) as c:
        counts = assert_counts_match_ring(c, set(found))
    assert counts[new] > 0
    print(f"\nkill -9 of the {victim} in {phase}: {load.totals()}, keys checked="
          f"{len(expected)}, counts {counts}, losses=0")
    PASSED.add(f"move-{phase}-{victim}")


# -- the figures ----------------------------------------------------------------------------------


def test_zz_kills_survived_across_this_file() -> None:
    """Runs last: the kill -9s of this module, all survived with nothing lost."""
    total = sum(KILLS.values())
    print(f"\nfaults: {total} kill -9s survived ({KILLS}), {TOTALS}")
    if len(PASSED) < KILL_TESTS:
        pytest.skip(f"only {len(PASSED)} of the {KILL_TESTS} kill tests passed in this run "
                    f"({total} kills)")
    assert TOTALS["losses"] == 0
    assert total >= MIN_KILLS, KILLS
