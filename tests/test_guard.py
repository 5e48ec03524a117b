"""What one client may cost a server (zkv.guard): connections past a limit are shed
without the proxy spinning, and a client that never reads its replies cannot make a
proxy or a node hold them."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import cbor2
import pytest
import zmq
from conftest import Cluster, free_port, wait_until

import zkv
from zkv.core import protocol as P

pytestmark = pytest.mark.timeout(120)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_dealers(ctx: zmq.Context[Any], address: str, n: int) -> list[zmq.Socket[Any]]:
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{address}")
        socks.append(s)
    return socks


@pytest.mark.parametrize("how", ["configured", "file-limit"])
def test_past_the_client_limit_new_connections_are_shed_and_the_rest_served(
        make_cluster: Any, zctx: zmq.Context[Any], how: str) -> None:
    """1,500 idle connections against a 1024-descriptor limit left new clients hanging
    and the proxy spinning at 100% CPU. Now the newest connections past the limit are
    shed at once: a client is told why, existing ones keep working, the CPU stays low."""
    if how == "file-limit" and shutil.which("prlimit") is None:
        pytest.skip("no prlimit here to start the proxy with a low file limit")
    cluster: Cluster = make_cluster(
        start=False, proxy={"max_clients": 30} if how == "configured" else None)
    for addr in cluster.node_addrs:
        cluster.start_node(addr)
    prefix = ["prlimit", "--nofile=160:160"] if how == "file-limit" else None
    cluster.proxy = cluster.procs.start("proxy", "--config", str(cluster.topo.path),
                                        ready="zkv proxy ", prefix=prefix)
    cluster.wait_routable()
    early = cluster.client(timeout=5)
    assert early.set("before", "the flood")
    limit = early.info()["proxy"]["max_clients"]
    assert limit == (30 if how == "configured" else 160 - 64 - 2 * 3)
    socks = idle_dealers(zctx, cluster.address, 200)
    try:
        wait_until(lambda: early.info()["proxy"]["clients_shed"] > 0, 20,
                   what="the proxy shedding connections past its limit")
        pid = cluster.proxy.popen.pid
        spent = cpu_seconds(pid)
        time.sleep(2.0)
        assert cpu_seconds(pid) - spent < 1.2  # a spinning I/O thread burns 2 s in 2 s
        info = early.info()["proxy"]
        # (a burst of connects can outrun the shedding for a moment: accept then fails
        # with EMFILE a few times, and stops once the excess is shed)
        assert info["clients"] <= limit
        assert early.get("before") == b"the flood"  # an existing client is still served
        # refused during the handshake (NotSent), or just after it with the request in
        # flight (Timeout): either way at once, and saying why
        started = time.monotonic()
        with pytest.raises(zkv.Unavailable, match="it may be at its connection limit"):
            zkv.Client(cluster.address, timeout=30, retries=0).ping()
        assert time.monotonic() - started < 10
    finally:
        for s in socks:
            s.close(0)
    wait_until(lambda: zkv.Client(cluster.address, timeout=2, retries=0).ping(), 20,
               what="new clients served again once the others left")


def never_reads(ctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 64 * 1024)
    s.connect(f"tcp://{address}")
    return s


@pytest.mark.parametrize("target", ["proxy", "node"])
def test_a_client_that_never_reads_cannot_pile_up_replies(
        make_cluster: Any, zctx: zmq.Context[Any], target: str) -> None:
    """400 pipelined GETs of a 1 MiB value, never read: the server holds at most about
    client_buffer_bytes of them; the rest are held back as short TOO_LARGE replies."""
    budget = 4 << 20
    # (a long deadline, and patience with a silent node: 400 MiB of replies may keep a
    # node on a loaded machine busy for seconds, and a node silent for heartbeat_ms x
    # heartbeat_misses is marked down, failing these GETs with small NODE_DOWN replies)
    cluster: Cluster = make_cluster(nodes=1, proxy={"client_buffer_bytes": budget,
                                                    "timeout_ms": 30_000,
                                                    "heartbeat_misses": 60},
                                    defaults={"client_buffer_bytes": budget})
    address = cluster.address if target == "proxy" else cluster.node_addrs[0]
    c = cluster.client(timeout=5, address=address)
    big = os.urandom(1 << 20)
    assert c.set("big", big)
    s = never_reads(zctx, address)
    body = P.encode_request("GET", b"big")
    for i in range(400):
        s.send_multipart([b"%d" % i, body])

    def stats() -> dict[str, Any]:
        info = c.info()
        if target != "proxy":
            return info
        # (through the proxy, the node also runs the GETs one envelope brings only until
        # their replies pass max_message_bytes: the rest come back short, "not run")
        return {**info["proxy"], "not_run": sum(
            n.get("errors", 0) for n in info["nodes"].values() if isinstance(n, dict))}

    seen: list[dict[str, Any]] = []

    def held_back() -> bool:
        seen.append(stats())
        return bool(seen[-1]["replies_held_back"] + seen[-1].get("not_run", 0) >= 300)

    try:
        wait_until(held_back, 30, what="the server holding back replies")
    except AssertionError:
        raise AssertionError(f"replies not held back: {seen[-1]}") from None
    assert stats()["unread_reply_bytes"] <= budget + (1 << 20) + 4096
    assert c.get("big") == big  # everyone else is served as before
    # once it reads, it finds its values first, then errors saying why the rest are missing
    s.setsockopt(zmq.RCVTIMEO, 5000)
    replies = [cbor2.loads(s.recv_multipart()[-1]) for _ in range(400)]
    values = [r for r in replies if r == [P.OK, big]]
    held = [r for r in replies if r[0] == P.ERR]
    assert 1 <= len(values) <= 8 and len(values) + len(held) == 400
    assert all(r[1] == "TOO_LARGE" and ("still unread" in r[2] or "not run" in r[2])
               for r in held)
    s.close(0)


def test_the_client_limit_and_buffer_are_configurable_and_checked(tmp_path: Any) -> None:
    from zkv.config import parse_topology
    from zkv.errors import ConfigError

    topo = parse_topology({"proxy": {"max_clients": 5, "client_buffer_bytes": 1 << 21},
                           "nodes": [{"port": free_port(), "max_clients": 7}]}, "t.yaml")
    assert topo.proxy.max_clients == 5 and topo.nodes[0].max_clients == 7
    with pytest.raises(ConfigError, match="proxy.max_clients"):
        parse_topology({"proxy": {"max_clients": 0}, "nodes": [{"port": 1}]}, "t.yaml")
    with pytest.raises(ConfigError, match="client_buffer_bytes"):
        parse_topology({"proxy": {"client_buffer_bytes": 100}, "nodes": [{"port": 1}]},
                       "t.yaml")
