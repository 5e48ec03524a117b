"""Which node may serve which key at an epoch: the cluster configuration as rules. Pure.

Every process that routes or serves keys derives a :class:`Placement` from the one
versioned configuration (:class:`zkv.core.cluster.ClusterState`): the ring in effect,
and, while a move is under way, its phase, its old ring and the hash ranges that
move. Routers ask it where to send a request; nodes ask it whether to serve one.

A node serves a key it owns in the ring in effect. During a move's *copy* the
ranges that move are served by both of their owners in the way the move protocol
needs: the new owner takes everything (it is where writes go, and it answers the
move's reads, XGET/XDEL), and the old owner answers reads, which routers fall back
to while the new owner has no state of the key; a write sent to the old owner is
MOVED to the new one. During a *revert* (MOVE ABORT) both answer reads and neither
takes writes. In every other phase only the owner in the ring serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .cluster import ClusterState
from .ring import RangeSet, Ring, key_hash

__all__ = ["FROZEN", "MOVED", "Placement"]

# What :meth:`Placement.refuse` answers besides None (served here).
MOVED, FROZEN = "MOVED", "FROZEN"


@dataclass(frozen=True)
class Refusal:
    code: str  # MOVED or FROZEN
    owner: str  # where the key's writes (or, for MOVED, the request) should go


class Placement:
    __slots__ = ("epoch", "moving", "old_ring", "phase", "ring", "state", "trivial")

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.epoch = state.epoch
        self.ring = state.ring()
        move = state.move
        self.phase: str | None = None if move is None else str(move["phase"])
        self.old_ring: Ring | None = None
        self.moving: RangeSet | None = None
        if move is not None and self.phase in ("copy", "revert"):
            self.old_ring = Ring(move["old"], state.vnodes)
            self.moving = moving_ranges(move)
        # one member and nothing moving: every key is that member's
        self.trivial = len(self.ring) <= 1 and self.moving is None

    def owner(self, key: bytes) -> str:
        return self.ring.owner(key)

    def moving_key(self, key: bytes) -> bool:
        return self.moving is not None and self.moving.contains(key_hash(key))

    def old_owner(self, key: bytes) -> str:
        assert self.old_ring is not None
        return self.old_ring.owner(key)

    def refuse(self, node: str, key: bytes, write: bool) -> Refusal | None:
        """None if ``node`` may serve this request for ``key`` at this epoch; else why not."""
        if self.trivial and node in self.ring:
            return None
        h = key_hash(key)
        owner = self.ring.owner_of_hash(h) if len(self.ring) else ""
        if self.moving is not None and self.moving.contains(h):
            assert self.old_ring is not None
            old = self.old_ring.owner_of_hash(h)
            if node not in (owner, old):
                return Refusal(MOVED, owner)
            if self.phase == "revert":
                return Refusal(FROZEN, old) if write else None
            if node == old and write:
                return Refusal(MOVED, owner)
            return None
        if node != owner:
            return Refusal(MOVED, owner)
        return None


def moving_ranges(move: dict[str, Any]) -> RangeSet:
    union = RangeSet()
    for t in move.get("transfers", []):
        union = union.union(RangeSet.from_list(t["ranges"]))
    return union
