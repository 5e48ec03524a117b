"""Bulk key streams between nodes during a rebalancing move. No sockets.

A source node turns the keys of the hash ranges it hands over into batches
(:class:`Outgoing`), which its PUSH socket sends to the destination's PULL
socket. A batch is one CBOR array::

    [move_id, source, seq, pairs, final, total(, dels(, deadlines(, outcomes)))]

``seq`` counts from 0 for each stream; ``final`` marks the last batch and
``total`` says how many keys the stream carried (values and deletes). ``dels``,
when present, lists keys the source deleted: a rollback streams a destination's
tombstones back too, so that a delete made during the move is not undone.
``deadlines``, when present, is ``[key, deadline, ...]`` for the batch's keys that
have one (absolute ms since the epoch); a key already due is not sent. The final
batch may carry ``outcomes``, the source's table of recent tagged writes
(zkv.core.once, ``[client, seq, outcome, ...]``), so that a write retried after its key
moved is not applied again by the new owner. The
destination tracks each stream with :class:`Incoming`: a batch out of order (a
restarted source or a dropped connection) marks the stream broken so the proxy
restarts it; applying a batch twice is harmless, because a transferred key is
only taken when the destination holds no newer state of it (or, in a rollback,
because nothing writes the ranges while it runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..errors import ProtocolError
from . import cbor
from .buckets import KeyBuckets
from .expiry import MAX_DEADLINE
from .ring import RangeSet, key_hash

SCAN_STEP = 20_000  # keys hashed per loop turn, so a scan never stalls serving
MAX_BATCH_KEYS = 100_000  # keys in one batch, the most a move may be asked to send
OUTCOMES_PER_BATCH = 4000  # of at most 256 bytes each (zkv.core.once): about 1 MiB a batch
_OUTCOME_ITEMS = 3 * OUTCOMES_PER_BATCH  # a batch's share of a table of outcomes, flat
# (an outcome may be a small list or map: a few items more each)
_BATCH_ITEMS = 4 * MAX_BATCH_KEYS + 4 * _OUTCOME_ITEMS + 16


class RangeScan:
    """Finds the keys of some hash ranges a bounded step at a time.

    It walks the keyspace's buckets (zkv.core.buckets), so it holds no copy of the key
    list, and the node interleaves the hashing with serving requests. Keys of these
    ranges are not written on this node while the scan runs (the proxy routes them
    elsewhere), and a key present throughout is always found.
    """

    def __init__(self, buckets: KeyBuckets, ranges: RangeSet) -> None:
        self.buckets = buckets
        self.ranges = ranges
        self.pos = 0  # the next bucket

    @property
    def done(self) -> bool:
        return self.pos >= self.buckets.buckets

    def step(self, limit: int = SCAN_STEP) -> list[bytes]:
        contains = self.ranges.contains
        lists = self.buckets.lists
        found: list[bytes] = []
        seen = 0
        while self.pos < len(lists) and seen < limit:
            bucket = lists[self.pos]
            seen += len(bucket)
            found.extend(k for k in bucket if contains(key_hash(k)))
            self.pos += 1
        return found


def encode_batch(move_id: str, source: str, seq: int, pairs: list[bytes], final: bool,
                 total: int, dels: list[bytes] | None = None,
                 deadlines: list[Any] | None = None,
                 outcomes: list[Any] | None = None) -> bytes:
    item: list[Any] = [move_id, source, seq, pairs, final, total]
    if dels or deadlines or outcomes:
        item.append(dels or [])
    if deadlines or outcomes:
        item.append(deadlines or [])
    if outcomes:
        item.append(outcomes)
    return cbor2.dumps(item)


Batch = tuple[str, str, int, list[Any], bool, int, list[Any], dict[bytes, int], list[Any]]


def decode_batch(body: bytes) -> Batch:
    """A batch from a PULL socket, which anyone who can reach it may write to: decoded
    within the bounds a batch can have, and every field checked. The deadlines come
    back as a map."""
    try:
        item = cbor.decode(body, _BATCH_ITEMS, 3, max(2 * MAX_BATCH_KEYS, _OUTCOME_ITEMS), 9)
    except cbor.Malformed as exc:
        raise ProtocolError(f"transfer batch is not valid: {exc}") from None
    if (not isinstance(item, list) or len(item) not in (6, 7, 8, 9)
            or not isinstance(item[0], str)
            or not isinstance(item[1], str) or type(item[2]) is not int or item[2] < 0
            or not isinstance(item[3], list) or len(item[3]) % 2
            or type(item[4]) is not bool or type(item[5]) is not int or item[5] < 0
            or (len(item) >= 7 and not isinstance(item[6], list))):
        raise ProtocolError(
            "transfer batch must be [move_id, source, seq, pairs, final, total, (dels, "
            "(deadlines, (outcomes)))]")
    dels = item[6] if len(item) >= 7 else []
    deadlines: dict[bytes, int] = {}
    outcomes = item[8] if len(item) == 9 else []
    if not isinstance(outcomes, list) or len(outcomes) % 3:
        raise ProtocolError("transfer batch outcomes must be [client, seq, outcome, ...]")
    if len(item) >= 8:
        flat = item[7]
        if (not isinstance(flat, list) or len(flat) % 2
                or not all(type(k) is bytes for k in flat[0::2])
                or not all(type(t) is int and 0 < t <= MAX_DEADLINE for t in flat[1::2])):
            raise ProtocolError("transfer batch deadlines must be [key, ms since the epoch, "
                                "...]")
        deadlines = dict(zip(flat[0::2], flat[1::2]))
    return item[0], item[1], item[2], item[3], item[4], item[5], dels, deadlines, outcomes


def _next_outcomes(unsent: list[Any]) -> tuple[list[Any], bool]:
    """The next batch's share of a table of outcomes (taken off ``unsent``), and
    whether it is the last."""
    chunk = unsent[: 3 * OUTCOMES_PER_BATCH]
    del unsent[: 3 * OUTCOMES_PER_BATCH]
    return chunk, not unsent


def _timed(pairs: list[bytes], expires: dict[bytes, int]) -> list[Any]:
    """The deadlines of a batch's keys, flat, for encode_batch."""
    return [x for key in pairs[0::2] if key in expires for x in (key, expires[key])]


