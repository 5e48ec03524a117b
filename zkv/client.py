"""``zkv.Client``: the Python client of a zkv proxy (or of one storage node).

    >>> c = zkv.Client("127.0.0.1:8000", timeout=2.0)
    >>> c.set("username", "Alice")
    >>> c.get("username")
    b'Alice'

Keys and values may be ``str`` (sent as UTF-8) or ``bytes``; values come back as
``bytes`` and a missing key as ``None``. Every call has a deadline. Reads that
time out are retried on a fresh socket (the ZeroMQ Guide's Lazy Pirate); writes
are not retried, because a retried write could undo a later one: their timeout
raises :class:`zkv.Timeout`, whose message says the outcome is unknown. Errors
are the :mod:`zkv.errors` family, the same type the server reported.

A Client is not thread-safe: give each thread its own.
"""

from __future__ import annotations

import itertools
import struct
import time
from typing import Any, Iterator, Mapping, Sequence

import zmq

from . import protocol as P
from .errors import ProtocolError, Timeout

Key = str | bytes
Value = str | bytes | int | float

_TAG = struct.Struct("<Q")


def to_bytes(value: Any, what: str = "value") -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


class Client:
    def __init__(self, address: str = "127.0.0.1:8000", timeout: float = 5.0,
                 retries: int = 2) -> None:
        self.address = address.removeprefix("tcp://")
        self.timeout = timeout
        self.retries = retries
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._tags = itertools.count(1)

    # -- plumbing --------------------------------------------------------------
    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.connect(f"tcp://{self.address}")
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _exchange(self, body: bytes) -> bytes:
        """Send one body and wait for its reply, or raise Timeout."""
        sock = self._socket()
        tag = _TAG.pack(next(self._tags))
        sock.send_multipart([b"", tag, body])
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                self._reset()  # Lazy Pirate: a fresh socket for whatever comes next
                raise Timeout(f"no reply from {self.address} within {self.timeout:g}s")
            frames = sock.recv_multipart()
            if len(frames) == 3 and frames[1] == tag:
                return frames[2]
            # a late reply to an earlier request that timed out: drop it

    def call(self, op: str, *args: Any, retry: bool | None = None) -> Any:
        """Send one command; retried on timeout when it is a read (or ``retry=True``)."""
        body = P.encode_request(op, *args)
        kind = P.COMMANDS[op].kind if op in P.COMMANDS else P.WRITE
        if retry is None:
            retry = kind in (P.READ, P.META) and op != "PIPE"
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                reply = self._exchange(body)
            except Timeout as exc:
                if attempt + 1 < attempts:
                    continue
                if kind in (P.WRITE, P.ADMIN) or op == "PIPE":
                    raise Timeout(f"{exc}; the outcome of {op} is unknown") from None
                raise Timeout(f"{exc} after {attempts} attempts") from None
            return P.decode_reply(reply)
        raise ProtocolError("unreachable")  # pragma: no cover

    # -- data commands -----------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.call("PING") == "PONG")

    def get(self, key: Key) -> bytes | None:
        result: bytes | None = self.call("GET", to_bytes(key, "key"))
        return result

    def set(self, key: Key, value: Value) -> bool:
        return bool(self.call("SET", to_bytes(key, "key"), to_bytes(value)) == "OK")

    def delete(self, key: Key) -> bool:
        """Delete ``key``; whether it existed."""
        return bool(self.call("DEL", to_bytes(key, "key")))

    def exists(self, key: Key) -> bool:
        return bool(self.call("EXISTS", to_bytes(key, "key")))

    def mget(self, keys: Sequence[Key]) -> list[bytes | None]:
        result: list[bytes | None] = self.call("MGET", [to_bytes(k, "key") for k in keys])
        return result

    def mset(self, mapping: Mapping[Key, Value]) -> bool:
        pairs = [x for k, v in mapping.items() for x in (to_bytes(k, "key"), to_bytes(v))]
        return bool(self.call("MSET", pairs) == "OK")

    def scan(self, cursor: str | int = "0", match: Key | None = None,
             count: int | None = None) -> tuple[str, list[bytes]]:
        """One SCAN page: ``(next_cursor, keys)``; ``next_cursor == "0"`` at the end."""
        args: list[Any] = [str(cursor), to_bytes(match, "pattern") if match is not None else None]
        if count is not None:
            args.append(count)
        nxt, keys = self.call("SCAN", *args)
        return str(nxt), list(keys)

    def scan_iter(self, match: Key | None = None, count: int | None = None) -> Iterator[bytes]:
        cursor = "0"
        while True:
            cursor, keys = self.scan(cursor, match, count)
            yield from keys
            if cursor == "0":
                return

    def keys(self, pattern: Key = "*") -> list[bytes]:
        return list(self.call("KEYS", to_bytes(pattern, "pattern")))

    # -- cluster commands -----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return dict(self.call("INFO"))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.call("NODES"))

    def ring(self, key: Key) -> dict[str, Any]:
        return dict(self.call("RING", to_bytes(key, "key")))

    def status(self) -> dict[str, Any]:
        return dict(self.call("STATUS"))

    # -- administration ------------------------------------------------------------
    def add_node(self, address: str, *, weight: float | None = None, dry_run: bool = False,
                 rate: float | None = None, wait: bool = True,
                 wait_timeout: float | None = None) -> "dict[str, Any] | MoveHandle":
        """Add a node and move its share of the keys onto it.

        Waits for the move to finish by default and returns its final status;
        ``wait=False`` returns a :class:`MoveHandle` at once; ``dry_run`` returns
        the plan (which share moves from which node to which) and changes nothing.
        """
        options: dict[str, Any] = {"dry_run": dry_run}
        if weight is not None:
            options["weight"] = weight
        return self._admin("ADD", address, options, rate, wait, wait_timeout)

    def remove_node(self, address: str, *, dry_run: bool = False, rate: float | None = None,
                    wait: bool = True,
                    wait_timeout: float | None = None) -> "dict[str, Any] | MoveHandle":
        """Move a node's keys to their new owners, then drop it from the ring."""
        return self._admin("REMOVE", address, {"dry_run": dry_run}, rate, wait, wait_timeout)

    def _admin(self, op: str, address: str, options: dict[str, Any], rate: float | None,
               wait: bool, wait_timeout: float | None) -> "dict[str, Any] | MoveHandle":
        if rate is not None:
            options["rate"] = rate
        plan: dict[str, Any] = self.call(op, address, options)
        if plan.get("dry_run"):
            return plan
        handle = MoveHandle(self, plan)
        if not wait:
            return handle
        return handle.wait(wait_timeout)


class MoveHandle:
    """A move started by ``add_node``/``remove_node(wait=False)``: follow it or wait for it."""

    def __init__(self, client: Client, plan: dict[str, Any]) -> None:
        self.client = client
        self.plan = plan
        self.id: str | None = plan.get("id")

    def status(self) -> dict[str, Any] | None:
        """The move's progress, or None once it has finished."""
        move = self.client.status().get("move")
        if self.id is None or move is None or move.get("id") != self.id:
            return None
        return dict(move)

    def done(self) -> bool:
        return self.status() is None

    def wait(self, timeout: float | None = None, poll: float = 0.2,
             on_progress: "Any | None" = None) -> dict[str, Any]:
        """Block until the move has finished; ``on_progress(status)`` on every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status is None:
                return {**self.plan, "finished": True, "epoch": self.client.status()["epoch"]}
            if on_progress is not None:
                on_progress(status)
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"move {self.id} still running after {timeout:g}s: {status}")
            time.sleep(poll)
