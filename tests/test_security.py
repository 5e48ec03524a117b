"""CURVE on every link, roles, key rotation, secure defaults and RESP AUTH (zkv.security).

The pure parts (key files, the keyring, the role table, AUTH's planning) are tested
as functions; everything a peer sees (a refused handshake, NOPERM, a key cut off,
a PULL socket that takes no stranger's pushes) through real processes and sockets.
ADD, REMOVE and failover with CURVE on run the replication suite's own scenarios,
unchanged, over secure topologies (see conftest.curve_by_default).
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from conftest import REPO, Cluster, Keys, free_port, wait_until

import zkv
from zkv.config import SecurityConfig, parse_topology
from zkv.core import protocol as P
from zkv.core import resp
from zkv.errors import ConfigError, NoAuth, NoPerm, NotSent
from zkv.security import (
    ADMIN,
    CLIENT,
    CLUSTER,
    Curve,
    Keyring,
    check_exposure,
    curve_for,
    keygen,
    load_secret,
    permits,
)

pytestmark = pytest.mark.timeout(120)


def public_of(path: str) -> str:
    return zmq.auth.load_certificate(path)[0].decode()


# -- key files and the keyring, as functions ---------------------------------------------
def test_keygen_writes_a_pair_in_zmq_auth_format_and_never_overwrites(tmp_path: Path) -> None:
    public, secret = keygen(str(tmp_path / "keys" / "alice"))
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    pub, sec = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (pub, None) and sec is not None
    assert zmq.curve_public(sec) == pub  # a real pair
    with pytest.raises(ConfigError, match="exists already"):
        keygen(str(tmp_path / "keys" / "alice"))
    done = subprocess.run([sys.executable, "-m", "zkv", "keygen", str(tmp_path / "bob")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "bob.key_secret" in done.stdout
    again = subprocess.run([sys.executable, "-m", "zkv", "keygen", str(tmp_path / "bob")],
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "exists already" in again.stderr
    assert "Traceback" not in again.stderr


def test_secret_keys_with_loose_permissions_or_the_wrong_half_are_refused(
        tmp_path: Path) -> None:
    public, secret = keygen(str(tmp_path / "k"))
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 0644\); run chmod 600"):
        load_secret(secret)
    os.chmod(secret, 0o600)
    assert load_secret(secret)[0] == zmq.auth.load_certificate(public)[0]
    with pytest.raises(ConfigError, match="holds no secret key"):
        load_secret(public)  # (mode 0644: the public half is named as such first)
    (tmp_path / "junk").write_text("hello")
    os.chmod(tmp_path / "junk", 0o600)
    with pytest.raises(ConfigError, match="not a key file"):
        load_secret(str(tmp_path / "junk"))
    with pytest.raises(ConfigError, match="No such file"):
        load_secret(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"clients .*nowhere: not a directory \(the "
                                          r"client keys' directory: --clients"):
        curve_for(SecurityConfig(key=secret, clients=str(tmp_path / "nowhere")), "test")
    with pytest.raises(ConfigError, match="no key"):
        curve_for(SecurityConfig(clients=str(tmp_path)), "test")


def test_the_keyring_gives_each_key_its_highest_role_and_follows_its_directories(
        keys: Keys, tmp_path: Path) -> None:
    clients, admins = tmp_path / "clients", tmp_path / "admins"
    clients.mkdir()
    admins.mkdir()
    shutil.copy(keys.client.removesuffix("_secret"), clients)
    shutil.copy(keys.admin.removesuffix("_secret"), admins)
    shutil.copy(keys.admin.removesuffix("_secret"), clients)  # an admin is a client too
    cluster = zmq.auth.load_certificate(keys.cluster)[0]
    ring = Keyring({CLIENT: str(clients), ADMIN: str(admins)}, cluster)
    assert ring.role(cluster.decode()) == CLUSTER
    assert ring.role(public_of(keys.client)) == CLIENT
    assert ring.role(public_of(keys.admin)) == ADMIN
    assert ring.role(public_of(keys.rogue)) is None
    assert ring.admits("zkv", public_of(keys.client))
    assert not ring.admits("zkv-cluster", public_of(keys.client))
    assert ring.admits("zkv-cluster", cluster.decode())
    # a key added, and one removed: seen at the next look (not before RELOAD_EVERY)
    shutil.copy(keys.rogue.removesuffix("_secret"), clients)
    os.remove(clients / "app.key")
    assert ring.refresh(100.0)
    assert ring.role(public_of(keys.rogue)) == CLIENT
    assert ring.role(public_of(keys.client)) is None
    shutil.copy(keys.client.removesuffix("_secret"), clients)
    assert not ring.refresh(100.5)  # too soon to look again
    assert ring.role(public_of(keys.client)) is None
    assert ring.refresh(101.5) and ring.role(public_of(keys.client)) == CLIENT
    assert not ring.refresh(103.0)  # nothing changed since
    # a file that is not a key (empty, junk, a directory, a dangling link) is skipped,
    # never the other keys of its directory
    (clients / "empty.key").write_text("")
    (clients / "junk.key").write_bytes(os.urandom(64))
    (clients / "dir.key").mkdir()
    (clients / "dangling.key").symlink_to(tmp_path / "nowhere")
    assert ring.refresh(105.0)
    assert ring.role(public_of(keys.client)) == CLIENT
    assert ring.role(public_of(keys.rogue)) == CLIENT


def test_refusals_are_logged_within_a_budget_whatever_keys_an_attacker_mints(
        keys: Keys, caplog: Any) -> None:
    """One line per refused key at most every ten seconds, and at most twenty lines in
    all in that time: a fresh key per connection costs an attacker nothing."""
    from zkv.security import _LOG_LINES
    from zkv.zap import Authenticator

    ring = Keyring({}, zmq.auth.load_certificate(keys.cluster)[0])
    auth = Authenticator(zmq.Context.instance(), ring, "proxy test")
    with caplog.at_level("WARNING", logger="zkv.security"):
        for _ in range(3):
            assert not auth.callback("zkv", public_of(keys.rogue).encode())
        for _ in range(100):
            assert not auth.callback("zkv", zmq.curve_keypair()[0])
    lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(lines) == _LOG_LINES
    assert sum(public_of(keys.rogue) in r.getMessage() for r in lines) == 1
    assert auth.callback("zkv", zmq.auth.load_certificate(keys.cluster)[0])


@pytest.mark.parametrize("role,kind,allowed", [
    (None, "read", False), (CLIENT, "read", True), (CLIENT, "write", True),
    (CLIENT, "meta", True), (CLIENT, "admin", False), (CLIENT, "internal", False),
    (ADMIN, "admin", True), (ADMIN, "internal", False), (CLUSTER, "internal", True),
    (CLUSTER, "admin", True),
])
def test_roles_permit_kinds_of_command(role: str | None, kind: str, allowed: bool) -> None:
    assert permits(role, kind) is allowed


def test_data_keys_may_send_what_the_routing_core_sends_during_a_move() -> None:
    """The direct client runs the routing core, which reads and fills moving keys."""
    for op in ("XGET", "XPEEK", "XFILL", "XSEEN", "XDEL"):
        assert permits(CLIENT, "internal", op) and not permits(None, "internal", op)
    for op in ("XSEND", "XBEGIN", "XREPL", "XCONFIG", "XFLUSH", "XBACKUP", "XHEALTH"):
        assert not permits(CLIENT, "internal", op) and not permits(ADMIN, "internal", op)


def test_listening_off_loopback_needs_curve_or_insecure(monkeypatch: Any) -> None:
    import socket

    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a: [] if host.endswith(
        ".example.com") else resolve(host, *a))  # (as if this machine's DNS knew it)
    for host in ("127.0.0.1", "::1", "localhost", "127.8.9.1"):
        check_exposure(host, None, False, "node x")
    with pytest.raises(ConfigError, match="cannot listen on node1.invalid: no such host"):
        check_exposure("node1.invalid", None, False, "node x")  # (the mistake to name)
    for host in ("0.0.0.0", "10.1.2.3", "::", "node1.example.com"):
        with pytest.raises(ConfigError, match=f"would listen on {host} without CURVE"):
            check_exposure(host, None, False, "node x")
        check_exposure(host, None, True, "node x")  # --insecure: knowingly


def test_a_topologys_security_section_is_read_and_checked() -> None:
    doc = {"nodes": [{"address": "127.0.0.1:7001"}],
           "security": {"key": "keys/cluster.key_secret", "clients": "keys/clients",
                        "admins": "keys/admins", "resp_password_file": "keys/resp.pass"}}
    topo = parse_topology(doc, "t.yaml")
    assert topo.security == SecurityConfig(key="keys/cluster.key_secret",
                                           clients="keys/clients", admins="keys/admins",
                                           resp_password_file="keys/resp.pass")
    assert topo.security.merged(key="other", insecure=False).key == "other"
    with pytest.raises(ConfigError, match="t.yaml: security: unknown key 'cleints'"):
        parse_topology({**doc, "security": {"cleints": "x"}}, "t.yaml")
    with pytest.raises(ConfigError, match="t.yaml: security.insecure: expected true or false"):
        parse_topology({**doc, "security": {"insecure": "yes"}}, "t.yaml")


def test_resp_auth_is_asked_before_anything_else() -> None:
    ctx = resp.Context(P.DEFAULT_LIMITS, resp.Cursors(), password="s3cret")
    s = resp.Session(1)

    def run(*words: bytes) -> bytes:
        plan = resp.plan_command(s, list(words), ctx)
        assert isinstance(plan, resp.Reply), plan
        return plan.data

    assert run(b"GET", b"k").startswith(b"-NOAUTH Authentication required")
    assert run(b"PING").startswith(b"-NOAUTH")
    assert run(b"HELLO", b"3").startswith(b"-NOAUTH HELLO must be called")
    assert run(b"AUTH", b"wrong").startswith(b"-WRONGPASS")
    assert run(b"AUTH", b"nobody", b"s3cret").startswith(b"-WRONGPASS")
    assert run(b"RESET") == b"+RESET\r\n"  # (taken before AUTH, as Redis takes it)
    assert run(b"AUTH", b"s3cret") == b"+OK\r\n"
    assert run(b"PING") == b"+PONG\r\n"
    # a wrong password after a login (a pooled client during a rotation) keeps the login
    assert run(b"AUTH", b"old-password").startswith(b"-WRONGPASS")
    assert run(b"PING") == b"+PONG\r\n"
    assert run(b"RESET") == b"+RESET\r\n"
    assert run(b"PING").startswith(b"-NOAUTH")  # RESET forgets the login, as Redis's
    assert run(b"HELLO", b"3", b"AUTH", b"default", b"bad").startswith(b"-WRONGPASS")
    assert run(b"HELLO", b"3", b"AUTH", b"default", b"s3cret").startswith(b"%7")
    assert s.proto == 3 and s.authed
    open_ctx = resp.Context(P.DEFAULT_LIMITS, resp.Cursors())
    plan = resp.plan_command(resp.Session(2), [b"AUTH", b"x"], open_ctx)
    assert isinstance(plan, resp.Reply) and b"without any password configured" in plan.data
    # with a user, as Redis answers it when the default user has no password
    for words, reply in (([b"AUTH", b"default", b"x"], b"+OK\r\n"),
                         ([b"AUTH", b"alice", b"x"], b"-WRONGPASS"),
                         ([b"AUTH", b"a", b"b", b"c"], b"-ERR syntax error")):
        plan = resp.plan_command(resp.Session(2), words, open_ctx)
        assert isinstance(plan, resp.Reply) and plan.data.startswith(reply), (words, plan)


# -- through real processes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure(request: Any, tmp_path_factory: Any) -> Any:
    """Two nodes and a proxy with CURVE on, shared by the tests that change nothing."""
    from conftest import module_cluster

    keys = Keys(tmp_path_factory.mktemp("secure-keys"))
    gen = module_cluster(request, tmp_path_factory, nodes=2, security=keys)
    cluster = next(gen)
    yield cluster
    next(gen, None)


def client(cluster: Cluster, key: str | None, server: str | None = None,
           address: str | None = None, timeout: float = 3.0) -> zkv.Client:
    keys = cluster.topo.keys
    assert keys is not None
    c = zkv.Client(address or cluster.address, timeout=timeout, retries=0,
                   curve_key=key or "", server_key=(server or keys.cluster) if key else None)
    cluster._clients.append(c)
    return c


def test_data_keys_read_and_write_and_only_admin_keys_change_the_cluster(secure: Any) -> None:
    keys = secure.topo.keys
    data = client(secure, keys.client)
    data.set("greeting", "hello")
    assert data.get("greeting") == b"hello"
    assert data.incr("n") == 1 and data.delete("n") == 1
    assert [n["state"] for n in data.nodes()] == ["up", "up"]  # reading the cluster is data
    with pytest.raises(NoPerm, match="ADD needs an admin key; this connection's key is a "
                                     "client key"):
        data.add_node("127.0.0.1:1")
    with pytest.raises(NoPerm, match="REMOVE needs an admin key"):
        data.remove_node(secure.node_addrs[0])
    with pytest.raises(NoPerm, match="MOVE needs an admin key"):
        data.call("MOVE", "ABORT")
    with pytest.raises(NoPerm, match="FLUSHALL needs an admin key"):
        data.flushall()
    assert len(data.status()["members"]) == 2  # nothing changed
    admin = client(secure, keys.admin)
    assert admin.get("greeting") == b"hello"
    admin.set("scratch", "x")
    assert admin.flushall() and admin.dbsize() == 0  # (greeting too: set it back)
    admin.set("greeting", "hello")
    # an admin's ADD gets as far as checking the node: its right was not the problem
    with pytest.raises(zkv.ZkvError) as err:
        admin.add_node(f"127.0.0.1:{free_port()}")
    assert not isinstance(err.value, (NoPerm, NoAuth))


def test_peers_without_an_allowed_key_are_refused_at_once_and_say_why(secure: Any) -> None:
    """No key, a stranger's key, the wrong server key: each fails within the client's
    timeout with an error naming the likely cause, never a silent hang; the proxy logs
    the stranger's public key (and no secret key, ever)."""
    keys = secure.topo.keys
    began = time.monotonic()
    with pytest.raises(NotSent, match="requires? CURVE"):
        client(secure, None).get("greeting")
    with pytest.raises(NotSent, match="refused this client's key: it is not in the "
                                      "server's allowed keys"):
        client(secure, keys.rogue).get("greeting")
    with pytest.raises(NotSent, match="server key is most likely wrong"):
        client(secure, keys.client, server=keys.client.removesuffix("_secret")).get("x")
    assert time.monotonic() - began < 3 * 3.0
    for node in secure.node_addrs:  # the nodes' own sockets, likewise
        with pytest.raises(NotSent, match="refused this client's key"):
            client(secure, keys.rogue, address=node).info()
        with pytest.raises(NotSent, match="requires? CURVE"):
            client(secure, None, address=node).info()
    rogue = public_of(keys.rogue)
    wait_until(lambda: rogue in secure.proxy.output, 5, what="the refusal logged")
    assert f"key {rogue} is not an allowed key" in secure.proxy.output
    logs = secure.proxy.output + "".join(p.output for p in secure.nodes.values())
    for secret in (keys.cluster_secret, keys.client, keys.admin, keys.rogue):
        assert zmq.auth.load_certificate(secret)[1].decode() not in logs


