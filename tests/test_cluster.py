"""The cluster end to end: real ``zkv node`` and ``zkv proxy`` processes started from
a YAML topology on free loopback ports, used through ``zkv.Client``, killed with
SIGKILL, stopped, restarted, fed garbage, and checked for what still answers."""

from __future__ import annotations

import collections
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from conftest import REPO, Cluster, free_port, module_cluster, speak_curve_if_on, wait_until

import zkv
from zkv.core import protocol as P

LIMITS = {
    "max_key_bytes": 1024,
    "max_value_bytes": 2 * 1024 * 1024,
    "max_batch": 1000,
    "max_frames": 8,
    "max_message_bytes": 4 * 1024 * 1024,
}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def shared(request: Any, tmp_path_factory: Any) -> Iterator[Cluster]:
    """One cluster for the tests that only read and write (each uses its own keys)."""
    yield from module_cluster(request, tmp_path_factory, limits=LIMITS)


@pytest.fixture
def client(shared: Cluster) -> zkv.Client:
    return shared.client(timeout=5.0, retries=0)  # type: ignore[no-any-return]


def owners(c: zkv.Client, keys: list[str]) -> dict[str, str]:
    return {k: c.ring(k)["owner"] for k in keys}


def keys_on(c: zkv.Client, addr: str, prefix: str, n: int = 3) -> list[str]:
    """``n`` keys (``prefix`` + a number) that the ring puts on ``addr``."""
    found = []
    for i in range(10_000):
        key = f"{prefix}{i}"
        if c.ring(key)["owner"] == addr:
            found.append(key)
            if len(found) == n:
                return found
    raise AssertionError(f"no keys for {addr}")


# -- data commands through zkv.Client ------------------------------------------------


@pytest.mark.timeout(60)
def test_set_get_del_exists(client: zkv.Client) -> None:
    assert client.ping()
    assert client.get("basic:missing") is None
    assert not client.exists("basic:k")
    assert client.set("basic:k", "v1") is True
    assert client.get("basic:k") == b"v1"
    assert client.get(b"basic:k") == b"v1"
    assert client.exists("basic:k")
    assert client.set("basic:k", b"v2")
    assert client.get("basic:k") == b"v2"
    assert client.delete("basic:k") is True
    assert client.delete("basic:k") is False
    assert client.get("basic:k") is None
    assert not client.exists("basic:k")


@pytest.mark.timeout(60)
def test_mset_mget_in_the_order_asked_across_nodes(shared: Cluster, client: zkv.Client) -> None:
    data = {f"multi:{i}": f"value {i}" for i in range(300)}
    assert client.mset(data)
    where = collections.Counter(owners(client, list(data)[:60]).values())
    assert set(where) == set(shared.node_addrs), "the keys did not spread over all nodes"
    asked = [f"multi:{i}" for i in (299, 0, 150, 7, 7)] + ["multi:none"]
    assert client.mget(asked) == [b"value 299", b"value 0", b"value 150", b"value 7",
                                  b"value 7", None]
    everything = client.mget(list(data))
    assert everything == [v.encode() for v in data.values()]


@pytest.mark.timeout(60)
def test_keys_spread_over_all_nodes(shared: Cluster, client: zkv.Client) -> None:
    before = {n["address"]: n["keys"] for n in client.nodes()}
    client.mset({f"spread:{i}": b"x" for i in range(600)})
    nodes = client.nodes()
    assert sorted(n["address"] for n in nodes) == sorted(shared.node_addrs)
    for n in nodes:
        assert n["state"] == "up"
        added = n["keys"] - before[n["address"]]
        # 600 keys over 3 nodes of equal weight: about 200 each.
        assert 120 <= added <= 280, (n, added)
        assert 0.28 < n["share"] < 0.39
    assert abs(sum(n["share"] for n in nodes) - 1.0) < 1e-3


