"""RESP, the Redis protocol, for the proxy's second front. Pure: no sockets, no clock.

Bytes in, commands out; results in, bytes out (the way h11 does HTTP)::

    reader = RespReader(limits)
    for args in reader.feed(data):          # a list of bytes per command
        plan = plan_command(session, args, ctx)
    plan.shape(result_or_error, session)    # -> the reply's bytes

Parsing is hiredis's C reader (``hiredis.Reader``, the parser redis-py uses). hiredis
builds a whole command before handing it over, so what it is fed is first bounded
here by a walk over the headers only (never the payloads): a command is an array of
at most ``max_args`` bulk strings, each at most ``max_bulk`` bytes, the whole at most
``max_request`` bytes; anything else is a protocol error, after which the connection
closes, as Redis does. Inline commands (a line of words, what telnet sends) are split
here the way Redis splits them.

:func:`plan_command` turns a command into what the shell does with it: a reply at
once (PING, HELLO, CLIENT, ...), a zkv request for the routing core with the shape
its reply takes on RESP, or a request for the proxy's own views (INFO, DBSIZE) or an
admin step (FLUSHALL). zkv errors map to Redis's conventions (:func:`error_reply`).
"""

from __future__ import annotations

import collections
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis

from .. import __version__
from ..errors import (
    CommandError,
    LimitExceeded,
    ProtocolError,
    ZkvError,
)
from . import protocol as P

# What zkv tells clients it is compatible with (redis-py and redis-cli look at it).
REDIS_VERSION = "7.0.0"
MAX_INLINE = 64 * 1024  # Redis's PROTO_INLINE_MAX_SIZE
_HEADER_MAX = 24  # "*" or "$", up to 20 digits, CRLF
CURSORS = 65536  # SCAN cursors remembered per proxy (an unknown one: ERR invalid cursor)
CLIENT_INFO_MAX = 128  # bytes of a CLIENT SETINFO value (a library's name or version)
PER_OWNER = 64  # of them, the newest a connection made that no other can push out


class RespProtocolError(ProtocolError):
    """The peer sent bytes that are not RESP: answered, then the connection closes."""


# -- reading -----------------------------------------------------------------------------
class RespReader:
    """One connection's bytes in, its commands out, in order."""

    __slots__ = ("_buf", "_hi", "_left", "_scan", "_start", "failed", "max_args", "max_bulk",
                 "max_request")

    def __init__(self, max_args: int, max_bulk: int, max_request: int) -> None:
        self.max_args, self.max_bulk, self.max_request = max_args, max_bulk, max_request
        self._buf = bytearray()
        self._start = 0  # where the command being read begins in _buf
        self._scan = 0  # the next header to read
        self._left = -1  # bulk strings still to come in this command; -1: none begun
        self._hi = hiredis.Reader()
        # bad bytes after good commands: those are returned, this is raised next time
        self.failed: RespProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet made into commands."""
        return len(self._buf) - self._start

    def feed(self, data: bytes, limit: int = 1 << 30) -> list[list[bytes]]:
        """Take ``data``; return the commands now complete (at most ``limit``: the rest
        stay buffered until the next call). Raises RespProtocolError when the bytes go
        wrong before any command; after some, they come back first (see ``failed``)."""
        if self.failed is not None:
            raise self.failed
        if data:
            self._buf += data
        out: list[list[bytes]] = []
        try:
            self._parse(out, limit)
        except RespProtocolError as exc:
            if not out:
                raise
            self.failed = exc
        return out

    def _parse(self, out: list[list[bytes]], limit: int) -> None:
        """Walk the headers of the commands buffered (never their payloads), hand each
        run of whole commands to hiredis at once, and keep where a command begun ends
        for the next call. One tight loop: this is per command on the hot path."""
        buf, find = self._buf, self._buf.find
        size = len(buf)
        start, scan, left = self._start, self._scan, self._left
        run = start  # where the whole commands not yet given to hiredis begin
        whole = 0  # how many of them
        max_bulk, max_request = self.max_bulk, self.max_request
        try:
            while len(out) + whole < limit and start < size:
                if left < 0:
                    if buf[start] != 0x2A:  # not "*": an inline command
                        if whole:
                            self._give(out, run, start, whole)
                            whole = 0
                        self._start = start
                        args = self._inline()
                        if args is None:
                            break
                        start = scan = run = self._start
                        if args:
                            out.append(args)
                        continue
                    nl = find(b"\r\n", start, start + _HEADER_MAX)
                    if nl < 0:
                        if size - start >= _HEADER_MAX:
                            raise RespProtocolError("Protocol error: invalid multibulk length")
                        break
                    left = _count(buf, start + 1, nl, "multibulk")
                    if left > self.max_args:
                        raise RespProtocolError(
                            f"Protocol error: invalid multibulk length ({left} arguments; at "
                            f"most {self.max_args})")
                    scan = nl + 2
                    if left <= 0:  # "*0" or "*-1": nothing to do, as Redis
                        if whole:
                            self._give(out, run, start, whole)
                            whole = 0
                        start = run = scan
                        left = -1
                        continue
                while left > 0:
                    if scan >= size:
                        break
                    if buf[scan] != 0x24:  # "$"
                        raise RespProtocolError(
                            f"Protocol error: expected '$', got '{chr(buf[scan])}'")
                    nl = find(b"\r\n", scan, scan + _HEADER_MAX)
                    if nl < 0:
                        if size - scan >= _HEADER_MAX:
                            raise RespProtocolError("Protocol error: invalid bulk length")
                        break
                    n = _count(buf, scan + 1, nl, "bulk")
                    if not 0 <= n <= max_bulk:
                        raise RespProtocolError(
                            f"Protocol error: invalid bulk length ({n} bytes; at most "
                            f"{max_bulk})")
                    end = nl + n + 4
                    if end - start > max_request:
                        raise RespProtocolError(
                            f"Protocol error: request of more than {max_request} bytes")
                    if end > size:
                        break
                    if buf[end - 2] != 13 or buf[end - 1] != 10:
                        raise RespProtocolError("Protocol error: bulk string not ended by CRLF")
                    scan = end
                    left -= 1
                if left > 0:
                    break
                whole += 1
                start = scan
                left = -1
        finally:
            if whole:
                self._give(out, run, start, whole)
            self._start, self._scan, self._left = start, scan, left
        if start > 65536 and start * 2 > len(buf):
            del buf[:start]
            self._scan -= start
            self._start = 0

    def _give(self, out: list[list[bytes]], begin: int, end: int, count: int) -> None:
        """Whole, checked commands to hiredis, and what it makes of them to ``out``."""
        hi = self._hi
        try:
            hi.feed(self._buf, begin, end - begin)  # type: ignore[arg-type]
            for _ in range(count):
                command = hi.gets()
                if not isinstance(command, list):
                    raise RespProtocolError("Protocol error: unreadable request")
                out.append(command)
        except hiredis.ProtocolError as exc:  # what the header walk let through
            self._hi = hiredis.Reader()
            raise RespProtocolError(f"Protocol error: {exc}") from None

    def _inline(self) -> list[bytes] | None:
        buf = self._buf
        nl = buf.find(b"\n", self._start)
        if nl < 0:
            if len(buf) - self._start > MAX_INLINE:
                raise RespProtocolError("Protocol error: too big inline request")
            return None
        if nl - self._start > MAX_INLINE:
            raise RespProtocolError("Protocol error: too big inline request")
        line = bytes(buf[self._start : nl]).rstrip(b"\r")
        self._start = self._scan = nl + 1
        args = split_inline(line)
        if len(args) > self.max_args:
            raise RespProtocolError("Protocol error: too many arguments")
        return args


def _count(buf: bytearray, begin: int, end: int, what: str) -> int:
    """The integer of a "*N" or "$N" header: plain ASCII digits (or -1), nothing else,
    exactly what hiredis accepts (int() would take "+1", " 1", "01", "1_0")."""
    text = bytes(buf[begin:end])
    if text == b"-1" or what == "multibulk" and text[:1] == b"-" and text[1:].isdigit() \
            and len(text) < 21:
        return -1  # (Redis takes any negative multibulk count for no command)
    if not text or not text.isdigit() or (len(text) > 1 and text[0] == 0x30) \
            or len(text) > 19:
        raise RespProtocolError(f"Protocol error: invalid {what} length")
    return int(text)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b",
            ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes]:
    """Words of an inline command, as Redis splits them (sdssplitargs): spaces
    separate, "double quotes" take \\n \\r \\t \\b \\a \\\\ \\" and \\xHH escapes,
    'single quotes' take \\'. A closing quote must end the word."""
    out: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\r\n\v\f":
            i += 1
        if i >= n:
            return out
        word = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise RespProtocolError("Protocol error: unbalanced quotes in request")
                break
            c = line[i]
            if quote == 0x22:  # "
                if c == 0x5C and i + 3 < n and line[i + 1] == 0x78 \
                        and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    word.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 0x5C and i + 1 < n:
                    i += 1
                    word += _ESCAPES.get(line[i], bytes((line[i],)))
                elif c == 0x22:
                    if i + 1 < n and line[i + 1] not in b" \t\r\n\v\f":
                        raise RespProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    word.append(c)
            elif quote == 0x27:  # '
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    i += 1
                    word.append(0x27)
                elif c == 0x27:
                    if i + 1 < n and line[i + 1] not in b" \t\r\n\v\f":
                        raise RespProtocolError("Protocol error: unbalanced quotes in request")
                    i += 1
                    break
                else:
                    word.append(c)
            elif c in b" \t\r\n\v\f":
                break
            elif c in (0x22, 0x27):
                quote = c
            else:
                word.append(c)
            i += 1
        out.append(bytes(word))


