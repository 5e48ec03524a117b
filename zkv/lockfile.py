"""One process per directory: an flock()ed LOCK file holding the owner's pid.

Nodes lock their data directory and the proxy its state directory; a second
process on the same directory is refused at once, told which pid holds it.
"""

from __future__ import annotations

import fcntl
import os

LOCK_FILE = "LOCK"


class Locked(Exception):
    """Another process holds the lock; ``holder`` is its pid as it wrote it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def acquire(directory: str) -> int:
    """Lock ``directory`` for this process; the lock's descriptor, to keep open for as long
    as the lock is held. Raises Locked, or OSError when the directory cannot be used."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Locked(holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def holder(directory: str) -> str | None:
    """The pid of the process holding ``directory``'s lock, or None if nobody does
    (without creating the LOCK file or taking the lock for long)."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