def test_a_node_takes_internal_operations_only_from_cluster_keys(secure: Any) -> None:
    keys = secure.topo.keys
    node = secure.node_addrs[0]
    data = client(secure, keys.client, address=node)
    assert int(data.info()["keys"]) >= 0  # a direct client's data key may read a node
    for op, args in (("XSTAT", []), ("XSEND", [{"id": "m", "pull": "tcp://1.2.3.4:9"}]),
                     ("XFLUSH", []), ("XREPL", [{}]), ("XCONFIG", [{}])):
        with pytest.raises(NoPerm, match=f"{op} needs a cluster key"):
            data.call(op, *args)
        with pytest.raises(NoPerm, match=f"{op} needs a cluster key; this connection's key "
                                         "is an admin key"):
            client(secure, keys.admin, address=node).call(op, *args)
    cluster_key = client(secure, keys.cluster_secret, address=node)
    assert "outgoing" in cluster_key.call("XSTAT")
    # what a data key may send of the routing core's steps is held to SET's limits
    from zkv.core.ring import Ring

    status = client(secure, keys.admin).status()
    ring = Ring(status["members"], status["vnodes"])

    def mine(make: Any) -> bytes:
        return next(k for k in map(make, range(1000)) if ring.owner(k) == node)

    long_key = mine(lambda i: b"%d-" % i + b"k" * 70000)
    with pytest.raises(zkv.LimitExceeded, match="key of 700.. bytes is over the limit"):
        data.call("XFILL", {"key": long_key, "value": b"v", "deadline": None})
    with pytest.raises(zkv.LimitExceeded, match="value of 16777217 bytes is over the limit"):
        data.call("XFILL", {"key": mine(lambda i: b"big-%d" % i),
                            "value": b"v" * (16 * 1024 * 1024 + 1), "deadline": None})
    # a data key under a cluster link's routing id (whose replies a node never holds
    # back) is refused everything
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"zkv-router/impostor")
    Curve.client(keys.client, keys.cluster).connect(sock)
    sock.connect(f"tcp://{node}")
    try:
        sock.send_multipart([b"t", P.encode_request("GET", b"k")])
        assert sock.poll(5000), "no reply"
        with pytest.raises(NoPerm, match="kept for the cluster's own links"):
            P.decode_reply(sock.recv_multipart()[-1])
    finally:
        sock.close(0)


