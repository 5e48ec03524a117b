"""The proxy as an operator and a hostile client meet it: its state directory is its
own, admin options are checked before anything is kept, a bug in one request is an
error reply, replies stay within their budget and KEYS never stalls a node."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
from conftest import REPO, Cluster, Procs, free_port, wait_until

import zkv
from zkv.core import protocol as P
from zkv.core.cluster import ClusterState
from zkv.mover import new_move
from zkv.proxy import STATE_FILE, save_state

pytestmark = pytest.mark.timeout(120)


def state_file(cluster: Cluster) -> dict[str, Any]:
    return json.loads((cluster.topo.state_dir / STATE_FILE).read_text())


def test_a_second_proxy_on_the_same_state_dir_is_refused(cluster: Cluster, procs: Procs) -> None:
    """Two proxies on one state directory both ran: after an ADD through one, a SET
    through the other was acknowledged and then lost to reads."""
    assert cluster.proxy is not None
    other = procs.start("proxy", "--port", str(free_port()), "--state-dir",
                        str(cluster.topo.state_dir), "--node", cluster.node_addrs[0])
    assert other.wait_exit(20) == 1
    assert "in use by another proxy" in other.output
    assert str(cluster.topo.state_dir) in other.output
    assert str(cluster.proxy.popen.pid) in other.output
    assert "Traceback" not in other.output
    assert cluster.client().ping()


BAD_OPTIONS = [
    ({"batch_keys": "x"}, "batch_keys must be an integer"),
    ({"batch_keys": 0}, "batch_keys must be an integer from 1"),
    ({"batch_bytes": 0}, "batch_bytes must be an integer from 1"),
    ({"rate": "fast"}, "rate must be a positive number"),
    ({"rate": -5}, "rate must be a positive number"),
    ({"rate": float("inf")}, "rate must be a positive number"),
    ({"weight": float("nan")}, "weight must be a number > 0 and at most 64"),
    ({"weight": 1e6}, "weight must be a number > 0 and at most 64"),
    ({"weight": 0}, "weight must be a number > 0"),
    ({"dry_run": "yes"}, "dry_run must be true or false"),
    ({"speed": 3}, "unknown option 'speed'"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS,
                         ids=[next(iter(o)) + "=" + repr(next(iter(o.values())))
                              for o, _ in BAD_OPTIONS])
def test_bad_admin_options_are_refused_before_anything_is_kept(
        cluster: Cluster, procs: Procs, tmp_path: Path, raw: Any,
        options: dict[str, Any], message: str) -> None:
    """ADD with {"rate": "fast"} was persisted and retried forever; {"batch_keys": "x"}
    or a NaN weight killed the proxy. Each is now an error that changes nothing."""
    port = free_port()
    procs.node(port, str(tmp_path / "new"))
    before = state_file(cluster)
    c = raw(cluster.address)
    for dry in (True, False):
        with pytest.raises(zkv.ClusterError, match=message):
            c.call("ADD", f"127.0.0.1:{port}", {**options, "dry_run": dry}
                   if "dry_run" not in options else options)
    assert state_file(cluster) == before
    status = cluster.client().status()
    assert status["move"] is None and status["epoch"] == before["epoch"]
    # the proxy is alive and a good ADD goes through
    good = cluster.client(timeout=10).add_node(f"127.0.0.1:{port}", rate=1e6)
    assert good["finished"]


def test_a_dry_run_of_a_huge_ring_is_refused_not_built(cluster: Cluster, raw: Any) -> None:
    """weight 1e6 tried to build two billion ring points; the weight bound refuses it
    before any is built, while the heaviest weight allowed plans as usual."""
    c = raw(cluster.address)
    with pytest.raises(zkv.ClusterError, match="at most 64"):
        c.call("ADD", "127.0.0.1:1", {"weight": 1e6, "dry_run": True})
    plan = c.call("ADD", "127.0.0.1:1", {"weight": 64, "dry_run": True})
    assert plan["dry_run"] and 0.9 < plan["moved"] < 1.0
    assert cluster.client().status()["move"] is None


def test_a_persisted_move_with_bad_settings_runs_with_the_defaults(
        make_cluster: Any, procs: Procs, tmp_path: Path) -> None:
    """An older zkv persisted ADD options unchecked; such a move retried forever across
    restarts, blocking every other change. Now its bad settings are replaced by the
    defaults (and STATUS says so), and it finishes."""
    cluster: Cluster = make_cluster(nodes=2)
    c = cluster.client(timeout=10)
    c.mset({f"k{i}": b"v" for i in range(500)})
    port = free_port()
    procs.node(port, str(tmp_path / "joining"))
    new = f"127.0.0.1:{port}"
    cluster.kill_proxy()
    saved = state_file(cluster)
    state = ClusterState.from_json(saved, "test")
    move = new_move(state, "add", new, {**state.members, new: 1.0},
                    {"batch_keys": 1000, "batch_bytes": 1 << 20})
    move.update(rate="fast", batch_keys="x", batch_bytes=0)
    save_state(str(cluster.topo.state_dir), state.with_move(move))
    cluster.start_proxy()
    c2 = cluster.client(timeout=10, retries=2)
    notes = " ".join(c2.status()["notes"])
    assert "rate 'fast' is not valid" in notes and "batch_keys 'x' is not valid" in notes
    wait_until(lambda: c2.status()["move"] is None, 60, what="the repaired move finishing")
    assert new in c2.status()["members"]
    assert c2.mget([f"k{i}" for i in range(500)]) == [b"v"] * 500


def test_an_ipv6_node_flag_keeps_its_brackets_and_the_default_ring(
        procs: Procs, tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port, proxy_port = free_port(), free_port()
    procs.start("node", "--host", "::1", "--port", str(port), "--data-dir",
                str(tmp_path / "n"), ready="zkv node")
    procs.start("proxy", "--port", str(proxy_port), "--state-dir", str(tmp_path / "s"),
                "--node", f"[::1]:{port}", ready="zkv proxy")
    c = zkv.Client(f"127.0.0.1:{proxy_port}", timeout=5)
    try:
        status = c.status()
        assert list(status["members"]) == [f"[::1]:{port}"]
        assert status["vnodes"] == 2048  # the README's default, not 256
        assert c.set("k", "v") and c.get("k") == b"v"
        with pytest.raises(zkv.ClusterError, match="last node"):
            c.remove_node(f"[::1]:{port}")  # found as a member, not "not a member"
    finally:
        c.close()


def test_a_pipeline_through_the_proxy_stays_in_its_budget(make_cluster: Any) -> None:
    """The proxy gives each node its share of the reply budget, so the merged reply
    fits; values past it are TOO_LARGE in place, writes keep their own result."""
    cluster: Cluster = make_cluster(limits={"max_key_bytes": 1024,
                                            "max_value_bytes": 256 * 1024,
                                            "max_message_bytes": 1 << 20})
    c = cluster.client(timeout=10)
    big = b"b" * (200 * 1024)
    keys = [f"big{i}" for i in range(12)]
    for k in keys:
        c.set(k, big)
    with c.pipeline() as p:
        for k in keys:
            p.get(k)
        p.set("written", "yes")
        results = p.execute(raise_on_error=False)
    values = [r for r in results[:12] if r == big]
    refused = [r for r in results[:12] if isinstance(r, zkv.LimitExceeded)]
    assert values and refused and len(values) + len(refused) == 12
    assert results[12] is True and c.get("written") == b"yes"
    with pytest.raises(zkv.LimitExceeded):
        c.mget(keys)


def test_keys_walks_the_nodes_in_pages_and_stops_at_the_message_limit(
        make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(limits={"max_key_bytes": 1024, "max_value_bytes": 4096,
                                            "max_batch": 1000, "max_message_bytes": 1 << 20})
    c = cluster.client(timeout=20)
    name = b"a-key-name-thirty-bytes-%06d"
    for start in range(0, 40_000, 1000):
        c.mset({name % i: b"v" for i in range(start, start + 1000)})
    found = c.keys("a-key-name-thirty-bytes-00*")  # 10,000: more than a page of each node
    assert sorted(found) == [name % i for i in range(10_000)]
    with pytest.raises(zkv.LimitExceeded, match="use SCAN"):
        c.keys()  # 40,000 keys of 30 bytes: over the 1 MiB message limit
    assert len(list(c.scan_iter())) == 40_000
    assert c.ping()


def test_a_bug_in_a_reply_continuation_is_an_error_reply_not_a_dead_proxy(
        tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: NODES's continuation raises (a simulated bug). The client gets an
    INTERNAL error naming it, and the proxy goes on serving."""
    from zkv.proxy import Proxy

    node_port = free_port()
    procs.node(node_port, str(tmp_path / "n"))
    proxy = Proxy(port=free_port(), state_dir=str(tmp_path / "s"),
                  members={f"127.0.0.1:{node_port}": 1.0}, timeout_ms=2000)

    def broken(infos: dict[str, Any]) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(proxy, "nodes", broken)
    seen: dict[str, Any] = {}

    def drive() -> None:
        try:
            c = zkv.Client(proxy.address, timeout=5)
            wait_until(c.ping, 10)
            try:
                c.nodes()
            except zkv.ZkvError as exc:
                seen["error"] = exc
            seen["after"] = (c.set("k", "v"), c.get("k"))
            c.close()
        finally:
            proxy.stop()

    thread = threading.Thread(target=drive)
    thread.start()
    proxy.run()  # in the main thread (it installs signal handlers); drive() stops it
    thread.join(10)
    assert isinstance(seen.get("error"), zkv.InternalError), seen
    assert "KeyError" in str(seen["error"])
    assert seen["after"] == (True, b"v")