@dataclass
class Outgoing:
    """One stream from this node to a destination: the keys, cut into batches."""

    move_id: str
    source: str
    dest: str
    scan: RangeScan
    batch_keys: int = 1000
    batch_bytes: int = 1 << 20
    rate: float | None = None  # keys per second
    started: float = 0.0
    pos: int = 0
    seq: int = 0
    sent_keys: int = 0
    sent_bytes: int = 0
    done: bool = False
    throttled: bool = False  # the rate limit holds the next batch back
    held: bytes | None = None  # a batch the socket would not take yet
    found: list[bytes] = field(default_factory=list)  # matched keys not yet sent
    matched: int = 0
    dels: list[bytes] = field(default_factory=list)  # deleted keys to send (a rollback)
    dels_total: int = 0
    outcomes: Any = None  # () -> the source's table of tagged writes, for the last batches
    expired_deletes: bool = False  # send expired keys as deletes (a rollback's stream)
    unsent_outcomes: list[Any] | None = None

    def next_batch(self, data: dict[bytes, bytes], now: float,
                   expires: dict[bytes, int] | None = None, now_ms: int = 0) -> bytes | None:
        """The next batch to send, or None (finished, throttled, or still scanning).
        ``expires``: the deadlines of keys that have one (due ones at ``now_ms`` are
        not sent)."""
        self.throttled = False
        if self.held is not None:
            batch, self.held = self.held, None
            return batch
        if self.done:
            return None
        limit = self.batch_keys
        if self.rate:
            allowed = int(self.rate * (now - self.started)) + 1 - self.sent_keys
            if allowed < min(limit, max(1, int(self.rate))):
                self.throttled = True
                return None
            limit = min(limit, allowed)
        while len(self.found) < limit and not self.scan.done:
            more = self.scan.step()
            self.matched += len(more)
            self.found.extend(more)
            if len(self.found) < limit and not self.scan.done:
                return None  # one scan step a call: let the node serve in between
        pairs: list[bytes] = []
        expired: list[bytes] = []
        size = 0
        taken = 0
        for key in self.found:
            if len(pairs) >= 2 * limit or size >= self.batch_bytes:
                break
            taken += 1
            value = data.get(key)
            if value is None:
                continue  # dropped or deleted since the scan found it
            if expires and expires.get(key, now_ms + 1) <= now_ms:
                if self.expired_deletes:  # the receiver's older copy must go too
                    expired.append(key)
                continue  # expired: never moved
            pairs.append(key)
            pairs.append(value)
            size += len(key) + len(value)
        del self.found[:taken]
        dels: list[bytes] = []
        room = limit - len(pairs) // 2
        if self.scan.done and not self.found and self.dels and room > 0:
            dels, self.dels = self.dels[:room], self.dels[room:]
        final = self.scan.done and not self.found and not self.dels
        outcomes = None
        if final and self.outcomes is not None:  # the keys are out: now the outcomes
            if self.unsent_outcomes is None:
                self.unsent_outcomes = self.outcomes()
            outcomes, final = _next_outcomes(self.unsent_outcomes)
        dels += expired
        self.sent_keys += len(pairs) // 2 + len(dels)
        self.sent_bytes += size + sum(len(k) for k in dels)
        batch = encode_batch(self.move_id, self.source, self.seq, pairs, final, self.sent_keys,
                             dels, _timed(pairs, expires) if expires else None, outcomes)
        self.seq += 1
        self.done = final
        return batch

    def status(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "total_keys": self.matched + self.dels_total if self.scan.done else None,
            "sent_keys": self.sent_keys,
            "sent_bytes": self.sent_bytes,
            "done": self.done and self.held is None,
        }


