"""The proxy's RESP front: Redis clients on a ZeroMQ STREAM socket, in the proxy's loop.

    zkv proxy --resp-port 6380          # then: redis-cli -p 6380

A STREAM socket hands the loop raw TCP bytes tagged with the connection's id (an
empty message when a connection opens or closes). This shell only turns those bytes
into commands and results into bytes (zkv.core.resp does both, purely); every data
command goes to the same routing core as the ZeroMQ front, under the same limits,
deadlines and statistics.

Replies go out in the order the commands came, however their nodes answer. What one
connection may cost is bounded like a ZeroMQ client's: its unread replies by
``client_buffer_bytes`` (a large reply past it is replaced by an error; past it
the connection's further commands wait unread), what it sends ahead of its replies
by the same budget plus one request (past that the connection is closed, as Redis
closes a client over its query buffer limit), and its commands in flight by
``MAX_PENDING``.
"""

from __future__ import annotations

import itertools
import logging
import platform
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import frames as wire
from .core import protocol as P
from .core import resp
from .errors import ClusterError, ZkvError
from .guard import SMALL_REPLY, ConnectionGuard, OutputBudget

if TYPE_CHECKING:
    from .shell import ProxyShell

log = logging.getLogger("zkv.resp")

MAX_PENDING = 1024  # a connection's commands in flight; more wait unread
MIN_IN_FLIGHT = 8  # ...however large its replies
FIRST_IN_FLIGHT = 16  # in flight before the size of a connection's replies is known
MAX_PER_TURN = 256  # messages read from the socket in one loop turn
RECV_HWM = 64
LISTEN_BACKLOG = 511  # as redis-server (the kernel caps it at net.core.somaxconn)


class Slot:
    """One command's place in its connection's reply order."""

    __slots__ = ("conn", "data", "shape", "write")

    def __init__(self, conn: Conn, shape: resp.Shape | None, data: bytes | None = None,
                 write: bool = False) -> None:
        self.conn, self.shape, self.data = conn, shape, data
        self.write = write  # its reply tells what a write did (GETDEL's value, say)

    def answer(self, body: bytes) -> None:
        """A zkv reply body for this command (from the routing core or the shell)."""
        if self.data is not None or self.conn.gone:
            return
        try:
            result: Any = P.decode_reply(body)
        except ZkvError as exc:
            result = exc
        self.done(result)

    def done(self, result: Any) -> None:
        if self.data is not None or self.conn.gone:
            return
        assert self.shape is not None
        try:
            self.data = self.shape(result, self.conn.session)
        except Exception as exc:  # noqa: BLE001 - a bug answers this command, nothing else
            log.exception("internal error shaping a RESP reply")
            self.data = resp.error(f"ERR internal error: {type(exc).__name__}: {exc}")
        self.conn.front.dirty.add(self.conn)


class Conn:
    __slots__ = ("closing", "front", "gone", "ident", "reader", "reply_size", "session",
                 "slots")

    def __init__(self, front: RespFront, ident: bytes, session: resp.Session,
                 reader: resp.RespReader) -> None:
        self.front, self.ident, self.session, self.reader = front, ident, session, reader
        self.slots: list[Slot] = []
        self.closing = False  # answer what is in flight, then close (QUIT, protocol error)
        self.gone = False  # closed: nothing more is sent
        # the size of its replies of late (a moving average): how many commands may be
        # in flight at once without their replies outgrowing the client buffer
        self.reply_size = front.budget / FIRST_IN_FLIGHT


