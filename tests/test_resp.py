"""The RESP front through real processes: redis-py, redis-cli (one-shot, --pipe and
interactive) and raw sockets against `zkv proxy --resp-port`, and the same keys read
back through zkv.Client, byte for byte, across an ADD and a REMOVE."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import hiredis
import pexpect
import pytest
from conftest import REPO, Cluster, Topo, free_port, in_threads, module_cluster, wait_until

import zkv

BUFFER = 4 << 20  # unread reply bytes per client
redis = pytest.importorskip("redis", reason="redis-py is in the test extra")
REDIS_CLI = shutil.which("redis-cli")
needs_cli = pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed "
                               "(apt-get install redis-tools; .ci/run does)")


@pytest.fixture(scope="module")
def shared(request: Any, tmp_path_factory: Any) -> Iterator[Cluster]:
    yield from module_cluster(request, tmp_path_factory, proxy={
        "resp_port": free_port(), "resp_admin": True, "client_buffer_bytes": BUFFER,
        "metrics_port": free_port()})


def resp_port(cluster: Cluster) -> int:
    return int(cluster.topo.proxy_cfg["resp_port"])


@pytest.fixture
def r(shared: Cluster) -> Iterator[Any]:
    client = redis.Redis(port=resp_port(shared), socket_timeout=10)
    yield client
    client.close()


class Raw:
    """A plain TCP connection, as telnet or a hand-written client would make."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = hiredis.Reader()  # (for replies(): what was read past them waits)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, end: bytes, limit: float = 10.0) -> bytes:
        data = b""
        deadline = time.monotonic() + limit
        while not data.endswith(end):
            assert time.monotonic() < deadline, f"no {end!r} in time; got {data[-200:]!r}"
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def closed(self, limit: float = 5.0) -> bool:
        """Whether the server closes the connection (after sending what it sends)."""
        self.sock.settimeout(limit)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False

    def replies(self, n: int, limit: float = 20.0) -> list[Any]:
        """The next ``n`` replies, parsed by hiredis (what is read past them is kept for
        the next call); fails if the connection closes first."""
        self.sock.settimeout(limit)
        got: list[Any] = []
        while len(got) < n:
            while len(got) < n and (reply := self.reader.gets()) is not False:
                got.append(reply)
            if len(got) < n:
                chunk = self.sock.recv(1 << 20)
                assert chunk, f"closed after {len(got)} of {n} replies"
                self.reader.feed(chunk)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(shared: Cluster) -> Iterator[Any]:
    made: list[Raw] = []

    def connect(port: int | None = None) -> Raw:
        conn = Raw(port or resp_port(shared))
        made.append(conn)
        return conn

    yield connect
    for conn in made:
        conn.close()


# -- redis-py -----------------------------------------------------------------------------
def test_strings_binary_and_big_values(r: Any) -> None:
    assert r.ping() is True
    weird = b"\x00\r\n\xff\xfe zkv \x80"
    assert r.set(b"bin\x00key\r\n", weird) is True
    assert r.get(b"bin\x00key\r\n") == weird
    assert r.get("resp:missing") is None
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB (under the client buffer)
    assert r.set("resp:big", big) and r.get("resp:big") == big
    assert r.mset({"resp:a": "1", "resp:b": b"\x00", "resp:c": ""}) is True
    assert r.mget(["resp:c", "resp:missing", "resp:a", "resp:b"]) == [b"", None, b"1", b"\x00"]
    assert r.exists("resp:a", "resp:a", "resp:missing") == 2
    assert r.delete("resp:a", "resp:b", "resp:a", "resp:missing") == 2
    assert r.get("resp:a") is None and r.type("resp:c") == b"string"
    assert r.type("resp:a") == b"none"


@pytest.mark.parametrize("protocol", [2, 3])
def test_both_protocol_versions(shared: Cluster, protocol: int) -> None:
    c = redis.Redis(port=resp_port(shared), protocol=protocol, socket_timeout=10)
    try:
        assert c.set("resp:proto", protocol) and c.get("resp:proto") == str(protocol).encode()
        assert c.get("resp:nothing") is None
        assert c.mget("resp:proto", "resp:nothing") == [str(protocol).encode(), None]
        assert c.info()["redis_version"]
        c.client_setname("zkv-test")
        assert c.client_getname() in ("zkv-test", b"zkv-test")
    finally:
        c.close()


