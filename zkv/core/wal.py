"""The write-ahead log record codec: items in, bytes out; bytes in, items out. No I/O.

A log (and a snapshot) is a sequence of records::

    record = length: u32 little-endian | crc32(payload): u32 little-endian | payload
    payload = one CBOR item (never empty)

:func:`encode` frames one item. :class:`LogScan` walks a buffer and yields
``(offset, item)`` for every whole record; when it stops early it says why in
:attr:`LogScan.damage`:

* a *torn tail*: the buffer ends inside a record, or the last record is bad and
  nothing valid follows it. A crash mid-append leaves exactly this; the reader
  cuts it off.
* *corruption*: a bad record with at least one valid record after it. That is
  not what a crash leaves, so the caller must refuse to go on (or repair on an
  explicit request).

Opening, truncating and renaming files is the storage layer's business.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cbor2

HEADER = struct.Struct("<II")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 30

# Record kinds (the first element of every payload array).
SET, DEL, MSET, CHUNK, META, TOMBS, DROP = 0, 1, 2, 3, 4, 5, 6
# PXAT [key, deadline, ...]: set deadlines (ms since the epoch; 0 takes one away).
# DELS [key, ...]: keys deleted by expiry (a delete, as DEL is).
PXAT, DELS = 7, 8
# ONCE client seq outcome records: a write tagged for safe retries (zkv.core.once), its
# records (framed, as bytes) and its outcome, in one record so that both stay or go.
# ONCES [client, seq, outcome, ...]: outcomes remembered (snapshots, moves).
ONCE, ONCES = 9, 10
# ONCERUN client [seq, ...] outcome records: a run of writes (a pipeline's SETs) whose
# tagged ones, all of one client, had one outcome; one record, as ONCE is.
ONCERUN = 11
# ATOMIC records: an atomic pipeline's records (framed, as bytes; RESP's MULTI/EXEC), in
# one record so that a torn tail takes all of them or none.
ATOMIC = 12
# APPEND key suffix: the key's value grows by suffix, its deadline as it was (a missing
# key is the suffix alone, as APPEND makes it).
APPEND = 13


def encode(item: Any) -> bytes:
    """Frame one CBOR item as a log record."""
    payload = cbor2.dumps(item)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_payload(payload: bytes) -> bytes:
    """Frame an already CBOR-encoded payload."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class Damage:
    """Where and why a scan stopped before the end of its buffer."""

    offset: int
    reason: str
    corrupt: bool  # True: valid records follow the bad one

    @property
    def kind(self) -> str:
        return "corruption" if self.corrupt else "torn tail"


@dataclass
class Work:
    """Bytes checksummed while looking for records after damage (see :func:`resync`)."""

    crc_bytes: int = 0


def _plausible(buf: bytes | memoryview, body: int, end: int) -> bool:
    """Whether a payload starts as every record does: an array of 2 to 8 items whose
    first is a small record kind. Checked before a checksum, so that random bytes
    seldom cost one."""
    return end - body >= 2 and 0x82 <= buf[body] <= 0x88 and buf[body + 1] < 0x18


def _check(buf: bytes | memoryview, off: int, end: int,
           work: Work | None = None) -> tuple[int, str]:
    """Length of the valid record at ``off`` (header included), or 0 and why not."""
    if end - off < HEADER_SIZE:
        return 0, f"incomplete header ({end - off} of {HEADER_SIZE} bytes)"
    length, crc = HEADER.unpack_from(buf, off)
    if length == 0 or length > MAX_PAYLOAD:
        return 0, f"impossible record length {length}"
    stop = off + HEADER_SIZE + length
    if stop > end:
        return 0, f"record of {length} bytes runs past the end ({end - off - HEADER_SIZE} left)"
    if not _plausible(buf, off + HEADER_SIZE, stop):
        return 0, "payload is not a record"
    if work is not None:
        work.crc_bytes += length
    if zlib.crc32(buf[off + HEADER_SIZE : stop]) != crc:
        return 0, "checksum mismatch"
    return HEADER_SIZE + length, ""


def _chain(buf: bytes | memoryview, start: int, end: int) -> tuple[int, int]:
    """Walk valid records from ``start``: (offset where the chain stops, records walked)."""
    off, count = start, 0
    while off < end:
        size, _ = _check(buf, off, end)
        if not size:
            break
        try:
            cbor2.loads(buf[off + HEADER_SIZE : off + size])
        except Exception:
            break
        off += size
        count += 1
    return off, count