def test_a_backup_with_curve_streams_to_the_cluster_key_only(secure: Any,
                                                             tmp_path: Path) -> None:
    from zkv.backup import backup, read_manifest

    keys = secure.topo.keys
    client(secure, keys.admin).mset({f"b{i}": str(i) for i in range(50)})
    with pytest.raises(zkv.ClusterError, match="runs with the cluster key"):
        backup(secure.address, str(tmp_path / "no"), curve_key=keys.admin,
               server_key=keys.cluster)
    manifest = backup(secure.address, str(tmp_path / "yes"), curve_key=keys.cluster_secret)
    assert manifest["keys"] >= 50 and read_manifest(str(tmp_path / "yes"))["keys"] >= 50
    for f in (tmp_path / "yes").glob("node-*.zkv"):  # every key: for the owner's eyes
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_a_data_keys_envelope_is_checked_key_by_key(secure: Any, zctx: Any) -> None:
    """A router's envelope is placed by the node's own configuration and not checked
    key by key; a data key's (the direct client's) is, so it cannot plant a key on a
    node that does not own it."""
    from zkv.core.ring import Ring

    keys = secure.topo.keys
    admin = client(secure, keys.admin)
    status = admin.status()
    ring = Ring(status["members"], status["vnodes"])
    node = secure.node_addrs[0]
    stray = next(b"stray-%d" % i for i in range(1000)
                 if ring.owner(b"stray-%d" % i) != node)
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    Curve.client(keys.client, keys.cluster).connect(sock)
    sock.connect(f"tcp://{node}")
    sock.send_multipart([b"\x00env1", P.encode_envelope(
        status["epoch"], [(7, P.encode_request("SET", stray, b"planted"))])])
    assert sock.poll(5000), "no reply"
    [(tag, body)] = P.decode_reply_envelope(sock.recv_multipart()[-1])
    assert tag == 7
    with pytest.raises(zkv.Moved):
        P.decode_reply(body)
    assert admin.get(stray) is None
    assert int(client(secure, keys.cluster_secret, address=node).info()["keys"]) == \
        admin.info()["nodes"][node]["keys"]


