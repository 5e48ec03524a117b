"""``zkv bench``: zkv's throughput and latency beside its baselines, in one run.

    zkv bench [-t set,get,mset,mget,incr,setex] [-n REQUESTS] [-c CLIENTS] [-P PIPELINE] [--window]
              [-d VALUE_BYTES] [-r KEYSPACE] [--json] [--proxy HOST:PORT] [--compare]
              [--fsync everysec|always|no] [--nodes 3] [--workers W]
              [--curve] [--follower] [--memory [KEYS]] [--recovery [RECORDS]]

Without ``--proxy`` the bench starts its own cluster (``--nodes`` nodes and a proxy,
``python -m zkv node/proxy`` on free loopback ports, data in a temporary directory)
and kills it at the end, on Ctrl-C and on errors too. ``--compare`` runs the same
workload against each target in turn and prints zkv's ratio to each:

    zkv          through the proxy
    zkv-direct   the direct-routing client (``Client(direct=True)``): straight to each
                 key's node of the same cluster, routed on the client
    direct       the same client straight to one storage node (the proxy's cost)
    floor        raw pyzmq: the same messages, byte for byte in size, through a C-level
                 ``zmq.proxy(ROUTER, DEALER)`` device (its own process) to an echo worker
                 (its own process) that answers with a body of the size zkv answers
    floor-1hop   the same without the device
    redis        redis-server (appendonly, appendfsync = --fsync) through redis-py

``--follower`` starts a follower proxy of the same cluster (``zkv proxy --follow``)
and runs each test through it too: the row ``zkv-follower``; ``ratios_follower`` is
its throughput over the config manager's (the ``zkv`` row).

``--curve`` makes CURVE keys in the bench's directory (zkv.security.keygen: a cluster
key, and a client key in a clients directory) and starts a second cluster with CURVE on
every link, beside the plain one: the row ``zkv-curve`` runs each test through its
proxy, every load client with the client key; ``ratios_curve`` is its throughput over
the plain ``zkv`` row's. With ``--compare`` it also runs ``floor-curve`` and
``floor-1hop-curve``, the floors with CURVE on each link (libzmq's encryption alone,
no Python on the path beyond the echo), and their ratios to the plain floors.

How the load is generated, so that the figures describe the servers:

- The bench's own process only draws the progress display; the load comes from
  ``--workers`` separate processes (default: 1 for one client, else 2, this being a
  2-core design target), each driving its share of the ``-c`` clients.
- One client (``-c 1``) is a real :class:`zkv.Client`. At ``-P 1`` it makes one call at
  a time (``set``/``get``/``mset``/``mget``). At ``-P N`` GET and SET go through
  ``Client.pipeline()``: one PIPE message of N commands per round trip. MSET and MGET,
  which a pipeline does not carry, and every test with ``--window``, go through
  ``Client.call_many``: N separate requests in flight at once.
- ``--direct`` (and the ``zkv-direct`` row of ``--compare``) runs the same client with
  ``direct=True``; several direct clients are threads in each worker (each routes on
  its own), so its figures at ``-c > 1`` are a lower bound, as redis-py's are.
- Several clients (``-c N``) are N DEALER sockets, spread over the workers, each driven
  by one poll loop per worker (as redis-benchmark drives its connections from one
  event loop; Python threads would be held back by the GIL). Each socket does what a
  Client does: it encodes each round with :mod:`zkv.core.protocol`, keeps that round in
  flight (one request, one PIPE, or N requests with ``--window``) and decodes the replies.
- The floor uses the same client code without encoding or decoding: the Client's own
  socket exchange (``_exchange``/``_exchange_many``) for one client, the same poll
  loop for several.
- redis: redis-py, a ``pipeline(transaction=False)`` of N commands at ``-P N`` (also
  with ``--window``, redis-py has nothing closer); several clients are threads in each
  worker, since redis-py is synchronous, so redis figures at ``-c > 1`` are a lower bound.
- Latency is per round trip: one request at ``-P 1``, the whole batch of N otherwise.
  ``ops/s`` counts commands: an MSET of 10 keys (always 10 keys, as redis-benchmark
  does) is one. ``-n`` is rounded up to whole rounds.
- Keys are ``key:%012d``, uniformly random (seeded) over ``-r`` keys; values are ``-d``
  bytes. Before a read test the key space is filled (untimed) so every read hits.

``--memory [KEYS]``: resident bytes per key of KEYS 100-byte values across the
cluster (sum of the nodes' INFO ``rss_bytes``, after minus before) beside a bare dict
holding the same keys and values in a fresh Python process (its RSS, after minus
before). ``--recovery [RECORDS]``: :func:`zkv.benchmarks.node.bench_replay`, the replay
of a log of RECORDS SET records beside decoding the same records without applying them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import queue
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .benchmarks.harness import (
    REPLY_TIMEOUT,
    Children,
    CurveKeys,
    free_port,
    redis_available,
    start_cluster,
    start_follower,
    start_node,
    start_redis,
)
from .core import protocol as P
from .errors import ConfigError, NotSent, Unavailable, ZkvError

TESTS = ("set", "get", "mset", "mget", "incr", "setex")
DEFAULT_TESTS = TESTS[:4]
SETEX_SECONDS = 3600  # the deadline of the setex test's keys
KEYS_PER_MULTI = 10
TARGETS = ("zkv", "zkv-direct", "direct", "floor", "floor-1hop", "redis")
BASELINES = TARGETS[2:]  # what the zkv rows are divided by
CURVE_SUFFIX = "-curve"  # zkv bench --curve: a row with CURVE beside each plain one
PIPE_CHUNK = 512  # = zkv.client.PIPELINE_CHUNK: commands per PIPE message
_TAG = struct.Struct("<Q")


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    tests: tuple[str, ...] = DEFAULT_TESTS
    requests: int = 100_000
    clients: int = 1
    pipeline: int = 1
    window: bool = False
    value_bytes: int = 100
    keyspace: int = 100_000
    workers: int = 1
    fsync: str = "everysec"
    nodes: int = 3
    proxy: str | None = None
    direct: bool = False
    compare: bool = False
    resp: bool = False
    metrics: bool = False
    replicas: int = 0  # also a cluster with this many replicas per shard (zkv-replicas)
    curve: bool = False  # also a cluster with CURVE on (zkv-curve)
    follower: bool = False  # also through a follower proxy of the cluster (zkv-follower)
    failovers: int = 3  # with replicas: how many failovers to time
    memory: int | None = None
    recovery: int | None = None
    seed: int = 1

    @property
    def latency_unit(self) -> str:
        if self.pipeline == 1:
            return "request"
        return f"round trip of {self.pipeline} commands"

    def how(self, test: str) -> str:
        """How the client sends a round of this test (for the output)."""
        if self.pipeline == 1:
            return "one request at a time"
        if self.window or test in ("mset", "mget"):
            return f"{self.pipeline} requests in flight (call_many)"
        return f"PIPE messages of {min(self.pipeline, PIPE_CHUNK)} commands (pipeline)"


@dataclass
class Result:
    target: str
    test: str
    ops_per_sec: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    requests: int
    errors: int


# -- the workload -------------------------------------------------------------------


def key_pool(keyspace: int) -> list[bytes]:
    return [b"key:%012d" % i for i in range(keyspace)]


def commands(test: str, keys: Iterator[bytes], value: bytes, count: int) -> list[list[Any]]:
    """``count`` commands of a test as ``[op, *args]``, taking keys from ``keys``."""
    out: list[list[Any]] = []
    for _ in range(count):
        if test == "set":
            out.append(["SET", next(keys), value])
        elif test == "get":
            out.append(["GET", next(keys)])
        elif test == "incr":
            out.append(["INCR", next(keys)])
        elif test == "setex":
            out.append(["SET", next(keys), value, {"ex": SETEX_SECONDS}])
        elif test == "mset":
            out.append(["MSET", [x for _ in range(KEYS_PER_MULTI) for x in (next(keys), value)]])
        else:
            out.append(["MGET", [next(keys) for _ in range(KEYS_PER_MULTI)]])
    return out


def uses_pipe(test: str, pipeline: int, window: bool) -> bool:
    """Whether a round is PIPE messages (else separate requests)."""
    return pipeline > 1 and not window and test in ("set", "get", "incr", "setex")


_bench_client: tuple[int, bytes] | None = None  # (pid, id): each client process its own
_bench_seq = itertools.count(1)


def _tag(cmd: list[Any]) -> list[Any]:
    """A write as zkv.Client sends it: tagged with a client id (one per process, as
    sequence numbers are) and the next sequence number, for safe retries (zkv.core.once)."""
    global _bench_client
    if cmd[0] not in P.WRITE_OPS:
        return cmd
    if _bench_client is None or _bench_client[0] != os.getpid():
        _bench_client = (os.getpid(), os.urandom(16))
    return ["ONCE", _bench_client[1], next(_bench_seq), cmd]


def round_bodies(cmds: list[list[Any]], pipe: bool) -> list[bytes]:
    """The request bodies of one round, as zkv.Client would encode them."""
    if pipe:
        return [P.encode_request("PIPE", [_tag(c) for c in cmds[i : i + PIPE_CHUNK]])
                for i in range(0, len(cmds), PIPE_CHUNK)]
    return [P.encode_request(*_tag(c)) for c in cmds]


def reply_body(test: str, pipeline: int, window: bool, value: bytes) -> bytes:
    """The reply body zkv sends for one message of a test (what the floor echoes)."""
    single: Any = {"set": "OK", "get": value, "mset": "OK", "mget": [value] * KEYS_PER_MULTI,
                   "incr": 1, "setex": "OK"}[test]
    if uses_pipe(test, pipeline, window):
        return P.encode_ok([P.reply_item(single)] * min(pipeline, PIPE_CHUNK))
    return P.encode_ok(single)


def reply_errors(body: bytes, pipe: bool) -> int:
    """How many commands of one reply failed."""
    try:
        result = P.decode_reply(body)
    except ZkvError:
        return 1
    if pipe:
        return sum(1 for item in result if not (isinstance(item, list) and item[:1] == [P.OK]))
    return 0


# -- the load generator (runs in worker processes) -----------------------------------


@dataclass(frozen=True)
class Job:
    """What one worker process does: its clients' rounds of one test on one target."""

    kind: str  # "zkv" (encode, decode), "echo" (fixed bodies) or "redis"
    address: str
    test: str
    pipeline: int
    window: bool
    value_bytes: int
    keyspace: int
    clients: tuple[int, ...]  # client numbers (they seed the key choice)
    rounds: tuple[int, ...]  # rounds per client
    use_client: bool  # one client in all: the real zkv.Client
    seed: int
    echo_bodies: tuple[bytes, ...] = ()
    direct: bool = False  # zkv.Client(direct=True): routed on the client
    curve: CurveKeys | None = None  # CURVE on: every client's socket uses the client key


