"""The proxy: one ROUTER for clients, one DEALER per storage node, one poll loop.

A single-key request is decoded only to find its key, then its body is
forwarded unchanged to the owning node as ``[b"", tag, body]``; the node's
reply body goes back to the client unchanged. Requests that span nodes (MGET,
MSET, PIPE, KEYS, INFO, NODES) are split into one sub-request per node and
merged by a :class:`Gather` in the caller's order. Every forwarded request has a
deadline; heartbeats (:class:`zkv.cluster.Health`) mark silent nodes down so
their keys fail fast with an error naming the node while the rest keep working.
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

from . import frames as wire
from . import lockfile
from . import protocol as P
from .cluster import ClusterState, Health
from .config import format_address, parse_address
from .errors import (
    ClusterError,
    CommandError,
    InternalError,
    LimitExceeded,
    NodeUnavailable,
    ProtocolError,
    Timeout,
    Unavailable,
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
from .keyspace import PRESENT, UNKNOWN
from .mover import (
    SETTINGS,
    MoveDriver,
    check_settings,
    moving_ranges,
    new_move,
    repair_settings,
)
from .planner import moved_fraction, plan, summary
from .ring import DEFAULT_VNODES, MAX_WEIGHT, RangeSet, Ring, key_hash

log = logging.getLogger("zkv.proxy")

HEARTBEAT_TAG = b"hb"
PING_BODY = P.encode_request("PING")
HOUSEKEEPING_EVERY = 0.01  # seconds between heartbeat/timer/move checks
STATE_FILE = "cluster.json"
MAX_PER_TURN = 4096
SINGLE_KEY = frozenset(("GET", "SET", "DEL", "EXISTS"))
PIPE_OPS = P.PIPE_OPS
# Keys written through this proxy into ranges that are moving. While a destination is
# down, a read of a moving key this proxy never wrote falls back to the old owner,
# which then holds its latest value; past this many the fallback is switched off.
MAX_DIRTY = 1_000_000
KEYS_PAGE = 10_000  # keys asked for per SCAN page when KEYS walks the nodes
KEY_COUNT_EVERY = 5.0  # seconds between the INFO polls that count each node's keys
DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_CLIENT_BUFFER = 64 << 20  # bytes of unread replies one client may have

_TAG = struct.Struct("<Q")


class Gather:
    """Collects the replies of the sub-requests one client request was split into.

    ``limit`` bounds the reply. With ``value_budget``, the byte strings parts deliver
    are counted as they arrive: ``over`` decides what becomes of a value past the
    budget (an error in its place, or the whole reply failing at once), so the proxy
    never holds much more than one reply's worth of values for a request."""

    __slots__ = ("done", "encode", "finish", "left", "limit", "over", "results", "routing",
                 "used", "value_budget")

    def __init__(self, routing: list[bytes], parts: int,
                 finish: Callable[[list[Any]], Any], limit: int = 1 << 62,
                 encode: Callable[[Any], bytes] = P.encode_ok,
                 value_budget: int | None = None,
                 over: Callable[[int], Any] | None = None) -> None:
        self.limit = limit
        self.encode = encode
        self.routing = routing
        self.results: list[Any] = [None] * parts
        self.left = parts
        self.finish = finish  # results (values or ZkvError) -> result, may raise
        self.done = False
        self.value_budget = value_budget
        self.over = over
        self.used = 0

    def deliver(self, part: int, result: Any) -> bytes | None:
        """Record one part's result (a value or a ZkvError); the reply body once complete."""
        if self.done:
            return None
        if self.value_budget is not None and type(result) is bytes:
            if self.used + len(result) + 16 > self.value_budget and self.over is not None:
                result = self.over(self.value_budget)
                if self.over is _fail_whole:
                    self.done = True
                    return P.encode_exc(result)
            else:
                self.used += len(result) + 16
        self.results[part] = result
        self.left -= 1
        if self.left:
            return None
        self.done = True
        try:
            reply = self.encode(self.finish(self.results))
        except ZkvError as exc:
            return P.encode_exc(exc)
        if len(reply) > self.limit:
            return P.encode_error("TOO_LARGE", (
                f"the reply would be {len(reply)} bytes, over the max_message_bytes limit "
                f"of {self.limit}; ask for less"))
        return reply


def _fail_whole(budget: int) -> ZkvError:
    return LimitExceeded(f"the reply would be over {budget} bytes (max_message_bytes); "
                         "ask for fewer keys at once")


