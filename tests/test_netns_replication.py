"""Leases across real network cuts: a shard's primary and replica, the proxy and a
client each in a network namespace of their own (DESIGN.md section 8, issue 12).

Every node has a service address on its loopback, reached over one of several
bridges by routes, so that one host's cable to one bridge can be cut while its
other paths stay: the proxy and the nodes talk over bridge M, the primary ships to
its replica over bridge N, and the client reaches the nodes over bridge K (and the
proxy over M). Runs only as root with ``ip netns``; skipped with the reason
otherwise. Every namespace is removed afterwards, even when the test fails. CURVE is
on everywhere: the nodes and the proxy hold the cluster key, the client an admin key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import NODE_READY, PROXY_READY, Keys, Proc, Procs, wait_until
from test_netns import _ip, namespaces, secure

PORT = 7000


class Net:
    """Namespaces (hosts) wired to bridges (each a namespace with a bridge in it)."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.octet = int(self.tag[:2], 16)
        self.made: list[str] = []
        self.ports: dict[tuple[str, str], str] = {}  # (host, bridge) -> its port's name
        self.subnets: dict[str, str] = {}

    def run(self, *args: str) -> None:
        done = _ip(*args)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def ns(self, name: str) -> str:
        return f"zkv{self.tag}{name}"

    def host(self, name: str) -> None:
        self.run("netns", "add", self.ns(name))
        self.made.append(self.ns(name))
        self.run("-n", self.ns(name), "link", "set", "lo", "up")

    def bridge(self, name: str, subnet: str) -> None:
        self.host("b" + name)
        self.subnets[name] = subnet
        self.run("-n", self.ns("b" + name), "link", "add", "br0", "type", "bridge")
        self.run("-n", self.ns("b" + name), "link", "set", "br0", "up")

    def wire(self, host: str, bridge: str, last: int) -> str:
        """A cable from ``host`` to ``bridge``: the host's address there (.last)."""
        port = f"p{self.tag}{len(self.ports)}"
        dev = f"e{bridge}"
        self.run("link", "add", dev, "netns", self.ns(host), "type", "veth", "peer", "name",
                 port, "netns", self.ns("b" + bridge))
        self.run("-n", self.ns("b" + bridge), "link", "set", port, "master", "br0", "up")
        addr = f"{self.subnets[bridge]}.{last}"
        self.run("-n", self.ns(host), "addr", "add", f"{addr}/24", "dev", dev)
        self.run("-n", self.ns(host), "link", "set", dev, "up")
        self.ports[(host, bridge)] = port
        return addr

    def service(self, host: str, addr: str) -> None:
        self.run("-n", self.ns(host), "addr", "add", f"{addr}/32", "dev", "lo")

    def route(self, host: str, dest: str, via: str) -> None:
        self.run("-n", self.ns(host), "route", "add", f"{dest}/32", "via", via)

    def cut(self, host: str, bridge: str, up: bool = False) -> None:
        self.run("-n", self.ns("b" + bridge), "link", "set", self.ports[(host, bridge)],
                 "up" if up else "down")

    def exec_args(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def close(self) -> None:
        for ns in reversed(self.made):
            _ip("netns", "del", ns)


@pytest.fixture
def net() -> Iterator[Net]:
    yield from namespaces(Net)


CLIENT = textwrap.dedent("""
    import json, sys, time, zkv
    action, target, curve_key, server_key = sys.argv[1:5]
    arg = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    keys = {"curve_key": curve_key, "server_key": server_key}  # CURVE, with an admin key
    out = {}
    if action == "hammer":  # writes straight to one node for a while: every outcome
        seconds, prefix = arg
        c = zkv.Client(target, timeout=0.3, retries=0, **keys)
        began, i, seen = time.monotonic(), 0, []
        while time.monotonic() - began < seconds:
            at = round(time.monotonic() - began, 3)
            try:
                c.set(f"{prefix}-{i}", "x")
                seen.append([at, "ok", ""])
            except zkv.ZkvError as e:
                seen.append([at, type(e).__name__, str(e)])
            i += 1
            time.sleep(0.05)
        out = {"seen": seen}
    else:
        c = zkv.Client(target, timeout=3.0, retries=1, **keys)
        try:
            if action == "write":
                c.mset(arg)
                out = {"ok": True}
            elif action == "read":
                out = {"got": {k: (None if v is None else v.decode())
                               for k, v in zip(arg, c.mget(arg))}}
            elif action == "nodes":
                out = {"nodes": c.nodes()}
        except zkv.ZkvError as e:
            out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out))
""")


@pytest.mark.timeout(240)
def test_a_cut_off_primary_stops_at_its_lease_and_no_replica_is_promoted_early(
        net: Net, tmp_path: Path, keys: Keys) -> None:
    procs = Procs(str(tmp_path))
    try:
        _run(net, procs, tmp_path, keys)
    finally:
        procs.close()


def _run(net: Net, procs: Procs, tmp_path: Path, keys: Keys) -> None:
    t = net.octet
    for name, subnet in (("M", f"198.18.{t}"), ("N", f"198.19.{t}"),
                         ("K", f"198.18.{t ^ 128}")):
        net.bridge(name, subnet)
    for h in ("proxy", "p", "r", "client"):
        net.host(h)
    m = {h: net.wire(h, "M", i) for i, h in enumerate(("proxy", "p", "r", "client"), 1)}
    n = {h: net.wire(h, "N", i) for i, h in enumerate(("p", "r"), 1)}
    k = {h: net.wire(h, "K", i) for i, h in enumerate(("p", "r", "client"), 1)}
    svc = {"p": f"198.19.{t ^ 128}.1", "r": f"198.19.{t ^ 128}.2"}
    for h, addr in svc.items():
        net.service(h, addr)
        net.route("proxy", addr, m[h])  # proxy -> node: bridge M
        net.route("client", addr, k[h])  # client -> node: bridge K
    net.route("p", svc["r"], n["r"])  # node -> node (replication, catch-up): bridge N
    net.route("r", svc["p"], n["p"])
    primary, replica = f"{svc['p']}:{PORT}", f"{svc['r']}:{PORT}"

    def spawn(host: str, *args: str, ready: str | None) -> Proc:
        proc = Proc([*args, *secure(keys)], procs.cwd, prefix=net.exec_args(host))
        procs.all.append(proc)
        if ready is not None:
            proc.wait_for(ready, 20)
        return proc

    nodes = [spawn(h, "node", "--host", svc[h], "--port", str(PORT), "--data-dir",
                   str(tmp_path / h), "--fsync", "always", ready=None) for h in ("p", "r")]
    for proc in nodes:
        proc.wait_for(NODE_READY, 20)
    spawn("proxy", "proxy", "--host", m["proxy"], "--port", str(PORT), "--state-dir",
          str(tmp_path / "state"), "--node", primary, "--replica", f"{primary}={replica}",
          ready=PROXY_READY)
    proxy = f"{m['proxy']}:{PORT}"
    script = tmp_path / "client.py"
    script.write_text(CLIENT)

    def client(action: str, target: str, arg: Any = None) -> dict[str, Any]:
        cmd = [*net.exec_args("client"), sys.executable, str(script), action, target,
               keys.admin, keys.cluster]
        if arg is not None:
            cmd.append(json.dumps(arg))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def roles() -> dict[str, tuple[str, bool]]:
        rows = client("nodes", proxy).get("nodes", [])
        return {r["address"]: (r.get("role", ""), bool(r.get("in_sync"))) for r in rows}

    def in_sync(new_primary: str, new_replica: str) -> bool:
        return roles() == {new_primary: ("primary", False), new_replica: ("replica", True)}

    wait_until(lambda: in_sync(primary, replica), 30, what="the replica in sync")
    data = {f"a-{i}": f"v-{i}" for i in range(100)}
    assert client("write", proxy, data) == {"ok": True}

    # 1. The primary loses the proxy and its replica; a client still reaches it. No
    # write it takes can be acknowledged (its in-sync replica cannot confirm it), and
    # once its lease is out it refuses outright.
    net.cut("p", "M")
    net.cut("p", "N")
    seen = client("hammer", primary, [4.0, "during"])["seen"]
    assert not [s for s in seen if s[1] == "ok"], seen
    refused = [s for s in seen if "no lease" in s[2]]
    assert refused and refused[0][0] < 2.5, seen  # the lease is 1.2 s
    # the replica has heard nothing for its grace period, the proxy nothing from the
    # primary: the replica is promoted
    wait_until(lambda: roles().get(replica, ("", False))[0] == "primary", 20,
               what="the replica promoted")
    assert client("write", proxy, {"b": "after"}) == {"ok": True}
    net.cut("p", "M", up=True)
    net.cut("p", "N", up=True)
    wait_until(lambda: in_sync(replica, primary), 30, what="the old primary synced back")
    # nothing the cut-off primary logged is ever read
    during = [f"during-{i}" for i in range(len(seen))]
    got = client("read", proxy, [*data, "b", *during])["got"]
    assert {x: got[x] for x in data} == data and got["b"] == "after"
    assert not {x: got[x] for x in during if got[x] is not None}

    # 2. The primary (now the other node) loses the proxy alone: it keeps its lease
    # from its replica, keeps serving whoever reaches it, and nobody is promoted.
    net.cut("r", "M")
    seen = client("hammer", replica, [5.0, "cut-from-proxy"])["seen"]
    assert all(s[1] == "ok" for s in seen), [s for s in seen if s[1] != "ok"][:5]
    shard = {a: role for a, (role, _) in roles().items()}
    assert shard == {replica: "primary", primary: "replica"}  # no promotion
    net.cut("r", "M", up=True)
    wait_until(lambda: in_sync(replica, primary), 30, what="the cluster whole again")
    kept = [f"cut-from-proxy-{i}" for i in range(len(seen))]
    # (the proxy routes to the primary again once it answers a heartbeat)
    wait_until(lambda: set(client("read", proxy, kept).get("got", {}).values()) == {"x"},
               20, what="every write taken while cut from the proxy readable through it")
