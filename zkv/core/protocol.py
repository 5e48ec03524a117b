"""The zkv wire protocol: bytes in, requests out; results in, bytes out. No I/O.

A message on the wire is a ZeroMQ multipart message. Every frame but the last is
*routing* (the ROUTER identity, the empty delimiter a REQ socket adds, and any
opaque tag a pipelining DEALER client puts before the body); replies carry the
same routing frames back. The last frame is the *body*, one CBOR item:

    request  = [op: text, arg, ...]            e.g. ["SET", b"k", b"v"]
    reply    = [0, result]                     success
             | [1, code: text, message: text]  error (see zkv.errors)

Keys and values are CBOR byte strings (text is accepted and UTF-8 encoded).
:data:`COMMANDS` describes every operation as data: its arguments and whether it
reads, writes or administers. :func:`parse_request` checks a body against it and
the configured :class:`Limits`; anything that is not a valid request raises a
:class:`~zkv.errors.ProtocolError` whose code and message go back to the peer.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Any

import cbor2

from ..errors import (
    CommandError,
    LimitExceeded,
    ProtocolError,
    UnknownCommand,
    ZkvError,
    error_from_wire,
)
from . import cbor, glob
from .expiry import MAX_DEADLINE
from .glob import check_pattern
from .once import MAX_CLIENT_ID

OK = 0
ERR = 1

READ, WRITE, META, ADMIN, INTERNAL = "read", "write", "meta", "admin", "internal"

MIN_FRAMES = 3  # a ROUTER sees [identity, delimiter or tag, body]
ENVELOPE_BYTES = 4096  # a request's CBOR framing around its key and value, with room
MAX_DEPTH = 5  # [op, {map: [[lo, 2**64 (a tag)], ...]}] is the deepest (a move's ranges)
MAX_TOP = 8  # entries in a request's outer array: the op and its arguments
# XCONFIG carries a configuration: [op, {config: {move: {transfers: [{ranges: [[lo, hi]]}]}}}]
INTERNAL_DEPTH = 10
MAX_OPTIONS = 16  # entries in an options map
MAX_CURSOR = 128  # characters in a SCAN cursor
MAX_ADDRESS = 300  # characters in HOST:PORT
# A move names hash ranges as [lo, hi] pairs; a member owns at most this many arcs
# (zkv.core.ring.MAX_RING_POINTS), so an internal request may hold this many pairs.
MAX_RANGES = 1 << 18
INTERNAL_ITEMS = 3 * MAX_RANGES + 64


@dataclass(frozen=True)
class Limits:
    """Sizes a request may have. Enforced at the proxy and at every node."""

    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 16 * 1024 * 1024
    max_batch: int = 10_000  # keys in one MGET/MSET, commands in one PIPE
    max_frames: int = 8  # frames in one ZeroMQ message, routing included
    max_message_bytes: int = 64 * 1024 * 1024  # hard cap; larger messages are dropped by ZeroMQ

    def __post_init__(self) -> None:
        for name in ("max_key_bytes", "max_value_bytes", "max_batch", "max_frames",
                     "max_message_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.max_frames < MIN_FRAMES:
            raise ValueError(
                f"max_frames must be at least {MIN_FRAMES} (a client's routing frames and "
                f"the body), not {self.max_frames}"
            )
        need = self.max_key_bytes + self.max_value_bytes + ENVELOPE_BYTES
        if need > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must hold a SET of the longest "
                f"key and the largest value with its framing: at least max_key_bytes + "
                f"max_value_bytes + {ENVELOPE_BYTES} = {need}"
            )

    @property
    def max_items(self) -> int:
        """CBOR items a data request may hold: a full PIPE of commands of up to 12 items
        (a SET with options, tagged for safe retries), with room."""
        return 12 * self.max_batch + 64


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Command:
    """What an operation takes. ``args`` name argument kinds; a trailing ``?`` is optional."""

    name: str
    kind: str
    args: tuple[str, ...]
    help: str
    shown: str = ""  # the usage as a user types it, where it is not just the arguments

    @property
    def required(self) -> int:
        return sum(1 for a in self.args if not a.endswith("?"))

    @property
    def usage(self) -> str:
        if self.shown:
            return f"{self.name} {self.shown}"
        parts = [a[:-1].join("[]") if a.endswith("?") else a for a in self.user_args]
        return " ".join([self.name, *(p.upper() for p in parts)])

    @property
    def user_args(self) -> tuple[str, ...]:
        """The arguments a user gives (a reply budget is the proxy's business)."""
        return tuple(a for a in self.args if a != "budget?")


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("PING", META, (), "Check the server answers; replies PONG."),
        Command("INFO", META, (), "Server statistics: keys, memory, log sizes, counters."),
        Command("GET", READ, ("key",), "Value of KEY, or nil."),
        Command("EXISTS", READ, ("key",), "1 if KEY exists, else 0."),
        Command("SET", WRITE, ("key", "value", "setopts?"),
                "Set KEY to VALUE, with a deadline (EX seconds, PX ms, EXAT or PXAT an "
                "absolute time, KEEPTTL the old one), only if absent (NX), present (XX) or "
                "equal to OLD (IFEQ); GET: reply the old value. Replies OK, or nil if not set.",
                "KEY VALUE [EX s|PX ms|EXAT ts|PXAT ms|KEEPTTL] [NX|XX|IFEQ old] [GET]"),
        Command("DEL", WRITE, ("key",), "Delete KEY; 1 if it existed, else 0."),
        Command("SETNX", WRITE, ("key", "value"), "Set KEY only if it is absent; 1 if set."),
        Command("GETSET", WRITE, ("key", "value"), "Set KEY, replying its old value."),
        Command("GETDEL", WRITE, ("key",), "Value of KEY, deleting it."),
        Command("GETEX", WRITE, ("key", "getexopts?"),
                "Value of KEY, giving it a new deadline (or none: PERSIST).",
                "KEY [EX s|PX ms|EXAT ts|PXAT ms|PERSIST]"),
        Command("APPEND", WRITE, ("key", "value"),
                "Append VALUE to KEY's value (or set it); the new length."),
        Command("STRLEN", READ, ("key",), "Length of KEY's value; 0 if absent."),
        Command("INCR", WRITE, ("key",), "Add 1 to the integer at KEY (absent: 0); the result."),
        Command("DECR", WRITE, ("key",), "Subtract 1 from the integer at KEY; the result."),
        Command("INCRBY", WRITE, ("key", "int"), "Add N to the integer at KEY; the result.",
                "KEY N"),
        Command("DECRBY", WRITE, ("key", "int"),
                "Subtract N from the integer at KEY; the result.", "KEY N"),
        Command("EXPIRE", WRITE, ("key", "int", "expireflag?"),
                "KEY expires in SECONDS (NX: only if it has no deadline, XX: only if it has, "
                "GT/LT: only if later/earlier than its deadline, XX GT/XX LT: both); 1 if set.",
                "KEY SECONDS [NX|XX|GT|LT]"),
        Command("PEXPIRE", WRITE, ("key", "int", "expireflag?"),
                "KEY expires in MS milliseconds; as EXPIRE.", "KEY MS [NX|XX|GT|LT]"),
        Command("EXPIREAT", WRITE, ("key", "int", "expireflag?"),
                "KEY expires at Unix time TS (seconds); as EXPIRE.", "KEY TS [NX|XX|GT|LT]"),
        Command("PEXPIREAT", WRITE, ("key", "int", "expireflag?"),
                "KEY expires at Unix time TS in milliseconds; as EXPIRE.",
                "KEY TS [NX|XX|GT|LT]"),
        Command("TTL", READ, ("key",),
                "Seconds KEY has left; -1 if it has no deadline, -2 if it does not exist."),
        Command("PTTL", READ, ("key",), "Milliseconds KEY has left; -1 or -2 as TTL."),
        Command("EXPIRETIME", READ, ("key",),
                "Unix time (seconds) KEY expires at; -1 or -2 as TTL."),
        Command("PEXPIRETIME", READ, ("key",),
                "Unix time in milliseconds KEY expires at; -1 or -2 as TTL."),
        Command("PERSIST", WRITE, ("key",), "Take KEY's deadline away; 1 if it had one."),
        Command("MGET", READ, ("keys", "budget?"), "Values of several keys, in the order asked."),
        Command("MSET", WRITE, ("pairs",), "Set several keys at once (KEY VALUE ...)."),
        Command("MSETNX", WRITE, ("pairs",),
                "Set several keys only if none exists; 1 if set. The keys must share a hash "
                "tag ({...}), so that they live on one shard."),
        Command("DBSIZE", META, (), "The number of keys in the cluster."),
        Command("ONCE", WRITE, ("client_id", "seq", "request"),
                "A write tagged for safe retries (zkv.core.once): CLIENT_ID SEQ [OP ARG ...].",
                "CLIENT_ID SEQ REQUEST"),
        Command("SCAN", READ, ("cursor", "pattern?", "count?"),
                "Iterate keys: SCAN CURSOR [PATTERN] [COUNT]; start and end at cursor 0."),
        Command("KEYS", READ, ("pattern?",), "All keys matching a glob PATTERN (default *)."),
        Command("PIPE", META, ("commands", "budget?", "atomic?"),
                "Run several commands in one message (atomic: all on one node, as one "
                "transaction)."),
        Command("NODES", META, (), "Cluster members: address, state, keys, ring share."),
        Command("RING", META, ("key",), "Which node owns KEY, and why."),
        Command("STATUS", META, (), "Cluster epoch and any move under way."),
        Command("ADD", ADMIN, ("addr", "options?"), "Add node HOST:PORT and move its share to it.",
                "HOST:PORT [--dry-run] [--rate=N] [--weight=W]"),
        Command("REMOVE", ADMIN, ("addr", "options?"),
                "Move the keys of node HOST:PORT away, then drop it (--force: drop a dead "
                "node, losing its keys).", "HOST:PORT [--dry-run] [--rate=N] [--force]"),
        Command("MOVE", ADMIN, ("action", "options?"),
                "Roll the move under way back to the old membership (--force: give up on "
                "nodes that are down).", "ABORT [--force]"),
        Command("REPLICA", ADMIN, ("replica_action", "addr", "addr?"),
                "Attach node HOST:PORT to shard SHARD as a replica and sync it (ADD), or "
                "detach a replica (REMOVE).", "ADD SHARD HOST:PORT | REMOVE HOST:PORT"),
        Command("FAILOVER", ADMIN, ("addr", "addr?", "options?"),
                "Hand shard SHARD to an in-sync replica (HOST:PORT, or any), losing no "
                "acknowledged write (--force: make the copy at HOST:PORT the shard's when "
                "no in-sync copy is left, losing what it lacks).",
                "SHARD [HOST:PORT] [--force]"),
        Command("FLUSHALL", ADMIN, (),
                "Drop every key of the cluster, on every node (refused while a move is "
                "under way or a node is down)."),
        # Node-to-node and proxy-to-node operations used by rebalancing.
        Command("XBEGIN", INTERNAL, ("any",), "internal: open an incoming move"),
        Command("XSEND", INTERNAL, ("any",), "internal: stream a range to another node"),
        Command("XEND", INTERNAL, ("any",), "internal: close a move"),
        Command("XDROP", INTERNAL, ("any",), "internal: drop moved-away ranges"),
        Command("XSTAT", INTERNAL, ("any?",), "internal: state of moves on a node"),
        Command("XGET", INTERNAL, ("key",), "internal: a key's state during a move"),
        Command("XDEL", INTERNAL, ("key", "any?"), "internal: delete during a move"),
        Command("XPEEK", INTERNAL, ("key",), "internal: a key's state with its deadline"),
        Command("XFILL", INTERNAL, ("any",), "internal: a moving key's state from its old owner"),
        Command("XSEEN", INTERNAL, ("any",), "internal: a tagged write's outcome, if applied"),
        Command("XCONFIG", INTERNAL, ("any",), "internal: the config manager's configuration"),
        Command("XFLUSH", INTERNAL, (), "internal: drop every key (FLUSHALL)"),
        Command("XBACKUP", INTERNAL, ("any",), "internal: stream a copy of every key"),
        Command("XHEALTH", INTERNAL, (), "internal: a heartbeat that says the node's epoch"),
        Command("XREPL", INTERNAL, ("any",), "internal: records from a shard's primary"),
        Command("XHANDOVER", INTERNAL, ("any",),
                "internal: hold a primary's data requests for a planned handover"),
        Command("CONFIG", META, ("any?",),
                "The cluster configuration: epoch, members, any move.", "[SINCE_EPOCH]"),
    )
}