def _push_handshake(ctx: zmq.Context[Any], endpoint: str, curve: Curve | None) -> str:
    """The first handshake outcome a PUSH to ``endpoint`` sees (monitor events)."""
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.connect(push)
    mon = push.get_monitor_socket(addr=f"inproc://push-{os.urandom(4).hex()}")
    push.connect(endpoint)
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            if mon.poll(100):
                event = struct.unpack("=HI", mon.recv_multipart()[0][:6])[0]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return "succeeded"
                if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                             zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                             zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    return "failed"
        return "nothing"
    finally:
        push.disable_monitor()
        mon.close(0)
        push.close(0)


def test_a_nodes_pull_socket_takes_pushes_only_from_cluster_keys(secure: Any,
                                                                 zctx: Any) -> None:
    """The PULL port a move or a catch-up streams into: a raw PUSH without a key, or
    with a data or admin key, never completes its handshake, so nothing it sends is
    read; a push with the cluster key does."""
    keys = secure.topo.keys
    node = secure.node_addrs[0]
    port = client(secure, keys.cluster_secret, address=node).call("XSTAT")["pull_port"]
    endpoint = f"tcp://127.0.0.1:{port}"
    assert _push_handshake(zctx, endpoint, None) == "failed"
    for key in (keys.client, keys.admin, keys.rogue):
        assert _push_handshake(zctx, endpoint, Curve.client(key, keys.cluster)) == "failed"
    assert _push_handshake(zctx, endpoint, Curve.client(keys.cluster_secret)) == "succeeded"
    wait_until(lambda: "only cluster keys may connect here" in secure.nodes[node].output, 5,
               what="the refused push logged")
    assert f"key {public_of(keys.client)} is a client key" in secure.nodes[node].output


