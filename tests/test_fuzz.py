"""Fuzzing the proxy and the nodes with generated requests (DESIGN.md section 5).

Every malformed request must get an error reply with a code and a message, and
the process must keep serving everyone else. A seeded generator makes the cases
reproducible; ``ZKV_FUZZ_CASES`` (default 5000 per target) and ``ZKV_FUZZ_SEED``
switch on a long run, e.g. ``ZKV_FUZZ_CASES=200000 python -m pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import cbor2
import pytest
import zmq
from conftest import free_port

import zkv
from zkv.core import protocol as P

CASES = int(os.environ.get("ZKV_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("ZKV_FUZZ_SEED", "20261122"))
WINDOW = 200
KNOWN_CODES = {"BAD_REQUEST", "UNKNOWN_COMMAND", "TOO_LARGE", "BAD_COMMAND", "NODE_DOWN",
               "TIMEOUT", "CLUSTER", "UNAVAILABLE", "MOVED", "STALE_EPOCH", "BEHIND"}


def random_item(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 3 else 7)
    if kind == 0:
        return rng.randrange(-2**70, 2**70)
    if kind == 1:
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(0, 20)))
    if kind == 3:
        return rng.choice([None, True, False, 1.5, float("nan"), -0.0])
    if kind == 4:
        return rng.choice(list(P.COMMANDS))  # an operation name in a wrong place
    if kind == 5:
        return rng.choice([b"", "", 0, -1, 2**64])
    if kind == 6:
        return cbor2.CBORTag(rng.randrange(0, 300), rng.randrange(100))
    if kind == 7:
        return [random_item(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 8:
        return {random_item(rng, 3) if rng.random() < 0.5 else str(rng.random()):
                random_item(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return [rng.choice(list(P.COMMANDS)), *[random_item(rng, depth + 1)
                                            for _ in range(rng.randrange(0, 4))]]


def amplifying(rng: random.Random) -> bytes:
    """Small bodies that decode into far more: many tiny items, deep nesting, wide maps."""
    n = rng.choice([1000, 30_000, 200_000])
    kind = rng.randrange(5)
    if kind == 0:  # an array of empty arrays, as a whole request or as an argument
        head = bytes([0x9A]) + struct.pack(">I", n)
        return (head + b"\x80" * n) if rng.random() < 0.5 else \
            b"\x82\x64PIPE" + head + b"\x80" * n
    if kind == 1:  # nesting far deeper than any request
        depth = rng.choice([6, 100, 5000])
        return b"\x82\x63GET" + b"\x81" * depth + b"\x41k"
    if kind == 2:  # a head that claims more items than there are
        return b"\x82\x64MGET\x9b" + struct.pack(">Q", rng.randrange(2**32, 2**63))
    if kind == 3:  # a wide map of options
        return cbor2.dumps(["ADD", "127.0.0.1:1", {f"k{i}": i for i in range(n // 100)}])
    return cbor2.dumps(["MSET", [b"k", b""] * (n // 2)])


def tagged(rng: random.Random) -> bytes:
    """Tags anywhere: shared references (28/29), bignums, regexes, unknown numbers."""
    value = cbor2.dumps(b"v" * rng.choice([10, 1000, 100_000]))
    kind = rng.randrange(5)
    if kind == 0:  # one value shared, referenced many times
        refs = rng.choice([2, 120])
        pairs = bytes([0x98, 2 * refs]) + b"\x41k\xd8\x1c" + value + \
            b"\x41k\xd8\x1d\x00" * (refs - 1)
        return b"\x82\x64MSET" + pairs
    if kind == 1:
        tag = rng.choice([0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 260, 55799,
                          rng.randrange(2**16)])
        return cbor2.dumps(["GET", cbor2.CBORTag(tag, rng.choice([b"k", "x" * 30, 5, [1, 2]]))])
    if kind == 2:  # a regex to compile (tag 35) where a pattern goes
        return cbor2.dumps(["KEYS", cbor2.CBORTag(35, "(a+)+$" * rng.randrange(1, 50))])
    if kind == 3:
        return b"\xd9\xd9\xf7" + cbor2.dumps(["PING"])  # a self-describe tag around it
    return cbor2.dumps(["XBEGIN", {"id": "e1", "ranges": [[0, cbor2.CBORTag(2, b"\x01" * 40)]],
                                   "purge": True}])


def big_ints(rng: random.Random) -> bytes:
    """Integers no field can take: as a cursor, a count, a weight, a budget, a rate."""
    big = rng.choice([2**64, 2**64 + 1, -(2**64), 10**40, 10**5000])
    op = rng.randrange(6)
    if op == 0:
        return cbor2.dumps(["SCAN", big])
    if op == 1:
        return cbor2.dumps(["SCAN", "0", None, big])
    if op == 2:
        return cbor2.dumps(["ADD", "127.0.0.1:1", {"weight": big, "dry_run": True}])
    if op == 3:
        return cbor2.dumps(["MGET", [b"k"], big])
    if op == 4:
        return cbor2.dumps(["XSEND", {"id": "e1", "dest": "127.0.0.1:1",
                                      "pull": "tcp://127.0.0.1:1", "ranges": [[0, 1]],
                                      "batch_keys": big, "batch_bytes": 1, "rate": None}])
    return cbor2.dumps(["ADD", "127.0.0.1:1", {"rate": float(rng.choice([1e308, -1.0])),
                                               "dry_run": True}])


def patterns(rng: random.Random) -> bytes:
    """Glob patterns: long, many stars, unbalanced classes, escapes, bytes of any value."""
    kind = rng.randrange(4)
    if kind == 0:
        pattern = b"*a" * rng.choice([10, 40, 1000]) + b"*b"
    elif kind == 1:
        pattern = b"a" * rng.choice([100, 2000, 600_000])  # (the message limit here is 1 MiB)
    elif kind == 2:
        pattern = bytes(rng.choice(b"*?[]^-\\ab\x00\xff") for _ in range(rng.randrange(1, 60)))
    else:
        pattern = b"[" * rng.randrange(1, 500) + b"]" * rng.randrange(0, 3)
    if rng.random() < 0.5:
        return cbor2.dumps(["KEYS", pattern])
    return cbor2.dumps(["SCAN", "0", pattern, rng.choice([1, 10, 10_000])])


def internal(rng: random.Random) -> bytes:
    """Internal operations with fields of the wrong type, size or sense."""
    def field() -> Any:
        return random_item(rng, 2)
    spec = {name: (field() if rng.random() < 0.4 else good) for name, good in (
        ("id", f"e{rng.randrange(3)}"), ("dest", "127.0.0.1:1"), ("pull", "tcp://127.0.0.1:1"),
        ("ranges", [[0, 2**64]]), ("batch_keys", 10), ("batch_bytes", 1000), ("rate", None),
        ("purge", False), ("mode", rng.choice(["fill", "overwrite", "x"])),
        ("source", "127.0.0.1:2"), ("tombs", rng.choice([True, False, 1])))}
    return cbor2.dumps([rng.choice(["XBEGIN", "XSEND", "XEND", "XDROP", "XSTAT", "XGET",
                                    "XDEL"]), spec if rng.random() < 0.9 else field()])


CLASSES = [amplifying, tagged, big_ints, patterns, internal]


def random_body(rng: random.Random) -> bytes:
    """One request body: garbage, valid CBOR of any shape, a near-valid request, or one
    of the classes that once cost a server far more than it weighed."""
    roll = rng.random()
    if roll < 0.2:
        return rng.choice(CLASSES)(rng)
    if roll < 0.4:
        return rng.randbytes(rng.randrange(0, 300))
    if roll < 0.48:  # truncated or bit-flipped valid requests
        body = bytearray(P.encode_request("SET", rng.randbytes(8), rng.randbytes(30)))
        if rng.random() < 0.5:
            return bytes(body[: rng.randrange(len(body))])
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        return bytes(body)
    if roll < 0.56:  # lengths that claim far more than is there
        return bytes([0x9B]) + struct.pack(">Q", rng.randrange(2**40, 2**63))
    try:
        return cbor2.dumps(random_item(rng))
    except Exception:
        return b"\xff"


def is_reply(body: bytes) -> bool:
    """A well-formed reply: success, or an error with a known code and a message."""
    item = cbor2.loads(body)
    if not isinstance(item, list):
        return False
    if item[0] == P.OK:
        return len(item) == 2
    return (len(item) in (3, 4) and item[0] == P.ERR and item[1] in KNOWN_CODES
            and isinstance(item[2], str) and bool(item[2]))


class Fuzzer:
    def __init__(self, ctx: zmq.Context[Any], addr: str) -> None:
        self.ctx, self.addr = ctx, addr
        self.sock = self._dealer()
        self.errors = 0
        self.ok = 0

    def _dealer(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(f"tcp://{self.addr}")
        return sock

    def run(self, bodies: list[bytes]) -> None:
        """Send a window of bodies, each with its own tag, and check every reply."""
        for start in range(0, len(bodies), WINDOW):
            window = bodies[start : start + WINDOW]
            for i, body in enumerate(window):
                self.sock.send_multipart([b"", struct.pack("<I", start + i), body])
            seen = set()
            for _ in window:
                try:
                    frames = self.sock.recv_multipart()
                except zmq.Again:
                    raise AssertionError(
                        f"no reply within 10 s; {len(window) - len(seen)} requests of the "
                        f"window at case {start} unanswered") from None
                assert len(frames) == 3 and frames[0] == b"", frames[:2]
                (n,) = struct.unpack("<I", frames[1])
                seen.add(n)
                assert is_reply(frames[2]), (bodies[n][:80], frames[2][:200])
                if cbor2.loads(frames[2])[0] == P.ERR:
                    self.errors += 1
                else:
                    self.ok += 1
            assert len(seen) == len(window)

    def envelopes(self) -> None:
        """Odd envelopes: no delimiter, REQ peers, many frames, empty frames."""
        good = P.encode_request("PING")
        raw = self._dealer()
        try:
            raw.send(good)  # DEALER without the empty delimiter
            assert cbor2.loads(raw.recv_multipart()[-1]) == [P.OK, "PONG"]
            raw.send_multipart([b""] * 20 + [good])  # too many frames
            reply = cbor2.loads(raw.recv_multipart()[-1])
            assert reply[0] == P.ERR and reply[1] == "BAD_REQUEST"
            raw.send_multipart([b"", b""])  # an empty body
            reply = cbor2.loads(raw.recv_multipart()[-1])
            assert reply[0] == P.ERR and reply[1] == "BAD_REQUEST"
        finally:
            raw.close(0)
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(f"tcp://{self.addr}")
        try:
            for body in (b"\x00garbage", cbor2.dumps({"op": "GET"}), good):
                req.send(body)
                assert is_reply(req.recv())
        finally:
            req.close(0)

    def close(self) -> None:
        self.sock.close(0)


def fuzz(addr: str, zctx: zmq.Context[Any], seed: int) -> Fuzzer:
    rng = random.Random(seed)
    fuzzer = Fuzzer(zctx, addr)
    try:
        fuzzer.envelopes()
        fuzzer.run([random_body(rng) for _ in range(CASES)])
        # over the configured limits (1 KiB keys, 4 KiB values, 50 keys a batch)
        big = [
            P.encode_request("SET", b"k" * 2000, b"v"),
            P.encode_request("SET", b"k", b"v" * 10_000),
            P.encode_request("MGET", [b"k%d" % i for i in range(60)]),
            P.encode_request("MSET", [b"x"] * 120),
            P.encode_request("PIPE", [["PING"]] * 60),
        ]
        fuzzer.run(big * 5)
        assert fuzzer.errors >= len(big) * 5
    finally:
        fuzzer.close()
    return fuzzer


LIMITS_YAML = """
limits:
  max_key_bytes: 1024
  max_value_bytes: 4096
  max_batch: 50
  max_frames: 8
  max_message_bytes: 1048576