# The commands a user types; the internal ones (and the client's ONCE) are not advertised.
USER_COMMANDS = [c for c in COMMANDS.values() if c.kind != INTERNAL and c.name != "ONCE"]
# Data commands on one key (their first argument): routed to the key's owner.
SINGLE_KEY_OPS = frozenset(c.name for c in COMMANDS.values()
                           if c.kind in (READ, WRITE) and c.args[:1] == ("key",))
WRITE_OPS = frozenset(c.name for c in COMMANDS.values() if c.kind == WRITE) - {"ONCE"}
PIPE_OPS = SINGLE_KEY_OPS | {"PING", "ONCE"}
READ_OPS = SINGLE_KEY_OPS - WRITE_OPS  # (on one key)

_EXPIRY = ("ex", "px", "exat", "pxat")
_SET_FLAGS = ("keepttl", "nx", "xx", "get")
EXPIRE_FLAGS = ("NX", "XX", "GT", "LT", "XX GT", "XX LT")  # (XX with GT or LT: both hold)


def _amount(value: Any, what: str) -> int:
    """An integer argument: an int, or its decimal text (as typed, or from RESP)."""
    if isinstance(value, (bytes, str)):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if not re.fullmatch(r"0|-?[1-9][0-9]{0,18}", text):  # (as Redis: no "05", no "-0")
            raise ProtocolError(f"value is not an integer or out of range ({what}: "
                                f"{text[:32]!r})")
        value = int(text)
    if not _is_int(value) or not -(1 << 63) <= value < (1 << 63):
        raise ProtocolError(f"value is not an integer or out of range ({what} must fit "
                            "in 64 bits)")
    return value  # type: ignore[no-any-return]


