"""Replication as data: what a primary ships and when it may answer, what a replica
accepts, and when the config manager changes a shard. No sockets, no clock, no files.

The model is PacificA's (Lin et al., 2008), as Kafka's in-sync replicas also work:

* A shard is a primary and replicas. The config manager (the proxy with the state
  directory) names them, and which replicas are *in sync*, in the versioned cluster
  configuration (:class:`zkv.core.cluster.ClusterState`).
* The primary logs each turn's records, ships the same bytes to every replica in
  order (:meth:`Primary.ship`), and answers that turn's requests only once every
  in-sync replica has acknowledged them, which a replica does once they are as
  durable as its own fsync policy makes them (:meth:`Primary.committed`).
* A replica that stops acknowledging is reported (:meth:`Primary.report`, in the
  primary's heartbeat answers) and the config manager removes it from the in-sync set
  at a new epoch (:func:`plan`); only then does the primary answer without it.
* The primary holds a lease from its in-sync replicas: each acknowledgement renews it
  from the moment the acknowledged message was sent. With the lease run out it serves
  nothing (:meth:`Primary.lease_ok`). A replica that has heard nothing from its
  primary for ``GRACE`` (longer than ``LEASE``) says so in its heartbeat answers, and
  the config manager promotes only such a replica, and only while the primary is not
  answering it. So two primaries never both answer.
* A planned handover skips the wait: a primary that takes a configuration naming
  another primary stops serving, then tells each replica so (:meth:`Primary.resign`).
  It has kept that configuration first, so it never serves at that epoch again; the
  replica promoted in it, told so by the primary it followed, serves at once
  (:meth:`Replica.serves_from`) instead of waiting out that primary's lease.
* A replica that is not in sync (new, returning, or a deposed primary) gets a *sync
  session*: its first message tells it to drop everything it holds and open a catch-up
  move over the whole hash space; the primary streams it a copy of its keys taken once
  it answers (PUSH/PULL, like a move's batches) while shipping every record since that
  first message. The move's rule (a streamed key is taken only where the replica holds
  no newer state of it) makes copy plus records exactly the primary's data. Once the
  stream is complete the replica says ``synced``; the primary reports it caught up;
  the config manager adds it to the in-sync set.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from .cluster import ClusterState, valid_identity

__all__ = ["BEACON", "GRACE", "LAG", "LEASE", "Primary", "Replica", "plan", "promote"]

LEASE = 1.2  # seconds a primary may serve after the send time of its oldest needed ack
GRACE = 1.8  # a replica silent this long from its primary asks to be promoted
LAG = 0.5  # an in-sync replica with a message unacknowledged this long is reported
BEACON = 0.2  # a replica idle this long gets an empty message (renewing the lease)
RESYNC = 2.0  # a replica out of sync and silent this long gets a new sync session
MAX_UNACKED = 10_000  # messages a replica may owe; past it, the session is broken
MAX_UNACKED_BYTES = 256 << 20  # bytes of records a replica may owe, likewise
SYNC_MOVE = "sync:"  # the catch-up move's id at a replica: SYNC_MOVE + session
FRESH = "no session with this primary since it started"


@dataclass
class Peer:
    """One replica, as its primary sees it."""

    addr: str
    in_sync: bool
    session: str = ""  # "" until a session is started (an in-sync replica of a
    # primary that restarted has none: that primary cannot answer writes)
    next_seq: int = 0
    acked_lsn: int = -1
    unacked: collections.deque[tuple[int, int, float, int]] = field(
        default_factory=collections.deque)  # (seq, lsn, sent at, bytes)
    unacked_bytes: int = 0
    lease_from: float = float("-inf")  # send time of the newest acknowledged message
    last_sent: float = float("-inf")
    started: float = 0.0  # when the session began
    synced: bool = False  # the replica says its copy is complete
    broken: str = ""  # why the session cannot go on ("" while it can)
    copy: list[tuple[bytes, bytes]] | None = None  # the keys to stream (see zkv.replicator)
    deadlines: dict[bytes, int] = field(default_factory=dict)  # theirs, as of the copy
    outcomes: list[Any] = field(default_factory=list)  # zkv.core.once's table, as of the copy
    copying: float = 0.0  # when the copy's stream started (0: not yet)
    copied: float = 0.0  # when it was seen complete (0: not yet)

    def age(self, now: float) -> float:
        """How long the oldest unacknowledged message has waited."""
        return now - self.unacked[0][2] if self.unacked else 0.0


class Primary:
    """A primary's view of its replicas: sequence numbers, acknowledgements, lease."""

    def __init__(self, shard: str, incarnation: str, now: float) -> None:
        self.shard = shard
        self.incarnation = incarnation  # names this run's sessions
        self.peers: dict[str, Peer] = {}
        self.lsn = 0  # turns shipped by this run
        self.sessions = 0
        self.since = now

    def configure(self, replicas: list[str], in_sync: list[str]) -> None:
        """A new configuration: replicas come and go, and in-sync flags change. A
        replica newly in the in-sync set keeps its session (it had to catch up first);
        if that session did not stay whole meanwhile (it broke, or a new one began),
        the replica cannot vouch for what it holds: it is broken, so it is reported and
        leaves the set again."""
        for addr in [a for a in self.peers if a not in replicas]:
            del self.peers[addr]
        for addr in replicas:
            peer = self.peers.get(addr)
            if peer is None:
                peer = self.peers[addr] = Peer(addr, addr in in_sync)
                if peer.in_sync:  # this run never shipped to it: it cannot vouch for it
                    peer.broken = FRESH
            elif addr in in_sync and not peer.in_sync and (peer.broken or not peer.synced):
                peer.broken = peer.broken or "its copy was not complete when it joined"
            peer.in_sync = addr in in_sync

    # -- what to send --------------------------------------------------------------
    def _message(self, peer: Peer, now: float, data: bytes, sync: bool = False
                 ) -> dict[str, Any]:
        seq = peer.next_seq
        peer.next_seq += 1
        peer.unacked.append((seq, self.lsn, now, len(data)))
        peer.unacked_bytes += len(data)
        peer.last_sent = now
        if len(peer.unacked) > MAX_UNACKED or peer.unacked_bytes > MAX_UNACKED_BYTES:
            peer.broken = (f"{len(peer.unacked)} messages ({peer.unacked_bytes} bytes) "
                           "unacknowledged")
        msg: dict[str, Any] = {"shard": self.shard, "session": peer.session, "seq": seq,
                               "data": data}
        if sync:
            msg["sync"] = True
        return msg

    def start_session(self, addr: str, now: float) -> dict[str, Any]:
        """A sync session for replica ``addr`` (out of sync): its first message. The
        caller takes the copy of the keys to stream in the same turn."""
        peer = self.peers[addr]
        self.sessions += 1
        peer.session = f"{self.incarnation}.{self.sessions}"
        peer.next_seq, peer.acked_lsn = 0, -1
        peer.unacked.clear()
        peer.unacked_bytes = 0
        peer.synced, peer.broken, peer.copy = False, "", None
        peer.started, peer.copying, peer.copied = now, 0.0, 0.0
        return self._message(peer, now, b"", sync=True)

    def ship(self, data: bytes, now: float) -> list[tuple[str, dict[str, Any]]]:
        """One committed turn's records, to every replica with a live session."""
        self.lsn += 1
        return [(p.addr, self._message(p, now, data)) for p in self.peers.values()
                if p.session and not p.broken]

    def tick(self, now: float) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
        """Beacons for idle replicas, and the out-of-sync replicas to start a new sync
        session with (never synced, broken, or silent too long)."""
        beacons, restart = [], []
        for p in self.peers.values():
            live = bool(p.session) and not p.broken
            if not p.in_sync and (not p.session or (not live or p.age(now) > RESYNC)
                                  and now - p.started >= RESYNC / 2):
                restart.append(p.addr)
            elif live and now - p.last_sent >= BEACON:
                beacons.append((p.addr, self._message(p, now, b"")))
        return beacons, restart

    def resign(self) -> list[tuple[str, dict[str, Any]]]:
        """The last message of each live session: this primary has stopped serving
        (it took, and kept, a configuration naming another primary), so a replica
        promoted in its place need not wait for its lease to run out."""
        out = []
        for p in self.peers.values():
            if p.session and not p.broken:
                msg = self._message(p, p.last_sent, b"")
                msg["resign"] = True
                out.append((p.addr, msg))
        return out

    # -- what comes back -------------------------------------------------------------
    def ack(self, addr: str, session: Any, seq: Any, synced: bool, now: float) -> bool:
        """A replica holds everything up to message ``seq`` of ``session``. True if
        the committed point may have moved."""
        peer = self.peers.get(addr)
        if peer is None or session != peer.session or peer.broken or type(seq) is not int:
            return False
        moved = False
        while peer.unacked and peer.unacked[0][0] <= seq:
            _, lsn, sent, size = peer.unacked.popleft()
            peer.acked_lsn, peer.lease_from, moved = lsn, sent, True
            peer.unacked_bytes -= size
        peer.synced = peer.synced or synced
        return moved and peer.in_sync

    def refused(self, addr: str, session: Any, reason: str) -> None:
        """A replica refused a message of ``session``: that session is over."""
        peer = self.peers.get(addr)
        if peer is not None and session == peer.session and not peer.broken:
            peer.broken = reason

    # -- what the primary may do -------------------------------------------------------
    def committed(self) -> int:
        """The newest turn every in-sync replica holds (all of them, with none in sync)."""
        low = self.lsn
        for p in self.peers.values():
            if p.in_sync:
                low = min(low, p.acked_lsn if not p.broken else -1)
        return low

    def lease_ok(self, now: float) -> bool:
        return all(now - p.lease_from < LEASE for p in self.peers.values() if p.in_sync)

    def copies(self) -> int:
        """Copies of every acknowledged write: this primary and its in-sync replicas."""
        return 1 + sum(p.in_sync for p in self.peers.values())

    def report(self, now: float) -> dict[str, Any]:
        """For the config manager (in heartbeat answers): in-sync replicas to drop,
        replicas ready to join, and each one's lag in seconds."""
        laggards = [p.addr for p in self.peers.values()
                    if p.in_sync and (p.broken or not p.session or p.age(now) > LAG)]
        caught_up = [p.addr for p in self.peers.values()
                     if not p.in_sync and p.synced and not p.broken and p.age(now) <= LAG]
        # in-sync replicas this run has never shipped to: it restarted, and may have
        # lost the tail of its log (fsync everysec or no): better promote one of them
        fresh = [p.addr for p in self.peers.values() if p.in_sync and p.broken == FRESH]
        return {"role": "primary", "laggards": laggards, "caught_up": caught_up,
                "fresh": fresh,
                "sessions": {p.addr: p.session for p in self.peers.values()},
                "lease": self.lease_ok(now),
                "lag": {p.addr: round(p.age(now), 3) for p in self.peers.values()},
                "state": {p.addr: ("in_sync" if p.in_sync else "synced" if p.synced
                                   else "catching_up" if p.session and not p.broken
                                   else "waiting") for p in self.peers.values()}}