def test_a_cluster_key_removed_is_cut_off_a_push_it_opened_before(
        procs: Any, keys: Keys, tmp_path: Path, zctx: Any) -> None:
    """helper-21: ZAP sees only a connection's handshake, so a key taken out of
    --cluster-keys could go on pushing batches on a PUSH opened before; each batch's
    key is checked now."""
    extra = tmp_path / "extra"
    public, secret = keygen(str(extra / "backup"))
    port = free_port()
    node = procs.start("node", "--port", str(port), "--data-dir", str(tmp_path / "n"),
                       "--curve-key", keys.cluster_secret, "--clients", keys.clients,
                       "--cluster-keys", str(extra), ready="zkv node")
    with zkv.Client(f"127.0.0.1:{port}", timeout=3.0, curve_key=keys.cluster_secret,
                    server_key=keys.cluster) as c:
        pull = c.call("XSTAT")["pull_port"]
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    Curve.client(secret, keys.cluster).connect(push)
    push.connect(f"tcp://127.0.0.1:{pull}")
    push.send(b"not a batch")
    wait_until(lambda: "dropped a bad transfer batch" in node.output, 10,
               what="the batch read while the key is allowed")
    os.unlink(public)
    wait_until(lambda: "key directories changed" in node.output, 10, what="the refresh")
    push.send(b"not a batch either")
    key = public_of(secret)
    wait_until(lambda: f"dropped a transfer batch from key {key}" in node.output, 10,
               what="the batch refused")
    push.close(0)


