"""A node's files: the data directory lock, log segments, snapshots and recovery.

Layout of a data directory::

    LOCK                 flock()ed by the running node; holds its pid
    MANIFEST             which snapshot and which segments hold the data (JSON)
    wal-00000007.log     log segments; records as in zkv.core.wal
    snap-00000007.zkv    snapshot of the map as of the start of wal-00000007.log
    *.torn-OFFSET        bytes cut off a torn tail, kept for inspection
    *.corrupt-OFFSET     bytes dropped by --repair

The MANIFEST is rewritten (temp file, fsync, rename, fsync directory) whenever a
segment is started and whenever a snapshot replaces older files, before any file
it no longer names is deleted. So a node knows which files it needs: a snapshot
or a segment that has gone missing is found at start and named, and the node
refuses to start without it (``--repair`` goes on, reporting what is lost),
instead of starting silently with keys missing or older values back. A
directory from before the MANIFEST is checked by its file numbers (segments
must run without a gap from the snapshot, or from 1).

The MANIFEST also holds the directory's *identity*, a random id made when the
directory is first used (and made anew when ``--repair`` goes on without data).
A replicated shard's configuration records the identity of each copy it counts on
(zkv.core.replication), so a node restarted on an empty or different directory is
never taken for the copy it replaced.

Writes are transactions of one event-loop turn: the node mutates the
:class:`~zkv.core.keyspace.Keyspace`, collects the records, then calls
:meth:`Storage.commit`, which appends them with one write (and, under
``fsync always``, one fsync: group commit) before any reply is sent. If the disk
refuses, the file is cut back, the map is rolled back and StorageError is raised:
nothing unacknowledged stays, nothing acknowledged is lost.

A snapshot starts a new segment, copies the map (a brief pause), and writes the
copy from a background thread (temp file, fsync, rename, fsync directory);
only then are the older segments deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import durable, lockfile
from .core import wal
from .core.cluster import valid_identity
from .core.keyspace import Keyspace, ReplayError
from .core.timings import Timings
from .durable import fsync_dir
from .errors import LogCorruption, StorageError

log = logging.getLogger("zkv.storage")

MANIFEST = "MANIFEST"
MANIFEST_VERSION = 1
SEGMENT_RE = re.compile(r"^wal-(\d{8})\.log$")
SNAPSHOT_RE = re.compile(r"^snap-(\d{8})\.zkv$")
CHUNK_KEYS = 1000
CHUNK_BYTES = 1 << 20
POLICIES = ("always", "everysec", "no")
SNAPSHOT_RETRY = 5.0  # seconds before a snapshot that failed is tried again


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
    no_manifest: bool = False  # data files but no MANIFEST (NO_MANIFEST): damage


@dataclass(frozen=True)
class Manifest:
    """Which files hold a node's data: the snapshot (None before the first) and the
    segments ``first`` to ``last`` after it."""

    snapshot: int | None
    first: int
    last: int
    identity: str = ""  # the directory's id ("" in a MANIFEST from before ids)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"version": MANIFEST_VERSION, "snapshot": self.snapshot,
                               "segments": [self.first, self.last]}
        if self.identity:
            doc["id"] = self.identity
        return doc


NO_MANIFEST = (
    "{} has data files but no MANIFEST: they are taken by their numbers, so a segment "
    "deleted with it cannot be missed, and the directory gets a new id (a replicated "
    "shard no longer counts this copy as the one it had)")


def read_manifest(data_dir: str) -> Manifest | None:
    """The MANIFEST of a data directory; None if there is none; ValueError if damaged."""
    path = os.path.join(data_dir, MANIFEST)
    data = durable.read_json(path)
    if data is None:
        return None
    ok = (isinstance(data, dict) and data.get("version") == MANIFEST_VERSION
          and (data.get("snapshot") is None or _seq(data.get("snapshot")))
          and isinstance(data.get("segments"), list) and len(data["segments"]) == 2
          and all(_seq(x) for x in data["segments"])
          and data["segments"][0] <= data["segments"][1]
          and (data.get("id") is None or valid_identity(data["id"])))
    if not ok:
        raise ValueError(f"{path} is damaged: not a zkv manifest (version {MANIFEST_VERSION})")
    return Manifest(data["snapshot"], data["segments"][0], data["segments"][1],
                    data.get("id") or "")


def new_identity() -> str:
    return secrets.token_hex(8)


def _seq(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**8


def write_manifest(data_dir: str, manifest: Manifest) -> None:
    """Replace the MANIFEST atomically and durably."""
    durable.write_json(os.path.join(data_dir, MANIFEST), manifest.to_json())


def write_snapshot(path: str, items: list[tuple[bytes, bytes]], meta: dict[str, Any],
                   tombstones: list[bytes] | None = None,
                   deadlines: list[tuple[bytes, int]] | None = None,
                   outcomes: list[Any] | None = None) -> int:
    """Write ``items`` (then the deadlines of those that have one, the tombstones of
    open moves, and the outcomes of recent tagged writes, flat: zkv.core.once) as a
    snapshot at ``path`` atomically; returns its size."""
    tmp = path + ".tmp"
    try:
        return _write_snapshot(path, tmp, items, meta, tombstones, deadlines or [],
                               outcomes or [])
    except BaseException:
        try:  # a full disk must not stay fuller because of a half snapshot
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_snapshot(path: str, tmp: str, items: list[tuple[bytes, bytes]],
                    meta: dict[str, Any], tombstones: list[bytes] | None,
                    deadlines: list[tuple[bytes, int]], outcomes: list[Any]) -> int:
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
        for i in range(0, len(deadlines), CHUNK_KEYS):
            f.write(wal.encode((wal.PXAT, [x for kd in deadlines[i : i + CHUNK_KEYS]
                                           for x in kd])))
        for i in range(0, len(outcomes), 3 * CHUNK_KEYS):
            f.write(wal.encode((wal.ONCES, outcomes[i : i + 3 * CHUNK_KEYS])))
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
        check_only: bool = False,
    ) -> None:
        if fsync not in POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(POLICIES)}, not {fsync!r}")
        self.dir = data_dir
        self.fsync = fsync
        self.snapshot_factor = snapshot_factor
        self.snapshot_min_bytes = snapshot_min_bytes
        self.repair = repair
        # check_only: recover into memory as a start would, changing no file; what a
        # start would change is listed in ``changes`` instead (zkv wal check)
        self.check_only = check_only
        self.changes: list[str] = []
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
        self.fsync_timings = Timings()  # zkv.metrics: how long fsyncs take
        self.snapshot_timings = Timings()
        self._snap_started = 0.0
        self._lock_fd = -1
        self._snap: threading.Thread | None = None
        self._snap_result: tuple[int, int] | BaseException | None = None
        self._snap_retry_at = 0.0
        self._resnapshot = False  # a damaged snapshot was loaded by --repair: replace it
        self.first_seq = 1  # the oldest live segment
        self.snapshot_seq: int | None = None
        self.identity = ""  # this directory's id (see the module's text), once opened

    # -- opening ----------------------------------------------------------
    def open(self) -> Recovery:
        """Lock the directory and recover its data. Anything wrong with the directory
        itself (not a directory, read-only, full) is one StorageError naming the path."""
        started = time.monotonic()
        if self.check_only:
            return self._check(started)
        try:
            if os.path.exists(self.dir) and not os.path.isdir(self.dir):
                raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a directory",
                                         self.dir)  # (makedirs would say "File exists")
            os.makedirs(self.dir, exist_ok=True)
            self._lock()
        except OSError as exc:
            raise StorageError(self._os_problem(exc, "cannot use the data directory")) from None
        try:
            return self._recover(started)
        except OSError as exc:
            self._release()
            raise StorageError(self._os_problem(exc, "cannot recover the data directory")) \
                from None
        except BaseException:  # refused (corruption) or failed: give the directory back
            self._release()
            raise

    def _check(self, started: float) -> Recovery:
        """Recovery without changing anything (the directory must not be in use)."""
        if not os.path.isdir(self.dir):
            raise StorageError(f"{self.dir}: no such directory" if not os.path.exists(self.dir)
                               else f"{self.dir}: not a directory")
        holder = lockfile.holder(self.dir)
        if holder is not None:
            raise StorageError(f"data directory {self.dir} is in use by a running node "
                               f"(pid {holder}): its files are changing; stop it first")
        try:
            return self._recover(started)
        except OSError as exc:
            raise StorageError(self._os_problem(exc, "cannot read the data directory")) \
                from None

    def _change(self, what: str) -> bool:
        """Whether to make this change to the files now (not in check mode: noted)."""
        if self.check_only:
            self.changes.append(what)
            return False
        return True

    def _os_problem(self, exc: OSError, what: str) -> str:
        where = exc.filename or self.dir
        return f"{where}: {what} {self.dir}: {exc.strerror or exc}"

    def _recover(self, started: float) -> Recovery:
        report = Recovery()
        for name in os.listdir(self.dir):
            if name.endswith(".tmp") and self._change(
                    f"remove {os.path.join(self.dir, name)} (an unfinished temporary file)"):
                os.unlink(os.path.join(self.dir, name))
        base, live = self._files(report)
        if base:
            report.snapshot = snapshot_name(base)
            path = os.path.join(self.dir, report.snapshot)
            report.records += self._load_snapshot(path, report)
            self.snapshot_bytes = os.path.getsize(path)
        for old in self._numbered(SNAPSHOT_RE):
            path = os.path.join(self.dir, snapshot_name(old))
            if old < base and self._change(f"remove {path} (older than the snapshot)"):
                os.unlink(path)
        for seq in self._numbered(SEGMENT_RE):
            path = os.path.join(self.dir, segment_name(seq))
            if seq < (live[0] if live else base) and self._change(
                    f"remove {path} (held in the snapshot)"):
                os.unlink(path)
        for i, seq in enumerate(live):
            last = i == len(live) - 1
            n, stop = self._replay_segment(seq, last, report)
            report.records += n
            if stop:
                self._set_aside(live[i + 1 :], report)
                live = live[: i + 1]
                break
        self.keyspace.reindex()
        self.seq = live[-1] if live else max(base, 1)
        self.first_seq = live[0] if live else self.seq
        self.snapshot_seq = base or None
        if not self.check_only:
            self._open_segment(self.seq)
            if not self.identity:
                self.identity = new_identity()
            self._write_manifest(self.snapshot_seq, self.first_seq, self.seq)
        self.log_bytes = sum(
            os.path.getsize(os.path.join(self.dir, segment_name(s))) for s in live
            if os.path.exists(os.path.join(self.dir, segment_name(s)))) if live else 0
        report.keys = len(self.keyspace)
        report.seconds = time.monotonic() - started
        return report

    def _files(self, report: Recovery) -> tuple[int, list[int]]:
        """The snapshot to load (0 for none) and the segments to replay after it, checked
        against the MANIFEST (or, without one, against each other): a file the data
        needs that is missing refuses the start, naming it, unless ``repair``."""
        snaps = self._numbered(SNAPSHOT_RE)
        segs = self._numbered(SEGMENT_RE)
        try:
            manifest = read_manifest(self.dir)
        except ValueError as exc:
            if not self.repair:
                raise StorageError(f"{exc}; refusing to start. Restart with --repair to check "
                                   "the data files by their numbers instead") from None
            self._warn(report, f"{exc}; --repair checks the data files by their numbers")
            manifest = None
        self.identity = manifest.identity if manifest is not None else ""
        missing: list[str] = []
        if manifest is not None:
            wanted = manifest.snapshot or 0
            # the newest snapshot, which may be newer than the MANIFEST says (a crash
            # between writing it and naming it)
            newer = [s for s in snaps if s >= wanted]
            base = newer[-1] if newer else 0
            if wanted and not newer:
                missing.append(f"{snapshot_name(wanted)} (the data written before "
                               f"{segment_name(wanted)})")
                base = 0
            first = max(base, manifest.first)
            last = max([manifest.last, *[s for s in segs if s > manifest.last]])
        else:
            if snaps or any(os.path.getsize(os.path.join(self.dir, segment_name(s)))
                            for s in segs):
                report.no_manifest = True
                self._warn(report, NO_MANIFEST.format(self.dir))
            base = snaps[-1] if snaps else 0
            later = [s for s in segs if s >= base]
            first = base if base else (later[0] if later else 1)
            last = later[-1] if later else first - 1  # a new directory needs nothing
            if not base and later and later[0] > 1:
                missing.append(f"a snapshot: the segments start at {segment_name(later[0])}, "
                               "so the data written before it is not here")
        have = set(segs)
        needed = list(range(first, last + 1))
        gaps = [seq for seq in needed if seq not in have]
        missing += [segment_name(seq) for seq in gaps]
        live = [seq for seq in needed if seq in have]
        if gaps and live and gaps[0] < live[-1]:
            live = [seq for seq in live if seq < gaps[0]]  # keep the prefix before the gap
        if missing:
            what = ", ".join(missing)
            if not self.repair:
                raise StorageError(
                    f"data directory {self.dir} is missing {what}; refusing to start, since "
                    "the node would come up without data it acknowledged. Restore the file, "
                    "or restart with --repair to go on without it (that data is lost)"
                )
            later = [seq for seq in needed if seq in have and seq not in live]
            self._warn(report, f"--repair: {self.dir} is missing {what}; going on without it: "
                       "the data it held is lost")
            self.identity = ""  # not the copy it was: a replicated shard must not count on it
            self._set_aside(later, report)
        return base, live

    def _write_manifest(self, snapshot: int | None, first: int, last: int) -> None:
        write_manifest(self.dir, Manifest(snapshot, first, last, self.identity))

    def _set_aside(self, seqs: list[int], report: Recovery) -> None:
        for later in seqs:
            p = os.path.join(self.dir, segment_name(later))
            if self._change(f"set {p} aside as {p}.dropped"):
                os.replace(p, p + ".dropped")
            report.warnings.append(f"{p}: set aside as {p}.dropped by --repair")

    def _warn(self, report: Recovery, msg: str) -> None:
        if not self.check_only:  # a check reports what it finds itself
            log.warning("%s", msg)
        report.warnings.append(msg)

    def _numbered(self, pattern: re.Pattern[str]) -> list[int]:
        found = (pattern.match(n) for n in os.listdir(self.dir))
        return sorted(int(m.group(1)) for m in found if m)

    def _lock(self) -> None:
        try:
            self._lock_fd = lockfile.acquire(self.dir)
        except lockfile.Locked as exc:
            raise StorageError(
                f"data directory {self.dir} is in use by another running node "
                f"(pid {exc.holder}); two nodes must never share one data directory"
            ) from None

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _load_snapshot(self, path: str, report: Recovery) -> int:
        """Apply a snapshot. A damaged one refuses the start; with ``repair``, every
        record that can still be read is loaded and the keys lost are reported."""
        buf = self._read(path)
        ks = self.keyspace
        n = loaded = 0
        total: int | None = None
        damaged: list[tuple[int, str]] = []
        start = 0
        while True:
            scan = wal.LogScan(buf, start)
            for off, item in scan:
                if total is not None:
                    damaged.append((off, "records after the end marker"))
                    break
                try:
                    if item[0] == wal.META and isinstance(item[1], dict) and "end" in item[1]:
                        total = item[1]["end"] if isinstance(item[1]["end"], int) else -1
                    else:
                        before = len(ks.data)
                        ks.apply(item)
                        loaded += len(ks.data) - before
                except (IndexError, TypeError, ValueError, KeyError, AttributeError) as exc:
                    damaged.append((off, f"bad record: {exc}"))
                    break
                n += 1
            else:
                if scan.damage is not None:
                    damaged.append((scan.damage.offset, scan.damage.reason))
                elif total is None:
                    damaged.append((scan.end, "snapshot has no end marker"))
            if not damaged or not self.repair:
                break
            nxt = wal.resync(buf, damaged[-1][0] + 1) if damaged[-1][0] < len(buf) else None
            if nxt is None or nxt <= start:
                break
            start = nxt
            if total is not None:
                break
        if damaged and not self.repair:
            off, reason = damaged[0]
            raise LogCorruption(path, off, reason, LogCorruption.SNAPSHOT_HINT)
        if damaged:
            lost = (f"{total - len(ks.data)} of its {total} keys are lost" if total and total > 0
                    else "the number of keys lost is unknown (its end marker is damaged too)")
            where = ", ".join(f"byte {off} ({reason})" for off, reason in damaged)
            self._warn(report, f"{path}: --repair loaded {loaded} keys from a damaged "
                       f"snapshot (damage at {where}); {lost}")
            self._resnapshot = True  # until a new snapshot replaces it, --repair stays needed
            self.identity = ""  # (data lost: not the copy it was, see _files)
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
            self._warn(report, (
                f"{path}: torn tail at byte offset {damage.offset} ({damage.reason}); "
                f"{'a start cuts' if self.check_only else 'cut'} {len(cut)} bytes, "
                f"kept in {kept}"))
            return n, False
        reason = (damage.reason if damage.corrupt
                  else f"{damage.reason} in a segment that is not the last")
        if not self.repair:
            raise LogCorruption(path, damage.offset, reason)
        kept = f"{path}.corrupt-{damage.offset}"
        self._cut(path, damage.offset, cut, kept)
        self._warn(report, (
            f"{path}: --repair dropped {len(cut)} bytes from byte offset {damage.offset} "
            f"({reason}); kept in {kept}"))
        self.identity = ""  # (data lost: not the copy it was, see _files)
        return n, True

    def _cut(self, path: str, offset: int, cut: bytes, kept: str) -> None:
        """Cut ``path`` at ``offset``, keeping the bytes cut in ``kept`` first. If they
        cannot be kept (a full disk, say), nothing is cut and the start is refused."""
        if not self._change(f"cut {path} at byte offset {offset}, keeping the {len(cut)} "
                            f"bytes cut in {kept}"):
            return
        try:
            with open(kept, "wb") as f:
                f.write(cut)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            try:
                os.unlink(kept)
            except OSError:
                pass
            raise StorageError(
                f"{path}: cannot keep the {len(cut)} bytes to cut at byte offset {offset} in "
                f"{kept}: {exc.strerror or exc}; nothing was changed. Free some space and "
                "start again"
            ) from None
        os.truncate(path, offset)
        fsync_dir(self.dir)

    def _open_segment(self, seq: int) -> None:
        path = os.path.join(self.dir, segment_name(seq))
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.seg_size = os.fstat(self.fd).st_size
        fsync_dir(self.dir)

    # -- writing ----------------------------------------------------------
    def commit(self, durable: bool = False) -> bytes:
        """Make the pending records as durable as the policy asks (or on disk now, with
        ``durable``: rebalancing records and batches), or undo them. The records
        written (what a primary ships to its replicas)."""
        if not self.pending:
            self.keyspace.commit()
            return b""
        data = bytes(self.pending)
        self.pending.clear()
        try:
            self._write_all(data)
            if self.fsync == "always" or durable:
                began = time.perf_counter()
                os.fdatasync(self.fd)
                self.fsync_timings.observe("", time.perf_counter() - began)
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
        return data

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

    def mark(self) -> tuple[int, tuple[int, int, int, int]]:
        """A point in this turn's uncommitted changes to :meth:`rollback_to`."""
        return len(self.pending), self.keyspace.mark()

    def rollback_to(self, mark: tuple[int, tuple[int, int, int, int]]) -> None:
        """Undo the changes (records and map) made since ``mark``; earlier ones stay."""
        del self.pending[mark[0]:]
        self.keyspace.rollback_to(mark[1])

    def sync(self) -> None:
        """fsync now if anything is unsynced (everysec's tick, shutdown)."""
        if self.dirty and self.fd >= 0:
            began = time.perf_counter()
            os.fdatasync(self.fd)
            self.fsync_timings.observe("", time.perf_counter() - began)
            self.fsyncs += 1
            self.dirty = False
        self.last_sync = time.monotonic()

    def tick(self, now: float) -> None:
        """Periodic work: everysec fsync, snapshot bookkeeping. A disk error here is
        logged and retried; it never stops the node (the commit path reports its own)."""
        if self.fsync == "everysec" and self.dirty and now - self.last_sync >= 1.0:
            try:
                self.sync()
            except OSError as exc:
                log.error("fsync of %s failed: %s", self.dir, exc)
        self._finish_snapshot()
        if self._snap is None and now >= self._snap_retry_at and self.wants_snapshot():
            try:
                self.start_snapshot()
            except OSError as exc:
                log.error("could not start a snapshot of %s: %s; will retry in %.0f s",
                          self.dir, exc.strerror or exc, SNAPSHOT_RETRY)
                self._snap_retry_at = now + SNAPSHOT_RETRY

    # -- snapshots -------------------------------------------------------
    def wants_snapshot(self) -> bool:
        if self._resnapshot:
            return True
        limit = max(self.snapshot_min_bytes, self.snapshot_factor * self.keyspace.live_bytes)
        return self.log_bytes > limit

    def start_snapshot(self) -> None:
        """Start a new segment and write the map as of its start in the background.
        The new segment is named in the MANIFEST before any write goes to it; if either
        step fails, the node stays on the segment it had (OSError for the caller)."""
        if self._snap is not None:
            return
        self.sync()
        seq = self.seq + 1
        path = os.path.join(self.dir, segment_name(seq))
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fsync_dir(self.dir)
            self._write_manifest(self.snapshot_seq, self.first_seq, seq)
        except OSError:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        os.close(self.fd)
        self.fd, self.seq, self.seg_size = fd, seq, 0
        items = list(self.keyspace.data.items())
        meta = {"seq": seq, **self.keyspace.snapshot_meta()}
        tombs = list(self.keyspace.tombstones)
        deadlines = list(self.keyspace.expires.items())
        outcomes = self.keyspace.once.flat()
        snap_path = os.path.join(self.dir, snapshot_name(seq))

        def run() -> None:
            try:
                self._snap_result = (seq, write_snapshot(snap_path, items, meta, tombs,
                                                         deadlines, outcomes))
            except BaseException as exc:  # reported by _finish_snapshot
                self._snap_result = exc

        self._snap_result = None
        self._snap_started = time.monotonic()
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
            self._snap_retry_at = time.monotonic() + SNAPSHOT_RETRY
            return
        seq, size = result
        try:
            self._write_manifest(seq, seq, self.seq)
        except OSError as exc:  # the older files stay named and kept; the next start copes
            log.error("could not record snapshot %s of %s in its MANIFEST: %s; keeping the "
                      "older files", snapshot_name(seq), self.dir, exc.strerror or exc)
            self._snap_retry_at = time.monotonic() + SNAPSHOT_RETRY
            return
        self.snapshot_seq, self.first_seq = seq, seq
        self._resnapshot = False
        try:
            for old in self._numbered(SEGMENT_RE):
                if old < seq:
                    old_path = os.path.join(self.dir, segment_name(old))
                    self.log_bytes -= os.path.getsize(old_path)
                    os.unlink(old_path)
            for old in self._numbered(SNAPSHOT_RE):
                if old < seq:
                    os.unlink(os.path.join(self.dir, snapshot_name(old)))
        except OSError as exc:  # left for the next start, which deletes what is unnamed
            log.error("could not delete the files snapshot %s replaces in %s: %s",
                      snapshot_name(seq), self.dir, exc.strerror or exc)
        self.snapshot_bytes = size
        self.snapshots_written += 1
        self.snapshot_timings.observe("", time.monotonic() - self._snap_started)

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