def test_option_values_must_be_plain(raw: Any, cluster: Cluster) -> None:
    c = raw(cluster.address)
    c.send(cbor2.dumps(["ADD", "127.0.0.1:1", {"weight": [1, 2]}]))
    reply = cbor2.loads(c.recv()[-1])
    assert reply[0] == P.ERR and reply[1] == "BAD_REQUEST"


# -- heartbeats, as data (zkv.core.cluster.Health) ------------------------------------
class _Beats:
    """Housekeeping ticks of a router: replies to the pings of one tick come in
    before the next (as replies are read before housekeeping runs)."""

    def __init__(self, health: Any) -> None:
        self.health, self.owed = health, []

    def tick(self, now: float, answering: set[str]) -> list[str]:
        for addr in self.owed:
            if addr in answering:
                self.health.seen(addr, now)
        self.owed = self.health.due_pings(now)
        return self.health.expire(now)


def test_a_node_that_stops_answering_is_down_after_its_misses() -> None:
    from zkv.core.cluster import Health

    health = Health(0.5, 3)
    health.track("a", 0.0)
    health.track("b", 0.0)
    beats = _Beats(health)
    went: dict[str, float] = {}
    t = 0.0
    while t < 5.0:
        for addr in beats.tick(t, {"a", "b"} if t <= 1.02 else {"a"}):
            went[addr] = t
        t = round(t + 0.01, 2)
    assert set(went) == {"b"}  # (a answers throughout)
    # b's last answer came at 1.0 s: it is down 3 intervals later, not before
    assert 2.5 < went["b"] <= 2.6
    assert health.is_up("a") and not health.is_up("b")
    health.seen("b", 6.0)
    assert health.is_up("b")


