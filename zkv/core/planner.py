"""The rebalance planner: which hash ranges move where when the ring changes. Pure.

:func:`plan` lays the old ring's arcs over the new ring's and, for every arc of
hash space whose owner differs, names the hand-over from the old owner to the
new one. Hand-overs are merged per ``(source, dest)`` pair into one
:class:`Transfer` each and sorted by that pair, so the same two rings always
give the same plan. Each hash that changes owner lies in exactly one transfer;
a hash that keeps its owner lies in none. On an ADD every transfer goes to the
new member; on a REMOVE every transfer comes from the leaving one.

:func:`summary` is the same plan as plain dicts, for ``--dry-run`` displays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypedDict

from ..errors import ClusterError
from .ring import HASH_SPACE, RangeSet, Ring


@dataclass(frozen=True)
class Transfer:
    """The hash ranges ``source`` hands to ``dest``."""

    source: str
    dest: str
    ranges: RangeSet

    def fraction(self) -> float:
        """The share of the whole hash space this transfer moves."""
        return self.ranges.fraction()

    def to_dict(self) -> dict[str, object]:
        """A CBOR/JSON-ready form, for the proxy's record of a move under way."""
        return {"source": self.source, "dest": self.dest, "ranges": self.ranges.to_list()}

    @classmethod
    def from_dict(cls, data: object) -> Transfer:
        """Rebuild a transfer from :meth:`to_dict` output; ValueError names what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a transfer must be a map, got {type(data).__name__}")  # noqa: TRY004
        for field in ("source", "dest"):
            if not isinstance(data.get(field), str) or not data[field]:
                raise ValueError(f"transfer field {field!r} must be a non-empty string")
        if data["source"] == data["dest"]:
            raise ValueError(f"transfer from {data['source']} to itself")
        return cls(data["source"], data["dest"], RangeSet.from_list(data.get("ranges")))


class TransferSummary(TypedDict):
    source: str
    dest: str
    fraction: float
    intervals: int


def _overlay(
    old: Iterable[tuple[int, int, str]], new: Iterable[tuple[int, int, str]]
) -> Iterator[tuple[int, int, str, str]]:
    """Lay two partitions of hash space over each other: ``(lo, hi, old owner, new owner)``."""
    old_arcs, new_arcs = iter(old), iter(new)
    _, old_hi, old_owner = next(old_arcs)
    _, new_hi, new_owner = next(new_arcs)
    lo = 0
    while lo < HASH_SPACE:
        hi = min(old_hi, new_hi)
        yield lo, hi, old_owner, new_owner
        lo = hi
        if lo == old_hi and lo < HASH_SPACE:
            _, old_hi, old_owner = next(old_arcs)
        if lo == new_hi and lo < HASH_SPACE:
            _, new_hi, new_owner = next(new_arcs)


def plan(old: Ring, new: Ring) -> list[Transfer]:
    """The transfers that take the data from ``old``'s layout to ``new``'s.

    No transfers if ``old`` is empty (there is nothing to move); ClusterError if
    ``new`` is empty (the last node cannot be removed).
    """
    if len(new) == 0:
        raise ClusterError("cannot remove the last node: the new ring would have no members")
    if len(old) == 0:
        return []
    moves: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for lo, hi, source, dest in _overlay(old.arcs(), new.arcs()):
        if source != dest:
            moves.setdefault((source, dest), []).append((lo, hi))
    return [Transfer(src, dst, RangeSet(moves[src, dst])) for src, dst in sorted(moves)]


def moved_fraction(transfers: Iterable[Transfer]) -> float:
    """The share of hash space the transfers move, between 0.0 and 1.0."""
    return sum(t.ranges.size() for t in transfers) / HASH_SPACE


def summary(old: Ring, new: Ring, transfers: list[Transfer] | None = None
            ) -> list[TransferSummary]:
    """Per ``(source, dest)``: the fraction of hash space and number of intervals it moves
    (of ``transfers``, when the plan is already made)."""
    return [
        TransferSummary(
            source=t.source, dest=t.dest, fraction=t.fraction(), intervals=len(t.ranges)
        )
        for t in (plan(old, new) if transfers is None else transfers)
    ]
