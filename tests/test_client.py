"""``zkv.Client``: one exception family, deadlines, Lazy Pirate retries for reads and
none for writes. Against a real cluster, and against a scripted in-process server
that shows exactly which requests arrived on which connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from conftest import Cluster, Procs, free_port, module_cluster

import zkv
from zkv import protocol as P

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
    assert c.set("n", 12) and c.get("n") == b"12"


@pytest.mark.parametrize("address", ["localhost", "", "127.0.0.1:99999", "a b:1", "127.0.0.1:x"])
def test_a_bad_address_is_a_config_error_not_a_zmq_error(address: str) -> None:
    with pytest.raises(zkv.ConfigError, match="HOST:PORT"):
        zkv.Client(address)


@pytest.mark.parametrize("kw", [{"timeout": 0}, {"timeout": -1}, {"timeout": "1"},
                                {"retries": -1}, {"retries": 1.5}])
def test_bad_timeouts_and_retries_are_config_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(zkv.ConfigError):
        zkv.Client("127.0.0.1:1", **kw)


def test_addresses_are_normalised() -> None:
    assert zkv.Client("tcp://127.0.0.1:8000").address == "127.0.0.1:8000"
    assert zkv.Client("LocalHost:8000").address == "localhost:8000"
    assert zkv.Client("[::1]:8000").address == "[::1]:8000"


# -- deadlines against nothing ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_read_from_nothing_times_out_after_its_retries(
    clients: Callable[..., zkv.Client],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    c = clients(address, timeout=0.4, retries=2)
    started = time.monotonic()
    with pytest.raises(zkv.Timeout) as err:
        c.get("k")
    elapsed = time.monotonic() - started
    assert 3 * 0.4 * 0.9 <= elapsed < 3 * 0.4 + 0.5, elapsed
    assert address in str(err.value) and "3 attempts" in str(err.value)
    assert isinstance(err.value, zkv.Unavailable)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("write", [
    lambda c: c.set("k", "v"), lambda c: c.delete("k"), lambda c: c.mset({"a": "1"}),
    lambda c: c.call("PIPE", [["SET", b"k", b"v"]]),
], ids=["set", "delete", "mset", "pipe"])
def test_a_write_to_nothing_times_out_once_with_outcome_unknown(
    clients: Callable[..., zkv.Client], write: Callable[[zkv.Client], Any]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    c = clients(address, timeout=0.4, retries=3)
    started = time.monotonic()
    with pytest.raises(zkv.Timeout, match="outcome .* unknown") as err:
        write(c)
    elapsed = time.monotonic() - started
    assert 0.4 * 0.9 <= elapsed < 0.4 + 0.4, elapsed  # one attempt, not four
    assert address in str(err.value)


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
@pytest.mark.parametrize("op", ["SET", "DEL", "MSET", "PIPE", "NOPE"])
def test_a_write_is_sent_once(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client], op: str
) -> None:
    server = fake(lambda n, op: None)
    c = clients(server.address, timeout=0.3, retries=3)
    args = {"SET": (b"k", b"v"), "DEL": (b"k",), "MSET": ([b"k", b"v"],),
            "PIPE": ([["GET", b"k"]],), "NOPE": ()}[op]
    with pytest.raises(zkv.Timeout, match="unknown"):
        c.call(op, *args)
    time.sleep(0.5)  # time for any retry to arrive
    assert [o for _, o in server.seen] == [op]


@pytest.mark.timeout(30)
def test_a_read_can_opt_out_of_retries_and_a_write_can_opt_in(
    fake: Callable[..., FakeServer], clients: Callable[..., zkv.Client]
) -> None:
    server = fake(lambda n, op: None)
    c = clients(server.address, timeout=0.2, retries=2)
    with pytest.raises(zkv.Timeout):
        c.call("GET", b"k", retry=False)
    with pytest.raises(zkv.Timeout):
        c.call("SET", b"k", b"v", retry=True)
    time.sleep(0.3)
    assert [o for _, o in server.seen] == ["GET", "SET", "SET", "SET"]


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
    server = fake(lambda n, op: P.encode_error("NODE_DOWN", "node 127.0.0.1:9 is down"))
    c = clients(server.address, timeout=1.0, retries=3)
    with pytest.raises(zkv.NodeUnavailable, match="127.0.0.1:9"):
        c.get("k")
    assert len(server.seen) == 1


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
    with pytest.raises(zkv.Timeout, match="unknown"):
        c.set("k", "v")  # nobody there: a write fails after one attempt, no retries

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
