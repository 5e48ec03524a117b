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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import zmq

from . import frames as wire
from . import protocol as P
from .errors import ConfigError, ProtocolError, Timeout, Unavailable, ZkvError

Key = str | bytes
Value = str | bytes | int | float

_TAG = struct.Struct("<Q")


def _checked_address(address: str) -> str:
    """``HOST:PORT`` (or ``[IPv6]:PORT``, with an optional ``tcp://``), normalised;
    ConfigError for anything else, before a socket is made."""
    from .config import format_address, parse_address

    if not isinstance(address, str):
        raise ConfigError(f"the address must be text HOST:PORT, not {type(address).__name__}")
    host, port = parse_address(address.removeprefix("tcp://"), "address")
    return format_address(host, port)


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
        self.address = _checked_address(address)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"retries must be a non-negative integer, not {retries!r}")
        self.timeout = float(timeout)
        self.retries = retries
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._tags = itertools.count(1)

    # -- plumbing --------------------------------------------------------------
    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, 1)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.IPV6, 1)  # "[::1]:8000" as well as IPv4 and names
            sock.connect(f"tcp://{self.address}")
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, body: bytes) -> bytes:
        """Send one body and wait for its reply, or raise Timeout."""
        try:
            return self._send_and_wait(body)
        except zmq.ZMQError as exc:  # translated at the boundary: one error family
            self._reset()
            raise Unavailable(f"cannot talk to {self.address}: {exc}") from exc

    def _send_and_wait(self, body: bytes) -> bytes:
        sock = self._socket()
        tag = _TAG.pack(next(self._tags))
        wire.send(sock, [tag, body])
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000))):
                self._reset()  # Lazy Pirate: a fresh socket for whatever comes next
                raise Timeout(f"no reply from {self.address} within {self.timeout:g}s")
            frames = wire.recv(sock)
            if len(frames) == 2 and frames[0] == tag:
                return frames[1]
            # a late reply to an earlier request that timed out: drop it

    def _exchange_many(self, bodies: list[bytes]) -> list[bytes | None]:
        """Send every body at once (DEALER pipelining) and collect the replies in
        order; a body with no reply before the deadline gets None."""
        sock = self._socket()
        tags = [_TAG.pack(next(self._tags)) for _ in bodies]
        index = {tag: i for i, tag in enumerate(tags)}
        for tag, body in zip(tags, bodies):
            wire.send(sock, [tag, body])
        replies: list[bytes | None] = [None] * len(bodies)
        left = len(bodies)
        deadline = time.monotonic() + self.timeout
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
                self._reset()
                break
            frames = wire.recv(sock)
            i = index.pop(frames[0], None) if len(frames) == 2 else None
            if i is not None:
                replies[i] = frames[1]
                left -= 1
        return replies

    def call_many(self, commands: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Send many commands at once, each its own request, all in flight together.
        Returns each result, or the ZkvError it raised, in order. Nothing is retried."""
        bodies = [P.encode_request(op, *args) for op, args in commands]
        out: list[Any] = []
        for (op, _), reply in zip(commands, self._exchange_many(bodies)):
            if reply is None:
                out.append(Timeout(f"no reply from {self.address} within {self.timeout:g}s; "
                                   f"the outcome of {op} is unknown"))
                continue
            try:
                out.append(P.decode_reply(reply))
            except ZkvError as exc:
                out.append(exc)
        return out

    def pipeline(self) -> Pipeline:
        """Queue commands and send them in few messages: ``with c.pipeline() as p:
        p.set(k, v); p.get(k); results = p.execute()``."""
        return Pipeline(self)

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

    def mset(self, mapping: Mapping[str, Value] | Mapping[bytes, Value] | Mapping[Key, Value]
             ) -> bool:
        # (a Mapping is invariant in its key: dict[str, str] is not a Mapping[str | bytes, ...])
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
                 wait_timeout: float | None = None) -> dict[str, Any] | MoveHandle:
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
                    wait_timeout: float | None = None) -> dict[str, Any] | MoveHandle:
        """Move a node's keys to their new owners, then drop it from the ring."""
        return self._admin("REMOVE", address, {"dry_run": dry_run}, rate, wait, wait_timeout)

    def _admin(self, op: str, address: str, options: dict[str, Any], rate: float | None,
               wait: bool, wait_timeout: float | None) -> dict[str, Any] | MoveHandle:
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
             on_progress: Any | None = None) -> dict[str, Any]:
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


PIPELINE_CHUNK = 1000  # commands per PIPE message; several messages are in flight at once


class Pipeline:
    """Commands queued on the client and sent together by :meth:`execute`.

    The proxy splits each message per node and merges the replies in order.
    A pipeline is not a transaction: each command succeeds or fails on its own.
    Supported: get, set, delete, exists, ping.
    """

    _CONVERT: dict[str, Callable[[Any], Any]] = {
        "GET": lambda r: r,
        "SET": lambda r: r == "OK",
        "DEL": bool,
        "EXISTS": bool,
        "PING": lambda r: r == "PONG",
    }

    def __init__(self, client: Client) -> None:
        self.client = client
        self.commands: list[list[Any]] = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.commands.clear()

    def __len__(self) -> int:
        return len(self.commands)

    def get(self, key: Key) -> Pipeline:
        self.commands.append(["GET", key if type(key) is bytes else to_bytes(key, "key")])
        return self

    def set(self, key: Key, value: Value) -> Pipeline:
        self.commands.append([
            "SET",
            key if type(key) is bytes else to_bytes(key, "key"),
            value if type(value) is bytes else to_bytes(value),
        ])
        return self

    def delete(self, key: Key) -> Pipeline:
        self.commands.append(["DEL", to_bytes(key, "key")])
        return self

    def exists(self, key: Key) -> Pipeline:
        self.commands.append(["EXISTS", to_bytes(key, "key")])
        return self

    def ping(self) -> Pipeline:
        self.commands.append(["PING"])
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands; their results in order. With ``raise_on_error``
        (the default) the first failed command's error is raised after all have
        run; otherwise errors are returned in place. The queue is emptied."""
        commands, self.commands = self.commands, []
        if not commands:
            return []
        chunks = [commands[i : i + PIPELINE_CHUNK] for i in range(0, len(commands), PIPELINE_CHUNK)]
        bodies = [P.encode_request("PIPE", chunk) for chunk in chunks]
        results: list[Any] = []
        for chunk, reply in zip(chunks, self.client._exchange_many(bodies)):
            if reply is None:
                err = Timeout(f"no reply from {self.client.address} within "
                              f"{self.client.timeout:g}s; the outcome of the pipeline is unknown")
                results.extend([err] * len(chunk))
                continue
            try:
                items = P.decode_reply(reply)
            except ZkvError as exc:
                results.extend([exc] * len(chunk))
                continue
            convert = self._CONVERT
            for cmd, item in zip(chunk, items):
                if type(item) is list and len(item) == 2 and item[0] == P.OK:
                    results.append(convert[cmd[0]](item[1]))
                    continue
                try:
                    results.append(convert[cmd[0]](P.result_of(item)))
                except ZkvError as exc:
                    results.append(exc)
        if raise_on_error:
            for r in results:
                if isinstance(r, ZkvError):
                    raise r
        return results
