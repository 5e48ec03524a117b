"""How fast one storage node writes and recovers, beside what the disk and Python allow.

    python -m zkv.benchmarks.node [--quick] [--json] [--seconds S] [--records N]

Writes: a real ``zkv node`` process per fsync policy; SETs of 100-byte values from
1 client (one DEALER socket, one request at a time) and from 32 clients (32 DEALER
sockets, one request in flight on each, driven by one poll loop in a separate
process, so client threads do not fight over one GIL). Baseline, same run, same
directory: appending the same framed log records to a file with the same fsync
behaviour: one write (+ fdatasync under ``always``) per record for 1 client, per
batch of 32 records for 32 clients (what group commit can at best achieve);
``everysec`` fdatasyncs once a second; ``no`` never does. For context, the same
clients then send PINGs to the same node: the request round trip alone.

Replay: a log of N SET records (1,000,000 by default) opened with
:class:`zkv.storage.Storage`, beside two baselines on the same bytes: decoding only
(:class:`zkv.core.wal.LogScan`, records not applied) and a plain dict fed the same
records already decoded (the cost of building the map alone).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from ..core import protocol as P
from ..core import wal
from ..storage import Manifest, Storage, new_identity, segment_name, write_manifest
from .harness import Children, start_node

POLICIES = ("always", "everysec", "no")
CLIENTS = (1, 32)
VALUE_BYTES = 100
KEYS_PER_CLIENT = 1000


@dataclass
class WriteResult:
    fsync: str
    clients: int
    node_writes_per_s: float
    node_pings_per_s: float  # round trips alone, same node and clients: the RPC ceiling
    baseline_writes_per_s: float
    ratio: float
    baseline: str


@dataclass
class ReplayResult:
    records: int
    keys: int
    log_bytes: int
    storage_s: float
    decode_s: float
    dict_s: float
    storage_records_per_s: float
    decode_records_per_s: float
    dict_records_per_s: float
    ratio_to_decode: float
    ratio_to_dict: float


# -- the node under load ------------------------------------------------------------


def _socket(ctx: zmq.Context[Any], addr: str) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(f"tcp://{addr}")
    return sock


def _requests(client: int, op: str) -> list[bytes]:
    if op == "PING":
        return [P.encode_request("PING")]
    value = b"v" * VALUE_BYTES
    return [P.encode_request("SET", b"c%03d-key-%04d" % (client, i), value)
            for i in range(KEYS_PER_CLIENT)]


def drive(addr: str, clients: int, seconds: float, op: str = "SET") -> tuple[int, float]:
    """Run ``clients`` closed-loop clients for ``seconds``: (requests answered, elapsed)."""
    ctx: zmq.Context[Any] = zmq.Context()
    socks = [_socket(ctx, addr) for _ in range(clients)]
    bodies = [_requests(c, op) for c in range(clients)]
    try:
        for s in socks:  # connect and warm up
            s.send_multipart([b"", P.encode_request("PING")])
            s.recv_multipart()
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(socks)}
        sent = [0] * clients
        done = 0
        start = time.perf_counter()
        stop_at = start + seconds
        for i, s in enumerate(socks):
            s.send_multipart([b"", bodies[i][0]])
            sent[i] = 1
        outstanding = clients
        while outstanding:
            for s, _ in poller.poll(10_000):
                i = index[s]
                reply = s.recv_multipart()
                if P.decode_reply(reply[-1]) not in ("OK", "PONG"):
                    raise RuntimeError(f"unexpected reply {reply!r}")
                done += 1
                if time.perf_counter() < stop_at:
                    s.send_multipart([b"", bodies[i][sent[i] % len(bodies[i])]])
                    sent[i] += 1
                else:
                    outstanding -= 1
        return done, time.perf_counter() - start
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def _drive_child(addr: str, clients: int, seconds: float, out: Any) -> None:
    sets, set_s = drive(addr, clients, seconds, "SET")
    pings, ping_s = drive(addr, clients, seconds / 3, "PING")
    out.send((sets / set_s, pings / ping_s))


def drive_in_process(addr: str, clients: int, seconds: float) -> tuple[float, float]:
    """SETs then PINGs per second, driven from a separate process so that the clients
    and their GIL are off this one (and off the node's)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_drive_child, args=(addr, clients, seconds, child))
    p.start()
    try:
        if not parent.poll(seconds + 60):
            raise RuntimeError("load generator did not report")
        result: tuple[float, float] = parent.recv()
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
    return result


def node_writes(workdir: str, fsync: str, clients: int, seconds: float) -> tuple[float, float]:
    """(SETs per second, PINGs per second) against a fresh node."""
    name = f"node-{fsync}-{clients}"
    children = Children(workdir)
    try:
        return drive_in_process(start_node(children, fsync, name), clients, seconds)
    finally:
        children.close()
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)


# -- the baseline: raw appends ----------------------------------------------------------


def raw_appends(workdir: str, fsync: str, batch: int, seconds: float) -> tuple[int, float]:
    """Append framed SET records in batches of ``batch`` with the policy's fsyncs."""
    value = b"v" * VALUE_BYTES
    records = [wal.encode((wal.SET, b"c%03d-key-%04d" % (i % batch, i), value))
               for i in range(KEYS_PER_CLIENT)]
    batches = [b"".join(records[i : i + batch]) for i in range(0, len(records), batch)]
    path = os.path.join(workdir, f"raw-{fsync}-{batch}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        done = 0
        start = time.perf_counter()
        stop_at = start + seconds
        last_sync = start
        n = 0
        while True:
            os.write(fd, batches[n % len(batches)])
            n += 1
            if fsync == "always":
                os.fdatasync(fd)
            done += batch
            now = time.perf_counter()
            if fsync == "everysec" and now - last_sync >= 1.0:
                os.fdatasync(fd)
                last_sync = now
            if now >= stop_at:
                break
        return done, time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def bench_writes(workdir: str, seconds: float) -> list[WriteResult]:
    results = []
    for fsync in POLICIES:
        for clients in CLIENTS:
            node_rate, ping_rate = node_writes(workdir, fsync, clients, seconds)
            bn, bsecs = raw_appends(workdir, fsync, clients, seconds)
            base_rate = bn / bsecs
            sync = {"always": " + fdatasync", "everysec": ", fdatasync 1/s",
                    "no": ", no fsync"}[fsync]
            results.append(WriteResult(
                fsync=fsync, clients=clients,
                node_writes_per_s=round(node_rate, 1),
                node_pings_per_s=round(ping_rate, 1),
                baseline_writes_per_s=round(base_rate, 1),
                ratio=round(node_rate / base_rate, 4),
                baseline=f"append {clients}{sync}",
            ))
    return results


# -- replay ---------------------------------------------------------------------------


def make_log(path: str, records: int, keys: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    value = b"v" * VALUE_BYTES
    with open(path, "wb") as f:
        buf = bytearray()
        for _ in range(records):
            buf += wal.encode((wal.SET, b"key-%08d" % rng.randrange(keys), value))
            if len(buf) > 1 << 20:
                f.write(buf)
                buf.clear()
        f.write(buf)
    return os.path.getsize(path)


def bench_replay(workdir: str, records: int) -> ReplayResult:
    keys = max(1, records // 4)
    data_dir = os.path.join(workdir, "replay")
    os.makedirs(data_dir)
    path = os.path.join(data_dir, segment_name(1))
    size = make_log(path, records, keys)
    write_manifest(data_dir, Manifest(None, 1, 1, new_identity()))  # (as a node leaves it)
    with open(path, "rb") as f:  # warm the page cache, as all three runs read it
        raw = f.read()

    start = time.perf_counter()
    st = Storage(data_dir, fsync="no", snapshot_min_bytes=1 << 40)
    rec = st.open()
    storage_s = time.perf_counter() - start
    st.close()
    if rec.records != records or rec.warnings:
        raise RuntimeError(f"replay found {rec.records} records, warnings {rec.warnings}")

    start = time.perf_counter()
    scan = wal.LogScan(raw)
    n = 0
    for _ in scan:
        n += 1
    decode_s = time.perf_counter() - start
    assert n == records and scan.damage is None

    items = [item for _, item in wal.LogScan(raw)]
    start = time.perf_counter()
    d: dict[bytes, bytes] = {}
    for item in items:
        d[item[1]] = item[2]
    dict_s = time.perf_counter() - start
    if len(d) != rec.keys:
        raise RuntimeError("dict and storage disagree on the number of keys")
    del items, raw
    shutil.rmtree(data_dir, ignore_errors=True)
    return ReplayResult(
        records=records, keys=len(d), log_bytes=size,
        storage_s=round(storage_s, 4), decode_s=round(decode_s, 4), dict_s=round(dict_s, 4),
        storage_records_per_s=round(records / storage_s, 1),
        decode_records_per_s=round(records / decode_s, 1),
        dict_records_per_s=round(records / dict_s, 1),
        ratio_to_decode=round(decode_s / storage_s, 4),
        ratio_to_dict=round(dict_s / storage_s, 4),
    )


# -- output ---------------------------------------------------------------------------


def show(writes: list[WriteResult], replay: ReplayResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 110:  # piped: do not wrap the tables into unreadable columns
        console = Console(width=110)
    t = Table(title="zkv node: writes per second (SET, 100-byte values)")
    for col in ("fsync", "clients", "zkv SET/s", "raw writes/s", "zkv/raw", "raw baseline",
                "zkv PING/s"):
        t.add_column(col, justify="right" if col not in ("fsync", "raw baseline") else "left",
                     no_wrap=True)
    for w in writes:
        t.add_row(w.fsync, str(w.clients), f"{w.node_writes_per_s:,.0f}",
                  f"{w.baseline_writes_per_s:,.0f}", f"{w.ratio:.3f}", w.baseline,
                  f"{w.node_pings_per_s:,.0f}")
    console.print(t)
    r = Table(title=f"replay of a {replay.records:,}-record log "
                    f"({replay.log_bytes / 1e6:.1f} MB, {replay.keys:,} keys)")
    for col in ("what", "seconds", "records/s", "zkv/this"):
        r.add_column(col, justify="left" if col == "what" else "right", no_wrap=True)
    r.add_row("zkv Storage.open (read, check, decode, apply)", f"{replay.storage_s:.3f}",
              f"{replay.storage_records_per_s:,.0f}", "1")
    r.add_row("baseline: LogScan, decode only", f"{replay.decode_s:.3f}",
              f"{replay.decode_records_per_s:,.0f}", f"{replay.ratio_to_decode:.3f}")
    r.add_row("baseline: plain dict fed the decoded records", f"{replay.dict_s:.3f}",
              f"{replay.dict_records_per_s:,.0f}", f"{replay.ratio_to_dict:.3f}")
    console.print(r)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zkv.benchmarks.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for a smoke test)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--seconds", type=float, default=None, help="per write measurement")
    parser.add_argument("--records", type=int, default=None, help="records in the replay log")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.1 if args.quick else 3.0)
    records = args.records or (20_000 if args.quick else 1_000_000)
    workdir = tempfile.mkdtemp(prefix="zkv-bench-", dir=args.dir)
    try:
        writes = bench_writes(workdir, seconds)
        replay = bench_replay(workdir, records)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({
            "quick": args.quick,
            "seconds_per_write_run": seconds,
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "writes": [asdict(w) for w in writes],
            "replay": asdict(replay),
        }, indent=2))
    else:
        show(writes, replay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