@dataclass
class Replica:
    """What a replica knows of its primary's session with it."""

    session: str = ""
    next_seq: int = 0
    last_heard: float = float("-inf")
    synced: bool = False
    started: float = 0.0  # when this replica began to follow (silence counts from it)
    resigned: str = ""  # the session whose primary said it stopped serving

    def resign(self, msg: dict[str, Any]) -> bool:
        """The primary of this replica's session says it has stopped serving (see
        :meth:`Primary.resign`); False (and nothing changes) for any other session's."""
        session = msg.get("session")
        if not isinstance(session, str) or not session or session != self.session:
            return False
        self.resigned = session
        return True

    def serves_from(self) -> float:
        """When this replica, promoted now, may serve: at once if the primary it
        followed resigned; else once that primary's lease has surely run out (renewed,
        at the latest, by the last message this replica acknowledged)."""
        if self.resigned and self.resigned == self.session:
            return float("-inf")
        return max(self.last_heard, self.started) + LEASE

    def accept(self, msg: dict[str, Any], now: float) -> str:
        """"" if message ``msg`` continues (or, a sync, starts) the session; else why
        it is refused (the primary then starts a new one)."""
        session, seq = msg.get("session"), msg.get("seq")
        if not isinstance(session, str) or type(seq) is not int:
            return "a replication message needs a session and a seq"
        if msg.get("sync") is True:
            if seq != 0:
                return "a sync session starts at seq 0"
            self.session, self.next_seq, self.synced = session, 0, False
        elif not session or session != self.session:  # ("" is none, however one ended)
            return (f"no session {session or '(empty)'} here (this replica follows "
                    f"{self.session or 'none'})")
        if seq != self.next_seq:
            self.session = ""
            return f"message {seq} arrived where {self.next_seq} was due; session ended"
        self.next_seq += 1
        self.last_heard = now
        return ""

    def silent(self, now: float) -> float:
        return now - max(self.last_heard, self.started)

    def report(self, now: float, primary: str) -> dict[str, Any]:
        return {"role": "replica", "primary": primary, "silent": round(self.silent(now), 3),
                "synced": self.synced, "session": self.session}


