"""``zkv.Client``: the Python client of a zkv proxy (or of one storage node).

    >>> c = zkv.Client("127.0.0.1:8000", timeout=2.0)
    >>> c.set("username", "Alice")
    >>> c.get("username")
    b'Alice'

Keys and values may be ``str`` (sent as UTF-8) or ``bytes``; values come back as
``bytes`` and a missing key as ``None``. Every call has a deadline. A request
that could not be sent at all (nothing listens at the address, the connection
was refused or shed) fails at once with :class:`zkv.NotSent`, saying why, after
``retries`` short pauses; since it never left, a write is tried again too. A read
that gets no reply in time is retried on a fresh socket (the ZeroMQ Guide's Lazy
Pirate), and so is a write: each carries this client's id and a sequence number, so
a node that applied it answers its first outcome instead of applying it again. A
read or write that meets an Unavailable error (its node down, a failover under way)
is tried again after a short pause. Only when every try has run out is a write's
outcome unknown: :class:`zkv.Timeout` says so.
Errors are the :mod:`zkv.errors` family, the same type the server reported.

``direct=True`` routes on the client: it asks the proxy for the cluster's
configuration once, then sends each request straight to the node that owns its key,
and goes through the proxy only when a node cannot be reached (see :mod:`zkv.direct`).
Everything else, results and errors included, is as through the proxy.

Threads may share a Client: its exchanges take turns on its sockets (one thread at
a time), so give each busy thread its own for throughput.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from .calls import Convert, StringCommands, to_bytes
from .core import protocol as P
from .errors import (
    BadType,
    ClusterError,
    ConfigError,
    NotSent,
    OutcomeUnknown,
    ProtocolError,
    Timeout,
    Unavailable,
    ZkvError,
)
from .link import Link

if TYPE_CHECKING:
    from .direct import DirectRouting
    from .security import Curve

Key = str | bytes
Value = str | bytes | int | float

CALL_WINDOW = 1024  # single requests of call_many() in flight at once
PIPELINE_WINDOW = 8  # PIPE messages of a pipeline in flight at once
# Commands sent before those of them that got no reply are tried again: a retry then
# follows fewer than ROUND newer writes of this client, well within what a node
# remembers (zkv.core.once.WINDOW), so it finds its first outcome.
ROUND = 4096
RETRY_PAUSE = 0.1  # seconds before the first retry of a request that could not be sent
MAX_TIMEOUT = 1_000_000.0  # seconds (11 days): more than ZeroMQ's poll can wait (an int of ms)


def _checked_address(address: str) -> str:
    """``HOST:PORT`` (or ``[IPv6]:PORT``, with an optional ``tcp://``), normalised;
    ConfigError for anything else, before a socket is made."""
    from .config import format_address, parse_address

    if not isinstance(address, str):
        raise ConfigError(f"the address must be text HOST:PORT, not {type(address).__name__}")
    host, port = parse_address(address.removeprefix("tcp://"), "address")
    return format_address(host, port)


def _unavailable(reply: bytes) -> bool:
    """Whether a reply is an error of the Unavailable family (the node is down, a
    failover is under way, ...): worth another try for a read or a tagged write."""
    if not (len(reply) > 1 and reply[1] == 0x01):
        return False
    try:
        P.decode_reply(reply)
    except ZkvError as exc:
        return _worth_retrying(exc)
    return False


def _in_order(failed: Mapping[int, Any], start: int, end: int, keys: Sequence[Any]
              ) -> list[int]:
    """Which of a pipeline's commands ``start`` to ``end`` that failed may be sent
    again: those that no later command on the same key (None: no key) completed
    after, since a retry must not land after a later write of its key, nor come after
    a later read of it. The others keep their errors."""
    later: set[Any] = set()  # the keys of later commands that completed
    keep: list[int] = []
    for i in range(end - 1, start - 1, -1):
        key = keys[i]
        if i in failed:
            if key is None or key not in later:
                keep.append(i)
        elif key is not None:
            later.add(key)
    keep.reverse()
    return keep


def _worth_retrying(exc: ZkvError) -> bool:
    """Whether a tagged write (or a read) that failed so is worth another try."""
    return isinstance(exc, Unavailable) and not isinstance(exc, OutcomeUnknown)


class Client(StringCommands):
    def __init__(self, address: str = "127.0.0.1:8000", timeout: float = 5.0,
                 retries: int = 2, direct: bool = False, curve_key: str | None = None,
                 server_key: str | None = None) -> None:
        """``curve_key``/``server_key``: CURVE (see the README's Security section): this
        client's secret key file and the cluster's public key file; by default those
        the environment names in ZKV_CURVE_KEY and ZKV_SERVER_KEY, if any (give
        ``curve_key=""`` for none)."""
        self.address = _checked_address(address)
        if curve_key is None and server_key is None:
            curve_key = os.environ.get("ZKV_CURVE_KEY") or None
            server_key = os.environ.get("ZKV_SERVER_KEY") or None
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not 0 < timeout < MAX_TIMEOUT:
            raise ConfigError(f"timeout must be a positive number of seconds (under "
                              f"{MAX_TIMEOUT:g}), not {timeout!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ConfigError(f"retries must be a non-negative integer, not {retries!r}")
        self.timeout = float(timeout)
        self.retries = retries
        # Every write carries an id and a sequence number (zkv.core.once): the node that
        # applies it remembers the outcome, so sending it again is safe. A node keeps a
        # window of each id's latest numbers, so they must reach it in about the order
        # they were taken: each thread has an id of its own (a thread's batch, sent in
        # rounds, would otherwise fall behind other threads' newer writes).
        self._local = threading.local()
        # Threads may share a client: their exchanges take turns on its sockets (a ZeroMQ
        # socket is used by one thread at a time). Re-entrant: a direct client's
        # exchange may use the proxy's link within it.
        self._lock = threading.RLock()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.curve: Curve | None = None
        if curve_key:
            from .security import Curve

            self.curve = Curve.client(curve_key, server_key)
        elif server_key:
            raise ConfigError("server_key needs curve_key: CURVE needs this client's own "
                              "secret key too (make one with zkv keygen)")
        self._link = Link(self._ctx, self.address, curve=self.curve)
        self.direct = bool(direct)
        self._direct: DirectRouting | None = None
        if direct:
            from .direct import DirectRouting

            self._direct = DirectRouting(self._ctx, self._link, self.timeout, self.curve)

    # -- plumbing --------------------------------------------------------------
    def _socket(self) -> zmq.Socket[bytes]:
        """The connected socket (opened and connected first if need be)."""
        self._link.connect(time.monotonic() + self.timeout)
        assert self._link.sock is not None
        return self._link.sock

    def close(self) -> None:
        with self._lock:
            if self._direct is not None:
                self._direct.close()
            self._link.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, body: bytes, op: str | None = None, key: Any = None) -> bytes:
        """Send one body and wait for its reply, or raise NotSent or Timeout. (``op`` and
        ``key``, of a single-key command, let a direct client route it the short way.)"""
        with self._lock:
            try:
                if self._direct is not None:
                    return self._direct.request(body, self.timeout, op,
                                                key if type(key) is bytes else None)
                return self._link.request(body, self.timeout)
            except zmq.ZMQError as exc:  # translated at the boundary: one error family
                self._link.close()
                raise Unavailable(f"cannot talk to {self.address}: {exc}") from exc

    def _exchange_many(self, bodies: list[bytes], window: int = CALL_WINDOW,
                       parsed: list[tuple[str, list[Any]]] | None = None
                       ) -> list[bytes | Timeout | NotSent]:
        """Send every body (DEALER pipelining, at most ``window`` in flight) and collect
        the replies in order: a Timeout where no reply came (outcome unknown), NotSent
        where the body was never sent."""
        with self._lock:
            try:
                if self._direct is not None:
                    return self._direct.exchange_many(parsed or bodies, self.timeout, window)
                return self._link.exchange_many(bodies, self.timeout, window)
            except zmq.ZMQError as exc:
                self._link.close()
                raise Unavailable(f"cannot talk to {self.address}: {exc}") from exc

    def call_many(self, commands: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Send many commands at once, each its own request, many in flight together.
        Returns each result, or the ZkvError it raised, in order. Each is retried as
        :meth:`call` retries it: writes are tagged, so a write that got no reply is
        sent again (the node that applied it answers its first outcome), and so is a
        read; a write's outcome is unknown only once every try has run out. They are
        requests in flight together, not a sequence: a retried one may land after a
        later one on its key (a pipeline keeps its order)."""
        ops: list[str] = []
        bodies: list[bytes] = []
        retried: list[bool] = []
        for op, args in commands:
            op = op.upper() if isinstance(op, str) else op
            body, _, retry = self._request(op, list(args))
            ops.append(op)
            bodies.append(body)
            retried.append(retry)
        replies: list[bytes | Timeout | NotSent | None] = [None] * len(bodies)

        def attempt(pending: list[int], start: int, end: int, last: bool
                    ) -> tuple[list[int], bool]:
            again: list[int] = []
            pause = False
            for i, reply in zip(pending, self._exchange_many([bodies[i] for i in pending])):
                if not last and (isinstance(reply, NotSent) or retried[i] and isinstance(
                        reply, bytes) and _unavailable(reply)):
                    again.append(i)
                    pause = True  # nothing sent, or a failover, say: give it a moment
                elif not last and isinstance(reply, Timeout) and retried[i]:
                    again.append(i)
                else:
                    replies[i] = reply
            return again, pause

        self._in_rounds(len(bodies), attempt)
        out: list[Any] = []
        for op, got in zip(ops, replies):
            if isinstance(got, Timeout):
                out.append(Timeout(f"{got}; the outcome of {op} is unknown"))
                continue
            if isinstance(got, NotSent) or got is None:
                out.append(got)
                continue
            try:
                out.append(P.decode_reply(got))
            except ZkvError as exc:
                out.append(exc)
        return out

    def _in_rounds(self, n: int, attempt: Callable[[list[int], int, int, bool],
                                                    tuple[list[int], bool]]) -> None:
        """Send ``n`` commands in rounds of at most ROUND: ``attempt(pending, start, end,
        last)`` sends the round's pending ones and says which to send again and whether
        to pause first; a round is done before the next starts."""
        for start in range(0, n, ROUND):
            end = min(n, start + ROUND)
            pending = list(range(start, end))
            for tries in range(1 + self.retries):
                again, pause = attempt(pending, start, end, tries == self.retries)
                if not again:
                    break
                if pause:
                    time.sleep(min(self.timeout, RETRY_PAUSE * 2**tries))
                pending = again

    def _request(self, op: str, args: list[Any]) -> tuple[bytes, bool, bool]:
        """The body of one command, whether it is tagged (a write: ONCE with this
        client's id and its next sequence number) and whether a timeout is retried."""
        kind = P.COMMANDS[op].kind if op in P.COMMANDS else P.WRITE
        tagged = op in P.WRITE_OPS
        if tagged:
            body = P.encode_request(*self._tagged([op, *args]))
        else:
            body = P.encode_request(op, *args)
        return body, tagged, tagged or kind in (P.READ, P.META) and op != "PIPE"

    def _ident(self) -> tuple[bytes, Iterator[int]]:
        """This thread's client id and its sequence numbers."""
        mine: tuple[bytes, Iterator[int]] | None = getattr(self._local, "ident", None)
        if mine is None:
            mine = self._local.ident = (secrets.token_bytes(16), itertools.count(1))
        return mine

    @property
    def client_id(self) -> bytes:
        """The id the calling thread's writes carry (see _ident)."""
        return self._ident()[0]

    def _tagged(self, command: list[Any]) -> list[Any]:
        """A write as ONCE with this thread's client id and its next sequence number."""
        client_id, seqs = self._ident()
        return ["ONCE", client_id, next(seqs), command]

    def pipeline(self, transaction: bool = False) -> Pipeline:
        """Queue commands and send them in few messages: ``with c.pipeline() as p:
        p.set(k, v); p.get(k); results = p.execute()``.

        With ``transaction``, the commands are one transaction (RESP's MULTI/EXEC): sent
        in one message to the one node that owns every key, which runs them with no
        other request between and logs them as one record (a crash keeps all of them
        or none). Its keys must live on one node (a hash tag: ``{user1}:a``,
        ``{user1}:b``), else nothing runs and ``zkv.CrossNode`` says so. While a move
        copies its keys' range it is refused with nothing run, and sent again for up to
        the client's timeout; then ``zkv.Unavailable`` is raised."""
        return Pipeline(self, transaction)

    def call(self, op: str, *args: Any, retry: bool | None = None) -> Any:
        """Send one command. A request that could not be sent (nothing listens, say) is
        tried again after a short pause, a write too, since it never left. A read that
        got no reply in time is sent again on a fresh socket; so is a write (tagged
        with this client's id and a sequence number, so the node that applied it
        answers its first outcome instead of applying it twice), and a read or write
        whose node went down or was not reachable is tried again after a pause. Only when
        every try has run out is a write's outcome unknown (``zkv.Timeout`` says so)."""
        op = op.upper() if isinstance(op, str) else op
        kind = P.COMMANDS[op].kind if op in P.COMMANDS else P.WRITE
        body, _, retried = self._request(op, list(args))
        if retry is None:
            retry = retried
        # (a PIPE's own caller sees to its Unavailable replies: a transaction must know
        # whether it went out, see Pipeline)
        again_if_unavailable = retry and retried
        attempts = 1 + self.retries
        timeouts = 0
        key = args[0] if args and self._direct is not None else None
        for attempt in range(attempts):
            last = attempt + 1 == attempts
            try:
                reply = self._exchange(body, op, key)
            except NotSent as exc:
                if not last:
                    time.sleep(min(self.timeout, RETRY_PAUSE * 2**attempt))
                    continue
                tries = f" ({attempts} attempts)" if attempts > 1 else ""
                raise NotSent(f"{exc}{tries}") from None
            except Timeout as exc:
                timeouts += 1
                if retry and not last:
                    continue
                if kind in (P.WRITE, P.ADMIN) or op == "PIPE":
                    raise Timeout(f"{exc}; the outcome of {op} is unknown"
                                  + (f" after {timeouts} attempts" if timeouts > 1 else "")
                                  ) from None
                raise Timeout(f"{exc} after {timeouts} attempts") from None
            if again_if_unavailable and not last and _unavailable(reply):
                time.sleep(min(self.timeout, RETRY_PAUSE * 2**attempt))  # a failover, say
                continue
            return P.decode_reply(reply)
        raise ProtocolError("unreachable")  # pragma: no cover

    # -- data commands (and zkv.calls) ------------------------------------------------
    def _do(self, op: str, args: list[Any], convert: Convert = lambda r: r) -> Any:
        return convert(self.call(op, *args))

    def dbsize(self) -> int:
        """The number of keys in the cluster (not while a move is under way)."""
        return int(self.call("DBSIZE"))

    def ping(self) -> bool:
        return bool(self.call("PING") == "PONG")

    def get(self, key: Key) -> bytes | None:
        result: bytes | None = self.call("GET", to_bytes(key, "key"))
        return result

    def delete(self, key: Key, *keys: Key) -> int:
        """Delete ``key``: whether it existed. ``delete(k1, k2, ...)``, as redis-py
        takes it: how many of them existed (each key's delete on its own node, not
        one atomic step)."""
        if not keys:
            return bool(self.call("DEL", to_bytes(key, "key")))
        return self._count("DEL", (key, *keys))

    def exists(self, key: Key, *keys: Key) -> int:
        """Whether ``key`` exists; ``exists(k1, k2, ...)``: how many of them do (a key
        named twice counts twice, as in Redis)."""
        if not keys:
            return bool(self.call("EXISTS", to_bytes(key, "key")))
        return self._count("EXISTS", (key, *keys))

    def _count(self, op: str, keys: Sequence[Key]) -> int:
        names = [to_bytes(k, "key") for k in keys]
        total, failed, first = 0, 0, None
        for result in self.call_many([(op, [k]) for k in names]):
            if isinstance(result, ZkvError):
                failed += 1
                first = first or result
            else:
                total += int(result)
        if first is not None and op == "DEL":  # (the other keys went: say so)
            raise type(first)(P.partial_delete(first.message, failed, len(names), total),
                              first.details)
        if first is not None:
            raise first
        return total

    def mget(self, keys: Sequence[Key] | Key) -> list[bytes | None]:
        one = isinstance(keys, (str, bytes, bytearray, memoryview))
        # (one key, as redis-py takes it, not its letters)
        names = [to_bytes(keys, "key")] if one else [to_bytes(k, "key") for k in keys]
        result: list[bytes | None] = self.call("MGET", names)
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
    def flushall(self) -> bool:
        """FLUSHALL: every key of the cluster goes, on every node (each shard's replicas
        too). Refused, flushing nothing, while a move is under way or a node is down."""
        return bool(self.call("FLUSHALL") == "OK")

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
                    force: bool = False, wait: bool = True,
                    wait_timeout: float | None = None) -> dict[str, Any] | MoveHandle:
        """Move a node's keys to their new owners, then drop it from the ring.

        ``force=True`` is for a node that is gone for good (it must not answer): it is
        dropped without its keys being moved, and the reply says how many are lost
        (``"lost"``). During that node's own REMOVE it finishes the move without it."""
        options: dict[str, Any] = {"dry_run": dry_run}
        if force:
            options["force"] = True
        return self._admin("REMOVE", address, options, rate, wait, wait_timeout)

    def abort_move(self, *, force: bool = False, wait: bool = True,
                   wait_timeout: float | None = None) -> dict[str, Any] | MoveHandle:
        """MOVE ABORT: roll the move under way back to the old membership, losing no
        acknowledged write (what the new nodes took is copied back; writes to the
        moving ranges wait meanwhile). ``force=True`` gives up on nodes that are down,
        losing what they hold of the move. Waits for the rollback by default."""
        reply: dict[str, Any] = self.call("MOVE", "ABORT", {"force": force} if force else {})
        handle = MoveHandle(self, reply, rollback=True)
        if not wait:
            return handle
        return handle.wait(wait_timeout)

    def add_replica(self, shard: str, address: str, *, wait: bool = True,
                    wait_timeout: float | None = None) -> dict[str, Any]:
        """REPLICA ADD: attach the node at ``address`` (running, empty) to ``shard`` as a
        replica. It syncs from the shard's primary; with ``wait`` (the default) this
        returns once it is in sync, else at once."""
        reply: dict[str, Any] = self.call("REPLICA", "ADD", shard, address)
        if wait:  # the reply, and the replica's NODES row once it is in sync
            return {**wait_in_sync(self, address, wait_timeout), **reply}
        return reply

    def remove_replica(self, address: str) -> dict[str, Any]:
        """REPLICA REMOVE: detach a replica from its shard (the node keeps running)."""
        reply: dict[str, Any] = self.call("REPLICA", "REMOVE", address)
        return reply

    def failover(self, shard: str, address: str | None = None, *,
                 force: bool = False) -> dict[str, Any]:
        """FAILOVER: hand ``shard`` to an in-sync replica (``address``, or any), losing no
        acknowledged write; the new primary serves within about a second.

        ``force=True`` (``address`` required) is for a shard with no in-sync copy left
        (its primary's data directory was wiped, and no in-sync replica answers): the
        copy at ``address``, which may be the primary itself, becomes the shard's as it
        is, and whatever it lacks is lost. Refused while the shard's copy still serves
        or an in-sync replica that holds it answers."""
        if force and not address:
            raise ClusterError("failover(force=True) needs the address of the node to promote")
        args: list[Any] = [address] if address else []
        if force:
            args.append({"force": True})
        reply: dict[str, Any] = self.call("FAILOVER", shard, *args)
        return reply

    def _admin(self, op: str, address: str, options: dict[str, Any], rate: float | None,
               wait: bool, wait_timeout: float | None) -> dict[str, Any] | MoveHandle:
        if rate is not None:
            options["rate"] = rate
        plan: dict[str, Any] = self.call(op, address, options)
        if plan.get("dry_run") or (plan.get("forced") and "id" not in plan):
            return plan
        handle = MoveHandle(self, plan, op, address)
        if not wait:
            return handle
        return handle.wait(wait_timeout)


def wait_in_sync(client: Client, address: str, timeout: float | None = None,
                 progress: Callable[[dict[str, Any], int | None], None] | None = None
                 ) -> dict[str, Any]:
    """Poll NODES until the replica at ``address`` is in sync; its row. ``progress``
    gets each row seen before that, and its primary's key count (a syncing replica's
    keys count up towards it)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rows = client.nodes()
        row = next((r for r in rows if r.get("address") == address
                    and r.get("role") == "replica"), None)
        if row is None:
            raise ClusterError(f"{address} is not a replica of any shard")
        if row.get("in_sync"):
            return dict(row)
        if progress is not None:
            primary = next((r.get("keys") for r in rows if r.get("role") == "primary"
                            and r.get("shard") == row.get("shard")), None)
            progress(row, primary)
        if deadline is not None and time.monotonic() > deadline:
            raise Timeout(f"replica {address} not in sync within {timeout:g} s "
                          f"({row.get('replication')}); it goes on syncing")
        time.sleep(0.2)


class MoveHandle:
    """A move started by ``add_node``/``remove_node(wait=False)``: follow it or wait for it."""

    def __init__(self, client: Client, plan: dict[str, Any], op: str = "",
                 address: str = "", rollback: bool = False) -> None:
        self.client = client
        self.plan = plan
        self.rollback = rollback  # MOVE ABORT's: the move is meant to be rolled back
        self.id: str | None = plan.get("id")
        # what it is to do: "add" (the node is a member at the end) or "remove" (it is not)
        self.kind = str(plan.get("kind") or ("remove" if "removed" in plan else op.lower()))
        self.node = str(plan.get("node") or plan.get("removed") or address)

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
        """Block until the move has finished; ``on_progress(status)`` on every poll.
        The plan, with ``finished``, the epoch and (when the proxy still knows them) the
        streams' final counts. A move rolled back (MOVE ABORT) raises ClusterError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status is None:
                return self._ended()
            if on_progress is not None:
                on_progress(status)
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"move {self.id} still running after {timeout:g}s: {status}")
            time.sleep(poll)

    def _ended(self) -> dict[str, Any]:
        now = self.client.status()
        last = now.get("last_move")  # (the proxy's word on how it ended, if it still knows)
        last = last if isinstance(last, dict) and last.get("id") == self.id else None
        if not self.rollback and self.kind in ("add", "remove") and self.node:
            member = self.node in (now.get("members") or {})
            if member != (self.kind == "add"):
                where = "not" if self.kind == "add" else "still"
                raise ClusterError(f"move {self.id} ({self.kind.upper()} {self.node}) did not "
                                   "finish: it was rolled back (MOVE ABORT, or a REMOVE "
                                   f"--force of its node), and {self.node} is {where} a "
                                   "member")
        out = {**self.plan, "finished": True, "epoch": now["epoch"]}
        if last is not None:
            out["streams"] = last.get("streams", [])
            out["elapsed_s"] = last.get("elapsed_s")
        return out


