"""The proxy's view of the cluster, as data: membership, epoch, node health. No I/O.

:class:`ClusterState` is what the proxy persists in its state directory (as
JSON, written atomically by the proxy before a change takes effect).
:class:`Health` turns heartbeat replies and clock ticks, both passed in, into
each node's up/down state (the Paranoid Pirate pattern of the ZeroMQ Guide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ClusterError
from .ring import Ring

STATE_VERSION = 1


# A link key names what a router's socket reaches: a shard's name (its primary,
# wherever that is now), or NODE_KEY + an address (that one node: a replica).
NODE_KEY = "@"


@dataclass(frozen=True)
class ClusterState:
    epoch: int
    members: dict[str, float]  # shard name (the address it was created with) -> weight
    vnodes: int
    move: dict[str, Any] | None = None  # an unfinished move, see zkv.rebalance
    # Replicated shards (zkv.core.replication): name -> {"primary": address, "replicas":
    # [addresses], "in_sync": [the replicas holding every acknowledged write], and
    # "ids": {address: the identity of its data directory (zkv.storage)}, for the
    # primary and in-sync replicas whose identity is known; absent when none is}. A shard
    # not listed is one node, at the address that is its name.
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    min_in_sync: int = 1  # copies (primary included) a shard needs to take writes
    # Which cluster this is: made once by its config manager, kept by every node, so
    # that a node refuses the configuration of another cluster (a second proxy with a
    # state directory of its own) rather than mixing two. "" in a state from before
    # cluster ids (taken by the first manager that has one).
    cluster: str = ""

    def addresses(self) -> set[str]:
        """The address of every node this configuration names (shards' primaries and
        replicas, and every other member or moving node)."""
        return {a for name in self.involved() for a in self.nodes_of(name)}

    def ring(self) -> Ring:
        return Ring(self.members, self.vnodes)

    def involved(self) -> set[str]:
        """Every shard this configuration names: the ring's members and a move's."""
        move = self.move
        return set(self.members) | (set(move["old"]) | set(move["new"]) if move else set())

    def primary(self, name: str) -> str:
        """The address of shard ``name``'s primary."""
        shard = self.shards.get(name)
        return name if shard is None else str(shard["primary"])

    def describe(self, name: str) -> str:
        """How errors name shard ``name``: "node ADDR", or for a replicated shard
        "shard NAME (primary ADDR)"."""
        if name.startswith(NODE_KEY):  # (a link key: one other node of a shard)
            return f"node {name[len(NODE_KEY):]}"
        shard = self.shards.get(name)
        return f"node {name}" if shard is None else f"shard {name} (primary {shard['primary']})"

    def nodes_of(self, name: str) -> list[str]:
        """Every node of shard ``name``: its primary first, then its replicas."""
        shard = self.shards.get(name)
        return [name] if shard is None else [shard["primary"], *shard["replicas"]]

    def shard_of(self, address: str) -> str | None:
        """The shard the node at ``address`` belongs to, if any."""
        for name, shard in self.shards.items():
            if address == shard["primary"] or address in shard["replicas"]:
                return name
        return address if address in self.involved() else None

    def short_shards(self) -> list[tuple[str, int]]:
        """(member, copies) of each shard with fewer copies (its primary and replicas)
        than min_in_sync: it could never take a write."""
        if self.min_in_sync <= 1:
            return []
        out = []
        for name in sorted(self.members):
            shard = self.shards.get(name)
            copies = 1 + len(shard["replicas"]) if shard is not None else 1
            if copies < self.min_in_sync:
                out.append((name, copies))
        return out

    def link_keys(self) -> dict[str, str]:
        """What a router connects to: each shard (at its primary's address) and each
        other node of a replicated shard (``NODE_KEY + address``) -> the address."""
        keys = {name: self.primary(name) for name in self.involved()}
        for name in self.involved():
            for address in self.nodes_of(name)[1:]:
                keys[NODE_KEY + address] = address
        return keys

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "vnodes": self.vnodes,
            "members": dict(sorted(self.members.items())),
            "move": self.move,
        }
        if self.shards:
            doc["shards"] = {k: dict(v) for k, v in sorted(self.shards.items())}
        if self.min_in_sync != 1:
            doc["min_in_sync"] = self.min_in_sync
        if self.cluster:
            doc["cluster"] = self.cluster
        return doc

    @classmethod
    def from_json(cls, data: Any, source: str) -> ClusterState:
        def bad(what: str) -> ClusterError:
            return ClusterError(f"{source}: {what}; the proxy's state file is damaged")

        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise bad(f"not a zkv proxy state (version {STATE_VERSION})")
        epoch, vnodes, members = data.get("epoch"), data.get("vnodes"), data.get("members")
        if not isinstance(epoch, int) or epoch < 0:
            raise bad("epoch must be a non-negative integer")
        if not isinstance(vnodes, int) or vnodes < 1:
            raise bad("vnodes must be a positive integer")
        if not isinstance(members, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and v > 0
            for k, v in members.items()
        ):
            raise bad("members must map HOST:PORT to a positive weight")
        move = data.get("move")
        if move is not None and not isinstance(move, dict):
            raise bad("move must be an object or null")
        shards = data.get("shards", {})
        if not isinstance(shards, dict):
            raise bad("shards must be an object")
        for name, shard in shards.items():
            if not (isinstance(name, str) and isinstance(shard, dict)
                    and isinstance(shard.get("primary"), str)
                    and _addresses(shard.get("replicas"))
                    and _addresses(shard.get("in_sync"))
                    and set(shard["in_sync"]) <= set(shard["replicas"])
                    and shard["primary"] not in shard["replicas"]):
                raise bad(f"shards[{name!r}] must have a primary, replicas and in_sync "
                          "(a subset of the replicas)")
            ids = shard.get("ids", {})
            if not (isinstance(ids, dict) and all(
                    a in (shard["primary"], *shard["in_sync"]) and valid_identity(i)
                    for a, i in ids.items())):
                raise bad(f"shards[{name!r}].ids must map the primary and in-sync replicas "
                          "to data directory ids")
        min_in_sync = data.get("min_in_sync", 1)
        if type(min_in_sync) is not int or min_in_sync < 1:
            raise bad("min_in_sync must be a positive integer")
        cluster = data.get("cluster", "")
        if not isinstance(cluster, str) or len(cluster) > 64:
            raise bad("cluster must be a string (the cluster's id)")
        return cls(epoch, {k: float(v) for k, v in members.items()}, vnodes, move,
                   {str(k): _shard(v["primary"], v["replicas"], v["in_sync"], v.get("ids"))
                    for k, v in shards.items()},
                   min_in_sync, cluster)

    # Every change is a new epoch: nodes order configurations by it alone, and a
    # request carries it, so no two different configurations ever share one.
    def with_members(self, members: dict[str, float]) -> ClusterState:
        return replace(self, epoch=self.epoch + 1, members=dict(members))._pruned()

    def _pruned(self) -> ClusterState:
        """Without the shards that left (a REMOVE that finished): no node of theirs is
        routed to or configured any more."""
        involved = self.involved()
        if all(name in involved for name in self.shards):
            return self
        return replace(self, shards={k: v for k, v in self.shards.items() if k in involved})

    def with_shard(self, name: str, primary: str, replicas: list[str],
                   in_sync: list[str], ids: dict[str, str] | None = None) -> ClusterState:
        """Shard ``name`` reconfigured (a failover, or its in-sync set changed): one
        epoch on. The data directory ids it had are kept, with ``ids`` over them, for
        the nodes still counted on (the primary and in-sync replicas)."""
        shards = dict(self.shards)
        known = {**self.shards.get(name, {}).get("ids", {}), **(ids or {})}
        shards[name] = _shard(primary, replicas, [r for r in replicas if r in in_sync], known)
        return replace(self, epoch=self.epoch + 1, shards=shards)

    def identity(self, name: str, address: str) -> str:
        """The data directory id recorded for ``address`` in shard ``name`` ("" if none)."""
        return str(self.shards.get(name, {}).get("ids", {}).get(address, ""))

    def with_move(self, move: dict[str, Any] | None,
                  members: dict[str, float] | None = None) -> ClusterState:
        """The move record replaced (and the ring too, with ``members``): one epoch on."""
        return replace(self, epoch=self.epoch + 1, move=move,
                       members=dict(self.members if members is None else members))._pruned()