@dataclass
class Tally:
    latencies: array[float] = field(default_factory=lambda: array("d"))
    ops: int = 0
    errors: int = 0
    start: float = 0.0
    end: float = 0.0


def client_keys(job: Job, client: int, pool: list[bytes]) -> Iterator[bytes]:
    per_round = job.pipeline * (KEYS_PER_MULTI if job.test in ("mset", "mget") else 1)
    rng = random.Random(job.seed * 1_000_003 + client)
    count = job.rounds[job.clients.index(client)] * per_round
    return iter(rng.choices(pool, k=count))


def worker_main(job: Job, slot: int, progress: Any, barrier: Any, out: Any) -> None:
    """Entry point of a load-generating process; puts its Tally (or an error) on ``out``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends us
    try:
        tally = Tally()
        pool = key_pool(job.keyspace)
        keys = {c: client_keys(job, c, pool) for c in job.clients}
        if job.kind == "redis":
            run = _prepare_redis(job, keys, tally)
        elif job.direct and not job.use_client:
            run = _prepare_threads(job, keys, tally)
        elif job.use_client:
            run = _prepare_client(job, keys[job.clients[0]], tally)
        else:
            run = _prepare_poll(job, keys, tally)

        def count(ops: int) -> None:
            progress[slot] = ops

        barrier.wait(60)
        tally.start = time.perf_counter()
        run(count)
        tally.end = time.perf_counter()
        out.put((slot, tally))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        out.put((slot, f"{type(exc).__name__}: {exc}"))
        with contextlib.suppress(OSError, ValueError):
            barrier.abort()


def _prepare_client(job: Job, keys: Iterator[bytes], tally: Tally) -> Callable[..., None]:
    """One synchronous zkv.Client (or, for the floor, its bare socket exchange)."""
    from .client import Client

    curve = job.curve
    client = Client(job.address, timeout=REPLY_TIMEOUT, retries=0, direct=job.direct,
                    curve_key=curve.client if curve else None,
                    server_key=curve.cluster if curve else None)
    deadline = time.monotonic() + 10.0
    while True:  # the target may still be starting: a refused connection is tried again
        try:
            client.ping() if job.kind == "zkv" else client._exchange(job.echo_bodies[0])
            break
        except NotSent:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    value = b"x" * job.value_bytes
    pipe = uses_pipe(job.test, job.pipeline, job.window)
    rounds = job.rounds[0]
    lat = tally.latencies
    clock = time.perf_counter

    if job.kind == "echo":
        bodies = list(job.echo_bodies)

        def one_round() -> int:
            if len(bodies) == 1:
                client._exchange(bodies[0])
                return 0
            return sum(not isinstance(r, bytes) for r in client._exchange_many(bodies))
    elif job.pipeline == 1:
        call: Callable[[], Any] = {
            "set": lambda: client.set(next(keys), value),
            "get": lambda: client.get(next(keys)),
            "incr": lambda: client.incr(next(keys)),
            "setex": lambda: client.set(next(keys), value, ex=SETEX_SECONDS),
            "mset": lambda: client.mset({next(keys): value for _ in range(KEYS_PER_MULTI)}),
            "mget": lambda: client.mget([next(keys) for _ in range(KEYS_PER_MULTI)]),
        }[job.test]

        def one_round() -> int:
            try:
                call()
            except ZkvError:
                return 1
            return 0
    elif pipe:
        def one_round() -> int:
            with client.pipeline() as p:
                if job.test == "set":
                    for _ in range(job.pipeline):
                        p.set(next(keys), value)
                elif job.test == "incr":
                    for _ in range(job.pipeline):
                        p.incr(next(keys))
                elif job.test == "setex":
                    for _ in range(job.pipeline):
                        p.set(next(keys), value, ex=SETEX_SECONDS)
                else:
                    for _ in range(job.pipeline):
                        p.get(next(keys))
                results = p.execute(raise_on_error=False)
            return sum(isinstance(r, ZkvError) for r in results)
    else:
        def one_round() -> int:
            cmds = commands(job.test, keys, value, job.pipeline)
            results = client.call_many([(c[0], c[1:]) for c in cmds])
            return sum(isinstance(r, ZkvError) for r in results)

    def run(count: Callable[[int], None]) -> None:
        try:
            for _ in range(rounds):
                t = clock()
                try:
                    tally.errors += one_round()
                except ZkvError:
                    tally.errors += job.pipeline
                lat.append(clock() - t)
                tally.ops += job.pipeline
                count(tally.ops)
        finally:
            client.close()

    return run


def _prepare_threads(job: Job, keys: dict[int, Iterator[bytes]], tally: Tally
                     ) -> Callable[..., None]:
    """Several direct-routing clients: a zkv.Client each, each in a thread of its own."""
    from dataclasses import replace

    tallies = [Tally() for _ in job.clients]
    runs = [_prepare_client(replace(job, clients=(c,), rounds=(r,), use_client=True),
                            keys[c], t)
            for c, r, t in zip(job.clients, job.rounds, tallies)]

    def run(count: Callable[[int], None]) -> None:
        done = [0] * len(runs)
        failures: list[BaseException] = []

        def drive(i: int) -> None:
            def counted(ops: int) -> None:
                done[i] = ops
                count(sum(done))

            try:
                runs[i](counted)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the worker
                failures.append(exc)

        threads = [threading.Thread(target=drive, args=(i,), daemon=True)
                   for i in range(len(runs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        for part in tallies:
            tally.latencies.extend(part.latencies)
            tally.ops += part.ops
            tally.errors += part.errors

    return run


def _prepare_poll(job: Job, keys: dict[int, Iterator[bytes]], tally: Tally) -> Callable[..., None]:
    """Several clients: one DEALER socket each, all driven by one poll loop."""
    import zmq

    ctx = zmq.Context()
    value = b"x" * job.value_bytes
    pipe = uses_pipe(job.test, job.pipeline, job.window)
    decode = job.kind == "zkv"
    curve = job.curve.for_client() if job.curve else None
    socks: list[Any] = []
    for _ in job.clients:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            curve.connect(s)
        s.connect(f"tcp://{job.address}")
        socks.append(s)
    for s in socks:  # connected and answering before the clock starts
        hello = P.encode_request("PING") if decode else job.echo_bodies[0]
        s.send_multipart([b"", b"hello", hello])
    for s in socks:
        if not s.poll(int(REPLY_TIMEOUT * 1000)):
            raise Unavailable(f"no reply from {job.address}")
        s.recv_multipart()
    index = {s: i for i, s in enumerate(socks)}
    left = list(job.rounds)
    outstanding = [0] * len(socks)
    started = [0.0] * len(socks)
    client_keys_ = [keys[c] for c in job.clients]
    seq = [0]
    clock = time.perf_counter

    def send_round(i: int) -> None:
        if decode:
            bodies = round_bodies(commands(job.test, client_keys_[i], value, job.pipeline), pipe)
        else:
            bodies = list(job.echo_bodies)
        sock = socks[i]
        started[i] = clock()
        for body in bodies:
            seq[0] += 1
            sock.send_multipart([b"", _TAG.pack(seq[0]), body])
        outstanding[i] = len(bodies)
        left[i] -= 1

    def run(count: Callable[[int], None]) -> None:
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        active = 0
        for i in range(len(socks)):
            if left[i]:
                send_round(i)
                active += 1
        lat = tally.latencies
        try:
            while active:
                events = poller.poll(int(REPLY_TIMEOUT * 1000))
                if not events:
                    tally.errors += job.pipeline * sum(1 for o in outstanding if o)
                    break
                for sock, _ in events:
                    i = index[sock]
                    while outstanding[i]:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if decode:
                            tally.errors += reply_errors(frames[-1], pipe)
                        outstanding[i] -= 1
                    if outstanding[i] == 0:
                        lat.append(clock() - started[i])
                        tally.ops += job.pipeline
                        if left[i]:
                            send_round(i)
                        else:
                            active -= 1
                count(tally.ops)
        finally:
            ctx.destroy(0)

    return run


def _prepare_redis(job: Job, keys: dict[int, Iterator[bytes]], tally: Tally) -> Callable[..., None]:
    """redis-py: one connection per client; several clients are threads."""
    import redis

    host, port = job.address.rsplit(":", 1)
    value = b"x" * job.value_bytes
    conns = {c: redis.Redis(host=host, port=int(port), socket_timeout=REPLY_TIMEOUT)
             for c in job.clients}
    for r in conns.values():
        r.ping()
    lock = threading.Lock()

    def one_round(r: Any, it: Iterator[bytes]) -> int:
        if job.pipeline == 1:
            if job.test == "set":
                r.set(next(it), value)
            elif job.test == "get":
                r.get(next(it))
            elif job.test == "incr":
                r.incr(next(it))
            elif job.test == "setex":
                r.set(next(it), value, ex=SETEX_SECONDS)
            elif job.test == "mset":
                r.mset({next(it): value for _ in range(KEYS_PER_MULTI)})
            else:
                r.mget([next(it) for _ in range(KEYS_PER_MULTI)])
            return 0
        p = r.pipeline(transaction=False)
        for c in commands(job.test, it, value, job.pipeline):
            if c[0] == "SET":
                p.set(c[1], c[2], ex=c[3]["ex"] if len(c) > 3 else None)
            elif c[0] == "INCR":
                p.incr(c[1])
            elif c[0] == "GET":
                p.get(c[1])
            elif c[0] == "MSET":
                p.mset(dict(zip(c[1][0::2], c[1][1::2])))
            else:
                p.mget(c[1])
        return sum(isinstance(x, Exception) for x in p.execute(raise_on_error=False))

    def drive(client: int, count: Callable[[int], None]) -> None:
        r, it = conns[client], keys[client]
        lat: list[float] = []
        errors = 0
        clock = time.perf_counter
        for _ in range(job.rounds[job.clients.index(client)]):
            t = clock()
            try:
                errors += one_round(r, it)
            except redis.RedisError:
                errors += job.pipeline
            lat.append(clock() - t)
            with lock:
                tally.ops += job.pipeline
                count(tally.ops)
        with lock:
            tally.latencies.extend(lat)
            tally.errors += errors

    def run(count: Callable[[int], None]) -> None:
        threads = [threading.Thread(target=drive, args=(c, count)) for c in job.clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for r in conns.values():
            r.close()

    return run


# -- the floor: a C-level device and a Python echo worker ----------------------------


def device_main(front: str, back: str, curve: CurveKeys | None = None) -> None:
    """The floor's device; with ``curve``, a CURVE server on both sides (as a proxy is
    to its clients and, through its links, a node to the proxy)."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    f, b = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (f, b):
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            curve.serve(s)
    f.bind(f"tcp://{front}")
    b.bind(f"tcp://{back}")
    zmq.proxy(f, b)