PIPELINE_CHUNK = 512  # commands per PIPE message (so that 100-byte values stay below the
# size at which a server must walk a body before decoding it; zkv.core.cbor)


class Pipeline(StringCommands):
    """Commands queued on the client and sent together by :meth:`execute`.

    The proxy splits each message per node and merges the replies in order.
    A pipeline is not a transaction (unless made with ``transaction=True``: see
    :meth:`Client.pipeline`); in both, each command succeeds or fails on its own.
    Supported: get, delete, exists, ping, and every command on one key of
    :class:`zkv.calls.StringCommands` (set with its options, incr, expire, ttl, ...).
    """

    _CONVERT: dict[str, Callable[[Any], Any]] = {
        "GET": lambda r: r,
        "SET": lambda r: True if r == "OK" else r,
        "DEL": bool,
        "EXISTS": bool,
        "PING": lambda r: r == "PONG",
    }

    def __init__(self, client: Client, transaction: bool = False) -> None:
        self.client = client
        self.transaction = transaction
        self.commands: list[list[Any]] = []
        self.converts: dict[int, Convert] = {}  # by position, where not _CONVERT's

    def _do(self, op: str, args: list[Any], convert: Convert = lambda r: r) -> Any:
        if op not in P.PIPE_OPS:
            raise BadType(f"{op} cannot be used in a pipeline")
        self.converts[len(self.commands)] = convert
        self.commands.append([op, *args])
        return self

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.commands.clear()
        self.converts.clear()

    def __len__(self) -> int:
        return len(self.commands)

    def get(self, key: Key) -> Pipeline:
        self.commands.append(["GET", key if type(key) is bytes else to_bytes(key, "key")])
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
        run; otherwise errors are returned in place. The queue is emptied.

        Writes are tagged as :meth:`Client.call` tags them, so what got no reply (or
        was refused because its node was down) is sent again, in rounds of at most
        ``ROUND`` commands; a write's outcome is unknown only once every try has run
        out."""
        commands, self.commands = self.commands, []
        special, self.converts = self.converts, {}
        client = self.client
        items = [client._tagged(cmd) if cmd[0] in P.WRITE_OPS else cmd for cmd in commands]
        results: list[Any] = [None] * len(commands)
        if self.transaction:
            if commands:  # one message, whole; a retry of it is safe (its writes are tagged)
                replies = self._atomic(items)
                errors: dict[int, ZkvError] = {}
                self._take(list(range(len(commands))), P.encode_ok_items(replies), commands,
                           special, results, errors)
                for i, exc in errors.items():
                    results[i] = exc
            return self._raised(results) if raise_on_error else results
        keys = [cmd[1] if len(cmd) > 1 else None for cmd in commands]

        def attempt(pending: list[int], start: int, end: int, last: bool
                    ) -> tuple[list[int], bool]:
            failed: dict[int, ZkvError] = {}  # worth another try, and their errors
            chunks = [pending[i : i + PIPELINE_CHUNK]
                      for i in range(0, len(pending), PIPELINE_CHUNK)]
            pause = False
            for chunk, reply in zip(chunks, self._send([[items[i] for i in c] for c in chunks])):
                pause = self._take(chunk, reply, commands, special, results, failed) or pause
            again = [] if last else _in_order(failed, start, end, keys)
            for i in failed.keys() - set(again):
                results[i] = failed[i]
            return again, pause

        client._in_rounds(len(items), attempt)
        return self._raised(results) if raise_on_error else results

    def _atomic(self, items: list[Any]) -> Any:
        """A transaction's items as one atomic PIPE: refused (nothing run) while a move
        takes its keys or its node is down, it is sent again after a pause, for at most
        the client's timeout; then the refusal is raised."""
        client = self.client
        deadline = time.monotonic() + client.timeout
        pause = RETRY_PAUSE
        went_out: ZkvError | None = None  # an attempt that may have been applied
        while True:
            try:
                return client.call("PIPE", items, None, True, retry=True)
            except Unavailable as exc:
                if "outcome" in exc.message:  # (its node went down with it in flight...)
                    went_out = exc
                if isinstance(exc, (Timeout, NotSent)) or time.monotonic() + pause > deadline:
                    if went_out is not None and went_out is not exc:
                        # the last refusal must not hide that an earlier try went out
                        raise Timeout(f"{exc}; an earlier attempt of this transaction "
                                      f"went out ({went_out}): it may have been applied, "
                                      "all of it or none") from None
                    raise
            time.sleep(pause)
            pause = min(2 * pause, 0.5)

    @staticmethod
    def _raised(results: list[Any]) -> list[Any]:
        for r in results:
            if isinstance(r, ZkvError):
                raise r
        return results

    def _take(self, chunk: list[int], reply: bytes | Timeout | NotSent,
              commands: list[list[Any]], special: dict[int, Convert], results: list[Any],
              failed: dict[int, ZkvError]) -> bool:
        """One PIPE message's reply: each command's result into ``results``, or, if it
        is worth another try, its error into ``failed``. Whether to pause first."""
        if isinstance(reply, (Timeout, NotSent)):
            if isinstance(reply, Timeout):
                reply = Timeout(f"{reply}; the outcome of these pipelined commands is unknown")
            failed.update((i, reply) for i in chunk)
            return isinstance(reply, NotSent)
        try:
            replied = P.decode_reply(reply)
        except ZkvError as exc:
            if _worth_retrying(exc):
                failed.update((i, exc) for i in chunk)
                return True
            for i in chunk:
                results[i] = exc
            return False
        pause = False
        table = self._CONVERT
        for i, item in zip(chunk, replied):
            convert = special.get(i) or table[commands[i][0]]
            if type(item) is list and len(item) == 2 and item[0] == P.OK:
                results[i] = convert(item[1])
                continue
            try:
                results[i] = convert(P.result_of(item))
            except ZkvError as exc:
                if _worth_retrying(exc):
                    failed[i] = exc  # its node was down, say: once more
                    pause = True
                else:
                    results[i] = exc
        return pause

    def _send(self, chunks: list[list[Any]]) -> list[bytes | Timeout | NotSent]:
        """Each chunk as one PIPE message, a few in flight at once; replies in order."""
        if self.client._direct is not None:  # routed here: no need to encode what we route
            return self.client._exchange_many([], PIPELINE_WINDOW,
                                              [("PIPE", [chunk]) for chunk in chunks])
        return self.client._exchange_many([P.encode_request("PIPE", chunk) for chunk in chunks],
                                          PIPELINE_WINDOW)