# A chain of this many valid records after a bad one is taken as proof of corruption
# even when it does not reach the end of the buffer (a second, torn, record may end it).
CORRUPTION_CHAIN = 8


def resync(buf: bytes | memoryview, start: int, end: int | None = None,
           work: Work | None = None) -> int | None:
    """Offset of the first record after ``start`` that begins a run of valid records
    reaching the end of the buffer (or of CORRUPTION_CHAIN records), or None.

    Requiring a run, not one lucky record, keeps a value that happens to contain
    record-like bytes from making a torn tail look like corruption.

    The search is linear in the buffer: a candidate must look like a record before it
    is checksummed, and the bytes checksummed are capped at a few times the buffer. A
    search that reaches the cap stops and answers ``end``: it could not rule out valid
    records after the damage, so the damage is treated as corruption (refused, never
    cut as a torn tail).
    """
    end = len(buf) if end is None else end
    work = work if work is not None else Work()
    cap = RESYNC_WORK * (end - start) + (1 << 20)
    # Candidates are found by the regex engine (a record's payload starts with an array
    # head and a small kind), not by a Python loop over every offset.
    for match in _RECORD_HEAD.finditer(buf, start + HEADER_SIZE, end):
        off = match.start() - HEADER_SIZE
        if _check(buf, off, end, work)[0]:
            stop, count = _chain(buf, off, end)
            if count and (stop == end or count >= CORRUPTION_CHAIN):
                return off
        if work.crc_bytes > cap:
            return end
    return None


_RECORD_HEAD = re.compile(rb"[\x82-\x88][\x00-\x17]", re.DOTALL)


RESYNC_WORK = 3  # bytes checksummed per byte searched before resync gives up


class LogScan:
    """Iterate the records of one buffer; afterwards ``end`` and ``damage`` say how it ended.

    ``end`` is the offset just past the last whole record yielded.
    """

    def __init__(self, buf: bytes | memoryview, start: int = 0) -> None:
        self.buf = buf
        self.start = start
        self.end = start
        self.damage: Damage | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        buf, n = self.buf, len(self.buf)
        off = self.start
        unpack, crc32, loads = HEADER.unpack_from, zlib.crc32, cbor2.loads
        mv = memoryview(buf)
        while off < n:
            if n - off >= HEADER_SIZE:
                length, crc = unpack(buf, off)
                stop = off + HEADER_SIZE + length
                if 0 < length <= MAX_PAYLOAD and stop <= n:
                    payload = mv[off + HEADER_SIZE : stop]
                    if crc32(payload) == crc:
                        try:
                            item = loads(payload)
                        except Exception:
                            item = _BAD
                        if item is not _BAD:
                            yield off, item
                            off = stop
                            self.end = off
                            continue
            self.damage = self._classify(off, n)
            return

    def _classify(self, off: int, n: int) -> Damage:
        buf = self.buf
        size, reason = _check(buf, off, n)
        if size:  # a whole frame around bad CBOR: anything valid starts after it
            return Damage(off, "payload is not valid CBOR", resync(buf, off + size, n) is not None)
        if n - off < HEADER_SIZE:
            return Damage(off, reason, corrupt=False)
        length, crc = HEADER.unpack_from(buf, off)
        body = off + HEADER_SIZE
        item = _item_length(buf, body, n)
        if item is not None and item == length:
            # The frame is consistent (a bad byte in the payload or the checksum):
            # records inside it are its own data, not evidence; look after it.
            after = body + length
        elif item is not None and zlib.crc32(buf[body : body + item]) == crc:
            reason = f"damaged record length {length} (its payload is {item} bytes)"
            after = body + item
        elif 0 < length <= MAX_PAYLOAD and body + length > n:
            # A sane header whose record the buffer ends inside: what a crash
            # mid-append leaves. Whole records inside it belong to its value.
            return Damage(off, reason, corrupt=False)
        else:
            after = off + 1
        return Damage(off, reason, corrupt=resync(buf, after, n) is not None)


def _item_length(buf: bytes | memoryview, start: int, end: int) -> int | None:
    """Length of the one CBOR item that starts at ``start``, or None if there is none."""
    stream = io.BytesIO(buf[start : min(end, start + MAX_PAYLOAD)])
    try:
        cbor2.CBORDecoder(stream).decode()
    except Exception:
        return None
    return stream.tell()


_BAD = object()
