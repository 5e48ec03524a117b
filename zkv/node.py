"""The storage node: a ROUTER socket in front of a Storage.

One thread runs one poll loop. Each turn it drains the requests that are
waiting (up to a limit), executes them against the in-memory map, commits the
log records they produced with one write (and one fsync under ``always``), and
only then sends the replies: group commit, and no acknowledgement before the
write is as durable as the policy promises.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from typing import Any, Callable

import zmq

from . import protocol as P
from .errors import CommandError, InternalError, ProtocolError, StorageError, ZkvError
from .storage import Recovery, Storage

log = logging.getLogger("zkv.node")

MAX_BATCH_PER_TURN = 2048
SCAN_TTL = 60.0
MAX_SCANS = 64


class Scans:
    """Open SCAN iterations: a list of the keys at the first call, consumed by cursor."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[list[bytes], float]] = {}
        self._next = 1

    def page(
        self, data: dict[bytes, bytes], cursor: str, pattern: bytes | None, count: int, now: float
    ) -> list[Any]:
        self._expire(now)
        if cursor == "0":
            sid, pos = self._next, 0
            self._next += 1
            self._open[sid] = (list(data), now)
        else:
            try:
                sid_text, pos_text = cursor.split("-", 1)
                sid, pos = int(sid_text), int(pos_text)
            except ValueError:
                raise CommandError(f"bad SCAN cursor {cursor!r}; start again from 0") from None
            if sid not in self._open:
                raise CommandError(
                    f"SCAN cursor {cursor!r} has expired or is unknown; start again from 0"
                )
        keys = self._open[sid][0]
        chunk = keys[pos : pos + count]
        match = P.glob_matcher(pattern)
        found = [k for k in chunk if k in data and (match is None or match.match(k))]
        pos += len(chunk)
        if pos >= len(keys):
            del self._open[sid]
            return ["0", found]
        self._open[sid] = (keys, now)
        return [f"{sid}-{pos}", found]

    def _expire(self, now: float) -> None:
        for sid, (_, used) in list(self._open.items()):
            if now - used > SCAN_TTL:
                del self._open[sid]
        while len(self._open) >= MAX_SCANS:
            del self._open[min(self._open)]