def test_adding_a_key_lets_it_in_and_removing_it_cuts_it_off_without_a_restart(
        make_cluster: Any, keys: Keys, tmp_path: Path) -> None:
    cluster = make_cluster(nodes=1, security=keys)
    newcomer = keygen(str(tmp_path / "newcomer"))
    c = client(cluster, newcomer[1], timeout=2.0)
    with pytest.raises(NotSent, match="refused this client's key"):
        c.get("k")
    allowed = Path(keys.clients) / "newcomer.key"
    shutil.copy(newcomer[0], allowed)
    try:
        fresh = client(cluster, newcomer[1], timeout=2.0)
        wait_until(lambda: fresh.set("k", "v"), 10, what="the new key let in")
        assert fresh.get("k") == b"v"
        allowed.unlink()

        def cut_off() -> bool:
            try:
                fresh.get("k")
            except NoAuth:
                return True
            return False

        wait_until(cut_off, 10, what="the removed key cut off")
        with pytest.raises(NotSent, match="refused this client's key"):
            client(cluster, newcomer[1], timeout=2.0).get("k")
    finally:
        allowed.unlink(missing_ok=True)


def test_insecure_setups_off_loopback_refuse_to_start(procs: Any, tmp_path: Path,
                                                       keys: Keys) -> None:
    port = free_port()
    node = procs.start("node", "--host", "0.0.0.0", "--port", str(port), "--data-dir",
                       str(tmp_path / "n"))
    assert node.wait_exit(20) == 1
    assert "would listen on 0.0.0.0 without CURVE" in node.output
    assert "--insecure" in node.output and "Traceback" not in node.output
    proxy = procs.start("proxy", "--host", "0.0.0.0", "--port", str(free_port()), "--node",
                        f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "s"))
    assert proxy.wait_exit(20) == 1 and "without CURVE" in proxy.output
    assert not (tmp_path / "s").exists()  # refused before its state directory was made
    # with CURVE, the RESP front (which cannot have it) still needs a password there
    resp_only = procs.start("proxy", "--host", "0.0.0.0", "--port", str(free_port()),
                            "--node", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "s2"),
                            "--resp-port", str(free_port()), "--curve-key",
                            keys.cluster_secret, "--clients", keys.clients)
    assert resp_only.wait_exit(20) == 1 and "the RESP front" in resp_only.output
    assert "with no password" in resp_only.output and "--resp-password-file" in resp_only.output
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys.cluster_secret, loose)
    os.chmod(loose, 0o644)
    bad = procs.start("node", "--port", str(free_port()), "--data-dir", str(tmp_path / "b"),
                      "--curve-key", str(loose))
    assert bad.wait_exit(20) == 1 and "run chmod 600" in bad.output
    # a node whose server key is not its own: its replication and stream links would
    # never get through (helper-21: promoted, its replicas never synced, nothing said)
    other = procs.start("node", "--port", str(free_port()), "--data-dir", str(tmp_path / "o"),
                        "--curve-key", keys.cluster_secret, "--clients", keys.clients,
                        "--server-key", keys.client.removesuffix("_secret"))
    assert other.wait_exit(20) == 1 and "is not the public half of this node's key" \
        in other.output and "Traceback" not in other.output
    assert not (tmp_path / "o").exists()
    # --insecure: knowingly, and it starts
    procs.start("node", "--host", "0.0.0.0", "--port", str(free_port()), "--data-dir",
                str(tmp_path / "i"), "--insecure", ready="zkv node")


