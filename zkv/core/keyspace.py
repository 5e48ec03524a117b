"""A node's data as a state machine over log records. No I/O.

The same :meth:`Keyspace.apply` rebuilds the map from a snapshot and a log on
start, so what recovery produces is by construction what serving produced.
Live mutations go through :meth:`set`, :meth:`delete` and :meth:`mset`, which
return the log record to append and remember how to undo themselves until the
caller commits (see :class:`zkv.storage.Storage`).

While a node receives keys from a rebalancing move, it also keeps *tombstones*:
keys deleted during the move in the hash ranges it is receiving, so that a copy
of the key still streaming in from the old owner does not bring it back.
The move records (``META`` maps with ``open``, ``close`` or ``drop``) pass
through the log like any other, so a restarted node knows which moves it had
open and which keys it had deleted.

A key may have a deadline (:attr:`Keyspace.expires`: absolute milliseconds since
the Unix epoch; a key without one costs nothing). The deadline travels with the
key: a SET record may carry it as a fourth element, PXAT records set or clear
deadlines, and a snapshot lists them after its keys. Reads take ``now`` and do
not see a key whose deadline has passed; :meth:`Keyspace.expire` deletes the due
ones (a node's primary calls it; replicas delete what their primary's DELS
records say), so expiry means the same on every copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from . import wal
from .buckets import KeyBuckets
from .expiry import MAX_DEADLINE, ExpiryWheel
from .once import Outcomes, valid_id
from .ring import RangeSet, key_hash

MISSING: Any = object()
COMPACT_KEYS = 50_000  # keys gone since the peak before the tables are made anew (compact)
COMPACT_MAX_LIVE = 250_000  # ...and at most this many left: it stops the node ~0.3 s

# XGET answers: whether the key's latest state is known here.
ABSENT, PRESENT, UNKNOWN = 0, 1, 2
# How an open move's batches are taken (see Keyspace.modes).
FILL, OVERWRITE = "fill", "overwrite"


class ReplayError(Exception):
    """A record that passed its checksum but cannot be applied (a wrong shape)."""

    def __init__(self, offset: int, reason: str, applied: int) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset, self.reason, self.applied = offset, reason, applied


class Keyspace:
    __slots__ = ("buckets", "data", "expires", "full_records", "incoming", "live_bytes",
                 "modes", "once", "peak", "receiving", "tombstones", "undo", "undo_deadlines",
                 "undo_tombs", "wheel")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        # The same keys in small buckets, for scans without a copy of the key list. Live
        # mutations keep it up to date; replay leaves it to :meth:`reindex`.
        self.buckets = KeyBuckets()
        self.live_bytes = 0
        # (key, previous value or MISSING) for every change not yet committed.
        self.undo: list[tuple[bytes, Any]] = []
        # Open incoming moves: move id -> hash ranges being received.
        self.incoming: dict[str, RangeSet] = {}
        # How each open move's batches are taken: FILL (only where this node holds no
        # state of the key: the usual move) or OVERWRITE (the batch wins: a rollback,
        # copying a destination's data back over what this node held before).
        self.modes: dict[str, str] = {}
        self.receiving: RangeSet | None = None  # union of incoming, None when no move is open
        self.tombstones: set[bytes] = set()
        self.undo_tombs: list[tuple[bytes, bool]] = []  # (key, was a tombstone before)
        # Deadlines (ms since the epoch) of the keys that have one, and when they fall due.
        self.expires: dict[bytes, int] = {}
        self.wheel = ExpiryWheel()
        self.undo_deadlines: list[tuple[bytes, int | None]] = []  # (key, deadline before)
        self.once = Outcomes()  # the outcomes of recent tagged writes (zkv.core.once)
        # Whether a change to a key's deadline is logged as the whole key (see
        # set_deadline): set by the node while a copy of its keys is on its way
        # somewhere (a replica catching up, a move's stream), since its receiver may
        # not hold the key yet; else a short PXAT record.
        self.full_records = False
        self.peak = 0  # the most keys held since the tables were last made (compact)

    def __len__(self) -> int:
        return len(self.data)

    def compact(self) -> bool:
        """Once at least half the keys (and COMPACT_KEYS) have gone since the peak (keys
        expiring, a move's cleanup), and no more than COMPACT_MAX_LIVE are left (the
        node serves nothing meanwhile): make the tables anew, so that their memory can go
        back to the system (CPython's dicts never shrink, and the old tables and bucket
        lists pin the allocator's arenas). Whether it did; most calls only compare."""
        n = len(self.data)
        if n >= self.peak:
            self.peak = n
            return False
        if self.peak - n < COMPACT_KEYS or 2 * n > self.peak or n > COMPACT_MAX_LIVE:
            return False
        self.data = dict(self.data)
        self.expires = dict(self.expires)
        self.buckets.compact()
        self.wheel.rebuild(self.expires)
        self.peak = n
        return True

    # -- live mutations: change the map, remember the undo, return the log record
    def set(self, key: bytes, value: bytes, deadline: int | None = None) -> bytes:
        """Set a key (its old deadline goes, ``deadline`` is its new one if given)."""
        self._put(key, value)
        if deadline is None:
            return wal.encode((wal.SET, key, value))
        self._set_deadline(key, deadline)
        return wal.encode((wal.SET, key, value, deadline))

    def append(self, key: bytes, suffix: bytes) -> bytes:
        """APPEND: the key's value grows by ``suffix`` (its deadline stays); the record.
        An APPEND record of the suffix alone, whatever the value's size; with
        :attr:`full_records` (a copy of the keys on its way somewhere), a SET of the
        whole key, which a receiver that lacks the key can take as it is."""
        self._grow(key, suffix)
        if not self.full_records:
            return wal.encode((wal.APPEND, key, suffix))
        deadline = self.deadline(key)
        value = self.data[key]
        return wal.encode((wal.SET, key, value) if deadline is None
                          else (wal.SET, key, value, deadline))

    def _grow(self, key: bytes, suffix: bytes) -> None:
        old = self.data.get(key)
        deadline = self.deadline(key) if old is not None else None
        self._put(key, suffix if old is None else old + suffix)
        if deadline is not None:
            self._set_deadline(key, deadline)

    # -- deadlines ------------------------------------------------------------------
    def get(self, key: bytes, now: int) -> bytes | None:
        """The value of a key, or None (absent, or its deadline has passed)."""
        value = self.data.get(key)
        if value is not None and self.expires:
            deadline = self.expires.get(key)
            if deadline is not None and deadline <= now:
                return None
        return value

    def deadline(self, key: bytes) -> int | None:
        return self.expires.get(key) if self.expires else None

    def set_deadline(self, key: bytes, deadline: int | None) -> bytes:
        """Give a present key a deadline (None: take its deadline away); the record. A
        PXAT record of the key and its deadline, a few bytes whatever the value's size;
        with :attr:`full_records`, a SET of the key with its new deadline: a replica
        still copying its primary's keys may not have this one yet, and a SET gives it
        the key as it is now."""
        if deadline is None:
            self._clear_deadline(key)
        else:
            self._set_deadline(key, deadline)
        if not self.full_records:
            return wal.encode((wal.PXAT, [key, deadline or 0]))
        if deadline is None:
            return wal.encode((wal.SET, key, self.data[key]))
        return wal.encode((wal.SET, key, self.data[key], deadline))

    def expire(self, now: int, limit: int) -> tuple[int, bytes | None]:
        """Delete up to about ``limit`` keys whose deadline has passed (the due slots of
        the wheel, checked against :attr:`expires`); how many went, and the record."""
        if self.wheel.needs_compaction(len(self.expires)):
            self.wheel.rebuild(self.expires)
        expires = self.expires
        gone: list[bytes] = []
        for key in self.wheel.due(now, limit):
            deadline = expires.get(key)
            if deadline is not None and deadline <= now and key in self.data:
                self.delete(key)
                gone.append(key)
        return len(gone), (wal.encode((wal.DELS, gone)) if gone else None)

    def live_count(self, now: int) -> int:
        """Keys whose deadline has not passed."""
        expires = self.expires
        if not expires:
            return len(self.data)
        return len(self.data) - sum(1 for t in expires.values() if t <= now)

    def _set_deadline(self, key: bytes, deadline: int) -> None:
        self.undo_deadlines.append((key, self.expires.get(key)))
        self.expires[key] = deadline
        self.wheel.add(key, deadline)
        if self.wheel.needs_compaction(len(self.expires)):  # (a replica never expires)
            self.wheel.rebuild(self.expires)

    def _clear_deadline(self, key: bytes) -> None:
        old = self.expires.pop(key, None)
        if old is not None:
            self.undo_deadlines.append((key, old))

    def delete(self, key: bytes) -> tuple[bool, bytes | None]:
        """Whether the key existed, and the record to log (None when nothing changed)."""
        if self.receiving is not None and self.receiving.contains(key_hash(key)):
            existed = key in self.data
            if existed:
                self._drop(key)
            if key not in self.tombstones:
                self._tomb(key, True)
            return existed, wal.encode((wal.DEL, key))
        if key not in self.data:
            return False, None
        self._drop(key)
        return True, wal.encode((wal.DEL, key))

    def state(self, key: bytes, now: int) -> tuple[int, bytes | None]:
        """PRESENT with the value, ABSENT (known deleted, expired, or never here), or
        UNKNOWN (in a range still being received and not written or deleted here yet)."""
        value = self.data.get(key)
        if value is not None:
            if self.expires and self.expires.get(key, now + 1) <= now:
                return ABSENT, None
            return PRESENT, value
        if key in self.tombstones:
            return ABSENT, None
        if self.receiving is not None and self.receiving.contains(key_hash(key)):
            return UNKNOWN, None
        return ABSENT, None

    # -- moves ------------------------------------------------------------------
    def open_move(self, move_id: str, ranges: RangeSet, mode: str = FILL) -> bytes | None:
        """Start receiving ``ranges`` (deletes there now leave tombstones). Idempotent:
        None when the move is already open. In FILL mode the keys this node already held
        in ``ranges`` are stale; the node forgets them (:meth:`forget`) before the copy
        starts. In OVERWRITE mode they stay, and what the stream brings replaces them."""
        if move_id in self.incoming:
            return None
        meta: dict[str, Any] = {"open": move_id, "ranges": ranges.to_list()}
        if mode != FILL:
            meta["mode"] = mode
        item = (wal.META, meta)
        self.apply(item)
        return wal.encode(item)

    def forget_outcomes(self) -> bytes | None:
        """Forget the outcomes of tagged writes (zkv.core.once); the record, if any went."""
        if not self.once.entries and not self.once.floors:
            return None
        self.once.clear()
        return wal.encode((wal.META, {"outcomes": "forget"}))

    def close_move(self, move_id: str) -> bytes | None:
        if move_id not in self.incoming:
            return None
        item = (wal.META, {"close": move_id})
        self.apply(item)
        return wal.encode(item)

    def forget(self, keys: list[bytes]) -> bytes | None:
        """Drop keys that moved away (or are stale); the record to log, if any went.
        Unlike a delete this leaves no tombstone."""
        gone = [k for k in keys if k in self.data]
        for key in gone:
            self._drop(key)
        return wal.encode((wal.DROP, gone)) if gone else None

    def absorb(self, move_id: str, pairs: list[Any], dels: Sequence[Any] = (),
               deadlines: dict[bytes, int] | None = None,
               now: int = 0) -> tuple[int, bytes | None]:
        """Apply a batch streamed in by a move. In FILL mode a key is taken only when
        this node holds no newer state of it (no value written here, no tombstone); in
        OVERWRITE mode every key of the ranges is taken, and ``dels`` (keys the sender
        deleted) are dropped here. ``deadlines``: those of the batch's keys that have
        one; a key already due at ``now`` is not taken. Returns how many keys were
        taken and the records."""
        ranges = self.incoming.get(move_id)
        if ranges is None:
            return 0, None
        taken: list[bytes] = []
        due: list[bytes] = []  # (in OVERWRITE mode: expired on the way, so deleted here)
        data, tombs = self.data, self.tombstones
        overwrite = self.modes.get(move_id) == OVERWRITE
        for i in range(0, len(pairs) - 1, 2):
            key, value = pairs[i], pairs[i + 1]
            if (type(key) is bytes and type(value) is bytes
                    and (overwrite or (key not in data and key not in tombs))
                    and ranges.contains(key_hash(key))):
                if deadlines and key in deadlines and deadlines[key] <= now:
                    due.append(key)
                    continue
                taken.append(key)
                taken.append(value)
        records = b""
        if taken:
            records += self.mset(taken)
            if deadlines:
                timed: list[Any] = []
                for key in taken[0::2]:
                    if key in deadlines:
                        self._set_deadline(key, deadlines[key])
                        timed += (key, deadlines[key])
                if timed:
                    records += wal.encode((wal.PXAT, timed))
        if overwrite and (dels or due):
            gone = [k for k in dels if type(k) is bytes and ranges.contains(key_hash(k))]
            records += self.forget(gone + due) or b""
        return len(taken) // 2, (records or None)

    def apply_live(self, item: Any) -> None:
        """Apply one record shipped by a primary (zkv.core.replication) as a live change: the
        buckets stay current and the change undoes if the commit fails. A record of the
        wrong shape raises (TypeError, ValueError, IndexError)."""
        kind = item[0]
        if kind == wal.SET:
            key, value = item[1], item[2]
            if type(key) is not bytes or type(value) is not bytes:
                raise TypeError("key and value must be bytes")
            self._put(key, value)
            if len(item) > 3:
                self._set_deadline(key, _deadline(item[3]))
        elif kind == wal.DEL:
            self.delete(item[1])
        elif kind == wal.DELS:
            for key in item[1]:
                self.delete(key)
        elif kind == wal.PXAT:
            pairs = item[1]
            for i in range(0, len(pairs) - 1, 2):
                key, deadline = pairs[i], _deadline(pairs[i + 1], True)
                if key in self.data:
                    if deadline:
                        self._set_deadline(key, deadline)
                    else:
                        self._clear_deadline(key)
        elif kind == wal.MSET or kind == wal.CHUNK:
            pairs = item[1]
            if len(pairs) % 2 or not all(type(x) is bytes for x in pairs):
                raise TypeError("pairs must be keys and values")
            for i in range(0, len(pairs), 2):
                self._put(pairs[i], pairs[i + 1])
        elif kind == wal.DROP:
            self.forget(list(item[1]))
        elif kind == wal.TOMBS:
            for key in item[1]:
                self._tomb(key, True)
        elif kind == wal.META:
            self._apply_meta(item[1])
        elif kind == wal.APPEND:
            key, suffix = item[1], item[2]
            if type(key) is not bytes or type(suffix) is not bytes:
                raise TypeError("key and suffix must be bytes")
            self._grow(key, suffix)
        elif kind == wal.ATOMIC:
            for inner in _inner_records(item[1], _ATOMIC_INNER):
                self.apply_live(inner)
        elif kind == wal.ONCE or kind == wal.ONCERUN:
            for inner in _inner_records(item[4]):
                self.apply_live(inner)
            for client, seq in _once_ids(item):
                self.once.remember(client, seq, item[3])
        elif kind == wal.ONCES:
            self.once.merge(item[1])
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _rebuild_receiving(self) -> None:
        union = RangeSet()
        for r in self.incoming.values():
            union = union.union(r)
        self.receiving = None if not self.incoming else union
        if self.receiving is None:
            self.tombstones.clear()
        else:
            self.tombstones = {k for k in self.tombstones if union.contains(key_hash(k))}

    def _tomb(self, key: bytes, add: bool) -> None:
        self.undo_tombs.append((key, key in self.tombstones))
        if add:
            self.tombstones.add(key)
        else:
            self.tombstones.discard(key)

    def put(self, key: bytes, value: bytes) -> None:
        """Set a key without making its record (the caller logs a batch of them)."""
        self._put(key, value)

    def put_deadline(self, key: bytes, deadline: int) -> None:
        """Give a key a deadline without making its record (the caller logs a PXAT)."""
        self._set_deadline(key, deadline)

    def mset(self, pairs: list[bytes]) -> bytes:
        for i in range(0, len(pairs), 2):
            self._put(pairs[i], pairs[i + 1])
        return wal.encode((wal.MSET, pairs))

    def commit(self) -> None:
        self.undo.clear()
        self.undo_tombs.clear()
        self.undo_deadlines.clear()
        self.once.commit()

    def rollback(self) -> None:
        self.rollback_data()
        self.once.rollback_to(0)

    def rollback_data(self) -> None:
        expires = self.expires
        for key, deadline in reversed(self.undo_deadlines):
            if deadline is None:
                expires.pop(key, None)
            else:
                expires[key] = deadline
                self.wheel.add(key, deadline)
        self.undo_deadlines.clear()
        for key, was in reversed(self.undo_tombs):
            if was:
                self.tombstones.add(key)
            else:
                self.tombstones.discard(key)
        self.undo_tombs.clear()
        data, buckets = self.data, self.buckets
        for key, old in reversed(self.undo):
            cur = data.get(key)
            if cur is not None:
                self.live_bytes -= len(key) + len(cur)
            if old is MISSING:
                if cur is not None:
                    data.pop(key)
                    buckets.remove(key)
            else:
                if cur is None:
                    buckets.add(key)
                data[key] = old
                self.live_bytes += len(key) + len(old)
        self.undo.clear()

    def mark(self) -> tuple[int, int, int, int]:
        """A point to :meth:`rollback_to`: the changes made after it can be undone alone."""
        return len(self.undo), len(self.undo_tombs), len(self.undo_deadlines), self.once.mark()

    def rollback_to(self, mark: tuple[int, int, int, int]) -> None:
        """Undo the changes made since ``mark`` (one request's, say), keeping earlier ones."""
        self.once.rollback_to(mark[3])
        undo, tombs = self.undo[mark[0]:], self.undo_tombs[mark[1]:]
        deadlines = self.undo_deadlines[mark[2]:]
        del self.undo[mark[0]:], self.undo_tombs[mark[1]:], self.undo_deadlines[mark[2]:]
        kept = self.undo, self.undo_tombs, self.undo_deadlines
        self.undo, self.undo_tombs, self.undo_deadlines = undo, tombs, deadlines
        try:
            self.rollback_data()
        finally:
            self.undo, self.undo_tombs, self.undo_deadlines = kept

    def _put(self, key: bytes, value: bytes) -> None:
        if self.tombstones and key in self.tombstones:
            self._tomb(key, False)
        if self.expires and key in self.expires:
            self._clear_deadline(key)
        old = self.data.get(key, MISSING)
        self.undo.append((key, old))
        if old is MISSING:
            self.live_bytes += len(key) + len(value)
            self.buckets.add(key)
        else:
            self.live_bytes += len(value) - len(old)
        self.data[key] = value

    def _drop(self, key: bytes) -> None:
        if self.expires and key in self.expires:
            self._clear_deadline(key)
        old = self.data.pop(key)
        self.undo.append((key, old))
        self.live_bytes -= len(key) + len(old)
        self.buckets.remove(key)

    # -- replay
    def replay(self, records: Iterable[tuple[int, Any]]) -> int:
        """Apply ``(offset, record)`` pairs in order; how many were applied.

        Plain SETs and DELs, nearly all of a log, take a short path that leaves
        ``live_bytes`` to one count at the end; every other record goes through
        :meth:`apply`. Raises ReplayError for a record of the wrong shape.
        """
        data, apply, expires = self.data, self.apply, self.expires
        n, off = 0, 0
        SET, DEL = wal.SET, wal.DEL
        try:
            for off, item in records:  # noqa: B007 (off names a bad record below)
                kind = item[0]
                if (kind == SET and len(item) == 3 and self.receiving is None
                        and not self.tombstones):
                    _, key, value = item
                    if type(key) is not bytes or type(value) is not bytes:
                        raise TypeError("key and value must be bytes")
                    data[key] = value
                    if expires:
                        expires.pop(key, None)
                elif kind == DEL and self.receiving is None:
                    data.pop(item[1], None)
                    if expires:
                        expires.pop(item[1], None)
                else:
                    apply(item)
                n += 1
        except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
            self._recount()
            raise ReplayError(off, str(exc), n) from None
        self._recount()
        return n

    def _recount(self) -> None:
        self.live_bytes = sum(len(k) + len(v) for k, v in self.data.items())

    def reindex(self) -> None:
        """Rebuild the buckets from the map (after replay, which does not keep them), and
        the expiry wheel from the deadlines (replay files each deadline it sees)."""
        self.buckets = KeyBuckets(self.data)
        self.wheel.rebuild(self.expires)

    def apply(self, item: Any) -> None:
        """Apply one decoded log or snapshot record (no undo: replay is not a transaction)."""
        kind = item[0]
        data = self.data
        tombs = self.tombstones
        expires = self.expires
        if kind == wal.SET:
            key, value = item[1], item[2]
            if type(key) is not bytes or type(value) is not bytes:
                raise TypeError("key and value must be bytes")
            old = data.get(key)
            self.live_bytes += len(value) - (len(old) if old is not None else -len(key))
            data[key] = value
            if tombs:
                tombs.discard(key)
            if len(item) > 3:
                expires[key] = deadline = _deadline(item[3])
                self.wheel.add(key, deadline)
            elif expires:
                expires.pop(key, None)
        elif kind == wal.DEL:
            self._apply_del(item[1])
        elif kind == wal.DELS:
            for key in item[1]:
                self._apply_del(key)
        elif kind == wal.PXAT:
            pairs = item[1]
            for i in range(0, len(pairs) - 1, 2):
                key, deadline = pairs[i], _deadline(pairs[i + 1], True)
                if not deadline:
                    expires.pop(key, None)
                elif key in data:
                    expires[key] = deadline
                    self.wheel.add(key, deadline)
        elif kind == wal.MSET or kind == wal.CHUNK:
            pairs = item[1]
            for i in range(0, len(pairs), 2):
                key, value = pairs[i], pairs[i + 1]
                old = data.get(key)
                self.live_bytes += len(value) - (len(old) if old is not None else -len(key))
                data[key] = value
                if tombs:
                    tombs.discard(key)
                if expires:
                    expires.pop(key, None)
        elif kind == wal.DROP:
            for key in item[1]:
                old = data.pop(key, None)
                if old is not None:
                    self.live_bytes -= len(key) + len(old)
                if expires:
                    expires.pop(key, None)
        elif kind == wal.TOMBS:
            tombs.update(item[1])
        elif kind == wal.META:
            self._apply_meta(item[1])
        elif kind == wal.APPEND:
            key, suffix = item[1], item[2]
            if type(key) is not bytes or type(suffix) is not bytes:
                raise TypeError("key and suffix must be bytes")
            old = data.get(key)
            self.live_bytes += len(suffix) if old is not None else len(key) + len(suffix)
            data[key] = suffix if old is None else old + suffix
            if tombs:
                tombs.discard(key)
        elif kind == wal.ATOMIC:
            for inner in _inner_records(item[1], _ATOMIC_INNER):
                self.apply(inner)
        elif kind == wal.ONCE or kind == wal.ONCERUN:
            for inner in _inner_records(item[4]):
                self.apply(inner)
            for client, seq in _once_ids(item):
                self.once.remember(client, seq, item[3], live=False)
        elif kind == wal.ONCES:
            self.once.merge(item[1], live=False)
        else:
            raise ValueError(f"unknown record kind {kind!r}")

    def _apply_del(self, key: bytes) -> None:
        old = self.data.pop(key, None)
        if old is not None:
            self.live_bytes -= len(key) + len(old)
        if self.expires:
            self.expires.pop(key, None)
        if self.receiving is not None and self.receiving.contains(key_hash(key)):
            self.tombstones.add(key)

    def _apply_meta(self, meta: dict[str, Any]) -> None:
        if "open" in meta:
            move_id, ranges = str(meta["open"]), RangeSet.from_list(meta["ranges"])
            if move_id not in self.incoming:
                self.incoming[move_id] = ranges
                if meta.get("mode", FILL) != FILL:
                    self.modes[move_id] = str(meta["mode"])
                self._rebuild_receiving()
        elif "close" in meta:
            if self.incoming.pop(str(meta["close"]), None) is not None:
                self.modes.pop(str(meta["close"]), None)
                self._rebuild_receiving()
        elif meta.get("outcomes") == "forget":
            self.once.clear(live=False)
        elif "incoming" in meta:  # a snapshot's header
            self.incoming = {str(k): RangeSet.from_list(v) for k, v in meta["incoming"].items()}
            self.modes = {str(k): str(v) for k, v in meta.get("modes", {}).items()
                          if str(k) in self.incoming}
            self._rebuild_receiving()


    def snapshot_meta(self) -> dict[str, Any]:
        return {"incoming": {k: v.to_list() for k, v in self.incoming.items()},
                "modes": dict(self.modes)}


def _deadline(value: Any, zero: bool = False) -> int:
    """A deadline from a record: a positive int (0 too, meaning none, where ``zero``)."""
    if type(value) is not int or not (0 if zero else 1) <= value <= MAX_DEADLINE:
        raise ValueError(f"a deadline must be milliseconds since the epoch, not {value!r}")
    return value


_ONCE_INNER = frozenset((wal.ONCE, wal.ONCES, wal.ONCERUN, wal.META, wal.ATOMIC))
_ATOMIC_INNER = frozenset((wal.META, wal.ATOMIC))  # (its tagged writes are ONCE records)


def _inner_records(data: Any, refused: frozenset[int] = _ONCE_INNER) -> list[Any]:
    """The records a ONCE or ATOMIC record carries (framed, as bytes): data records
    only (an ATOMIC record's may be ONCE records too)."""
    if type(data) is not bytes:
        raise TypeError("a ONCE or ATOMIC record carries its records as bytes")
    scan = wal.LogScan(data)
    items = [item for _, item in scan]
    if scan.damage is not None:
        raise ValueError(f"the records in a ONCE or ATOMIC record are damaged: "
                         f"{scan.damage.reason}")
    if any(type(item) is not list or not item or item[0] in refused for item in items):
        raise ValueError("a ONCE or ATOMIC record carries data records only")
    return items


def _once_ids(item: Any) -> list[tuple[bytes, int]]:
    """The ids a ONCE record (one) or a ONCERUN record (a list of seqs) names."""
    client, seqs = item[1], item[2] if item[0] == wal.ONCERUN else [item[2]]
    if type(seqs) is not list or not seqs or not all(valid_id(client, s) for s in seqs):
        raise ValueError("a ONCE record names a client id and sequence numbers")
    return [(client, seq) for seq in seqs]