def test_errors_keep_the_connection_usable(r: Any) -> None:
    with pytest.raises(redis.ResponseError, match="unknown command 'NOSUCH'"):
        r.execute_command("NOSUCH", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        r.execute_command("GET")
    with pytest.raises(redis.ResponseError, match="invalid expire time"):
        r.set("resp:opt", "v", ex=0)
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "resp:opt", "v", "NX", "XX")
    with pytest.raises(redis.ResponseError, match="out of range"):
        r.execute_command("SELECT", 3)
    with pytest.raises(redis.ResponseError, match="over the limit"):
        r.set("k" * 70_000, "v")
    # a value a byte over max_value_bytes: an error naming the limit, not a closed
    # connection (the client is still writing it when a protocol error would close)
    with pytest.raises(redis.ResponseError, match="max_value_bytes|over the limit"):
        r.set("resp:huge", b"v" * ((16 << 20) + 1))
    assert r.set("resp:after", "fine") and r.get("resp:after") == b"fine"


def test_pipelines_answer_in_order(r: Any) -> None:
    p = r.pipeline(transaction=False)
    for i in range(1000):
        p.set(f"resp:pipe:{i}", i)
    for i in range(1000):
        p.get(f"resp:pipe:{i}")
    p.execute_command("NOSUCH")
    p.get("resp:pipe:7")
    out = p.execute(raise_on_error=False)
    assert out[:1000] == [True] * 1000
    assert out[1000:2000] == [str(i).encode() for i in range(1000)]
    assert isinstance(out[2000], redis.ResponseError) and out[2001] == b"7"


def test_redis_py_default_pipeline_is_a_transaction_on_one_node(shared: Cluster,
                                                                 r: Any) -> None:
    """``r.pipeline()`` sends MULTI/EXEC: it works for keys that share a hash tag, each
    command answered as Redis would, and the writes read back through zkv.Client."""
    p = r.pipeline()
    p.set("{txn1}:a", "1").incr("{txn1}:a").get("{txn1}:a")
    p.mset({"{txn1}:b": "x", "{txn1}:c": "y"}).mget("{txn1}:a", "{txn1}:b", "{txn1}:none")
    p.set("{txn1}:text", "abc").incr("{txn1}:text").exists("{txn1}:b", "{txn1}:c")
    p.delete("{txn1}:c").ping()
    out = p.execute(raise_on_error=False)
    assert out[:5] == [True, 2, b"2", True, [b"2", b"x", None]]
    assert out[5] is True and isinstance(out[6], redis.ResponseError)  # undoes nothing
    assert out[7:] == [2, 1, True]
    c = shared.client(timeout=5.0)
    assert c.mget([b"{txn1}:a", b"{txn1}:b", b"{txn1}:c"]) == [b"2", b"x", None]
    c.close()


def test_a_transaction_across_nodes_is_refused_whole(r: Any) -> None:
    keys = [f"txn2:{i}" for i in range(30)]  # (30 keys without a tag: on every node)
    p = r.pipeline()
    for k in keys:
        p.set(k, "v")
    with pytest.raises(redis.ResponseError, match="live on [23] nodes.*hash tag"):
        p.execute()
    assert r.exists(*keys) == 0  # nothing ran
    assert r.set("txn2:after", "ok") and r.get("txn2:after") == b"ok"


def test_multi_exec_discard_on_one_connection(raw: Any, r: Any) -> None:
    conn = raw()
    conn.send(b"MULTI\r\nSET {txn3}:a 1\r\nNOSUCH\r\nEXEC\r\nGET {txn3}:a\r\n")
    assert conn.read_until(b"$-1\r\n") == (
        b"+OK\r\n+QUEUED\r\n-ERR unknown command 'NOSUCH', with args beginning with: \r\n"
        b"-EXECABORT Transaction discarded because of previous errors.\r\n$-1\r\n")
    conn.send(b"MULTI\r\nSET {txn3}:a 1\r\nDISCARD\r\nEXEC\r\nGET {txn3}:a\r\n")
    assert conn.read_until(b"$-1\r\n") == (
        b"+OK\r\n+QUEUED\r\n+OK\r\n-ERR EXEC without MULTI\r\n$-1\r\n")
    conn.send(b"MULTI\r\nSET {txn3}:a 1\r\nINCR {txn3}:a\r\nEXEC\r\n")
    assert conn.read_until(b":2\r\n") == b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:2\r\n"
    with r.pipeline() as p, pytest.raises(redis.ResponseError,
                                          match="WATCH is not supported"):
        p.watch("{txn3}:a")  # (r.transaction() starts so: it fails, never trusts)


