"""The one exception family of zkv.

Every error a user can see is a :class:`ZkvError`. Errors cross the wire as a
``(code, message)`` pair and are rebuilt on the client side as the same class,
so ``except zkv.NodeUnavailable`` works the same for a local and a remote failure::

    ZkvError                      base of everything zkv raises
    ├── ProtocolError             BAD_REQUEST   the peer sent bytes that are not a valid request
    │   ├── UnknownCommand        UNKNOWN_COMMAND
    │   └── LimitExceeded         TOO_LARGE     a key, value, batch or message over a limit
    ├── CommandError              BAD_COMMAND   a well-formed request that cannot be done
    │   │                                       (e.g. SCAN with an expired cursor)
    │   ├── CrossNode             CROSS_NODE    an atomic pipeline (a transaction) whose
    │   │                                       keys live on more than one node
    │   └── BadArgument           (local)       a client method given an argument of the
    │                                           wrong type or value (also a TypeError or
    │                                           ValueError, as Python code expects)
    ├── StaleEpoch                STALE_EPOCH   a router's view of the cluster is older than
    │                                           the node's: refresh it and send again
    ├── Moved                     MOVED         the key is another node's at this epoch
    ├── Unavailable               UNAVAILABLE   no answer in time; names the node or proxy
    │   ├── NodeUnavailable       NODE_DOWN     the node owning the key is marked down
    │   ├── Timeout               TIMEOUT       no reply before the deadline (outcome unknown)
    │   ├── NodeBehind            BEHIND        the node has not got the request's epoch yet
    │   └── NotSent               (local)       the request never left the client (nothing
    │                                           listens, say): safe to send again
    ├── StorageError              STORAGE       the node could not make a write durable;
    │                                           the write was not applied
    ├── ClusterError              CLUSTER       an admin operation was refused (ADD/REMOVE)
    ├── InternalError             INTERNAL      a bug: reported, never silent
    ├── ConfigError               (local)       a bad YAML topology or command-line value
    └── LogCorruption             (local)       a damaged data file; names file and offset

An error may carry ``details`` (a map: the node's epoch for STALE_EPOCH, the
owner for MOVED), sent as a fourth element of the error reply.

Lower layers (zmq, cbor2, OSError) are translated at the boundary with
``raise ... from exc`` so users only ever see this family.
"""

from __future__ import annotations

from typing import Any


class ZkvError(Exception):
    """Base class of every error zkv raises."""

    code = "ERROR"

    def __init__(self, message: str = "", details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __str__(self) -> str:
        return self.message


class ProtocolError(ZkvError):
    code = "BAD_REQUEST"


class UnknownCommand(ProtocolError):
    code = "UNKNOWN_COMMAND"


class LimitExceeded(ProtocolError):
    code = "TOO_LARGE"


class CommandError(ZkvError):
    code = "BAD_COMMAND"


class CrossNode(CommandError):
    """An atomic pipeline (RESP's MULTI/EXEC) whose keys are not all on one node: one
    node runs a transaction, so its keys must be kept together (a hash tag)."""

    code = "CROSS_NODE"


class BadArgument(CommandError):
    """A client method was given an argument it cannot send (a key that is not text or
    bytes, a count that is not an integer): nothing was sent. Local only; raised as
    :class:`BadType` or :class:`BadValue`, which are also TypeError and ValueError."""

    local = True


class BadType(BadArgument, TypeError):
    local = True


class BadValue(BadArgument, ValueError):
    local = True


class StaleEpoch(ZkvError):
    """Refused unapplied: the sender routed by an older configuration (details: epoch)."""

    code = "STALE_EPOCH"


class Moved(ZkvError):
    """Refused unapplied: the key belongs to another node (details: owner, epoch)."""

    code = "MOVED"


class Unavailable(ZkvError):
    code = "UNAVAILABLE"


class NodeUnavailable(Unavailable):
    code = "NODE_DOWN"


class Timeout(Unavailable):
    code = "TIMEOUT"


class OutcomeUnknown(Timeout):
    """A retried write whose first outcome is no longer remembered (zkv.core.once): it may
    or may not have been applied, and it was not applied again. Not worth another
    try: read the key to see."""

    code = "OUTCOME_UNKNOWN"


class NodeBehind(Unavailable):
    """Refused unapplied: the node has not yet got the configuration the request was
    routed by (it will, from the config manager); details: epoch."""

    code = "BEHIND"


class NotSent(Unavailable):
    """The request never left this process: safe to send again, a write included.
    Local only: a server never reports it, so it keeps the code of Unavailable."""

    local = True


class NoAuth(ZkvError):
    """The sender's key is not (or no longer) allowed: Redis's NOAUTH."""

    code = "NOAUTH"


class NoPerm(ZkvError):
    """The sender's key may not run this command (a data key doing ADD): Redis's NOPERM."""

    code = "NOPERM"


class StorageError(ZkvError):
    code = "STORAGE"


class ClusterError(ZkvError):
    code = "CLUSTER"


class InternalError(ZkvError):
    code = "INTERNAL"


class ConfigError(ZkvError):
    code = "CONFIG"


class LogCorruption(ZkvError):
    """A log or snapshot holds a bad record followed by good ones."""

    code = "CORRUPT"

    LOG_HINT = ("Restart with --repair to keep the good prefix "
                "(the dropped bytes are saved beside the log).")
    SNAPSHOT_HINT = ("Restart with --repair to load every record that can still be read; "
                     "the keys that cannot are reported as lost.")

    def __init__(self, path: str, offset: int, reason: str, hint: str = LOG_HINT) -> None:
        super().__init__(
            f"{path}: corrupt record at byte offset {offset} ({reason}); "
            f"refusing to start. {hint}"
        )
        self.path = path
        self.offset = offset
        self.reason = reason


_BY_CODE: dict[str, type[ZkvError]] = {}


def _register(cls: type[ZkvError]) -> None:
    if not cls.__dict__.get("local", False):
        _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(ZkvError)


def error_from_wire(code: str, message: str,
                    details: dict[str, Any] | None = None) -> ZkvError:
    """Rebuild the exception a peer reported as ``(code, message[, details])``."""
    cls = _BY_CODE.get(code, ZkvError)
    if cls is LogCorruption:
        return ZkvError(message)
    err = cls(message)
    err.details = dict(details or {})
    if cls is ZkvError:
        err.code = code
    return err
