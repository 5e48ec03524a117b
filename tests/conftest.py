"""Fixtures shared by the tests: free ports, real zkv processes, raw sockets.

Every process a test starts is killed in a finaliser; every socket closes with
linger 0; every receive has a timeout, so a broken build fails instead of hanging.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, settings

from zkv.core import protocol as P

# Property tests build rings and logs; on a loaded 2-core machine an example can take
# longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile(
    "zkv", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.load_profile("zkv")

REPO = Path(__file__).resolve().parent.parent


def _compile_zkv() -> None:
    """Every process the tests start (hundreds of nodes and proxies) imports zkv. Where
    PYTHONDONTWRITEBYTECODE is set, as on these machines, each would compile it from
    source again (about 0.15 s of CPU a process): compile it once, here. (py_compile
    writes whatever that setting says; a read-only tree just stays uncompiled.)"""
    import compileall

    import zkv

    try:
        compileall.compile_dir(Path(zkv.__file__).parent, quiet=2)
    except OSError:
        pass


_compile_zkv()


class Keys:
    """CURVE keys for a secure cluster (zkv keygen's files): the cluster key, an admin
    key, a data client key and a stranger's key, under ``root``."""

    def __init__(self, root: Path) -> None:
        from zkv.security import keygen

        self.root = root
        for name in ("cluster", "admins/ops", "clients/app", "rogue"):
            if not (root / f"{name}.key_secret").exists():
                keygen(str(root / name))
        self.cluster = str(root / "cluster.key")
        self.cluster_secret = str(root / "cluster.key_secret")
        self.admin = str(root / "admins" / "ops.key_secret")
        self.client = str(root / "clients" / "app.key_secret")
        self.rogue = str(root / "rogue.key_secret")
        self.clients = str(root / "clients")
        self.admins = str(root / "admins")

    def section(self) -> dict[str, Any]:
        """A topology's security section for these keys."""
        return {"key": self.cluster_secret, "clients": self.clients, "admins": self.admins}


_SESSION_KEYS: list[Keys] = []


def curve_by_default() -> Keys | None:
    """With ZKV_TEST_CURVE=1, every topology a test writes turns CURVE on (with one key
    set for the session), every process started by flags gets the keys, a Cluster's
    clients use the admin key and every other zkv.Client (ZKV_CURVE_KEY) and raw
    socket the cluster key (tests send internal operations by hand): the same tests,
    run over encrypted, authenticated links."""
    if os.environ.get("ZKV_TEST_CURVE") != "1":
        return None
    if not _SESSION_KEYS:
        import tempfile

        keys = Keys(Path(tempfile.mkdtemp(prefix="zkv-test-keys-")))
        os.environ["ZKV_CURVE_KEY"] = keys.cluster_secret
        os.environ["ZKV_SERVER_KEY"] = keys.cluster
        _SESSION_KEYS.append(keys)
    return _SESSION_KEYS[0]


curve_by_default()


def speak_curve_if_on(sock: zmq.Socket[Any]) -> None:
    """A hand-made client socket, made a CURVE client with the cluster key when the run
    has CURVE on (ZKV_TEST_CURVE=1)."""
    keys = curve_by_default()
    if keys is not None:
        from zkv.security import Curve

        Curve.client(keys.cluster_secret).connect(sock)


def free_port() -> int:
    """A free TCP port for a test's process to bind, below the kernel's range of ephemeral
    ports: the kernel hands those out meanwhile (to outgoing connections, to a node's
    PULL socket bound to port 0), so a port chosen there could be taken before our
    process binds it."""
    low, high = _ephemeral_range()
    top = low if low > 2048 else 65535
    for _ in range(200):
        port = random.randrange(max(1024, top - 12_000), top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_handed_out: set[int] = set()  # one port, one test process: never handed out twice


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


class Proc:
    """A zkv process started by a test, with its output collected in the background."""

    def __init__(self, args: list[str], cwd: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "zkv", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.popen.poll() is not None:
                time.sleep(0.1)  # let the reader catch the last lines
                for line in list(self.lines):
                    if text in line:
                        return line
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before printing {text!r}:\n"
                    + self.output
                )
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(2)
        return code

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; kill -9 if it does not stop."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


class Procs:
    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.all: list[Proc] = []

    def start(self, *args: str, ready: str | None = None, timeout: float = 20.0,
              env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Proc:
        keys = curve_by_default()
        host = args[args.index("--host") + 1] if "--host" in args[:-1] else "127.0.0.1"
        refusal = host not in ("127.0.0.1", "::1") and "--insecure" not in args
        if (keys is not None and args and args[0] in ("node", "proxy") and not refusal
                and "--config" not in args and "--curve-key" not in args):
            # (a topology carries its security section; flags need the same keys; the
            # tests of what refuses to start off loopback choose for themselves)
            args = (args[0], "--curve-key", keys.cluster_secret, "--clients", keys.clients,
                    "--admins", keys.admins, *args[1:])
        proc = Proc(list(args), self.cwd, env, prefix)
        self.all.append(proc)
        if ready is not None:
            proc.wait_for(ready, timeout)
        return proc

    def node(self, port: int, data_dir: str, *extra: str, ready: bool = True) -> Proc:
        return self.start(
            "node", "--port", str(port), "--data-dir", data_dir, *extra,
            ready="zkv node" if ready else None,
        )

    def close(self) -> None:
        for proc in self.all:
            try:
                proc.signal(signal.SIGCONT)
                proc.kill()
            except Exception:
                pass


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    manager = Procs(str(tmp_path))
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def opened() -> Iterator[list[Any]]:
    """zkv.storage.Storage objects a test opened; closed at the end even when it fails."""
    made: list[Any] = []
    yield made
    for st in made:
        st.close()  # idempotent


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


class Raw:
    """A bare DEALER socket for sending hand-made frames, with receive timeouts."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, timeout_ms: int = 5000) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        speak_curve_if_on(self.sock)  # hand-made frames, over CURVE when the run has it
        self.sock.connect(f"tcp://{addr}")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([b"", *frames])

    def recv(self) -> list[bytes]:
        try:
            frames = self.sock.recv_multipart()
        except zmq.Again:
            raise AssertionError("no reply within the timeout") from None
        assert frames[0] == b"", frames
        return frames[1:]

    def call(self, op: str, *args: Any) -> Any:
        self.send(P.encode_request(op, *args))
        return P.decode_reply(self.recv()[-1])

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw(zctx: zmq.Context[Any]) -> Iterator[Any]:
    made: list[Raw] = []

    def connect(addr: str, timeout_ms: int = 5000) -> Raw:
        r = Raw(zctx, addr, timeout_ms)
        made.append(r)
        return r

    try:
        yield connect
    finally:
        for r in made:
            r.close()


# -- whole clusters from a YAML topology ---------------------------------------------


def in_threads(work: Any, n: int, timeout: float) -> list[BaseException]:
    """Run ``work(i)`` for i in range(n), each in a thread of its own, all at once; the
    exceptions they raised (every thread must end within ``timeout`` seconds)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    return errors


def wait_until(check: Any, timeout: float = 10.0, interval: float = 0.05,
               what: str = "the condition") -> Any:
    """Call ``check()`` until it returns something truthy; its last error or falsy
    result is reported if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
        except Exception as exc:  # noqa: BLE001 - e.g. zkv.Unavailable while a process starts
            result, last = None, exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s (last: {last!r})")
        time.sleep(interval)


# The start lines, not the one-line errors ("zkv node: error: ...").
NODE_READY = "zkv node "
PROXY_READY = "zkv proxy "


class Topo:
    """A YAML topology written under a test's directory, on free loopback ports,
    with every data and state directory under that directory too."""

    def __init__(self, directory: Path, nodes: int = 3, *, name: str = "cluster.yaml",
                 limits: dict[str, int] | None = None,
                 proxy: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None, host: str = "127.0.0.1",
                 replicas: int = 0, security: Keys | None = None) -> None:
        import yaml

        self.keys = security or curve_by_default()
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.path = directory / name
        self.proxy_port = free_port()
        self.node_ports = [free_port() for _ in range(nodes)]
        self.state_dir = directory / "state"
        self.host = host
        self.node_addrs = [self._addr(p) for p in self.node_ports]
        self.data_dirs = {a: directory / "data" / f"node-{p}"
                          for a, p in zip(self.node_addrs, self.node_ports)}
        self.proxy_cfg = {
            "host": host,
            "port": self.proxy_port,
            "state_dir": str(self.state_dir),
            "timeout_ms": 1000,
            "heartbeat_ms": 200,
            "heartbeat_misses": 3,
            **(proxy or {}),
        }
        doc: dict[str, Any] = {"proxy": self.proxy_cfg}
        if limits:
            doc["limits"] = limits
        doc["defaults"] = {"fsync": "no", **(defaults or {})}
        # each node's replicas (zkv.core.replication), on free ports of their own
        self.replica_addrs: dict[str, list[str]] = {}
        entries = []
        for a, d in list(self.data_dirs.items()):
            entry: dict[str, Any] = {"address": a, "data_dir": str(d)}
            if replicas:
                copies = []
                for _ in range(replicas):
                    port = free_port()
                    addr = self._addr(port)
                    self.data_dirs[addr] = directory / "data" / f"node-{port}"
                    copies.append({"address": addr, "data_dir": str(self.data_dirs[addr])})
                self.replica_addrs[a] = [c["address"] for c in copies]
                entry["replicas"] = copies
            entries.append(entry)
        doc["nodes"] = entries
        if self.keys is not None:
            doc["security"] = self.keys.section()
        self.path.write_text(yaml.safe_dump(doc, sort_keys=False))

    @property
    def all_addrs(self) -> list[str]:
        """Every node: the members, each followed by its replicas."""
        return [x for a in self.node_addrs for x in (a, *self.replica_addrs.get(a, ()))]

    def _addr(self, port: int) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def proxy_addr(self) -> str:
        return self._addr(self.proxy_port)


class Cluster:
    """Three (or N) ``zkv node`` processes and a ``zkv proxy``, started from a
    :class:`Topo`, with handles to kill -9, stop and restart each of them."""

    def __init__(self, topo: Topo, procs: Procs) -> None:
        self.topo = topo
        self.procs = procs
        self.nodes: dict[str, Proc] = {}
        self.proxy: Proc | None = None
        self.proxy_env: dict[str, str] | None = None  # extra environment for the proxy
        self._clients: list[Any] = []

    @property
    def address(self) -> str:
        return self.topo.proxy_addr

    @property
    def node_addrs(self) -> list[str]:
        return list(self.topo.node_addrs)

    @property
    def replica_addrs(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.topo.replica_addrs.items()}

    def start(self) -> Cluster:
        for addr in self.topo.all_addrs:
            self.start_node(addr, wait=False)
        for addr in self.topo.all_addrs:
            self.nodes[addr].wait_for(NODE_READY, 20)
        self.start_proxy()
        self.wait_routable()
        return self

    def start_node(self, addr: str, wait: bool = True) -> Proc:
        port = addr.rsplit(":", 1)[1]
        proc = self.procs.start("node", "--config", str(self.topo.path), "--port", port)
        self.nodes[addr] = proc
        if wait:
            proc.wait_for(NODE_READY, 20)
        return proc

    def kill_node(self, addr: str) -> None:
        """kill -9 the node at ``addr``."""
        self.nodes[addr].kill()

    def restart_node(self, addr: str) -> Proc:
        self.nodes[addr].kill()
        return self.start_node(addr)

    def start_proxy(self, *args: str) -> Proc:
        """Start the proxy: from the topology, or with ``args`` instead when given."""
        if not args:
            args = ("--config", str(self.topo.path))
        self.proxy = self.procs.start("proxy", *args, ready=PROXY_READY, timeout=20,
                                      env=self.proxy_env)
        return self.proxy

    def kill_proxy(self) -> None:
        assert self.proxy is not None
        self.proxy.kill()

    def restart_proxy(self, *args: str) -> Proc:
        self.kill_proxy()
        return self.start_proxy(*args)

    def client(self, timeout: float = 3.0, retries: int = 0, address: str | None = None,
               direct: bool = False) -> Any:
        """A zkv.Client of the proxy, closed when the cluster is."""
        import zkv

        keys = self.topo.keys
        c = zkv.Client(address or self.address, timeout=timeout, retries=retries, direct=direct,
                       curve_key=keys.admin if keys else None,
                       server_key=keys.cluster if keys else None)
        self._clients.append(c)
        return c

    def node_states(self) -> dict[str, str]:
        c = self.client(timeout=2.0)
        try:
            return {n["address"]: n["state"] for n in c.nodes()}
        finally:
            c.close()

    def wait_state(self, addr: str, state: str, timeout: float = 10.0) -> None:
        wait_until(lambda: self.node_states().get(addr) == state, timeout,
                   what=f"NODES showing {addr} {state}")

    def wait_routable(self, timeout: float = 10.0) -> None:
        """Until INFO through the proxy is answered by every node: the cluster is whole."""
        def reached() -> bool:
            c = self.client(timeout=2.0)
            try:
                nodes = c.info()["nodes"]
            finally:
                c.close()
            return len(nodes) > 0 and all("error" not in n for n in nodes.values())

        wait_until(reached, timeout, what="the proxy reaching every node")

    def wait_all_up(self, timeout: float = 10.0) -> None:
        wait_until(lambda: set(self.node_states().values()) == {"up"}, timeout,
                   what="NODES showing every node up")

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.procs.close()


@pytest.fixture
def make_cluster(tmp_path: Path, procs: Procs) -> Iterator[Any]:
    """``make_cluster(nodes=3, limits=..., proxy=..., start=True)``: a Cluster on free
    ports under tmp_path; every process is killed when the test ends."""
    made: list[Cluster] = []

    def make(nodes: int = 3, start: bool = True, proxy_env: dict[str, str] | None = None,
             **settings: Any) -> Cluster:
        topo = Topo(tmp_path / f"cluster{len(made)}", nodes, **settings)
        cluster = Cluster(topo, procs)
        cluster.proxy_env = proxy_env
        made.append(cluster)
        return cluster.start() if start else cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: Any) -> Keys:
    """One set of CURVE keys for the session's secure clusters."""
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def cluster(make_cluster: Any) -> Cluster:
    """A running 3-node cluster of its own for one test (kill and restart freely)."""
    return make_cluster()  # type: ignore[no-any-return]


def module_cluster(request: Any, tmp_path_factory: Any, **settings: Any) -> Iterator[Cluster]:
    """The body of a module-scoped cluster fixture: one cluster shared by the tests
    of a module that only read and write (and do not kill anything)."""
    directory = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    manager = Procs(str(directory))
    cluster = Cluster(Topo(directory, **settings), manager)
    try:
        yield cluster.start()
    finally:
        cluster.close()
