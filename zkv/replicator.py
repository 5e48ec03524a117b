"""A storage node's replication shell: the sockets around zkv.core.replication's core.

On a primary it ships each committed turn's records to the replicas (one DEALER per
replica, to the replica's ROUTER, as XREPL requests), holds that turn's replies until
every in-sync replica has acknowledged them, streams a copy of the keys to a replica
that syncs (PUSH/PULL, as a move's batches), and refuses to serve once its lease is
gone. On a replica it applies what its primary ships (XREPL), logging the same records,
and refuses client requests: a shard's reads and writes go to its primary.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import frames as wire
from .core import protocol as P
from .core import wal
from .core.cluster import ClusterState
from .core.keyspace import FILL, Keyspace
from .core.protocol import INTERNAL
from .core.replication import SYNC_MOVE, Primary, Replica
from .core.ring import RangeSet
from .core.transfer import SnapshotStream
from .errors import (
    InternalError,
    ProtocolError,
    StaleEpoch,
    StorageError,
    Unavailable,
    ZkvError,
)
from .guard import ROUTER_ID_PREFIX
from .security import require

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("zkv.replication")

# What a replica refuses and a primary without a lease serves not: the data ops.
READ_OPS = (P.SINGLE_KEY_OPS - P.WRITE_OPS) | {"MGET", "SCAN", "KEYS", "XGET", "XPEEK",
                                               "XSEEN", "DBSIZE"}
WRITE_OPS = P.WRITE_OPS | {"PIPE", "XDEL", "XFLUSH", "XFILL", "ONCE"}
# Replies a primary sends at once: they carry nothing its replicas must hold first, and
# the config manager's heartbeats and configurations must never wait on a replica.
FREE_OPS = frozenset({"PING", "INFO", "XHEALTH", "XCONFIG", "CONFIG", "XREPL"})
SHIP_BYTES = 16 << 20  # records in one XREPL message, at most (cut at record boundaries)
DROP_RUN = 10_000  # keys in one log record when a syncing replica drops what it held
LINK_HWM = 20_000
RESIGN_LINGER = 500  # ms a demoted primary's links may take to send its resignation
XREPL_HEAD = P.encode_request("XREPL", {})[:7]  # how every XREPL request body begins
COPY_SETTLE = 10.0  # seconds after its copy was sent by which a replica says it is synced


def split_records(data: bytes, limit: int = SHIP_BYTES) -> list[bytes]:
    """``data`` (whole framed log records) in pieces of at most ``limit`` bytes, cut at
    record boundaries (a record larger than ``limit`` is a piece of its own)."""
    if len(data) <= limit:
        return [data]
    pieces, start, off = [], 0, 0
    while off < len(data):
        length, _ = wal.HEADER.unpack_from(data, off)
        end = off + wal.HEADER_SIZE + length
        if end - start > limit and off > start:
            pieces.append(data[start:off])
            start = off
        off = end
    pieces.append(data[start:])
    return pieces


class Replicator:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.address = node.address  # as the config manager names this node
        self.shard: str | None = None
        self.primary: Primary | None = None
        self.replica: Replica | None = None
        self.min_in_sync = 1
        self.links: dict[str, zmq.Socket[bytes]] = {}  # replica address -> DEALER
        self.by_socket: dict[zmq.Socket[bytes], str] = {}
        self.parked: collections.deque[tuple[int, list[list[bytes]]]] = collections.deque()
        self.poller: zmq.Poller | None = None
        self.gated = False  # data requests are checked (a replicated shard)
        self.serve_after = 0.0  # a new primary serves from then (monotonic)
        self.followed = ""  # the session it followed as a replica before it was promoted
        self.following = ""  # the primary it follows, as a replica
        self.dropped: set[bytes] = set()  # keys dropped while a sync's copy streams in
        self.demoted = 0  # replies failed because this node stopped being primary
        # why this node, named a shard's primary, serves nothing: its data directory is
        # not the one the shard recorded for it (wiped, or another); "" when it is
        self.lost = ""

    # -- the configuration --------------------------------------------------------------
    def configure(self, state: ClusterState, name: str, address: str | None) -> None:
        """This node's role in the configuration just taken (or loaded)."""
        now = time.monotonic()
        if address:
            self.address = address
        shard = state.shards.get(name)
        self.shard, self.min_in_sync = name, state.min_in_sync
        lost = self._lost(state, name) if shard is not None else ""
        if lost != self.lost:
            if lost:
                log.error("%s", lost)
            self.lost = lost
        if lost:
            self.replica = None
            self._stop_primary("its data directory is not the shard's copy")
        elif shard is not None and shard["primary"] == self.address:
            if self.primary is None:
                log.info("node %s is the primary of shard %s", self.address, name)
                # (sessions are named by this run and this reign: a node that is primary
                # again later must not reuse an earlier reign's session names)
                self.primary = Primary(name, f"{self.node.incarnation}e{state.epoch}", now)
                if self.replica is not None:
                    # promoted: the old primary may hold a lease renewed by this node's
                    # last acknowledgement; serve only once it has surely run out, or
                    # at once if it said it stopped (a planned handover)
                    self.serve_after = self.replica.serves_from()
                    self.followed = self.replica.session
            self.replica = None
            self.primary.configure(shard["replicas"], shard["in_sync"])
            for addr in [a for a in self.links if a not in shard["replicas"]]:
                self._close(addr)
        elif shard is not None and self.address in shard["replicas"]:
            if self.replica is None:
                log.info("node %s is a replica of shard %s (primary %s)", self.address, name,
                         shard["primary"])
                self.replica = Replica(started=now)
            elif self.following != shard["primary"]:
                self.replica.resigned = ""  # (a word from the primary it followed before)
            self.following = shard["primary"]
            self._stop_primary("it is now a replica")
        else:
            self.replica = None
            self._stop_primary("it is no longer in a replicated shard")
        self.gated = shard is not None
        self.release()

    def _lost(self, state: ClusterState, name: str) -> str:
        """Why this node must not serve as shard ``name``'s primary ("" if it may): the
        configuration records another data directory as that copy. Serving from this
        one would answer from an empty or different copy, and its replicas would sync
        from it, throwing away the copy they hold."""
        expected = state.identity(name, self.address)
        mine = self.node.storage.identity
        if state.primary(name) != self.address or not expected or expected == mine:
            return ""
        return (f"node {self.address} is the primary of shard {name}, but its data directory "
                f"{self.node.storage.dir} (id {mine}) is not the copy the shard holds there "
                f"(id {expected}): it was wiped or replaced, or the node was started with "
                "another --data-dir. It serves nothing. Restart it on the right directory; or an "
                "in-sync replica that answers takes over; or, if that copy is gone, `FAILOVER "
                f"{name} ADDR --force` makes the copy at ADDR (this node's included) the "
                "shard's, losing what it lacks")

    def _stop_primary(self, why: str) -> None:
        if self.primary is None:
            return
        # the configuration saying so is kept (zkv.node), so this node never serves
        # at this epoch again: tell the replicas, so that the one promoted need not
        # wait out this node's lease (sent on, for a moment, after the links close)
        for addr, msg in self.primary.resign():
            self._send(addr, msg)
        self.primary = None
        for addr in list(self.links):
            self._close(addr, linger=RESIGN_LINGER)
        self._stop_streams()
        error = P.encode_exc(Unavailable(
            f"node {self.address} stopped being the primary of shard {self.shard} ({why}) "
            "before its replicas confirmed this; the outcome of a write is unknown"))
        while self.parked:
            _, replies = self.parked.popleft()
            for reply in replies:
                self.demoted += 1
                self.node.out_send(self.node.failed_reply(reply, error))

    def _stop_streams(self) -> None:
        """A node that is not its shard's primary (any more) streams nothing: a move's
        stream from it would end early, and its final batch say it was complete."""
        for key in list(self.node.outgoing):
            self.node.close_stream(key)

    # -- the gate on data requests --------------------------------------------------------
    def gate(self, op: str) -> None:
        """Raise if this node may not serve ``op`` now (only called when gated)."""
        if self.lost and op not in FREE_OPS:  # (a move's steps too: it holds nothing)
            raise Unavailable(self.lost)
        if op not in READ_OPS and op not in WRITE_OPS:
            return
        if self.replica is not None:
            raise Unavailable(f"node {self.address} is a replica of shard {self.shard}; its "
                              "reads and writes go to the shard's primary")
        primary = self.primary
        if primary is None:
            raise Unavailable(f"node {self.address} is not serving shard {self.shard}")
        now = time.monotonic()
        if now < self.serve_after:
            raise Unavailable(
                f"node {self.address} is the new primary of shard {self.shard}; it serves "
                f"in {self.serve_after - now:.1f} s, once the old primary's lease has "
                "surely run out")
        if not primary.lease_ok(now):
            raise Unavailable(
                f"the primary of shard {self.shard} ({self.address}) has no lease from its "
                "in-sync replicas (one is not answering); it serves again once they answer "
                "or the config manager reconfigures the shard")
        if op in WRITE_OPS and primary.copies() < self.min_in_sync:
            raise Unavailable(
                f"shard {self.shard} has {primary.copies()} copies in sync, fewer than "
                f"min_in_sync ({self.min_in_sync}); writes are refused until a replica "
                "catches up")

    def catching_up(self) -> bool:
        """Whether a replica of this primary is not in sync (it may be copying the keys,
        and lack the one a record changes)."""
        primary = self.primary
        return primary is not None and any(not p.in_sync for p in primary.peers.values())

    # -- a primary's shipping ----------------------------------------------------------------
    def shipped(self, data: bytes) -> None:
        """The records of a turn are committed here: ship them."""
        primary = self.primary
        if primary is None or not data or not primary.peers:
            return
        now = time.monotonic()
        for piece in split_records(data):
            for addr, msg in primary.ship(piece, now):
                self._send(addr, msg)

    def hold(self, replies: list[list[bytes]]) -> list[list[bytes]]:
        """A turn's replies: the ones to send now; the rest wait for the replicas."""
        primary = self.primary
        if primary is None or not replies:
            return replies
        if primary.committed() >= primary.lsn and not self.parked:
            return replies
        self.parked.append((primary.lsn, replies))
        return []

    def release(self) -> None:
        primary = self.primary
        if primary is None:
            return
        if self.parked and primary.copies() < self.min_in_sync:
            # the in-sync set shrank below min_in_sync under these: they are held by
            # too few copies to be acknowledged, and are applied here all the same
            error = P.encode_exc(Unavailable(
                f"shard {self.shard} has {primary.copies()} copies in sync, fewer than "
                f"min_in_sync ({self.min_in_sync}); this write was applied on too few "
                "copies to be acknowledged: its outcome is unknown"))
            while self.parked:
                for reply in self.parked.popleft()[1]:
                    self.node.out_send(self.node.failed_reply(reply, error))
            return
        done = primary.committed()
        while self.parked and self.parked[0][0] <= done:
            for reply in self.parked.popleft()[1]:
                self.node.out_send(reply)

    def _send(self, addr: str, msg: dict[str, Any]) -> None:
        sock = self.links.get(addr)
        if sock is None:
            sock = self._open(addr)
        msg["epoch"] = self.node.epoch
        msg["from"] = self.address
        try:
            wire.send(sock, [msg["session"].encode(), P.encode_request("XREPL", msg)],
                      wire.NOBLOCK)
        except zmq.ZMQError:
            assert self.primary is not None
            self.primary.refused(addr, msg["session"], "its link would not take more")

    def _open(self, addr: str) -> zmq.Socket[bytes]:
        assert self.node.ctx is not None
        sock: zmq.Socket[bytes] = self.node.ctx.socket(zmq.DEALER)
        if self.node.curve is not None:
            self.node.curve.connect(sock)
        # (a fresh random part per link, never shown anywhere: a peer that took the id
        # first would shut this link out of the replica's ROUTER)
        sock.setsockopt(zmq.ROUTING_ID, ROUTER_ID_PREFIX + b"repl/" + self.address.encode()
                        + b"/" + os.urandom(8).hex().encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.SNDHWM, LINK_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.node.limits.max_message_bytes + 4096)
        sock.connect(f"tcp://{addr}")
        self.links[addr] = sock
        self.by_socket[sock] = addr
        if self.poller is not None:
            self.poller.register(sock, zmq.POLLIN)
        return sock

    def _close(self, addr: str, linger: int = 0) -> None:
        sock = self.links.pop(addr, None)
        if sock is None:
            return
        del self.by_socket[sock]
        if self.poller is not None:
            self.poller.unregister(sock)
        sock.close(linger)
        self.node.close_stream((SYNC_MOVE, addr))

    def answered(self, sock: zmq.Socket[bytes]) -> None:
        """Replies from a replica: acknowledgements (or refusals)."""
        addr = self.by_socket.get(sock)
        moved = False
        now = time.monotonic()
        while wire.waiting(sock):
            frames = wire.recv(sock)
            if addr is None or self.primary is None or len(frames) != 2:
                continue
            session = frames[0].decode(errors="replace")
            try:
                result = P.decode_reply(frames[1])
            except ZkvError as exc:
                log.warning("replica %s refused a message: %s", addr, exc)
                self.primary.refused(addr, session, str(exc))
                continue
            if not isinstance(result, dict):
                continue
            moved |= self.primary.ack(addr, session, result.get("seq"),
                                      result.get("synced") is True, now)
            if "pull_port" in result:
                self._start_copy(addr, session, result["pull_port"])
        if moved:
            self.release()

    def _start_copy(self, addr: str, session: str, pull_port: Any) -> None:
        assert self.primary is not None
        peer = self.primary.peers.get(addr)
        if peer is None or peer.session != session or peer.synced or peer.broken \
                or type(pull_port) is not int or (SYNC_MOVE, addr) in self.node.outgoing:
            return
        # The copy is taken now, when the replica has answered the session's first
        # message, not when that was sent: any moment after it will do, because the
        # replica applies every record shipped since then, and a streamed key is taken
        # only where it holds no newer state (so a dead replica costs no copies).
        peer.copy = list(self.node.storage.keyspace.data.items())
        peer.deadlines = dict(self.node.storage.keyspace.expires)
        peer.outcomes = self.node.storage.keyspace.once.flat()
        host = addr.rsplit(":", 1)[0]
        try:
            self.node.open_stream((SYNC_MOVE, addr), f"tcp://{host}:{pull_port}")
        except ZkvError as exc:
            self.primary.refused(addr, session, f"no stream to it: {exc}")
            return
        self.node.outgoing[(SYNC_MOVE, addr)] = SnapshotStream(
            SYNC_MOVE + session, self.shard or self.address, peer.copy, peer.deadlines,
            peer.outcomes, last_progress=time.monotonic(), dest=addr,
            move_id=SYNC_MOVE + session)
        peer.deadlines, peer.outcomes = {}, []
        log.info("shard %s: copying %d keys to replica %s", self.shard, len(peer.copy), addr)
        peer.copy = None
        peer.copying = time.monotonic()

    def tick(self, now: float) -> None:
        primary = self.primary
        if primary is None:
            return
        self._stalled(now)
        beacons, restart = primary.tick(now)
        for addr, msg in beacons:
            self._send(addr, msg)
        for addr in restart:
            self._close(addr)  # what is queued for its old session goes too
            msg = primary.start_session(addr, now)
            ks = self.node.storage.keyspace
            # the moves open here, and their tombstones, go with the copy: a replica
            # promoted mid-move must know them as this node does
            if ks.incoming:
                msg["moves"] = ks.snapshot_meta()
                msg["tombs"] = list(ks.tombstones)
            log.info("shard %s: replica %s syncs (session %s)", self.shard, addr,
                     msg["session"])
            self._send(addr, msg)

    def _stalled(self, now: float) -> None:
        """A sync whose copy stream is gone (closed for want of a reader) or finished
        long ago without the replica saying it is complete (a batch lost with a
        connection) will never finish: its session ends, and the next one starts over."""
        assert self.primary is not None
        for peer in self.primary.peers.values():
            if peer.in_sync or peer.synced or peer.broken or not peer.copying:
                continue
            out = self.node.outgoing.get((SYNC_MOVE, peer.addr))
            if out is not None and out.done and not peer.copied:
                peer.copied = now
            if out is None or peer.copied and now - peer.copied > COPY_SETTLE:
                log.warning("shard %s: the copy to replica %s did not complete; syncing it "
                            "again", self.shard, peer.addr)
                self.primary.refused(peer.addr, peer.session, "its copy did not complete")

    # -- a replica's side --------------------------------------------------------------------
    def xrepl(self, a: list[Any]) -> Any:
        """Records (or, to start a session, a sync) from this shard's primary."""
        msg = a[0] if a else None
        if not isinstance(msg, dict) or not isinstance(msg.get("data"), bytes) \
                or type(msg.get("epoch")) is not int:
            raise ProtocolError("XREPL takes a map with epoch, session, seq and data")
        node = self.node
        # An older epoch is fine from the node that is still this shard's primary at this
        # node's epoch (a new configuration may reach a replica before its primary); from
        # any other node it is a deposed primary's, and refused.
        current = node.placement.state.primary(self.shard or "") if node.placement else None
        if msg["epoch"] < node.epoch and msg.get("from") != current:
            raise StaleEpoch(f"node {self.address} is at epoch {node.epoch}, where "
                             f"{msg.get('from')!r} is not the primary of shard {self.shard}",
                             {"epoch": node.epoch})
        if msg.get("resign") is True:
            return self._resigned(msg)
        replica = self.replica
        if replica is None:
            raise Unavailable(f"node {self.address} is not a replica (epoch {node.epoch})")
        if msg.get("sync") is True and msg["epoch"] == node.epoch and node.placement \
                and msg.get("from") != node.placement.state.primary(self.shard or ""):
            raise Unavailable(f"{msg.get('from')!r} is not the primary of shard {self.shard} "
                              f"at epoch {node.epoch}")
        why = replica.accept(msg, time.monotonic())
        if why:
            raise Unavailable(why)
        items = self._records(replica, msg["data"])
        reply: dict[str, Any] = {"seq": msg["seq"]}
        ks = node.storage.keyspace
        if msg.get("sync") is True:
            moves, tombs = msg.get("moves"), msg.get("tombs")
            meta = None
            if isinstance(moves, dict) and isinstance(moves.get("incoming"), dict):
                meta = (wal.META, {"incoming": moves["incoming"],
                                   "modes": moves.get("modes", {})})
                try:  # checked before anything here is dropped
                    Keyspace().apply(meta)
                except (TypeError, ValueError, KeyError, AttributeError) as exc:
                    replica.session = ""
                    raise ProtocolError(f"XREPL moves: {exc}") from None
            self._drop_all()
            self.dropped.clear()
            if meta is not None:
                ks.apply(meta)
                node.log_record(wal.encode(meta))
                if isinstance(tombs, list) and all(type(k) is bytes for k in tombs) and tombs:
                    ks.apply((wal.TOMBS, tombs))
                    node.log_record(wal.encode((wal.TOMBS, tombs)))
            node.log_record(ks.open_move(SYNC_MOVE + msg["session"], RangeSet.full(), FILL))
            reply["pull_port"] = node.pull_port
        self._apply(replica, items, msg["data"])
        reply["synced"] = replica.synced
        if not replica.synced:
            reply["pull_port"] = node.pull_port  # (until the copy is in: a reply can be lost)
        return reply

    def _resigned(self, msg: dict[str, Any]) -> Any:
        """The primary this node followed says it has stopped serving: promoted (now,
        or when the configuration arrives), this node serves at once."""
        session = msg.get("session")
        if self.replica is not None:
            if self.replica.resign(msg):
                log.info("replica %s: primary %s of shard %s stepped down", self.address,
                         msg.get("from"), self.shard)
        elif self.primary is not None and self.followed and session == self.followed:
            if self.serve_after > time.monotonic():
                log.info("shard %s: %s stepped down; node %s serves now", self.shard,
                         msg.get("from"), self.address)
            self.serve_after = 0.0
        return {"seq": msg.get("seq")}

    def steady(self, body: bytes) -> bytes | None:
        """The reply to an XREPL request by a short path, or None. A synced replica's
        whole load is its primary's records, and a request's general path (a replica's
        turn) costs as much again as applying them. This takes only the common case (the
        next message of this replica's session, from its primary, at this node's epoch,
        small enough to decode at once) and leaves anything else, before changing
        anything, to the general path, which answers it as it always has."""
        began = time.perf_counter()
        replica, node = self.replica, self.node
        if replica is None or not replica.synced or not replica.session \
                or len(body) > node.limits.max_items:
            return None
        try:
            item = P.decode_request(body, node.limits)
            if node.curve is not None:
                require(node.peer_role, "XREPL", INTERNAL, f"node {self.address}")
        except ZkvError:
            return None
        msg = item[1] if type(item) is list and len(item) == 2 else None
        if type(msg) is not dict or "sync" in msg or "resign" in msg \
                or type(msg.get("data")) is not bytes \
                or type(msg.get("epoch")) is not int or msg["epoch"] != node.epoch \
                or msg.get("session") != replica.session \
                or type(msg.get("seq")) is not int or msg["seq"] != replica.next_seq:
            return None
        timed = node.clock_start()
        replica.accept(msg, time.monotonic())  # (continues the session: checked above)
        node.counters["XREPL"] = node.counters.get("XREPL", 0) + 1
        mark = node.storage.mark()
        try:
            self._apply(replica, self._records(replica, msg["data"]), msg["data"])
        except Exception as exc:  # as Node.run_body: an error reply, nothing of it kept
            node.storage.rollback_to(mark)
            if not isinstance(exc, ZkvError):  # (a bug must not take the node down)
                log.exception("internal error")
                exc = InternalError(f"{type(exc).__name__}: {exc}")
            node._count_error("XREPL", exc.code)
            return P.encode_exc(exc)
        if timed:
            node.timings.observe("XREPL", time.perf_counter() - began)
        return P.encode_ok({"seq": msg["seq"], "synced": True})

    def _apply(self, replica: Replica, items: list[Any], data: bytes) -> None:
        """Apply and log a message's records (``items``, decoded from ``data``)."""
        node = self.node
        ks = node.storage.keyspace
        try:
            for item in items:
                ks.apply_live(item)
                if item[0] == wal.DROP and not replica.synced:
                    # a key dropped here (FLUSHALL, a move's cleanup) leaves no tombstone:
                    # the copy still streaming in must not bring it back
                    self.dropped.update(k for k in item[1] if type(k) is bytes)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            replica.session = ""
            raise ProtocolError(f"XREPL data: a record of the wrong shape ({exc})") from None
        node.storage.pending += data

    def sync_batch(self, move_id: str, source: str, pairs: list[Any]) -> list[Any] | None:
        """A batch of a sync's copy, without the keys dropped since the sync began; None
        if it is not this replica's current sync's (from its shard)."""
        replica = self.replica
        if replica is None or move_id != SYNC_MOVE + replica.session or source != self.shard:
            return None
        if not self.dropped:
            return pairs
        return [x for i in range(0, len(pairs) - 1, 2) if pairs[i] not in self.dropped
                for x in (pairs[i], pairs[i + 1])]

    @staticmethod
    def _records(replica: Replica, data: bytes) -> list[Any]:
        """The records of a message; if it is damaged, its session ends (the primary
        then starts a new one)."""
        scan = wal.LogScan(data)
        items = [item for _, item in scan]
        if scan.damage is not None:
            replica.session = ""
            raise ProtocolError(f"XREPL data: {scan.damage.kind} at offset "
                                f"{scan.damage.offset}")
        return items

    def _drop_all(self) -> None:
        """A sync starts: whatever this node held is stale (it may hold writes its old
        primary never had acknowledged, or be a deposed primary itself)."""
        node = self.node
        ks = node.storage.keyspace
        for move_id in list(ks.incoming):
            node.log_record(ks.close_move(move_id))
        node.incoming.clear()
        keys = list(ks.data)
        for start in range(0, len(keys), DROP_RUN):
            node.log_record(ks.forget(keys[start:start + DROP_RUN]))
        node.log_record(ks.forget_outcomes())  # the primary's come with the copy

    def streams_done(self) -> None:
        """After batches were applied: a sync whose copy is complete ends its move."""
        replica = self.replica
        if replica is None or replica.synced or not replica.session:
            return
        move_id = SYNC_MOVE + replica.session
        node = self.node
        if any(k[0] == move_id and st.broken for k, st in node.incoming.items()):
            log.warning("replica %s: the copy of shard %s broke off; asking for a new sync",
                        self.address, self.shard)
            replica.session = ""  # the primary's next message is refused: it syncs again
            return
        done = [k for k, st in node.incoming.items() if k[0] == move_id and st.done]
        if done:
            node.log_record(node.storage.keyspace.close_move(move_id))
            try:
                node.storage.commit(durable=True)
            except StorageError as exc:
                log.error("%s", exc)
                return
            for key in done:
                del node.incoming[key]
            replica.synced = True
            self.dropped.clear()
            log.info("replica %s: copy of shard %s complete", self.address, self.shard)

    # -- reporting ------------------------------------------------------------------------------
    def report(self) -> dict[str, Any] | None:
        now = time.monotonic()
        mine = {"shard": self.shard, "data_id": self.node.storage.identity}
        if self.lost:
            return {"role": "lost", "why": self.lost, **mine}
        if self.primary is not None:
            return {**self.primary.report(now), **mine,
                    "waiting_replies": sum(len(r) for _, r in self.parked)}
        if self.replica is not None:
            assert self.shard is not None
            state = self.node.placement.state if self.node.placement else None
            primary = state.primary(self.shard) if state is not None else ""
            return {**self.replica.report(now, primary), **mine}
        return None

    def close(self) -> None:
        for addr in list(self.links):
            self._close(addr)
