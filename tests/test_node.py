"""The storage node as users run it: real ``zkv node`` processes on loopback ports,
killed with SIGKILL, restarted, fed garbage, and checked for what survived."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import yaml
import zmq
from conftest import REPO, Proc, Procs, free_port, wait_until

import zkv
from zkv.core import protocol as P
from zkv.core import wal

HOST = "127.0.0.1"
READY = re.compile(
    r"^zkv node (?P<addr>\S+) data=(?P<dir>\S+) fsync=(?P<fsync>\w+) "
    r"recovered (?P<keys>\d+) keys from (?P<records>\d+) records in (?P<secs>[\d.]+)s$"
)


# -- helpers -----------------------------------------------------------------------


class Conn:
    """A DEALER connection for one thread: pipelined requests tagged with a number,
    every send and receive with a timeout."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, timeout_ms: int = 5000) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
        self.sock.connect(f"tcp://{addr}")
        self.next_tag = 0

    def send(self, op: str, *args: Any) -> int:
        self.next_tag += 1
        self.sock.send_multipart([b"", b"%d" % self.next_tag, P.encode_request(op, *args)])
        return self.next_tag

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def recv(self) -> tuple[int, Any]:
        """(tag, decoded reply item); raises zmq.Again on timeout."""
        frames = self.sock.recv_multipart()
        assert len(frames) == 3 and frames[0] == b"", frames
        return int(frames[1]), cbor2.loads(frames[2])

    def call(self, op: str, *args: Any) -> Any:
        tag = self.send(op, *args)
        got, item = self.recv()
        assert got == tag
        return P.result_of(item)

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def conns(zctx: zmq.Context[Any]) -> Any:
    made: list[Conn] = []

    def connect(addr: str, timeout_ms: int = 5000) -> Conn:
        c = Conn(zctx, addr, timeout_ms)
        made.append(c)
        return c

    yield connect
    for c in made:
        c.close()


def node_place(tmp_path: Path) -> tuple[int, Path, str]:
    """Where a test's node lives across its restarts: (free port, data directory, address)."""
    port = free_port()
    return port, tmp_path / "node", f"{HOST}:{port}"


def start_node(procs: Procs, port: int, data_dir: Path, *extra: str) -> Proc:
    return procs.start(
        "node", "--port", str(port), "--data-dir", str(data_dir), *extra,
        ready=f"zkv node {HOST}:{port} ",
    )


def start_failing(procs: Procs, port: int, data_dir: Path, *extra: str) -> tuple[int, str]:
    proc = procs.start("node", "--port", str(port), "--data-dir", str(data_dir), *extra)
    code = proc.wait_exit(20)
    return code, proc.output


def write_config(path: Path, port: int, limits: dict[str, int] | None = None,
                 **node: Any) -> Path:
    doc: dict[str, Any] = {"nodes": [{"port": port, **node}]}
    if limits:
        doc["limits"] = limits
    path.write_text(yaml.safe_dump(doc))
    return path


def start_with_config(procs: Procs, config: Path, port: int, data_dir: Path,
                      *extra: str) -> Proc:
    return start_node(procs, port, data_dir, "--config", str(config), *extra)


def read_all(conn: Conn, keys: list[bytes]) -> dict[bytes, bytes | None]:
    values: list[bytes | None] = []
    for i in range(0, len(keys), 500):
        values += conn.call("MGET", keys[i : i + 500])
    return dict(zip(keys, values))


class Ledger:
    """What a client knows about its writes: the last acknowledged value of each key
    and the last value sent (which may or may not have been applied if no reply came)."""

    def __init__(self) -> None:
        self.acked: dict[bytes, bytes] = {}
        self.sent: dict[bytes, bytes] = {}
        self.lock = threading.Lock()
        self.acks = 0

    def on_send(self, key: bytes, value: bytes) -> None:
        with self.lock:
            self.sent[key] = value

    def on_ack(self, key: bytes, value: bytes) -> None:
        with self.lock:
            self.acked[key] = value
            self.acks += 1

    def check(self, found: dict[bytes, bytes | None]) -> None:
        lost = []
        for key, value in self.acked.items():
            got = found[key]
            if got == value:
                continue
            if got is not None and got == self.sent[key]:
                continue  # the last write, in flight at the kill: applied but not acknowledged
            lost.append((key, value, got))
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"


