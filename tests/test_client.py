"""``zkv.Client``: one exception family, deadlines, Lazy Pirate retries for reads and
none for writes. Against a real cluster, and against a scripted in-process server
that shows exactly which requests arrived on which connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from conftest import Cluster, Procs, free_port, in_threads, module_cluster

import zkv
from zkv.client import PIPELINE_CHUNK
from zkv.core import once
from zkv.core import protocol as P

LIMITS = {"max_key_bytes": 256, "max_value_bytes": 4096, "max_batch": 50}


@pytest.fixture(scope="module")
def shared(request: Any, tmp_path_factory: Any) -> Iterator[Cluster]:
    yield from module_cluster(request, tmp_path_factory, limits=LIMITS)


class FakeServer:
    """A ROUTER on a free port, in a thread. ``answer(n, op)`` decides what to do with
    the n-th request (0-based): return a reply body, or None to stay silent."""

    def __init__(self, ctx: zmq.Context[Any],
                 answer: Callable[[int, str], bytes | None], host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.seen: list[tuple[bytes, str]] = []  # (connection identity, op)
        self.bodies: list[bytes] = []
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IPV6, 1)
        self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            identity, *routing, body = self._sock.recv_multipart()
            op = cbor2.loads(body)[0]
            n = len(self.seen)
            self.seen.append((identity, op))
            self.bodies.append(body)
            reply = self.answer(n, op)
            if reply is not None:
                self._sock.send_multipart([identity, *routing, reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)


@pytest.fixture
def fake(zctx: zmq.Context[Any]) -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(answer: Callable[[int, str], bytes | None], host: str = "127.0.0.1") -> FakeServer:
        server = FakeServer(zctx, answer, host)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., zkv.Client]]:
    made: list[zkv.Client] = []

    def make(address: str, **kw: Any) -> zkv.Client:
        c = zkv.Client(address, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()


# -- the exception family ----------------------------------------------------------------


def test_the_family_tree() -> None:
    for cls in (zkv.ProtocolError, zkv.CommandError, zkv.Unavailable, zkv.StorageError,
                zkv.ClusterError, zkv.InternalError, zkv.ConfigError, zkv.LogCorruption):
        assert issubclass(cls, zkv.ZkvError)
    assert issubclass(zkv.UnknownCommand, zkv.ProtocolError)
    assert issubclass(zkv.LimitExceeded, zkv.ProtocolError)
    assert issubclass(zkv.NodeUnavailable, zkv.Unavailable)
    assert issubclass(zkv.Timeout, zkv.Unavailable)


@pytest.mark.timeout(60)
def test_server_errors_arrive_as_the_same_class(shared: Cluster) -> None:
    c = shared.client(timeout=5.0)
    with pytest.raises(zkv.LimitExceeded, match="4096") as err:
        c.set("k", b"x" * 4097)
    assert err.value.code == "TOO_LARGE" and isinstance(err.value, zkv.ProtocolError)
    with pytest.raises(zkv.LimitExceeded, match="256"):
        c.get("k" * 257)
    with pytest.raises(zkv.LimitExceeded, match="batch"):
        c.mget([f"k{i}" for i in range(51)])
    with pytest.raises(zkv.UnknownCommand, match="NOPE") as unknown:
        c.call("NOPE")
    assert unknown.value.code == "UNKNOWN_COMMAND"
    with pytest.raises(zkv.ProtocolError, match="usage: GET KEY") as proto:
        c.call("GET")
    assert type(proto.value) is zkv.ProtocolError
    with pytest.raises(zkv.CommandError, match="SCAN"):
        c.scan("no-such-cursor")
    with pytest.raises(zkv.ProtocolError):
        c.mget([])
    # nothing above broke the connection
    assert c.set("k", "v") and c.get("k") == b"v"


def test_keys_and_values_must_be_text_or_bytes(shared: Cluster) -> None:
    c = shared.client()
    with pytest.raises(TypeError):
        c.set("k", None)
    with pytest.raises(TypeError):
        c.get(["k"])
    # (and one of the family: `except zkv.ZkvError` catches every mistake too)
    with pytest.raises(zkv.BadArgument, match="key must be str or bytes, not NoneType"):
        c.delete("k", None)
    with pytest.raises(zkv.ZkvError, match="ex must be an integer"):
        c.set("k", "v", ex="10")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one of nx"):
        c.expire("k", 5, nx=True, xx=True)
    with pytest.raises(ValueError, match="at most one of nx"):
        c.expire("k", 5, gt=True, lt=True)
    assert c.set("k", "v", ex=60)
    assert c.expire("k", 90, xx=True, lt=True) is False  # not earlier
    assert c.expire("k", 30, xx=True, lt=True) is True and c.ttl("k") <= 30
    assert c.persist("k") and c.expire("k", 30, xx=True, gt=True) is False
    assert c.delete("k")
    assert c.set("n", 12) and c.get("n") == b"12"
    # one key given as a string is that key, as redis-py takes it, not its letters
    assert c.set("abc", "1") and c.mget("abc") == [b"1"] and c.mget(b"abc") == [b"1"]


def test_delete_and_exists_take_many_keys_as_redis_py_does(shared: Cluster) -> None:
    c = shared.client()
    keys = [f"many:{i}" for i in range(20)]  # (over every node)
    c.mset({k: "v" for k in keys[:15]})
    assert c.exists(keys[0]) is True and c.exists("many:none") is False
    assert c.exists(*keys) == 15
    assert c.exists(keys[0], keys[0], "many:none") == 2  # (named twice: counted twice)
    assert c.delete(*keys) == 15
    assert c.exists(*keys) == 0 and c.delete(*keys) == 0
    assert c.delete(keys[0]) is False


@pytest.mark.parametrize("address", ["localhost", "", "127.0.0.1:99999", "a b:1", "127.0.0.1:x"])
def test_a_bad_address_is_a_config_error_not_a_zmq_error(address: str) -> None:
    with pytest.raises(zkv.ConfigError, match="HOST:PORT"):
        zkv.Client(address)


@pytest.mark.parametrize("kw", [{"timeout": 0}, {"timeout": -1}, {"timeout": "1"},
                                {"timeout": float("inf")}, {"timeout": float("nan")},
                                {"retries": -1}, {"retries": 1.5}])
def test_bad_timeouts_and_retries_are_config_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(zkv.ConfigError):
        zkv.Client("127.0.0.1:1", **kw)


def test_addresses_are_normalised() -> None:
    assert zkv.Client("tcp://127.0.0.1:8000").address == "127.0.0.1:8000"
    assert zkv.Client("LocalHost:8000").address == "localhost:8000"
    assert zkv.Client("[::1]:8000").address == "[::1]:8000"


# -- nothing there, or something that is not a zkv server ----------------------------------


@pytest.mark.timeout(30)
def test_a_read_from_nothing_says_connection_refused_at_once(
    clients: Callable[..., zkv.Client],
) -> None:
    """redis-cli says "Connection refused" at once; so does the client, after its
    retries' short pauses (0.1 s, 0.2 s), not after three full timeouts."""
    address = f"127.0.0.1:{free_port()}"
    c = clients(address, timeout=30, retries=2)
    started = time.monotonic()
    with pytest.raises(zkv.NotSent) as err:
        c.get("k")
    assert time.monotonic() - started < 10  # a timeout would take 90 s
    assert str(err.value).startswith(f"cannot connect to {address}: Connection refused")
    assert "3 attempts" in str(err.value)
    assert isinstance(err.value, zkv.Unavailable) and err.value.code == "UNAVAILABLE"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("write", [
    lambda c: c.set("k", "v"), lambda c: c.delete("k"), lambda c: c.mset({"a": "1"}),
    lambda c: c.call("PIPE", [["SET", b"k", b"v"]]),
], ids=["set", "delete", "mset", "pipe"])
def test_a_write_to_nothing_fails_at_once_saying_it_was_not_sent(
    clients: Callable[..., zkv.Client], write: Callable[[zkv.Client], Any]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    c = clients(address, timeout=30, retries=0)
    started = time.monotonic()
    with pytest.raises(zkv.NotSent, match="Connection refused") as err:
        write(c)
    assert time.monotonic() - started < 10
    assert address in str(err.value)


@pytest.mark.timeout(30)
def test_a_server_that_is_not_zkv_is_named_as_such(clients: Callable[..., zkv.Client]) -> None:
    """A TCP server that speaks something else (here it sends HTTP and hangs up)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        c = clients(f"127.0.0.1:{listener.getsockname()[1]}", timeout=5, retries=0)
        with pytest.raises(zkv.NotSent) as err:
            c.ping()
        assert "handshake" in str(err.value)
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.timeout(30)
def test_a_lost_reply_times_out_and_a_read_from_silence_is_retried(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: None)  # connects, never answers
    c = clients(server.address, timeout=0.3, retries=2)
    with pytest.raises(zkv.Timeout) as err:
        c.get("k")
    assert "3 attempts" in str(err.value) and server.address in str(err.value)
    with pytest.raises(zkv.Timeout, match="outcome of SET is unknown"):
        c.set("k", "v")


@pytest.mark.timeout(30)
def test_lowercase_commands_are_classed_as_what_they_are(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    """call("get", ...) is a read: retried on a timeout (it used to count as a write)."""
    server = fake(lambda n, op: None if n < 2 else P.encode_ok(b"v"))
    c = clients(server.address, timeout=0.3, retries=2)
    assert c.call("get", b"k") == b"v"
    assert [op for _, op in server.seen] == ["GET", "GET", "GET"]


@pytest.mark.timeout(60)
def test_a_long_pipeline_waits_while_replies_keep_coming(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    """20 pipeline messages, each answered 0.1 s after the one before: 2 s in all, with a
    0.5 s timeout. One deadline for the whole batch made most of them "outcome
    unknown"; the timeout counts from the last reply."""
    def slow(n: int, op: str) -> bytes:
        time.sleep(0.1)
        return P.encode_ok_items([[P.OK, "OK"]] * PIPELINE_CHUNK)

    server = fake(slow)
    c = clients(server.address, timeout=0.5, retries=0)
    p = c.pipeline()
    for i in range(20_000):
        p.set(b"k%d" % i, b"v")
    assert p.execute() == [True] * 20_000
    assert len(server.seen) == -(-20_000 // PIPELINE_CHUNK)


@pytest.mark.timeout(30)
def test_a_send_to_a_peer_that_does_not_read_times_out_instead_of_blocking(
    zctx: zmq.Context[Any], clients: Callable[..., zkv.Client]
) -> None:
    """A server that accepts and never reads: the send buffers fill, and the client
    gives up within its timeout saying so, instead of blocking forever."""
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 1)
    router.setsockopt(zmq.RCVBUF, 4096)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    c = clients(f"127.0.0.1:{port}", timeout=1.0, retries=0)
    big = [("SET", [b"k", b"v" * 60_000])] * 2000  # 120 MB: far more than any buffer
    started = time.monotonic()
    results = c.call_many(big)
    assert time.monotonic() - started < 20
    assert all(isinstance(r, zkv.Unavailable) for r in results)
    assert any(isinstance(r, zkv.NotSent) and "not keeping up" in str(r)
               or "not sent" in str(r) for r in results)


# -- retries, seen from the server ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_read_is_retried_on_a_fresh_connection(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: None if n < 2 else P.encode_ok(b"value"))
    c = clients(server.address, timeout=0.3, retries=3)
    started = time.monotonic()
    assert c.get("k") == b"value"
    assert 2 * 0.3 * 0.9 <= time.monotonic() - started < 3 * 0.3 + 0.5
    assert [op for _, op in server.seen] == ["GET", "GET", "GET"]
    identities = [identity for identity, _ in server.seen]
    assert len(set(identities)) == 3, "each retry must use a fresh socket"
    # the socket that got an answer is kept for the next call
    assert c.get("k") == b"value"
    assert server.seen[3][0] == identities[2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["PIPE", "NOPE"])
def test_an_untagged_write_is_sent_once(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client], op: str
) -> None:
    """A pipeline (and what the client cannot tell is safe) is not tagged for retries,
    so it is not sent again."""
    server = fake(lambda n, op: None)
    c = clients(server.address, timeout=0.3, retries=3)
    args = {"PIPE": ([["GET", b"k"]],), "NOPE": ()}[op]
    with pytest.raises(zkv.Timeout, match="unknown"):
        c.call(op, *args)
    time.sleep(0.5)  # time for any retry to arrive
    assert [o for _, o in server.seen] == [op]


