"""The proxy: one ROUTER for clients, one DEALER per storage node, one poll loop.

Data requests go through the routing core (:class:`zkv.router.Router`): this shell
feeds it what the front reads and what the nodes answer, and sends what it returns,
each node's requests of a loop turn together in one envelope that carries the
epoch they were routed by. The proxy that owns a state directory is the cluster's
config manager: the only writer of its configuration, which it sends to every
node (XCONFIG) before letting a new epoch take effect. INFO and NODES gather every
node's answer here; ADD, REMOVE and MOVE ABORT are driven by zkv.mover. Heartbeats
(:class:`zkv.cluster.Health`, XHEALTH) mark silent nodes down so their keys fail
fast with an error naming the node while the rest keep working, and bring a node
that missed a configuration up to date.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import signal
import struct
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import durable, lockfile
from . import frames as wire
from . import protocol as P
from .cluster import ClusterState, Health
from .config import format_address, parse_address
from .errors import (
    ClusterError,
    CommandError,
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
from .mover import (
    SETTINGS,
    MoveDriver,
    check_settings,
    new_move,
    repair_settings,
)
from .placement import Placement
from .planner import moved_fraction, plan, summary
from .ring import DEFAULT_VNODES, MAX_WEIGHT, Ring
from .router import CORE_OPS, Router

log = logging.getLogger("zkv.proxy")

HEARTBEAT_TAG = b"hb"
PING_BODY = P.encode_request("XHEALTH")
ENVELOPE_FRAME = b"\x00env"  # the routing frame of an envelope: this prefix and its number
ENVELOPE_MAX = 1024  # requests in one envelope
HOUSEKEEPING_EVERY = 0.01  # seconds between heartbeat/timer/move checks
STATE_FILE = "cluster.json"
MAX_PER_TURN = 4096
PIPE_OPS = P.PIPE_OPS
KEY_COUNT_EVERY = 5.0  # seconds between the INFO polls that count each node's keys
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


def load_state(state_dir: str) -> ClusterState | None:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path}: cannot read the proxy state: {exc}") from None
    return ClusterState.from_json(data, path)


def lock_state_dir(state_dir: str) -> int:
    """flock the state directory for this process (one config manager per cluster); the
    lock's file descriptor, held until the process exits. ClusterError if another proxy
    holds it or the directory cannot be used."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        return lockfile.acquire(state_dir)
    except lockfile.Locked as exc:
        raise ClusterError(
            f"the state directory {state_dir} is in use by another proxy (pid {exc.holder}); "
            "one proxy owns a cluster's state: start another with its own --state-dir"
        ) from None
    except OSError as exc:
        raise ClusterError(
            f"cannot use {state_dir} as the proxy's state directory: {exc.strerror or exc}"
        ) from None


def save_state(state_dir: str, state: ClusterState) -> None:
    """Write the state atomically and durably (temp file, fsync, rename, fsync dir)."""
    os.makedirs(state_dir, exist_ok=True)
    durable.write_json(os.path.join(state_dir, STATE_FILE), state.to_json(), indent=2)


def _involved_in(state: ClusterState) -> set[str]:
    """Every node a configuration names: the ring's members and a move's nodes."""
    move = state.move
    return set(state.members) | (set(move["old"]) | set(move["new"]) if move else set())


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