def echo_main(endpoint: str, bind: bool, reply: bytes, curve: CurveKeys | None = None
              ) -> None:
    """Answer every message with the same envelope and a reply body of zkv's size; with
    ``curve``, over CURVE (a server when it binds, else a client with the cluster key)."""
    import zmq

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER if bind else zmq.DEALER)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.setsockopt(zmq.RCVHWM, 100_000)
    if curve is not None:
        if bind:
            curve.serve(s)
        else:
            from .security import Curve

            Curve.client(curve.cluster_secret).connect(s)
    if bind:
        s.bind(f"tcp://{endpoint}")
    else:
        s.connect(f"tcp://{endpoint}")
    recv, send = s.recv_multipart, s.send_multipart
    while True:
        frames = recv()
        frames[-1] = reply
        send(frames)


# -- running one test on one target ------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


class Runner:
    """Runs (target, test) pairs and keeps their results."""

    def __init__(self, cfg: Config, children: Children, show_progress: bool,
                 console: Any = None) -> None:
        self.cfg = cfg
        self.children = children
        self.show_progress = show_progress
        self.console = console
        self.filled: set[str] = set()

    def run(self, target: str, address: str, kind: str, test: str,
            echo_bodies: tuple[bytes, ...] = (), direct: bool = False,
            curve: CurveKeys | None = None) -> Result:
        cfg = self.cfg
        rounds_total = max(1, math.ceil(cfg.requests / cfg.pipeline))
        clients = min(cfg.clients, rounds_total)
        per_client = split(rounds_total, clients)
        workers = max(1, min(cfg.workers, clients))
        groups = [list(range(w, clients, workers)) for w in range(workers)]
        ctx = self.children.ctx
        progress = ctx.RawArray("q", workers)
        barrier = ctx.Barrier(workers + 1)
        out = ctx.Queue()
        procs = []
        for w, group in enumerate(groups):
            job = Job(kind=kind, address=address, test=test, pipeline=cfg.pipeline,
                      window=cfg.window, value_bytes=cfg.value_bytes, keyspace=cfg.keyspace,
                      clients=tuple(group), rounds=tuple(per_client[c] for c in group),
                      use_client=clients == 1 and kind != "redis", seed=cfg.seed,
                      echo_bodies=echo_bodies, direct=direct, curve=curve)
            procs.append(self.children.process(worker_main, job, w, progress, barrier, out))
        total = rounds_total * cfg.pipeline
        tallies: dict[int, Tally] = {}
        try:
            self._wait_start(barrier, out, tallies)
            with self._progress(f"{target} {test}", total) as update:
                while len(tallies) < workers:
                    try:
                        slot, tally = out.get(timeout=0.1)
                    except queue.Empty:
                        if not any(p.is_alive() for p in procs) and out.empty():
                            raise Unavailable(f"{target} {test}: a load worker died") from None
                    else:
                        if isinstance(tally, str):
                            raise Unavailable(f"{target} {test}: {tally}")
                        tallies[slot] = tally
                    update(sum(progress[:]))
        finally:
            for p in procs:
                self.children.end(p)
        lat = sorted(x for t in tallies.values() for x in t.latencies)
        elapsed = max(t.end for t in tallies.values()) - min(t.start for t in tallies.values())
        ops = sum(t.ops for t in tallies.values())
        return Result(
            target=target, test=test,
            ops_per_sec=round(ops / elapsed, 1) if elapsed > 0 else 0.0,
            p50_ms=round(percentile(lat, 0.50) * 1000, 4),
            p99_ms=round(percentile(lat, 0.99) * 1000, 4),
            p999_ms=round(percentile(lat, 0.999) * 1000, 4),
            requests=ops, errors=sum(t.errors for t in tallies.values()),
        )

    @staticmethod
    def _wait_start(barrier: Any, out: Any, tallies: dict[int, Tally]) -> None:
        try:
            barrier.wait(90)
        except threading.BrokenBarrierError:
            try:
                _, err = out.get(timeout=5)
            except queue.Empty:
                err = "a load worker did not start"
            raise Unavailable(str(err)) from None

    def _progress(self, label: str, total: int) -> Any:
        if not self.show_progress:
            return contextlib.nullcontext(lambda done: None)

        @contextlib.contextmanager
        def bar() -> Iterator[Callable[[int], None]]:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            with Progress(TextColumn("{task.description:<18}"), BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(),
                          console=self.console, transient=True) as progress:
                task = progress.add_task(label, total=total)
                yield lambda done: progress.update(task, completed=done)

        return bar()

    # -- filling the key space before reads (untimed) --------------------------------
    def fill_zkv(self, address: str, curve: CurveKeys | None = None) -> None:
        if address in self.filled:
            return
        from .client import Client

        value = b"x" * self.cfg.value_bytes
        with Client(address, timeout=30.0, curve_key=curve.client if curve else None,
                    server_key=curve.cluster if curve else None) as c:
            pool = key_pool(self.cfg.keyspace)
            for i in range(0, len(pool), 20_000):
                with c.pipeline() as p:
                    for k in pool[i : i + 20_000]:
                        p.set(k, value)
                    p.execute()
        self.filled.add(address)

    def fill_redis(self, address: str) -> None:
        if address in self.filled:
            return
        import redis

        host, port = address.rsplit(":", 1)
        value = b"x" * self.cfg.value_bytes
        r = redis.Redis(host=host, port=int(port))
        pool = key_pool(self.cfg.keyspace)
        for i in range(0, len(pool), 1000):
            r.mset({k: value for k in pool[i : i + 1000]})
        r.close()
        self.filled.add(address)


