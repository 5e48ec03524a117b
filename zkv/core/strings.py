"""Redis's string commands on a :class:`~zkv.core.keyspace.Keyspace`: SET with its
options, expiry, counters and the rest. No I/O, no clock.

Every function takes the keyspace, the command's checked arguments (zkv.core.protocol)
and ``now``, the node's time for this turn in milliseconds since the Unix epoch;
it changes the keyspace and returns ``(reply, records)``: the reply as Redis gives
it and the log records to append (b"" when nothing changed). A key whose deadline
has passed is absent to every command, so a write never brings one back. Relative
times (EX, PX, EXPIRE) become absolute deadlines here, on the node that applies
the write, and only absolute deadlines are logged, moved and replicated.

Replies and errors follow Redis: SET answers "OK" or None (with GET: the old
value); TTL answers -2 for a missing key and -1 for one without a deadline;
counters are signed 64-bit integers stored as decimal text.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import CommandError, LimitExceeded
from .expiry import MAX_DEADLINE
from .keyspace import Keyspace

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_INTEGER = re.compile(rb"-?(0|[1-9][0-9]{0,18})")
NOT_INTEGER = "value is not an integer or out of range"

# The expiry options of SET and GETEX, and the unit of each (ms per unit; None for
# an absolute time).
EXPIRY_OPTIONS = ("ex", "px", "exat", "pxat")


def parse_int(value: bytes) -> int | None:
    """A value as Redis reads a counter (decimal, no sign but '-', no leading zeros,
    within 64 bits), or None."""
    if len(value) > 20 or not _INTEGER.fullmatch(value) or value == b"-0":
        return None
    n = int(value)
    return n if INT64_MIN <= n <= INT64_MAX else None


def absolute(option: str, amount: int, now: int) -> int:
    """The absolute deadline (ms) an expiry option (ex, px, exat, pxat) names."""
    if option == "ex":
        return now + amount * 1000
    if option == "px":
        return now + amount
    if option == "exat":
        return amount * 1000
    return amount


def _at(option: str, amount: int, now: int, command: str) -> int:
    """The absolute deadline an expiry option names; an error past what a log holds."""
    when = absolute(option, amount, now)
    if not -MAX_DEADLINE <= when <= MAX_DEADLINE:
        raise CommandError(f"invalid expire time in '{command}' command")
    return when


def _expiry(opts: dict[str, Any], now: int, command: str) -> int | None:
    for option in EXPIRY_OPTIONS:
        if option in opts:
            return _at(option, opts[option], now, command)
    return None


def set_(ks: Keyspace, key: bytes, value: bytes, opts: dict[str, Any],
         now: int) -> tuple[Any, bytes]:
    """SET key value [EX|PX|EXAT|PXAT|KEEPTTL] [NX|XX|IFEQ old] [GET]."""
    deadline = _expiry(opts, now, "set")
    old = ks.get(key, now)
    if ("nx" in opts and old is not None) or ("xx" in opts and old is None) \
            or ("ifeq" in opts and old != opts["ifeq"]):
        return (old if "get" in opts else None), b""
    if "keepttl" in opts and old is not None:
        deadline = ks.deadline(key)
    if deadline is not None and deadline <= now:  # already due: as if set, then expired
        _, record = ks.delete(key)
        return (old if "get" in opts else "OK"), record or b""
    record = ks.set(key, value, deadline)
    return (old if "get" in opts else "OK"), record


def getex(ks: Keyspace, key: bytes, opts: dict[str, Any], now: int) -> tuple[Any, bytes]:
    """GETEX key [EX|PX|EXAT|PXAT|PERSIST]: the value, with a new deadline (or none)."""
    value = ks.get(key, now)
    if value is None:
        return None, b""
    if "persist" in opts:
        if ks.deadline(key) is None:
            return value, b""
        return value, ks.set_deadline(key, None)
    deadline = _expiry(opts, now, "getex")
    if deadline is None:
        return value, b""
    if deadline <= now:
        _, record = ks.delete(key)
        return value, record or b""
    return value, ks.set_deadline(key, deadline)


EXPIRE_UNITS = {"EXPIRE": "ex", "PEXPIRE": "px", "EXPIREAT": "exat", "PEXPIREAT": "pxat"}


def expire(ks: Keyspace, command: str, key: bytes, amount: int, flag: str | None,
           now: int) -> tuple[int, bytes]:
    """EXPIRE, PEXPIRE, EXPIREAT, PEXPIREAT key time [NX|XX|GT|LT|XX GT|XX LT]: 1 if the
    deadline was set (or the key deleted, for a time already past), 0 if not."""
    deadline = _at(EXPIRE_UNITS[command], amount, now, command.lower())
    if ks.get(key, now) is None:
        return 0, b""
    current = ks.deadline(key)
    if flag == "NX" and current is not None or flag is not None and flag[:2] == "XX" \
            and current is None:
        return 0, b""
    if flag is not None and flag[:3] == "XX ":
        flag = flag[3:]  # (XX GT, XX LT: it has a deadline; now as GT or LT)
    # GT and LT compare with the current deadline; no deadline counts as forever
    if flag == "GT" and (current is None or deadline <= current):
        return 0, b""
    if flag == "LT" and current is not None and deadline >= current:
        return 0, b""
    if deadline <= now:
        _, record = ks.delete(key)
        return 1, record or b""
    return 1, ks.set_deadline(key, deadline)


def ttl(ks: Keyspace, key: bytes, now: int, ms: bool) -> int:
    """TTL (seconds, rounded) or PTTL: -2 if the key is missing, -1 if it has no
    deadline."""
    if ks.get(key, now) is None:
        return -2
    deadline = ks.deadline(key)
    if deadline is None:
        return -1
    left = max(0, deadline - now)
    return left if ms else (left + 500) // 1000


def expiretime(ks: Keyspace, key: bytes, now: int, ms: bool) -> int:
    """EXPIRETIME (seconds) or PEXPIRETIME: the absolute deadline, -2 or -1 as TTL."""
    if ks.get(key, now) is None:
        return -2
    deadline = ks.deadline(key)
    if deadline is None:
        return -1
    return deadline if ms else deadline // 1000


def persist(ks: Keyspace, key: bytes, now: int) -> tuple[int, bytes]:
    """PERSIST key: 1 if a deadline was taken away, 0 if there was none (or no key)."""
    if ks.get(key, now) is None or ks.deadline(key) is None:
        return 0, b""
    return 1, ks.set_deadline(key, None)


def incrby(ks: Keyspace, key: bytes, delta: int, now: int) -> tuple[int, bytes]:
    """INCR, INCRBY, DECR, DECRBY: the new value. The key keeps its deadline."""
    old = ks.get(key, now)
    current = 0
    if old is not None:
        parsed = parse_int(old)
        if parsed is None:
            raise CommandError(NOT_INTEGER)
        current = parsed
    new = current + delta
    if not INT64_MIN <= new <= INT64_MAX:
        raise CommandError("increment or decrement would overflow")
    deadline = ks.deadline(key) if old is not None else None
    return new, ks.set(key, str(new).encode(), deadline)


def decrby(ks: Keyspace, key: bytes, amount: int, now: int) -> tuple[int, bytes]:
    """DECRBY: INCRBY of -amount; of -2**63 (whose negation is no 64-bit integer) it is
    refused whatever the value, as Redis refuses it."""
    if amount == INT64_MIN:
        raise CommandError("decrement would overflow")
    return incrby(ks, key, -amount, now)


def getset(ks: Keyspace, key: bytes, value: bytes, now: int) -> tuple[Any, bytes]:
    """GETSET key value: the old value; the key's deadline goes."""
    old = ks.get(key, now)
    return old, ks.set(key, value)