def _set_options(value: Any, limits: Limits, getex: bool = False) -> dict[str, Any]:
    """SET's (or GETEX's) options map, checked: at most one deadline option (positive;
    KEEPTTL counts as one, PERSIST for GETEX), at most one of NX, XX and IFEQ."""
    command = "GETEX" if getex else "SET"
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_OPTIONS:
        raise ProtocolError(f"{command} options must be a map")
    out: dict[str, Any] = {}
    allowed = (*_EXPIRY, "persist") if getex else (*_EXPIRY, *_SET_FLAGS, "ifeq")
    for name, v in value.items():
        name = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        if not isinstance(name, str) or name.lower() not in allowed:
            raise ProtocolError(f"{command} has no option {str(name)[:32]!r}; it takes "
                                + ", ".join(a.upper() for a in allowed))
        name = name.lower()
        if name in _EXPIRY:
            n = _amount(v, name.upper())
            if n <= 0 or n > MAX_DEADLINE:
                raise CommandError(f"invalid expire time in '{command.lower()}' command")
            out[name] = n
        elif name == "ifeq":
            out[name] = _value(v, limits)
        elif v is not False and v is not None:
            out[name] = True
    timing = [n for n in (*_EXPIRY, "keepttl", "persist") if n in out]
    if len(timing) > 1 or len([n for n in ("nx", "xx", "ifeq") if n in out]) > 1:
        raise ProtocolError(f"syntax error: {command} takes at most one of "
                            + ("EX, PX, EXAT, PXAT and PERSIST" if getex else
                               "EX, PX, EXAT, PXAT and KEEPTTL, and one of NX, XX and IFEQ"))
    return out