def _over_in_place(budget: int) -> ZkvError:
    return LimitExceeded(
        f"not returned: this value does not fit in what is left of the pipeline's reply "
        f"budget of {budget} bytes (max_message_bytes); GET this key on its own"
    )


def first_error(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, ZkvError):
            raise r


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
    path = os.path.join(state_dir, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state.to_json(), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self.moving: RangeSet | None = None  # hash ranges in copy, reads fall back
        self.old_ring: Ring | None = None
        self.driver: MoveDriver | None = None
        self._admin_busy = False
        self.dirty: set[bytes] = set()  # see MAX_DIRTY
        self.dirty_known = False  # whether ``dirty`` holds every write of this copy phase
        self.frozen = False  # a move is being rolled back: its ranges take no writes
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
            "PING": lambda r, a: self._answer(r, "PONG"),
            "MGET": self._mget,
            "MSET": self._mset,
            "PIPE": self._pipe,
            "SCAN": self._scan,
            "KEYS": self._keys,
            "INFO": self._info,
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
                 finish: Callable[[list[Any]], Any], allow_down: bool = False,
                 encode: Callable[[Any], bytes] = P.encode_ok) -> None:
        """Send one body per node; ``finish`` gets results in the order of ``bodies``."""
        if not bodies:
            self._answer(routing, finish([]))
            return
        gather = Gather(routing, len(bodies), finish, self.limits.max_message_bytes, encode)
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
    def handle_front(self, frames: list[bytes]) -> None:
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
            if op in SINGLE_KEY:
                key = args[0]
                if self.moving is not None and self.moving.contains(key_hash(key)):
                    self._moving(op, args, lambda r: self._reply(routing, r))
                else:
                    self._forward(self.ring.owner(key), body, routing)
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

    def _group(self, keys: list[bytes]) -> dict[str, list[int]]:
        owner = self.ring.owner
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(owner(key), []).append(i)
        return groups

    def _mget(self, routing: list[bytes], args: list[Any]) -> None:
        keys: list[bytes] = args[0]
        if self.moving is not None:
            return self._moving_mget(routing, keys)
        groups = self._group(keys)
        order = list(groups.values())

        def finish(results: list[Any]) -> Any:
            first_error(results)
            out: list[Any] = [None] * len(keys)
            for idx, values in zip(order, results):
                for i, v in zip(idx, values):
                    out[i] = v
            return out

        share = self.limits.max_message_bytes // len(groups)  # each node's part of the reply
        bodies = {a: P.encode_request("MGET", [keys[i] for i in idx], share)
                  for a, idx in groups.items()}
        self._scatter(routing, bodies, finish)

    def _mset(self, routing: list[bytes], args: list[Any]) -> None:
        pairs: list[bytes] = args[0]
        if self.moving is not None:
            for key in pairs[0::2]:
                if self.frozen and self.moving.contains(key_hash(key)):
                    raise self._frozen_error(key)
            for key in pairs[0::2]:
                self._written(key)
        groups = self._group(pairs[0::2])
        bodies = {
            a: P.encode_request("MSET", [x for i in idx for x in (pairs[2 * i], pairs[2 * i + 1])])
            for a, idx in groups.items()
        }

        def finish(results: list[Any]) -> Any:
            first_error(results)
            return "OK"

        self._scatter(routing, bodies, finish)

    def _pipe(self, routing: list[bytes], args: list[Any]) -> None:
        items: list[Any] = args[0]
        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        parsed: list[tuple[int, str, list[Any]]] = []
        owner = self.ring.owner
        max_key, max_value = self.limits.max_key_bytes, self.limits.max_value_bytes
        plain = self.moving is None
        for i, item in enumerate(items):
            # the short path: a plain GET or SET, checked inline and routed at once
            if plain and type(item) is list and 2 <= len(item) <= 3:
                op, key = item[0], item[1]
                if type(key) is bytes and len(key) <= max_key and (
                        (op == "GET" and len(item) == 2)
                        or (op == "SET" and len(item) == 3 and type(item[2]) is bytes
                            and len(item[2]) <= max_value)):
                    groups.setdefault(owner(key), []).append(i)
                    continue
            try:
                op, sub = P.check_request(item, self.limits)
                if op not in PIPE_OPS:
                    raise CommandError(f"{op} cannot be used in a pipeline")
                if op == "PING":
                    out[i] = P.reply_item("PONG")
                    continue
                if self.moving is not None:
                    parsed.append((i, op, sub))
                    continue
                groups.setdefault(self.ring.owner(sub[0]), []).append(i)
            except ZkvError as exc:
                out[i] = P.error_item(exc)
        if parsed:
            return self._moving_pipe(routing, out, parsed)
        order = list(groups.values())

        def finish(results: list[Any]) -> Any:
            for idx, result in zip(order, results):
                if isinstance(result, ZkvError):
                    for i in idx:
                        out[i] = P.error_item(result)
                else:
                    for i, r in zip(idx, result):
                        out[i] = r
            return out

        if len(groups) == 1 and len(order[0]) == len(items):
            # every command goes to one node: its reply is the client's, forwarded as is
            addr = next(iter(groups))
            self._forward(addr, P.encode_request("PIPE", items), routing)
            return
        share = self.limits.max_message_bytes // max(1, len(groups))
        bodies = {a: P.encode_request("PIPE", [items[i] for i in idx], share)
                  for a, idx in groups.items()}
        self._scatter(routing, bodies, finish, allow_down=True, encode=P.encode_ok_items)

    def _scan(self, routing: list[bytes], args: list[Any]) -> None:
        cursor: str = args[0]
        pattern = args[1] if len(args) > 1 else None
        count = args[2] if len(args) > 2 else 1000
        self._no_listing_during_move()
        members = self.ring.members
        if not members:
            return self._answer(routing, ["0", []])
        if cursor == "0":
            idx, node_cursor = 0, "0"
        else:
            try:
                epoch_text, idx_text, node_cursor = cursor.split(":", 2)
                epoch, idx = int(epoch_text), int(idx_text)
            except ValueError:
                raise CommandError(f"bad SCAN cursor {cursor!r}; start again from 0") from None
            if epoch != self.state.epoch or not 0 <= idx < len(members):
                raise CommandError("the cluster changed during the SCAN; start again from 0")

        def finish(results: list[Any]) -> Any:
            first_error(results)
            nxt, keys = results[0]
            if nxt != "0":
                return [f"{self.state.epoch}:{idx}:{nxt}", keys]
            if idx + 1 < len(members):
                return [f"{self.state.epoch}:{idx + 1}:0", keys]
            return ["0", keys]

        body = P.encode_request("SCAN", node_cursor, pattern, count)
        self._scatter(routing, {members[idx]: body}, finish)

    def _no_listing_during_move(self) -> None:
        if self.state.move is not None:
            raise CommandError(
                "SCAN and KEYS are not available while a move is under way "
                "(keys are on two nodes); retry when STATUS shows no move"
            )

    def _keys(self, routing: list[bytes], args: list[Any]) -> None:
        """KEYS walks every node with SCAN pages, all nodes at once: each page is a
        bounded step for its node, so a big keyspace never stalls a node's loop (its
        heartbeats, everyone else's requests) the way one whole-keyspace request would."""
        self._no_listing_during_move()
        pattern = args[0] if args else None
        members = list(self.ring.members)
        gather = Gather(routing, len(members), self._merge_keys, self.limits.max_message_bytes)
        budget = self.limits.max_message_bytes - 1024
        used = [0]

        def walk(part: int, addr: str, keys: list[bytes], cursor: str) -> None:
            def page(result: Any) -> None:
                if gather.done:
                    return
                if isinstance(result, ZkvError):
                    self._deliver(gather, part, result)
                    return
                nxt, found = result
                keys.extend(found)
                used[0] += sum(len(k) + 16 for k in found)
                if used[0] > budget:
                    self._deliver(gather, part, LimitExceeded(
                        f"KEYS would return more than max_message_bytes ({budget} bytes); "
                        "use SCAN, which pages"))
                elif nxt == "0":
                    self._deliver(gather, part, keys)
                else:
                    walk(part, addr, keys, nxt)

            self._call(addr, "SCAN", [cursor, pattern, KEYS_PAGE], page)

        if not members:
            return self._answer(routing, [])
        for part, addr in enumerate(members):
            walk(part, addr, [], "0")

    @staticmethod
    def _merge_keys(results: list[Any]) -> Any:
        first_error(results)
        return [k for part in results for k in part]

    def _involved(self) -> list[str]:
        """The ring's members, then any other node a move under way involves (a node
        joining before the copy, or leaving after it)."""
        members = list(self.ring.members)
        move = self.state.move
        if move is not None:
            members += sorted((set(move["old"]) | set(move["new"])) - set(members))
        return members

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
            "in_flight": len(self.pending),
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

    def _frozen_error(self, key: bytes) -> ZkvError:
        return Unavailable(
            f"key {key[:64]!r} is in a range whose move is being rolled back (MOVE ABORT): "
            "writes to it wait until the rollback is done (STATUS shows it); nothing changed")

    def _written(self, key: bytes) -> None:
        """Note a write of a moving key (before it is sent: its outcome may stay unknown)."""
        if self.dirty_known:
            if len(self.dirty) >= MAX_DIRTY:
                log.warning("more than %d keys written during this move: reads of moving "
                            "keys no longer fall back to the old owner while a new one is down",
                            MAX_DIRTY)
                self.dirty_known = False
                self.dirty.clear()
            else:
                self.dirty.add(key)

    def _may_read_old(self, key: bytes) -> bool:
        """Whether the old owner holds the latest value of a moving key: true when this
        proxy has seen every write of the copy phase and none was to this key."""
        return self.dirty_known and key not in self.dirty

    def _moving(self, op: str, args: list[Any], done: Callable[[Any], None]) -> None:
        """One single-key command on a key that is being moved: writes go to the new
        owner; reads ask the new owner and fall back to the old one when the new one
        holds no state of the key yet (or does not answer, if the key was not written
        during the move); a delete leaves a tombstone at the new owner."""
        key = args[0]
        new = self.ring.owner(key)
        assert self.old_ring is not None
        old = self.old_ring.owner(key)
        if self.frozen and op in ("SET", "DEL"):
            done(self._frozen_error(key))
            return
        if op == "SET":
            self._written(key)
            self._call(new, op, args, done)
            return

        if op == "DEL":
            self._moving_del(key, new, old, done)
            return

        def after_get(result: Any) -> None:
            if isinstance(result, ZkvError):
                if isinstance(result, Unavailable) and self._may_read_old(key):
                    self._call(old, op, [key], done)  # the new owner has nothing newer
                else:
                    done(result)
                return
            state, value = result
            if state == UNKNOWN:
                self._call(old, op, [key], done)
            elif op == "GET":
                done(value if state == PRESENT else None)
            else:
                done(int(state == PRESENT))

        self._call(new, "XGET", [key], after_get)

    def _moving_del(self, key: bytes, new: str, old: str, done: Callable[[Any], None]) -> None:
        """DEL of a moving key. Whether it existed may depend on the old owner, so that
        is asked *before* the tombstone is written: if either node fails first, nothing
        was deleted and the error says so truthfully."""
        def delete(existed_elsewhere: int) -> None:
            self._written(key)

            def after_del(result: Any) -> None:
                if isinstance(result, ZkvError):
                    done(result)
                else:
                    done(int(bool(result[0]) or bool(existed_elsewhere)))

            self._call(new, "XDEL", [key], after_del)

        def after_state(result: Any) -> None:
            if isinstance(result, ZkvError):
                done(result)
            elif result[0] == UNKNOWN:
                def after_exists(exists: Any) -> None:
                    if isinstance(exists, ZkvError):
                        done(exists)
                    else:
                        delete(int(exists))
                self._call(old, "EXISTS", [key], after_exists)
            else:
                delete(0)

        self._call(new, "XGET", [key], after_state)

    def _join(self, routing: list[bytes], parts: int, finish: Callable[[list[Any]], Any],
              over: Callable[[int], Any]) -> Callable[[int], Callable[[Any], None]]:
        """Callbacks for ``parts`` results; ``finish`` runs once all are in. Values are
        counted against the reply budget as they come (see Gather)."""
        limit = self.limits.max_message_bytes
        gather = Gather(routing, parts, finish, limit,
                        value_budget=limit - 256 * parts - 1024, over=over)
        return lambda i: (lambda result: self._deliver(gather, i, result))

    def _moving_mget(self, routing: list[bytes], keys: list[bytes]) -> None:
        def finish(results: list[Any]) -> Any:
            first_error(results)
            return results

        slot = self._join(routing, len(keys), finish, _fail_whole)
        for i, key in enumerate(keys):
            self._moving_or_direct("GET", [key], slot(i))

    def _moving_pipe(self, routing: list[bytes], out: list[Any],
                     parsed: list[tuple[int, str, list[Any]]]) -> None:
        """A pipeline while a move is open: each keyed command on its own, in order."""
        def finish(results: list[Any]) -> Any:
            for (i, _, _), r in zip(parsed, results):
                out[i] = P.error_item(r) if isinstance(r, ZkvError) else P.reply_item(r)
            return out

        slot = self._join(routing, len(parsed), finish, _over_in_place)
        for n, (_, op, sub) in enumerate(parsed):
            self._moving_or_direct(op, sub, slot(n))

    def _moving_or_direct(self, op: str, args: list[Any], done: Callable[[Any], None]) -> None:
        assert self.moving is not None
        if self.moving.contains(key_hash(args[0])):
            self._moving(op, args, done)
        else:
            self._call(self.ring.owner(args[0]), op, args, done)

    # -- administration: ADD and REMOVE -------------------------------------------
    def send(self, addr: str, op: str, args: list[Any], done: Callable[[Any], None],
             timeout: float = 60.0) -> None:
        """For the move driver: a request to a node, its result to ``done``."""
        if addr not in self.links:
            self._connect(addr)
        self._call(addr, op, args, done, timeout)

    def commit(self, state: ClusterState) -> None:
        """Persist a new state, then let it take effect."""
        save_state(self.state_dir, state)
        self._apply_state(state)

    def _apply_state(self, state: ClusterState) -> None:
        self.state = state
        self.ring = state.ring()
        move = state.move
        self.frozen = move is not None and move["phase"] == "revert"
        if move is not None and move["phase"] in ("copy", "revert"):
            if self.moving is None:  # the copy phase starts: no write of it seen yet
                self.dirty.clear()
                self.dirty_known = self._serving  # a proxy restarted mid-copy missed some
            self.moving = moving_ranges(move)
            self.old_ring = Ring(move["old"], state.vnodes)
        else:
            self.moving, self.old_ring = None, None
        wanted = set(state.members) | (set(move["old"]) | set(move["new"]) if move else set())
        for addr in sorted(wanted - set(self.links)):
            self._connect(addr)

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
        wanted = set(self.state.members)
        for addr in sorted(set(self.links) - wanted):
            self._disconnect(addr)

    def _check_admin(self) -> None:
        if self.driver is not None:
            m = self.driver.move
            raise ClusterError(
                f"a move is under way ({m['kind'].upper()} {m['node']}, phase {m['phase']}); "
                "wait for it to finish (STATUS shows its progress)"
            )
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
        self.commit(self.state.with_members(
            {a: w for a, w in self.state.members.items() if a != addr}))
        self._drop_links()
        log.error("REMOVE %s --force: the node is dropped from the ring at epoch %d without "
                  "its keys: %s are LOST", addr, self.state.epoch, lost)
        self._answer(routing, {"removed": addr, "forced": True, "epoch": self.state.epoch,
                               "lost": lost, "lost_keys": known[0] if known else None})

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
        if self.driver.finished:
            self.driver = None
            self._drop_links()
        self._answer(routing, {"id": move_id, "epoch": self.state.epoch, "message": message,
                               "move": self.driver.status() if self.driver else None})

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
            self.commit(self.state.with_members(new_members))
            reply["epoch"] = self.state.epoch
            return self._answer(routing, reply)
        settings = dict(self.move_defaults)
        settings.update({k: v for k, v in options.items() if k in settings and v is not None})
        move = new_move(self.state, kind, addr, new_members, settings)
        self.commit(self.state.with_move(move))
        self.driver = MoveDriver(self, self.state)
        reply["id"] = move["id"]
        self._answer(routing, reply)

    # -- replies from nodes ------------------------------------------------------
    def handle_node(self, addr: str, frames: list[bytes], now: float) -> None:
        if self.health.seen(addr, now):
            log.info("node %s is up", addr)
        if len(frames) != 2 or frames[0] == HEARTBEAT_TAG:
            return
        entry = self.pending.pop(frames[0], None)
        if entry is None:
            return  # a late reply to a request that already timed out
        target, _, part, _ = entry
        if part == -1:
            self.out.send([*target, frames[1]])
            return
        try:
            result: Any = P.decode_reply(frames[1])
        except ZkvError as exc:
            result = exc
        self._continue(entry, result)

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
                    for _ in range(MAX_PER_TURN):
                        handle(recv(front))
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
        if self.driver.finished:
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
        if self.state.move is not None:
            log.info("resuming move %s (%s)", self.state.move["id"], self.state.move["phase"])
            self.driver = MoveDriver(self, self.state)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        self._warm_up(min(self.timeout, 1.0))
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