@pytest.mark.timeout(30)
def test_call_many_tags_its_writes_and_retries_what_got_no_reply(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    """call_many's writes are tagged as call's are, and a command that got no reply is
    sent again, byte for byte (the node that applied a write answers its first outcome);
    a read too, but not a pipeline, which is not tagged."""
    silent: set[int] = {0, 1}  # the first two requests go unanswered

    def answer(n: int, op: str) -> bytes | None:
        return None if n in silent else P.encode_ok(n)

    server = fake(answer)
    c = clients(server.address, timeout=0.3, retries=2)
    out = c.call_many([("SET", [b"a", b"1"]), ("GET", [b"a"]), ("INCR", [b"n"])])
    assert [type(r) for r in out] == [int, int, int]
    assert [o for _, o in server.seen] == ["ONCE", "GET", "ONCE", "ONCE", "GET"]
    assert server.bodies[3] == server.bodies[0]  # the same write, the same id and number
    assert server.bodies[4] == server.bodies[1]
    seqs = [cbor2.loads(b)[2] for b in server.bodies if cbor2.loads(b)[0] == "ONCE"]
    assert seqs == [1, 2, 1]
    silent.update(range(5, 100))  # from now on nothing is answered
    late = c.call_many([("SET", [b"b", b"2"]), ("PIPE", [[["GET", b"k"]]])])
    assert all(isinstance(r, zkv.Timeout) and "unknown" in str(r) for r in late)
    time.sleep(0.5)
    ops = [o for _, o in server.seen[5:]]
    assert ops.count("ONCE") == 3 and ops.count("PIPE") == 1  # the write 1 + 2 retries


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["SET", "DEL", "MSET", "INCR"])
def test_a_write_is_retried_with_its_id_and_number(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client], op: str
) -> None:
    """A write is tagged (ONCE client_id seq request) and a retry is byte for byte the
    same request on a fresh socket: the node that applied it answers its first outcome."""
    server = fake(lambda n, op: None if n < 2 else P.encode_ok(1))
    c = clients(server.address, timeout=0.3, retries=3)
    args = {"SET": (b"k", b"v"), "DEL": (b"k",), "MSET": ([b"k", b"v"],),
            "INCR": (b"k",)}[op]
    assert c.call(op, *args) == 1
    assert [o for _, o in server.seen] == ["ONCE"] * 3
    assert len(set(server.bodies)) == 1 and len({i for i, _ in server.seen}) == 3
    tag, client_id, seq, request = cbor2.loads(server.bodies[0])
    assert (tag, client_id, request) == ("ONCE", c.client_id, [op, *args])
    c.call(op, *args)  # the next write has the next number
    assert cbor2.loads(server.bodies[-1])[2] == seq + 1


