"""Safe retries: the outcomes of recent writes, by client id and sequence number. No I/O.

``zkv.Client`` tags every write with its client id (random, one per Client) and a
sequence number, as ``["ONCE", client_id, seq, request]``. The node that applies
it remembers the outcome here, and a retried write (same id and number) gets the
first outcome instead of being applied again. What is remembered is state like
any other: the write's records and its outcome are logged as one ONCE record (so
a torn log keeps both or neither), snapshots list the table, replicas apply the
same records, and a move's stream carries the table to the destination, so a
retry finds its outcome after a restart, a failover or a move of the key.

The window is bounded: the last WINDOW outcomes of each client, and the clients
that wrote most recently, at most MAX_ENTRIES outcomes in all (the oldest client
goes first). A client retries within its timeout, and sends at most a few
thousand writes between a write and its retry (zkv.client works in rounds), so a
retry finds its outcome. An outcome larger than MAX_OUTCOME_BYTES is kept as its
size only; its retry is told the write was applied and asked to read the key.

What is forgotten is not forgotten silently: each client's floor (the highest
sequence number whose outcome was let go) is kept, so a retry at or below it is
refused as of unknown outcome (zkv.OutcomeUnknown) instead of being applied a
second time. Floors are kept for the MAX_FLOORS clients that lost one most
recently, and travel with the outcomes (snapshots, moves, replica syncs) as
``[client, floor, FLOOR]`` in the flat table.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

WINDOW = 8192  # outcomes kept per client (zkv.client.ROUND writes fit twice over)
MAX_ENTRIES = 250_000  # outcomes kept in all, with CLIENT_COST for each client's window
# (about 137 bytes an outcome: some 34 MiB at most)
MAX_FLOORS = 100_000  # clients whose floor is kept
CLIENT_COST = 5  # what a client's window costs, counted in outcomes against MAX_ENTRIES
MAX_OUTCOME_BYTES = 256  # (so the table holds at most ~25 MiB of them)
MAX_CLIENT_ID = 80  # bytes (a router adds a few to tell apart the parts of one MSET)
BIG = "big"  # an outcome kept as its size: {"big": n}
FLOOR = {"floor": True}  # in a flat table, [client, floor, FLOOR]: a client's floor
_SET, _DROP_SEQ, _DROP_CLIENT, _FLOOR = range(4)


def kept(result: Any) -> Any:
    """What is remembered of a result: itself, or its size if it is large."""
    if isinstance(result, bytes) and len(result) > MAX_OUTCOME_BYTES:
        return {BIG: len(result)}
    return result


class Outcomes:
    """Per client, the outcomes of its recent writes (seq -> result), oldest first."""

    __slots__ = ("clients", "entries", "floors", "undo")

    def __init__(self) -> None:
        self.clients: collections.OrderedDict[bytes, collections.OrderedDict[int, Any]] = \
            collections.OrderedDict()
        self.entries = 0
        # per client, the highest seq whose outcome was let go (most recent last)
        self.floors: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        # how to undo what this turn remembered, if its commit fails (newest last):
        # (SET, client, seq, had, old), (DROP_SEQ, client, seq, result),
        # (DROP_CLIENT, client, window) or (FLOOR, client, old floor or None)
        self.undo: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return self.entries

    def get(self, client: bytes, seq: int) -> tuple[bool, Any]:
        window = self.clients.get(client)
        if window is None or seq not in window:
            return False, None
        return True, window[seq]

    def forgotten(self, client: bytes, seq: int) -> bool:
        """Whether the outcome of ``seq`` may have been let go (it is not in the table:
        see :meth:`get`): a write with that id is then of unknown outcome."""
        return seq <= self.floors.get(client, -1)

    def _raise_floor(self, client: bytes, seq: int, undo: list[tuple[Any, ...]] | None
                     ) -> bool:
        floors = self.floors
        old = floors.get(client)
        if old is not None and old >= seq:
            return False
        if undo is not None:
            undo.append((_FLOOR, client, old))
        floors[client] = seq
        floors.move_to_end(client)
        while len(floors) > MAX_FLOORS:
            gone, floor = floors.popitem(last=False)
            if undo is not None:
                undo.append((_FLOOR, gone, floor))
        return True

    def fresh(self, client: bytes, seq: int) -> bool:
        """Neither remembered nor forgotten: a write with this id is new here."""
        window = self.clients.get(client)
        if window is not None and seq in window:
            return False
        return seq > self.floors.get(client, -1)

    def remember(self, client: bytes, seq: int, result: Any, live: bool = True,
                 recent: bool = True) -> None:
        """Keep an outcome (``live``: undoable until :meth:`commit`; not ``recent``: an
        outcome from elsewhere, whose client is the first to be forgotten)."""
        self.remember_all(client, (seq,), result, live, recent)

    def remember_all(self, client: bytes, seqs: Iterable[int], result: Any,
                     live: bool = True, recent: bool = True) -> None:
        """Keep one outcome for each of ``seqs`` (a pipeline's run of SETs: the window
        is trimmed, and the floor raised, once for all of them)."""
        undo = self.undo if live else None
        window = self.clients.get(client)
        if window is None:
            window = self.clients[client] = collections.OrderedDict()
            if not recent:
                self.clients.move_to_end(client, last=False)
        elif recent:
            self.clients.move_to_end(client)
        for seq in seqs:
            had = seq in window
            if undo is not None:
                undo.append((_SET, client, seq, had, window.get(seq)))
            window[seq] = result
            if not had:
                self.entries += 1
                if not recent:  # from elsewhere: the first of this window to go
                    window.move_to_end(seq, last=False)
        if len(window) > WINDOW:
            top = -1
            while len(window) > WINDOW:
                old_seq, old = window.popitem(last=False)
                self.entries -= 1
                if undo is not None:
                    undo.append((_DROP_SEQ, client, old_seq, old))
                top = max(top, old_seq)
            self._raise_floor(client, top, undo)
        while self.entries + CLIENT_COST * len(self.clients) > MAX_ENTRIES \
                and len(self.clients) > 1:
            oldest, gone = self.clients.popitem(last=False)
            self.entries -= len(gone)
            if undo is not None:
                undo.append((_DROP_CLIENT, oldest, gone))
            self._raise_floor(oldest, max(gone), undo)

    def clear(self, live: bool = True) -> None:
        """Forget every outcome (a replica about to copy its primary's state)."""
        while self.clients:
            client, window = self.clients.popitem(last=False)
            self.entries -= len(window)
            if live:
                self.undo.append((_DROP_CLIENT, client, window))
        while self.floors:
            client, floor = self.floors.popitem(last=False)
            if live:
                self.undo.append((_FLOOR, client, floor))

    def commit(self) -> None:
        self.undo.clear()

    def mark(self) -> int:
        return len(self.undo)

    def rollback_to(self, mark: int = 0) -> None:
        """Undo what was remembered since ``mark``. (Which client is forgotten first
        may differ afterwards: the order of recent use is not restored.)"""
        clients = self.clients
        while len(self.undo) > mark:
            entry = self.undo.pop()
            if entry[0] == _FLOOR:
                if entry[2] is None:
                    self.floors.pop(entry[1], None)
                else:
                    self.floors[entry[1]] = entry[2]
                continue
            if entry[0] == _DROP_CLIENT:
                clients[entry[1]] = entry[2]
                clients.move_to_end(entry[1], last=False)
                self.entries += len(entry[2])
                continue
            window = clients.setdefault(entry[1], collections.OrderedDict())
            if entry[0] == _DROP_SEQ:
                window[entry[2]] = entry[3]
                window.move_to_end(entry[2], last=False)
                self.entries += 1
            else:
                _, client, seq, had, old = entry
                if had:
                    window[seq] = old
                else:
                    window.pop(seq, None)
                    self.entries -= 1
                    if not window:
                        del clients[client]

    def items(self) -> Iterator[tuple[bytes, int, Any]]:
        """Every outcome, oldest client first, each client's in order."""
        for client, window in self.clients.items():
            for seq, result in window.items():
                yield client, seq, result

    def flat(self) -> list[Any]:
        """The table as ``[client, seq, result, ...]``, then the floors as ``[client,
        floor, FLOOR, ...]`` (snapshots, move streams, replica syncs)."""
        out = [x for entry in self.items() for x in entry]
        for client, floor in self.floors.items():
            out += (client, floor, FLOOR)
        return out

    def merge(self, flat: list[Any], live: bool = True) -> list[Any]:
        """Take the outcomes of ``flat`` this table does not have, and its floors where
        higher; those taken, flat."""
        taken: list[Any] = []
        undo = self.undo if live else None
        # (newest first, each put before what this table has: the order comes out as it
        # was, and the table's own outcomes stay the last to be forgotten)
        for i in range(len(flat) - len(flat) % 3 - 3, -1, -3):
            client, seq, result = flat[i], flat[i + 1], flat[i + 2]
            if not valid_id(client, seq):
                continue
            if result == FLOOR:
                if self._raise_floor(client, seq, undo):
                    taken += (client, seq, result)
                continue
            if self.get(client, seq)[0]:
                continue
            self.remember(client, seq, result, live, recent=False)
            taken += (client, seq, result)
        return [x for i in range(len(taken) - 3, -1, -3) for x in taken[i : i + 3]]


def valid_id(client: Any, seq: Any) -> bool:
    return (type(client) is bytes and 0 < len(client) <= MAX_CLIENT_ID
            and type(seq) is int and 0 <= seq < 1 << 63)