class Proxy:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        state_dir: str = "./data/proxy",
        members: dict[str, float] | None = None,
        vnodes: int = DEFAULT_VNODES,
        timeout_ms: int = 2000,
        heartbeat_ms: int = 500,
        heartbeat_misses: int = 3,
        limits: P.Limits = P.DEFAULT_LIMITS,
        move_batch_keys: int = 1000,
        move_batch_bytes: int = 1 << 20,
        move_rate: float | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
    ) -> None:
        self.address = format_address(host, port)
        self.max_clients = max_clients
        self.client_buffer_bytes = client_buffer_bytes
        self.move_defaults: dict[str, Any] = {
            "batch_keys": move_batch_keys, "batch_bytes": move_batch_bytes, "rate": move_rate,
        }
        self.host, self.port = host, port
        self.state_dir = state_dir
        self.timeout = timeout_ms / 1000.0
        self.limits = limits
        self.health = Health(heartbeat_ms / 1000.0, heartbeat_misses)
        self.notes: list[str] = []
        self._lock_fd = lock_state_dir(state_dir)
        self.state = self._initial_state(members or {}, vnodes)
        self.ring: Ring = self.state.ring()
        self.placement = Placement(self.state)
        # the routing core (zkv.router): this proxy is the config manager, and the only
        # router unless a node says it hears from another (then reads of moving keys no
        # longer fall back to the old owner while the new one is down)
        self.router = Router(self.placement, limits, self.timeout, knows_every_write=True)
        self.publishing: ClusterState | None = None  # sent to the nodes, not yet in effect
        self.envelopes: dict[bytes, set[int]] = {}  # envelope frame -> tags not answered
        self._envelopes = 0
        self.driver: MoveDriver | None = None
        self._admin_busy = False
        self.node_keys: dict[str, tuple[int, float]] = {}  # last INFO key count, and when
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
        self.links: dict[str, zmq.Socket[bytes]] = {}
        self.by_socket: dict[zmq.Socket[bytes], str] = {}
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
        self._ops: dict[str, Callable[[list[bytes], list[Any]], None]] = {
            "INFO": self._info,
            "CONFIG": lambda r, a: self._answer(r, self.config_doc()),
            "NODES": self._nodes,
            "RING": self._ring,
            "STATUS": lambda r, a: self._answer(r, self.status()),
            "ADD": self._add,
            "REMOVE": self._remove,
            "MOVE": self._move_command,
        }

    # -- membership ------------------------------------------------------------
    def _initial_state(self, members: dict[str, float], vnodes: int) -> ClusterState:
        saved = load_state(self.state_dir)
        if saved is None:
            state = ClusterState(epoch=1 if members else 0, members=dict(members), vnodes=vnodes)
            save_state(self.state_dir, state)
            return state
        if members and (saved.members != members or saved.vnodes != vnodes):
            note = (
                f"the state directory {self.state_dir} holds membership epoch {saved.epoch} "
                f"({', '.join(sorted(saved.members)) or 'no nodes'}); it differs from the "
                "configured nodes, which are ignored (use ADD/REMOVE to change membership)"
            )
            log.warning(note)
            self.notes.append(note)
        return saved

    def _connect(self, addr: str) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self._router_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.connect(f"tcp://{addr}")
        self.links[addr] = sock
        self.by_socket[sock] = addr
        self.poller.register(sock, zmq.POLLIN)
        self.health.track(addr, time.monotonic())

    def _disconnect(self, addr: str) -> None:
        sock = self.links.pop(addr)
        del self.by_socket[sock]
        self.poller.unregister(sock)
        sock.close(0)
        self.health.forget(addr)

    # -- sending ---------------------------------------------------------------
    def _forward(self, addr: str, body: bytes, target: Any, part: int = -1,
                 timeout: float | None = None) -> None:
        """Send ``body`` to node ``addr``. Its reply goes to ``target``: the client's
        routing frames (part -1), a callable given the decoded result or error (part
        -2), or part ``part`` of a Gather."""
        if addr not in self.links:
            raise NodeUnavailable(f"node {addr} is not a member")
        if not self.health.is_up(addr):
            raise NodeUnavailable(f"node {addr} is down")
        self._seq += 1
        tag = _TAG.pack(self._seq)
        try:
            wire.send(self.links[addr], [tag, body], wire.NOBLOCK)
        except zmq.Again:
            raise NodeUnavailable(f"node {addr} is not connected or not keeping up") from None
        self.pending[tag] = (target, addr, part, self._owner)
        if timeout is None:
            self.deadlines.append((time.monotonic() + self.timeout, tag))
        else:
            self.slow_deadlines.append((time.monotonic() + timeout, tag))

    def _answer(self, routing: list[bytes], result: Any) -> None:
        self.out.send([*routing, P.encode_ok(result)])

    def _fail(self, routing: list[bytes], exc: ZkvError) -> None:
        self.errors += 1
        self.out.send([*routing, P.encode_exc(exc)])

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
            self.out.send([*gather.routing, reply])

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
            if op in CORE_OPS:
                self.router.request_parsed(routing, op, args, body, now)
                return
            handler = self._ops.get(op)
            if handler is None:
                raise CommandError(f"{op} is not served by the proxy")
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
            send([*client, body])
        if ready.wants is not None and ready.wants > self.state.epoch and not self.publishing:
            log.warning("a node is at epoch %d, past this config manager's %d: its state "
                        "directory was replaced?", ready.wants, self.state.epoch)

    def _send_envelope(self, node: str, sock: zmq.Socket[bytes] | None, epoch: int,
                       items: list[tuple[int, bytes]]) -> None:
        tags = [tag for tag, _ in items]
        if sock is None:
            self.router.fail_tags(tags, NodeUnavailable(f"node {node} is not a member"))
            return
        self._envelopes += 1
        frame = ENVELOPE_FRAME + _TAG.pack(self._envelopes)
        try:
            wire.send(sock, [frame, P.encode_envelope(epoch, items)], wire.NOBLOCK)
        except zmq.Again:
            self.router.fail_tags(tags, NodeUnavailable(
                f"node {node} is not connected or not keeping up"))
            return
        self.envelopes[frame] = set(tags)

    def _involved(self) -> list[str]:
        """The ring's members, then any other node a move under way involves (a node
        joining before the copy, or leaving after it)."""
        members = list(self.ring.members)
        return members + sorted(_involved_in(self.state) - set(members))

    def _gather_info(self, routing: list[bytes], build: Callable[[dict[str, Any]], Any]) -> None:
        members = self._involved()
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
                for k in ("keys", "live_bytes", "rss_bytes", "log_bytes", "snapshot_bytes"):
                    if isinstance(info.get(k), int):
                        totals[k] = totals.get(k, 0) + info[k]
            return {"proxy": self.info(), "nodes": infos, "totals": totals}

        self._gather_info(routing, build)

    def _nodes(self, routing: list[bytes], args: list[Any]) -> None:
        def build(infos: dict[str, Any]) -> Any:
            return self.nodes(infos)

        self._gather_info(routing, build)

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
        return out

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

    def status(self) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "members": dict(self.state.members),
            "vnodes": self.state.vnodes,
            "move": self.driver.status() if self.driver else None,
            "notes": list(self.notes),
        }

    def config_doc(self) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "config": self.state.to_json(), "name": None,
                "manager": self.address}

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

    def _note_keys(self, addr: str, info: Any) -> None:
        if isinstance(info, dict) and isinstance(info.get("keys"), int):
            self.node_keys[addr] = (info["keys"], time.time())

    def _poll_keys(self) -> None:
        """Every few seconds, each node's key count: what REMOVE --force reports lost."""
        for addr in self._involved():
            if self.health.is_up(addr):
                self._call(addr, "INFO", [], functools.partial(self._note_keys, addr))

    # -- administration: ADD and REMOVE -------------------------------------------
    def send(self, addr: str, op: str, args: list[Any], done: Callable[[Any], None],
             timeout: float = 60.0) -> None:
        """For the move driver: a request to a node, its result to ``done``."""
        if addr not in self.links:
            self._connect(addr)
        self._call(addr, op, args, done, timeout)

    def commit(self, state: ClusterState, then: Callable[[], None] | None = None) -> None:
        """Persist a new configuration, send it to every node it involves, and let it take
        effect here once they all have it (or are down: they get it when they are back),
        so that no node is ever behind a router that routes by it. ``then`` runs once it
        is in effect."""
        save_state(self.state_dir, state)
        self._publish(state, then)

    def _publish(self, state: ClusterState, then: Callable[[], None] | None = None) -> None:
        self.publishing = state
        targets = [a for a in _involved_in(state) if self.health.is_up(a)]
        left = set(targets)
        for addr in sorted(_involved_in(state) - set(self.links)):
            self._connect(addr)

        def acked(addr: str, ok: bool) -> None:
            left.discard(addr)
            if not left and self.publishing is state:
                self.publishing = None
                self._apply_state(state)
                if then is not None:
                    then()

        if not targets:
            acked("", True)
        for addr in targets:
            self._push(addr, state, functools.partial(acked, addr))

    def _push(self, addr: str, state: ClusterState, done: Callable[[bool], None]) -> None:
        def answered(result: Any) -> None:
            if isinstance(result, ZkvError):
                log.warning("node %s did not take epoch %d: %s (it gets it again once it "
                            "answers)", addr, state.epoch, result)
            done(not isinstance(result, ZkvError))

        self._call(addr, "XCONFIG", [{"config": state.to_json(), "name": addr}], answered,
                   self.timeout)

    def settled(self) -> bool:
        """For the move driver: no configuration is on its way to the nodes."""
        return self.publishing is None

    def _apply_state(self, state: ClusterState) -> None:
        self.state = state
        self.ring = state.ring()
        self.placement = Placement(state)
        self.router.set_placement(self.placement)
        for addr in sorted(_involved_in(state) - set(self.links)):
            self._connect(addr)
        if self.driver is None and not self._admin_busy:
            self._drop_links()

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
        wanted = _involved_in(self.state)
        for addr in sorted(set(self.links) - wanted):
            self._disconnect(addr)

    def _check_admin(self) -> None:
        if self.driver is not None:
            m = self.driver.move
            raise ClusterError(
                f"a move is under way ({m['kind'].upper()} {m['node']}, phase {m['phase']}); "
                "wait for it to finish (STATUS shows its progress)"
            )
        if self.publishing is not None:
            raise ClusterError("a configuration change is being sent to the nodes; try again")
        if self._admin_busy:
            raise ClusterError("another ADD or REMOVE is being started; try again")

    def _plan_reply(self, new: Ring, dry_run: bool) -> dict[str, Any]:
        old = self.ring
        moves = plan(old, new) if old.members else []
        return {
            "dry_run": dry_run,
            "epoch": self.state.epoch,
            "moved": round(moved_fraction(moves), 6),
            "transfers": [dict(t) for t in summary(old, new, moves)],
        }

    def _add(self, routing: list[bytes], args: list[Any]) -> None:
        addr, options = self._admin_target(args, "ADD", ("weight",))
        self._check_admin()
        if addr in self.state.members:
            raise ClusterError(f"{addr} is already a member; nothing changed")
        weight = options.get("weight", 1.0)
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT):
            raise ClusterError(
                f"weight must be a number > 0 and at most {MAX_WEIGHT:g}, not {weight!r}; "
                "nothing changed"
            )
        try:
            new_ring = self.ring.with_member(addr, float(weight))
        except ValueError as exc:
            raise ClusterError(f"{exc}; nothing changed") from None
        if options.get("dry_run"):
            return self._answer(routing, self._plan_reply(new_ring, True))
        self._with_live_node(routing, addr, lambda: self._start(
            routing, "add", addr, new_ring, options), must_be_empty=True)

    def _remove(self, routing: list[bytes], args: list[Any]) -> None:
        addr, options = self._admin_target(args, "REMOVE", ("force",))
        if options.get("force"):
            return self._force_remove(routing, addr)
        self._check_admin()
        if addr not in self.state.members:
            raise ClusterError(f"{addr} is not a member; nothing changed")
        if len(self.state.members) == 1:
            raise ClusterError(f"cannot remove {addr}: it is the last node; nothing changed")
        new_ring = self.ring.without_member(addr)
        if options.get("dry_run"):
            return self._answer(routing, self._plan_reply(new_ring, True))
        self._with_live_node(routing, addr, lambda: self._start(routing, "remove", addr,
                                                                new_ring, options))

    def _force_remove(self, routing: list[bytes], addr: str) -> None:
        """REMOVE ADDR --force: a node that is gone for good leaves the ring without its
        keys being moved. They are lost, and said to be: by count, in the reply and the
        log. Refused while the node answers (then a plain REMOVE loses nothing)."""
        if self.health.is_up(addr):
            raise ClusterError(f"{addr} is up: REMOVE it without --force, which moves its "
                               "keys to the other nodes first; nothing changed")
        known = self.node_keys.get(addr)
        lost = (f"{known[0]} keys (as it last reported, {time.time() - known[1]:.0f} s ago)"
                if known else "an unknown number of keys (it has not reported since this "
                "proxy started)")
        if self.driver is not None:
            move = self.driver.move
            if move["node"] == addr and move["kind"] == "remove":
                message = self.driver.force_finish(addr)
            elif move["node"] == addr and move["kind"] == "add":
                message = ("giving up the ADD of " + addr + ": "
                           + self.driver.abort(force=True))
            else:
                raise ClusterError(
                    f"{addr} is part of move {move['id']} ({move['kind'].upper()} "
                    f"{move['node']}); roll it back first (MOVE ABORT --force), then REMOVE "
                    f"{addr} --force; nothing changed")
            log.error("REMOVE %s --force during move %s: %s; %s is LOST", addr, move["id"],
                      message, lost)
            return self._answer(routing, {"removed": addr, "forced": True, "id": move["id"],
                                          "epoch": self.state.epoch, "lost": lost,
                                          "message": message})
        if addr not in self.state.members:
            raise ClusterError(f"{addr} is not a member; nothing changed")
        if len(self.state.members) == 1:
            raise ClusterError(f"cannot remove {addr}: it is the last node; nothing changed")
        smaller = self.state.with_members(
            {a: w for a, w in self.state.members.items() if a != addr})
        log.error("REMOVE %s --force: the node is dropped from the ring at epoch %d without "
                  "its keys: %s are LOST", addr, smaller.epoch, lost)
        reply = {"removed": addr, "forced": True, "epoch": smaller.epoch, "lost": lost,
                 "lost_keys": known[0] if known else None}
        self.commit(smaller, lambda: self._answer(routing, reply))

    def _move_command(self, routing: list[bytes], args: list[Any]) -> None:
        """MOVE ABORT [--force]: roll the move under way back (see zkv.mover)."""
        options = dict(args[1]) if len(args) > 1 else {}
        for name in options:
            if name != "force":
                raise ClusterError(f"unknown option {name!r} for MOVE ABORT; it takes force")
        force = options.get("force", False)
        if not isinstance(force, bool):
            raise ClusterError("force must be true or false")
        if self.driver is None:
            raise ClusterError("no move is under way; nothing changed")
        move_id = self.driver.move["id"]
        message = self.driver.abort(force)
        log.warning("MOVE ABORT%s of %s: %s", " --force" if force else "", move_id, message)
        self._answer(routing, {"id": move_id, "epoch": self.state.epoch, "message": message,
                               "move": None if self.driver.finished else self.driver.status()})

    def is_up(self, addr: str) -> bool:
        """For the move driver: whether a node answers its heartbeats."""
        return self.health.is_up(addr)

    def _admin_target(self, args: list[Any], op: str,
                      extra: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        """The node address and the checked options of an ADD or REMOVE: every option is
        validated here, before anything is persisted, so a bad one changes nothing."""
        try:
            host, port = parse_address(args[0], "node address")
        except ZkvError as exc:
            raise ClusterError(f"{exc}; nothing changed") from None
        options: dict[str, Any] = dict(args[1]) if len(args) > 1 else {}
        allowed = ("dry_run", *extra, *SETTINGS)
        for name in options:
            if name not in allowed:
                raise ClusterError(f"unknown option {name!r} for {op}; it takes "
                                   f"{', '.join(allowed)}; nothing changed")
        if not isinstance(options.get("dry_run", False), bool):
            raise ClusterError("dry_run must be true or false; nothing changed")
        settings = check_settings(options, self.limits.max_message_bytes // 2)
        options.update(settings)
        return format_address(host, port), options

    def _with_live_node(self, routing: list[bytes], addr: str, then: Callable[[], None],
                        must_be_empty: bool = False) -> None:
        """Run ``then`` once ``addr`` answers (INFO); else a clear error, nothing changed.
        With ``must_be_empty``, a node that holds keys is refused: joining would mix
        another data set into this cluster's."""
        self._admin_busy = True
        temporary = addr not in self.links
        if temporary:
            self._connect(addr)

        deadline = time.monotonic() + self.timeout

        def answered(result: Any) -> None:
            if (isinstance(result, NodeUnavailable) and "not connected" in str(result)
                    and time.monotonic() < deadline):  # the connection is still being made
                self._later(0.05, lambda: self._call(addr, "INFO", [], answered, self.timeout))
                return
            self._admin_busy = False
            if isinstance(result, ZkvError):
                if temporary and addr in self.links:
                    self._disconnect(addr)
                self._fail(routing, ClusterError(
                    f"node {addr} does not answer ({result}); nothing changed"))
                return
            keys = result.get("keys", 0) if isinstance(result, dict) else 0
            if must_be_empty and keys:
                if temporary and addr in self.links:
                    self._disconnect(addr)
                self._fail(routing, ClusterError(
                    f"node {addr} already holds {keys} keys; a node must be empty to join "
                    "(start it with a new data directory); nothing changed"))
                return
            try:
                then()
            except ZkvError as exc:
                self._fail(routing, exc)

        self._call(addr, "INFO", [], answered, self.timeout)

    def _start(self, routing: list[bytes], kind: str, addr: str,
               new_ring: Ring, options: dict[str, Any]) -> None:
        reply = self._plan_reply(new_ring, False)
        new_members = new_ring.weights
        if not self.state.members:  # the first node: nothing to move
            first = self.state.with_members(new_members)
            reply["epoch"] = first.epoch
            self.commit(first, lambda: self._answer(routing, reply))  # once in effect
            return None
        settings = dict(self.move_defaults)
        settings.update({k: v for k, v in options.items() if k in settings and v is not None})
        move = new_move(self.state, kind, addr, new_members, settings)
        started = self.state.with_move(move)
        self.commit(started)  # in effect once every node has it; the driver waits for that
        self.driver = MoveDriver(self, started)
        reply["id"] = move["id"]
        self._answer(routing, reply)

    # -- replies from nodes ------------------------------------------------------
    def handle_node(self, addr: str, frames: list[bytes], now: float) -> None:
        if self.health.seen(addr, now):
            log.info("node %s is up", addr)
            self.router.set_down(addr, False, now)
        if len(frames) != 2:
            return
        tag, body = frames
        if tag == HEARTBEAT_TAG:
            self._health_reply(addr, body)
            return
        if tag.startswith(ENVELOPE_FRAME):
            waiting = self.envelopes.get(tag)
            if body[:3] == P.REPLY_ENVELOPE:
                reply = self.router.reply
                try:
                    entries = P.decode_reply_envelope(body)
                except ZkvError:
                    entries = []
                for entry_tag, entry_body in entries:
                    reply(entry_tag, entry_body, now)
                    if waiting is not None:
                        waiting.discard(entry_tag)
            elif waiting is not None:  # the node refused the envelope as a whole
                try:
                    P.decode_reply(body)
                    error: ZkvError = ProtocolError(f"node {addr} answered an envelope oddly")
                except ZkvError as exc:
                    error = exc
                self.router.fail_tags(list(waiting), error)
                waiting.clear()
            if waiting is not None and not waiting:
                del self.envelopes[tag]
            return
        entry = self.pending.pop(tag, None)
        if entry is None:
            return  # a late reply to a request that already timed out
        target, _, part, _ = entry
        if part == -1:
            self.out.send([*target, body])
            return
        try:
            result: Any = P.decode_reply(body)
        except ZkvError as exc:
            result = exc
        self._continue(entry, result)

    def _health_reply(self, addr: str, body: bytes) -> None:
        """A heartbeat's answer: the node's epoch (a node behind gets the configuration
        again) and how many routers it has seen (if more than this one, reads of moving
        keys may no longer fall back: other routers' writes are not known here)."""
        try:
            result = P.decode_reply(body)
        except ZkvError:
            return
        if not isinstance(result, dict):
            return
        epoch, routers = result.get("epoch"), result.get("routers")
        if (isinstance(epoch, int) and epoch < self.state.epoch and not self.publishing
                and addr in self._involved()):
            log.info("node %s is at epoch %d, behind %d: sending it the configuration", addr,
                     epoch, self.state.epoch)
            self._push(addr, self.state, lambda ok: None)
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
                    f"node {entry[1]} did not answer in time; the outcome of a write is unknown"
                ))

    def _abandon(self, entry: tuple[Any, str, int, list[bytes] | None], exc: ZkvError) -> None:
        if entry[2] == -1:
            self._fail(entry[0], exc)
        else:
            self._continue(entry, exc)

    def _node_down(self, addr: str) -> None:
        log.warning("node %s is down (no heartbeat reply)", addr)
        self.router.set_down(addr, True, time.monotonic())
        lost = [tag for tag, entry in self.pending.items() if entry[1] == addr]
        for tag in lost:
            self._abandon(self.pending.pop(tag), NodeUnavailable(
                f"node {addr} went down with this request in flight; "
                "the outcome of a write is unknown"
            ))

    def _heartbeat(self, now: float) -> None:
        for addr in self.health.due_pings(now):
            try:
                wire.send(self.links[addr], [HEARTBEAT_TAG, PING_BODY], wire.NOBLOCK)
            except zmq.Again:
                pass
        for addr in self.health.expire(now):
            self._node_down(addr)

    # -- the loop ------------------------------------------------------------------
    def serve(self) -> None:
        front, poller = self.front, self.poller
        by_socket = self.by_socket
        recv, waiting = wire.recv, wire.waiting
        next_housekeeping = next_tidy = next_poll = 0.0
        while not self._stop:
            for sock, _ in poller.poll(10):
                if sock is front:
                    handle = self.handle_front
                    now = time.monotonic()
                    for _ in range(MAX_PER_TURN):
                        handle(recv(front), now)
                        if not waiting(front):
                            break
                else:
                    addr = by_socket.get(sock)
                    if addr is None:
                        if self.guard is not None and sock is self.guard.monitor:
                            self.guard.handle()
                        continue
                    now = time.monotonic()
                    for _ in range(MAX_PER_TURN):
                        self.handle_node(addr, recv(sock), now)
                        if not waiting(sock):
                            break
            now = time.monotonic()
            router = self.router
            if router.deadlines and router.deadlines[0][0] <= now or router.parked \
                    or router.delayed:
                router.tick(now)
            self._flush()
            if self.deadlines and self.deadlines[0][0] <= now or self.slow_deadlines:
                self._expire(now)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_EVERY
                if now >= next_tidy:
                    next_tidy = now + 1.0
                    self.out.tidy()
                    if now >= next_poll:
                        next_poll = now + KEY_COUNT_EVERY
                        self._poll_keys()
                self._heartbeat(now)
                if self.timers:
                    self._run_timers(now)
                if self.driver is not None:
                    self._tick_driver(now)

    def _repair_move(self) -> None:
        """A move persisted with settings that are not valid (an older zkv took them
        unchecked) would retry forever: run it with the defaults instead, and say so."""
        move = self.state.move
        if move is None:
            return
        fixed, notes = repair_settings(move, self.move_defaults,
                                       self.limits.max_message_bytes // 2)
        if notes:
            for note in notes:
                log.warning("%s", note)
            self.notes.extend(notes)
            save_state(self.state_dir, self.state.with_move(fixed))
            self.state = self.state.with_move(fixed)

    def _tick_driver(self, now: float) -> None:
        assert self.driver is not None
        try:
            self.driver.tick(now)
        except Exception as exc:  # noqa: BLE001 - a bug in a step: report it, retry later
            log.exception("internal error in move %s", self.driver.move.get("id"))
            self.driver.error = f"internal error: {type(exc).__name__}: {exc}"
            self.driver.waiting = 0
            self.driver.next_at = now + 1.0
        if self.driver.finished and self.publishing is None:
            # (only once its last configuration is in effect: STATUS shows no move then)
            self.driver = None
            self._drop_links()

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
        self._repair_move()
        self._apply_state(self.state)
        self._warm_up(min(self.timeout, 1.0))
        self._publish(self.state)  # every node gets the configuration this proxy serves
        if self.state.move is not None:
            log.info("resuming move %s (%s)", self.state.move["id"], self.state.move["phase"])
            self.driver = MoveDriver(self, self.state)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        line = (
            f"zkv proxy {self.address} epoch={self.state.epoch} "
            f"members={','.join(self.ring.members) or '-'} state={self.state_dir}"
        )
        if on_ready:
            on_ready(line)
        self._serving = True
        try:
            self.serve()
        finally:
            self.ctx.destroy(0)


__all__ = ["Proxy"]
