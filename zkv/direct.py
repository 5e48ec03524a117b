"""Direct routing: a :class:`zkv.Client` that sends each request straight to its node.

    >>> c = zkv.Client("127.0.0.1:8000", direct=True)

The client asks the proxy it is given for the cluster configuration (CONFIG) once,
then routes with the same core as the proxy (:class:`zkv.core.router.Router`): one
DEALER per node, each node's requests of one round in one envelope carrying the
configuration's epoch. A node refuses what was routed by another epoch than its own
(STALE_EPOCH, MOVED), having applied none of it; the core parks it, this shell asks
for a newer configuration (the proxy, then the nodes, taking the highest epoch), and
the core routes it again, at most ``MAX_REROUTES`` times before the error reaches
the caller. So a client with a stale view is slower for a moment, never wrong.

When a node cannot be reached (nothing was sent: refused, shed, no route), its
requests go through the proxy instead, and so does everything for a second
(``FALLBACK``) before the node is tried again. Commands the core does not serve
(INFO, STATUS, ADD, REMOVE, ...) always go to the proxy.

What comes back is exactly what the proxy would have answered, so everything on top
(``pipeline()``, ``call_many()``, ``scan_iter()``, timeouts and retries) is the
Client's own and behaves the same.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import frames as wire
from .core import protocol as P
from .core.cluster import ClusterState
from .core.placement import Placement
from .core.router import CORE_OPS, Router, _is_error
from .errors import LimitExceeded, NodeUnavailable, NotSent, Timeout, ZkvError
from .link import STALL_GAP, STALL_GRACE, Link

if TYPE_CHECKING:
    from .security import Curve

log = logging.getLogger("zkv.direct")

Request = tuple[str, list[Any]]  # (op, args), not yet encoded

_TAG = struct.Struct("<Q")
ENVELOPE_FRAME = b"\x00env"  # = zkv.shell.ENVELOPE_FRAME (the node echoes it back)
ENVELOPE_MAX = 1024  # requests in one envelope
FALLBACK = 1.0  # seconds everything goes through the proxy after a node could not be reached
CONNECT_WAIT = 1.0  # longest wait for a node's connection before going through the proxy
REFRESH_EVERY = 0.02  # seconds between two asks for a configuration the core is waiting for
# A node's requests that the proxy can serve as they are, if the node cannot be reached.
# (The move protocol's own steps, XGET and XDEL, and a node's SCAN cursor, are not.)
VIA_PROXY = frozenset(("MGET", "MSET", "MSETNX", "PIPE", "ONCE")) | P.SINGLE_KEY_OPS
SINGLE = P.SINGLE_KEY_OPS
# what a node answers, applying nothing, to a request routed by a view not its own
REFUSALS = frozenset((b"STALE_EPOCH", b"MOVED", b"BEHIND"))


class DirectRouting:
    """The transport of ``Client(direct=True)``: bodies in, the proxy's reply bodies out."""

    def __init__(self, ctx: zmq.Context[Any], proxy: Link, timeout: float,
                 curve: Curve | None = None, limits: P.Limits = P.DEFAULT_LIMITS) -> None:
        self.ctx = ctx
        self.curve = curve  # the client's CURVE keys: nodes present the cluster key too
        self.proxy = proxy
        self.timeout = timeout
        self.limits = limits
        self.state: ClusterState | None = None
        self.cluster_tag = b""  # names the cluster in envelopes (zkv.core.protocol)
        self.placement: Placement | None = None
        self.router: Router | None = None
        self.links: dict[str, Link] = {}  # one per node, for envelopes
        self.config_links: dict[str, Link] = {}  # for CONFIG (the proxy's, the nodes')
        self.fallback_until = 0.0  # while now < this, everything goes through the proxy
        self._clients = itertools.count(1)
        self._envelopes = itertools.count(1)
        self._next_refresh = 0.0
        # what is in flight outside the core: the proxy's tag -> (client id | None, core tag)
        self.via_proxy: dict[bytes, tuple[int | None, int | None]] = {}
        self.envelopes: dict[bytes, tuple[str, set[int]]] = {}
        self.refreshes = 0  # configurations asked for (for tests and INFO-like curiosity)
        self._pollers: dict[str, tuple[Any, zmq.Poller]] = {}  # node -> (its socket, poller)
        # after a stall of this process (see zkv.link.STALL_GAP), no deadline is judged
        # before this, so that replies left in the kernel's buffers are read first
        self._grace_until = 0.0
        self._waited = 0.0  # when the last wait of this round ended (or the round began)

    # -- the configuration ---------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.state.epoch if self.state is not None else 0

    def _learn(self, doc: Any, source: str) -> bool:
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            return False
        try:
            state = ClusterState.from_json(doc["config"], source)
        except ZkvError as exc:
            log.warning("ignored a configuration from %s: %s", source, exc)
            return False
        if state.epoch <= self.epoch:
            return False
        self._learn_limits(doc.get("limits"))
        self.state = state
        self.cluster_tag = P.cluster_tag(state.cluster)
        for node in [n for n, link in self.links.items() if link.address != state.primary(n)]:
            self.links.pop(node).close()  # its shard failed over: talk to the new primary
            self._pollers.pop(node, None)
        placement = self.placement = Placement(state)
        if self.router is None:
            # the router's own deadline is a little past the caller's: the caller's
            # Timeout (outcome unknown, reads retried) is what reaches the user
            self.router = Router(placement, self.limits, self.timeout + 1.0)
        else:
            self.router.set_placement(placement)
        return True

    def _learn_limits(self, limits: Any) -> None:
        """The proxy's request limits (what it says in CONFIG), so that a request over them
        is refused here as the proxy would, before anything is sent."""
        if not isinstance(limits, dict):
            return
        try:
            self.limits = P.Limits(**{k: v for k, v in limits.items()
                                      if k in P.Limits.__dataclass_fields__})
        except (TypeError, ValueError) as exc:
            log.warning("ignored the proxy's limits %r: %s", limits, exc)
            return
        if self.router is not None:
            self.router.limits = self.limits

    def refresh(self, deadline: float) -> None:
        """Ask the proxy for a newer configuration; if it does not answer, the nodes we
        know (the highest epoch wins). Raises NotSent when there is none at all. (Asked
        on sockets of their own: replies to requests in flight are not in the way.)"""
        self.refreshes += 1
        try:
            link = self._config_link(self.proxy.address)
            doc = P.decode_reply(link.request(P.encode_request("CONFIG", self.epoch),
                                              max(0.05, deadline - time.monotonic())))
            self._learn(doc, f"the proxy {self.proxy.address}")
            return
        except ZkvError as exc:  # NotSent and Timeout too
            proxy_error: ZkvError = exc
        for addr in self._known_nodes():
            try:
                link = self._config_link(addr)
                doc = P.decode_reply(link.request(P.encode_request("CONFIG"),
                                                  max(0.05, deadline - time.monotonic())))
                self._learn(doc, f"node {addr}")
            except ZkvError:
                continue
        if self.state is None:
            raise NotSent(f"no cluster configuration from {self.proxy.address}: "
                          f"{proxy_error}") from None

    def _config_link(self, addr: str) -> Link:
        link = self.config_links.get(addr)
        if link is None:
            link = self.config_links[addr] = Link(self.ctx, addr, hwm=16, curve=self.curve)
        return link

    def _known_nodes(self) -> list[str]:
        return sorted(self.state.involved()) if self.state is not None else []

    # -- one round of requests -----------------------------------------------------------
    def request(self, body: bytes, timeout: float, op: str | None = None,
                key: bytes | None = None) -> bytes:
        """One body, its reply; NotSent or Timeout as a Link raises them. ``op`` and ``key``
        (of a single-key command) let it take the short way when it can."""
        if key is not None and op in SINGLE:
            reply = self._single(body, timeout, key)
            if reply is not None:
                return reply
        out = self.exchange_many([body], timeout, 1)[0]
        if isinstance(out, (NotSent, Timeout)):
            raise out
        return out

    def _single(self, body: bytes, timeout: float, key: bytes) -> bytes | None:
        """A single-key request when nothing moves and nothing else is in flight: straight
        to its owner over a live connection, in an envelope of one, without the core's
        bookkeeping. None when it cannot go this way, or the node refused it unapplied
        (the general path then takes it, the core handling the refusal)."""
        p = self.placement
        router = self.router
        now = time.monotonic()
        if (p is None or router is None or p.moving is not None or self.envelopes
                or self.via_proxy or router.parked or now < self.fallback_until
                or not len(p.ring)):
            return None
        node = p.owner(key)
        link = self.links.get(node)
        if link is None or not link.ready or link.sock is None:
            return None  # the general path connects it
        sock = link.sock
        cached = self._pollers.get(node)
        if cached is None or cached[0] is not sock:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(link.monitor, zmq.POLLIN)
            cached = self._pollers[node] = (sock, poller)
        poller = cached[1]
        frame = ENVELOPE_FRAME + _TAG.pack(next(self._envelopes))
        try:
            wire.send(sock, [frame, P.encode_envelope(p.epoch, [(0, body)], self.cluster_tag)],
                      wire.NOBLOCK)
        except zmq.Again:
            return None  # not connected after all: the general path finds out why
        deadline = now + timeout
        while True:
            left = deadline - time.monotonic()
            events = dict(poller.poll(max(1, int(left * 1000)) if left > 0 else 0))
            if not events and time.monotonic() - deadline > STALL_GAP:  # (zkv.link)
                events = dict(poller.poll(int(STALL_GRACE * 1000)))
            if not events:
                link.close()  # Lazy Pirate: a fresh socket for what comes next
                raise Timeout(f"no reply from node {node} within {timeout:g}s")
            if link.monitor in events:
                link._watch(link._events(0))
                if link.lost:
                    return P.encode_exc(NodeUnavailable(
                        f"the connection to node {node} was lost with this request in "
                        "flight; the outcome of a write is unknown"))
            if sock not in events:
                continue
            frames = wire.recv(sock)
            if len(frames) != 2 or frames[0] != frame:
                continue  # a late reply to a request given up on
            try:
                reply = P.decode_reply_envelope(frames[1])[0][1]
            except (ZkvError, IndexError):
                reply = frames[1]  # the envelope refused as a whole: a plain error
            if _is_error(reply) and _error_code(reply) in REFUSALS:
                return None
            return reply

    def exchange_many(self, bodies: list[bytes] | list[Request], timeout: float,
                      window: int) -> list[bytes | Timeout | NotSent]:
        """Like :meth:`zkv.link.Link.exchange_many`: every body sent (at most ``window``
        in flight), replies in order; Timeout where none came, NotSent where never sent.
        A request may be given as ``(op, args)`` instead of a body, as the client would
        encode it: the core then takes it as it is (it checks what it routes)."""
        now = time.monotonic()
        if self.state is None:
            self.refresh(now + timeout)
        n = len(bodies)
        out: list[bytes | Timeout | NotSent | None] = [None] * n
        base = next(self._clients)
        for _ in range(n):  # the ids of this round's requests, base .. base + n - 1
            next(self._clients)
        self._round = (base, out)
        self._received = 0
        self._waited = now  # (a stall is judged within this round)
        sent = 0
        progress = now
        while self._received < n:
            now = time.monotonic()
            while sent < n and sent - self._received < window:
                self._submit(base + sent, bodies[sent], now)
                sent += 1
            self._flush(now)
            if self._received >= n:
                break
            left = progress + timeout - now
            if left <= 0:
                if now >= self._grace_until:
                    break
                left = self._grace_until - now
            got = self._wait(min(left, self._next_event(now)))
            if got:
                progress = time.monotonic()
        self._round = (0, [])
        if self._received < n:
            self._lost(timeout)
            failure = Timeout(f"no reply from the cluster (direct, via {self.proxy.address}) "
                              f"within {timeout:g}s")
            for i in range(n):
                if out[i] is None:
                    out[i] = failure if i < sent else NotSent(
                        f"not sent: earlier requests got no reply within {timeout:g}s")
        return [x for x in out if x is not None]

    def _submit(self, client: int, request: bytes | Request, now: float) -> None:
        if isinstance(request, bytes):
            body = request
            try:
                op, args = P.parse_request(body, self.limits)
            except ZkvError as exc:
                self._answer(client, P.encode_exc(exc))
                return
        else:
            op, args = request
            body = b""
            if op == "PIPE" and len(args[0]) > self.limits.max_batch:
                self._answer(client, P.encode_exc(LimitExceeded(
                    f"{len(args[0])} commands in one PIPE; at most {self.limits.max_batch}")))
                return
        if op not in CORE_OPS or now < self.fallback_until or self.router is None:
            self._to_proxy(body or P.encode_request(op, *args), client, None, now)
            return
        self.router.request_parsed(client, op, args, body, now)

    def _answer(self, client: int, body: bytes) -> None:
        base, out = self._round
        i = client - base
        if 0 <= i < len(out) and out[i] is None:
            out[i] = body
            self._received += 1

    def _flush(self, now: float) -> None:
        """Carry out what the core has: envelopes to nodes, answers, a refresh. (Doing so
        may give it more at once: a refused send fails over, a refresh re-routes.)"""
        router = self.router
        if router is None:
            return
        for _ in range(4):
            ready = router.ready()
            for node, items in ready.sends.items():
                for start in range(0, len(items), ENVELOPE_MAX):
                    self._send_envelope(node, ready.epoch, items[start : start + ENVELOPE_MAX],
                                        now)
            for client, body in ready.answers:
                self._answer(client, body)
            if ready.wants is not None and ready.wants > self.epoch and now >= self._next_refresh:
                self._next_refresh = now + REFRESH_EVERY
                try:
                    self.refresh(now + min(self.timeout, 1.0))
                except NotSent:
                    pass
            pending = router._ready
            if not pending.sends and not pending.answers:
                return

    def _send_envelope(self, node: str, epoch: int, items: list[tuple[int, bytes]],
                       now: float) -> None:
        assert self.router is not None
        if now < self.fallback_until:
            self._proxy_items(node, items, "the node was unreachable a moment ago", now)
            return
        link = self.links.get(node)
        if link is None:
            assert self.state is not None
            link = self.links[node] = Link(self.ctx, self.state.primary(node), curve=self.curve)
        frame = ENVELOPE_FRAME + _TAG.pack(next(self._envelopes))
        body = P.encode_envelope(epoch, items, self.cluster_tag)
        try:
            link._send([frame, body], now + min(self.timeout, CONNECT_WAIT))
        except NotSent as exc:
            log.info("node %s cannot be reached (%s): going through the proxy for %.1fs",
                     node, exc, FALLBACK)
            self.fallback_until = time.monotonic() + FALLBACK
            self._proxy_items(node, items, str(exc), now)
            return
        self.envelopes[frame] = (node, {tag for tag, _ in items})

    def _proxy_items(self, node: str, items: list[tuple[int, bytes]], why: str,
                     now: float) -> None:
        """A node's requests that could not be sent to it: through the proxy, those it
        serves as they are; the others fail, unsent."""
        assert self.router is not None
        for tag, body in items:
            try:
                op = P.parse_request(body, self.limits)[0]
            except ZkvError:
                op = ""
            if op in VIA_PROXY:
                self._to_proxy(body, None, tag, now)
            else:
                self.router.fail_tags([tag], NodeUnavailable(
                    f"node {node} cannot be reached ({why}); nothing was sent"))

    def _to_proxy(self, body: bytes, client: int | None, core_tag: int | None,
                  now: float) -> None:
        tag = _TAG.pack(next(self.proxy._tags))
        try:
            self.proxy._send([tag, body], now + min(self.timeout, CONNECT_WAIT))
        except NotSent as exc:
            if client is not None:
                self._answer_unsent(client, exc)
            elif core_tag is not None and self.router is not None:
                self.router.fail_tags([core_tag], NodeUnavailable(
                    f"neither the node nor the proxy can be reached ({exc}); nothing was sent"))
            return
        self.via_proxy[tag] = (client, core_tag)

    def _answer_unsent(self, client: int, exc: NotSent) -> None:
        base, out = self._round
        i = client - base
        if 0 <= i < len(out) and out[i] is None:
            out[i] = exc
            self._received += 1

    # -- waiting for replies ---------------------------------------------------------------
    def _next_event(self, now: float) -> float:
        """Seconds until the core has something to do by itself (a retry, a deadline)."""
        router = self.router
        if router is None:
            return 1.0
        if router.parked:
            return max(0.001, self._next_refresh - now)
        wait = 1.0
        if router.delayed:
            wait = min(wait, max(0.0, router.delayed[0][0] - now))
        if router.deadlines:
            wait = min(wait, max(0.0, router.deadlines[0][0] - now))
        return wait

    def _wait(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for replies and hand them on; whether any came. A node's
        lost connection fails what was in flight to it at once (its outcome unknown)."""
        poller = zmq.Poller()
        watched: dict[Any, tuple[str, Link]] = {}
        busy = {node for node, _ in self.envelopes.values()}
        for node, link in self.links.items():
            if link.sock is not None and link.monitor is not None and node in busy:
                poller.register(link.sock, zmq.POLLIN)
                poller.register(link.monitor, zmq.POLLIN)
                watched[link.monitor] = (node, link)
        if self.proxy.sock is not None and self.via_proxy:
            poller.register(self.proxy.sock, zmq.POLLIN)
        got = False
        started = time.monotonic()
        if started < self._grace_until:
            seconds = max(seconds, 0.005)  # (no deadline is due yet: no busy loop)
        events = poller.poll(max(0, int(seconds * 1000))) if poller.sockets else []
        if not poller.sockets:
            time.sleep(max(0.0, min(seconds, 0.01)))
        now = time.monotonic()
        if (now - started > seconds + STALL_GAP  # stopped in the wait, or between two
                or started - self._waited > STALL_GAP):
            self._grace_until = now + STALL_GRACE
        for sock, _ in events:
            if sock in watched:
                node, link = watched[sock]
                link._watch(link._events(0))
                if link.lost:
                    self._node_lost(node)
                continue
            while sock.poll(0):
                frames = wire.recv(sock)
                got = True
                if sock is self.proxy.sock:
                    self._proxy_reply(frames)
                else:
                    self._node_reply(frames, now)
        if self.router is not None and now >= self._grace_until:
            self.router.tick(now)
        self._waited = time.monotonic()
        return got

    def _node_lost(self, node: str) -> None:
        assert self.router is not None
        for frame, (addr, tags) in list(self.envelopes.items()):
            if addr == node:
                del self.envelopes[frame]
                self.router.fail_tags(sorted(tags), NodeUnavailable(
                    f"the connection to node {node} was lost with this request in flight; "
                    "the outcome of a write is unknown"))

    def _proxy_reply(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        entry = self.via_proxy.pop(frames[0], None)
        if entry is None:
            return  # a late reply to a round already given up on
        client, core_tag = entry
        self.proxy.answered = True
        if client is not None:
            self._answer(client, frames[1])
        elif core_tag is not None and self.router is not None:
            self.router.reply(core_tag, frames[1], time.monotonic())

    def _node_reply(self, frames: list[bytes], now: float) -> None:
        if len(frames) != 2 or self.router is None:
            return
        frame, body = frames
        entry = self.envelopes.get(frame)
        if entry is None:
            return
        node, waiting = entry
        self.router.envelope_reply(node, body, waiting, now)
        if not waiting:
            del self.envelopes[frame]

    def _lost(self, timeout: float) -> None:
        """A round gave up: fresh sockets for whatever was in flight (Lazy Pirate), and
        what the core still waits for is forgotten."""
        nodes = {node for node, _ in self.envelopes.values()}
        for node in nodes:
            link = self.links.get(node)
            if link is not None:
                link.close()
        if self.via_proxy:
            self.proxy.close()
        self.envelopes.clear()
        self.via_proxy.clear()
        if self.router is not None:
            tags = list(self.router.inflight)
            self.router.fail_tags(tags, Timeout(f"no reply within {timeout:g}s"))
            self.router.parked.clear()
            self.router.delayed.clear()
            self.router.ready()  # what it answers now is for a round that is over

    def close(self) -> None:
        for link in [*self.links.values(), *self.config_links.values()]:
            link.close()
        self.links.clear()
        self.config_links.clear()

    def status(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "nodes": sorted(self.links),
                "via_proxy": time.monotonic() < self.fallback_until,
                "refreshes": self.refreshes}


def _error_code(body: bytes) -> bytes:
    try:
        P.decode_reply(body)
    except ZkvError as exc:
        return exc.code.encode()
    return b""


__all__ = ["DirectRouting"]