def _shard(primary: str, replicas: list[str], in_sync: list[str],
           ids: dict[str, str] | None) -> dict[str, Any]:
    shard: dict[str, Any] = {"primary": primary, "replicas": list(replicas),
                             "in_sync": list(in_sync)}
    counted = {primary, *in_sync}
    kept = {a: i for a, i in sorted((ids or {}).items()) if a in counted}
    if kept:
        shard["ids"] = kept
    return shard


def valid_identity(value: object) -> bool:
    """A data directory's id as MANIFESTs (zkv.storage) and configurations carry it."""
    return (isinstance(value, str) and 0 < len(value) <= 32
            and all(c in "0123456789abcdef" for c in value))


def _addresses(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(a, str) for a in value)


@dataclass
class NodeHealth:
    up: bool = False
    last_seen: float = 0.0
    last_ping: float = 0.0
    since: float = 0.0  # when the state last changed
    asked: float = 0.0  # when the first heartbeat since the last reply went (0: none)


@dataclass
class Health:
    """Up/down state of every node from heartbeats: a node is up once it answers,
    and down after ``misses`` heartbeat intervals without any reply, heartbeats
    having gone unanswered for all but the last of them.

    A router that was itself stopped for a while (a paused VM, a long turn of its own)
    sent nothing meanwhile, so the node owed it nothing: its silence counts only once
    heartbeats go out again and go unanswered, and replies waiting unread in the
    router's own socket (``unread``) count as answers."""

    interval: float
    misses: int
    nodes: dict[str, NodeHealth] = field(default_factory=dict)

    def track(self, addr: str, now: float) -> None:
        """Start watching ``addr``; it counts as up until it misses its heartbeats."""
        self.nodes.setdefault(addr, NodeHealth(up=True, last_seen=now, since=now))

    def forget(self, addr: str) -> None:
        self.nodes.pop(addr, None)

    def seen(self, addr: str, now: float) -> bool:
        """A reply came from ``addr``. True when this brings it up."""
        node = self.nodes.get(addr)
        if node is None:
            return False
        node.last_seen, node.asked = now, 0.0
        if not node.up:
            node.up, node.since = True, now
            return True
        return False

    def due_pings(self, now: float) -> list[str]:
        """Nodes to send a heartbeat to now."""
        due = []
        for addr, node in self.nodes.items():
            if now - node.last_ping >= self.interval:
                node.last_ping = now
                if not node.asked:
                    node.asked = now
                due.append(addr)
        return due

    def overdue(self, now: float) -> list[str]:
        """Nodes up that have been silent for ``misses`` intervals and have left the
        heartbeats of all but the last of those intervals unanswered."""
        silence = self.interval * self.misses
        unanswered = self.interval * max(self.misses - 1, 0.5)
        return [addr for addr, node in self.nodes.items()
                if node.up and node.asked and now - node.last_seen > silence
                and now - node.asked > unanswered]

    def mark_down(self, addr: str, now: float) -> None:
        node = self.nodes.get(addr)
        if node is not None and node.up:
            node.up, node.since = False, now

    def expire(self, now: float, unread: Callable[[str], bool] | None = None) -> list[str]:
        """Mark down the nodes silent for too long, except those ``unread`` says have
        replies waiting to be read; returns the ones that just went down."""
        gone = [a for a in self.overdue(now) if unread is None or not unread(a)]
        for addr in gone:
            self.mark_down(addr, now)
        return gone

    def is_up(self, addr: str) -> bool:
        node = self.nodes.get(addr)
        return node is not None and node.up