def options_from_words(command: str, words: list[bytes]) -> dict[str, Any]:
    """The options map of SET or GETEX from the words a user (or a Redis client) gives
    after the key and value, as Redis takes them: ``EX 10 NX GET``. An option given
    twice is taken (the last EX of ``EX 10 EX 20`` counts), as Redis takes it; two
    options that conflict (EX and PX, NX and XX) are refused."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i].decode("ascii", "replace").lower()
        if word in _EXPIRY or word == "ifeq" and command == "SET":
            if i + 1 >= len(words):
                raise ProtocolError("syntax error")
            out[word] = words[i + 1] if word == "ifeq" else _amount(words[i + 1], word.upper())
            i += 2
            continue
        if word in _SET_FLAGS and command == "SET" or word == "persist" and command == "GETEX":
            out[word] = True
            i += 1
            continue
        raise ProtocolError(f"syntax error: {command} does not take {word.upper()[:32]!r}")
    return out


def _as_bytes(value: Any, what: str) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise ProtocolError(f"{what} must be bytes or text, not {type(value).__name__}")


def _key(value: Any, limits: Limits) -> bytes:
    key = _as_bytes(value, "key")
    if len(key) > limits.max_key_bytes:
        raise LimitExceeded(f"key of {len(key)} bytes is over the limit of {limits.max_key_bytes}")
    return key


def _value(value: Any, limits: Limits) -> bytes:
    data = _as_bytes(value, "value")
    if len(data) > limits.max_value_bytes:
        raise LimitExceeded(
            f"value of {len(data)} bytes is over the limit of {limits.max_value_bytes}"
        )
    return data


def check_stored(key: bytes, value: bytes | None, limits: Limits) -> None:
    """Refuse a key or value over the limits, as SET would (for what internal requests
    carry: a moving key's state may not be larger than a client could have written)."""
    _key(key, limits)
    if value is not None:
        _value(value, limits)


def _list(value: Any, what: str, limits: Limits) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} must be an array, not {type(value).__name__}")
    if not value:
        raise ProtocolError(f"{what} must not be empty")
    if len(value) > limits.max_batch:
        raise LimitExceeded(
            f"{what} has {len(value)} items, over the batch limit of {limits.max_batch}"
        )
    return value