def data_files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name.startswith(("wal-", "snap-"))]


def data_bytes(path: Path) -> int:
    total = 0
    for p in data_files(path):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


# -- 1. kill -9 under load ---------------------------------------------------------


def writer(addr: str, ctx: zmq.Context[Any], ledger: Ledger, wid: int, stop: threading.Event,
           errors: list[str]) -> None:
    conn = Conn(ctx, addr, timeout_ms=2000)
    rng = random.Random(wid)
    seq = 0
    try:
        while not stop.is_set():
            key = b"w%d-k%d" % (wid, rng.randrange(40))
            value = b"%d-%d-%d-" % (wid, seq, time.monotonic_ns()) + b"v" * rng.randrange(200)
            seq += 1
            ledger.on_send(key, value)
            try:
                tag = conn.send("SET", key, value)
            except zmq.Again:
                return
            while not conn.poll(50):
                if stop.is_set():
                    # The node is dead; a reply already queued would still be an ack.
                    if not conn.poll(200):
                        return
                    break
            got, item = conn.recv()
            if got != tag or item != [P.OK, "OK"]:
                errors.append(f"writer {wid}: unexpected reply {got} {item!r}")
                return
            ledger.on_ack(key, value)
    except Exception as exc:  # noqa: BLE001 -- reported by the test, not a silent thread death
        errors.append(f"writer {wid}: {type(exc).__name__}: {exc}")
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_kill_9_under_concurrent_writes_loses_no_acknowledged_write(
    procs: Procs, tmp_path: Path, zctx: zmq.Context[Any], conns: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    ledger = Ledger()
    rng = random.Random(1234)
    errors: list[str] = []
    for cycle in range(4):
        node = start_node(procs, port, data, "--fsync", "always")
        if cycle:
            reader = conns(addr)
            ledger.check(read_all(reader, sorted(ledger.acked)))
        before = ledger.acks
        stop = threading.Event()
        threads = [
            threading.Thread(target=writer, args=(addr, zctx, ledger, w, stop, errors))
            for w in range(6)
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 0.7))
        node.kill()
        stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive()
        assert not errors, errors
        assert ledger.acks - before >= 50, "too few writes acknowledged to test anything"
    node = start_node(procs, port, data, "--fsync", "always")
    line = READY.match(node.wait_for("zkv node"))
    assert line is not None
    reader = conns(addr)
    found = read_all(reader, sorted(ledger.acked))
    ledger.check(found)
    assert int(line["keys"]) == len(reader.call("KEYS"))
    assert set(reader.call("KEYS")) <= set(ledger.sent)


# -- 2. a flipped byte ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_corrupt_log_refuses_to_start_and_repair_keeps_the_good_prefix(
    procs: Procs, tmp_path: Path, conns: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    node = start_node(procs, port, data, "--fsync", "no")
    c = conns(addr)
    keys = [b"key-%03d" % i for i in range(100)]
    for k in keys:
        assert c.call("SET", k, k * 3) == "OK"
    assert node.stop() == 0

    log = data / "wal-00000001.log"
    offsets = [off for off, _ in wal.LogScan(log.read_bytes())]
    assert len(offsets) == 100
    mid = offsets[50]
    raw = bytearray(log.read_bytes())
    raw[mid + wal.HEADER_SIZE + 4] ^= 0x01
    log.write_bytes(bytes(raw))

    code, output = start_failing(procs, port, data)
    assert code != 0
    assert str(log) in output
    assert f"offset {mid}" in output
    assert "--repair" in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) <= 3, output

    node = start_node(procs, port, data, "--repair")
    assert str(log) in node.output and str(mid) in node.output
    line = READY.match(node.wait_for("zkv node"))
    assert line is not None and int(line["keys"]) == 50
    c = conns(addr)
    found = read_all(c, keys)
    assert found == {k: (k * 3 if i < 50 else None) for i, k in enumerate(keys)}
    assert c.call("SET", b"after", b"repair") == "OK"
    assert node.stop() == 0
    assert (data / f"wal-00000001.log.corrupt-{mid}").exists()

    node = start_node(procs, port, data)  # no --repair needed any more
    c = conns(addr)
    assert c.call("GET", b"after") == b"repair"
    assert c.call("GET", keys[49]) == keys[49] * 3
    assert "Traceback" not in node.output