# -- the config manager's decisions -----------------------------------------------------
def plan(state: ClusterState, name: str, primary_up: bool,
         reports: dict[str, dict[str, Any]]) -> ClusterState | None:
    """The next configuration for shard ``name``, if it needs one, from the latest
    heartbeat reports of its nodes (address -> report, at this epoch) and whether its
    primary answers heartbeats.

    A node counts as the copy the shard holds only while its report names the data
    directory recorded for it (``ids``, zkv.storage's identity): one restarted on an
    empty or another directory is never promoted, and a primary that did so (it then
    serves nothing, zkv.replicator) is replaced by an in-sync replica that answers."""
    shard = state.shards.get(name)
    if shard is None:
        return None
    primary, replicas, in_sync = shard["primary"], shard["replicas"], shard["in_sync"]
    ids: dict[str, str] = shard.get("ids", {})

    def same(addr: str) -> bool:  # (its directory is the one recorded, or none is)
        return addr not in ids or reports.get(addr, {}).get("data_id") == ids[addr]

    def follows(addr: str) -> bool:  # an in-sync replica answering as this shard's
        report = reports.get(addr, {})
        return (report.get("role") == "replica" and report.get("primary") == primary
                and same(addr))

    mine = reports.get(primary) if primary_up else None
    if mine is not None and (mine.get("role") == "lost" or not same(primary)):
        # it answers from a directory that is not the shard's copy (wiped, replaced):
        # it serves nothing; an in-sync replica that answers takes over, or none does
        answering = [a for a in in_sync if follows(a)]
        return promote(state, name, answering[0]) if answering else None
    if mine is not None and mine.get("role") == "primary":
        if set(_names(mine, "fresh")) & set(in_sync):
            # it restarted: an in-sync replica that answers holds every acknowledged
            # write (this run's log may have lost its tail), and the old run's lease
            # died with it: promote that replica rather than keep this primary
            answering = [a for a in in_sync if follows(a)]
            if answering:
                return promote(state, name, answering[0])
        laggards = [a for a in in_sync if a in _names(mine, "laggards")
                    or a in reports and not same(a)]  # (restarted on another directory)
        if laggards:
            return state.with_shard(name, primary, replicas,
                                    [a for a in in_sync if a not in laggards])
        sessions = mine.get("sessions")
        joining = [a for a in _names(mine, "caught_up") if a in replicas and a not in in_sync
                   and reports.get(a, {}).get("role") == "replica"
                   and (not isinstance(sessions, dict)  # (the copy it made is the one
                        or reports[a].get("session") == sessions.get(a))]  # it holds)
        if joining:
            return state.with_shard(name, primary, replicas, [*in_sync, *joining],
                                    _identities(reports, joining))
        unknown = _identities(reports, [a for a in (primary, *in_sync) if a not in ids])
        if unknown:  # (a shard new, or from before ids: its copies as they are now)
            return state.with_shard(name, primary, replicas, in_sync, unknown)
        return None
    if primary_up:
        return None  # it answers, but not yet as this epoch's primary: wait for it
    claims = [a for a in in_sync if follows(a)
              and isinstance(reports[a].get("silent"), (int, float))
              and reports[a]["silent"] >= GRACE]
    if not claims:
        return None
    return promote(state, name, claims[0])


def _identities(reports: dict[str, dict[str, Any]], addrs: list[str]) -> dict[str, str]:
    """The data directory ids that the reports of ``addrs`` name."""
    found = {a: reports.get(a, {}).get("data_id") for a in addrs}
    return {a: str(i) for a, i in found.items() if valid_identity(i)}


def _names(report: dict[str, Any], field_: str) -> list[str]:
    """A list of addresses in a node's report (anything else counts as none)."""
    value = report.get(field_)
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


def promote(state: ClusterState, name: str, new: str,
            identity: str | None = None) -> ClusterState:
    """Shard ``name`` with ``new`` (an in-sync replica) as its primary. Every other node
    (the old primary included) leaves the in-sync set, to sync again from ``new``.
    ``identity``: ``new``'s data directory id, recorded as the shard's copy from now on
    (a forced failover to a node that was not in sync, or to the primary itself)."""
    shard = state.shards[name]
    rest = [a for a in (shard["primary"], *shard["replicas"]) if a != new]
    return state.with_shard(name, new, rest, [], {new: identity} if identity else None)