# -- the whole run ---------------------------------------------------------------------


def run_bench(cfg: Config, console: Any = None, say: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Run everything ``cfg`` asks for; the JSON-shaped report."""
    workdir = tempfile.mkdtemp(prefix="zkv-bench-")
    children = Children(workdir)
    report: dict[str, Any] = {"config": _config_json(cfg), "results": [], "ratios": {},
                              "skipped": {}}
    try:
        live = console is not None and console.is_terminal
        runner = Runner(cfg, children, show_progress=live, console=console)
        if cfg.tests:
            _throughput(cfg, children, runner, report, say)
        if cfg.memory:
            report["memory"] = measure_memory(cfg, children)
        if cfg.recovery:
            report["recovery"] = measure_recovery(cfg.recovery, workdir)
    finally:
        children.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if not report["skipped"]:
        del report["skipped"]
    return report


def _config_json(cfg: Config) -> dict[str, Any]:
    out = asdict(cfg)
    out["tests"] = list(cfg.tests)
    out["keys_per_multi_command"] = KEYS_PER_MULTI
    out["latency_per"] = cfg.latency_unit
    out["cpus"] = os.cpu_count()
    return out


def _throughput(cfg: Config, children: Children, runner: Runner,
                report: dict[str, Any], say: Callable[[str], None]) -> None:
    resp_port = free_port() if cfg.resp else None
    proxy = cfg.proxy or start_cluster(children, cfg.nodes, cfg.fsync, resp_port)[0]
    # "direct": a node of its own (a node of the cluster serves only its share of keys)
    node = start_node(children, cfg.fsync, "direct-node") if cfg.compare else None
    targets: list[tuple[str, str]] = []
    keys = CurveKeys.make(os.path.join(children.workdir, "keys")) if cfg.curve else None
    if cfg.compare or not cfg.direct or cfg.curve:
        targets.append(("zkv", proxy))
    if keys is not None:  # a cluster of its own with CURVE on every link: what it costs
        targets.append(("zkv" + CURVE_SUFFIX,
                        start_cluster(children, cfg.nodes, cfg.fsync, name="curve-",
                                      curve=keys)[0]))
    if cfg.metrics:  # the same cluster again, serving metrics: what they cost
        targets.append(("zkv-metrics",
                        start_cluster(children, cfg.nodes, cfg.fsync, metrics=True,
                                      name="metrics-")[0]))
    if cfg.replicas:  # the same cluster again, every shard replicated: what that costs
        targets.append(("zkv-replicas",
                        start_cluster(children, cfg.nodes, cfg.fsync, name="replicated-",
                                      replicas=cfg.replicas)[0]))
    if cfg.follower:  # the same cluster through a follower proxy (zkv proxy --follow)
        targets.append(("zkv-follower", start_follower(children, proxy)))
    if cfg.compare or cfg.direct:
        targets.append(("zkv-direct", proxy))
    if cfg.compare:
        assert node is not None
        targets.append(("direct", node))
        targets += [("floor", ""), ("floor-1hop", "")]
        if keys is not None:
            targets += [("floor" + CURVE_SUFFIX, ""), ("floor-1hop" + CURVE_SUFFIX, "")]
        why = redis_available()
        if why is None:
            targets.append(("redis", start_redis(children, cfg.fsync)))
        else:
            report["skipped"]["redis"] = why
            say(f"redis skipped: {why}")
    value = b"x" * cfg.value_bytes
    for test in cfg.tests:
        for target, address in targets:
            curve = keys if target.endswith(CURVE_SUFFIX) else None
            if target.startswith("floor"):
                result = _run_floor(cfg, children, runner, target, test, value, curve)
            elif target == "redis":
                if test in ("get", "mget"):
                    runner.fill_redis(address)
                result = runner.run(target, address, "redis", test)
            else:
                if test in ("get", "mget"):
                    runner.fill_zkv(address, curve)
                result = runner.run(target, address, "zkv", test,
                                    direct=target == "zkv-direct", curve=curve)
            report["results"].append(asdict(result))
    by = {(r["target"], r["test"]): r["ops_per_sec"] for r in report["results"]}
    if keys is not None:  # each row with CURVE over the same row without
        for test in cfg.tests:
            ratios = {plain: round(by[(target, test)] / by[(plain, test)], 3)
                      for target, _ in targets if target.endswith(CURVE_SUFFIX)
                      for plain in [target.removesuffix(CURVE_SUFFIX)]
                      if by.get((plain, test)) and (target, test) in by}
            if ratios:
                report.setdefault("ratios_curve", {})[test] = ratios
    for test in cfg.tests:
        for row, key in (("zkv-metrics", "ratios_metrics"), ("zkv-replicas", "ratios_replicas"),
                         ("zkv-follower", "ratios_follower")):
            on, off = by.get((row, test)), by.get(("zkv", test))
            if on and off:
                report.setdefault(key, {})[test] = round(on / off, 3)
    for key, row in (("ratios", "zkv"), ("ratios_direct", "zkv-direct")):
        for test in cfg.tests:
            mine = by.get((row, test))
            others = BASELINES if row == "zkv" else ("zkv", *BASELINES)
            ratios = {b: round(mine / by[(b, test)], 3) for b in others
                      if (b, test) in by and by[(b, test)] > 0 and mine is not None}
            if ratios:
                report.setdefault(key, {})[test] = ratios
    if cfg.replicas:
        from .benchmarks import replication

        say("replication: catch-up, move and failover")
        report["replication"] = replication.measure(children, min(cfg.keyspace, 50_000),
                                                    cfg.failovers, say=lambda line: None)
    if cfg.resp:
        from .benchmarks import resp as resp_bench

        def runner_for(c: Config) -> Runner:
            return Runner(c, children, runner.show_progress, runner.console)

        resp_bench.run(cfg, children, f"127.0.0.1:{resp_port}", proxy, runner_for, report, say)


def _run_floor(cfg: Config, children: Children, runner: Runner, target: str, test: str,
               value: bytes, curve: CurveKeys | None = None) -> Result:
    pool = key_pool(min(cfg.keyspace, 1000))
    rng = random.Random(cfg.seed)
    cmds = commands(test, iter(rng.choices(pool, k=cfg.pipeline * KEYS_PER_MULTI)),
                    value, cfg.pipeline)
    bodies = tuple(round_bodies(cmds, uses_pipe(test, cfg.pipeline, cfg.window)))
    reply = reply_body(test, cfg.pipeline, cfg.window, value)
    front = f"127.0.0.1:{free_port()}"
    started = []
    try:
        if target.removesuffix(CURVE_SUFFIX) == "floor":
            back = f"127.0.0.1:{free_port()}"
            started.append(children.process(device_main, front, back, curve))
            started.append(children.process(echo_main, back, False, reply, curve))
        else:
            started.append(children.process(echo_main, front, True, reply, curve))
        return runner.run(target, front, "echo", test, bodies, curve=curve)
    finally:
        for p in started:
            children.end(p)


# -- memory and recovery ---------------------------------------------------------------


_DICT_PROBE = r"""
import os, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
n, size = int(sys.argv[1]), int(sys.argv[2])
before = rss()
d = {}
for i in range(n):
    d[b"mem:%012d" % i] = (b"%012d" % i).rjust(size, b"v")
print(rss() - before, len(d))
"""


def memory_value(i: int, size: int) -> bytes:
    return (b"%012d" % i).rjust(size, b"v")  # a distinct object per key, as in a node


def measure_memory(cfg: Config, children: Children) -> dict[str, Any]:
    from .client import Client

    keys, size = int(cfg.memory or 0), 100
    if cfg.proxy:
        proxy = cfg.proxy
    else:
        proxy, _ = start_cluster(children, cfg.nodes, cfg.fsync)
    with Client(proxy, timeout=60.0) as c:
        before = c.info()["totals"].get("rss_bytes", 0)
        base_keys = c.info()["totals"].get("keys", 0)
        batch = 20_000
        for start in range(0, keys, batch):
            with c.pipeline() as p:
                for i in range(start, min(keys, start + batch)):
                    p.set(b"mem:%012d" % i, memory_value(i, size))
                p.execute()
        info = c.info()
        # as many keys again, each with a deadline: what a deadline costs on top
        for start in range(0, keys, batch):
            with c.pipeline() as p:
                for i in range(start, min(keys, start + batch)):
                    p.set(b"ttl:%012d" % i, memory_value(i, size), ex=86_400)
                p.execute()
        timed = c.info()["totals"].get("rss_bytes", 0)
    after = info["totals"].get("rss_bytes", 0)
    stored = info["totals"].get("keys", 0) - base_keys
    probe = subprocess.run([sys.executable, "-c", _DICT_PROBE, str(keys), str(size)],
                           capture_output=True, text=True, check=True)
    dict_delta, dict_keys = (int(x) for x in probe.stdout.split())
    zkv_per_key = (after - before) / max(1, keys)
    dict_per_key = dict_delta / max(1, dict_keys)
    return {
        "keys": keys, "value_bytes": size, "keys_stored": stored, "nodes": len(info["nodes"]),
        "zkv_rss_delta_bytes": after - before, "dict_rss_delta_bytes": dict_delta,
        "zkv_bytes_per_key": round(zkv_per_key, 1), "dict_bytes_per_key": round(dict_per_key, 1),
        "ratio": round(zkv_per_key / dict_per_key, 3) if dict_per_key > 0 else None,
        "zkv_ttl_bytes_per_key": round((timed - after) / max(1, keys), 1),
    }


def measure_recovery(records: int, workdir: str) -> dict[str, Any]:
    from .benchmarks.node import bench_replay

    sub = os.path.join(workdir, "recovery")
    os.makedirs(sub, exist_ok=True)
    r = bench_replay(sub, records)
    return {
        "records": r.records, "keys": r.keys, "log_bytes": r.log_bytes,
        "replay_s": r.storage_s, "decode_s": r.decode_s,
        "replay_records_per_s": r.storage_records_per_s,
        "decode_records_per_s": r.decode_records_per_s,
        "ratio": r.ratio_to_decode,
    }


# -- output ------------------------------------------------------------------------------


def show(report: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    cfg = report["config"]
    results = report["results"]
    for test in cfg["tests"]:
        rows = [r for r in results if r["test"] == test]
        if not rows:
            continue
        how = Config(pipeline=cfg["pipeline"], window=cfg["window"]).how(test)
        table = Table(title=(f"{test.upper()}: {cfg['clients']} client(s), {how}, "
                             f"{cfg['value_bytes']}-byte values"
                             + (f", {KEYS_PER_MULTI} keys per command" if test.startswith("m")
                                else "")
                             + f"; latency per {Config(pipeline=cfg['pipeline']).latency_unit}"),
                      title_justify="left")
        table.add_column("target", no_wrap=True, min_width=max(len(r["target"]) for r in rows))
        table.add_column("ops/s", justify="right")
        for q in ("p50", "p99", "p99.9"):
            table.add_column(f"{q} ms", justify="right")
        table.add_column("requests", justify="right")
        table.add_column("errors", justify="right")
        columns = [(name, report.get(key, {}).get(test, {}))
                   for name, key in (("zkv", "ratios"), ("zkv-direct", "ratios_direct"))]
        columns = [(name, ratios) for name, ratios in columns if ratios]
        for name, _ in columns:
            table.add_column(f"{name} ÷ this", justify="right")
        curve = report.get("ratios_curve", {}).get(test, {})
        if curve:  # a row with CURVE over the same row without
            columns.append(("curve", {p + CURVE_SUFFIX: x for p, x in curve.items()}))
            table.add_column("this ÷ plain", justify="right")
        for r in rows:
            cells = [ratios.get(r["target"]) for _, ratios in columns]
            table.add_row(r["target"], f"{r['ops_per_sec']:,.0f}", f"{r['p50_ms']:.3f}",
                          f"{r['p99_ms']:.3f}", f"{r['p999_ms']:.3f}", f"{r['requests']:,}",
                          f"[red]{r['errors']}[/]" if r["errors"] else "0",
                          *("" if c is None else f"{c:.2f}x" for c in cells))
        console.print(table)
    for test, ratio in report.get("ratios_metrics", {}).items():
        console.print(f"{test.upper()}: with metrics on, {ratio:.2f}x the throughput with "
                      "them off")
    for test, ratios in report.get("ratios_curve", {}).items():
        console.print(f"{test.upper()}: with CURVE, "
                      + ", ".join(f"{p} {x:.2f}x" for p, x in ratios.items())
                      + " the throughput without")
    for test, ratio in report.get("ratios_follower", {}).items():
        console.print(f"{test.upper()}: through a follower proxy, {ratio:.2f}x the "
                      "throughput through the config manager")
    for test, ratio in report.get("ratios_replicas", {}).items():
        console.print(f"{test.upper()}: with {report['config'].get('replicas', 1)} "
                      f"replica(s) per shard, {ratio:.2f}x the throughput without")
    repl = report.get("replication")
    if repl:
        console.print(
            f"replication: catch-up {repl['catch_up_keys_per_sec']:,} keys/s, "
            f"{repl['catch_up_vs_move']:.2f}x the move rate ({repl['move_keys_per_sec']:,} "
            f"keys/s); failover (kill -9 of a primary until writes are taken again): "
            f"{', '.join(f'{t:.2f} s' for t in repl['failover_seconds'])}")
    if report.get("resp"):
        from .benchmarks import resp as resp_bench

        resp_bench.show(report["resp"], console)
    if report.get("skipped"):
        for name, why in report["skipped"].items():
            console.print(f"[yellow]{name} skipped[/]: {why}")
    mem = report.get("memory")
    if mem:
        console.print(
            f"memory: {mem['keys']:,} keys of {mem['value_bytes']} bytes on {mem['nodes']} "
            f"nodes: zkv {mem['zkv_bytes_per_key']:.0f} B/key (node RSS), a Python dict "
            f"{mem['dict_bytes_per_key']:.0f} B/key: ratio {mem['ratio']}x; a key with a "
            f"deadline {mem['zkv_ttl_bytes_per_key']:.0f} B/key")
    rec = report.get("recovery")
    if rec:
        console.print(
            f"recovery: {rec['records']:,} records ({rec['log_bytes'] / 2**20:.0f} MiB): replay "
            f"{rec['replay_records_per_s']:,.0f} records/s, decode only "
            f"{rec['decode_records_per_s']:,.0f} records/s: ratio {rec['ratio']}x")


# -- the command line ---------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        n = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return n


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _tests(text: str) -> tuple[str, ...]:
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TESTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown test {', '.join(bad) or repr(text)}; choose from {','.join(TESTS)}")
    return tuple(dict.fromkeys(names))


def _address(text: str) -> str:
    from .config import format_address, parse_address

    try:
        host, port = parse_address(text.removeprefix("tcp://"), "--proxy")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return format_address(host, port)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure throughput and latency (and compare with baselines)",
        description="Benchmark zkv in the manner of redis-benchmark; --compare runs the same "
                    "workload against a storage node directly, a raw pyzmq floor and redis.")
    p.add_argument("-t", dest="tests", type=_tests, default=None, metavar="TESTS",
                   help=f"comma-separated tests of {','.join(TESTS)} (default "
                   f"{','.join(DEFAULT_TESTS)}; setex: SET with a {SETEX_SECONDS} s deadline)")
    p.add_argument("-n", dest="requests", type=_positive, default=100_000,
                   help="requests (commands) per test and target (default 100000)")
    p.add_argument("-c", dest="clients", type=_positive, default=1,
                   help="concurrent clients (default 1)")
    p.add_argument("-P", dest="pipeline", type=_positive, default=1,
                   help="commands in flight per client (default 1: no pipelining)")
    p.add_argument("--window", action="store_true",
                   help="with -P N, send N separate requests (call_many) rather than PIPE "
                        "messages of N commands")
    p.add_argument("-d", dest="value_bytes", type=_non_negative, default=100,
                   help="value size in bytes (default 100)")
    p.add_argument("-r", dest="keyspace", type=_positive, default=100_000,
                   help="random keys drawn from this many (default 100000)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    p.add_argument("--proxy", type=_address, default=None, metavar="HOST:PORT",
                   help="benchmark this running proxy instead of starting a cluster")
    p.add_argument("--direct", action="store_true",
                   help="use the direct-routing client (zkv.Client(direct=True)): the row "
                        "zkv-direct")
    p.add_argument("--compare", action="store_true",
                   help="also run zkv-direct, direct (one node), floor (raw pyzmq) and redis; "
                        "print ratios")
    p.add_argument("--metrics", action="store_true",
                   help="also run a second cluster serving Prometheus metrics (the row "
                        "zkv-metrics): what metrics cost, as a ratio")
    p.add_argument("--resp", action="store_true",
                   help="also run redis-benchmark (-c 1, -c 50, -c 50 -P 16) against zkv's "
                        "RESP front, redis-server and twemproxy, beside zkv's ZeroMQ front")
    p.add_argument("--replicas", type=_non_negative, default=0, metavar="N",
                   help="also run against a cluster whose shards have N replicas each "
                        "(row zkv-replicas; ratios_replicas: it against zkv)")
    p.add_argument("--curve", action="store_true",
                   help="also run a second cluster with CURVE on every link (keys made for "
                        "the run; row zkv-curve, and with --compare floor-curve and "
                        "floor-1hop-curve; ratios_curve: each against its plain row)")
    p.add_argument("--follower", action="store_true",
                   help="also run through a follower proxy of the same cluster (zkv proxy "
                        "--follow; row zkv-follower; ratios_follower: it against zkv)")
    p.add_argument("--failovers", type=_positive, default=3, metavar="N",
                   help="with --replicas: time N failovers (default 3)")
    p.add_argument("--fsync", choices=["everysec", "always", "no"], default="everysec",
                   help="fsync policy of the nodes started (and of redis) (default everysec)")
    p.add_argument("--nodes", type=_positive, default=3, help="nodes to start (default 3)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="load-generating processes (default 1 for one client, else 2)")
    p.add_argument("--memory", type=_positive, nargs="?", const=1_000_000, default=None,
                   metavar="KEYS", help="measure RSS per key for KEYS keys (default 1000000)")
    p.add_argument("--recovery", type=_positive, nargs="?", const=1_000_000, default=None,
                   metavar="RECORDS", help="measure log replay speed (default 1000000 records)")
    p.set_defaults(func=main)


def config_from(args: argparse.Namespace) -> Config:
    tests = args.tests
    if tests is None:
        tests = () if (args.memory or args.recovery) else DEFAULT_TESTS
    workers = args.workers or (1 if args.clients == 1 else 2)
    if args.resp and args.proxy:
        raise ConfigError("--resp starts a cluster of its own (with a RESP port): leave out "
                          "--proxy")
    return Config(tests=tests, requests=args.requests, clients=args.clients,
                  pipeline=args.pipeline, window=args.window, value_bytes=args.value_bytes,
                  keyspace=args.keyspace, workers=workers, fsync=args.fsync, nodes=args.nodes,
                  proxy=args.proxy, direct=args.direct, compare=args.compare, resp=args.resp,
                  metrics=args.metrics, replicas=args.replicas, failovers=args.failovers,
                  curve=args.curve, follower=args.follower,
                  memory=args.memory,
                  recovery=args.recovery)


def main(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    if cfg.proxy is None:
        # the clusters are the bench's own (plain, or with --curve the keys it makes):
        # keys the environment names for zkv.Client are for the user's clusters
        for name in ("ZKV_CURVE_KEY", "ZKV_SERVER_KEY"):
            os.environ.pop(name, None)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.json:
            report = run_bench(cfg, console=None,
                               say=lambda line: print(f"zkv bench: {line}", file=sys.stderr))
            print(json.dumps(report))
        else:
            from rich.console import Console

            console = Console()
            if not console.is_terminal:  # piped: no live display, and no wrapped columns
                console = Console(width=max(console.width, 120))
            report = run_bench(cfg, console=console, say=console.print)
            show(report, console)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise Unavailable(f"{exc}") from exc
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if not any(r["errors"] for r in report["results"]) else 1


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt
