"""What one peer may cost a server: connections, and bytes of replies it has not read.

Both the proxy's front and a node's ROUTER serve whoever connects, and ZeroMQ
bounds neither of the two things a careless or hostile client can pile up:

* **Connections.** Past the process's file-descriptor limit, libzmq's accept
  fails, the listening socket stays readable and its I/O thread spins at 100%
  while new clients hang. :class:`ConnectionGuard` watches the socket's monitor,
  counts accepted connections, and past ``max_clients`` shuts the newest one
  down at once (ZeroMQ then closes it itself): existing clients keep being
  served and the new one is told, by the connection closing before the
  handshake, that the server is full. :func:`raise_fd_limit` lifts the soft
  limit to the hard one at start and :func:`client_limit` keeps ``max_clients``
  under it with room to spare, so accept itself never fails.
* **Unread replies.** A ROUTER's queue to a peer is bounded in messages, not
  bytes: a client that pipelines 400 GETs of a 1 MiB value and never reads made
  the proxy hold 400 MiB for as long as it stayed. :class:`OutputBudget` counts
  the bytes sent to each peer that ZeroMQ has not yet written out (every
  256 KiB, and every large reply, is sent with a pyzmq ``MessageTracker``; a
  peer's queue is in order, so a finished tracker vouches for everything before
  it). A large reply to a peer whose backlog is over the budget is replaced by
  a short error saying why; small replies always go (the message high-water
  mark bounds them), so a write's acknowledgement is never dropped for this.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import frames as wire
from .core import protocol as P

log = logging.getLogger("zkv.guard")

FD_RESERVE = 64  # descriptors kept free for files, node links and a burst of connects
SMALL_REPLY = 1024  # replies up to this size are never held back
TRACK_EVERY = 256 * 1024  # bytes to a peer between two tracked messages
FRONT_HWM = 20_000  # messages queued per peer (so small replies are bounded too)
# A proxy names its connections to nodes with this prefix. A node does not hold back
# replies to them: a proxy carries many clients' replies and bounds each client itself.
# (Without CURVE anyone could take the name, as anyone could send anything; with it,
# a node refuses the name from any but a cluster key: zkv.security.IMPOSTOR.)
ROUTER_ID_PREFIX = b"zkv-router/"


def rss_bytes() -> int:
    """This process's resident memory."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft if soft != resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (ValueError, OSError):
        return soft


def client_limit(wanted: int, fd_limit: int, reserve: int = FD_RESERVE) -> int:
    """``wanted`` clients, or as many as the file-descriptor limit leaves room for: at
    least ``reserve`` descriptors, and a quarter of them, stay free for the process's
    own files and links and for the burst of connections accepted before they are shed."""
    reserve = max(reserve, fd_limit // 4)
    room = max(1, fd_limit - reserve)
    if wanted > room:
        log.warning("max_clients %d is more than the %d open files this process may have "
                    "allow (%d kept in reserve); serving at most %d clients", wanted,
                    fd_limit, reserve, room)
    return min(wanted, room)


class ConnectionGuard:
    """Counts the connections accepted on a bound socket and sheds those past the limit.
    Register :attr:`monitor` in the poll loop and call :meth:`handle` when it is readable."""

    def __init__(self, sock: zmq.Socket[Any], max_clients: int, name: str) -> None:
        self.max_clients = max_clients
        self.name = name
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED)
        self.open: set[int] = set()
        self.shed = 0
        self.accept_failed = 0

    def handle(self) -> None:
        while self.monitor.poll(0):
            frames = self.monitor.recv_multipart()
            event, value = struct.unpack("=HI", frames[0][:6])
            if event == zmq.EVENT_ACCEPTED:
                if len(self.open) >= self.max_clients:
                    self._shed(value)
                else:
                    self.open.add(value)
            elif event == zmq.EVENT_DISCONNECTED:
                self.open.discard(value)
            elif event == zmq.EVENT_ACCEPT_FAILED:
                self.accept_failed += 1
                if self.accept_failed in (1, 10, 100) or self.accept_failed % 1000 == 0:
                    log.warning("%s: accepting a connection failed (%s); %d times so far",
                                self.name, _errno_name(value), self.accept_failed)

    def _shed(self, fd: int) -> None:
        """Shut a just-accepted connection down: ZeroMQ sees it end and closes it."""
        self.shed += 1
        if self.shed in (1, 10, 100) or self.shed % 1000 == 0:
            log.warning("%s: at its limit of %d clients; shed %d connection(s) so far",
                        self.name, self.max_clients, self.shed)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return  # already gone
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libzmq's, to close

    def stats(self) -> dict[str, int]:
        return {"clients": len(self.open), "max_clients": self.max_clients,
                "clients_shed": self.shed, "accept_failed": self.accept_failed}

    def close(self) -> None:
        self.monitor.close(0)


def _errno_name(value: int) -> str:
    import errno

    return f"{errno.errorcode.get(value, value)}: {os.strerror(value)}"


@dataclass
class _Backlog:
    sent: int = 0  # bytes handed to ZeroMQ for this peer
    since_track: int = 0  # bytes since the last tracked message
    trackers: collections.deque[tuple[zmq.MessageTracker, int]] = field(
        default_factory=collections.deque)
    flushed: int = 0  # bytes ZeroMQ is known to be done with

    def outstanding(self) -> int:
        trackers = self.trackers
        while trackers and trackers[0][0].done:
            self.flushed = trackers.popleft()[1]
        return self.sent - self.flushed


class OutputBudget:
    """Sends replies on a ROUTER, holding back large ones for a peer that does not read."""

    def __init__(self, sock: zmq.Socket[Any], budget: int, exempt: bytes | None = None) -> None:
        self.sock = sock
        self.budget = budget
        self.exempt = exempt  # peers whose routing id starts with this are never held back
        self.peers: dict[bytes, _Backlog] = {}
        self.held_back = 0  # large replies replaced by an error
        self.dropped = 0  # replies ZeroMQ would not queue (peer gone, or its queue full)

    def backlog(self, ident: bytes) -> int:
        """Bytes sent to peer ``ident`` that ZeroMQ has not yet written out."""
        peer = self.peers.get(ident)
        return 0 if peer is None else peer.outstanding()

    def send(self, frames: list[bytes]) -> None:
        """Send one reply (routing frames, then the body)."""
        body = frames[-1]
        size = len(body)
        if size > SMALL_REPLY and not (self.exempt and frames[0].startswith(self.exempt)):
            backlog = self.backlog(frames[0])
            if backlog and backlog + size > self.budget:
                self.held_back += 1
                frames = [*frames[:-1], P.encode_error("TOO_LARGE", (
                    f"reply of {size} bytes not sent: {backlog} bytes of replies to this "
                    f"client are still unread (the limit is {self.budget}); read replies "
                    "before sending more requests"))]
        self.put(frames)

    def put(self, frames: list[bytes]) -> bool:
        """Send ``frames`` as they are, counting their bytes against the peer; False if
        ZeroMQ would not take them (the peer is gone, or its queue is full)."""
        size = len(frames[-1])
        peer = self.peers.get(frames[0])
        if peer is None:
            peer = self.peers[frames[0]] = _Backlog()
        peer.sent += size
        peer.since_track += size
        try:
            if peer.since_track >= TRACK_EVERY:
                tracker = self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False, track=True)
                if tracker is not None:
                    peer.trackers.append((tracker, peer.sent))
                peer.since_track = 0
            else:
                wire.send(self.sock, frames, wire.NOBLOCK)
        except zmq.ZMQError:
            self.dropped += 1
            peer.sent -= size
            return False
        return True

    def tidy(self) -> None:
        """Forget peers with nothing outstanding (periodically: peers come and go)."""
        for ident in [i for i, p in self.peers.items() if not p.outstanding()]:
            del self.peers[ident]

    def stats(self) -> dict[str, int]:
        return {"replies_held_back": self.held_back, "replies_dropped": self.dropped,
                "unread_reply_bytes": sum(p.sent - p.flushed for p in self.peers.values())}