@pytest.mark.timeout(30)
def test_a_write_whose_tries_all_time_out_has_an_unknown_outcome(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: None)
    c = clients(server.address, timeout=0.2, retries=2)
    with pytest.raises(zkv.Timeout, match="outcome of SET is unknown after 3 attempts"):
        c.set("k", "v")
    assert len(server.bodies) == 3 and len(set(server.bodies)) == 1


@pytest.mark.timeout(30)
def test_retries_can_be_turned_off_and_on_per_call(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: None)
    c = clients(server.address, timeout=0.2, retries=2)
    with pytest.raises(zkv.Timeout):
        c.call("GET", b"k", retry=False)
    with pytest.raises(zkv.Timeout):
        c.call("SET", b"k", b"v", retry=False)
    with pytest.raises(zkv.Timeout):
        c.call("PIPE", [["SET", b"k", b"v"]], retry=True)
    time.sleep(0.3)
    assert [o for _, o in server.seen] == ["GET", "ONCE", "PIPE", "PIPE", "PIPE"]


@pytest.mark.timeout(30)
def test_replies_to_other_requests_are_ignored(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client], zctx: zmq.Context[Any]
) -> None:
    """A reply whose tag is not the one asked (a late or stray reply) is dropped."""
    def answer(n: int, op: str) -> bytes | None:
        return P.encode_ok(op)

    server = fake(answer)
    c = clients(server.address, timeout=2.0, retries=0)
    # the server echoes routing frames: check a reply with another tag is skipped
    assert c.call("PING") == "PING"
    sock = c._socket()
    tag = b"\xff" * 8
    sock.send_multipart([b"", tag, P.encode_request("GET", b"k")])  # its reply is stray
    assert c.call("EXISTS", b"k") == "EXISTS"
    assert c.call("INFO") == "INFO"