class Node:
    def __init__(
        self,
        host: str,
        port: int,
        data_dir: str,
        fsync: str = "everysec",
        limits: P.Limits = P.DEFAULT_LIMITS,
        snapshot_factor: float = 4.0,
        snapshot_min_bytes: int = 4 << 20,
        repair: bool = False,
    ) -> None:
        self.address = f"{host}:{port}"
        self.host, self.port = host, port
        self.limits = limits
        self.storage = Storage(data_dir, fsync, snapshot_factor, snapshot_min_bytes, repair)
        self.scans = Scans()
        self.counters: dict[str, int] = {}
        self.errors = 0
        self.started = time.monotonic()
        self.recovery: Recovery | None = None
        self._stop = False
        self._handlers: dict[str, Callable[[list[Any]], Any]] = {
            "PING": lambda a: "PONG",
            "INFO": lambda a: self.info(),
            "GET": self._get,
            "EXISTS": lambda a: int(a[0] in self.storage.keyspace.data),
            "SET": self._set,
            "DEL": self._del,
            "MGET": self._mget,
            "MSET": self._mset,
            "SCAN": self._scan,
            "KEYS": self._keys,
            "PIPE": self._pipe,
        }

    # -- commands ----------------------------------------------------------
    def _get(self, a: list[Any]) -> Any:
        return self.storage.keyspace.data.get(a[0])

    def _set(self, a: list[Any]) -> Any:
        self.storage.pending += self.storage.keyspace.set(a[0], a[1])
        return "OK"

    def _del(self, a: list[Any]) -> Any:
        existed, record = self.storage.keyspace.delete(a[0])
        if record is not None:
            self.storage.pending += record
        return int(existed)

    def _mget(self, a: list[Any]) -> Any:
        get = self.storage.keyspace.data.get
        return [get(k) for k in a[0]]

    def _mset(self, a: list[Any]) -> Any:
        self.storage.pending += self.storage.keyspace.mset(a[0])
        return "OK"

    def _scan(self, a: list[Any]) -> Any:
        cursor, pattern, count = (a + [None, None])[:3]
        return self.scans.page(
            self.storage.keyspace.data, cursor, pattern, count or 1000, time.monotonic()
        )

    def _keys(self, a: list[Any]) -> Any:
        match = P.glob_matcher(a[0] if a else None)
        return [k for k in self.storage.keyspace.data if match is None or match.match(k)]

    def _pipe(self, a: list[Any]) -> Any:
        out = []
        for item in a[0]:
            try:
                op, args = P.check_request(item, self.limits)
                if op == "PIPE":
                    raise ProtocolError("PIPE cannot be nested")
                out.append(P.reply_item(self.execute(op, args)))
            except ZkvError as exc:
                out.append(P.error_item(exc))
        return out

    def execute(self, op: str, args: list[Any]) -> Any:
        handler = self._handlers.get(op)
        if handler is None:
            raise CommandError(f"{op} is not served by a storage node")
        self.counters[op] = self.counters.get(op, 0) + 1
        return handler(args)

    def info(self) -> dict[str, Any]:
        ks = self.storage.keyspace
        rec = self.recovery
        return {
            "role": "node",
            "address": self.address,
            "pid": os.getpid(),
            "keys": len(ks),
            "live_bytes": ks.live_bytes,
            "rss_bytes": rss_bytes(),
            "fsync": self.storage.fsync,
            "data_dir": self.storage.dir,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "ops": dict(self.counters),
            "errors": self.errors,
            "recovered_keys": rec.keys if rec else 0,
            "recovery_s": round(rec.seconds, 4) if rec else 0.0,
            **self.storage.stats(),
        }

    # -- the loop ------------------------------------------------------------
    def handle(self, frames: list[bytes]) -> list[bytes]:
        """One request message in, the reply message out (routing frames preserved)."""
        if len(frames) > self.limits.max_frames:
            self.errors += 1
            return [
                *frames[:-1],
                P.encode_error(
                    "BAD_REQUEST",
                    f"{len(frames)} frames in one message; at most {self.limits.max_frames}",
                ),
            ]
        routing, body = frames[:-1], frames[-1]
        try:
            op, args = P.parse_request(body, self.limits)
            return [*routing, P.encode_ok(self.execute(op, args))]
        except ZkvError as exc:
            self.errors += 1
            return [*routing, P.encode_exc(exc)]
        except Exception as exc:  # a bug must not take the node down
            log.exception("internal error")
            self.errors += 1
            return [*routing, P.encode_exc(InternalError(f"{type(exc).__name__}: {exc}"))]

    def serve(self, sock: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        storage = self.storage
        while not self._stop:
            if poller.poll(100):
                replies = []
                for _ in range(MAX_BATCH_PER_TURN):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    replies.append(self.handle(frames))
                try:
                    storage.commit()
                except StorageError as exc:
                    log.error("%s", exc)
                    body = P.encode_exc(exc)
                    replies = [[*r[:-1], body] for r in replies]
                for reply in replies:
                    sock.send_multipart(reply)
            storage.tick(time.monotonic())

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        self.recovery = self.storage.open()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            sock.bind(f"tcp://{self.host}:{self.port}")
        except zmq.ZMQError as exc:
            self.storage.close()
            ctx.destroy(0)
            raise StorageError(f"cannot listen on {self.address}: {exc}") from exc
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        rec = self.recovery
        line = (
            f"zkv node {self.address} data={self.storage.dir} fsync={self.storage.fsync} "
            f"recovered {rec.keys} keys from {rec.records} records in {rec.seconds:.3f}s"
        )
        if on_ready:
            on_ready(line)
        try:
            self.serve(sock)
        finally:
            self.storage.close()
            sock.close(0)
            ctx.term()
            log.info("node %s stopped; all acknowledged writes are on disk", self.address)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