@pytest.mark.timeout(60)
def test_scan_iter_finds_every_key_exactly_once(client: zkv.Client) -> None:
    keys = {f"scan:{i}" for i in range(700)}
    client.mset({k: b"1" for k in keys})
    client.mset({f"other:{i}": b"1" for i in range(50)})
    seen = collections.Counter(k.decode() for k in client.scan_iter(match="scan:*", count=37))
    assert set(seen) == keys
    assert max(seen.values()) == 1
    # a whole iteration by hand, page by page: the cursor ends at "0"
    cursor, pages, found = "0", 0, []
    while True:
        cursor, page = client.scan(cursor, "scan:*", 100)
        found += page
        pages += 1
        if cursor == "0":
            break
    assert sorted(found) == sorted(k.encode() for k in keys)
    assert pages >= 3
    everything = list(client.scan_iter())
    assert len(everything) == len(set(everything))
    assert keys <= {k.decode() for k in everything}


@pytest.mark.timeout(60)
def test_keys_with_a_pattern(client: zkv.Client) -> None:
    client.mset({f"pat:{i}": b"1" for i in range(40)})
    client.set("pat-no", b"1")
    assert sorted(client.keys("pat:*")) == sorted(f"pat:{i}".encode() for i in range(40))
    assert sorted(client.keys("pat:1?")) == sorted(f"pat:1{i}".encode() for i in range(10))
    assert client.keys("nothing-here:*") == []


@pytest.mark.timeout(60)
def test_keys_and_values_are_binary_safe(client: zkv.Client) -> None:
    cases: dict[bytes, bytes] = {
        b"bin:with spaces": b"a value with spaces",
        b"bin:new\nline": b"line one\nline two\r\n",
        b"bin:nul\x00byte": b"\x00\x01\x02\x00",
        "bin:ключ-🔑".encode(): "значение ✓ 値".encode(),
        b"bin:\xff\xfe not utf-8": bytes(range(256)),
        b"bin:empty": b"",
    }
    for k, v in cases.items():
        assert client.set(k, v)
    for k, v in cases.items():
        assert client.get(k) == v, k
    assert client.get("bin:ключ-🔑") == "значение ✓ 値".encode()
    assert client.mget(list(cases)) == list(cases.values())
    assert set(cases) <= set(client.keys("bin:*"))
    assert client.exists(b"bin:empty")