@pytest.mark.timeout(30)
def test_a_server_error_is_not_retried(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: P.encode_error("BAD_COMMAND", "not a counter"))
    c = clients(server.address, timeout=1.0, retries=3)
    with pytest.raises(zkv.CommandError, match="not a counter"):
        c.get("k")
    with pytest.raises(zkv.CommandError, match="not a counter"):
        c.incr("k")
    assert len(server.seen) == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("many", [False, True], ids=["call", "call_many"])
def test_a_read_or_write_that_meets_a_failover_is_tried_again_after_a_pause(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client], many: bool
) -> None:
    """Unavailable (a node down, a new primary not serving yet): reads and writes are
    tried again, twice by default, then the error is the caller's, naming the node."""
    down = P.encode_error("NODE_DOWN", "node 127.0.0.1:9 is down")
    server = fake(lambda n, op: down if n in (0, 1, 3, 4, 5) else P.encode_ok(b"v"))
    c = clients(server.address, timeout=1.0)

    def call(op: str, *args: Any) -> Any:
        if not many:
            return c.call(op, *args)
        result = c.call_many([(op, args)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    assert call("GET", b"k") == b"v"  # tried three times
    began = time.monotonic()
    with pytest.raises(zkv.NodeUnavailable, match="127.0.0.1:9"):
        call("SET", b"k", b"v")  # three tries, all refused
    assert len(server.seen) == 6
    assert time.monotonic() - began >= 0.25  # the pauses, not a busy loop


@pytest.mark.timeout(30)
def test_an_unknown_error_code_is_still_a_zkv_error(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: P.encode_error("FROM_THE_FUTURE", "something new"))
    c = clients(server.address, timeout=1.0)
    with pytest.raises(zkv.ZkvError, match="something new") as err:
        c.get("k")
    assert err.value.code == "FROM_THE_FUTURE"
    server.answer = lambda n, op: b"\xff not cbor"
    with pytest.raises(zkv.ProtocolError, match="reply"):
        c.get("k")


@pytest.mark.timeout(60)
def test_a_read_succeeds_once_the_server_comes_up_during_the_retries(
    procs: Procs, tmp_path: Path, clients: Callable[..., zkv.Client]
) -> None:
    """Lazy Pirate against a real server (a node: the client talks to one as to a proxy)
    that is down when the read starts and comes up a second later."""
    port = free_port()
    node = procs.node(port, str(tmp_path / "node"))
    address = f"127.0.0.1:{port}"
    assert clients(address).set("waiting", "for you")
    node.kill()
    c = clients(address, timeout=0.4, retries=20)
    with pytest.raises(zkv.NotSent, match="Connection refused"):
        clients(address, timeout=0.4, retries=1).set("k2", "v2")  # nothing there: not sent
    restarted: list[Any] = []
    timer = threading.Timer(1.0, lambda: restarted.append(procs.node(port, str(tmp_path / "node"))))
    started = time.monotonic()
    timer.start()
    try:
        assert c.get("waiting") == b"for you"
    finally:
        timer.join(30)
    elapsed = time.monotonic() - started
    assert restarted, "the node did not restart"
    assert 1.0 <= elapsed < 0.4 * 21, elapsed
    assert c.set("k", "v") and c.get("k") == b"v"
    assert c.get("k2") is None  # "not sent" meant not applied, even once the node was back


@pytest.mark.timeout(30)
def test_an_ipv6_address_connects(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    try:
        server = fake(lambda n, op: P.encode_ok("PONG"), host="[::1]")
    except zmq.ZMQError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    c = clients(server.address, timeout=2.0, retries=0)
    assert c.address == server.address
    assert c.ping()


@pytest.mark.timeout(30)
def test_a_pipeline_retries_what_a_down_node_refused_but_keeps_the_order(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    """A command refused as unavailable (its node down, say) is sent again, with its tag,
    unless a later command on the same key went through meanwhile: the retry would
    land after it. That one keeps its error (nothing was applied)."""
    down = P.error_item(zkv.NodeUnavailable("node 127.0.0.1:1 is down"))
    servers: list[FakeServer] = []

    def answer(n: int, op: str) -> bytes:
        items = cbor2.loads(servers[0].bodies[n])[1]
        if n > 0:
            return P.encode_ok_items([[P.OK, "OK"]] * len(items))
        return P.encode_ok_items([down if it[3][1:3] in ([b"a", b"1"], [b"b", b"1"])
                                  else [P.OK, "OK"] for it in items])

    servers.append(fake(answer))
    c = clients(servers[0].address, timeout=1.0, retries=2)
    p = c.pipeline()
    p.set("a", "1")
    p.set("b", "1")
    p.set("b", "2")
    got = p.execute(raise_on_error=False)
    assert got[0] is True and got[2] is True and isinstance(got[1], zkv.NodeUnavailable)
    first, again = (cbor2.loads(b)[1] for b in servers[0].bodies)
    assert again == [first[0]]  # only SET a 1, with the same id and sequence number


def test_retries_are_kept_in_the_order_of_their_keys() -> None:
    from zkv.client import _in_order

    keys = [b"a", b"b", b"a", None, b"c"]
    assert _in_order({0: 1, 1: 1, 3: 1}, 0, 5, keys) == [1, 3]  # a went through later
    assert _in_order({0: 1, 2: 1}, 0, 5, keys) == [0, 2]  # both again, in order
    assert _in_order({4: 1}, 0, 5, keys) == [4]


def test_a_refused_transaction_is_sent_again_whole_then_raised(fake: Any, clients: Any) -> None:
    """While a move takes its keys a transaction is refused with nothing run: the client
    sends it again after a pause, the same message (its writes tagged), for at most its
    timeout; then it raises the refusal."""
    moving = P.encode_exc(zkv.Unavailable("keys of this transaction are being moved"))
    ok = P.encode_ok_items([[P.OK, "OK"], [P.OK, 2]])
    server = fake(lambda n, op: moving if n < 3 else ok)
    c = clients(server.address, timeout=2.0)
    with c.pipeline(transaction=True) as t:
        assert t.set(b"{a}x", b"1").incr(b"{a}n").execute() == [True, 2]
    assert len(server.bodies) == 4 and len(set(server.bodies)) == 1  # the same message
    request = cbor2.loads(server.bodies[0])
    assert request[0] == "PIPE" and request[3] is True
    assert [item[0] for item in request[1]] == ["ONCE", "ONCE"]  # writes tagged
    never = fake(lambda n, op: moving)
    c = clients(never.address, timeout=0.5)
    began = time.monotonic()
    with pytest.raises(zkv.Unavailable, match="being moved"):
        c.pipeline(transaction=True).set(b"{a}x", b"1").execute()
    assert 0.3 < time.monotonic() - began < 5.0 and len(never.bodies) > 1


def test_a_transaction_that_went_out_never_ends_as_a_plain_refusal(fake: Any,
                                                                  clients: Any) -> None:
    """Its node went down with it in flight (it may have been applied), then it was
    refused until the timeout: what is raised says the outcome is unknown, never
    just that the node is down (which would read as "nothing ran")."""
    lost = P.encode_exc(zkv.NodeUnavailable(
        "node n went down with this request in flight; the outcome of a write is unknown"))
    down = P.encode_exc(zkv.NodeUnavailable("node n is down"))
    server = fake(lambda n, op: lost if n == 0 else down)
    c = clients(server.address, timeout=0.5)
    with pytest.raises(zkv.Timeout, match="may have been applied"):
        c.pipeline(transaction=True).incr(b"{a}n").execute()
    assert len(server.bodies) > 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("direct", [False, True], ids=["proxy", "direct"])
def test_threads_may_share_one_client(shared: Cluster, direct: bool) -> None:
    """One Client used by many threads at once (as a web server's workers would): their
    requests take turns on its connections, each thread gets its own replies, and every
    write counts once (each has a sequence number of its own)."""
    c = shared.client(timeout=10.0, retries=2, direct=direct)
    counter = f"threads:{direct}:counter"

    def work(t: int) -> None:
        mine = f"threads:{direct}:{t}"
        for i in range(120):
            c.incr(counter)
            assert c.set(mine, str(i)) and c.get(mine) == str(i).encode()
            if i % 20 == 0:
                got = c.pipeline().incr(counter).get(mine).set(f"{mine}:p", str(i)).execute()
                assert got[1:] == [str(i).encode(), True]
                assert c.mget([mine, f"{mine}:p"]) == [str(i).encode()] * 2

    assert in_threads(work, 8, 100) == []
    assert int(c.get(counter) or 0) == 8 * (120 + 6)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("direct", [False, True], ids=["proxy", "direct"])
def test_a_shared_clients_long_batch_keeps_every_write(make_cluster: Any, direct: bool) -> None:
    """A batch longer than a node's window of remembered writes (sent in rounds) while
    another thread writes through the same client: every write of the batch is
    applied once. (With one id for every thread, the other thread's newer numbers
    reached the nodes between the rounds, and the nodes took the batch's later writes
    for retries they no longer remembered: outcome unknown, not applied.)"""
    c = make_cluster(nodes=3).client(timeout=10.0, retries=2, direct=direct)
    n = 3 * once.WINDOW
    stop = threading.Event()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            while not stop.is_set():
                c.set(f"batch:{direct}:other", "x")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        p = c.pipeline()
        for i in range(n):
            p.set(f"batch:{direct}:{i}", str(i))
        assert p.execute() == [True] * n
        got = c.call_many([("INCR", [f"batch:{direct}:c"]) for _ in range(n)])
    finally:
        stop.set()
        thread.join(30)
    assert errors == []
    assert [g for g in got if type(g) is not int] == []
    assert sorted(got) == list(range(1, n + 1))
    keys = [f"batch:{direct}:{i}" for i in range(0, n, 97)]
    assert c.mget(keys) == [k.rsplit(":", 1)[1].encode() for k in keys]


STOPPED_CLIENT = """
import sys, zkv
c = zkv.Client(sys.argv[1], timeout=1.0, retries=5, direct=sys.argv[2] == "direct")
c.set("n", "0")
c.retries = 0
print("ready", flush=True)
sys.stdin.readline()
try:
    print("got", c.incr("n"), flush=True)
except zkv.ZkvError as exc:
    print("error", type(exc).__name__, exc, flush=True)
c.close()
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["proxy", "direct"])
def test_a_client_stopped_while_its_reply_came_takes_the_reply(
        make_cluster: Any, mode: str) -> None:
    """A client process stopped (SIGSTOP, a paused VM) past its timeout, while the reply
    to its write arrived: on waking it reads the reply rather than calling the write's
    outcome unknown. (Its reply is in the kernel's buffers; libzmq's I/O thread, stopped
    too, has not read it yet when the client's wait comes back.)"""
    import signal
    import subprocess
    import sys

    cluster: Cluster = make_cluster(nodes=1)
    server = cluster.proxy if mode == "proxy" else cluster.nodes[cluster.node_addrs[0]]
    client = subprocess.Popen(
        [sys.executable, "-c", STOPPED_CLIENT, cluster.address, mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "ready"
        server.signal(signal.SIGSTOP)  # the request waits in the server's buffers...
        try:
            client.stdin.write("go\n")
            client.stdin.flush()
            time.sleep(0.3)  # ...while the client waits for its reply
            client.send_signal(signal.SIGSTOP)
        finally:
            server.signal(signal.SIGCONT)  # the reply comes while the client is stopped
        time.sleep(1.6)  # well past the client's timeout
        client.send_signal(signal.SIGCONT)
        out, _ = client.communicate(timeout=20)
    finally:
        client.kill()
        client.wait()
    assert out.strip().splitlines()[-1] == "got 1", out
    c = cluster.client()
    assert c.get("n") == b"1"