def test_scan_iter_walks_every_node_once(r: Any) -> None:
    keys = {f"resp:scan:{i}".encode() for i in range(700)}
    r.mset({k: b"x" for k in keys})
    assert set(r.scan_iter(match="resp:scan:*", count=50)) == keys
    seen = list(r.scan_iter(match="resp:scan:*"))
    assert len(seen) == len(set(seen)) == 700
    assert set(r.keys("resp:scan:*")) == keys
    assert r.dbsize() >= 700


def test_a_connection_pool_under_threads(shared: Cluster) -> None:
    pool = redis.ConnectionPool(port=resp_port(shared), max_connections=16, socket_timeout=10)
    c = redis.Redis(connection_pool=pool)

    def work(n: int) -> None:
        for i in range(300):
            key = f"resp:thread:{n}:{i}"
            assert c.set(key, f"{n}/{i}")
            assert c.get(key) == f"{n}/{i}".encode()

    errors = in_threads(work, 8, 60)
    pool.disconnect()
    assert not errors, errors[0]


def test_resp_and_zkv_client_see_the_same_bytes(shared: Cluster, r: Any) -> None:
    c = shared.client()
    values = {f"resp:x:{i}".encode(): bytes([i % 256]) * (i % 50) + b"\x00\r\n"
              for i in range(300)}
    for k, v in list(values.items())[:150]:
        r.set(k, v)
    c.mset(dict(list(values.items())[150:]))
    assert c.mget(list(values)) == list(values.values())
    assert r.mget(list(values)) == list(values.values())


def test_info_and_clients_commands(r: Any) -> None:
    r.set(b"info:ttl", b"v", ex=100)
    info = r.info()
    assert info["redis_mode"] == "standalone" and "db0" in info
    assert r.info("keyspace")["db0"]["keys"] >= 1
    assert r.info("keyspace")["db0"]["expires"] >= 1  # (counted on the nodes)
    assert r.info("nosuch") == {}
    r.delete(b"info:ttl")
    assert isinstance(r.client_id(), int)
    assert r.echo("hi") == b"hi"
    seconds, _ = r.time()
    assert abs(seconds - time.time()) < 5


# -- raw connections ----------------------------------------------------------------------
def test_inline_commands_as_telnet_sends_them(raw: Any) -> None:
    conn = raw()
    conn.send(b'SET "resp:inline key" "hello world"\r\nGET "resp:inline key"\r\nPING\r\n')
    assert conn.read_until(b"+PONG\r\n") == b"+OK\r\n$11\r\nhello world\r\n+PONG\r\n"
    conn.send(b"QUIT\r\n")
    assert conn.read_until(b"+OK\r\n") == b"+OK\r\n"
    assert conn.closed()


def test_a_protocol_error_is_answered_then_the_connection_closes(raw: Any) -> None:
    conn = raw()
    conn.send(b"PING\r\n*1\r\n:5\r\n")
    data = conn.read_until(b"\r\n-ERR Protocol error: expected '$', got ':'\r\n")
    assert data.startswith(b"+PONG\r\n")
    assert conn.closed()
    other = raw()  # everyone else is served as before
    other.send(b"PING\r\n")
    assert other.read_until(b"\r\n") == b"+PONG\r\n"


def test_huge_headers_are_refused_without_buffering(raw: Any, shared: Cluster) -> None:
    conn = raw()
    conn.send(b"*4000000000\r\n")
    assert b"Protocol error: invalid multibulk length" in conn.read_until(b"\r\n")
    assert conn.closed()
    conn = raw()
    conn.send(b"*2\r\n$3\r\nGET\r\n$999999999999\r\n")
    assert b"Protocol error: invalid bulk length" in conn.read_until(b"\r\n")
    assert conn.closed()


