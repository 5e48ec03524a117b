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
from zkv import protocol as P

CASES = int(os.environ.get("ZKV_FUZZ_CASES", "5000"))
SEED = int(os.environ.get("ZKV_FUZZ_SEED", "20261122"))
WINDOW = 200
KNOWN_CODES = {"BAD_REQUEST", "UNKNOWN_COMMAND", "TOO_LARGE", "BAD_COMMAND", "NODE_DOWN",
               "TIMEOUT", "CLUSTER", "UNAVAILABLE"}


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


def random_body(rng: random.Random) -> bytes:
    """One request body: garbage, valid CBOR of any shape, or a near-valid request."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.randrange(0, 300))
    if roll < 0.35:  # truncated or bit-flipped valid requests
        body = bytearray(P.encode_request("SET", rng.randbytes(8), rng.randbytes(30)))
        if rng.random() < 0.5:
            return bytes(body[: rng.randrange(len(body))])
        body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        return bytes(body)
    if roll < 0.45:  # lengths that claim far more than is there
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
    return (len(item) == 3 and item[0] == P.ERR and item[1] in KNOWN_CODES
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