@pytest.mark.timeout(60)
def test_a_1_mib_value(client: zkv.Client) -> None:
    value = bytes(range(256)) * (MiB // 256)
    assert len(value) == MiB
    assert client.set("big:1mib", value)
    assert client.get("big:1mib") == value
    assert client.mget(["big:1mib", "big:none"]) == [value, None]


@pytest.mark.timeout(60)
def test_hash_tags_keep_related_keys_on_one_node(client: zkv.Client) -> None:
    a, b = client.ring("{user1}.a"), client.ring("{user1}.b")
    assert a["owner"] == b["owner"]
    assert a["hash_tag"] == b["hash_tag"] == b"user1"
    assert a["key_hash"] == b["key_hash"]
    # without a tag, the same names scatter
    untagged = {client.ring(f"user1.{i}")["owner"] for i in range(30)}
    assert len(untagged) == 3
    tagged = {client.ring(f"{{user1}}.{i}")["owner"] for i in range(30)}
    assert tagged == {a["owner"]}
    client.mset({"{user1}.a": "A", "{user1}.b": "B"})
    assert client.mget(["{user1}.a", "{user1}.b"]) == [b"A", b"B"]


@pytest.mark.timeout(60)
def test_req_and_pipelining_dealer_clients(shared: Cluster, zctx: zmq.Context[Any]) -> None:
    req = zctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    speak_curve_if_on(req)
    req.connect(f"tcp://{shared.address}")
    req.send(P.encode_request("SET", b"req:k", b"from REQ"))
    assert P.decode_reply(req.recv()) == "OK"
    req.send(P.encode_request("GET", b"req:k"))
    assert P.decode_reply(req.recv()) == b"from REQ"
    req.close(0)

    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    speak_curve_if_on(dealer)
    dealer.connect(f"tcp://{shared.address}")
    n = 200
    for i in range(n):
        dealer.send_multipart([b"", b"t%d" % i, P.encode_request("SET", b"pipe:%d" % i, b"%d" % i)])
    for i in range(n):
        dealer.send_multipart([b"", b"g%d" % i, P.encode_request("GET", b"pipe:%d" % i)])
    replies = {}
    for _ in range(2 * n):
        empty, tag, body = dealer.recv_multipart()
        assert empty == b""
        replies[tag] = P.decode_reply(body)
    assert all(replies[b"t%d" % i] == "OK" for i in range(n))
    # GETs may overtake SETs of other keys, never their own on one node
    assert all(replies[b"g%d" % i] == b"%d" % i for i in range(n))
    dealer.close(0)


@pytest.mark.timeout(60)
def test_info_status_and_ring(shared: Cluster, client: zkv.Client) -> None:
    info = client.info()
    assert info["proxy"]["role"] == "proxy"
    assert set(info["nodes"]) == set(shared.node_addrs)
    assert info["totals"]["keys"] == sum(n["keys"] for n in info["nodes"].values())
    status = client.status()
    assert status["epoch"] == 1
    assert set(status["members"]) == set(shared.node_addrs)
    assert status["notes"] == []
    ring = client.ring("some key")
    assert ring["owner"] in shared.node_addrs and ring["state"] == "up"
    assert ring["hash_tag"] is None


# -- bad requests straight to the proxy ----------------------------------------------

BAD_REQUESTS = [
    ("garbage frame", [b"\xff\xfe\x00 not cbor"], "BAD_REQUEST"),
    ("empty body", [b""], "BAD_REQUEST"),
    ("truncated CBOR", [b"\x9f"], "BAD_REQUEST"),
    ("CBOR map", [cbor2.dumps({"op": "GET"})], "BAD_REQUEST"),
    ("CBOR int", [cbor2.dumps(42)], "BAD_REQUEST"),
    ("empty array", [cbor2.dumps([])], "BAD_REQUEST"),
    ("op not text", [cbor2.dumps([7, b"k"])], "BAD_REQUEST"),
    ("key an int", [cbor2.dumps(["GET", 5])], "BAD_REQUEST"),
    ("value a map", [cbor2.dumps(["SET", b"k", {"a": 1}])], "BAD_REQUEST"),
    ("MGET not a list", [cbor2.dumps(["MGET", b"k"])], "BAD_REQUEST"),
    ("MGET empty", [cbor2.dumps(["MGET", []])], "BAD_REQUEST"),
    ("MSET odd", [cbor2.dumps(["MSET", [b"a", b"1", b"b"]])], "BAD_REQUEST"),
    ("SCAN count 0", [cbor2.dumps(["SCAN", "0", None, 0])], "BAD_REQUEST"),
    ("too few args", [cbor2.dumps(["GET"])], "BAD_REQUEST"),
    ("too many args", [cbor2.dumps(["GET", b"a", b"b"])], "BAD_REQUEST"),
    ("unknown op", [cbor2.dumps(["NOPE", b"k"])], "UNKNOWN_COMMAND"),
    ("internal op", [cbor2.dumps(["XGET", b"k"])], "BAD_COMMAND"),
    ("bad scan cursor", [cbor2.dumps(["SCAN", "not-a-cursor"])], "BAD_COMMAND"),
    ("too many frames", [b"f"] * 8 + [cbor2.dumps(["PING"])], "BAD_REQUEST"),
    ("key too long", [cbor2.dumps(["GET", b"k" * 1025])], "TOO_LARGE"),
    ("value too long", [cbor2.dumps(["SET", b"k", b"v" * (2 * MiB + 1)])], "TOO_LARGE"),
    ("MSET value too long", [cbor2.dumps(["MSET", [b"k", b"v" * (2 * MiB + 1)]])], "TOO_LARGE"),
    ("batch too big", [cbor2.dumps(["MGET", [b"k"] * 1001])], "TOO_LARGE"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames,code", [pytest.param(f, c, id=n) for n, f, c in BAD_REQUESTS])
def test_bad_requests_get_an_error_reply_and_the_proxy_keeps_serving(
    shared: Cluster, raw: Any, client: zkv.Client, frames: list[bytes], code: str
) -> None:
    r = raw(shared.address)
    r.send(*frames)
    reply = r.recv()
    item = cbor2.loads(reply[-1])
    assert item[0] == P.ERR and item[1] == code, item
    assert isinstance(item[2], str) and item[2]
    assert r.call("PING") == "PONG"  # the same connection still works
    assert client.ping()  # and so does everyone else
    assert shared.proxy is not None and shared.proxy.popen.poll() is None


@pytest.mark.timeout(60)
def test_limits_at_the_limit_are_accepted(client: zkv.Client) -> None:
    key = "k" * 1024
    value = b"v" * (2 * MiB)
    assert client.set(key, value)
    assert client.get(key) == value
    with pytest.raises(zkv.LimitExceeded):
        client.set(key + "k", b"v")
    with pytest.raises(zkv.LimitExceeded):
        client.set("lim:k", value + b"v")


@pytest.mark.timeout(60)
def test_trailing_bytes_after_the_request_are_refused(shared: Cluster, raw: Any) -> None:
    """A body is one CBOR item: bytes after it make it invalid (cbor2.loads alone
    would ignore them)."""
    r = raw(shared.address)
    r.send(cbor2.dumps(["PING"]) + b"\x00garbage")
    item = cbor2.loads(r.recv()[-1])
    assert item[0] == P.ERR and item[1] == "BAD_REQUEST", item
    assert r.call("PING") == "PONG"


@pytest.mark.timeout(60)
def test_a_message_over_the_size_cap_does_not_stop_the_proxy(
    shared: Cluster, raw: Any, client: zkv.Client
) -> None:
    """ZeroMQ drops a message over max_message_bytes (and the connection): no reply can
    be sent, but nobody else notices."""
    r = raw(shared.address, timeout_ms=1000)
    r.send(cbor2.dumps(["SET", b"k", b"x" * (5 * MiB)]))
    with pytest.raises(AssertionError, match="no reply"):
        r.recv()
    assert client.ping()
    assert client.set("cap:after", b"ok") and client.get("cap:after") == b"ok"
    assert raw(shared.address).call("PING") == "PONG"


# -- failures: nodes and proxy killed and restarted ------------------------------------


@pytest.mark.timeout(90)
def test_a_killed_node_fails_fast_naming_it_and_comes_back_when_restarted(
    cluster: Cluster,
) -> None:
    c = cluster.client(timeout=3.0, retries=0)
    data = {f"k{i}": f"value {i}" for i in range(300)}
    c.mset(data)
    owner = owners(c, list(data))
    victim = cluster.node_addrs[1]
    lost = [k for k in data if owner[k] == victim]
    kept = [k for k in data if owner[k] != victim]
    assert lost and kept

    cluster.kill_node(victim)
    for key in lost[:5]:
        started = time.monotonic()
        with pytest.raises(zkv.Unavailable) as err:
            c.get(key)
        elapsed = time.monotonic() - started
        assert isinstance(err.value, (zkv.NodeUnavailable, zkv.Timeout))
        assert victim in str(err.value)
        assert elapsed < 1.0 + 1.0, elapsed  # the proxy's deadline and a margin
    with pytest.raises(zkv.Unavailable, match=victim):
        c.set(lost[0], "new")
    # the other nodes' keys still work, alone and in batches
    assert c.mget(kept) == [data[k].encode() for k in kept]
    assert c.set(kept[0], "changed") and c.get(kept[0]) == b"changed"
    data[kept[0]] = "changed"
    with pytest.raises(zkv.Unavailable, match=victim):
        c.mget(kept[:3] + lost[:1])
    cluster.wait_state(victim, "down", timeout=5.0)
    nodes = {n["address"]: n for n in c.nodes()}
    assert nodes[victim]["state"] == "down" and nodes[victim]["keys"] is None
    assert all(n["state"] == "up" for a, n in nodes.items() if a != victim)

    cluster.start_node(victim)
    cluster.wait_state(victim, "up", timeout=10.0)
    assert c.mget(list(data)) == [v.encode() for v in data.values()]
    assert sorted(k.decode() for k in c.scan_iter()) == sorted(data)
    assert sum(n["keys"] for n in c.nodes()) == len(data)


@pytest.mark.timeout(60)
def test_a_stopped_node_times_out_within_the_deadline_naming_it(cluster: Cluster) -> None:
    """A node that keeps its connection but does not answer (SIGSTOP)."""
    c = cluster.client(timeout=5.0, retries=0)
    victim = cluster.node_addrs[0]
    key = keys_on(c, victim, "stopped:", 1)[0]
    c.set(key, "v")
    cluster.nodes[victim].signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(zkv.Unavailable, match=victim) as err:
            c.get(key)
        assert isinstance(err.value, (zkv.NodeUnavailable, zkv.Timeout))
        assert time.monotonic() - started < 1.0 + 1.0
        other = keys_on(c, cluster.node_addrs[2], "stopped:", 1)[0]
        assert c.set(other, "w") and c.get(other) == b"w"
        cluster.wait_state(victim, "down", timeout=5.0)
    finally:
        cluster.nodes[victim].signal(signal.SIGCONT)
    cluster.wait_state(victim, "up", timeout=10.0)
    assert c.get(key) == b"v"


@pytest.mark.timeout(60)
def test_a_proxy_that_stalls_does_not_call_its_nodes_down(cluster: Cluster) -> None:
    """The proxy itself stops for longer than its heartbeat window and its request
    deadline (a VM pause, a long turn of its own), under writers on every node: its
    nodes kept answering, so when it runs again it must neither call them down nor
    time out the requests whose answers wait in its buffers."""
    c = cluster.client(timeout=8.0, retries=0)
    keys = {addr: keys_on(c, addr, "stall:", 2) for addr in cluster.node_addrs}
    assert cluster.proxy is not None
    writers_clients = {k: cluster.client(timeout=8.0, retries=0)
                       for ks in keys.values() for k in ks}
    errors: list[BaseException] = []
    acked: dict[str, int] = {}
    stop = threading.Event()

    def write(key: str) -> None:
        client, n = writers_clients[key], 0
        try:
            while not stop.is_set():
                assert client.set(key, b"%d" % (n + 1))
                n += 1
                acked[key] = n
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(k,)) for k in writers_clients]
    for t in writers:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            cluster.proxy.signal(signal.SIGSTOP)
            time.sleep(1.5)  # (the window is 3 x 200 ms, the deadline 1 s)
            cluster.proxy.signal(signal.SIGCONT)
        time.sleep(0.3)
    finally:
        cluster.proxy.signal(signal.SIGCONT)
        stop.set()
        for t in writers:
            t.join(15)
    assert not errors, errors
    assert c.mget(list(acked)) == [b"%d" % acked[k] for k in acked]
    assert "is down" not in cluster.proxy.output
    assert set(cluster.node_states().values()) == {"up"}


@pytest.mark.timeout(60)
def test_a_restarted_proxy_has_the_same_ring_and_answers(cluster: Cluster) -> None:
    c = cluster.client(timeout=3.0)
    data = {f"p{i}": f"v{i}" for i in range(200)}
    c.mset(data)
    sample = list(data)[::7] + ["{tag}.x", "never-set"]
    before = {k: c.ring(k) for k in sample}
    status = c.status()

    cluster.restart_proxy()
    c2 = cluster.client(timeout=3.0, retries=2)
    wait_until(c2.ping, 10, what="the restarted proxy answering")
    cluster.wait_routable()
    after = {k: c2.ring(k) for k in sample}
    assert {k: r["owner"] for k, r in after.items()} == {k: r["owner"] for k, r in before.items()}
    assert after == before
    assert c2.status() == status
    assert c2.mget(list(data)) == [v.encode() for v in data.values()]
    # an old client's socket reconnects by itself
    assert c.get("p1") == b"v1"


@pytest.mark.timeout(60)
def test_a_proxy_restarted_with_other_nodes_keeps_its_saved_membership(
    cluster: Cluster,
) -> None:
    c = cluster.client(timeout=3.0)
    c.mset({f"m{i}": b"x" for i in range(60)})
    members = c.status()["members"]
    sample = {k: c.ring(k)["owner"] for k in (f"m{i}" for i in range(20))}
    stranger = f"127.0.0.1:{cluster.topo.node_ports[0] + 17}"
    proc = cluster.restart_proxy(
        "--port", str(cluster.topo.proxy_port), "--state-dir", str(cluster.topo.state_dir),
        "--node", stranger, "--node", cluster.node_addrs[0],
    )
    c2 = cluster.client(timeout=3.0, retries=2)
    wait_until(c2.ping, 10, what="the restarted proxy answering")
    cluster.wait_routable()
    status = c2.status()
    assert status["members"] == members
    assert status["epoch"] == 1
    assert status["notes"], status
    note = " ".join(status["notes"])
    assert str(cluster.topo.state_dir) in note and "ignored" in note
    assert "differs" in proc.output or "ignored" in proc.output
    assert {k: c2.ring(k)["owner"] for k in sample} == sample
    assert c2.mget(list(sample)) == [b"x"] * len(sample)
    assert stranger not in {n["address"] for n in c2.nodes()}


# -- bad topologies ------------------------------------------------------------------

NODE = "  - address: 127.0.0.1:{port}\n"
BAD_TOPOLOGIES = [
    ("unknown top key", "nodez:\n" + NODE, "nodez"),
    ("unknown proxy key", "proxy:\n  prot: 1\nnodes:\n" + NODE, "proxy"),
    ("wrong type", "proxy:\n  timeout_ms: fast\nnodes:\n" + NODE, "proxy.timeout_ms"),
    ("bad fsync", "nodes:\n" + NODE + "    fsync: sometimes\n", "nodes[0].fsync"),
    ("duplicate address", "nodes:\n" + NODE + NODE, "nodes[1]"),
    ("port out of range", "nodes:\n  - host: 127.0.0.1\n    port: 70000\n", "nodes[0].port"),
    ("bad limit", "limits:\n  max_key_bytes: -1\nnodes:\n" + NODE, "limits.max_key_bytes"),
    ("no nodes", "proxy:\n  port: 8000\n", "nodes"),
    ("not YAML", "nodes: [\n", "line"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["proxy", "node"])
@pytest.mark.parametrize("text,field", [pytest.param(t, f, id=n) for n, t, f in BAD_TOPOLOGIES])
def test_a_bad_topology_is_one_clear_line(
    tmp_path: Path, role: str, text: str, field: str
) -> None:
    port = 47_123
    path = tmp_path / "bad.yaml"
    path.write_text(text.format(port=port))
    args = ["--config", str(path)] + (["--port", str(port)] if role == "node" else [])
    done = subprocess.run(
        [sys.executable, "-m", "zkv", role, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )
    out = (done.stdout + done.stderr).strip()
    assert done.returncode != 0, out
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    assert str(path) in out and field in out, out
    assert out.startswith(f"zkv {role}: error: ")


@pytest.mark.timeout(60)
def test_a_node_not_in_the_topology_or_a_busy_port_is_one_clear_line(tmp_path: Path) -> None:
    from conftest import Topo

    topo = Topo(tmp_path, 1)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zkv", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=30, check=False)

    missing = run("node", "--config", str(topo.path), "--port", str(topo.node_ports[0] + 1))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert str(topo.path) in missing.stderr and "no node" in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", topo.proxy_port))
        busy.listen()
        done = run("proxy", "--config", str(topo.path))
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1 and topo.proxy_addr in out, out


# -- regressions: bugs these tests found (fixed in c1ea3fe) ------------------------------


@pytest.mark.timeout(60)
def test_an_mget_reply_over_the_message_cap_is_an_error_not_a_dead_node(
    make_cluster: Any,
) -> None:
    """A reply over max_message_bytes is a TOO_LARGE error, not a message the proxy's
    DEALER drops with its connection (which marked a healthy node down)."""
    cl = make_cluster(limits=LIMITS)
    c = cl.client(timeout=5.0)
    big = b"x" * (2 * MiB)  # three of them (same node: one hash tag) pass the 4 MiB cap
    keys = [f"{{big}}{i}" for i in range(3)]
    for k in keys:
        c.set(k, big)
    c.set("{big}small", b"s")
    with pytest.raises(zkv.LimitExceeded):
        c.mget(keys)
    # the node the keys live on must still be up and serving
    assert c.get("{big}small") == b"s"
    assert {n["state"] for n in c.nodes()} == {"up"}


@pytest.mark.timeout(60)
def test_an_ipv6_loopback_topology_serves(make_cluster: Any) -> None:
    """Nodes and proxy on [::1], as the config model allows: bound and connected with
    brackets and zmq.IPV6."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    cl = make_cluster(host="::1")
    c = cl.client(timeout=3.0)
    assert c.set("k", "v") and c.get("k") == b"v"
    assert {n["state"] for n in c.nodes()} == {"up"}


class SlowLink:
    """A TCP forwarder that waits ``delay`` seconds before it connects each accepted
    connection through to ``target``: a slow network, or a loaded machine."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port, self.delay = target_port, delay
        self.closed = False
        self.socks: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._link, args=(conn,), daemon=True).start()

    def _link(self, conn: socket.socket) -> None:
        time.sleep(self.delay)
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            conn.close()
            return
        self.socks += [conn, up]
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        for s in self.socks:
            s.close()


@pytest.mark.timeout(60)
def test_a_fresh_proxy_serves_a_node_it_is_still_connecting_to(
    procs: Any, tmp_path: Path
) -> None:
    """A request that reaches a freshly started proxy before its link to the node is
    up waits for the link (within the deadline) instead of failing with NODE_DOWN."""
    port = free_port()
    procs.node(port, str(tmp_path / "node"))
    link = SlowLink(port, delay=0.4)  # the proxy's connection is made 0.4 s late
    try:
        proxy_port = free_port()
        procs.start("proxy", "--port", str(proxy_port), "--state-dir", str(tmp_path / "state"),
                    "--node", f"127.0.0.1:{link.port}", "--timeout-ms", "2000",
                    ready="zkv proxy ")
        c = zkv.Client(f"127.0.0.1:{proxy_port}", timeout=4.0, retries=0)
        try:
            assert c.set("k", "v")  # well within the 2 s deadline of the proxy
            assert c.get("k") == b"v"
        finally:
            c.close()
    finally:
        link.close()


@pytest.mark.timeout(60)
def test_flushall_from_zkv_cli_empties_every_node_or_nothing(cluster: Cluster) -> None:
    """FLUSHALL on the ZeroMQ front (zkv cli, Client.flushall): every node's keys go;
    with a node down it is refused before any node flushes."""
    c = cluster.client(retries=0)
    c.mset({f"f{i}": "v" for i in range(300)})
    assert all(n["keys"] > 0 for n in c.nodes())

    def cli(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", cluster.address,
                               *words], cwd=REPO, capture_output=True, text=True, timeout=30)

    done = cli("FLUSHALL")
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr
    assert c.dbsize() == 0 and c.get("f1") is None
    assert cli("FLUSHALL", "NOW").returncode != 0  # (no arguments)
    c.mset({f"g{i}": "v" for i in range(300)})
    victim = cluster.node_addrs[1]
    cluster.kill_node(victim)
    cluster.wait_state(victim, "down", timeout=10.0)
    with pytest.raises(zkv.NodeUnavailable, match=f"node {victim} is down.*nothing was flushed"):
        c.flushall()
    done = cli("FLUSHALL")
    assert done.returncode == 1 and "nothing was flushed" in done.stderr
    assert "Traceback" not in done.stderr
    for addr in cluster.node_addrs:
        if addr != victim:
            with zkv.Client(addr, timeout=2.0) as node:
                assert int(node.call("DBSIZE")) > 0  # every other node kept its keys


@pytest.mark.timeout(60)
def test_a_delete_of_many_keys_with_a_node_down_says_what_went(cluster: Cluster) -> None:
    """DEL of keys on every node, one node down: the error says how many keys were not
    deleted and how many of the others were (they went: a client told only of the
    failure would take them for still there), from zkv.Client and from RESP alike."""
    c = cluster.client(retries=0)
    victim = cluster.node_addrs[0]
    gone = keys_on(c, victim, "dv:", 2)
    others = [k for addr in cluster.node_addrs[1:] for k in keys_on(c, addr, "do:", 2)]
    c.mset({k: "v" for k in gone + others})
    cluster.kill_node(victim)
    cluster.wait_state(victim, "down", timeout=10.0)
    with pytest.raises(zkv.NodeUnavailable, match=f"node {victim} is down; 2 of the 6 keys "
                                                  "were not deleted, and 4 of the others were"):
        c.delete(*gone, *others)
    assert c.exists(*others) == 0