def test_a_router_that_stalled_does_not_call_its_nodes_down() -> None:
    """The router itself stopped for 4 s (no pings went out): its nodes owed it
    nothing. Once it runs again they must miss its new heartbeats to be down."""
    from zkv.core.cluster import Health

    health = Health(0.5, 3)
    health.track("a", 0.0)
    beats = _Beats(health)
    beats.tick(0.0, {"a"})
    beats.tick(0.01, {"a"})
    assert beats.tick(4.0, {"a"}) == [] and health.is_up("a")
    # a node silent from now on is still called down: its last answer came before the
    # stall, and the heartbeats of 4.0, 4.5 and 5.0 go unanswered
    t, down_at = 4.01, None
    while down_at is None and t < 10:
        if beats.tick(t, set()):
            down_at = t
        t = round(t + 0.01, 2)
    assert down_at is not None and 5.0 < down_at <= 5.1


def test_replies_waiting_unread_count_as_answers() -> None:
    """The router was busy: the node's replies wait in the router's own socket."""
    from zkv.core.cluster import Health

    health = Health(0.2, 3)
    health.track("a", 0.0)
    for t in (0.2, 0.4, 0.6, 0.8, 1.0):
        health.due_pings(t)
    assert health.expire(1.0, unread=lambda addr: True) == []
    assert health.is_up("a")
    assert health.expire(1.0, unread=lambda addr: False) == ["a"]
    assert not health.is_up("a")


@pytest.mark.timeout(60)
def test_a_proxy_that_cannot_listen_leaves_no_cluster_behind(procs: Procs,
                                                             tmp_path: Path) -> None:
    """A first start that fails (its RESP port in use) must not have saved a cluster:
    started again with corrected flags, the proxy takes the nodes given now."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        taken = busy.getsockname()[1]
        state = tmp_path / "state"
        wrong, right = free_port(), free_port()
        out = subprocess.run(
            [sys.executable, "-m", "zkv", "proxy", "--port", str(free_port()), "--state-dir",
             str(state), "--node", f"127.0.0.1:{wrong}", "--resp-port", str(taken)],
            capture_output=True, text=True, timeout=30, cwd=REPO)
    finally:
        busy.close()
    assert out.returncode == 1 and f"cannot listen for RESP on 127.0.0.1:{taken}" in out.stderr
    assert not (state / STATE_FILE).exists()
    proc = procs.start("proxy", "--port", str(free_port()), "--state-dir", str(state),
                       "--node", f"127.0.0.1:{right}", ready="zkv proxy")
    proc.wait_for(f"members=127.0.0.1:{right} ", 10)
    assert json.loads((state / STATE_FILE).read_text())["members"] == {f"127.0.0.1:{right}": 1.0}