def _check_arg(kind: str, value: Any, limits: Limits) -> Any:
    kind = kind.rstrip("?")
    if kind == "key":
        return _key(value, limits)
    if kind == "value":
        return _value(value, limits)
    if kind == "keys":
        return [_key(k, limits) for k in _list(value, "key list", limits)]
    if kind == "pairs":
        items = value
        if isinstance(items, dict):
            items = [x for kv in items.items() for x in kv]
        if not isinstance(items, list) or len(items) % 2:
            raise ProtocolError("MSET takes an even number of items: KEY VALUE [KEY VALUE ...]")
        if len(items) // 2 > limits.max_batch:
            raise LimitExceeded(
                f"MSET of {len(items) // 2} keys is over the batch limit of {limits.max_batch}"
            )
        if not items:
            raise ProtocolError("MSET needs at least one KEY VALUE pair")
        return [_key(x, limits) if i % 2 == 0 else _value(x, limits) for i, x in enumerate(items)]
    if kind == "cursor":
        return _cursor(value)
    if kind == "pattern":
        if value is None:
            return None
        return check_pattern(_as_bytes(value, "pattern"))
    if kind == "count":
        if not _is_int(value) or value < 1:
            raise ProtocolError("count must be a positive integer")
        return min(value, limits.max_batch)
    if kind == "budget":
        if value is None:
            return limits.max_message_bytes
        if not _is_int(value) or value < 1:
            raise ProtocolError("a reply budget must be a positive integer of bytes")
        return min(value, limits.max_message_bytes)
    if kind == "replica_action":
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or value.upper() not in ("ADD", "REMOVE"):
            raise ProtocolError("REPLICA takes ADD SHARD HOST:PORT or REMOVE HOST:PORT")
        return value.upper()
    if kind == "action":
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if not isinstance(value, str) or value.upper() not in ("ABORT",):
            raise ProtocolError("MOVE takes one action: ABORT")
        return value.upper()
    if kind == "addr":
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str) or len(value) > MAX_ADDRESS:
            raise ProtocolError("node address must be text HOST:PORT")
        return value
    if kind == "options":
        if value is None:
            return {}
        if (not isinstance(value, dict) or len(value) > MAX_OPTIONS
                or not all(isinstance(k, str) for k in value)):
            raise ProtocolError(f"options must be a map of at most {MAX_OPTIONS} text keys")
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in value.values()):
            raise ProtocolError("option values must be numbers, text, booleans or null")
        return value
    if kind == "commands":
        return _list(value, "pipeline", limits)
    if kind == "atomic":
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ProtocolError("atomic must be true or false")
        return value
    if kind == "int":
        return _amount(value, "the number")
    if kind == "client_id":
        if type(value) is not bytes or not 0 < len(value) <= MAX_CLIENT_ID:
            raise ProtocolError(f"a client id is 1 to {MAX_CLIENT_ID} bytes")
        return value
    if kind == "seq":
        if not _is_int(value) or not 0 <= value < 1 << 63:
            raise ProtocolError("a sequence number is an integer from 0 to 2**63 - 1")
        return value
    if kind == "request":  # the write ONCE tags: checked as a request of its own
        op, args = check_request(value, limits)
        if op not in WRITE_OPS:
            raise ProtocolError(f"ONCE tags a write, not {op}")
        return [op, args]
    if kind == "setopts":
        return _set_options(value, limits)
    if kind == "getexopts":
        return _set_options(value, limits, getex=True)
    if kind == "expireflag":
        if value is None:
            return None
        flag = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if isinstance(flag, str) and " " in flag:  # (LT XX is XX LT)
            flag = " ".join(sorted(flag.split(), key=lambda word: word.upper() != "XX"))
        if not isinstance(flag, str) or flag.upper() not in EXPIRE_FLAGS:
            raise ProtocolError("the expire flag must be NX, XX, GT or LT (or XX GT, XX LT: "
                                "both hold)")
        return flag.upper()
    return value  # "any": checked by the receiver


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cursor(value: Any) -> str:
    """A SCAN cursor as text: ``0`` or what a previous SCAN returned."""
    if _is_int(value):
        if not 0 <= value < 2**64:
            raise ProtocolError("a numeric cursor must be from 0 to 2**64 - 1")
        return str(value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CURSOR or not value.isascii():
        raise ProtocolError("cursor must be the text a previous SCAN returned, or 0")
    return value


def _peek_op(body: bytes) -> bytes:
    """The op text of an encoded request, if it starts like one (for choosing bounds)."""
    if len(body) > 2 and 0x81 <= body[0] <= 0x88 and 0x61 <= body[1] <= 0x77:
        return body[2 : 2 + (body[1] - 0x60)]
    return b""


_INTERNAL_OPS = frozenset(c.name.encode() for c in COMMANDS.values() if c.kind == INTERNAL)


def decode_request(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """The CBOR item of a request body, decoded within the bounds a request can have
    (zkv.core.cbor): no tags, nesting of at most MAX_DEPTH, at most ``limits.max_items``
    items (a move's internal requests may carry MAX_RANGES hash ranges)."""
    internal = _peek_op(body).upper() in _INTERNAL_OPS
    items = INTERNAL_ITEMS if internal else limits.max_items
    longest = max(2 * limits.max_batch, MAX_RANGES if internal else 0)
    try:
        return cbor.decode(body, items, INTERNAL_DEPTH if internal else MAX_DEPTH, longest,
                           MAX_TOP)
    except cbor.Malformed as exc:
        raise ProtocolError(f"body is not a valid request: {exc}") from None


_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from


def _head_at(body: bytes, pos: int, major: int) -> tuple[int, int] | None:
    """The number a CBOR head of ``major`` type at ``pos`` carries (a length, or an
    unsigned integer) and where the head ends; None if no such head is there."""
    ib = body[pos]
    if ib >> 5 != major:
        return None
    info = ib & 31
    if info < 24:
        return info, pos + 1
    if info == 24:
        return body[pos + 1], pos + 2
    if info == 25:
        return _U16(body, pos + 1)[0], pos + 3
    if info == 26:
        return _U32(body, pos + 1)[0], pos + 5
    if info == 27:
        return _U64(body, pos + 1)[0], pos + 9
    return None


def _bytes_at(body: bytes, pos: int) -> tuple[bytes | None, int]:
    """The byte string whose head is at ``pos`` and where it ends; (None, 0) if none is."""
    head = _head_at(body, pos, 2)
    if head is None or head[0] >= 1 << 32:
        return None, 0
    n, pos = head
    return body[pos : pos + n], pos + n


_GET_HEAD, _DEL_HEAD, _SET_HEAD = b"\x82\x63GET", b"\x82\x63DEL", b"\x83\x63SET"


def _fast_single(body: bytes, limits: Limits) -> tuple[str, list[Any]] | None:
    """GET/DEL KEY and SET KEY VALUE as our client encodes them, read straight from the
    bytes (nearly all traffic; no CBOR decoder, so nothing a tag could do); None for
    anything else, which takes the general path."""
    head = body[:5]
    try:
        if head == _GET_HEAD or head == _DEL_HEAD:
            key, end = _bytes_at(body, 5)
            if key is not None and end == len(body) and len(key) <= limits.max_key_bytes:
                return ("GET" if head == _GET_HEAD else "DEL"), [key]
        elif head == _SET_HEAD:
            key, end = _bytes_at(body, 5)
            if key is not None and len(key) <= limits.max_key_bytes:
                value, end = _bytes_at(body, end)
                if (value is not None and end == len(body)
                        and len(value) <= limits.max_value_bytes):
                    return "SET", [key, value]
    except (IndexError, struct.error):
        return None
    return None


_ONCE_HEAD = b"\x84\x64ONCE"
_FAST_TAGGED = frozenset(("SET", "DEL"))  # the writes check_request's short path reads


def _fast_once(body: bytes, limits: Limits) -> tuple[str, list[Any]] | None:
    """[ONCE, client_id, seq, [SET key value] or [DEL key]] as our client encodes it,
    read straight from the bytes (every single write it sends); None for anything
    else, which takes the general path."""
    try:
        client, pos = _bytes_at(body, 6)
        if client is None or not 0 < len(client) <= MAX_CLIENT_ID:
            return None
        head = _head_at(body, pos, 0)
        if head is None or head[0] >= 1 << 63:
            return None
        seq, pos = head
        inner = _fast_single(body[pos:], limits)
    except (IndexError, struct.error):
        return None
    if inner is None or inner[0] == "GET":
        return None
    return "ONCE", [client, seq, [inner[0], inner[1]]]


def parse_request(body: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, list[Any]]:
    """Decode and check one request body. Returns ``(op, args)``.

    Raises :class:`ProtocolError` (or a subclass) for anything else.
    """
    fast = _fast_single(body, limits)
    if fast is not None:
        return fast
    if body[:6] == _ONCE_HEAD:
        fast = _fast_once(body, limits)
        if fast is not None:
            return fast
    return check_request(decode_request(body, limits), limits)


def check_request(item: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[str, list[Any]]:
    """Check an already decoded request (one element of a PIPE, for example)."""
    # Fast path for the single-key commands that are nearly all the traffic; anything
    # it does not accept as-is goes through the general checks below.
    if type(item) is list:
        n = len(item)
        if n == 2:
            op, key = item
            if (op == "GET" or op == "DEL" or op == "EXISTS") and type(key) is bytes \
                    and len(key) <= limits.max_key_bytes:
                return op, [key]
        elif n == 3 and item[0] == "SET":
            _, key, value = item
            if type(key) is bytes and type(value) is bytes \
                    and len(key) <= limits.max_key_bytes and len(value) <= limits.max_value_bytes:
                return "SET", [key, value]
        elif n == 4 and item[0] == "SET" and type(item[3]) is dict and len(item[3]) == 1:
            _, key, value, opts = item  # SET key value EX|PX|EXAT|PXAT n: what caches send
            (name, amount), = opts.items()
            if (name in _EXPIRY and type(amount) is int and 0 < amount <= MAX_DEADLINE
                    and type(key) is bytes and type(value) is bytes
                    and len(key) <= limits.max_key_bytes
                    and len(value) <= limits.max_value_bytes):
                return "SET", [key, value, opts]
        elif n == 4 and item[0] == "ONCE" and type(item[3]) is list:
            _, client, seq, inner = item  # a tagged write, as zkv.Client pipelines it
            if (type(client) is bytes and 0 < len(client) <= MAX_CLIENT_ID
                    and type(seq) is int and 0 <= seq < 1 << 63 and inner
                    and type(inner[0]) is str and inner[0] in _FAST_TAGGED):
                op, args = check_request(inner, limits)
                if op in WRITE_OPS:
                    return "ONCE", [client, seq, [op, args]]
    if not isinstance(item, list) or not item:
        raise ProtocolError("request must be a non-empty CBOR array [OP, ARG, ...]")
    op = item[0]
    if isinstance(op, bytes):
        op = op.decode("ascii", "replace")
    if not isinstance(op, str):
        raise ProtocolError("request operation must be text")
    op = op.upper()
    cmd = COMMANDS.get(op)
    if cmd is None:
        raise UnknownCommand(f"unknown command {op[:64]!r}")
    args = item[1:]
    if not cmd.required <= len(args) <= len(cmd.args):
        raise ProtocolError(f"wrong number of arguments for {op}; usage: {cmd.usage}")
    return op, [_check_arg(kind, a, limits) for kind, a in zip(cmd.args, args)]


def check_pipe_item(item: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[str, list[Any]]:
    """One command of a PIPE, checked: a command on one key (tagged or not) or PING."""
    op, args = check_request(item, limits)
    if op not in PIPE_OPS or op == "ONCE" and args[2][0] not in SINGLE_KEY_OPS:
        inner = args[2][0] if op == "ONCE" else op
        raise CommandError(f"{inner} cannot be used in a pipeline")
    return op, args


def encode_request(op: str, *args: Any) -> bytes:
    return cbor2.dumps([op, *args])


def encode_ok(result: Any) -> bytes:
    return cbor2.dumps([OK, result])


def encode_error(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return cbor2.dumps([ERR, code, message, details] if details else [ERR, code, message])


def _head(major: int, n: int) -> bytes:
    """A CBOR item head: major type and length, in the shortest form (as cbor2 writes)."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 256:
        return bytes((major << 5 | 24, n))
    if n < 65536:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 4294967296:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


_OK_OK = cbor2.dumps([OK, "OK"])
_OK_NONE = cbor2.dumps([OK, None])


_KEYED_HEADS = {"GET": b"\x82\x63GET", "DEL": b"\x82\x63DEL", "EXISTS": b"\x82\x66EXISTS",
                "SET": b"\x83\x63SET"}


def encode_keyed(op: str, args: list[bytes]) -> bytes:
    """``encode_request(op, *args)`` for GET, DEL, EXISTS (a key) and SET (key, value),
    byte for byte, without cbor2 (nearly all traffic from the RESP front)."""
    return _KEYED_HEADS[op] + b"".join(_head(2, len(a)) + a for a in args)


def encode_ok_items(items: list[Any]) -> bytes:
    """``encode_ok(items)`` for a pipeline's list of reply items, byte for byte, about
    twice as fast: the common items ([0, bytes], [0, None], [0, "OK"]) are written
    directly and anything else is left to cbor2."""
    parts = [b"\x82\x00", _head(4, len(items))]
    add = parts.append
    for item in items:
        if type(item) is list and len(item) == 2 and type(item[0]) is int and item[0] == OK:
            value = item[1]
            if type(value) is bytes:
                add(b"\x82\x00")
                add(_head(2, len(value)))
                add(value)
                continue
            if value is None:
                add(_OK_NONE)
                continue
            if type(value) is str and value == "OK":
                add(_OK_OK)
                continue
        add(cbor2.dumps(item))
    return b"".join(parts)


def encode_exc(exc: ZkvError) -> bytes:
    return encode_error(exc.code, exc.message, exc.details)


def reply_item(result: Any) -> list[Any]:
    return [OK, result]


def error_item(exc: ZkvError) -> list[Any]:
    if exc.details:
        return [ERR, exc.code, exc.message, exc.details]
    return [ERR, exc.code, exc.message]


def partial_delete(message: str, failed: int, keys: int, deleted: int) -> str:
    """The error of a DEL of ``keys`` keys of which ``failed`` failed (``message``: the
    first failure's): the others' deletes stand, so it says how many went."""
    return (f"{message}; {failed} of the {keys} keys were not deleted, and {deleted} of the "
            "others were")


def result_of(item: Any) -> Any:
    """The result a decoded reply carries, or raise the error it reports."""
    if isinstance(item, list) and item:
        if item[0] == OK and len(item) == 2:
            return item[1]
        if item[0] == ERR and len(item) in (3, 4):
            details = item[3] if len(item) == 4 and isinstance(item[3], dict) else None
            raise error_from_wire(str(item[1]), str(item[2]), details)
    raise ProtocolError(f"malformed reply: {item!r:.80}")


def decode_reply(body: bytes) -> Any:
    """The result carried by a reply body; raises the zkv error it reports."""
    try:
        item = cbor2.loads(body)
    except Exception as exc:
        raise ProtocolError(f"reply is not valid CBOR: {exc}") from None
    return result_of(item)


def glob_matcher(pattern: bytes | None) -> re.Pattern[bytes] | None:
    """A compiled matcher (``.fullmatch``) for a Redis-style glob; see zkv.core.glob."""
    return glob.matcher(pattern)


# -- envelopes: many requests to one node in one message, with the sender's epoch -------
#
# A router (the proxy, a follower, the direct client) sends each node the requests of
# a loop turn together, tagged, with the epoch of the configuration it routed them by:
#
#     request envelope = b"\0ZB" | epoch u64 | (tag u64 | length u32 | body)*
#     reply envelope   = b"\0ZR" | (tag u64 | length u32 | reply body)*
#
# (big-endian). A body is an ordinary request (or reply) body. A node answers the
# requests in order; a reply may come in several envelopes when the replies are big.

ENVELOPE = b"\x00ZB"
ENVELOPE_TAGGED = b"\x00ZC"  # with the cluster's tag after the epoch
REPLY_ENVELOPE = b"\x00ZR"
_ENTRY = struct.Struct(">QI")
_EPOCH = struct.Struct(">Q")


def cluster_tag(cluster: str) -> bytes:
    """The 8 bytes that name cluster ``cluster`` (its id) in a request envelope; b""
    for a configuration from before cluster ids."""
    return hashlib.blake2b(cluster.encode(), digest_size=8).digest() if cluster else b""


def encode_envelope(epoch: int, items: list[tuple[int, bytes]], cluster: bytes = b"") -> bytes:
    """A router's requests to one node, routed by configuration ``epoch`` of the cluster
    that ``cluster`` (:func:`cluster_tag`) names: a node of another cluster refuses them,
    whatever its epoch (two clusters count their epochs alike)."""
    pack = _ENTRY.pack
    parts = [ENVELOPE_TAGGED, _EPOCH.pack(epoch), cluster] if len(cluster) == 8 \
        else [ENVELOPE, _EPOCH.pack(epoch)]
    for tag, body in items:
        parts.append(pack(tag, len(body)))
        parts.append(body)
    return b"".join(parts)


def encode_reply_envelope(items: list[tuple[int, bytes]]) -> bytes:
    pack = _ENTRY.pack
    parts = [REPLY_ENVELOPE]
    for tag, body in items:
        parts.append(pack(tag, len(body)))
        parts.append(body)
    return b"".join(parts)


def _entries(body: bytes, start: int, limit: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    unpack, size, n = _ENTRY.unpack_from, _ENTRY.size, len(body)
    pos = start
    while pos < n:
        if len(out) >= limit:
            raise ProtocolError(f"an envelope of more than {limit} requests")
        if n - pos < size:
            raise ProtocolError("an envelope ends inside an entry's head")
        tag, length = unpack(body, pos)
        pos += size
        if length > n - pos:
            raise ProtocolError("an envelope entry runs past the end of the message")
        out.append((tag, body[pos : pos + length]))
        pos += length
    return out


def decode_envelope(body: bytes, limit: int) -> tuple[int, list[tuple[int, bytes]], bytes]:
    """(epoch, [(tag, request body)], cluster tag or b"") of a request envelope;
    ProtocolError if damaged."""
    if len(body) >= 19 and body[:3] == ENVELOPE_TAGGED:
        return _EPOCH.unpack_from(body, 3)[0], _entries(body, 19, limit), body[11:19]
    if len(body) < 11 or body[:3] != ENVELOPE:
        raise ProtocolError("not a request envelope")
    return _EPOCH.unpack_from(body, 3)[0], _entries(body, 11, limit), b""


def decode_reply_envelope(body: bytes) -> list[tuple[int, bytes]]:
    if body[:3] != REPLY_ENVELOPE:
        raise ProtocolError("not a reply envelope")
    return _entries(body, 3, 1 << 30)