@dataclass
class Incoming:
    """What a destination has durably applied of one stream."""

    next_seq: int = 0
    keys: int = 0  # keys received
    taken: int = 0  # keys applied (not superseded by newer writes here)
    bytes: int = 0
    done: bool = False
    broken: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def accept(self, seq: int) -> bool:
        """Whether a batch with ``seq`` continues the stream (seq 0 restarts it)."""
        if seq == 0:
            self.next_seq, self.keys, self.taken, self.bytes = 0, 0, 0, 0
            self.done = self.broken = False
        if seq != self.next_seq:
            self.broken = True
            return False
        self.next_seq += 1
        return True

    def status(self) -> dict[str, Any]:
        return {"batches": self.next_seq, "keys": self.keys, "taken": self.taken,
                "bytes": self.bytes, "done": self.done, "broken": self.broken}


@dataclass
class SnapshotStream:
    """A backup's stream (XBACKUP): the node's keys as of one moment (a copy taken in
    one loop turn, so a prefix of its acknowledged writes), cut into batches like a
    move's, to the PULL socket of the ``zkv backup`` that asked."""

    backup_id: str
    source: str
    items: list[tuple[bytes, bytes]]
    deadlines: dict[bytes, int] = field(default_factory=dict)  # as of the copy
    outcomes: list[Any] = field(default_factory=list)  # zkv.core.once's table, as of the copy
    batch_keys: int = 1000
    batch_bytes: int = 1 << 20
    pos: int = 0
    seq: int = 0
    sent_keys: int = 0
    sent_bytes: int = 0
    done: bool = False
    throttled: bool = False
    held: bytes | None = None
    last_progress: float = 0.0
    dest: str = "backup"
    move_id: str = ""

    def next_batch(self, data: dict[bytes, bytes], now: float,
                   expires: dict[bytes, int] | None = None, now_ms: int = 0) -> bytes | None:
        if self.held is not None:
            batch, self.held = self.held, None
            return batch
        if self.done:
            return None
        pairs: list[bytes] = []
        size = 0
        items = self.items
        deadlines = self.deadlines
        while self.pos < len(items) and len(pairs) < 2 * self.batch_keys \
                and size < self.batch_bytes:
            key, value = items[self.pos]
            self.pos += 1
            if deadlines and deadlines.get(key, now_ms + 1) <= now_ms:
                continue  # expired: not copied
            pairs.append(key)
            pairs.append(value)
            size += len(key) + len(value)
        final = self.pos >= len(items)
        outcomes = None
        if final and self.outcomes:
            outcomes, final = _next_outcomes(self.outcomes)
        self.sent_keys += len(pairs) // 2
        self.sent_bytes += size
        batch = encode_batch(self.backup_id, self.source, self.seq, pairs, final,
                             self.sent_keys, None,
                             _timed(pairs, deadlines) if deadlines else None, outcomes)
        self.seq += 1
        self.done = final
        if final:
            self.items = []  # the copy is not needed any more
        return batch

    def status(self) -> dict[str, Any]:
        return {"dest": self.dest, "total_keys": self.sent_keys if self.done else None,
                "sent_keys": self.sent_keys, "sent_bytes": self.sent_bytes,
                "done": self.done and self.held is None}
