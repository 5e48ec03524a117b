"""A router shell: one ROUTER for clients, one DEALER per storage node, one poll loop.

Data requests go through the routing core (:class:`zkv.core.router.Router`): the shell
feeds it what the front reads and what the nodes answer, and sends what it returns,
each node's requests of a loop turn together in one envelope that carries the
epoch they were routed by. INFO and NODES gather every node's answer here.
Heartbeats (:class:`zkv.core.cluster.Health`, XHEALTH) mark silent nodes down so their
keys fail fast with an error naming the node while the rest keep working.

With CURVE (zkv.security) the front is a CURVE server and every request is checked
against the role of the key it came from (ADD and the like need an admin key); the
links to the nodes present the cluster key.

Two kinds of proxy are built on it: the config manager (:class:`zkv.proxy.Proxy`,
which owns the state directory and changes the configuration) and a follower
(:class:`zkv.follower.Follower`, which learns it).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import frames as wire
from . import metrics
from .config import format_address
from .core import protocol as P
from .core.cluster import NODE_KEY, ClusterState, Health
from .core.placement import Placement
from .core.ring import Ring
from .core.router import CORE_OPS, Router
from .errors import (
    ClusterError,
    CommandError,
    ConfigError,
    InternalError,
    NodeUnavailable,
    ProtocolError,
    Timeout,
    ZkvError,
)
from .guard import (
    FD_RESERVE,
    FRONT_HWM,
    ROUTER_ID_PREFIX,
    ConnectionGuard,
    OutputBudget,
    client_limit,
    raise_fd_limit,
    rss_bytes,
)
from .respfront import LISTEN_BACKLOG, RespFront
from .security import Curve, check_exposure, check_resp_exposure, require

log = logging.getLogger("zkv.proxy")

HEARTBEAT_TAG = b"hb"
PING_BODY = P.encode_request("XHEALTH")
ENVELOPE_FRAME = b"\x00env"  # the routing frame of an envelope: this prefix and its number
ENVELOPE_MAX = 1024  # requests in one envelope
HOUSEKEEPING_EVERY = 0.01  # seconds between heartbeat/timer checks
# A loop that was away this long (stopped, a paused VM, a long turn of its own) waits
# STALL_GRACE before it times out requests or calls nodes down: the nodes' answers may
# still be in the kernel's buffers, which the I/O thread, stopped too, has yet to read.
STALL_GAP = 0.25
STALL_GRACE = 0.2
MAX_PER_TURN = 4096
DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_CLIENT_BUFFER = 64 << 20  # bytes of unread replies one client may have

_TAG = struct.Struct("<Q")


class Gather:
    """Collects the replies of the requests one client request (INFO, NODES) was split
    into; the reply once all are in."""

    __slots__ = ("done", "finish", "left", "results", "routing")

    def __init__(self, routing: list[bytes], parts: int,
                 finish: Callable[[list[Any]], Any]) -> None:
        self.routing = routing
        self.results: list[Any] = [None] * parts
        self.left = parts
        self.finish = finish  # results (values or ZkvError) -> result, may raise
        self.done = False

    def deliver(self, part: int, result: Any) -> bytes | None:
        """Record one part's result (a value or a ZkvError); the reply body once complete."""
        if self.done:
            return None
        self.results[part] = result
        self.left -= 1
        if self.left:
            return None
        self.done = True
        try:
            return P.encode_ok(self.finish(self.results))
        except ZkvError as exc:
            return P.encode_exc(exc)


def _by_size(items: list[tuple[int, bytes]], limit: int) -> list[list[tuple[int, bytes]]]:
    """Items cut into runs of at most ``limit`` bytes (a longer item alone in its run)."""
    runs: list[list[tuple[int, bytes]]] = [[]]
    size = 0
    for item in items:
        if runs[-1] and size + len(item[1]) + 12 > limit:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += len(item[1]) + 12
    return runs


def _flushed(results: list[Any]) -> Any:
    """FLUSHALL's reply: OK once every member has flushed, else the first error."""
    for result in results:
        if isinstance(result, ZkvError):
            raise result
    return "OK"