def test_the_resp_front_asks_for_the_password_in_its_file(make_cluster: Any,
                                                          tmp_path: Path) -> None:
    redis = pytest.importorskip("redis", reason="redis-py is in the test extra")
    cluster = make_cluster(nodes=1, start=False)
    cluster.start_node(cluster.node_addrs[0])
    password = tmp_path / "resp.pass"
    password.write_text("correct horse\n")
    os.chmod(password, 0o600)
    port = free_port()
    cluster.start_proxy("--config", str(cluster.topo.path), "--resp-port", str(port),
                        "--resp-password-file", str(password))
    for protocol in (2, 3):
        good = redis.Redis(port=port, password="correct horse", protocol=protocol,
                           socket_timeout=10)
        assert good.set("k", "v") and good.get("k") == b"v"
        good.close()
    anonymous = redis.Redis(port=port, socket_timeout=10, protocol=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get("k")
    anonymous.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, password="wrong", socket_timeout=10).ping()


@pytest.mark.timeout(90)
def test_configs_secure_yaml_starts_after_keygen_as_the_readme_says(procs: Any,
                                                                    tmp_path: Path) -> None:
    """From a directory of its own: the keygen commands in configs/secure.yaml, zkv up,
    then zkv cli with an admin key (and a data key refused ADD)."""
    def zkv_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "zkv", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)

    for name in ("keys/cluster", "keys/admins/ops", "keys/clients/app"):
        assert zkv_cmd("keygen", name).returncode == 0
    up = procs.start("up", str(REPO / "configs" / "secure.yaml"))
    up.wait_for("CURVE is on; connect with zkv cli --curve-key", 30)
    admin = ("cli", "--proxy", "127.0.0.1:8100", "--curve-key", "keys/admins/ops.key_secret",
             "--server-key", "keys/cluster.key")
    wait_until(lambda: zkv_cmd(*admin, "SET", "k", "v").stdout.strip() == "OK", 30,
               what="a SET through the secure proxy")
    assert zkv_cmd(*admin, "GET", "k").stdout.strip() == '"v"'
    follower = ("cli", "--proxy", "127.0.0.1:8101", "--curve-key",
                "keys/clients/app.key_secret", "--server-key", "keys/cluster.key")
    wait_until(lambda: zkv_cmd(*follower, "GET", "k").stdout.strip() == '"v"', 30,
               what="a GET through the secure follower")
    refused = zkv_cmd(*follower, "ADD", "127.0.0.1:8184")
    assert "NOPERM" in refused.stdout + refused.stderr
    for port in ("8100", "8101"):  # the config manager and the follower
        plain = zkv_cmd("cli", "--proxy", f"127.0.0.1:{port}", "--timeout", "2", "GET", "k")
        assert plain.returncode != 0 and "CURVE" in plain.stdout + plain.stderr
    up.signal(2)
    assert up.wait_exit(30) in (0, 130)


