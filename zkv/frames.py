"""Multipart send and receive without pyzmq's per-call Python conveniences.

``Socket.send_multipart``/``recv_multipart`` type-check every frame and build
enum flags on every call; on the proxy's and node's per-message path that was
about half the cost of moving a message. These helpers call the socket's
Cython methods with plain int flags: the same frames, half the time. Where a
pyzmq build lacks those methods they fall back to the public API.
"""

from __future__ import annotations

from typing import Any

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

_backend: Any = getattr(zmq, "backend", None)
_Base: Any = getattr(_backend, "Socket", None)
_send: Any = getattr(_Base, "send", None)
_recv: Any = getattr(_Base, "recv", None)
_get: Any = getattr(_Base, "get", None)
FAST = _send is not None and _recv is not None and _get is not None


def send(sock: zmq.Socket[Any], frames: list[bytes], flags: int = 0) -> None:
    """Send one multipart message (raises zmq.Again with NOBLOCK, as send does)."""
    if not FAST:
        sock.send_multipart(frames, flags)
        return
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, flags if i == last else flags | SNDMORE, True, False)


def recv(sock: zmq.Socket[Any]) -> list[bytes]:
    """Receive one whole multipart message (blocking: call when input is waiting)."""
    if not FAST:
        return sock.recv_multipart()
    # a Frame knows whether more follow: asking the socket (RCVMORE) would cost an
    # enum lookup in pyzmq's getsockopt per frame, a third of the whole receive
    frame = _recv(sock, 0, False, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, 0, False, False)
        parts.append(frame.bytes)
    return parts


def recv_user(sock: zmq.Socket[Any]) -> tuple[list[bytes], str]:
    """One whole message and the User-Id its connection was authenticated as (a CURVE
    socket's peer: its public key in Z85, set by the ZAP handler)."""
    frame = sock.recv(0, False, False) if not FAST else _recv(sock, 0, False, False)
    user = str(frame.get("User-Id"))
    parts = [frame.bytes]
    while frame.more:
        frame = sock.recv(0, False, False) if not FAST else _recv(sock, 0, False, False)
        parts.append(frame.bytes)
    return parts, user


def waiting(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is ready to be received without blocking."""
    if not FAST:
        return bool(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
    return bool(_get(sock, _EVENTS) & _POLLIN)