def test_a_client_that_never_reads_cannot_pile_up_replies(raw: Any, shared: Cluster,
                                                         r: Any) -> None:
    """200 GETs of a 256 KiB value (50 MiB), never read: large replies past the client
    buffer (4 MiB here) are replaced by a short error, and the proxy keeps serving
    others."""
    value = b"m" * (256 << 10)
    r.set("resp:mib", value)
    conn = raw()
    conn.send(b"*2\r\n$3\r\nGET\r\n$8\r\nresp:mib\r\n" * 200)
    c = shared.client()
    wait_until(lambda: c.info()["proxy"].get("resp_replies_held_back", 0) > 0, 15,
               what="the proxy holding back replies nobody reads")
    proxy = c.info()["proxy"]
    assert proxy["resp_unread_reply_bytes"] < 4 * BUFFER
    assert r.set("resp:other", "served") and r.get("resp:other") == b"served"
    # once it reads, every command has its reply, in order: the value or why not
    replies = conn.replies(200)
    held = [x for x in replies if isinstance(x, hiredis.ReplyError)]
    assert held and all("still unread" in str(x) for x in held)
    assert all(x == value for x in replies if not isinstance(x, hiredis.ReplyError))


# -- redis-cli ----------------------------------------------------------------------------
@needs_cli
def test_redis_cli_one_shot(shared: Cluster) -> None:
    port = str(resp_port(shared))

    def cli(*args: str) -> str:
        out = subprocess.run([REDIS_CLI or "redis-cli", "-p", port, *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert cli("SET", "resp:cli", "from cli") == "OK"
    assert cli("GET", "resp:cli") == "from cli"
    assert cli("PING") == "PONG"
    assert "unknown command" in cli("NOSUCH")
    assert shared.client().get("resp:cli") == b"from cli"


@needs_cli
def test_redis_cli_pipe_mass_insert(shared: Cluster, tmp_path: Any) -> None:
    lines = []
    for i in range(100_000):
        k, v = f"resp:mass:{i}".encode(), str(i).encode()
        lines.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
    path = tmp_path / "mass.txt"
    path.write_bytes(b"".join(lines))
    with path.open("rb") as f:
        out = subprocess.run([REDIS_CLI or "redis-cli", "-p", str(resp_port(shared)), "--pipe"],
                             stdin=f, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "errors: 0, replies: 100000" in out.stdout
    c = shared.client()
    sample = [f"resp:mass:{i}".encode() for i in range(0, 100_000, 997)]
    assert c.mget(sample) == [str(i).encode() for i in range(0, 100_000, 997)]


@needs_cli
def test_redis_cli_interactive(shared: Cluster) -> None:
    port = resp_port(shared)
    child = pexpect.spawn(REDIS_CLI or "redis-cli", ["-p", str(port)], cwd=str(REPO),
                          timeout=10, encoding="utf-8", dimensions=(50, 160))
    try:
        prompt = f"127.0.0.1:{port}> "
        child.expect_exact(prompt)
        child.send("SET resp:tty 'typed here'\r")  # a terminal sends CR, not LF
        child.expect_exact("OK")
        child.expect_exact(prompt)
        child.send("GET resp:tty\r")
        child.expect_exact('"typed here"')
        child.expect_exact(prompt)
        child.send("NOSUCH thing\r")
        child.expect_exact("ERR unknown command 'NOSUCH'")
        child.expect_exact(prompt)
        child.send("DEL resp:tty\r")
        child.expect_exact("(integer) 1")
        child.send("QUIT\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


# -- admin, followers, moves ------------------------------------------------------------------
def test_flushall_is_admin_only_and_empties_every_node(make_cluster: Any, procs: Any) -> None:
    cluster = make_cluster(proxy={"resp_port": free_port(), "resp_admin": True})
    c = cluster.client()
    c.mset({f"f{i}": "x" for i in range(300)})
    follower_resp = free_port()
    procs.start("proxy", "--port", str(free_port()), "--follow", cluster.address,
                "--resp-port", str(follower_resp), ready="zkv proxy ")
    plain = redis.Redis(port=follower_resp, socket_timeout=10)
    wait_until(lambda: plain.get("f1") == b"x", 10, what="the follower's RESP front serving")
    with pytest.raises(redis.exceptions.NoPermissionError, match="--resp-admin"):
        plain.flushall()
    assert c.get("f1") == b"x"
    admin = redis.Redis(port=resp_port(cluster), socket_timeout=10)
    down = cluster.node_addrs[0]  # with a node down: refused, and nothing flushed
    cluster.kill_node(down)
    cluster.wait_state(down, "down")
    with pytest.raises(redis.exceptions.ResponseError, match="nothing was flushed"):
        admin.flushall()
    with pytest.raises(redis.exceptions.ResponseError, match=f"node {down}"):
        admin.dbsize()  # a count missing that node's keys would be wrong
    survivor = next(f"f{i}" for i in range(300) if c.ring(f"f{i}")["owner"] != down)
    assert c.get(survivor) == b"x"
    cluster.start_node(down)
    cluster.wait_state(down, "up")
    assert admin.flushall() is True
    assert admin.dbsize() == 0 and c.get("f1") is None
    assert c.keys() == []
    plain.close()
    admin.close()


def test_keys_cross_between_fronts_through_add_and_remove(make_cluster: Any,
                                                            procs: Any) -> None:
    cluster = make_cluster(proxy={"resp_port": free_port()})
    r = redis.Redis(port=resp_port(cluster), socket_timeout=10)
    c = cluster.client(timeout=5.0)
    expected: dict[bytes, bytes] = {}
    for i in range(1500):
        k, v = f"m{i}".encode(), f"v{i}\x00".encode()
        (r.set if i % 2 else c.set)(k, v)
        expected[k] = v
    extra = Topo(cluster.topo.dir / "extra", 1)
    port = extra.node_ports[0]
    procs.node(port, str(extra.dir / "data"))
    new = f"127.0.0.1:{port}"
    handle = c.add_node(new, wait=False)
    i = 1500
    while handle.status().get("move") is not None and i < 4000:
        k, v = f"m{i}".encode(), f"during{i}".encode()
        assert r.set(k, v)
        expected[k] = v
        i += 1
    handle.wait(60)
    keys = list(expected)
    assert c.mget(keys) == [expected[k] for k in keys]
    assert r.mget(keys) == [expected[k] for k in keys]
    c.remove_node(cluster.node_addrs[0])
    for k in keys[::3]:
        r.set(k, b"after-remove")
        expected[k] = b"after-remove"
    assert c.mget(keys) == [expected[k] for k in keys]
    assert r.mget(keys) == [expected[k] for k in keys]
    assert set(r.scan_iter(match="m*")) == set(keys)
    r.close()


def test_resp_front_refuses_a_port_in_use(procs: Any, tmp_path: Any) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        proc = procs.start("proxy", "--port", str(free_port()), "--state-dir",
                           str(tmp_path / "s"), "--resp-port", str(port))
        assert proc.wait_exit(20) == 1
        assert f"cannot listen for RESP on 127.0.0.1:{port}" in proc.output
        assert "Traceback" not in proc.output
    finally:
        taken.close()


def test_zkv_client_unaffected(shared: Cluster) -> None:
    c: zkv.Client = shared.client()
    assert c.set("resp:zkv", "1") and c.get("resp:zkv") == b"1"


def test_random_commands_and_garbage_never_break_the_front(raw: Any, r: Any,
                                                           shared: Cluster) -> None:
    """A hostile client: random known and unknown commands with random arguments, then
    random bytes. Every command gets a reply (never an internal error); garbage ends
    only its own connection; the proxy keeps serving."""
    import random

    from zkv.core import resp as R

    rng = random.Random(7)
    names = list(R.SPECS) + [b"NOPE", b"MULTI", b"EVAL", b"SUBSCRIBE"]
    words = [b"", b"0", b"-1", b"99999999999999999999999", b"*", b"MATCH", b"COUNT", b"TYPE",
             b"EX", b"SETNAME", b"GETNAME", b"3", b"2", b"a b", b"\x00\xff", b"x" * 3000]
    conn = raw()
    sent = 0
    for _ in range(400):
        args = [rng.choice(names)] + [rng.choice(words) for _ in range(rng.randrange(4))]
        if args[0].lower() in (b"quit", b"flushall", b"flushdb", b"reset", b"hello"):
            continue  # ends the connection, empties the cluster, or changes the protocol
        conn.send(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a)
                                                    for a in args))
        sent += 1
    replies = conn.replies(sent, limit=10)
    assert not [x for x in replies if "internal" in str(x).lower()]
    for _ in range(30):
        junk = raw()
        junk.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        junk.close()
    for bad in (b"*01\r\n$4\r\nPING\r\n", b"*1\r\n$+4\r\nPING\r\n"):  # once fatal
        conn = raw()
        conn.send(bad)
        assert b"-ERR Protocol error" in conn.read_until(b"\r\n")
        assert conn.closed()
    assert r.ping() is True and r.set("resp:alive", "yes") and r.get("resp:alive") == b"yes"
    # the unknown names were not made metric labels: anyone could mint them at will
    import urllib.request

    port = shared.topo.proxy_cfg["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    ops = set(re.findall(rb'zkv_requests_total\{op="([^"]*)"', text))
    assert ops <= {n.upper() for n in R.SPECS} | {b"UNKNOWN", b"PIPE", b"GET", b"SET",
                                                  b"DEL", b"EXISTS", b"MGET", b"MSET",
                                                  b"SCAN", b"KEYS", b"PING", b"INFO"}


def test_pipelined_reads_of_a_big_value_cost_a_node_a_bounded_turn(raw: Any,
                                                                   shared: Cluster) -> None:
    """Primed with small replies, a connection may have 1024 commands in flight: 1024
    GETs of 1 MiB (30 KB sent) were a gigabyte of replies in one node turn, long enough
    for the node to miss its heartbeats and be declared down for every client. The
    node runs an envelope's requests until their replies pass max_message_bytes and
    answers the rest "not run"; it stays up."""
    value = b"b" * (1 << 20)
    c = shared.client()
    c.set("resp:big", value)
    conn = raw()
    conn.send(b"*1\r\n$4\r\nPING\r\n" * 300)
    assert conn.replies(300) == [b"PONG"] * 300
    conn.send(b"*2\r\n$3\r\nGET\r\n$8\r\nresp:big\r\n" * 1024)
    replies = conn.replies(1024)
    errors = [str(x) for x in replies if isinstance(x, hiredis.ReplyError)]
    assert not [e for e in errors if "down" in e], errors[:3]
    assert any("not run" in e for e in errors)
    assert all(x == value for x in replies if not isinstance(x, hiredis.ReplyError))
    assert all(n["state"] == "up" for n in c.nodes())


def test_a_writes_reply_held_back_says_it_was_applied(shared: Cluster) -> None:
    """GETDEL's value over the client's unread budget is held back like a read's, but
    the error says the command ran: a client is never told a write failed."""
    value = b"d" * (1 << 20)
    keys = [f"resp:gd{i}" for i in range(12)]  # 12 MiB of replies, 4 MiB budget
    with redis.Redis(port=resp_port(shared), socket_timeout=20) as r:
        assert r.mset({k: value for k in keys}) and r.exists(*keys) == len(keys)
        with r.pipeline(transaction=False) as p:
            for k in keys:
                p.getdel(k)
            replies = p.execute(raise_on_error=False)
        assert r.exists(*keys) == 0  # every one was applied
    held = [x for x in replies if isinstance(x, Exception)]
    assert held and all("any change it made stands" in str(x) for x in held)
    assert all(x == value for x in replies if not isinstance(x, Exception))


def test_a_client_sending_far_ahead_of_reading_is_cut_off(raw: Any, r: Any,
                                                          shared: Cluster) -> None:
    """Small replies always go (large ones past the buffer become errors, above), so a
    client that sends and never reads piles them up: past its buffer its commands wait
    unread, and past its buffer plus one request of input it is closed."""
    conn = raw()
    burst = b"*1\r\n$4\r\nPING\r\n" * 50_000  # 700 KB of commands, 7 bytes back each
    sent = 0
    with pytest.raises(OSError):  # the proxy closes the connection: reset or broken pipe
        while sent < 400 << 20:
            conn.send(burst)
            sent += len(burst)
    limit = BUFFER + 64 << 20  # client_buffer_bytes + max_message_bytes
    assert sent < limit + (64 << 20), "the proxy kept reading far past its limit"
    proxy = shared.client().info()["proxy"]
    assert proxy["rss_bytes"] < 600 << 20
    assert r.get("resp:alive") == b"yes" or r.set("resp:alive", "yes")