proxy:
  port: {proxy}
  state_dir: {dir}/state
  timeout_ms: 2000
nodes:
  - address: 127.0.0.1:{node}
    data_dir: {dir}/node
"""


@pytest.fixture
def fuzz_cluster(procs: Any, tmp_path: Any) -> tuple[str, str]:
    node, proxy = free_port(), free_port()
    cfg = tmp_path / "fuzz.yaml"
    cfg.write_text(LIMITS_YAML.format(proxy=proxy, node=node, dir=tmp_path))
    procs.start("node", "--config", str(cfg), "--port", str(node), ready="zkv node")
    procs.start("proxy", "--config", str(cfg), ready="zkv proxy")
    return f"127.0.0.1:{node}", f"127.0.0.1:{proxy}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("target", ["node", "proxy"])
def test_fuzzed_requests_get_error_replies_and_the_server_keeps_serving(
    fuzz_cluster: tuple[str, str], zctx: zmq.Context[Any], target: str
) -> None:
    node, proxy = fuzz_cluster
    addr = node if target == "node" else proxy
    fuzzer = fuzz(addr, zctx, SEED + (target == "proxy"))
    assert fuzzer.errors + fuzzer.ok >= CASES
    # the server still serves a normal client, with real data
    with zkv.Client(proxy, timeout=5) as c:
        assert c.set("after-fuzz", "still here")
        assert c.get("after-fuzz") == b"still here"
        assert c.ping()
    with zkv.Client(node, timeout=5) as c:
        assert c.get("after-fuzz") == b"still here"