# -- writing ------------------------------------------------------------------------------
OK = b"+OK\r\n"
PONG = b"+PONG\r\n"


def simple(text: str) -> bytes:
    return b"+" + _one_line(text).encode() + b"\r\n"


def error(text: str) -> bytes:
    return b"-" + _one_line(text).encode("utf-8", "replace") + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes | None, proto: int = 2) -> bytes:
    if value is None:
        return b"_\r\n" if proto == 3 else b"$-1\r\n"
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(items: list[bytes]) -> bytes:
    """An array of already-encoded items."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def bulks(values: list[bytes | None], proto: int = 2) -> bytes:
    return array([bulk(v, proto) for v in values])


def mapping(pairs: list[tuple[bytes, bytes]], proto: int) -> bytes:
    """A map of already-encoded keys and values (a flat array in RESP2)."""
    flat = b"".join(k + v for k, v in pairs)
    if proto == 3:
        return b"%%%d\r\n" % len(pairs) + flat
    return b"*%d\r\n" % (2 * len(pairs)) + flat


def value(obj: Any, proto: int) -> bytes:
    """Plain Python data (str, bytes, int, None, list, dict) as RESP."""
    if obj is None:
        return bulk(None, proto)
    if isinstance(obj, bool):
        return integer(int(obj))
    if isinstance(obj, int):
        return integer(obj)
    if isinstance(obj, str):
        return bulk(obj.encode())
    if isinstance(obj, bytes):
        return bulk(obj)
    if isinstance(obj, dict):
        return mapping([(value(k, proto), value(v, proto)) for k, v in obj.items()], proto)
    if isinstance(obj, (list, tuple)):
        return array([value(x, proto) for x in obj])
    return bulk(str(obj).encode())


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


# zkv error codes as Redis clients know them (the first word of an error is its kind)
_PREFIX = {
    "UNAVAILABLE": "TRYAGAIN",  # retry soon: a move's rollback, a configuration on its way
    "BEHIND": "TRYAGAIN",
    "STALE_EPOCH": "TRYAGAIN",
    "MOVED": "TRYAGAIN",
    "NODE_DOWN": "CLUSTERDOWN",  # as Redis Cluster says of a slot nobody serves
    "TIMEOUT": "TIMEOUT",
    "STORAGE": "MISCONF",  # Redis's word for "cannot persist"
    "NOAUTH": "NOAUTH",
    "NOPERM": "NOPERM",
    "CROSS_NODE": "CROSSSLOT",  # Redis Cluster's word for keys that are not together
}


def error_reply(exc: ZkvError) -> bytes:
    return error(f"{_PREFIX.get(exc.code, 'ERR')} {exc.message}")


# -- sessions and commands ---------------------------------------------------------------
@dataclass
class Session:
    """What RESP keeps per connection."""

    id: int
    proto: int = 2
    name: bytes | None = None
    lib_name: bytes = b""
    lib_ver: bytes = b""
    authed: bool = False  # AUTH (or HELLO ... AUTH) succeeded: only asked with a password
    multi: list[Any] | None = None  # after MULTI: the commands queued (zkv.core.resptxn)
    multi_failed: bool = False  # a command queued after MULTI was refused: EXEC aborts
    multi_bytes: int = 0  # what the commands queued weigh (bounded by max_message_bytes)
    multi_items: int = 0  # the one-key commands they make (bounded by max_batch)


class Cursors:
    """SCAN cursors as the integers RESP clients expect (they parse them with int()):
    zkv's own cursors (text naming the ring, the node and its bucket) are remembered
    here under numbers, CURSORS in all. Each connection keeps at most PER_OWNER, its
    newest (a pooled client's next SCAN may come on another connection: any connection
    may use any number). Past CURSORS, what goes first is a closed connection's
    (oldest first), then the oldest of a connection holding the most: so no client's
    scans, nor many connections' made one after another, can push out the cursor of a
    connection that holds fewer, as long as fewer than CURSORS connections scan."""

    def __init__(self, size: int = CURSORS, per_owner: int = PER_OWNER) -> None:
        self.size, self.per_owner = size, per_owner
        self._next = 1
        self._by_number: dict[int, tuple[int, str]] = {}
        self._owned: dict[int, collections.deque[int]] = {}
        # the live owners by how many cursors each holds (1..per_owner): who gives first
        self._by_count: list[dict[int, None]] = [{} for _ in range(per_owner + 1)]
        self._orphans: collections.OrderedDict[int, None] = collections.OrderedDict()

    def number(self, cursor: str, owner: int = 0) -> int:
        if cursor == "0":
            return 0
        n = self._next
        self._next += 1
        self._by_number[n] = (owner, cursor)
        mine = self._owned.setdefault(owner, collections.deque())
        before = len(mine)
        mine.append(n)
        if len(mine) > self.per_owner:
            self._by_number.pop(mine.popleft(), None)
        self._recount(owner, before, len(mine))
        while len(self._by_number) > self.size:
            self._evict()
        return n

    def _recount(self, owner: int, before: int, after: int) -> None:
        if before != after:
            if before:
                self._by_count[before].pop(owner, None)
            if after:
                self._by_count[after][owner] = None

    def _evict(self) -> None:
        if self._orphans:
            old, _ = self._orphans.popitem(last=False)
            self._by_number.pop(old, None)
            return
        for count in range(self.per_owner, 0, -1):
            if self._by_count[count]:
                owner = next(iter(self._by_count[count]))
                mine = self._owned[owner]
                self._by_number.pop(mine.popleft(), None)
                self._recount(owner, count, count - 1)
                if not mine:
                    del self._owned[owner]
                return
        self._by_number.pop(next(iter(self._by_number)))  # (not reached: all are owned)

    def forget_owner(self, owner: int) -> None:
        """A connection closed: its cursors stay usable (from another connection) until
        room is needed, when they are the first to go."""
        mine = self._owned.pop(owner, None)
        if mine:
            self._by_count[len(mine)].pop(owner, None)
            for n in mine:
                if n in self._by_number:
                    self._orphans[n] = None

    def cursor(self, text: bytes) -> str:
        if not text.isdigit() or len(text) > 20:
            raise CommandError("invalid cursor")
        n = int(text)
        if n == 0:
            return "0"
        entry = self._by_number.get(n)
        if entry is None:
            raise CommandError(
                "invalid cursor (unknown to this proxy, or too old: start again from 0)")
        return entry[1]


Shape = Callable[[Any, Session], bytes]


@dataclass
class Reply:
    """Answer now (and close the connection after, for QUIT and protocol errors)."""

    data: bytes
    close: bool = False


@dataclass
class Forward:
    """A zkv request for the routing core; ``shape`` makes its result (or ZkvError) RESP;
    ``body``: its encoding, where made here."""

    op: str
    args: list[Any]
    shape: Shape
    body: bytes | None = None


@dataclass
class Local:
    """A request for the proxy itself: ``what`` is INFO, DBSIZE or FLUSHALL; ``shape``
    gets what the shell gathered (or a ZkvError)."""

    what: str
    shape: Shape
    arg: Any = None


Plan = Reply | Forward | Local


@dataclass
class Context:
    """What planning needs from the proxy besides the command."""

    limits: P.Limits
    cursors: Cursors
    admin: bool = False  # admin commands (FLUSHALL) allowed on this front
    password: str | None = None  # AUTH needed before anything else (Redis's requirepass)
    now: float = 0.0  # wall-clock seconds (TIME)
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    name: str
    arity: int  # Redis's convention: exactly N words, or at least -N
    flags: tuple[str, ...]
    first_key: int
    last_key: int
    step: int
    group: str
    summary: str
    arguments: tuple[tuple[str, str, str], ...] = ()  # (name, type, flags) for COMMAND DOCS


_K, _S, _I = "key", "string", "integer"
SPECS: dict[bytes, Spec] = {
    s.name.encode(): s
    for s in (
        Spec("get", 2, ("readonly", "fast"), 1, 1, 1, "string",
             "Returns the string value of a key.", (("key", _K, ""),)),
        Spec("set", -3, ("write",), 1, 1, 1, "string",
             "Sets the string value of a key, with an optional deadline and condition.",
             (("key", _K, ""), ("value", _S, ""),
              ("EX s|PX ms|EXAT ts|PXAT ms|KEEPTTL NX|XX|IFEQ old GET", _S,
               "optional multiple"))),
        Spec("setnx", 3, ("write", "fast"), 1, 1, 1, "string",
             "Set the string value of a key only when the key doesn't exist.",
             (("key", _K, ""), ("value", _S, ""))),
        Spec("setex", 4, ("write",), 1, 1, 1, "string",
             "Sets the string value and expiration time (seconds) of a key.",
             (("key", _K, ""), ("seconds", _I, ""), ("value", _S, ""))),
        Spec("psetex", 4, ("write",), 1, 1, 1, "string",
             "Sets the string value and expiration time (milliseconds) of a key.",
             (("key", _K, ""), ("milliseconds", _I, ""), ("value", _S, ""))),
        Spec("getset", 3, ("write", "fast"), 1, 1, 1, "string",
             "Returns the previous string value of a key after setting it to a new value.",
             (("key", _K, ""), ("value", _S, ""))),
        Spec("getdel", 2, ("write", "fast"), 1, 1, 1, "string",
             "Returns the string value of a key after deleting the key.", (("key", _K, ""),)),
        Spec("getex", -2, ("write", "fast"), 1, 1, 1, "string",
             "Returns the string value of a key after setting its expiration time.",
             (("key", _K, ""), ("EX s|PX ms|EXAT ts|PXAT ms|PERSIST", _S, "optional"))),
        Spec("append", 3, ("write", "fast"), 1, 1, 1, "string",
             "Appends a string to the value of a key; creates the key if needed.",
             (("key", _K, ""), ("value", _S, ""))),
        Spec("strlen", 2, ("readonly", "fast"), 1, 1, 1, "string",
             "Returns the length of a string value.", (("key", _K, ""),)),
        Spec("incr", 2, ("write", "fast"), 1, 1, 1, "string",
             "Increments the integer value of a key by one.", (("key", _K, ""),)),
        Spec("decr", 2, ("write", "fast"), 1, 1, 1, "string",
             "Decrements the integer value of a key by one.", (("key", _K, ""),)),
        Spec("incrby", 3, ("write", "fast"), 1, 1, 1, "string",
             "Increments the integer value of a key by a number.",
             (("key", _K, ""), ("increment", _I, ""))),
        Spec("decrby", 3, ("write", "fast"), 1, 1, 1, "string",
             "Decrements a number from the integer value of a key.",
             (("key", _K, ""), ("decrement", _I, ""))),
        Spec("expire", -3, ("write", "fast"), 1, 1, 1, "generic",
             "Sets the expiration time of a key in seconds.",
             (("key", _K, ""), ("seconds", _I, ""), ("NX|XX|GT|LT", _S, "optional"))),
        Spec("pexpire", -3, ("write", "fast"), 1, 1, 1, "generic",
             "Sets the expiration time of a key in milliseconds.",
             (("key", _K, ""), ("milliseconds", _I, ""), ("NX|XX|GT|LT", _S, "optional"))),
        Spec("expireat", -3, ("write", "fast"), 1, 1, 1, "generic",
             "Sets the expiration time of a key to a Unix timestamp.",
             (("key", _K, ""), ("unix-time-seconds", _I, ""),
              ("NX|XX|GT|LT", _S, "optional"))),
        Spec("pexpireat", -3, ("write", "fast"), 1, 1, 1, "generic",
             "Sets the expiration time of a key to a Unix milliseconds timestamp.",
             (("key", _K, ""), ("unix-time-milliseconds", _I, ""),
              ("NX|XX|GT|LT", _S, "optional"))),
        Spec("ttl", 2, ("readonly", "fast"), 1, 1, 1, "generic",
             "Returns the expiration time in seconds of a key.", (("key", _K, ""),)),
        Spec("pttl", 2, ("readonly", "fast"), 1, 1, 1, "generic",
             "Returns the expiration time in milliseconds of a key.", (("key", _K, ""),)),
        Spec("expiretime", 2, ("readonly", "fast"), 1, 1, 1, "generic",
             "Returns the expiration time of a key as a Unix timestamp.", (("key", _K, ""),)),
        Spec("pexpiretime", 2, ("readonly", "fast"), 1, 1, 1, "generic",
             "Returns the expiration time of a key as a Unix milliseconds timestamp.",
             (("key", _K, ""),)),
        Spec("persist", 2, ("write", "fast"), 1, 1, 1, "generic",
             "Removes the expiration time of a key.", (("key", _K, ""),)),
        Spec("msetnx", -3, ("write",), 1, -1, 2, "string",
             "Sets the values of several keys only when none exists (the keys must share a "
             "hash tag).", (("key", _K, "multiple"), ("value", _S, "multiple"))),
        Spec("del", -2, ("write",), 1, -1, 1, "generic", "Deletes one or more keys.",
             (("key", _K, "multiple"),)),
        Spec("unlink", -2, ("write", "fast"), 1, -1, 1, "generic",
             "Deletes one or more keys (as DEL).", (("key", _K, "multiple"),)),
        Spec("exists", -2, ("readonly", "fast"), 1, -1, 1, "generic",
             "Determines whether one or more keys exist.", (("key", _K, "multiple"),)),
        Spec("mget", -2, ("readonly", "fast"), 1, -1, 1, "string",
             "Atomically returns the string values of one or more keys.",
             (("key", _K, "multiple"),)),
        Spec("mset", -3, ("write",), 1, -1, 2, "string",
             "Sets the string values of one or more keys (not atomic across nodes).",
             (("key", _K, "multiple"), ("value", _S, "multiple"))),
        Spec("scan", -2, ("readonly",), 0, 0, 0, "generic", "Iterates over the key names.",
             (("cursor", _I, ""), ("pattern", "pattern", "optional"), ("count", _I, "optional"))),
        Spec("keys", 2, ("readonly",), 0, 0, 0, "generic",
             "Returns all key names that match a pattern.", (("pattern", "pattern", ""),)),
        Spec("type", 2, ("readonly", "fast"), 1, 1, 1, "generic",
             "Determines the type of value stored at a key.", (("key", _K, ""),)),
        Spec("dbsize", 1, ("readonly", "fast"), 0, 0, 0, "server",
             "Returns the number of keys."),
        Spec("ping", -1, ("fast",), 0, 0, 0, "connection", "Returns the server's liveliness.",
             (("message", _S, "optional"),)),
        Spec("echo", 2, ("fast",), 0, 0, 0, "connection", "Returns the given string.",
             (("message", _S, ""),)),
        Spec("quit", -1, ("fast",), 0, 0, 0, "connection", "Closes the connection."),
        Spec("reset", 1, ("fast",), 0, 0, 0, "connection", "Resets the connection."),
        Spec("select", 2, ("fast",), 0, 0, 0, "connection",
             "Changes the selected database (only 0 exists).", (("index", _I, ""),)),
        Spec("hello", -1, ("fast",), 0, 0, 0, "connection", "Handshakes with the server.",
             (("protover", _I, "optional"),)),
        Spec("auth", -2, ("fast",), 0, 0, 0, "connection", "Authenticates the connection.",
             (("password", _S, ""),)),
        Spec("client", -2, (), 0, 0, 0, "connection",
             "CLIENT SETNAME, GETNAME, ID, SETINFO, INFO.",
             (("subcommand", _S, ""),)),
        Spec("command", -1, (), 0, 0, 0, "server", "Returns details about commands.",
             (("subcommand", _S, "optional"),)),
        Spec("info", -1, (), 0, 0, 0, "server", "Returns information about the server.",
             (("section", _S, "optional multiple"),)),
        Spec("time", 1, ("fast",), 0, 0, 0, "server", "Returns the server time."),
        Spec("config", -2, (), 0, 0, 0, "server",
             "CONFIG GET answers no parameters (zkv is configured by its topology).",
             (("subcommand", _S, ""),)),
        Spec("multi", 1, ("fast",), 0, 0, 0, "transactions",
             "Starts a transaction (its keys must live on one node: use a hash tag)."),
        Spec("exec", 1, (), 0, 0, 0, "transactions",
             "Runs the commands queued since MULTI, on one node, with nothing between."),
        Spec("discard", 1, ("fast",), 0, 0, 0, "transactions",
             "Discards the commands queued since MULTI."),
        Spec("watch", -2, ("fast",), 1, -1, 1, "transactions",
             "Not supported by zkv (answers an error): optimistic locking needs versions "
             "zkv does not keep.", (("key", _K, "multiple"),)),
        Spec("unwatch", 1, ("fast",), 0, 0, 0, "transactions",
             "Forgets watched keys (zkv watches none)."),
        Spec("flushall", -1, ("write",), 0, 0, 0, "server",
             "Removes all keys (admin: needs --resp-admin).",
             (("flush-type", _S, "optional"),)),
        Spec("flushdb", -1, ("write",), 0, 0, 0, "server",
             "Removes all keys of the database (as FLUSHALL; admin: needs --resp-admin).",
             (("flush-type", _S, "optional"),)),
    )
}


def plan_command(session: Session, args: list[bytes], ctx: Context) -> Plan:
    """What to do with one command (a list of bytes, as read)."""
    name = args[0].lower()
    spec = SPECS.get(name)
    if spec is None:
        return _refused(session, _unknown(args))
    n = len(args)
    if (ctx.password is not None and not session.authed
            and name not in (b"auth", b"hello", b"quit", b"reset")):
        return Reply(error("NOAUTH Authentication required."))
    if (spec.arity > 0 and n != spec.arity) or (spec.arity < 0 and n < -spec.arity):
        why = f"wrong number of arguments for '{spec.name}' command"
        if name == b"exec" and session.multi is not None:  # it ends the transaction
            session.multi, session.multi_failed = None, False
            return Reply(error(f"EXECABORT Transaction discarded because of: {why}"))
        return _refused(session, f"ERR {why}")
    if session.multi is not None or name in TRANSACTION:
        from . import resptxn  # (MULTI/EXEC, built on this module)
        return resptxn.plan(session, name, args, ctx)
    return planned(session, name, args, ctx)


def planned(session: Session, name: bytes, args: list[bytes], ctx: Context) -> Plan:
    """The plan of a known command whose arity and rights have been checked."""
    try:
        return _PLANNERS[name](session, args, ctx)
    except ZkvError as exc:
        return Reply(error_reply(exc))


def _refused(session: Session, text: str) -> Reply:
    """An error for a command that is not run; after MULTI, EXEC then aborts."""
    if session.multi is not None:
        session.multi_failed = True
    return Reply(error(text))


TRANSACTION = frozenset((b"multi", b"exec", b"discard", b"watch", b"unwatch"))


def _unknown(args: list[bytes]) -> str:
    shown = ""
    for a in args[1:]:
        if len(shown) >= 128:
            break
        shown += f"'{_text(a)[:128 - len(shown)]}' "
    return f"ERR unknown command '{_text(args[0])[:128]}', with args beginning with: {shown}"


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _int(b: bytes) -> int:
    """An integer argument as Redis reads one: optional minus, then digits only."""
    digits = b[1:] if b[:1] == b"-" else b
    if not digits.isdigit() or len(digits) > 19 or (len(digits) > 1 and digits[:1] == b"0") \
            or b == b"-0":
        raise CommandError("value is not an integer or out of range")
    return int(b)


def forward(ctx: Context, op: str, args: list[Any], shape: Shape) -> Forward:
    """A zkv request, checked, for the routing core; ``shape`` makes its reply."""
    return _req(ctx, op, args, shape)


def _req(ctx: Context, op: str, args: list[Any], shape: Shape) -> Forward:
    op, checked = P.check_request([op, *args], ctx.limits)
    if op in _KEYED and len(checked) == (2 if op == "SET" else 1):
        return Forward(op, checked, shape, P.encode_keyed(op, checked))
    return Forward(op, checked, shape)


_KEYED = frozenset(("GET", "SET", "DEL", "EXISTS"))


# shapes: a zkv result (or error) as RESP
def _shape_bulk(result: Any, s: Session) -> bytes:
    if isinstance(result, ZkvError):
        return error_reply(result)
    return bulk(result, s.proto)


def _shape_ok(result: Any, s: Session) -> bytes:
    return error_reply(result) if isinstance(result, ZkvError) else OK


def _shape_int(result: Any, s: Session) -> bytes:
    return error_reply(result) if isinstance(result, ZkvError) else integer(int(result))


def _shape_bulks(result: Any, s: Session) -> bytes:
    return error_reply(result) if isinstance(result, ZkvError) else bulks(result, s.proto)


def _tally(result: list[Any]) -> tuple[int, int, ZkvError | None]:
    """A PIPE of DELs or EXISTSes: how many said yes, how many failed, the first error."""
    total, failed, first = 0, 0, None
    for item in result:
        try:
            total += int(P.result_of(item))
        except ZkvError as exc:
            failed += 1
            first = first or exc
    return total, failed, first


def _shape_count(result: Any, s: Session) -> bytes:
    """A PIPE of EXISTSes: how many said yes (the first error, if any)."""
    if isinstance(result, ZkvError):
        return error_reply(result)
    total, _, first = _tally(result)
    return integer(total) if first is None else error_reply(first)


def _shape_deleted(result: Any, s: Session) -> bytes:
    """A PIPE of DELs: how many went. If a key's node failed, the error, saying what
    the other nodes did: their keys went, and a client told only of the failure would
    take them for still there."""
    if isinstance(result, ZkvError):
        return error_reply(result)
    deleted, failed, first = _tally(result)
    if first is None:
        return integer(deleted)
    return error(f"{_PREFIX.get(first.code, 'ERR')} "
                 f"{P.partial_delete(first.message, failed, len(result), deleted)}")


def _shape_type(result: Any, s: Session) -> bytes:
    if isinstance(result, ZkvError):
        return error_reply(result)
    return b"+string\r\n" if result else b"+none\r\n"


def _plan_get(s: Session, a: list[bytes], ctx: Context) -> Plan:
    return _req(ctx, "GET", [a[1]], _shape_bulk)


def _plan_set(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) == 3:
        return _req(ctx, "SET", [a[1], a[2]], _shape_ok)
    opts = P.options_from_words("SET", a[3:])
    return _req(ctx, "SET", [a[1], a[2], opts], _shape_bulk if "get" in opts else _shape_set)


def _shape_set(result: Any, s: Session) -> bytes:
    if isinstance(result, ZkvError):
        return error_reply(result)
    return OK if result == "OK" else bulk(None, s.proto)


def _plan_setex(option: str) -> Callable[[Session, list[bytes], Context], Plan]:
    name = "setex" if option == "ex" else "psetex"

    def plan(s: Session, a: list[bytes], ctx: Context) -> Plan:
        amount = _int(a[2])
        if amount <= 0:  # (as Redis words it: SETEX's, not SET's)
            raise CommandError(f"invalid expire time in '{name}' command")
        return _req(ctx, "SET", [a[1], a[3], {option: amount}], _shape_ok)
    return plan


def _plan_getex(s: Session, a: list[bytes], ctx: Context) -> Plan:
    args: list[Any] = [a[1]]
    if len(a) > 2:
        args.append(P.options_from_words("GETEX", a[2:]))
    return _req(ctx, "GETEX", args, _shape_bulk)


def _plan_expire(op: str) -> Callable[[Session, list[bytes], Context], Plan]:
    def plan(s: Session, a: list[bytes], ctx: Context) -> Plan:
        flags = set()
        for word in a[3:]:
            if word.upper() not in (b"NX", b"XX", b"GT", b"LT"):
                raise CommandError(f"Unsupported option {_text(word)[:32]}")
            flags.add(word.upper())
        if b"NX" in flags and len(flags) > 1:  # (Redis's words, and its order of checks)
            raise CommandError("NX and XX, GT or LT options at the same time are not "
                               "compatible")
        if {b"GT", b"LT"} <= flags:
            raise CommandError("GT and LT options at the same time are not compatible")
        if flags == {b"XX", b"GT"}:
            flags = {b"GT"}  # (the same: GT never sets a deadline on a key without one)
        words = [b"XX", *(flags - {b"XX"})] if len(flags) > 1 else list(flags)
        return _req(ctx, op, [a[1], _int(a[2]), *([b" ".join(words)] if words else [])],
                    _shape_int)
    return plan


def _plan_simple(op: str, shape: Shape,
                 counted: bool = False) -> Callable[[Session, list[bytes], Context], Plan]:
    """A command whose words are its zkv arguments as they are (``counted``: the second
    is an integer, as INCRBY's)."""
    def plan(s: Session, a: list[bytes], ctx: Context) -> Plan:
        args: list[Any] = list(a[1:])
        if counted:
            args[1] = _int(args[1])
        return _req(ctx, op, args, shape)
    return plan


def _plan_msetnx(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) % 2 == 0:
        raise CommandError("wrong number of arguments for 'msetnx' command")
    return _req(ctx, "MSETNX", [a[1:]], _shape_int)


def _plan_keys_count(op: str) -> Callable[[Session, list[bytes], Context], Plan]:
    def plan(s: Session, a: list[bytes], ctx: Context) -> Plan:
        keys = a[1:]
        if len(keys) == 1:
            return _req(ctx, op, [keys[0]], _shape_int)
        if len(keys) > ctx.limits.max_batch:
            raise LimitExceeded(f"{op} of {len(keys)} keys is over the batch limit of "
                                f"{ctx.limits.max_batch}")
        return _req(ctx, "PIPE", [[[op, k] for k in keys]],
                    _shape_deleted if op == "DEL" else _shape_count)
    return plan


def _plan_mget(s: Session, a: list[bytes], ctx: Context) -> Plan:
    return _req(ctx, "MGET", [a[1:]], _shape_bulks)


def _plan_mset(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) % 2 == 0:
        raise CommandError("wrong number of arguments for 'mset' command")
    return _req(ctx, "MSET", [a[1:]], _shape_ok)


def _plan_scan(s: Session, a: list[bytes], ctx: Context) -> Plan:
    cursor = ctx.cursors.cursor(a[1])
    pattern: bytes | None = None
    count = 10
    string_only = False
    i = 2
    while i < len(a):
        opt = a[i].upper()
        if i + 1 >= len(a):
            raise CommandError("syntax error")
        if opt == b"MATCH":
            pattern = a[i + 1]
        elif opt == b"COUNT":
            count = _int(a[i + 1])
            if count < 1:
                raise CommandError("syntax error")
        elif opt == b"TYPE":
            string_only = a[i + 1].lower() != b"string"
        else:
            raise CommandError("syntax error")
        i += 2
    cursors = ctx.cursors
    if string_only:  # every zkv value is a string
        return Reply(array([bulk(b"0"), array([])]))

    def shape(result: Any, sess: Session) -> bytes:
        if isinstance(result, ZkvError):
            return error_reply(result)
        nxt, keys = result
        return array([bulk(str(cursors.number(nxt, sess.id)).encode()), bulks(keys)])

    if pattern == b"*":
        pattern = None
    return _req(ctx, "SCAN", [cursor, pattern, min(count, ctx.limits.max_batch)], shape)


def _plan_keys(s: Session, a: list[bytes], ctx: Context) -> Plan:
    pattern = None if a[1] == b"*" else a[1]
    return _req(ctx, "KEYS", [pattern], _shape_bulks)


def _plan_type(s: Session, a: list[bytes], ctx: Context) -> Plan:
    return _req(ctx, "EXISTS", [a[1]], _shape_type)


def _plan_ping(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) > 2:
        raise CommandError("wrong number of arguments for 'ping' command")
    return Reply(PONG if len(a) == 1 else bulk(a[1]))


def _plan_echo(s: Session, a: list[bytes], ctx: Context) -> Plan:
    return Reply(bulk(a[1]))


def _plan_quit(s: Session, a: list[bytes], ctx: Context) -> Plan:
    return Reply(OK, close=True)


def _plan_reset(s: Session, a: list[bytes], ctx: Context) -> Plan:
    s.proto, s.name, s.authed = 2, None, False
    s.multi, s.multi_failed = None, False
    return Reply(b"+RESET\r\n")


def _plan_select(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if _int(a[1]) != 0:
        raise CommandError("DB index is out of range (zkv has one database, 0)")
    return Reply(OK)


_WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."


def _password_ok(ctx: Context, user: bytes, password: bytes) -> bool:
    """Whether ``user``/``password`` are the front's (one user, "default", as Redis's
    requirepass), compared in constant time."""
    assert ctx.password is not None
    return user == b"default" and hmac.compare_digest(password, ctx.password.encode())


def _plan_auth(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) > 3:
        raise CommandError("syntax error")
    if ctx.password is None:
        if len(a) == 3:  # (the default user has no password: as Redis's nopass, any will do)
            return Reply(OK) if a[1] == b"default" else Reply(error(_WRONGPASS))
        raise CommandError("AUTH <password> called without any password configured for the "
                           "default user. Are you sure your configuration is correct?")
    user, password = (b"default", a[1]) if len(a) == 2 else (a[1], a[2])
    if not _password_ok(ctx, user, password):  # (a login already made stays, as Redis's)
        return Reply(error(_WRONGPASS))
    s.authed = True
    return Reply(OK)


def _plan_hello(s: Session, a: list[bytes], ctx: Context) -> Plan:
    proto = s.proto
    if len(a) > 1:
        try:
            proto = _int(a[1])
        except CommandError:
            return Reply(error("ERR Protocol version is not an integer or out of range"))
        if proto not in (2, 3):
            return Reply(error("NOPROTO unsupported protocol version"))
    i = 2
    name = s.name
    authed = s.authed
    while i < len(a):
        opt = a[i].upper()
        if opt == b"AUTH" and i + 2 < len(a):
            # without a password, the default user takes any (as Redis's nopass)
            if ctx.password is not None and not _password_ok(ctx, a[i + 1], a[i + 2]):
                return Reply(error(_WRONGPASS))
            authed = True
            i += 3
        elif opt == b"SETNAME" and i + 1 < len(a):
            name = _client_name(a[i + 1])
            i += 2
        else:
            raise CommandError(f"Syntax error in HELLO option '{_text(a[i])[:64]}'")
    if ctx.password is not None and not authed:
        return Reply(error("NOAUTH HELLO must be called with the client already "
                           "authenticated, otherwise the HELLO <proto> AUTH <user> <pass> "
                           "option can be used to authenticate the client and select the "
                           "RESP protocol version at the same time"))
    s.proto, s.name, s.authed = proto, name, authed
    return Reply(mapping([
        (bulk(b"server"), bulk(b"redis")),
        (bulk(b"version"), bulk(REDIS_VERSION.encode())),
        (bulk(b"proto"), integer(proto)),
        (bulk(b"id"), integer(s.id)),
        (bulk(b"mode"), bulk(b"standalone")),
        (bulk(b"role"), bulk(b"master")),
        (bulk(b"modules"), array([])),
    ], proto))


def _client_name(name: bytes) -> bytes | None:
    if any(c <= 0x20 or c >= 0x7F for c in name):
        raise CommandError("Client names cannot contain spaces, newlines or special characters.")
    return name or None


def _plan_client(s: Session, a: list[bytes], ctx: Context) -> Plan:
    sub = a[1].upper()
    if sub == b"SETNAME" and len(a) == 3:
        s.name = _client_name(a[2])
        return Reply(OK)
    if sub == b"GETNAME" and len(a) == 2:
        return Reply(bulk(s.name, s.proto))
    if sub == b"ID" and len(a) == 2:
        return Reply(integer(s.id))
    if sub == b"SETINFO" and len(a) == 4:
        attr, value = a[2].upper(), a[3]
        if attr not in (b"LIB-NAME", b"LIB-VER"):
            raise CommandError(f"Unrecognized option '{_text(a[2])[:64]}'")
        # (as Redis checks them: shown in CLIENT INFO, they must not forge its fields)
        if any(c <= 0x20 or c >= 0x7F for c in value):
            raise CommandError(f"{attr.decode()} cannot contain spaces, newlines or special "
                               "characters.")
        if len(value) > CLIENT_INFO_MAX:
            raise CommandError(f"{attr.decode()} is over {CLIENT_INFO_MAX} bytes")
        if attr == b"LIB-NAME":
            s.lib_name = value
        else:
            s.lib_ver = value
        return Reply(OK)
    if sub == b"INFO" and len(a) == 2:
        return Reply(bulk(client_line(s).encode()))
    return Reply(error(f"ERR unknown subcommand or wrong number of arguments for "
                       f"'{_text(a[1])[:64]}'. Try CLIENT HELP."))


def client_line(s: Session) -> str:
    name = _text(s.name or b"")
    return (f"id={s.id} name={name} db=0 resp={s.proto} lib-name={_text(s.lib_name)} "
            f"lib-ver={_text(s.lib_ver)}\n")


def _plan_command(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) == 1:
        return Reply(array([_command_info(spec) for spec in SPECS.values()]))
    sub = a[1].upper()
    if sub == b"COUNT":
        return Reply(integer(len(SPECS)))
    if sub == b"INFO":
        names = [n.lower() for n in a[2:]] or list(SPECS)
        return Reply(array([_command_info(SPECS[n]) if n in SPECS else bulk(None, s.proto)
                            for n in names]))
    if sub == b"DOCS":
        names = [n.lower() for n in a[2:]] or list(SPECS)
        return Reply(mapping([(bulk(n), _command_docs(SPECS[n], s.proto))
                              for n in names if n in SPECS], s.proto))
    if sub == b"LIST":
        return Reply(bulks([n for n in SPECS]))
    return Reply(error(f"ERR unknown subcommand '{_text(a[1])[:64]}'. Try COMMAND HELP."))


def _command_info(spec: Spec) -> bytes:
    return array([
        bulk(spec.name.encode()), integer(spec.arity),
        array([simple(f) for f in spec.flags]),
        integer(spec.first_key), integer(spec.last_key), integer(spec.step),
        array([]), array([]), array([]), array([]),
    ])


def _command_docs(spec: Spec, proto: int) -> bytes:
    arguments = []
    for name, kind, flags in spec.arguments:
        fields = [(bulk(b"name"), bulk(name.encode())), (bulk(b"type"), bulk(kind.encode()))]
        if kind == _K:
            fields.append((bulk(b"key_spec_index"), integer(0)))
        if flags:
            fields.append((bulk(b"flags"), array([simple(f) for f in flags.split()])))
        arguments.append(mapping(fields, proto))
    return mapping([
        (bulk(b"summary"), bulk(spec.summary.encode())),
        (bulk(b"since"), bulk(b"1.0.0")),
        (bulk(b"group"), bulk(spec.group.encode())),
        (bulk(b"complexity"), bulk(b"O(1) per key")),
        (bulk(b"arguments"), array(arguments)),
    ], proto)


def _plan_info(s: Session, a: list[bytes], ctx: Context) -> Plan:
    sections = [_text(x).lower() for x in a[1:]]
    return Local("INFO", lambda infos, sess: _shape_info(infos, sess, sections, ctx), sections)


def _plan_dbsize(s: Session, a: list[bytes], ctx: Context) -> Plan:
    # every node's count of keys not expired; an error (CLUSTERDOWN) if one cannot say:
    # a count without its keys would be a wrong answer, not a partial one
    return _req(ctx, "DBSIZE", [], _shape_int)


def _plan_flush(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if len(a) > 2 or len(a) == 2 and a[1].upper() not in (b"ASYNC", b"SYNC"):
        raise CommandError("syntax error")
    if not ctx.admin:
        return Reply(error("NOPERM FLUSHALL and FLUSHDB are admin commands, refused on this "
                           "RESP front: start the proxy with --resp-admin to allow them"))
    return Local("FLUSHALL", _shape_ok)


def _plan_config(s: Session, a: list[bytes], ctx: Context) -> Plan:
    if a[1].upper() == b"GET" and len(a) >= 3:
        return Reply(mapping([], s.proto))  # what tools ask (save, appendonly) is not ours
    return Reply(error(f"ERR CONFIG {_text(a[1]).upper()[:32]} is not supported: zkv is "
                       "configured by its topology file and command line"))


def _plan_time(s: Session, a: list[bytes], ctx: Context) -> Plan:
    seconds = int(ctx.now)
    micros = int((ctx.now - seconds) * 1_000_000)
    return Reply(bulks([str(seconds).encode(), str(micros).encode()]))


_PLANNERS: dict[bytes, Callable[[Session, list[bytes], Context], Plan]] = {
    b"get": _plan_get,
    b"set": _plan_set,
    b"del": _plan_keys_count("DEL"),
    b"unlink": _plan_keys_count("DEL"),
    b"exists": _plan_keys_count("EXISTS"),
    b"mget": _plan_mget,
    b"mset": _plan_mset,
    b"msetnx": _plan_msetnx,
    b"setnx": _plan_simple("SETNX", _shape_int),
    b"setex": _plan_setex("ex"),
    b"psetex": _plan_setex("px"),
    b"getset": _plan_simple("GETSET", _shape_bulk),
    b"getdel": _plan_simple("GETDEL", _shape_bulk),
    b"getex": _plan_getex,
    b"append": _plan_simple("APPEND", _shape_int),
    b"strlen": _plan_simple("STRLEN", _shape_int),
    b"incr": _plan_simple("INCR", _shape_int),
    b"decr": _plan_simple("DECR", _shape_int),
    b"incrby": _plan_simple("INCRBY", _shape_int, counted=True),
    b"decrby": _plan_simple("DECRBY", _shape_int, counted=True),
    b"expire": _plan_expire("EXPIRE"),
    b"pexpire": _plan_expire("PEXPIRE"),
    b"expireat": _plan_expire("EXPIREAT"),
    b"pexpireat": _plan_expire("PEXPIREAT"),
    b"ttl": _plan_simple("TTL", _shape_int),
    b"pttl": _plan_simple("PTTL", _shape_int),
    b"expiretime": _plan_simple("EXPIRETIME", _shape_int),
    b"pexpiretime": _plan_simple("PEXPIRETIME", _shape_int),
    b"persist": _plan_simple("PERSIST", _shape_int),
    b"scan": _plan_scan,
    b"keys": _plan_keys,
    b"type": _plan_type,
    b"dbsize": _plan_dbsize,
    b"ping": _plan_ping,
    b"echo": _plan_echo,
    b"quit": _plan_quit,
    b"reset": _plan_reset,
    b"select": _plan_select,
    b"hello": _plan_hello,
    b"auth": _plan_auth,
    b"client": _plan_client,
    b"command": _plan_command,
    b"info": _plan_info,
    b"time": _plan_time,
    b"config": _plan_config,
    b"flushall": _plan_flush,
    b"flushdb": _plan_flush,
}


# -- INFO ---------------------------------------------------------------------------------
def _shape_info(infos: Any, s: Session, sections: list[str], ctx: Context) -> bytes:
    if isinstance(infos, ZkvError):
        return error_reply(infos)
    return bulk(info_text(infos, sections, ctx).encode())


def info_text(infos: dict[str, Any], sections: list[str], ctx: Context) -> str:
    """INFO in Redis's format: ``# Section`` lines, then ``field:value`` lines."""
    proxy = infos.get("proxy", {})
    nodes = infos.get("nodes", {})
    totals = infos.get("totals", {})
    live = int(totals.get("keys", 0))
    ttls = int(totals.get("keys_with_ttl", 0))  # (some may have expired, not yet gone)
    used = int(totals.get("live_bytes", 0))
    uptime = int(proxy.get("uptime_s", 0))
    up = sum(1 for i in nodes.values() if "error" not in i)
    all_sections: dict[str, list[tuple[str, Any]]] = {
        "server": [
            ("redis_version", REDIS_VERSION), ("zkv_version", __version__),
            ("redis_mode", "standalone"), ("os", ctx.extra.get("os", "")),
            ("arch_bits", 64), ("process_id", proxy.get("pid", 0)),
            ("tcp_port", ctx.port), ("uptime_in_seconds", uptime),
            ("uptime_in_days", uptime // 86400),
        ],
        "clients": [
            ("connected_clients", ctx.extra.get("resp_clients", 0) + proxy.get("clients", 0)),
            ("maxclients", proxy.get("max_clients", 0)),
        ],
        "memory": [
            ("used_memory", used), ("used_memory_human", _human(used)),
            ("used_memory_rss", int(totals.get("rss_bytes", 0))),
            ("used_memory_rss_human", _human(int(totals.get("rss_bytes", 0)))),
        ],
        "persistence": [
            ("loading", 0), ("aof_enabled", 1),
            ("zkv_log_bytes", int(totals.get("log_bytes", 0))),
            ("zkv_snapshot_bytes", int(totals.get("snapshot_bytes", 0))),
        ],
        "stats": [
            ("total_connections_received", ctx.extra.get("resp_connections", 0)),
            ("total_commands_processed", proxy.get("requests", 0)),
            ("total_error_replies", proxy.get("errors", 0)),
        ],
        "replication": [("role", "master"), ("connected_slaves", 0)],
        "cluster": [("cluster_enabled", 0)],
        "zkv": [
            ("epoch", proxy.get("epoch", 0)), ("nodes", len(nodes)), ("nodes_up", up),
            *((f"node_{i}", f"address={addr},state={'down' if 'error' in info else 'up'},"
                            f"keys={info.get('keys', 0)}")
              for i, (addr, info) in enumerate(sorted(nodes.items()))),
        ],
        "keyspace": [("db0", f"keys={live},expires={min(ttls, live)},avg_ttl=0")]
        if live else [],
    }
    wanted = [x for x in sections if x not in ("all", "default", "everything")]
    lines: list[str] = []
    for name, fields in all_sections.items():
        if wanted and name not in wanted:
            continue
        if lines:
            lines.append("")
        lines.append(f"# {name.capitalize() if name != 'zkv' else 'Zkv'}")
        lines.extend(f"{k}:{v}" for k, v in fields)
    return "\r\n".join(lines) + "\r\n" if lines else ""  # (no such section: "", as Redis)


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.2f}{unit}" if unit != "B" else f"{n}B"
        n /= 1024  # type: ignore[assignment]
    return f"{n}"