class ProxyShell:
    def __init__(
        self,
        state: ClusterState,
        host: str = "127.0.0.1",
        port: int = 8000,
        timeout_ms: int = 2000,
        heartbeat_ms: int = 500,
        heartbeat_misses: int = 3,
        limits: P.Limits = P.DEFAULT_LIMITS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
        knows_every_write: bool = False,
        notes: list[str] | None = None,
    ) -> None:
        self.address = format_address(host, port)
        self.max_clients = max_clients
        self.client_buffer_bytes = client_buffer_bytes
        self.host, self.port = host, port
        self.timeout = timeout_ms / 1000.0
        self.limits = limits
        self.health = Health(heartbeat_ms / 1000.0, heartbeat_misses)
        self.notes: list[str] = notes if notes is not None else []
        self.node_keys: dict[str, tuple[int, float]] = {}  # last INFO key count, and when
        self.state = state
        self.cluster_tag = P.cluster_tag(state.cluster)
        self.ring: Ring = self.state.ring()
        self.placement = Placement(self.state)
        # the routing core (zkv.core.router); ``knows_every_write``: this is the only router
        # (the config manager, unless a node says it hears from another)
        self.router = Router(self.placement, limits, self.timeout,
                             knows_every_write=knows_every_write)
        self.envelopes: dict[bytes, set[int]] = {}  # envelope frame -> tags not answered
        self._envelopes = 0
        self._owner: list[bytes] | None = None  # the client whose request is being worked on
        self._serving = False
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.front: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.out = OutputBudget(self.front, client_buffer_bytes)
        # how this proxy's links are named at the nodes (unique per run: a restarted
        # proxy must not collide with its old connections while they linger)
        self._router_id = (ROUTER_ID_PREFIX + self.address.encode() + b"/"
                           + os.urandom(4).hex().encode())
        self.guard: ConnectionGuard | None = None
        # links by link key (zkv.core.cluster.ClusterState.link_keys): a shard's name reaches
        # its primary, NODE_KEY + address one other node of a replicated shard
        self.links: dict[str, zmq.Socket[bytes]] = {}
        self.link_address: dict[str, str] = {}  # link key -> the address it is connected to
        self._links_made = 0
        self._addresses: dict[str, str] = state.link_keys()
        self.by_socket: dict[zmq.Socket[bytes], str] = {}
        # the latest replication report of each node (heartbeat answers), by address:
        # (when, the node's epoch, the report)
        self.repl_reports: dict[str, tuple[float, int, dict[str, Any]]] = {}
        self._new_reports = False  # a report came in since the config manager looked
        self.poller = zmq.Poller()
        self.pending: dict[bytes, tuple[Any, str, int, list[bytes] | None]] = {}
        self.deadlines: collections.deque[tuple[float, bytes]] = collections.deque()
        self.slow_deadlines: list[tuple[float, bytes]] = []  # admin steps with long deadlines
        self.timers: list[tuple[float, Callable[[], None], list[bytes] | None]] = []
        self._seq = 0
        self._stop = False
        self.started = time.monotonic()
        self.requests = 0
        self.errors = 0
        self.resp: RespFront | None = None
        self.metrics_port: int | None = None
        self.op_counts: dict[str, int] = {}  # requests the shell serves itself, by op
        self.error_codes: dict[tuple[str, str], int] = {}  # its error replies, (op, code)
        self.resp_port: int | None = None
        self.resp_admin = False
        self.resp_password: str | None = None  # AUTH on the RESP front (requirepass)
        # CURVE (zkv.security): set before run; None serves without it (loopback only,
        # unless ``insecure``)
        self.curve: Curve | None = None
        self.insecure = False
        self._role: str | None = None  # the role of the key whose request is handled
        self._ops: dict[str, Callable[[list[bytes], list[Any]], None]] = {
            "INFO": self._info,
            "CONFIG": lambda r, a: self._answer(r, self.config_doc(*a[:1])),
            "NODES": self._nodes,
            "RING": self._ring,
            "STATUS": lambda r, a: self._answer(r, self.status()),
            "FLUSHALL": lambda r, a: self.flush_all(r),
        }

    def enable_resp(self, port: int | None, admin: bool = False) -> None:
        """Serve Redis clients on ``port`` too (zkv.respfront), once running; ``admin``
        allows admin commands (FLUSHALL) there."""
        self.resp_port, self.resp_admin = port, admin

    def configured_links(self) -> list[str]:
        """The links open to nodes of the configuration in effect (not those kept open to
        a node taken out, to tell it so)."""
        return [key for key in self.links if key in self._addresses]

    def address_of(self, key: str) -> str:
        """The address link key ``key`` reaches (a shard's primary, or the node named)."""
        found = self._addresses.get(key)
        if found is not None:
            return found
        return key[len(NODE_KEY):] if key.startswith(NODE_KEY) else key

    def key_of(self, address: str) -> str:
        """A link key that reaches the node at ``address``: a link already connected
        there, else its key in the configuration in effect, else NODE_KEY + address."""
        for key, where in self.link_address.items():
            if where == address:
                return key
        for key, where in self._addresses.items():
            if where == address:
                return key
        return address if address in self.state.involved() else NODE_KEY + address

    def _connect(self, addr: str) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        if self.curve is not None:
            self.curve.connect(sock)
        # one routing id per link: a node's ROUTER refuses a second connection under an
        # id it already has, and a failover can briefly leave two links to one node
        self._links_made += 1
        sock.setsockopt(zmq.ROUTING_ID, self._router_id + b"#%d" % self._links_made)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        address = self.address_of(addr)
        sock.connect(f"tcp://{address}")
        self.links[addr] = sock
        self.link_address[addr] = address
        self.by_socket[sock] = addr
        self.poller.register(sock, zmq.POLLIN)
        self.health.track(addr, time.monotonic())

    def _disconnect(self, addr: str) -> None:
        sock = self.links.pop(addr)
        self.link_address.pop(addr, None)
        del self.by_socket[sock]
        self.poller.unregister(sock)
        sock.close(0)
        self.health.forget(addr)
        # (a link made again to this address starts up: the router must not keep it down,
        # since no heartbeat will ever tell it the node came back)
        self.router.set_down(addr, False, time.monotonic())

    # -- sending ---------------------------------------------------------------
    def _forward(self, addr: str, body: bytes, target: Any, part: int = -1,
                 timeout: float | None = None) -> None:
        """Send ``body`` to node ``addr``. Its reply goes to ``target``: the client's
        routing frames (part -1), a callable given the decoded result or error (part
        -2), or part ``part`` of a Gather."""
        if addr not in self.links:
            raise NodeUnavailable(f"node {addr} is not a member")
        if not self.health.is_up(addr):
            raise NodeUnavailable(f"{self.state.describe(addr)} is down")
        self._seq += 1
        tag = _TAG.pack(self._seq)
        try:
            wire.send(self.links[addr], [tag, body], wire.NOBLOCK)
        except zmq.Again:
            raise NodeUnavailable(f"{self.state.describe(addr)} is not connected or not "
                                  "keeping up") from None
        self.pending[tag] = (target, addr, part, self._owner)
        if timeout is None:
            self.deadlines.append((time.monotonic() + self.timeout, tag))
        else:
            self.slow_deadlines.append((time.monotonic() + timeout, tag))

    def _to_client(self, client: Any, body: bytes) -> None:
        """A reply body to a client: a ZeroMQ client's routing frames, or a command of
        the RESP front (a zkv.respfront.Slot)."""
        if type(client) is list:
            self.out.send([*client, body])
        else:
            client.answer(body)

    def _answer(self, routing: Any, result: Any) -> None:
        self._to_client(routing, P.encode_ok(result))

    def _fail(self, routing: Any, exc: ZkvError) -> None:
        self.errors += 1
        key = ("?", exc.code)  # (op, code): the shell's own errors (before or beside routing)
        self.error_codes[key] = self.error_codes.get(key, 0) + 1
        self._to_client(routing, P.encode_exc(exc))

    def _scatter(self, routing: list[bytes], bodies: dict[str, bytes],
                 finish: Callable[[list[Any]], Any], allow_down: bool = False) -> None:
        """Send one body per node; ``finish`` gets results in the order of ``bodies``."""
        if not bodies:
            self._answer(routing, finish([]))
            return
        gather = Gather(routing, len(bodies), finish)
        for part, (addr, body) in enumerate(bodies.items()):
            try:
                self._forward(addr, body, gather, part)
            except NodeUnavailable as exc:
                if not allow_down:
                    gather.done = True
                    raise
                self._deliver(gather, part, exc)

    def _deliver(self, gather: Gather, part: int, result: Any) -> None:
        reply = gather.deliver(part, result)
        if reply is not None:
            self._to_client(gather.routing, reply)

    # -- the front -------------------------------------------------------------
    def handle_front(self, frames: list[bytes], now: float) -> None:
        self.requests += 1
        routing = frames[:-1]
        self._owner = routing
        try:
            if len(frames) > self.limits.max_frames:
                raise ProtocolError(
                    f"{len(frames)} frames in one message; at most {self.limits.max_frames}"
                )
            body = frames[-1]
            op, args = P.parse_request(body, self.limits)
            if self.curve is not None:
                require(self._role, op, P.COMMANDS[op].kind, f"proxy {self.address}")
            if op in CORE_OPS:
                self.router.request_parsed(routing, op, args, body, now)
                return
            handler = self._ops.get(op)
            if handler is None:
                raise CommandError(f"{op} is not served by the proxy")
            self.op_counts[op] = self.op_counts.get(op, 0) + 1
            handler(routing, args)
        except ZkvError as exc:
            self._fail(routing, exc)
        except Exception as exc:  # a bug must not take the proxy down
            log.exception("internal error")
            self._fail(routing, InternalError(f"{type(exc).__name__}: {exc}"))

    def _flush(self) -> None:
        """Carry out what the routing core has for us: each node's requests of this turn
        in one envelope (coalesced), replies to clients."""
        ready = self.router.ready()
        for node, items in ready.sends.items():
            sock = self.links.get(node)
            for start in range(0, len(items), ENVELOPE_MAX):
                chunk = items[start : start + ENVELOPE_MAX]
                for part in _by_size(chunk, self.limits.max_message_bytes):
                    self._send_envelope(node, sock, ready.epoch, part)
        send = self.out.send
        for client, body in ready.answers:
            if type(client) is list:
                send([*client, body])
            else:
                client.answer(body)
        if ready.wants is not None and ready.wants > self.state.epoch:
            self._wants(ready.wants)

    def _send_envelope(self, node: str, sock: zmq.Socket[bytes] | None, epoch: int,
                       items: list[tuple[int, bytes]]) -> None:
        tags = [tag for tag, _ in items]
        if sock is None:
            self.router.fail_tags(tags, NodeUnavailable(f"node {node} is not a member"))
            return
        self._envelopes += 1
        frame = ENVELOPE_FRAME + _TAG.pack(self._envelopes)
        try:
            wire.send(sock, [frame, P.encode_envelope(epoch, items, self.cluster_tag)],
                      wire.NOBLOCK)
        except zmq.Again:
            self.router.fail_tags(tags, NodeUnavailable(
                f"{self.state.describe(node)} is not connected or not keeping up"))
            return
        self.envelopes[frame] = set(tags)

    def _note_keys(self, addr: str, info: Any) -> None:
        if isinstance(info, dict) and isinstance(info.get("keys"), int):
            self.node_keys[addr] = (info["keys"], time.time())

    def _involved(self) -> list[str]:
        """The ring's members, then any other node a move under way involves (a node
        joining before the copy, or leaving after it)."""
        members = list(self.ring.members)
        return members + sorted(self.state.involved() - set(members))

    def _gather_info(self, routing: list[bytes], build: Callable[[dict[str, Any]], Any],
                     replicas: bool = False) -> None:
        """INFO from every shard's primary (and, with ``replicas``, from every other
        node of a replicated shard, as NODE_KEY + address) to ``build``."""
        members = self._involved()
        if replicas:
            members += [NODE_KEY + a for name in list(members)
                        for a in self.state.nodes_of(name)[1:]]
        body = P.encode_request("INFO")

        def finish(results: list[Any]) -> Any:
            infos = {
                a: ({"error": str(r), "code": r.code} if isinstance(r, ZkvError) else r)
                for a, r in zip(members, results)
            }
            for addr, info in infos.items():
                self._note_keys(addr, info)
            return build(infos)

        self._scatter(routing, {a: body for a in members}, finish, allow_down=True)

    def _info(self, routing: list[bytes], args: list[Any]) -> None:
        def build(infos: dict[str, Any]) -> Any:
            totals: dict[str, int] = {}
            for info in infos.values():
                for k in ("keys", "keys_with_ttl", "live_bytes", "rss_bytes", "log_bytes",
                          "snapshot_bytes"):
                    if isinstance(info.get(k), int):
                        totals[k] = totals.get(k, 0) + info[k]
            return {"proxy": self.info(), "nodes": infos, "totals": totals}

        self._gather_info(routing, build)

    def gather_info(self, client: Any) -> None:
        """INFO for a client of another front (the RESP front's INFO and DBSIZE)."""
        self._info(client, [])

    def flush_all(self, client: Any) -> None:
        """FLUSHALL (an admin command; on the RESP front, with --resp-admin): every
        member drops every key."""
        if self.state.move is not None:
            self._fail(client, CommandError(
                "FLUSHALL is not available while a move is under way; retry when STATUS "
                "shows no move"))
            return
        members = list(self.ring.members)
        down = [a for a in members if not self.health.is_up(a)]
        if down:  # all or nothing, as far as can be known: refuse before any node flushes
            self._fail(client, NodeUnavailable(
                f"node {down[0]} is down; FLUSHALL would leave its keys: nothing was flushed"))
            return
        body = P.encode_request("XFLUSH")
        try:
            self._scatter(client, {a: body for a in members}, _flushed)
        except ZkvError as exc:
            self._fail(client, exc)

    def _nodes(self, routing: list[bytes], args: list[Any]) -> None:
        def build(infos: dict[str, Any]) -> Any:
            return self.nodes(infos)

        self._gather_info(routing, build, replicas=True)

    def nodes(self, infos: dict[str, Any]) -> list[dict[str, Any]]:
        shares = self.ring.shares()
        move = self.state.move
        out = []
        for addr in self._involved():
            info = infos.get(addr, {})
            entry = {
                "address": addr,
                "state": "up" if self.health.is_up(addr) else "down",
                "keys": info.get("keys"),
                "share": round(shares.get(addr, 0.0), 6),
                "weight": self.state.members.get(addr, 1.0),
                "fsync": info.get("fsync"),
                "error": info.get("error"),
            }
            if move is not None and addr not in self.ring:
                entry["moving"] = "joining" if addr in move["new"] else "leaving"
            out.append(entry)
            if addr in self.state.shards:
                out.extend(self._shard_rows(addr, entry, infos))
        return out

    def _shard_rows(self, name: str, entry: dict[str, Any],
                    infos: dict[str, Any]) -> list[dict[str, Any]]:
        """A replicated shard in NODES: its primary's row (``entry``, which gets the
        primary's address) and one row per replica, with its in-sync state and lag."""
        shard = self.state.shards[name]
        primary = shard["primary"]
        entry.update(address=primary, shard=name, role="primary")
        report = self.repl_reports.get(primary, (0.0, 0, {}))[2]
        lags, states = report.get("lag", {}), report.get("state", {})
        if report.get("role") == "lost":  # (its data directory is not the shard's copy)
            entry.update(replication="lost", error=report.get("why"))
        rows = []
        for addr in shard["replicas"]:
            info = infos.get(NODE_KEY + addr, {})
            mine = self.repl_reports.get(addr, (0.0, 0, {}))[2]
            recorded = self.state.identity(name, addr)
            up = self.health.is_up(NODE_KEY + addr)
            replication = states.get(addr, "in_sync" if addr in shard["in_sync"]
                                     else "waiting")
            if recorded and mine.get("data_id") not in (None, recorded):
                replication = "lost"  # (back on another data directory)
            elif not up and replication in ("catching_up", "synced"):
                replication = "waiting"  # (the primary's session with it is stale)
            rows.append({
                "address": addr, "shard": name, "role": "replica",
                "state": "up" if up else "down",
                "in_sync": addr in shard["in_sync"],
                "replication": replication,
                "lag_s": lags.get(addr),
                "keys": info.get("keys"), "share": entry["share"], "weight": entry["weight"],
                "fsync": info.get("fsync"), "error": info.get("error"),
            })
        return rows

    def _ring(self, routing: list[bytes], args: list[Any]) -> None:
        key: bytes = args[0]
        explained = self.ring.explain(key)
        self._answer(routing, {
            "key": key,
            "owner": explained["owner"],
            "key_hash": explained["key_hash"],
            "hash_tag": explained["hash_tag"],
            "point": explained["point"],
            "epoch": self.state.epoch,
            "state": "up" if self.health.is_up(explained["owner"]) else "down",
        })

    def info(self) -> dict[str, Any]:
        return {
            "role": "proxy",
            "address": self.address,
            "pid": os.getpid(),
            "epoch": self.state.epoch,
            "members": len(self.ring.members),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests": self.requests,
            "errors": self.errors,
            "in_flight": len(self.pending) + self.router.in_flight,
            "rss_bytes": rss_bytes(),
            **(self.guard.stats() if self.guard is not None else {}),
            **self.out.stats(),
            **(self.resp.stats() if self.resp is not None else {}),
        }

    # -- keys whose owner is changing (a move in its copy phase) ---------------------
    def _reply(self, routing: list[bytes], result: Any) -> None:
        if isinstance(result, ZkvError):
            self._fail(routing, result)
        else:
            self._answer(routing, result)

    def _call(self, addr: str, op: str, args: list[Any], done: Callable[[Any], None],
              timeout: float | None = None) -> None:
        """Send a request whose decoded result (or ZkvError) goes to ``done``."""
        try:
            self._forward(addr, P.encode_request(op, *args), done, -2, timeout)
        except ZkvError as exc:
            done(exc)

    def _apply_state(self, state: ClusterState) -> None:
        self.state = state
        self.cluster_tag = P.cluster_tag(state.cluster)
        self.ring = state.ring()
        self.placement = Placement(state)
        self.router.set_placement(self.placement)
        self._addresses = state.link_keys()
        for key, address in sorted(self._addresses.items()):
            if key in self.links and self.link_address.get(key) != address:
                self._repoint(key, address)
        for addr in sorted(set(self._addresses) - set(self.links)):
            self._connect(addr)
        if self._idle():
            self._drop_links()

    def _repoint(self, key: str, address: str) -> None:
        """Shard ``key`` has a new primary at ``address``. When the old one is up (a
        planned handover), its link stays open under its new key (or, named nowhere
        now, for one request timeout): what is in flight there still gets its answer,
        served before it stepped down or refused unapplied (STALE_EPOCH) so that the
        routing core sends it again, to the new primary. A link already connected to
        the new primary (the one its heartbeats went over) becomes the shard's, so
        that no request meets a link still connecting. When the old primary is down,
        what was in flight to it has failed already (its outcome is unknown)."""
        was = self.link_address[key]
        log.warning("shard %s: primary now %s (was %s)", key, address, was)
        now = time.monotonic()
        if self.health.is_up(key):
            heir = NODE_KEY + was
            if self._addresses.get(heir) == was and heir not in self.links:
                self._rename_link(key, heir)
            else:
                self._drain(key, now)
        else:
            self.router.set_down(key, True, now)
            self._abandon_in_flight(key, f"shard {key} failed over")
            self._disconnect(key)
        donor = next((k for k, a in self.link_address.items()
                      if a == address and k not in self._addresses), None)
        if donor is not None:
            self._rename_link(donor, key)
        else:
            self._connect(key)
        self.router.set_down(key, not self.health.is_up(key), now)

    def _rename_link(self, old: str, new: str) -> None:
        """The link ``old`` is ``new``'s from now on, with its heartbeat state."""
        sock = self.links.pop(old)
        self.links[new] = sock
        self.link_address[new] = self.link_address.pop(old)
        self.by_socket[sock] = new
        health = self.health.nodes.pop(old, None)
        if health is not None:
            self.health.nodes[new] = health

    def _drain(self, key: str, now: float) -> None:
        """Link ``key`` leaves the links but stays open one request timeout, for the
        answers to what is in flight on it."""
        sock = self.links.pop(key)
        name = f"{self.link_address.pop(key)} (draining)"
        self.by_socket[sock] = name
        self.health.forget(key)

        def close() -> None:
            if self.by_socket.get(sock) == name:
                del self.by_socket[sock]
                self.poller.unregister(sock)
                sock.close(0)

        self.timers.append((now + self.timeout + 0.5, close, None))

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, fn, self._owner))

    def _run_timers(self, now: float) -> None:
        due = [(fn, owner) for when, fn, owner in self.timers if when <= now]
        if due:
            self.timers = [t for t in self.timers if t[0] > now]
            for fn, owner in due:
                self._owner = owner
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - the same boundary as _continue
                    log.exception("internal error in a timer")
                    if owner is not None:
                        self._fail(owner, InternalError(f"{type(exc).__name__}: {exc}"))
                finally:
                    self._owner = None

    def _drop_links(self) -> None:
        wanted = set(self._addresses)
        for addr in sorted(set(self.links) - wanted):
            self._disconnect(addr)

    # -- replies from nodes ------------------------------------------------------
    def handle_node(self, addr: str, frames: list[bytes], now: float) -> None:
        if self.health.seen(addr, now):
            log.info("%s is up", self.state.describe(addr))
            self.router.set_down(addr, False, now)
        if len(frames) != 2:
            return
        tag, body = frames
        if tag == HEARTBEAT_TAG:
            if addr in self.links:  # (not one draining after a handover)
                self._health_reply(addr, body)
            return
        if tag.startswith(ENVELOPE_FRAME):
            waiting = self.envelopes.get(tag)
            self.router.envelope_reply(addr, body, waiting, now)
            if waiting is not None and not waiting:
                del self.envelopes[tag]
            return
        entry = self.pending.pop(tag, None)
        if entry is None:
            return  # a late reply to a request that already timed out
        target, _, part, _ = entry
        if part == -1:
            self._to_client(target, body)
            return
        try:
            result: Any = P.decode_reply(body)
        except ZkvError as exc:
            result = exc
        self._continue(entry, result)

    def _health_reply(self, addr: str, body: bytes) -> None:
        """A heartbeat's answer: the node's epoch, and how many routers it has seen (if
        more than this one, reads of moving keys may no longer fall back: other routers'
        writes are not known here)."""
        try:
            result = P.decode_reply(body)
        except ZkvError:
            return
        if not isinstance(result, dict):
            return
        epoch, routers = result.get("epoch"), result.get("routers")
        if isinstance(epoch, int):
            report = result.get("repl")
            if isinstance(report, dict):
                self.repl_reports[self.address_of(addr)] = (time.monotonic(), epoch, report)
                self._new_reports = True
            self._node_epoch(addr, epoch)
        if isinstance(routers, int) and routers > 1 and self.router.knows_every_write:
            log.info("another router sends requests to %s: reads of moving keys will not "
                     "fall back to their old owner while the new one is down", addr)
            self.router.knows_every_write = False
            self.router.dirty_known = False

    def _continue(self, entry: tuple[Any, str, int, list[bytes] | None], result: Any) -> None:
        """Hand a node's result (or an error) to what waits for it, inside one error
        boundary: a bug in any continuation becomes an INTERNAL error reply to the
        client it was working for and a log line, never a dead proxy or a silent hang."""
        target, _, part, owner = entry
        self._owner = owner
        try:
            if part == -2:
                target(result)
            else:
                self._deliver(target, part, result)
        except Exception as exc:  # noqa: BLE001 - the boundary
            log.exception("internal error while handling a reply from a node")
            if part >= 0:
                target.done = True
            if owner is not None:
                self._fail(owner, InternalError(f"{type(exc).__name__}: {exc}"))
        finally:
            self._owner = None

    def _expire(self, now: float) -> None:
        deadlines, pending = self.deadlines, self.pending
        expired = []
        while deadlines and deadlines[0][0] <= now:
            expired.append(deadlines.popleft()[1])
        if self.slow_deadlines:
            expired += [tag for when, tag in self.slow_deadlines if when <= now]
            self.slow_deadlines = [(w, t) for w, t in self.slow_deadlines if w > now]
        for tag in expired:
            entry = pending.pop(tag, None)
            if entry is not None:
                self._abandon(entry, Timeout(
                    f"{self.state.describe(entry[1])} did not answer in time; the outcome of a "
                    "write is unknown"))

    def _abandon(self, entry: tuple[Any, str, int, list[bytes] | None], exc: ZkvError) -> None:
        if entry[2] == -1:
            self._fail(entry[0], exc)
        else:
            self._continue(entry, exc)

    def _node_down(self, addr: str) -> None:
        what = self.state.describe(addr)
        log.warning("%s is down (no heartbeat reply%s)", what,
                    "; with CURVE, a node that never answers may hold another cluster key"
                    if self.curve is not None else "")
        self.router.set_down(addr, True, time.monotonic())
        self._abandon_in_flight(addr, f"{what} went down")

    def _abandon_in_flight(self, addr: str, what: str) -> None:
        """Fail what the shell itself has in flight on link ``addr``: ``what`` happened
        with it in flight, so the outcome of a write is unknown."""
        lost = [tag for tag, entry in self.pending.items() if entry[1] == addr]
        for tag in lost:
            self._abandon(self.pending.pop(tag), NodeUnavailable(
                f"{what} with this request in flight; the outcome of a write is unknown"))

    def _heartbeat(self, now: float, waking: bool = False) -> None:
        for addr in self.health.due_pings(now):
            try:
                wire.send(self.links[addr], [HEARTBEAT_TAG, PING_BODY], wire.NOBLOCK)
            except zmq.Again:
                pass
        if waking:
            return  # (the loop was away: answers may not have reached its sockets yet)
        for addr in self.health.expire(now, self._unread):
            self._node_down(addr)

    def _unread(self, addr: str) -> bool:
        """Whether replies from ``addr`` wait unread here (this loop was busy, or
        stopped): the node answered; it is not down."""
        link = self.links.get(addr)
        return link is not None and wire.waiting(link)

    # -- the loop ------------------------------------------------------------------
    def serve(self) -> None:
        front, poller = self.front, self.poller
        by_socket = self.by_socket
        recv, waiting = wire.recv, wire.waiting
        keyring = self.curve.keyring if self.curve is not None else None
        next_housekeeping = next_tidy = 0.0
        last_turn = time.monotonic()
        grace_until = 0.0
        while not self._stop:
            for sock, _ in poller.poll(10):
                if sock is front:
                    handle = self.handle_front
                    now = time.monotonic()
                    for _ in range(MAX_PER_TURN):
                        if keyring is not None:
                            frames, user = wire.recv_user(front)
                            self._role = keyring.role(user)
                            handle(frames, now)
                        else:
                            handle(recv(front), now)
                        if not waiting(front):
                            break
                else:
                    addr = by_socket.get(sock)
                    if addr is None:
                        resp = self.resp
                        if resp is not None and sock is resp.sock:
                            resp.handle(time.monotonic())
                        elif self.guard is not None and sock is self.guard.monitor:
                            self.guard.handle()
                        elif resp is not None and sock is resp.guard.monitor:
                            resp.guard.handle()
                        continue
                    now = time.monotonic()
                    for _ in range(MAX_PER_TURN):
                        self.handle_node(addr, recv(sock), now)
                        # (a reply can end with this link closed: a failover re-points it)
                        if sock not in by_socket or not waiting(sock):
                            break
            now = time.monotonic()
            # (the one clock reading that expiry and heartbeats go by: a stop before it
            # shows here as a gap, a stop after it leaves them judging by the old time)
            if now - last_turn > STALL_GAP:
                grace_until = now + STALL_GRACE
            last_turn = now
            router = self.router
            waking = now < grace_until
            if (router.deadlines and router.deadlines[0][0] <= now or router.parked
                    or router.delayed) and not waking:
                router.tick(now)
            self._flush()
            if (self.deadlines and self.deadlines[0][0] <= now or self.slow_deadlines) \
                    and not waking:
                self._expire(now)
            resp = self.resp
            if resp is not None:
                if resp.paused:
                    resp.resume(now)
                    self._flush()
                resp.flush()
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_EVERY
                if now >= next_tidy:
                    next_tidy = now + 1.0
                    self.out.tidy()
                    if keyring is not None:
                        keyring.refresh(now)
                self._heartbeat(now, waking)
                if self.timers:
                    self._run_timers(now)
                self._housekeeping(now)

    def stop(self, *_: Any) -> None:
        self._stop = True

    def _warm_up(self, limit: float) -> None:
        """Before serving, give the links to the nodes a moment to connect (a send on a
        link still connecting fails at once), so that the first requests after a start
        or restart do not get NODE_DOWN for nodes that are up. Bounded by ``limit``."""
        waiting = set(self.links)
        deadline = time.monotonic() + limit
        poller = zmq.Poller()
        for sock in self.by_socket:
            poller.register(sock, zmq.POLLIN)
        while waiting and time.monotonic() < deadline:
            for addr in list(waiting):
                try:
                    wire.send(self.links[addr], [HEARTBEAT_TAG, PING_BODY], wire.NOBLOCK)
                except zmq.Again:
                    continue
            for sock, _ in poller.poll(20):
                addr = self.by_socket[sock]
                while wire.waiting(sock):
                    self.handle_node(addr, wire.recv(sock), time.monotonic())
                waiting.discard(addr)

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        front = self.front
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        front.setsockopt(zmq.SNDHWM, FRONT_HWM)
        front.setsockopt(zmq.RCVHWM, 100_000)
        front.setsockopt(zmq.IPV6, 1)
        front.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)  # (a burst of clients, as on RESP)
        try:
            check_exposure(self.host, self.curve, self.insecure, f"proxy {self.address}")
            if self.resp_port:
                check_resp_exposure(self.host, self.resp_password, self.insecure,
                                    f"the RESP front {format_address(self.host, self.resp_port)}")
        except ConfigError:
            self.ctx.destroy(0)
            raise
        if self.curve is not None:
            self.curve.start(self.ctx, f"proxy {self.address}")
            self.curve.serve(front)
        fds = raise_fd_limit()
        self.max_clients = client_limit(self.max_clients, fds,
                                        FD_RESERVE + 2 * len(self.state.members))
        try:
            front.bind(f"tcp://{self.address}")
        except zmq.ZMQError as exc:
            self.ctx.destroy(0)
            raise ClusterError(f"cannot listen on {self.address}: {exc}") from exc
        self.guard = ConnectionGuard(front, self.max_clients, f"proxy {self.address}")
        self.poller.register(self.guard.monitor, zmq.POLLIN)
        self.poller.register(front, zmq.POLLIN)
        if self.metrics_port:
            try:
                metrics.serve(self.host, self.metrics_port,
                              lambda: metrics.proxy_families(self))
            except OSError as exc:
                self.ctx.destroy(0)
                raise ClusterError(f"cannot serve metrics on {self.host}:{self.metrics_port}: "
                                   f"{exc.strerror or exc}") from exc
            self.router.timed = True
        if self.resp_port:
            try:
                self.resp = RespFront(self, self.host, self.resp_port, self.resp_admin,
                                      self.max_clients, self.client_buffer_bytes)
            except ClusterError:
                self.ctx.destroy(0)
                raise
            self.poller.register(self.resp.sock, zmq.POLLIN)
            self.poller.register(self.resp.guard.monitor, zmq.POLLIN)
        self._before_serve()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        if on_ready:
            on_ready(self._ready_line())
        self._serving = True
        try:
            self.serve()
        finally:
            if self.curve is not None:
                self.curve.stop()
            self.ctx.destroy(0)

    # -- what a kind of proxy adds -------------------------------------------------------
    def _before_serve(self) -> None:
        self._apply_state(self.state)
        self._warm_up(min(self.timeout, 1.0))

    def _ready_line(self) -> str:
        return (f"zkv proxy {self.address} epoch={self.state.epoch} "
                f"members={','.join(self.ring.members) or '-'}")

    def _housekeeping(self, now: float) -> None:
        """Periodic work of a kind of proxy (every HOUSEKEEPING_EVERY)."""

    def _idle(self) -> bool:
        """Whether links to nodes no configuration names may be closed now."""
        return True

    def _node_epoch(self, addr: str, epoch: int) -> None:
        """What a heartbeat says a node's epoch is."""

    def _wants(self, epoch: int) -> None:
        """The routing core needs a configuration of at least ``epoch``."""

    def status(self) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "members": dict(self.state.members),
                "vnodes": self.state.vnodes, "move": None, "notes": list(self.notes)}

    def config_doc(self, since: Any = None) -> dict[str, Any]:
        """CONFIG: the configuration in effect here (none if it is still epoch ``since``)."""
        same = since == self.state.epoch
        return {"epoch": self.state.epoch, "config": None if same else self.state.to_json(),
                "name": None, "limits": dataclasses.asdict(self.limits)}

__all__ = ["ProxyShell"]
