"""The processes a benchmark starts: nodes, clusters and redis-servers on free ports,
each with its output in a log file of the run's directory, all killed at the end
(:class:`Children`); and the CURVE keys of ``zkv bench --curve``. ``zkv bench``
(zkv.bench) and every benchmark module here build on it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Unavailable

if TYPE_CHECKING:
    from ..security import Curve

REPLY_TIMEOUT = 10.0  # seconds: the proxies' timeout_ms and the load clients' timeout


@dataclass(frozen=True)
class CurveKeys:
    """The key files of ``zkv bench --curve``, made in the bench's own directory."""

    cluster: str  # the cluster's public key file: the clients' server_key
    cluster_secret: str  # its secret half: the nodes' and proxy's --curve-key
    client: str  # the load clients' secret key file (a data key)
    clients: str  # the directory of the data keys (--clients)

    @classmethod
    def make(cls, root: str) -> CurveKeys:
        from ..security import keygen

        cluster, cluster_secret = keygen(os.path.join(root, "cluster"))
        clients = os.path.join(root, "clients")
        _, client = keygen(os.path.join(clients, "bench"))
        return cls(cluster, cluster_secret, client, clients)

    def flags(self) -> list[str]:
        """A node's or proxy's command-line flags for this cluster."""
        return ["--curve-key", self.cluster_secret, "--clients", self.clients]

    def for_client(self) -> Curve:
        """A load client's CURVE identity (the client key, expecting the cluster's)."""
        from ..security import Curve

        return Curve.client(self.client, self.cluster)

    def serve(self, sock: Any) -> None:
        """Make a raw socket (the floor's) a CURVE server with the cluster key (before
        bind). No ZAP handler: libzmq then takes any client key."""
        import zmq

        from ..security import load_secret

        public, secret = load_secret(self.cluster_secret)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)


def free_port() -> int:
    """A free port for a process the bench starts, below the kernel's ephemeral range
    (which it hands out meanwhile to outgoing connections and to sockets bound to port
    0, such as a node's PULL socket), so that it stays free until the process binds it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 2048:
        for _ in range(100):
            port = random.randrange(max(1024, low - 12_000), low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Children:
    """Every process the bench starts; :meth:`close` kills whatever is still running."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.popens: list[tuple[subprocess.Popen[bytes], str]] = []
        self.procs: list[Any] = []
        self.ctx = mp.get_context("spawn")

    def spawn(self, name: str, argv: list[str], ready: str, timeout: float = 30.0) -> str:
        """Start a program with its output in a log file; wait for ``ready`` in it."""
        log = os.path.join(self.workdir, f"{name}.log")
        with open(log, "wb") as f:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f,
                                     stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        self.popens.append((popen, log))
        deadline = time.monotonic() + timeout
        while True:
            with open(log, "rb") as f:
                text = f.read().decode(errors="replace")
            if ready in text:
                return text
            if popen.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(text.strip().splitlines()[-3:])
                popen.kill()
                raise Unavailable(f"{name} did not start ({argv[0]}): {tail or 'no output'}")
            time.sleep(0.02)

    def process(self, target: Callable[..., None], *args: Any) -> Any:
        p = self.ctx.Process(target=target, args=args, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def end(self, proc: Any) -> None:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(OSError, ValueError):
                self.end(proc)
        for popen, _ in self.popens:  # SIGTERM first, so nodes close their logs cleanly
            if popen.poll() is None:
                try:
                    os.killpg(popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for popen, _ in self.popens:
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                popen.wait(5)


def in_children(prefix: str, measure: Callable[[Children], dict[str, Any]]) -> dict[str, Any]:
    """Run ``measure`` with a Children of a temporary directory, killing whatever it
    started afterwards (the benchmark modules' mains)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        children = Children(workdir)
        try:
            return measure(children)
        finally:
            children.close()


def zkv_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zkv", *args]


def start_node(children: Children, fsync: str, name: str, metrics: bool = False,
               curve: CurveKeys | None = None) -> str:
    port = free_port()
    data = os.path.join(children.workdir, name)
    extra = ["--metrics-port", str(free_port())] if metrics else []
    if curve is not None:
        extra += curve.flags()
    children.spawn(name, zkv_argv("node", "--port", str(port), "--data-dir", data,
                                  "--fsync", fsync, *extra), ready="zkv node")
    return f"127.0.0.1:{port}"


def start_cluster(children: Children, nodes: int, fsync: str,
                  resp_port: int | None = None, metrics: bool = False,
                  name: str = "", replicas: int = 0, curve: CurveKeys | None = None
                  ) -> tuple[str, list[str]]:
    """``nodes`` storage nodes and a proxy in front of them: (proxy, node addresses);
    ``metrics``: every process serves Prometheus metrics (zkv bench --metrics);
    ``replicas``: each node is a shard's primary with this many replicas, and this
    returns once they are all in sync; ``curve``: CURVE on every link, with these keys
    (zkv bench --curve)."""
    addrs = [start_node(children, fsync, f"{name}node{i}", metrics, curve)
             for i in range(1, nodes + 1)]
    copies = [(a, start_node(children, fsync, f"{name}node{i}r{j}", metrics, curve))
              for i, a in enumerate(addrs, 1) for j in range(1, replicas + 1)]
    port = free_port()
    argv = ["proxy", "--port", str(port), "--timeout-ms", str(int(REPLY_TIMEOUT * 1000)),
            "--state-dir", os.path.join(children.workdir, f"{name}proxy")]
    if metrics:
        argv += ["--metrics-port", str(free_port())]
    if resp_port is not None:
        argv += ["--resp-port", str(resp_port)]
    if curve is not None:
        argv += curve.flags()
    for a in addrs:
        argv += ["--node", a]
    for a, r in copies:
        argv += ["--replica", f"{a}={r}"]
    children.spawn(f"{name}proxy", zkv_argv(*argv), ready="zkv proxy")
    if copies:
        from ..client import Client, wait_in_sync

        with Client(f"127.0.0.1:{port}", timeout=2.0,
                    curve_key=curve.client if curve else None,
                    server_key=curve.cluster if curve else None) as c:
            for _, replica in copies:
                wait_in_sync(c, replica, 30.0)
    return f"127.0.0.1:{port}", addrs


def start_follower(children: Children, proxy: str, name: str = "follower") -> str:
    """A follower proxy of the cluster whose config manager is at ``proxy``; its address
    once it serves (it has learned the configuration and reached every node)."""
    port = free_port()
    children.spawn(name, zkv_argv("proxy", "--port", str(port), "--follow", proxy,
                                  "--timeout-ms", str(int(REPLY_TIMEOUT * 1000))),
                   ready="zkv proxy")
    address = f"127.0.0.1:{port}"
    from ..client import Client

    with Client(address, timeout=2.0) as c:
        deadline = time.monotonic() + 30.0
        while not all(n.get("state") == "up" for n in c.nodes()):
            if time.monotonic() > deadline:
                raise Unavailable(f"the follower at {address} did not see every node up "
                                  "within 30 s")
            time.sleep(0.1)
    return address


def redis_available() -> str | None:
    """Why redis cannot be a baseline here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis-py is not installed (pip install 'zkv[bench]')"
    return None


def start_redis(children: Children, fsync: str) -> str:
    port = free_port()
    data = os.path.join(children.workdir, "redis")
    os.makedirs(data)
    children.spawn("redis", [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
        "--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--daemonize", "no",
        "--protected-mode", "no",
    ], ready="Ready to accept connections")
    return f"127.0.0.1:{port}"
