"""How fast an ADD moves keys, beside raw PUSH/PULL, and what clients feel meanwhile.

    python -m zkv.benchmarks.rebalance [--keys N] [--json]

Move rate: a 2-node cluster (``zkv node`` processes, fsync no, and a ``zkv proxy``)
is loaded with N keys of 100 bytes (MSET batches of 1000) and gains a 3rd node;
the rate is the keys the new node holds afterwards divided by the ADD's duration
(from the ADD request until STATUS shows no move). Baseline, same run: the same
number of keys as CBOR ``[k, v, ...]`` batches of 1000 pairs, encoded in one
process, sent over a raw pyzmq PUSH socket and decoded by a PULL socket in another
process: what moving the bytes costs with nothing else (no key scan, no write-ahead
log, no fsync per batch, no proxy polling).

Latency: one client thread sends single GETs and SETs (half each, 100-byte values,
random keys of the loaded key space) through the proxy, first for a few seconds
before the move, then for as long as the move runs: p50 and p99 of each.
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
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import cbor2
import zmq

from ..client import Client
from .harness import Children, free_port, start_node, zkv_argv

VALUE_BYTES = 100
BATCH = 1000
PROBE_BEFORE_S = 3.0  # 1 s below 100,000 keys (quick runs)


@dataclass
class MoveResult:
    keys_loaded: int
    keys_moved: int
    move_s: float
    move_keys_per_s: float
    baseline_s: float
    baseline_keys_per_s: float
    ratio: float  # zkv / raw PUSH/PULL


@dataclass
class Latency:
    phase: str
    ops: int
    errors: int
    get_p50_ms: float
    get_p99_ms: float
    set_p50_ms: float
    set_p99_ms: float
    error_kinds: dict[str, int]  # the first line of each distinct error, and how often


# -- processes ----------------------------------------------------------------------------


def start_proxy(children: Children, nodes: list[str]) -> str:
    """A proxy with its default settings in front of ``nodes``."""
    port = free_port()
    args = ["proxy", "--port", str(port), "--state-dir", os.path.join(children.workdir, "proxy")]
    for n in nodes:
        args += ["--node", n]
    children.spawn("proxy", zkv_argv(*args), ready="zkv proxy")
    return f"127.0.0.1:{port}"


def key(i: int) -> bytes:
    return b"key-%08d" % i


def value(i: int) -> bytes:
    return (b"%08d" % i) * (VALUE_BYTES // 8) + b"v" * (VALUE_BYTES % 8)


def load(client: Client, keys: int) -> None:
    for start in range(0, keys, BATCH):
        client.mset({key(i): value(i) for i in range(start, min(keys, start + BATCH))})


# -- latency probe ---------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 3)


class Probe:
    """One client thread: single GETs and SETs, timed, until told to stop."""

    def __init__(self, address: str, keys: int) -> None:
        self.address = address
        self.keys = keys

    def run(self, stop: threading.Event, phase: str, max_s: float | None = None) -> Latency:
        rng = random.Random(42)
        gets: list[float] = []
        sets: list[float] = []
        errors = 0
        kinds: dict[str, int] = {}
        payload = b"p" * VALUE_BYTES
        with Client(self.address, timeout=5.0, retries=0) as c:
            end = None if max_s is None else time.perf_counter() + max_s
            while not stop.is_set() and (end is None or time.perf_counter() < end):
                k = key(rng.randrange(self.keys))
                t0 = time.perf_counter()
                try:
                    if rng.random() < 0.5:
                        c.get(k)
                        gets.append(time.perf_counter() - t0)
                    else:
                        c.set(k, payload)
                        sets.append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 -- counted, the probe goes on
                    errors += 1
                    what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    kinds[what] = kinds.get(what, 0) + 1
        return Latency(phase, len(gets) + len(sets), errors, pct(gets, 0.5), pct(gets, 0.99),
                       pct(sets, 0.5), pct(sets, 0.99), kinds)


# -- the move --------------------------------------------------------------------------------


def bench_move(workdir: str, keys: int) -> tuple[MoveResult, list[Latency]]:
    children = Children(workdir)
    try:
        nodes = [start_node(children, "no", f"node{i}") for i in (1, 2)]
        proxy = start_proxy(children, nodes)
        new = start_node(children, "no", "node3")
        with Client(proxy, timeout=30.0) as admin:
            load(admin, keys)
            probe = Probe(proxy, keys)
            before = probe.run(threading.Event(), "before the move",
                               PROBE_BEFORE_S if keys >= 100_000 else 1.0)

            stop = threading.Event()
            during: list[Latency] = []
            thread = threading.Thread(target=lambda: during.append(probe.run(stop, "during")))
            t0 = time.perf_counter()
            admin.add_node(new, wait=False)
            thread.start()
            while admin.status()["move"] is not None:
                time.sleep(0.02)
            move_s = time.perf_counter() - t0
            stop.set()
            thread.join(30)
            counts = {n["address"]: n["keys"] for n in admin.nodes()}
        moved = int(counts[new])
        if sum(counts.values()) != keys:
            raise RuntimeError(f"the cluster holds {sum(counts.values())} keys, not {keys}")
    finally:
        children.close()
    base_s = raw_push_pull(moved)
    during[0].phase = "during the move"
    return MoveResult(
        keys_loaded=keys, keys_moved=moved, move_s=round(move_s, 3),
        move_keys_per_s=round(moved / move_s, 1), baseline_s=round(base_s, 3),
        baseline_keys_per_s=round(moved / base_s, 1),
        ratio=round((moved / move_s) / (moved / base_s), 4),
    ), [before, during[0]]


# -- the baseline: raw PUSH/PULL ---------------------------------------------------------------


def _puller(endpoint: str, batches: int, out: Any) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.setsockopt(zmq.RCVTIMEO, 60_000)
    pull.connect(endpoint)
    out.send("ready")
    got = 0
    for _ in range(batches):
        got += len(cbor2.loads(pull.recv())) // 2
    out.send(got)
    pull.close(0)
    ctx.term()


def raw_push_pull(keys: int) -> float:
    """Seconds to encode, send, receive and decode ``keys`` pairs in batches of BATCH."""
    ctx: zmq.Context[Any] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, 4)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe(duplex=False)
    batches = (keys + BATCH - 1) // BATCH
    p = spawn.Process(target=_puller, args=(f"tcp://127.0.0.1:{port}", batches, child))
    p.start()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError("the PULL process did not start")
        time.sleep(0.2)  # let it connect
        t0 = time.perf_counter()
        for start in range(0, keys, BATCH):
            pairs = [x for i in range(start, min(keys, start + BATCH)) for x in (key(i), value(i))]
            push.send(cbor2.dumps(pairs))
        if not parent.poll(120):
            raise RuntimeError("the PULL process did not finish")
        got = parent.recv()
        elapsed = time.perf_counter() - t0
        if got != keys:
            raise RuntimeError(f"PULL received {got} keys, not {keys}")
        return elapsed
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
        push.close(0)
        ctx.term()


# -- output ------------------------------------------------------------------------------------


def show(move: MoveResult, latency: list[Latency]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 100:
        console = Console(width=100)
    t = Table(title=f"ADD: 2 nodes -> 3, {move.keys_loaded:,} keys of {VALUE_BYTES} bytes")
    for col in ("what", "keys", "seconds", "keys/s", "zkv/this"):
        t.add_column(col, justify="left" if col == "what" else "right", no_wrap=True)
    t.add_row("zkv ADD (scan, PUSH/PULL, WAL + fsync per batch)", f"{move.keys_moved:,}",
              f"{move.move_s:.3f}", f"{move.move_keys_per_s:,.0f}", "1")
    t.add_row(f"baseline: raw pyzmq PUSH/PULL, CBOR batches of {BATCH}", f"{move.keys_moved:,}",
              f"{move.baseline_s:.3f}", f"{move.baseline_keys_per_s:,.0f}",
              f"{move.ratio:.3f}")
    console.print(t)
    lt = Table(title="one client, single GET/SET through the proxy (ms)")
    for col in ("when", "ops", "errors", "GET p50", "GET p99", "SET p50", "SET p99"):
        lt.add_column(col, justify="left" if col == "when" else "right", no_wrap=True)
    for lat in latency:
        lt.add_row(lat.phase, f"{lat.ops:,}", str(lat.errors), f"{lat.get_p50_ms:.3f}",
                   f"{lat.get_p99_ms:.3f}", f"{lat.set_p50_ms:.3f}", f"{lat.set_p99_ms:.3f}")
    console.print(lt)
    for lat in latency:
        for what, n in sorted(lat.error_kinds.items(), key=lambda kv: -kv[1]):
            console.print(f"  {lat.phase}: {n} x {what}", markup=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zkv.benchmarks.rebalance",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys loaded before the ADD")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.keys < 1:
        parser.error("--keys must be at least 1")
    workdir = tempfile.mkdtemp(prefix="zkv-bench-rebalance-", dir=args.dir)
    try:
        move, latency = bench_move(workdir, args.keys)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps({
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "value_bytes": VALUE_BYTES,
            "batch_keys": BATCH,
            "move": asdict(move),
            "latency": [asdict(lat) for lat in latency],
        }, indent=2))
    else:
        show(move, latency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