# -- the replication suite's scenarios with CURVE on ------------------------------------------
@pytest.fixture
def curve_on(monkeypatch: Any, keys: Keys) -> Keys:
    """Every topology, node and client of the test secure (as ZKV_TEST_CURVE=1 does for
    a whole run), clients with the admin key."""
    import conftest

    monkeypatch.setenv("ZKV_TEST_CURVE", "1")
    monkeypatch.setattr(conftest, "_SESSION_KEYS", [keys])
    monkeypatch.setenv("ZKV_CURVE_KEY", keys.admin)
    monkeypatch.setenv("ZKV_SERVER_KEY", keys.cluster)
    return keys


@pytest.mark.timeout(180)
def test_add_and_remove_between_replicated_shards_with_curve(
        curve_on: Keys, make_cluster: Any, procs: Any, tmp_path: Path) -> None:
    from test_replication import test_add_and_remove_move_keys_between_replicated_shards as run

    run(make_cluster, procs, tmp_path)
    assert "security:" in next(tmp_path.glob("cluster*/cluster.yaml")).read_text()


@pytest.mark.timeout(180)
def test_direct_clients_with_data_keys_through_an_add_and_a_remove(
        curve_on: Keys, monkeypatch: Any, make_cluster: Any, procs: Any,
        tmp_path: Path) -> None:
    """The direct client runs the routing core with a data key: through a move it sends
    the core's per-key steps, and a node checks every key of its envelopes (a data
    key's envelope could name a key the node does not own)."""
    from test_direct import (
        test_direct_clients_through_an_add_and_a_remove_under_load_lose_nothing as run,
    )

    monkeypatch.setenv("ZKV_CURVE_KEY", curve_on.client)
    run(make_cluster, procs, tmp_path)


@pytest.mark.timeout(180)
def test_killing_a_primary_loses_nothing_with_curve(curve_on: Keys, make_cluster: Any,
                                                    tmp_path: Path) -> None:
    from test_replication import kill_primaries

    kill_primaries(make_cluster, 1)  # (all three: test_replication, without CURVE)
    assert "security:" in next(tmp_path.glob("cluster*/cluster.yaml")).read_text()


def test_the_readme_names_the_security_flags() -> None:
    text = (REPO / "README.md").read_text()
    for flag in ("zkv keygen", "--curve-key", "--server-key", "--clients", "--admins",
                 "--cluster-keys", "--insecure", "--resp-password-file", "configs/secure.yaml"):
        assert flag in text, flag