class RespFront:
    def __init__(self, shell: ProxyShell, host: str, port: int, admin: bool,
                 max_clients: int, budget: int) -> None:
        self.shell = shell
        self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.admin = admin
        self.budget = budget
        sock: zmq.Socket[bytes] = shell.ctx.socket(zmq.STREAM)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a reply: the budget bounds them instead
        # per connection: at most this many reads (of up to 8 KiB) queue in ZeroMQ before
        # it stops reading that connection (TCP then holds the client back)
        sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        # connections waiting to be accepted: Redis's tcp-backlog (ZeroMQ's 100 made a
        # burst of new connections wait a second each for the kernel to retry)
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        try:
            sock.bind(f"tcp://{self.address}")
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ClusterError(f"cannot listen for RESP on {self.address}: {exc}") from exc
        self.sock = sock
        self.guard = ConnectionGuard(sock, max_clients, f"RESP front {self.address}")
        self.out = OutputBudget(sock, budget)
        self.conns: dict[bytes, Conn] = {}
        self.dirty: set[Conn] = set()  # connections with replies ready to go
        self.paused: set[Conn] = set()  # connections with commands left unread
        self.cursors = resp.Cursors()
        self._ids = itertools.count(1)
        self.connections = 0  # accepted since start
        lim = shell.limits
        self.max_args = 2 * lim.max_batch + 2
        # (a bulk past the key or value limit is read whole, within the request limit,
        # to be answered as a too large key or value, as the ZeroMQ front answers it)
        self.max_bulk = max(lim.max_key_bytes, lim.max_value_bytes, lim.max_message_bytes)
        self.max_request = lim.max_message_bytes
        self.ctx = resp.Context(lim, self.cursors, admin, shell.resp_password, port=port,
                                extra={"os": f"{platform.system()} {platform.release()}"})

    # -- input --------------------------------------------------------------------------
    def handle(self, now: float) -> None:
        sock, conns = self.sock, self.conns
        for _ in range(MAX_PER_TURN):
            frames = wire.recv(sock)
            if len(frames) == 2:
                ident, data = frames
                conn = conns.get(ident)
                if not data:
                    if conn is None:
                        self._open(ident)
                    else:
                        self._gone(conn)
                elif conn is not None and not conn.gone:
                    try:
                        self._take(conn, data, now)
                    except Exception as exc:  # noqa: BLE001 - a bug ends this connection only
                        log.exception("internal error on a RESP connection")
                        self._refuse(conn, f"ERR internal error: {type(exc).__name__}: {exc}")
            if not wire.waiting(sock):
                break
        self.flush()

    def _open(self, ident: bytes) -> None:
        self.connections += 1
        reader = resp.RespReader(self.max_args, self.max_bulk, self.max_request)
        self.conns[ident] = Conn(self, ident, resp.Session(next(self._ids)), reader)

    def _gone(self, conn: Conn) -> None:
        conn.gone = True
        self.cursors.forget_owner(conn.session.id)
        self.conns.pop(conn.ident, None)
        self.dirty.discard(conn)
        self.paused.discard(conn)
        self.out.peers.pop(conn.ident, None)

    def _take(self, conn: Conn, data: bytes, now: float) -> None:
        if conn.closing:
            return
        if conn.reader.buffered + len(data) > self.budget + self.max_request:
            self._refuse(conn, "ERR client sent more than its buffer allows without reading "
                               "replies; closing the connection")
            return
        self._read(conn, data, now)

    def _room(self, conn: Conn) -> int:
        """How many more of a connection's commands may be read now: none while its
        unread replies are over the budget, else as many as the budget holds replies of
        the size its replies have had (at most MAX_PENDING in flight)."""
        if self.out.backlog(conn.ident) > self.budget:
            return 0
        fits = int(self.budget // max(conn.reply_size, 1.0))
        return max(MIN_IN_FLIGHT, min(MAX_PENDING, fits)) - len(conn.slots)

    def _read(self, conn: Conn, data: bytes, now: float) -> None:
        room = self._room(conn)
        try:
            commands = conn.reader.feed(data, max(room, 0))
        except resp.RespProtocolError as exc:
            self._refuse(conn, f"ERR {exc.message}")
            return
        if commands:
            self.ctx.now = time.time()
            for args in commands:
                self._run(conn, args, now)
                if conn.closing:
                    break
        if conn.reader.failed is not None and not conn.closing:
            self._refuse(conn, f"ERR {conn.reader.failed.message}")
        elif conn.reader.buffered and not conn.closing:
            self.paused.add(conn)
        else:
            self.paused.discard(conn)

    def resume(self, now: float) -> None:
        """Read on for connections that had to wait (replies read, commands answered)."""
        for conn in list(self.paused):
            if conn.gone or conn.closing:
                self.paused.discard(conn)
            elif self._room(conn) > 0:
                try:
                    self._read(conn, b"", now)
                except Exception as exc:  # noqa: BLE001 - as in handle
                    log.exception("internal error on a RESP connection")
                    self._refuse(conn, f"ERR internal error: {type(exc).__name__}: {exc}")
        self.flush()

    def _refuse(self, conn: Conn, message: str) -> None:
        """A protocol error: say so after what is already in flight, then close."""
        conn.slots.append(Slot(conn, None, resp.error(message)))
        conn.closing = True
        self.dirty.add(conn)

    # -- commands ------------------------------------------------------------------------
    def _run(self, conn: Conn, args: list[bytes], now: float) -> None:
        shell = self.shell
        shell.requests += 1
        plan = resp.plan_command(conn.session, args, self.ctx)
        if not isinstance(plan, resp.Forward):
            # a label per known command only: anyone could mint unknown names at will
            name = (args[0].upper().decode() if args[0].lower() in resp.SPECS
                    else "UNKNOWN")
            counts = shell.op_counts
            counts[name] = counts.get(name, 0) + 1
        if isinstance(plan, resp.Reply):
            conn.slots.append(Slot(conn, None, plan.data))
            if plan.data[:1] == b"-":
                shell.errors += 1
                key = (name, "RESP")  # an error the RESP front answered itself
                shell.error_codes[key] = shell.error_codes.get(key, 0) + 1
            if plan.close:
                conn.closing = True
            self.dirty.add(conn)
            return
        slot = Slot(conn, plan.shape, write=isinstance(plan, resp.Forward) and (
            plan.op in P.WRITE_OPS or plan.op == "PIPE"))
        conn.slots.append(slot)
        if isinstance(plan, resp.Forward):
            shell.router.request_parsed(slot, plan.op, plan.args, plan.body, now)
        elif plan.what == "FLUSHALL":
            shell.flush_all(slot)
        else:  # INFO or DBSIZE: what INFO says of this front, as of now
            self.ctx.extra["resp_clients"] = len(self.conns)
            self.ctx.extra["resp_connections"] = self.connections
            shell.gather_info(slot)

    # -- output --------------------------------------------------------------------------
    def flush(self) -> None:
        """Send every connection's replies that are ready, in order."""
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        for conn in dirty:
            if not conn.gone:
                self._send_ready(conn)

    def _send_ready(self, conn: Conn) -> None:
        slots = conn.slots
        ready = 0
        for slot in slots:
            if slot.data is None:
                break
            ready += 1
        if ready:
            parts = []
            backlog = self.out.backlog(conn.ident)
            for slot in slots[:ready]:
                data = slot.data
                assert data is not None
                size = len(data)
                if size > SMALL_REPLY and backlog and backlog + size > self.budget:
                    self.out.held_back += 1
                    # (a write's reply: it ran, and is never answered as if it failed;
                    # SET NX GET may have changed nothing, so "ran", not "applied")
                    done = "this command ran (any change it made stands), but its " \
                        if slot.write else ""
                    data = resp.error(
                        f"ERR {done}reply of {size} bytes not sent: {backlog} bytes of "
                        f"replies to this client are still unread (the limit is "
                        f"{self.budget}); read replies before sending more commands")
                parts.append(data)
                backlog += len(data)
                conn.reply_size += (size - conn.reply_size) * 0.2
            del slots[:ready]
            if not self.out.put([conn.ident, b"".join(parts)]):
                self._gone(conn)
                return
        if conn.closing and not slots:
            try:
                wire.send(self.sock, [conn.ident, b""], wire.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._gone(conn)

    def stats(self) -> dict[str, Any]:
        out = self.out.stats()
        return {"resp_address": self.address, "resp_clients": len(self.conns),
                "resp_connections": self.connections,
                "resp_replies_held_back": out["replies_held_back"],
                "resp_unread_reply_bytes": out["unread_reply_bytes"]}

    def close(self) -> None:
        self.guard.close()
        self.sock.close(0)


__all__ = ["RespFront"]