@pytest.mark.timeout(30)
def test_torn_tail_is_cut_with_a_warning(procs: Procs, tmp_path: Path, conns: Any) -> None:
    port, data, addr = node_place(tmp_path)
    node = start_node(procs, port, data)
    c = conns(addr)
    for i in range(20):
        c.call("SET", b"k%d" % i, b"v%d" % i)
    assert node.stop() == 0
    log = data / "wal-00000001.log"
    good = log.stat().st_size
    with open(log, "ab") as f:
        f.write(wal.encode((wal.SET, b"torn", b"x" * 50))[:30])
    node = start_node(procs, port, data)
    assert f"{log}.torn-{good}" in node.output
    assert "WARNING" in node.output
    c = conns(addr)
    assert c.call("GET", b"k19") == b"v19" and c.call("GET", b"torn") is None
    assert Path(f"{log}.torn-{good}").stat().st_size == 30


# -- 3. snapshots --------------------------------------------------------------------


def pipelined_sets(conn: Conn, items: list[tuple[bytes, bytes]], ledger: Ledger | None = None,
                   window: int = 64) -> None:
    """SET every pair, keeping up to ``window`` requests in flight."""
    inflight: dict[int, tuple[bytes, bytes]] = {}
    it = iter(items)
    done = False
    while not done or inflight:
        while not done and len(inflight) < window:
            pair = next(it, None)
            if pair is None:
                done = True
                break
            if ledger:
                ledger.on_send(*pair)
            inflight[conn.send("SET", *pair)] = pair
        if inflight:
            tag, item = conn.recv()
            pair = inflight.pop(tag)
            assert item == [P.OK, "OK"], item
            if ledger:
                ledger.on_ack(*pair)


