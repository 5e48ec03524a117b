"""A cluster across hosts: the proxy, each node and the client in a network namespace
of their own, joined by veth pairs to a bridge (DESIGN.md sections 3-4, issue 6).

Runs only as root with ``ip netns`` available; skipped with the reason otherwise.
Every address lives inside namespaces this test creates (198.18.0.0/15, the range
reserved for network tests), and every namespace and link is removed afterwards,
even when the test fails. Off loopback, every process runs with CURVE on (a process
without it refuses to start there): the nodes and the proxy with the cluster key and
the key directories, the clients with an admin key.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_READY, PROXY_READY, Keys, Proc, Procs, wait_until

PORT = 7000


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"zkvprobe{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Namespaces on one bridge: ``add(name)`` gives a host its own address."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.subnet = 18 + int(self.tag, 16) % 2, int(self.tag[:2], 16)
        self.bridge_ns = f"zkv{self.tag}br"
        self.names: dict[str, str] = {}
        self.addrs: dict[str, str] = {}
        self.created: list[str] = []
        self._run("netns", "add", self.bridge_ns)
        self.created.append(self.bridge_ns)
        self._run("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self._run("-n", self.bridge_ns, "link", "set", "br0", "up")

    def _run(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def add(self, host: str) -> str:
        i = len(self.names) + 1
        ns = f"zkv{self.tag}{host}"
        addr = f"198.{self.subnet[0]}.{self.subnet[1]}.{i}"
        self._run("netns", "add", ns)
        self.created.append(ns)
        outer = f"v{self.tag}{i}"
        self._run("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", outer,
                  "netns", self.bridge_ns)
        self._run("-n", self.bridge_ns, "link", "set", outer, "master", "br0", "up")
        self._run("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        self._run("-n", ns, "link", "set", "eth0", "up")
        self._run("-n", ns, "link", "set", "lo", "up")
        self.names[host], self.addrs[host] = ns, addr
        return addr

    def link(self, host: str, up: bool) -> None:
        """Cut or restore a host's cable (its port on the bridge)."""
        i = list(self.names).index(host) + 1
        self._run("-n", self.bridge_ns, "link", "set", f"v{self.tag}{i}", "up" if up else "down")

    def exec_args(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[host]]

    def close(self) -> None:
        for ns in reversed(self.created):
            _ip("netns", "del", ns)


def namespaces(make: Callable[[], Any]) -> Iterator[Any]:
    """The body of a fixture of namespaces: skipped where they cannot be made; every
    namespace ``make()`` creates (all named with its ``tag``) is gone afterwards."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    made = make()
    try:
        yield made
    finally:
        made.close()
        left = _ip("netns", "list").stdout
        assert made.tag not in left, f"namespaces left behind: {left}"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    yield from namespaces(Hosts)


def secure(keys: Keys) -> list[str]:
    """A node's or proxy's CURVE flags: the cluster key and the key directories."""
    return ["--curve-key", keys.cluster_secret, "--clients", keys.clients,
            "--admins", keys.admins]


def client_env(keys: Keys) -> dict[str, str]:
    """The environment of a client in a namespace: CURVE with the admin key."""
    return {**os.environ, "ZKV_CURVE_KEY": keys.admin, "ZKV_SERVER_KEY": keys.cluster}


class NetProcs(Procs):
    def spawn(self, hosts: Hosts, host: str, *args: str, ready: str | None) -> Proc:
        """Start ``zkv ARGS`` inside ``host``'s namespace (and wait for ``ready``)."""
        proc = Proc(list(args), self.cwd, prefix=hosts.exec_args(host))
        self.all.append(proc)
        if ready is not None:
            proc.wait_for(ready, 20)
        return proc


CLIENT = textwrap.dedent("""
    import json, sys, zkv
    proxy, action = sys.argv[1], sys.argv[2]
    arg = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    c = zkv.Client(proxy, timeout=3.0, retries=1)
    out = {}
    try:
        if action == "write":
            c.mset({k: v for k, v in arg.items()})
            out = {"ok": True}
        elif action == "read":
            got = {}
            for k in arg:
                try:
                    v = c.get(k)
                    got[k] = None if v is None else v.decode()
                except zkv.ZkvError as e:
                    got[k] = {"error": type(e).__name__, "message": str(e)}
            out = {"got": got}
        elif action == "nodes":
            out = {"nodes": {n["address"]: n["state"] for n in c.nodes()}}
        elif action == "owners":
            out = {"owners": {k: c.ring(k)["owner"] for k in arg}}
        elif action == "add":
            c.add_node(arg, wait_timeout=60)
            out = {"ok": True}
        elif action == "remove":
            c.remove_node(arg, wait_timeout=60)
            out = {"ok": True}
    except zkv.ZkvError as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out))
""")


