"""zkv: a sharded, persistent key-value store on ZeroMQ.

``zkv.Client`` talks to a proxy; every error it raises is a ``zkv.ZkvError``.
"""

from .client import Client, MoveHandle, Pipeline
from .errors import (
    BadArgument,
    ClusterError,
    CommandError,
    ConfigError,
    CrossNode,
    InternalError,
    LimitExceeded,
    LogCorruption,
    Moved,
    NodeBehind,
    NodeUnavailable,
    NotSent,
    OutcomeUnknown,
    ProtocolError,
    StaleEpoch,
    StorageError,
    Timeout,
    Unavailable,
    UnknownCommand,
    ZkvError,
)

__version__ = "0.1.0"

__all__ = [
    "BadArgument",
    "Client",
    "ClusterError",
    "CommandError",
    "ConfigError",
    "CrossNode",
    "InternalError",
    "LimitExceeded",
    "LogCorruption",
    "MoveHandle",
    "Moved",
    "NodeBehind",
    "NodeUnavailable",
    "NotSent",
    "OutcomeUnknown",
    "Pipeline",
    "ProtocolError",
    "StaleEpoch",
    "StorageError",
    "Timeout",
    "Unavailable",
    "UnknownCommand",
    "ZkvError",
]
