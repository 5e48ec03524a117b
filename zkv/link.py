"""One client connection: a DEALER socket to one address, watched by a socket monitor.

A ZeroMQ socket hides its connection: a request to an address where nothing
listens is queued and waits, so a refused connection looks like a slow server
(the CLI took 15 s to say TIMEOUT where redis-cli says "Connection refused" at
once). A :class:`Link` watches its socket's monitor until the ZeroMQ handshake
succeeds, and says what went wrong when it does not:

* nothing listens (the connection is refused, or the host unreachable): at once;
* the peer closed the connection before the handshake (a server at its
  connection limit sheds new connections this way), or is not a ZeroMQ server;
* no connection within the deadline (a host that drops packets).

Its socket uses ``ZMQ_IMMEDIATE``, so a request is only ever queued on a live
connection: when a Link raises :class:`NotSent`, the request was not sent and
is safe to send again, a write included. Sends never block (a connection that
does not keep up is a timeout, not a hang), and :meth:`exchange_many` keeps a
bounded window of requests in flight, waiting as long as replies keep coming
(a long pipeline is not timed out as one batch).
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

import zmq

from . import frames as wire
from .errors import NotSent, Timeout

if TYPE_CHECKING:
    from .security import Curve

_TAG = struct.Struct("<Q")
_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CLOSED
           | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILED_HANDSHAKE = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


# what a failed handshake most likely means when this side speaks CURVE (a wrong
# server key looks like a shed connection)
_CURVE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "did not accept the CURVE handshake: the server key is most likely wrong (it must "
        "be the public key of the cluster: server_key / --server-key), or the server does "
        "not use CURVE, or it is at its connection limit"),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "did not accept the CURVE handshake: it may not use CURVE (or not be a zkv server)"),
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: (
        "refused this client's key: it is not in the server's allowed keys (ask for your "
        "public key to be added to its clients or admins directory)"),
}
# what a failed handshake most likely means, when this side does not speak CURVE
_PLAIN_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: (
        "refused the handshake: the keys do not match (check the server key)"),
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: (
        "closed the connection before the handshake finished: it may be at its connection "
        "limit (max_clients), require CURVE (give curve_key and server_key / --curve-key "
        "and --server-key), or not be a zkv server"),
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: (
        "refused the handshake: it is not a zkv server, or it requires CURVE (give "
        "curve_key and server_key / --curve-key and --server-key)"),
}


# A wait that came back this much later than asked means this process was stopped
# (SIGSTOP, a paused VM, swapping). Replies that came meanwhile may still be in the
# kernel's buffers, since libzmq's I/O thread was stopped too: look STALL_GRACE more
# before calling a request timed out.
STALL_GAP = 0.25
STALL_GRACE = 0.2


def wait_readable(sock: zmq.Socket[bytes], deadline: float) -> bool:
    """Whether ``sock`` has a message by ``deadline`` (time.monotonic()). Woken well
    past the deadline (this process was stopped), it looks STALL_GRACE more."""
    left = deadline - time.monotonic()
    if sock.poll(max(1, int(left * 1000)) if left > 0 else 0):
        return True
    if time.monotonic() - deadline > STALL_GAP:
        return bool(sock.poll(int(STALL_GRACE * 1000)))
    return False


class Link:
    def __init__(self, ctx: zmq.Context[Any], address: str, hwm: int = 100_000,
                 curve: Curve | None = None) -> None:
        self.ctx = ctx
        self.curve = curve  # CURVE: this client's keys and the server key it expects
        self._failures = _CURVE_FAILURES if curve is not None else _PLAIN_FAILURES
        self.address = address
        self.hwm = hwm
        self.sock: zmq.Socket[bytes] | None = None
        self.monitor: zmq.Socket[bytes] | None = None
        self.ready = False  # the handshake succeeded and no disconnect was seen since
        self.lost = False  # a disconnect was seen while ready
        self.answered = False  # a reply has come on this connection
        self._tags = itertools.count(1)

    # -- the connection ------------------------------------------------------------
    def _open(self) -> zmq.Socket[bytes]:
        if self.sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, 1)  # "[::1]:8000" as well as IPv4 and names
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection
            sock.setsockopt(zmq.SNDHWM, self.hwm)
            sock.setsockopt(zmq.RCVHWM, self.hwm)
            if self.curve is not None:
                self.curve.connect(sock)
            self.monitor = sock.get_monitor_socket(_EVENTS)
            sock.connect(f"tcp://{self.address}")
            self.sock, self.ready, self.lost, self.answered = sock, False, False, False
        return self.sock

    def close(self) -> None:
        """Drop the connection (and anything queued on it); the next request opens anew."""
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(0)
            self.sock = None
        if self.monitor is not None:
            self.monitor.close(0)
            self.monitor = None
        self.ready = False

    def _events(self, timeout_ms: int) -> list[int]:
        """Monitor events waiting (or arriving within ``timeout_ms``), oldest first."""
        assert self.monitor is not None
        out: list[int] = []
        if not self.monitor.poll(timeout_ms):
            return out
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            out.append(struct.unpack("=HI", frames[0][:6])[0])
        return out

    def _watch(self, events: list[int]) -> None:
        for event in events:
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.ready, self.lost = True, False
            elif event & (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED) and self.ready:
                self.ready, self.lost = False, True

    def connect(self, deadline: float) -> None:
        """Wait for a working connection, or raise NotSent saying why there is none."""
        self._open()
        connected = False
        while not self.ready:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                what = ("the handshake did not finish" if connected
                        else "no answer: is the host reachable?")
                if connected and self.curve is not None:
                    what += "; with CURVE, check the server key"
                raise NotSent(f"could not connect to {self.address} in time ({what}); "
                              "nothing was sent")
            events = self._events(max(1, int(left * 1000)))
            for event in events:
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.ready, self.lost = True, False
                elif event == zmq.EVENT_CONNECTED:
                    connected = True
                elif event & _FAILED_HANDSHAKE:
                    self.close()
                    raise NotSent(f"{self.address} {self._failures[event]}; nothing was sent")
                elif event == zmq.EVENT_DISCONNECTED and connected and not self.ready:
                    self.close()
                    raise NotSent(f"{self.address} "
                                  f"{self._failures[zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL]}"
                                  "; nothing was sent")
                elif event in (zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED) and not connected:
                    reason = self._probe()
                    if reason is not None:
                        self.close()
                        raise NotSent(f"cannot connect to {self.address}: {reason}")

    def _probe(self) -> str | None:
        """Why a TCP connection to the address fails (ZeroMQ's events do not say), or
        None if one succeeds now (the server just came up: let ZeroMQ retry)."""
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return None
        except ConnectionRefusedError:
            return "Connection refused"
        except socket.gaierror as exc:
            return f"cannot resolve {host}: {exc.strerror}"
        except OSError as exc:
            if exc.errno in (errno.ETIMEDOUT, None):
                return None  # slow, not refused: the deadline decides
            return exc.strerror or str(exc)

    # -- requests ------------------------------------------------------------------
    def _send(self, frames: list[bytes], deadline: float) -> None:
        """Queue one message without blocking; NotSent if it cannot be, before ``deadline``."""
        while True:
            if not self.ready:
                self.connect(deadline)
            assert self.sock is not None
            try:
                wire.send(self.sock, frames, wire.NOBLOCK)
                return
            except zmq.Again:
                pass
            self._watch(self._events(0))
            if self.ready:  # connected, but the queue is full: wait for room
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(max(1, int(left * 1000)), zmq.POLLOUT):
                    raise NotSent(f"could not send to {self.address}: the connection is not "
                                  "keeping up; nothing was sent")

    def request(self, body: bytes, timeout: float) -> bytes:
        """Send one body and wait for its reply; NotSent, or Timeout (outcome unknown)."""
        deadline = time.monotonic() + timeout
        tag = _TAG.pack(next(self._tags))
        self._send([tag, body], deadline)
        sock = self.sock
        assert sock is not None
        while True:
            left = deadline - time.monotonic()
            if not self.answered and left > 0:
                self._first_wait(left, len(body))  # a fresh connection may be shed
            if not wait_readable(sock, deadline):
                self._watch(self._events(0))
                lost = " (the connection was lost)" if self.lost else ""
                self.close()  # Lazy Pirate: a fresh socket for whatever comes next
                raise Timeout(f"no reply from {self.address} within {timeout:g}s{lost}")
            frames = wire.recv(sock)
            if len(frames) == 2 and frames[0] == tag:
                self.answered = True
                return frames[1]
            # a late reply to an earlier request that timed out: drop it

    def _first_wait(self, left: float, size: int) -> None:
        """Wait for the first reply on a connection watching its monitor as well: a server
        at its client limit sheds a connection right after accepting it, which may be
        after the handshake. Raises Timeout (the outcome is unknown) when it does."""
        assert self.sock is not None and self.monitor is not None
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        deadline = time.monotonic() + left
        while time.monotonic() < deadline:
            ready = dict(poller.poll(max(1, int((deadline - time.monotonic()) * 1000))))
            if self.sock in ready:
                return
            if self.monitor in ready:
                self._watch(self._events(0))
                if self.lost:
                    self.close()
                    raise Timeout(
                        f"{self.address} closed the connection with the request ({size} "
                        "bytes) in flight: it may be at its connection limit (max_clients), "
                        "or the request over its message size limit (max_message_bytes)")

    def exchange_many(self, bodies: list[bytes], timeout: float,
                      window: int) -> list[bytes | Timeout | NotSent]:
        """Send every body, at most ``window`` in flight, and collect the replies in order.
        It waits as long as replies keep coming: it gives up once ``timeout`` passes
        with none. A body whose reply never came gets a Timeout (outcome unknown); one
        never sent gets NotSent."""
        n = len(bodies)
        out: list[bytes | Timeout | NotSent | None] = [None] * n
        tags = [_TAG.pack(next(self._tags)) for _ in bodies]
        index = {tag: i for i, tag in enumerate(tags)}
        sent = received = 0
        progress = time.monotonic()
        failure: NotSent | Timeout | None = None
        while received < n:
            try:
                while sent < n and sent - received < window:
                    self._send([tags[sent], bodies[sent]], progress + timeout)
                    sent += 1
            except NotSent as exc:
                if sent == received:  # nothing in flight to wait for
                    failure = exc
                    break
            assert self.sock is not None
            if not wait_readable(self.sock, progress + timeout):
                failure = Timeout(f"no reply from {self.address} within {timeout:g}s")
                self.close()
                break
            while self.sock.poll(0):
                frames = wire.recv(self.sock)
                i = index.pop(frames[0], None) if len(frames) == 2 else None
                if i is not None:
                    out[i] = frames[1]
                    received += 1
                    progress = time.monotonic()
                    self.answered = True
        if failure is not None:
            for i in range(n):
                if out[i] is None:
                    out[i] = failure if i < sent or isinstance(failure, NotSent) else NotSent(
                        f"not sent: an earlier request to {self.address} got no reply "
                        f"within {timeout:g}s")
        return [x for x in out if x is not None]
