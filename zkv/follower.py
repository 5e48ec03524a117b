"""A follower proxy: serves data traffic like the config manager, holds no state.

    zkv proxy --port 8001 --follow 127.0.0.1:8000

It learns the cluster configuration from the config manager (and, while that is
down, from the nodes, taking the highest epoch any of them has), asks for a newer
one every POLL seconds and at once whenever a node says its view is stale, and
routes with the same core as the manager (zkv.core.router). A node refuses whatever it
routed by an older epoch, so a follower that lags can delay a request, never have
a stale write acknowledged. ADD, REMOVE, MOVE, REPLICA, FAILOVER and STATUS go to the
config manager, or fail naming it when it does not answer; data traffic goes on
without it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq

from . import frames as wire
from .core import protocol as P
from .core.cluster import ClusterState
from .core.ring import DEFAULT_VNODES
from .errors import ClusterError, Timeout, ZkvError
from .shell import _TAG, DEFAULT_CLIENT_BUFFER, DEFAULT_MAX_CLIENTS, ProxyShell

log = logging.getLogger("zkv.follower")

# seconds between two asks for a newer configuration (tests make a follower lag with a
# long one, ZKV_FOLLOWER_POLL)
POLL = float(os.environ.get("ZKV_FOLLOWER_POLL", "0.25") or 0.25)
# seconds after its start in which a follower waits quietly for a config manager that
# has never answered (zkv up and honcho start every process at once)
START_GRACE = 10.0
FORWARDED = ("ADD", "REMOVE", "MOVE", "STATUS", "REPLICA", "FAILOVER")


class Follower(ProxyShell):
    def __init__(
        self,
        manager: str,
        host: str = "127.0.0.1",
        port: int = 8001,
        seeds: list[str] | None = None,
        timeout_ms: int = 2000,
        heartbeat_ms: int = 500,
        heartbeat_misses: int = 3,
        limits: P.Limits = P.DEFAULT_LIMITS,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
    ) -> None:
        super().__init__(ClusterState(0, {}, DEFAULT_VNODES), host, port, timeout_ms,
                         heartbeat_ms, heartbeat_misses, limits, max_clients,
                         client_buffer_bytes)
        self.manager = manager
        self.seeds = list(seeds or [])  # nodes to ask while there is no configuration yet
        self.manager_up: bool | None = None  # unknown until the first answer
        self._first_ask: float | None = None
        self._said_waiting = False
        self.manager_sock: zmq.Socket[bytes] | None = None
        self._next_poll = 0.0
        self._asking = 0  # CONFIG requests out
        self._body = b""
        for op in FORWARDED:
            self._ops[op] = self._to_manager

    # -- the configuration ---------------------------------------------------------------
    def _learn(self, doc: Any, source: str) -> None:
        """A configuration someone sent: taken if it is newer than ours."""
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            return
        try:
            state = ClusterState.from_json(doc["config"], source)
        except ZkvError as exc:
            log.warning("ignored a configuration from %s: %s", source, exc)
            return
        if self.state.cluster and state.cluster != self.state.cluster:
            log.warning("ignored a configuration from %s: it is of cluster %s, this proxy "
                        "follows cluster %s", source, state.cluster or "(no id)",
                        self.state.cluster)
            return
        if state.epoch > self.state.epoch:
            log.info("epoch %d (from %s)", state.epoch, source)
            self._apply_state(state)

    def _ask(self, now: float) -> None:
        """Ask the manager for a newer configuration; while it does not answer, the nodes."""
        if self._asking:
            return
        self._next_poll = now + POLL
        self._asking = 1
        if self._first_ask is None:
            self._first_ask = now

        def from_manager(result: Any) -> None:
            self._asking = 0
            if isinstance(result, ZkvError):
                starting = (self.manager_up is None
                            and time.monotonic() - (self._first_ask or 0.0) < START_GRACE)
                if starting:  # started with it: a warning now would be noise
                    if not self._said_waiting:
                        log.info("waiting for the config manager %s (%s); following the "
                                 "nodes meanwhile", self.manager, result)
                    self._said_waiting = True
                    self._ask_nodes()
                    return
                if self.manager_up is not False:
                    log.warning("the config manager %s does not answer (%s); following the "
                                "nodes meanwhile", self.manager, result)
                self.manager_up = False
                self._ask_nodes()
                return
            if self.manager_up is False:
                log.info("the config manager %s answers again", self.manager)
            self.manager_up = True
            self._learn(result, f"the config manager {self.manager}")

        self._call_manager("CONFIG", [self.state.epoch], from_manager)

    def _ask_nodes(self) -> None:
        nodes = self._involved() or self.seeds
        self._asking = len(nodes)
        for addr in nodes:
            if addr not in self.links:
                self._connect(addr)

            def from_node(result: Any, addr: str = addr) -> None:
                self._asking = max(0, self._asking - 1)
                if not isinstance(result, ZkvError):
                    self._learn(result, f"node {addr}")

            self._call(addr, "CONFIG", [], from_node, self.timeout)

    def _wants(self, epoch: int) -> None:
        now = time.monotonic()
        if now >= self._next_poll - POLL + 0.02:  # at once, but not in a tight loop
            self._ask(now)

    def _housekeeping(self, now: float) -> None:
        if now >= self._next_poll:
            self._ask(now)

    # -- the config manager ----------------------------------------------------------------
    def _call_manager(self, op: str, args: list[Any], done: Any) -> None:
        assert self.manager_sock is not None
        self._seq += 1
        tag = _TAG.pack(self._seq)
        try:
            wire.send(self.manager_sock, [tag, P.encode_request(op, *args)], wire.NOBLOCK)
        except zmq.Again:
            done(ClusterError(f"the config manager {self.manager} is not connected"))
            return
        self.pending[tag] = (done, self.manager, -2, self._owner)
        self.deadlines.append((time.monotonic() + self.timeout, tag))

    def handle_front(self, frames: list[bytes], now: float) -> None:
        self._body = frames[-1]
        super().handle_front(frames, now)

    def _to_manager(self, routing: list[bytes], args: list[Any]) -> None:
        """An admin command (or STATUS): the config manager's to answer."""
        body = self._body

        down = ClusterError(
            f"the config manager {self.manager} does not answer: ADD, REMOVE, MOVE, REPLICA, "
            "FAILOVER and STATUS need it (data traffic goes on through this follower)")

        def answered(result: Any) -> None:
            if isinstance(result, Timeout):
                self._fail(routing, down)
            elif isinstance(result, ZkvError):
                self._fail(routing, result)  # the manager's own answer: refused, say
            else:
                self._answer(routing, result)

        assert self.manager_sock is not None
        self._seq += 1
        tag = _TAG.pack(self._seq)
        try:
            wire.send(self.manager_sock, [tag, body], wire.NOBLOCK)
        except zmq.Again:
            self._fail(routing, down)
            return
        self.pending[tag] = (answered, self.manager, -2, routing)
        self.deadlines.append((time.monotonic() + self.timeout, tag))

    # -- what a follower adds to the shell -----------------------------------------------
    def _before_serve(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        if self.curve is not None:
            self.curve.connect(sock)  # the config manager presents the cluster key too
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(f"tcp://{self.manager}")
        self.manager_sock = sock
        self.by_socket[sock] = self.manager
        self.poller.register(sock, zmq.POLLIN)
        self._first_configuration()
        super()._before_serve()

    def _first_configuration(self) -> None:
        """Before serving: a configuration from the manager, or else from the nodes given,
        within the timeout (a follower with none answers that the cluster has no nodes)."""
        deadline = time.monotonic() + max(self.timeout, 1.0)
        while self.state.epoch == 0 and time.monotonic() < deadline:
            now = time.monotonic()
            if not self._asking:
                self._ask(now)
            for sock, _ in self.poller.poll(20):
                addr = self.by_socket.get(sock)
                if addr is not None:
                    while wire.waiting(sock):
                        self.handle_node(addr, wire.recv(sock), time.monotonic())
            self._expire(time.monotonic())
        if self.state.epoch == 0:
            log.warning("no configuration yet (the config manager %s and the nodes do not "
                        "answer); asking again every %.2f s", self.manager, POLL)

    def _ready_line(self) -> str:
        return f"{super()._ready_line()} follows={self.manager}"

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["manager"] = self.manager
        out["manager_up"] = bool(self.manager_up)
        return out

    def config_doc(self, since: Any = None) -> dict[str, Any]:
        return {**super().config_doc(since), "manager": self.manager}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "role": "follower", "manager": self.manager,
                "manager_up": bool(self.manager_up)}


__all__ = ["Follower"]
