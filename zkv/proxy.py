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
import json
import logging
import os
import signal
import struct
import time
from typing import Any, Callable

import zmq

from . import protocol as P
from .cluster import ClusterState, Health
from .errors import (
    ClusterError,
    CommandError,
    InternalError,
    NodeUnavailable,
    Timeout,
    ZkvError,
)
from .ring import Ring, key_hash

log = logging.getLogger("zkv.proxy")

HEARTBEAT_TAG = b"hb"
STATE_FILE = "cluster.json"
MAX_PER_TURN = 4096
SINGLE_KEY = frozenset(("GET", "SET", "DEL", "EXISTS"))
PIPE_OPS = frozenset(("GET", "SET", "DEL", "EXISTS", "PING"))

_TAG = struct.Struct("<Q")


class Gather:
    """Collects the replies of the sub-requests one client request was split into."""

    __slots__ = ("routing", "results", "left", "finish", "done")

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
        vnodes: int = 256,
        timeout_ms: int = 2000,
        heartbeat_ms: int = 500,
        heartbeat_misses: int = 3,
        limits: P.Limits = P.DEFAULT_LIMITS,
    ) -> None:
        self.address = f"{host}:{port}"
        self.host, self.port = host, port
        self.state_dir = state_dir
        self.timeout = timeout_ms / 1000.0
        self.limits = limits
        self.health = Health(heartbeat_ms / 1000.0, heartbeat_misses)
        self.notes: list[str] = []
        self.state = self._initial_state(members or {}, vnodes)
        self.ring: Ring = self.state.ring()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.front: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        self.links: dict[str, zmq.Socket[bytes]] = {}
        self.by_socket: dict[zmq.Socket[bytes], str] = {}
        self.poller = zmq.Poller()
        self.pending: dict[bytes, tuple[Any, str, int]] = {}
        self.deadlines: collections.deque[tuple[float, bytes]] = collections.deque()
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
        sock.setsockopt(zmq.LINGER, 0)
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
    def _forward(self, addr: str, body: bytes, target: Any, part: int = -1) -> None:
        """Send ``body`` to node ``addr``; its reply goes to ``target`` (routing or Gather)."""
        if not self.health.is_up(addr):
            raise NodeUnavailable(f"node {addr} is down")
        self._seq += 1
        tag = _TAG.pack(self._seq)
        try:
            self.links[addr].send_multipart([b"", tag, body], zmq.NOBLOCK)
        except zmq.Again:
            raise NodeUnavailable(f"node {addr} is not connected or not keeping up") from None
        self.pending[tag] = (target, addr, part)
        self.deadlines.append((time.monotonic() + self.timeout, tag))

    def _answer(self, routing: list[bytes], result: Any) -> None:
        self.front.send_multipart([*routing, P.encode_ok(result)])

    def _fail(self, routing: list[bytes], exc: ZkvError) -> None:
        self.errors += 1
        self.front.send_multipart([*routing, P.encode_exc(exc)])

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
            self.front.send_multipart([*gather.routing, reply])

    # -- the front -------------------------------------------------------------
    def handle_front(self, frames: list[bytes]) -> None:
        self.requests += 1
        routing = frames[:-1]
        try:
            if len(frames) > self.limits.max_frames:
                raise P.ProtocolError(
                    f"{len(frames)} frames in one message; at most {self.limits.max_frames}"
                )
            body = frames[-1]
            op, args = P.parse_request(body, self.limits)
            if op in SINGLE_KEY:
                self._forward(self.ring.owner(args[0]), body, routing)
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
        groups = self._group(keys)
        order = list(groups.values())

        def finish(results: list[Any]) -> Any:
            first_error(results)
            out: list[Any] = [None] * len(keys)
            for idx, values in zip(order, results):
                for i, v in zip(idx, values):
                    out[i] = v
            return out

        bodies = {a: P.encode_request("MGET", [keys[i] for i in idx]) for a, idx in groups.items()}
        self._scatter(routing, bodies, finish)

    def _mset(self, routing: list[bytes], args: list[Any]) -> None:
        pairs: list[bytes] = args[0]
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
        for i, item in enumerate(items):
            try:
                op, sub = P.check_request(item, self.limits)
                if op not in PIPE_OPS:
                    raise CommandError(f"{op} cannot be used in a pipeline")
                if op == "PING":
                    out[i] = P.reply_item("PONG")
                    continue
                groups.setdefault(self.ring.owner(sub[0]), []).append(i)
            except ZkvError as exc:
                out[i] = P.error_item(exc)
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

        bodies = {a: P.encode_request("PIPE", [items[i] for i in idx]) for a, idx in groups.items()}
        self._scatter(routing, bodies, finish, allow_down=True)

    def _scan(self, routing: list[bytes], args: list[Any]) -> None:
        cursor: str = args[0]
        pattern = args[1] if len(args) > 1 else None
        count = args[2] if len(args) > 2 else 1000
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

    def _keys(self, routing: list[bytes], args: list[Any]) -> None:
        body = P.encode_request("KEYS", *args)

        def finish(results: list[Any]) -> Any:
            first_error(results)
            return [k for part in results for k in part]

        self._scatter(routing, {a: body for a in self.ring.members}, finish)

    def _gather_info(self, routing: list[bytes], build: Callable[[dict[str, Any]], Any]) -> None:
        members = list(self.ring.members)
        body = P.encode_request("INFO")

        def finish(results: list[Any]) -> Any:
            infos = {
                a: ({"error": str(r), "code": r.code} if isinstance(r, ZkvError) else r)
                for a, r in zip(members, results)
            }
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
        out = []
        for addr in self.ring.members:
            info = infos.get(addr, {})
            out.append({
                "address": addr,
                "state": "up" if self.health.is_up(addr) else "down",
                "keys": info.get("keys"),
                "share": round(shares.get(addr, 0.0), 6),
                "weight": self.state.members.get(addr, 1.0),
                "fsync": info.get("fsync"),
                "error": info.get("error"),
            })
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
            "move": self.state.move,
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
        }

    # -- replies from nodes ------------------------------------------------------
    def handle_node(self, addr: str, frames: list[bytes], now: float) -> None:
        self.health.seen(addr, now)
        if len(frames) != 3 or frames[1] == HEARTBEAT_TAG:
            return
        entry = self.pending.pop(frames[1], None)
        if entry is None:
            return  # a late reply to a request that already timed out
        target, _, part = entry
        if part < 0:
            self.front.send_multipart([*target, frames[2]])
            return
        try:
            result: Any = P.decode_reply(frames[2])
        except ZkvError as exc:
            result = exc
        self._deliver(target, part, result)

    def _expire(self, now: float) -> None:
        deadlines, pending = self.deadlines, self.pending
        while deadlines and deadlines[0][0] <= now:
            _, tag = deadlines.popleft()
            entry = pending.pop(tag, None)
            if entry is not None:
                self._abandon(entry, Timeout(
                    f"node {entry[1]} did not answer within {self.timeout * 1000:.0f} ms; "
                    "the outcome of a write is unknown"
                ))

    def _abandon(self, entry: tuple[Any, str, int], exc: ZkvError) -> None:
        target, _, part = entry
        if part < 0:
            self._fail(target, exc)
        else:
            self._deliver(target, part, exc)

    def _node_down(self, addr: str) -> None:
        log.warning("node %s is down (no heartbeat reply)", addr)
        lost = [tag for tag, entry in self.pending.items() if entry[1] == addr]
        for tag in lost:
            self._abandon(self.pending.pop(tag), NodeUnavailable(
                f"node {addr} went down with this request in flight; "
                "the outcome of a write is unknown"
            ))

    def _heartbeat(self, now: float) -> None:
        ping = P.encode_request("PING")
        for addr in self.health.due_pings(now):
            try:
                self.links[addr].send_multipart([b"", HEARTBEAT_TAG, ping], zmq.NOBLOCK)
            except zmq.Again:
                pass
        for addr in self.health.expire(now):
            self._node_down(addr)

    # -- the loop ------------------------------------------------------------------
    def serve(self) -> None:
        front, poller = self.front, self.poller
        by_socket = self.by_socket
        was_up = {a: True for a in self.links}
        while not self._stop:
            events = poller.poll(50)
            for sock, _ in events:
                if sock is front:
                    for _ in range(MAX_PER_TURN):
                        try:
                            frames = front.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle_front(frames)
                else:
                    addr = by_socket.get(sock)
                    if addr is None:
                        continue
                    now = time.monotonic()
                    for _ in range(MAX_PER_TURN):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle_node(addr, frames, now)
            now = time.monotonic()
            self._expire(now)
            self._heartbeat(now)
            for addr in self.links:
                up = self.health.is_up(addr)
                if up and not was_up.get(addr, True):
                    log.info("node %s is up", addr)
                was_up[addr] = up

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        front = self.front
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        front.setsockopt(zmq.SNDHWM, 100_000)
        front.setsockopt(zmq.RCVHWM, 100_000)
        try:
            front.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            self.ctx.destroy(0)
            raise ClusterError(f"cannot listen on {self.address}: {exc}") from exc
        self.poller.register(front, zmq.POLLIN)
        for addr in self.ring.members:
            self._connect(addr)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        line = (
            f"zkv proxy {self.address} epoch={self.state.epoch} "
            f"members={','.join(self.ring.members) or '-'} state={self.state_dir}"
        )
        if on_ready:
            on_ready(line)
        try:
            self.serve()
        finally:
            self.ctx.destroy(0)


__all__ = ["Proxy", "key_hash"]