def getdel(ks: Keyspace, key: bytes, now: int) -> tuple[Any, bytes]:
    value = ks.get(key, now)
    if value is None:
        return None, b""
    _, record = ks.delete(key)
    return value, record or b""


def append(ks: Keyspace, key: bytes, value: bytes, now: int,
           max_value: int) -> tuple[int, bytes]:
    """APPEND key value: the new length. The key keeps its deadline."""
    old = ks.get(key, now)
    size = len(value) + (len(old) if old is not None else 0)
    if size > max_value:
        raise LimitExceeded(f"string exceeds maximum allowed size ({max_value} bytes, "
                            "max_value_bytes)")
    if old is None:  # (missing, or past its deadline: a new key, with no deadline)
        return size, ks.set(key, value)
    return size, ks.append(key, value)  # (logs the suffix, not the whole value again)


def strlen(ks: Keyspace, key: bytes, now: int) -> int:
    value = ks.get(key, now)
    return 0 if value is None else len(value)


def setnx(ks: Keyspace, key: bytes, value: bytes, now: int) -> tuple[int, bytes]:
    if ks.get(key, now) is not None:
        return 0, b""
    return 1, ks.set(key, value)


def msetnx(ks: Keyspace, pairs: list[bytes], now: int) -> tuple[int, bytes]:
    """MSETNX key value ...: 1 and every key set if none of them exists, else 0."""
    if any(ks.get(k, now) is not None for k in pairs[0::2]):
        return 0, b""
    return 1, ks.mset(pairs)