@pytest.mark.timeout(40)
def test_snapshots_bound_the_files_and_restart_gives_the_same_map(
    procs: Procs, tmp_path: Path, conns: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    min_bytes = 32 * 1024
    cfg = write_config(tmp_path / "zkv.yaml", port, fsync="everysec",
                       snapshot_min_bytes=min_bytes, snapshot_factor=2)
    node = start_with_config(procs, cfg, port, data)
    c = conns(addr)
    keys = [b"key-%02d" % i for i in range(30)]
    expected: dict[bytes, bytes] = {}
    peak = 0
    written = 0
    for round_ in range(60):
        batch = [(k, b"%04d-" % round_ + os.urandom(50)) for k in keys for _ in range(10)]
        pipelined_sets(c, batch)
        expected.update(batch)
        written += sum(len(k) + len(v) for k, v in batch)
        peak = max(peak, data_bytes(data))
        # Writes go on during a snapshot (within a round), but a round does not start
        # while one runs: the log also grows by what is written while a snapshot is in
        # flight, and a slow fsync must not turn that into a flaky bound.
        deadline = time.monotonic() + 10
        while c.call("INFO")["snapshot_running"]:
            assert time.monotonic() < deadline, "snapshot did not finish"
            time.sleep(0.002)
    info = c.call("INFO")
    live = info["live_bytes"]
    assert live == sum(len(k) + len(v) for k, v in expected.items())
    assert info["snapshots_written"] >= 5, info
    assert written > 20 * (live + min_bytes)
    bound = 4 * (live + min_bytes)
    assert peak <= bound, (peak, bound)
    assert read_all(c, keys) == expected

    assert node.stop() == 0
    assert data_bytes(data) <= bound
    assert len(list(data.glob("snap-*.zkv"))) == 1
    node = start_with_config(procs, cfg, port, data)
    c = conns(addr)
    assert sorted(c.call("KEYS")) == keys
    assert read_all(c, keys) == expected
    line = READY.match(node.wait_for("zkv node"))
    assert line is not None and int(line["keys"]) == len(keys)


@pytest.mark.timeout(60)
def test_kill_9_during_snapshots_keeps_every_acknowledged_write(
    procs: Procs, tmp_path: Path, conns: Any, zctx: zmq.Context[Any]
) -> None:
    port, data, addr = node_place(tmp_path)
    # About 1 MB of live data so a snapshot takes a while; snapshots start as soon as
    # the log is 1.5x the live data.
    cfg = write_config(tmp_path / "zkv.yaml", port, fsync="no",
                       snapshot_min_bytes=64 * 1024, snapshot_factor=1.5)
    keys = [b"key-%04d" % i for i in range(1000)]
    ledger = Ledger()
    rng = random.Random(99)
    mid_snapshot = 0
    errors: list[str] = []
    for cycle in range(5):
        node = start_with_config(procs, cfg, port, data)
        c = conns(addr)
        if cycle:
            ledger.check(read_all(c, keys))
        stop = threading.Event()

        def load(stop: threading.Event = stop, cycle: int = cycle) -> None:
            conn = Conn(zctx, addr, timeout_ms=1000)
            n = 0
            try:
                while not stop.is_set():
                    start = rng.randrange(len(keys))
                    batch = [(keys[(start + j) % len(keys)], b"%d-%d-" % (cycle, n) + b"x" * 1000)
                             for j in range(64)]
                    n += 1
                    pipelined_sets(conn, batch, ledger, window=64)
            except zmq.Again:
                pass  # the node was killed with requests in flight
            except Exception as exc:  # noqa: BLE001 -- reported by the test
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

        t = threading.Thread(target=load)
        t.start()
        time.sleep(rng.uniform(0.1, 0.4))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if c.call("INFO")["snapshot_running"]:
                mid_snapshot += 1
                break
            time.sleep(0.001)
        node.kill()
        stop.set()
        t.join(10)
        assert not t.is_alive()
        assert not errors, errors
    leftovers = list(data.glob("*.tmp"))
    node = start_with_config(procs, cfg, port, data)
    c = conns(addr)
    ledger.check(read_all(c, keys))
    assert set(c.call("KEYS")) <= set(keys)
    assert mid_snapshot >= 3, "the kills did not land while snapshots were running"
    # the restarted node may start a snapshot of its own at once, under the same temp
    # name as a crashed one; once it is done, no temp file may be left
    deadline = time.monotonic() + 20
    while c.call("INFO")["snapshot_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in leftovers if p.exists()]  # a crashed snapshot's temp file is gone
    assert node.stop() == 0  # waits for a snapshot it may have started
    assert not list(data.glob("*.tmp"))


# -- 4. bad input ------------------------------------------------------------------


LIMITS = {"max_key_bytes": 256, "max_value_bytes": 2 * 1024 * 1024, "max_batch": 100,
          "max_frames": 8, "max_message_bytes": 4 * 1024 * 1024}


def error_code(reply: list[bytes]) -> str:
    item = cbor2.loads(reply[-1])
    assert isinstance(item, list) and len(item) == 3 and item[0] == P.ERR, item
    assert isinstance(item[2], str) and item[2], item
    return str(item[1])


@pytest.mark.timeout(30)
def test_bad_input_gets_error_replies_and_the_node_keeps_serving(
    procs: Procs, tmp_path: Path, raw: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    cfg = write_config(tmp_path / "zkv.yaml", port, limits=LIMITS)
    start_with_config(procs, cfg, port, data)
    bad = raw(addr)
    assert bad.call("SET", b"keep", b"me") == "OK"

    enc = cbor2.dumps
    cases: list[tuple[str, list[bytes], str]] = [
        ("garbage", [b"\xff\xfe\x00garbage"], "BAD_REQUEST"),
        ("empty body", [b""], "BAD_REQUEST"),
        ("truncated CBOR", [enc(["SET", b"k", b"v"])[:-2]], "BAD_REQUEST"),
        ("key of wrong type", [enc(["GET", 5])], "BAD_REQUEST"),
        ("null key", [enc(["GET", None])], "BAD_REQUEST"),
        ("a map, not an array", [enc({"a": 1})], "BAD_REQUEST"),
        ("a bare string", [enc("GET")], "BAD_REQUEST"),
        ("empty array", [enc([])], "BAD_REQUEST"),
        ("op of wrong type", [enc([5, b"k"])], "BAD_REQUEST"),
        ("missing argument", [enc(["SET", b"k"])], "BAD_REQUEST"),
        ("extra argument", [enc(["GET", b"k", b"x"])], "BAD_REQUEST"),
        ("MSET odd", [enc(["MSET", [b"a", b"1", b"b"]])], "BAD_REQUEST"),
        ("MGET not a list", [enc(["MGET", b"k"])], "BAD_REQUEST"),
        ("value of wrong type", [enc(["SET", b"k", [1, 2]])], "BAD_REQUEST"),
        ("unknown op", [enc(["FLY", b"k"])], "UNKNOWN_COMMAND"),
        ("unknown op, binary", [enc([b"\x00\xff", b"k"])], "UNKNOWN_COMMAND"),
        ("oversize key", [enc(["SET", b"k" * 257, b"v"])], "TOO_LARGE"),
        ("oversize key in GET", [enc(["GET", b"k" * 257])], "TOO_LARGE"),
        ("oversize value", [enc(["SET", b"big", b"v" * (2 * 1024 * 1024 + 1)])], "TOO_LARGE"),
        ("oversize value in MSET",
         [enc(["MSET", [b"m1", b"ok", b"m2", b"v" * (2 * 1024 * 1024 + 1)]])], "TOO_LARGE"),
        ("batch over the limit", [enc(["MGET", [b"k%d" % i for i in range(101)]])], "TOO_LARGE"),
        ("too many frames", [b"x"] * 7 + [enc(["PING"])], "BAD_REQUEST"),
    ]
    for name, frames, code in cases:
        bad.send(*frames)
        reply = bad.recv()
        assert error_code(reply) == code, name
        if len(frames) == 1:
            assert len(reply) == 1, name

    # Nothing of the refused writes was applied, and everyone is still served.
    assert bad.call("GET", b"big") is None
    assert bad.call("EXISTS", b"m1") == 0
    assert bad.call("GET", b"keep") == b"me"
    # A message over max_message_bytes is dropped by ZeroMQ (the peer is cut off) ...
    huge = raw(addr, timeout_ms=500)
    huge.send(enc(["SET", b"huge", b"h" * (5 * 1024 * 1024)]))
    # ... and the node goes on serving a fresh, normal client.
    good = raw(addr)
    assert good.call("PING") == "PONG"
    assert good.call("SET", b"k", b"v") == "OK"
    assert good.call("GET", b"k") == b"v"
    assert good.call("GET", b"huge") is None
    info = good.call("INFO")
    assert info["errors"] >= len(cases)


@pytest.mark.timeout(30)
def test_keys_and_values_are_binary_safe_and_durable(
    procs: Procs, tmp_path: Path, raw: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    node = start_node(procs, port, data, "--fsync", "always")
    c = raw(addr)
    big = os.urandom(1 << 20)
    pairs = {
        b"\x00": b"\x00\x00",
        b"nul\x00inside": b"v\x00v",
        b"line\nbreak\r\n": b"multi\nline\nvalue\n",
        b"with spaces ": b" leading and trailing ",
        "ключ-✓-鍵".encode(): "значение ✓ 値".encode(),
        bytes(range(256)): bytes(range(255, -1, -1)),
        b"empty-value": b"",
        b"big": big,
    }
    for k, v in pairs.items():
        assert c.call("SET", k, v) == "OK"
    assert c.call("SET", "text-key ✓", "text value ✓") == "OK"  # CBOR text is UTF-8 bytes
    pairs["text-key ✓".encode()] = "text value ✓".encode()
    for k, v in pairs.items():
        assert c.call("GET", k) == v, k
        assert c.call("EXISTS", k) == 1
    assert c.call("MGET", list(pairs)) == list(pairs.values())
    assert sorted(c.call("KEYS")) == sorted(pairs)
    assert node.stop() == 0
    start_node(procs, port, data)
    c = raw(addr)
    assert c.call("MGET", list(pairs)) == list(pairs.values())


@pytest.mark.timeout(30)
def test_commands(procs: Procs, tmp_path: Path, raw: Any) -> None:
    port, data, addr = node_place(tmp_path)
    start_node(procs, port, data, "--fsync", "everysec")
    c = raw(addr)
    assert c.call("PING") == "PONG"
    assert c.call("GET", b"a") is None
    assert c.call("SET", b"a", b"1") == "OK"
    assert c.call("MSET", [b"b", b"2", b"c", b"3"]) == "OK"
    assert c.call("MGET", [b"a", b"nope", b"c"]) == [b"1", None, b"3"]
    assert c.call("DEL", b"a") == 1
    assert c.call("DEL", b"a") == 0
    assert c.call("EXISTS", b"a") == 0
    assert sorted(c.call("KEYS")) == [b"b", b"c"]
    info = c.call("INFO")
    for field in ("keys", "live_bytes", "rss_bytes", "log_bytes", "snapshot_bytes", "fsync",
                  "uptime_s", "ops"):
        assert field in info, field
    assert info["keys"] == 2 and info["fsync"] == "everysec" and info["ops"]["SET"] == 1


# -- 5. the lock and SIGTERM --------------------------------------------------------


@pytest.mark.timeout(30)
def test_second_node_on_the_same_data_dir_is_refused(
    procs: Procs, tmp_path: Path, raw: Any
) -> None:
    data = tmp_path / "shared"
    first_port = free_port()
    first = start_node(procs, first_port, data)
    c = raw(f"{HOST}:{first_port}")
    assert c.call("SET", b"k", b"v") == "OK"
    code, output = start_failing(procs, free_port(), data)
    assert code != 0
    assert str(data) in output
    assert "in use" in output and str(first.popen.pid) in output
    assert "Traceback" not in output
    assert c.call("GET", b"k") == b"v"
    assert c.call("SET", b"k2", b"v2") == "OK"


@pytest.mark.timeout(30)
def test_sigterm_exits_0_with_every_acknowledged_write_on_disk(
    procs: Procs, tmp_path: Path, conns: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    node = start_node(procs, port, data, "--fsync", "no")
    c = conns(addr)
    items = [(b"key-%d" % i, os.urandom(100)) for i in range(3000)]
    pipelined_sets(c, items)
    assert c.call("DEL", b"key-7") == 1
    node.signal(signal.SIGTERM)
    assert node.wait_exit(10) == 0
    assert "Traceback" not in node.output
    node = start_node(procs, port, data, "--fsync", "no")
    c = conns(addr)
    expected = dict(items)
    expected[b"key-7"] = None  # type: ignore[assignment]
    assert read_all(c, [k for k, _ in items]) == expected
    node.signal(signal.SIGINT)
    assert node.wait_exit(10) == 0


# -- 6. the start line ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_start_line_says_where_what_and_how_long(
    procs: Procs, tmp_path: Path, raw: Any
) -> None:
    port, data, addr = node_place(tmp_path)
    node = start_node(procs, port, data, "--fsync", "always")
    first = [ln for ln in node.lines if ln.startswith("zkv node")]
    assert len(first) == 1
    m = READY.match(first[0])
    assert m is not None, first[0]
    assert m["addr"] == addr
    assert m["dir"] == str(data)
    assert m["fsync"] == "always"
    assert int(m["keys"]) == 0
    c = raw(addr)
    for i in range(25):
        c.call("SET", b"k%d" % i, b"v")
    c.call("DEL", b"k0")
    assert node.stop() == 0
    node = start_node(procs, port, data, "--fsync", "no")
    lines = [ln for ln in node.lines if ln.startswith("zkv node")]
    assert len(lines) == 1
    m = READY.match(lines[0])
    assert m is not None, lines[0]
    assert m["fsync"] == "no"
    assert int(m["keys"]) == 24
    assert int(m["records"]) == 26
    assert 0 <= float(m["secs"]) < 5


# -- the benchmark runs --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_benchmark_quick_json(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zkv.benchmarks.node", "--quick", "--json"],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=55,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    writes = result["writes"]
    assert {(w["fsync"], w["clients"]) for w in writes} == {
        (f, n) for f in ("always", "everysec", "no") for n in (1, 32)
    }
    for w in writes:
        for field in ("node_writes_per_s", "node_pings_per_s", "baseline_writes_per_s", "ratio"):
            assert isinstance(w[field], (int, float)) and w[field] > 0, (w, field)
    replay = result["replay"]
    assert replay["records"] > 0
    for field in ("storage_records_per_s", "dict_records_per_s", "decode_records_per_s",
                  "ratio_to_dict", "ratio_to_decode"):
        assert isinstance(replay[field], (int, float)) and replay[field] > 0, field


@pytest.mark.timeout(60)
def test_a_data_dir_that_cannot_be_used_is_one_line_naming_it(procs: Procs,
                                                              tmp_path: Path) -> None:
    """A file, a path under a file, a read-only filesystem: one line, no traceback."""
    cases = [Path("/etc/passwd"), tmp_path / "file" / "sub"]
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True, text=True).returncode == 0
    if mounted:
        cases.append(ro)
    try:
        for path in cases:
            code, output = start_failing(procs, free_port(), path)
            assert code == 1, output
            assert "Traceback" not in output, output
            lines = [line for line in output.splitlines() if line.strip()]
            assert len(lines) == 1 and str(path) in lines[0], output
            if path == ro:
                assert "Read-only file system" in lines[0]
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.timeout(60)
def test_a_deleted_snapshot_refuses_to_start_instead_of_starting_empty(
        procs: Procs, tmp_path: Path, raw: Any) -> None:
    data = tmp_path / "data"
    port = free_port()
    cfg = write_config(tmp_path / "n.yaml", port, data_dir=str(data), snapshot_min_bytes=0,
                       snapshot_factor=1.5)
    node = procs.start("node", "--config", str(cfg), "--port", str(port), ready="zkv node")
    c = raw(f"{HOST}:{port}")
    for i in range(300):  # overwrites: the log outgrows the live data, so a snapshot runs
        assert c.call("SET", b"k%d" % (i % 30), b"v" * 100) == "OK"
    wait_until(lambda: list(data.glob("snap-*.zkv")), what="a snapshot")
    node.stop()
    for snap in data.glob("snap-*.zkv"):
        snap.unlink()
    proc = procs.start("node", "--config", str(cfg), "--port", str(port))
    assert proc.wait_exit(20) == 1
    assert "is missing snap-" in proc.output and "--repair" in proc.output
    assert "Traceback" not in proc.output


# -- requests that would cost far more than they weigh ------------------------------------


SMALL_MESSAGES = {"max_key_bytes": 1024, "max_value_bytes": 256 * 1024,
                  "max_message_bytes": 1 << 20}


@pytest.mark.timeout(60)
def test_a_pipeline_reply_stays_in_its_budget_and_writes_report_their_own_result(
        procs: Procs, tmp_path: Path, raw: Any) -> None:
    """40 GETs of one 200 KiB value (8 MiB) in a 1 MiB message limit: the node stops
    adding values once the budget is spent (each further one is TOO_LARGE in place),
    and the SETs around them report OK and are applied, not a whole-pipeline error."""
    port = free_port()
    cfg = write_config(tmp_path / "n.yaml", port, limits=SMALL_MESSAGES,
                       data_dir=str(tmp_path / "d"))
    procs.start("node", "--config", str(cfg), "--port", str(port), ready="zkv node")
    c = raw(f"{HOST}:{port}")
    big = b"b" * (200 * 1024)
    assert c.call("SET", b"big", big) == "OK"
    items = c.call("PIPE", [["SET", b"a", b"1"], *[["GET", b"big"]] * 40,
                            ["SET", b"b", b"2"], ["GET", b"a"], ["DEL", b"a"]])
    assert items[0] == [P.OK, "OK"]
    values = [i for i in items[1:41] if i[0] == P.OK]
    refused = [i for i in items[1:41] if i[0] == P.ERR]
    assert values and all(v == [P.OK, big] for v in values) and len(values) <= 5
    assert refused and all(r[1] == "TOO_LARGE" and "reply budget" in r[2] for r in refused)
    assert items[41] == [P.OK, "OK"] and items[42] == [P.OK, b"1"] and items[43] == [P.OK, 1]
    assert c.call("GET", b"b") == b"2" and c.call("EXISTS", b"a") == 0
    with pytest.raises(zkv.LimitExceeded, match="MGET would be over"):
        c.call("MGET", [b"big"] * 40)


@pytest.mark.timeout(60)
def test_malformed_internal_fields_are_bad_requests_never_internal(
        procs: Procs, tmp_path: Path, raw: Any) -> None:
    port = free_port()
    start_node(procs, port, tmp_path / "d")
    c = raw(f"{HOST}:{port}")
    good = {"id": "e2", "dest": "127.0.0.1:1", "pull": "tcp://127.0.0.1:1",
            "ranges": [[0, 2**64]], "batch_keys": 1000, "batch_bytes": 1 << 20, "rate": None}
    cases = [
        ("XSEND", {**good, "batch_keys": "x"}, "batch_keys"),
        ("XSEND", {**good, "batch_bytes": 0}, "batch_bytes"),
        ("XSEND", {**good, "rate": -5}, "rate"),
        ("XSEND", {**good, "rate": float("nan")}, "rate"),
        ("XSEND", {**good, "pull": "ipc:///tmp/elsewhere"}, "pull"),
        ("XSEND", {**good, "pull": "tcp://not an address"}, "pull"),
        ("XSEND", {**good, "dest": 5}, "dest"),
        ("XSEND", {**good, "id": ""}, "id"),
        ("XSEND", {**good, "ranges": [[5, 1]]}, "ranges"),
        ("XBEGIN", {"id": "e2", "ranges": "all", "purge": True}, "ranges"),
        ("XBEGIN", {"id": "e2", "ranges": [], "purge": "yes"}, "purge"),
        ("XDROP", {"id": ["e2"], "ranges": []}, "id"),
        ("XEND", {"id": 7}, "id"),
    ]
    for op, spec, field in cases:
        with pytest.raises(zkv.ProtocolError) as info:
            c.call(op, spec)
        assert str(info.value).startswith(f"{field}:"), (op, field, info.value)
    assert c.call("PING") == "PONG" and c.call("INFO")["errors"] == len(cases)


def test_an_internal_error_applies_nothing_of_its_request(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug mid-request (simulated): the reply is INTERNAL and every change the request
    had made is undone, so the client is never told "failed" about an applied write."""
    from zkv.node import Node

    node = Node(HOST, free_port(), str(tmp_path / "d"), fsync="no")
    node.recovery = node.storage.open()
    try:
        ok = node.handle([b"id", P.encode_request("SET", b"kept", b"1")])
        assert cbor2.loads(ok[0][-1]) == [P.OK, "OK"]
        real = node._handlers["MSET"]

        def half_then_bug(args: list[Any]) -> Any:
            real(args)
            raise RuntimeError("a bug after the map changed")

        monkeypatch.setitem(node._handlers, "MSET", half_then_bug)
        reply = cbor2.loads(node.handle([b"id", P.encode_request("MSET", [b"a", b"1"])])[0][-1])
        assert reply[0] == P.ERR and reply[1] == "INTERNAL"
        node.storage.commit()
        assert node.storage.keyspace.data == {b"kept": b"1"}
        assert sorted(node.storage.keyspace.buckets) == [b"kept"]
    finally:
        node.storage.close()
    reopened = Node(HOST, free_port(), str(tmp_path / "d"))
    try:
        reopened.storage.open()
        assert reopened.storage.keyspace.data == {b"kept": b"1"}
    finally:
        reopened.storage.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("args", "code", "message"), [
    (["--port", "0"], 2, "'0' is not a port number from 1 to 65535"),
    (["--port", "abc"], 2, "'abc' is not a port number"),
    (["--port", "70000"], 2, "'70000' is not a port number"),
    (["--port", "8081", "--host", ""], 2, "'' is not an address"),  # (not 127.0.0.1)
    (["--port", "8081", "--host", "no.such.host.invalid"], 1,
     "cannot listen on no.such.host.invalid: no such host"),
])
def test_command_line_mistakes_are_one_clear_line(tmp_path: Path, args: list[str], code: int,
                                                  message: str) -> None:
    for role in ("node", "proxy"):
        where = tmp_path / role
        flag = "--data-dir" if role == "node" else "--state-dir"
        done = subprocess.run([sys.executable, "-m", "zkv", role, *args, flag, str(where)],
                              capture_output=True, text=True, timeout=30, cwd=REPO)
        assert done.returncode == code, (role, done)
        assert message in done.stderr and "Traceback" not in done.stderr, (role, done)
        assert not where.exists()  # (nothing made for a start that cannot happen)