@pytest.mark.timeout(240)
def test_cluster_across_hosts_survives_a_cut_link_and_moves_keys(
    hosts: Hosts, tmp_path: Path, keys: Keys
) -> None:
    procs = NetProcs(str(tmp_path))
    try:
        _run_cluster(hosts, procs, tmp_path, keys)
    finally:
        procs.close()


def _listening(hosts: Hosts, host: str) -> str:
    """The TCP sockets listening in ``host``'s namespace (``ss``'s lines)."""
    done = subprocess.run([*hosts.exec_args(host), "ss", "-Htln"], capture_output=True,
                          text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _run_cluster(hosts: Hosts, procs: NetProcs, tmp_path: Path, keys: Keys) -> None:
    proxy_ip = hosts.add("proxy")
    node_ips = {h: hosts.add(h) for h in ("n1", "n2", "n3", "n4")}
    client_ip = hosts.add("client")
    addr = {h: f"{ip}:{PORT}" for h, ip in node_ips.items()}
    # Without CURVE, a node or proxy on a host's address refuses to start (the client's
    # host: nothing else listens there), while the secure cluster starts meanwhile.
    bare = {"node": procs.spawn(hosts, "client", "node", "--host", client_ip, "--port",
                                str(PORT), "--data-dir", str(tmp_path / "bare-node"),
                                ready=None),
            "proxy": procs.spawn(hosts, "client", "proxy", "--host", client_ip, "--port",
                                 str(PORT + 1), "--state-dir", str(tmp_path / "bare-proxy"),
                                 "--node", addr["n1"], ready=None)}
    nodes = [procs.spawn(hosts, h, "node", "--host", node_ips[h], "--port", str(PORT),
                         "--data-dir", str(tmp_path / h), "--fsync", "always", *secure(keys),
                         ready=None)
             for h in ("n1", "n2", "n3", "n4")]
    for proc in nodes:
        proc.wait_for(NODE_READY, 20)
    procs.spawn(hosts, "proxy", "proxy", "--host", proxy_ip, "--port", str(PORT),
                "--state-dir", str(tmp_path / "state"), "--timeout-ms", "1000",
                *[x for h in ("n1", "n2", "n3") for x in ("--node", addr[h])],
                *secure(keys), ready=PROXY_READY)
    for what, proc in bare.items():
        assert proc.wait_exit(20) == 1, proc.output
        assert f"zkv {what}: error: {what} {client_ip}:" in proc.output, proc.output
        assert f"would listen on {client_ip} without CURVE" in proc.output, proc.output
        assert "pass --insecure" in proc.output and "Traceback" not in proc.output, proc.output
    # (refused before anything is opened: no data directory, no state directory)
    assert not (tmp_path / "bare-node").exists() and not (tmp_path / "bare-proxy").exists()
    assert _listening(hosts, "client") == ""
    proxy = f"{proxy_ip}:{PORT}"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)

    def client(action: str, arg: Any = None) -> dict[str, Any]:
        cmd = [*hosts.exec_args("client"), sys.executable, str(script), proxy, action]
        if arg is not None:
            cmd.append(json.dumps(arg))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                              env=client_env(keys))
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    data = {f"key-{i}": f"value-{i}" for i in range(300)}
    assert client("write", data) == {"ok": True}
    assert client("read", list(data))["got"] == data
    owners = client("owners", list(data))["owners"]
    assert {owners[k] for k in data} == {addr["n1"], addr["n2"], addr["n3"]}

    # cut n2's cable: its keys fail fast naming it, the rest keep serving
    hosts.link("n2", up=False)
    wait_until(lambda: client("nodes")["nodes"][addr["n2"]] == "down", 20,
               what="n2 marked down")
    got = client("read", list(data))["got"]
    for k, v in got.items():
        if owners[k] == addr["n2"]:
            assert isinstance(v, dict) and addr["n2"] in v["message"], v
        else:
            assert v == data[k]

    # restore it: it serves again
    hosts.link("n2", up=True)
    wait_until(lambda: client("nodes")["nodes"][addr["n2"]] == "up", 20, what="n2 back up")
    wait_until(lambda: client("read", list(data))["got"] == data, 20, what="all keys readable")

    # ADD a node on a fourth host, then REMOVE the first: nothing lost
    assert client("add", addr["n4"]) == {"ok": True}, "ADD across hosts"
    assert client("remove", addr["n1"]) == {"ok": True}, "REMOVE across hosts"
    assert client("read", list(data))["got"] == data
    assert set(client("nodes")["nodes"]) == {addr["n2"], addr["n3"], addr["n4"]}
