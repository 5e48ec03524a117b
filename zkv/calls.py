"""The string, counter and expiry commands of ``zkv.Client`` and its pipelines,
named and shaped as redis-py has them, written once for both.

:class:`StringCommands` builds each request and says how its reply is read; the
class it is mixed into carries it out (``_do``): :class:`zkv.Client` sends it at
once and returns the converted reply, :class:`zkv.client.Pipeline` queues it and
returns itself, converting when it runs.

Times: ``ex`` (seconds) and ``px`` (milliseconds) may be ints or
``datetime.timedelta``; ``exat`` (Unix seconds) and ``pxat`` (Unix milliseconds)
ints or ``datetime.datetime``. Deadlines are kept as absolute times by the node
that owns the key, so they hold across restarts, moves and failovers.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from typing import Any

from .errors import BadType, BadValue

Key = str | bytes
Value = str | bytes | int | float
Convert = Callable[[Any], Any]


def to_bytes(value: Any, what: str = "value") -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise BadType(f"{what} must be str or bytes, not {type(value).__name__}")


def _same(result: Any) -> Any:
    return result


def _set_reply(result: Any) -> Any:
    return True if result == "OK" else result


def _bool(result: Any) -> bool:
    return bool(result)


def _seconds(value: int | datetime.timedelta, what: str) -> int:
    if isinstance(value, datetime.timedelta):
        return int(value.total_seconds())
    return _int(value, what)


def _millis(value: int | datetime.timedelta, what: str) -> int:
    if isinstance(value, datetime.timedelta):
        return int(value.total_seconds() * 1000)
    return _int(value, what)


def _unix(value: int | datetime.datetime, what: str, ms: bool) -> int:
    if isinstance(value, datetime.datetime):
        stamp = value.timestamp()
        return int(stamp * 1000) if ms else int(stamp)
    return _int(value, what)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadType(f"{what} must be an integer, not {type(value).__name__}")
    return value


def _expiry_options(ex: Any, px: Any, exat: Any, pxat: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if ex is not None:
        opts["ex"] = _seconds(ex, "ex")
    if px is not None:
        opts["px"] = _millis(px, "px")
    if exat is not None:
        opts["exat"] = _unix(exat, "exat", False)
    if pxat is not None:
        opts["pxat"] = _unix(pxat, "pxat", True)
    return opts


def _flag(nx: bool, xx: bool, gt: bool, lt: bool) -> list[str]:
    flags = [name for name, on in (("NX", nx), ("XX", xx), ("GT", gt), ("LT", lt)) if on]
    if flags in (["XX", "GT"], ["XX", "LT"]):
        return [" ".join(flags)]  # (as Redis: both must hold)
    if len(flags) > 1:
        raise BadValue(f"give at most one of nx, xx, gt and lt (or xx with gt or lt), not "
                       f"{', '.join(f.lower() for f in flags)}")
    return flags


class StringCommands:
    """The commands on one key's string value, its deadline, and counters."""

    def _do(self, op: str, args: list[Any], convert: Convert = _same) -> Any:
        raise NotImplementedError

    def set(self, name: Key, value: Value, ex: int | datetime.timedelta | None = None,
            px: int | datetime.timedelta | None = None, nx: bool = False, xx: bool = False,
            keepttl: bool = False, get: bool = False,
            exat: int | datetime.datetime | None = None,
            pxat: int | datetime.datetime | None = None,
            ifeq: Value | None = None) -> Any:
        """Set ``name`` to ``value``: True, or None when ``nx``/``xx``/``ifeq`` kept it
        from being set; with ``get``, the old value (or None) instead.

        ``ex``/``px``/``exat``/``pxat``: its deadline (else it has none; ``keepttl``
        keeps the one it had). ``nx``: only if absent; ``xx``: only if present;
        ``ifeq``: only if its value equals this (compare-and-set)."""
        opts = _expiry_options(ex, px, exat, pxat)
        for option, on in (("keepttl", keepttl), ("nx", nx), ("xx", xx), ("get", get)):
            if on:
                opts[option] = True
        if ifeq is not None:
            opts["ifeq"] = to_bytes(ifeq)
        args: list[Any] = [to_bytes(name, "key"), to_bytes(value)]
        if opts:
            args.append(opts)
        return self._do("SET", args, _same if get else _set_reply)

    def setnx(self, name: Key, value: Value) -> Any:
        """Set ``name`` only if it does not exist; whether it was set."""
        return self._do("SETNX", [to_bytes(name, "key"), to_bytes(value)], _bool)

    def setex(self, name: Key, time: int | datetime.timedelta, value: Value) -> Any:
        """Set ``name`` to expire in ``time`` seconds (SET EX)."""
        return self.set(name, value, ex=time)

    def psetex(self, name: Key, time_ms: int | datetime.timedelta, value: Value) -> Any:
        """Set ``name`` to expire in ``time_ms`` milliseconds (SET PX)."""
        return self.set(name, value, px=time_ms)

    def getset(self, name: Key, value: Value) -> Any:
        """Set ``name``; its old value (or None). Its deadline goes."""
        return self._do("GETSET", [to_bytes(name, "key"), to_bytes(value)])

    def getdel(self, name: Key) -> Any:
        """The value of ``name`` (or None), deleting it."""
        return self._do("GETDEL", [to_bytes(name, "key")])

    def getex(self, name: Key, ex: int | datetime.timedelta | None = None,
              px: int | datetime.timedelta | None = None,
              exat: int | datetime.datetime | None = None,
              pxat: int | datetime.datetime | None = None, persist: bool = False) -> Any:
        """The value of ``name`` (or None), giving it a new deadline, or none with
        ``persist``."""
        opts = _expiry_options(ex, px, exat, pxat)
        if persist:
            opts["persist"] = True
        args: list[Any] = [to_bytes(name, "key")]
        if opts:
            args.append(opts)
        return self._do("GETEX", args)

    def append(self, key: Key, value: Value) -> Any:
        """Append ``value`` to the value of ``key`` (or set it); the new length."""
        return self._do("APPEND", [to_bytes(key, "key"), to_bytes(value)])

    def strlen(self, name: Key) -> Any:
        """The length of the value of ``name``; 0 if it does not exist."""
        return self._do("STRLEN", [to_bytes(name, "key")])

    def incr(self, name: Key, amount: int = 1) -> Any:
        """Add ``amount`` to the signed 64-bit integer at ``name`` (a missing key counts
        as 0); the new value. The key keeps its deadline."""
        return self.incrby(name, amount)

    def incrby(self, name: Key, amount: int = 1) -> Any:
        """As :meth:`incr`."""
        if _int(amount, "amount") == 1:
            return self._do("INCR", [to_bytes(name, "key")])
        return self._do("INCRBY", [to_bytes(name, "key"), amount])

    def decr(self, name: Key, amount: int = 1) -> Any:
        """Subtract ``amount`` from the integer at ``name``; the new value."""
        return self.decrby(name, amount)

    def decrby(self, name: Key, amount: int = 1) -> Any:
        """As :meth:`decr`."""
        if _int(amount, "amount") == 1:
            return self._do("DECR", [to_bytes(name, "key")])
        return self._do("DECRBY", [to_bytes(name, "key"), amount])

    def expire(self, name: Key, time: int | datetime.timedelta, nx: bool = False,
               xx: bool = False, gt: bool = False, lt: bool = False) -> Any:
        """``name`` expires in ``time`` seconds (at once if not positive); whether it
        was set. ``nx``: only if it has no deadline; ``xx``: only if it has one;
        ``gt``/``lt``: only if later/earlier than its deadline (none counts as
        forever); ``xx`` with ``gt`` or ``lt``: both must hold."""
        return self._do("EXPIRE", [to_bytes(name, "key"), _seconds(time, "time"),
                                   *_flag(nx, xx, gt, lt)], _bool)

    def pexpire(self, name: Key, time: int | datetime.timedelta, nx: bool = False,
                xx: bool = False, gt: bool = False, lt: bool = False) -> Any:
        """As :meth:`expire`, in milliseconds."""
        return self._do("PEXPIRE", [to_bytes(name, "key"), _millis(time, "time"),
                                    *_flag(nx, xx, gt, lt)], _bool)

    def expireat(self, name: Key, when: int | datetime.datetime, nx: bool = False,
                 xx: bool = False, gt: bool = False, lt: bool = False) -> Any:
        """``name`` expires at Unix time ``when`` (seconds); as :meth:`expire`."""
        return self._do("EXPIREAT", [to_bytes(name, "key"), _unix(when, "when", False),
                                     *_flag(nx, xx, gt, lt)], _bool)

    def pexpireat(self, name: Key, when: int | datetime.datetime, nx: bool = False,
                  xx: bool = False, gt: bool = False, lt: bool = False) -> Any:
        """``name`` expires at Unix time ``when`` in milliseconds; as :meth:`expire`."""
        return self._do("PEXPIREAT", [to_bytes(name, "key"), _unix(when, "when", True),
                                      *_flag(nx, xx, gt, lt)], _bool)

    def ttl(self, name: Key) -> Any:
        """Seconds ``name`` has left: -1 if it has no deadline, -2 if it does not exist."""
        return self._do("TTL", [to_bytes(name, "key")])

    def pttl(self, name: Key) -> Any:
        """Milliseconds ``name`` has left; -1 or -2 as :meth:`ttl`."""
        return self._do("PTTL", [to_bytes(name, "key")])

    def expiretime(self, key: Key) -> Any:
        """The Unix time (seconds) ``key`` expires at; -1 or -2 as :meth:`ttl`."""
        return self._do("EXPIRETIME", [to_bytes(key, "key")])

    def pexpiretime(self, key: Key) -> Any:
        """The Unix time in milliseconds ``key`` expires at; -1 or -2 as :meth:`ttl`."""
        return self._do("PEXPIRETIME", [to_bytes(key, "key")])

    def persist(self, name: Key) -> Any:
        """Take the deadline of ``name`` away; whether it had one."""
        return self._do("PERSIST", [to_bytes(name, "key")], _bool)

    def msetnx(self, mapping: Mapping[Any, Value]) -> Any:
        """Set every key of ``mapping`` only if none of them exists; whether they were
        set. The keys must share a hash tag (``{user1}:name``, ``{user1}:mail``) so that
        they live on one shard."""
        pairs = [x for k, v in mapping.items() for x in (to_bytes(k, "key"), to_bytes(v))]
        return self._do("MSETNX", [pairs], _bool)
