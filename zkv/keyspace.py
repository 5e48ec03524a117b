"""A node's data as a state machine over log records. No I/O.

The same :meth:`Keyspace.apply` rebuilds the map from a snapshot and a log on
start, so what recovery produces is by construction what serving produced.
Live mutations go through :meth:`set`, :meth:`delete` and :meth:`mset`, which
return the log record to append and remember how to undo themselves until the
caller commits (see :class:`zkv.storage.Storage`).
"""

from __future__ import annotations

from typing import Any

from . import wal

MISSING: Any = object()


class Keyspace:
    __slots__ = ("data", "live_bytes", "undo")

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.live_bytes = 0
        # (key, previous value or MISSING) for every change not yet committed.
        self.undo: list[tuple[bytes, Any]] = []

    def __len__(self) -> int:
        return len(self.data)

    # -- live mutations: change the map, remember the undo, return the log record
    def set(self, key: bytes, value: bytes) -> bytes:
        self._put(key, value)
        return wal.encode((wal.SET, key, value))

    def delete(self, key: bytes) -> tuple[bool, bytes | None]:
        """Whether the key existed, and the record to log (None when nothing changed)."""
        if key not in self.data:
            return False, None
        self._drop(key)
        return True, wal.encode((wal.DEL, key))

    def mset(self, pairs: list[bytes]) -> bytes:
        for i in range(0, len(pairs), 2):
            self._put(pairs[i], pairs[i + 1])
        return wal.encode((wal.MSET, pairs))

    def commit(self) -> None:
        self.undo.clear()

    def rollback(self) -> None:
        data = self.data
        for key, old in reversed(self.undo):
            cur = data.get(key)
            if cur is not None:
                self.live_bytes -= len(key) + len(cur)
            if old is MISSING:
                data.pop(key, None)
            else:
                data[key] = old
                self.live_bytes += len(key) + len(old)
        self.undo.clear()

    def _put(self, key: bytes, value: bytes) -> None:
        old = self.data.get(key, MISSING)
        self.undo.append((key, old))
        if old is MISSING:
            self.live_bytes += len(key) + len(value)
        else:
            self.live_bytes += len(value) - len(old)
        self.data[key] = value

    def _drop(self, key: bytes) -> None:
        old = self.data.pop(key)
        self.undo.append((key, old))
        self.live_bytes -= len(key) + len(old)

    # -- replay
    def apply(self, item: Any) -> None:
        """Apply one decoded log or snapshot record (no undo: replay is not a transaction)."""
        kind = item[0]
        data = self.data
        if kind == wal.SET:
            key, value = item[1], item[2]
            old = data.get(key)
            self.live_bytes += len(value) - (len(old) if old is not None else -len(key))
            data[key] = value
        elif kind == wal.DEL:
            old = data.pop(item[1], None)
            if old is not None:
                self.live_bytes -= len(item[1]) + len(old)
        elif kind == wal.MSET or kind == wal.CHUNK:
            pairs = item[1]
            for i in range(0, len(pairs), 2):
                key, value = pairs[i], pairs[i + 1]
                old = data.get(key)
                self.live_bytes += len(value) - (len(old) if old is not None else -len(key))
                data[key] = value
        elif kind == wal.META:
            pass
        else:
            raise ValueError(f"unknown record kind {kind!r}")
