"""A node's files: the data directory lock, log segments, snapshots and recovery.

Layout of a data directory::

    LOCK                 flock()ed by the running node; holds its pid
    wal-00000007.log     log segments; records as in zkv.wal
    snap-00000007.zkv    snapshot of the map as of the start of wal-00000007.log
    *.torn-OFFSET        bytes cut off a torn tail, kept for inspection
    *.corrupt-OFFSET     bytes dropped by --repair

Writes are transactions of one event-loop turn: the node mutates the
:class:`~zkv.keyspace.Keyspace`, collects the records, then calls
:meth:`Storage.commit`, which appends them with one write (and, under
``fsync always``, one fsync: group commit) before any reply is sent. If the disk
refuses, the file is cut back, the map is rolled back and StorageError is raised:
nothing unacknowledged stays, nothing acknowledged is lost.

A snapshot starts a new segment, copies the map (a brief pause), and writes the
copy from a background thread (temp file, fsync, rename, fsync directory);
only then are the older segments deleted.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import wal
from .errors import LogCorruption, StorageError
from .keyspace import Keyspace, ReplayError

log = logging.getLogger("zkv.storage")

SEGMENT_RE = re.compile(r"^wal-(\d{8})\.log$")
SNAPSHOT_RE = re.compile(r"^snap-(\d{8})\.zkv$")
CHUNK_KEYS = 1000
CHUNK_BYTES = 1 << 20
POLICIES = ("always", "everysec", "no")


def segment_name(seq: int) -> str:
    return f"wal-{seq:08d}.log"


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:08d}.zkv"


@dataclass
class Recovery:
    """What opening a data directory found."""

    keys: int = 0
    records: int = 0
    seconds: float = 0.0
    snapshot: str | None = None
    warnings: list[str] = field(default_factory=list)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: str, items: list[tuple[bytes, bytes]], meta: dict[str, Any],
                   tombstones: list[bytes] | None = None) -> int:
    """Write ``items`` (and the tombstones of open moves) as a snapshot at ``path``
    atomically; returns its size."""
    tmp = path + ".tmp"
    try:
        return _write_snapshot(path, tmp, items, meta, tombstones)
    except BaseException:
        try:  # a full disk must not stay fuller because of a half snapshot
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_snapshot(path: str, tmp: str, items: list[tuple[bytes, bytes]],
                    meta: dict[str, Any], tombstones: list[bytes] | None) -> int:
    with open(tmp, "wb") as f:
        f.write(wal.encode((wal.META, {"snapshot": 1, **meta})))
        chunk: list[bytes] = []
        size = 0
        for key, value in items:
            chunk.append(key)
            chunk.append(value)
            size += len(key) + len(value)
            if len(chunk) >= 2 * CHUNK_KEYS or size >= CHUNK_BYTES:
                f.write(wal.encode((wal.CHUNK, chunk)))
                chunk, size = [], 0
        if chunk:
            f.write(wal.encode((wal.CHUNK, chunk)))
        for i in range(0, len(tombstones or ()), CHUNK_KEYS):
            f.write(wal.encode((wal.TOMBS, (tombstones or [])[i : i + CHUNK_KEYS])))
        f.write(wal.encode((wal.META, {"end": len(items)})))
        f.flush()
        os.fsync(f.fileno())
        total = f.tell()
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
    return total


class Storage:
    def __init__(
        self,
        data_dir: str,
        fsync: str = "everysec",
        snapshot_factor: float = 4.0,
        snapshot_min_bytes: int = 4 << 20,
        repair: bool = False,
    ) -> None:
        if fsync not in POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(POLICIES)}, not {fsync!r}")
        self.dir = data_dir
        self.fsync = fsync
        self.snapshot_factor = snapshot_factor
        self.snapshot_min_bytes = snapshot_min_bytes
        self.repair = repair
        self.keyspace = Keyspace()
        self.pending = bytearray()
        self.seq = 0  # current segment
        self.fd = -1
        self.seg_size = 0
        self.log_bytes = 0  # all live segments
        self.snapshot_bytes = 0
        self.dirty = False
        self.last_sync = time.monotonic()
        self.snapshots_written = 0
        self.fsyncs = 0
        self._lock_fd = -1
        self._snap: threading.Thread | None = None
        self._snap_result: tuple[int, int] | BaseException | None = None
        self._snap_retry_at = 0.0

    # -- opening ----------------------------------------------------------
    def open(self) -> Recovery:
        started = time.monotonic()
        os.makedirs(self.dir, exist_ok=True)
        self._lock()
        try:
            return self._recover(started)
        except BaseException:  # refused (corruption) or failed: give the directory back
            self._release()
            raise

    def _recover(self, started: float) -> Recovery:
        report = Recovery()
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.dir, name))
        snaps = self._numbered(SNAPSHOT_RE)
        segs = self._numbered(SEGMENT_RE)
        base = snaps[-1] if snaps else 0
        if snaps:
            report.snapshot = snapshot_name(base)
            report.records += self._load_snapshot(os.path.join(self.dir, report.snapshot))
            for old in snaps[:-1]:
                os.unlink(os.path.join(self.dir, snapshot_name(old)))
            self.snapshot_bytes = os.path.getsize(os.path.join(self.dir, report.snapshot))
        for seq in [s for s in segs if s < base]:
            os.unlink(os.path.join(self.dir, segment_name(seq)))
        live = [s for s in segs if s >= base]
        for i, seq in enumerate(live):
            last = i == len(live) - 1
            n, stop = self._replay_segment(seq, last, report)
            report.records += n
            if stop:
                for later in live[i + 1 :]:
                    p = os.path.join(self.dir, segment_name(later))
                    os.replace(p, p + ".dropped")
                    report.warnings.append(f"{p}: set aside as {p}.dropped by --repair")
                live = live[: i + 1]
                break
        self.seq = live[-1] if live else max(base, 1)
        self._open_segment(self.seq)
        self.log_bytes = sum(
            os.path.getsize(os.path.join(self.dir, segment_name(s))) for s in live
        ) if live else 0
        report.keys = len(self.keyspace)
        report.seconds = time.monotonic() - started
        return report

    def _numbered(self, pattern: re.Pattern[str]) -> list[int]:
        found = (pattern.match(n) for n in os.listdir(self.dir))
        return sorted(int(m.group(1)) for m in found if m)

    def _lock(self) -> None:
        path = os.path.join(self.dir, "LOCK")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(
                f"data directory {self.dir} is in use by another running node (pid {holder}); "
                "two nodes must never share one data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _load_snapshot(self, path: str) -> int:
        buf = self._read(path)
        scan = wal.LogScan(buf)
        ks = self.keyspace
        n = 0
        ended = False
        for off, item in scan:
            if ended:
                raise LogCorruption(path, off, "records after the end marker")
            try:
                if item[0] == wal.META and isinstance(item[1], dict) and "end" in item[1]:
                    ended = True
                else:
                    ks.apply(item)
            except (IndexError, TypeError, ValueError, KeyError) as exc:
                raise LogCorruption(path, off, f"bad record: {exc}") from None
            n += 1
        if scan.damage is not None:
            raise LogCorruption(path, scan.damage.offset, scan.damage.reason)
        if not ended:
            raise LogCorruption(path, scan.end, "snapshot has no end marker")
        return n

    def _replay_segment(self, seq: int, last: bool, report: Recovery) -> tuple[int, bool]:
        """Apply one segment; returns (records, whether later segments must be set aside)."""
        path = os.path.join(self.dir, segment_name(seq))
        buf = self._read(path)
        scan = wal.LogScan(buf)
        ks = self.keyspace
        n = 0
        try:
            n = ks.replay(scan)
            bad_shape: tuple[int, str] | None = None
        except ReplayError as exc:
            n, bad_shape = exc.applied, (exc.offset, f"record of the wrong shape: {exc.reason}")
        damage = scan.damage
        if bad_shape is not None:
            damage = wal.Damage(bad_shape[0], bad_shape[1], corrupt=True)
        if damage is None:
            return n, False
        cut = buf[damage.offset :]
        if not damage.corrupt and last:
            kept = f"{path}.torn-{damage.offset}"
            self._cut(path, damage.offset, cut, kept)
            msg = (
                f"{path}: torn tail at byte offset {damage.offset} ({damage.reason}); "
                f"cut {len(cut)} bytes, kept in {kept}"
            )
            log.warning(msg)
            report.warnings.append(msg)
            return n, False
        reason = (damage.reason if damage.corrupt
                  else f"{damage.reason} in a segment that is not the last")
        if not self.repair:
            raise LogCorruption(path, damage.offset, reason)
        kept = f"{path}.corrupt-{damage.offset}"
        self._cut(path, damage.offset, cut, kept)
        msg = (
            f"{path}: --repair dropped {len(cut)} bytes from byte offset {damage.offset} "
            f"({reason}); kept in {kept}"
        )
        log.warning(msg)
        report.warnings.append(msg)
        return n, True

    def _cut(self, path: str, offset: int, cut: bytes, kept: str) -> None:
        with open(kept, "wb") as f:
            f.write(cut)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(path, offset)
        fsync_dir(self.dir)

    def _open_segment(self, seq: int) -> None:
        path = os.path.join(self.dir, segment_name(seq))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.seg_size = os.fstat(self.fd).st_size
        fsync_dir(self.dir)

    # -- writing ----------------------------------------------------------
    def commit(self, durable: bool = False) -> None:
        """Make the pending records as durable as the policy asks (or on disk now, with
        ``durable``: rebalancing records and batches), or undo them."""
        if not self.pending:
            self.keyspace.commit()
            return
        data = bytes(self.pending)
        self.pending.clear()
        try:
            self._write_all(data)
            if self.fsync == "always" or durable:
                os.fdatasync(self.fd)
                self.fsyncs += 1
            else:
                self.dirty = True
        except OSError as exc:
            self._undo_write(len(data))
            raise StorageError(
                f"could not write the log in {self.dir}: {exc.strerror or exc}; "
                "the write was not applied"
            ) from exc
        self.seg_size += len(data)
        self.log_bytes += len(data)
        self.keyspace.commit()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _undo_write(self, size: int) -> None:
        self.keyspace.rollback()
        try:
            os.ftruncate(self.fd, self.seg_size)
        except OSError as exc:  # the disk is in a bad way; the next start will cut the tail
            log.error("could not cut back %s after a failed write: %s", self.dir, exc)

    def rollback(self) -> None:
        self.pending.clear()
        self.keyspace.rollback()

    def sync(self) -> None:
        """fsync now if anything is unsynced (everysec's tick, shutdown)."""
        if self.dirty and self.fd >= 0:
            os.fdatasync(self.fd)
            self.fsyncs += 1
            self.dirty = False
        self.last_sync = time.monotonic()

    def tick(self, now: float) -> None:
        """Periodic work: everysec fsync, snapshot bookkeeping."""
        if self.fsync == "everysec" and self.dirty and now - self.last_sync >= 1.0:
            try:
                self.sync()
            except OSError as exc:
                log.error("fsync of %s failed: %s", self.dir, exc)
        self._finish_snapshot()
        if self._snap is None and now >= self._snap_retry_at and self.wants_snapshot():
            self.start_snapshot()

    # -- snapshots -------------------------------------------------------
    def wants_snapshot(self) -> bool:
        limit = max(self.snapshot_min_bytes, self.snapshot_factor * self.keyspace.live_bytes)
        return self.log_bytes > limit

    def start_snapshot(self) -> None:
        """Start a new segment and write the map as of its start in the background."""
        if self._snap is not None:
            return
        self.sync()
        os.close(self.fd)
        self.seq += 1
        self._open_segment(self.seq)
        items = list(self.keyspace.data.items())
        meta = {"seq": self.seq, **self.keyspace.snapshot_meta()}
        tombs = list(self.keyspace.tombstones)
        path = os.path.join(self.dir, snapshot_name(self.seq))
        seq = self.seq

        def run() -> None:
            try:
                self._snap_result = (seq, write_snapshot(path, items, meta, tombs))
            except BaseException as exc:  # reported by _finish_snapshot
                self._snap_result = exc

        self._snap_result = None
        self._snap = threading.Thread(target=run, name="zkv-snapshot", daemon=True)
        self._snap.start()

    def _finish_snapshot(self, wait: bool = False) -> None:
        if self._snap is None or (self._snap.is_alive() and not wait):
            return
        self._snap.join()
        self._snap = None
        result = self._snap_result
        if isinstance(result, BaseException) or result is None:
            log.error("snapshot of %s failed: %s; will retry", self.dir, result)
            self._snap_retry_at = time.monotonic() + 5.0
            return
        seq, size = result
        for old in self._numbered(SEGMENT_RE):
            if old < seq:
                self.log_bytes -= os.path.getsize(os.path.join(self.dir, segment_name(old)))
                os.unlink(os.path.join(self.dir, segment_name(old)))
        for old in self._numbered(SNAPSHOT_RE):
            if old < seq:
                os.unlink(os.path.join(self.dir, snapshot_name(old)))
        self.snapshot_bytes = size
        self.snapshots_written += 1

    def close(self) -> None:
        """Finish any snapshot and make everything written durable."""
        self._finish_snapshot(wait=True)
        if self.fd >= 0:
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                log.error("final fsync of %s failed: %s", self.dir, exc)
        self._release()

    def _release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def stats(self) -> dict[str, Any]:
        return {
            "log_bytes": self.log_bytes,
            "snapshot_bytes": self.snapshot_bytes,
            "segment": self.seq,
            "snapshots_written": self.snapshots_written,
            "fsyncs": self.fsyncs,
            "snapshot_running": self._snap is not None,
        }


__all__ = ["Recovery", "Storage"]
