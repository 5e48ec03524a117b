"""``zkv wal check|dump|repair DIR``: a node's data directory, offline (as redis-check-aof).

* ``check`` does what a node does on start (zkv.storage recovery, the same code) in
  memory, changing no file, and says what it found: the records, a torn tail a start
  would cut, corruption with file and byte offset, missing files, and what a start
  (or ``--repair``) would change. Its exit status says which (``EXIT_*`` below).
* ``dump`` prints every record of the snapshot and segments the data needs, in
  order, keys and values escaped (``--json``: one object per line).
* ``repair`` is ``zkv node --repair`` without starting a node: the good data kept,
  the rest set aside beside the log, and what was lost said.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from . import lockfile
from .core import wal
from .errors import LogCorruption, StorageError, ZkvError
from .storage import (
    MANIFEST,
    NO_MANIFEST,
    SEGMENT_RE,
    SNAPSHOT_RE,
    Storage,
    read_manifest,
    segment_name,
    snapshot_name,
)

EXIT_CLEAN = 0  # a node starts on it as it is
EXIT_ERROR = 1  # cannot be checked (no such directory, a node is running on it)
EXIT_TORN = 3  # a node starts, cutting a torn tail (or removing leftovers): nothing is lost
EXIT_DAMAGED = 4  # a node refuses to start (corruption, missing files); repair loses data

KINDS = {wal.SET: "SET", wal.DEL: "DEL", wal.MSET: "MSET", wal.CHUNK: "CHUNK",
         wal.META: "META", wal.TOMBS: "TOMBS", wal.DROP: "DROP", wal.PXAT: "PXAT",
         wal.DELS: "DELS", wal.ONCE: "ONCE", wal.ONCES: "ONCES",
         wal.ONCERUN: "ONCERUN", wal.ATOMIC: "ATOMIC", wal.APPEND: "APPEND"}


def escape(data: Any) -> str:
    """Bytes as a quoted, unambiguous string (printable ASCII as is, the rest \\xHH)."""
    if not isinstance(data, (bytes, bytearray)):
        return json.dumps(data, default=str)
    out = []
    for b in data:
        if b in (0x22, 0x5C):
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(b, f"\\x{b:02x}"))
    return '"' + "".join(out) + '"'


def not_data(directory: str) -> str | None:
    """Why ``directory`` is not a node's data directory (missing, a file, or holding none
    of a MANIFEST, a log segment or a snapshot), or None when it is one. The tools
    refuse such a directory rather than call it clean, or (repair) make it one."""
    if not os.path.isdir(directory):
        return "not a directory" if os.path.exists(directory) else "no such directory"
    try:
        names = os.listdir(directory)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not any(n == MANIFEST or SEGMENT_RE.match(n) or SNAPSHOT_RE.match(n) for n in names):
        return ("not a zkv data directory (no MANIFEST, log segment or snapshot in it; "
                "a node's data directory is its --data-dir)")
    return None


def check(directory: str) -> tuple[int, list[str]]:
    """(exit status, report lines) of checking ``directory``."""
    why = not_data(directory)
    if why is not None:
        return EXIT_ERROR, [f"cannot check: {directory}: {why}"]
    storage = Storage(directory, check_only=True)
    try:
        report = storage.open()
    except LogCorruption as exc:
        lines = [f"corrupt: {exc.path} at byte offset {exc.offset}: {exc.reason}",
                 "a node refuses to start on this directory; `zkv wal repair "
                 f"{directory}` (or `zkv node --repair`) keeps the good prefix and sets the "
                 "rest aside"]
        return EXIT_DAMAGED, lines
    except StorageError as exc:
        if "in use" in exc.message or "cannot read" in exc.message or exc.message.endswith(
                ("no such directory", "not a directory")):
            return EXIT_ERROR, [f"cannot check: {exc.message}"]
        return EXIT_DAMAGED, [f"damaged: {exc.message}"]
    except OSError as exc:
        return EXIT_ERROR, [f"cannot check: {exc.filename or directory}: "
                            f"{exc.strerror or exc}"]
    lines = [f"{directory}: {report.records} records, {report.keys} keys"
             + (f" (snapshot {report.snapshot})" if report.snapshot else "")]
    if report.no_manifest:
        # (a node starts, but what the MANIFEST named cannot be checked: data may be gone)
        return EXIT_DAMAGED, [*lines, f"damaged: {NO_MANIFEST.format(directory)}",
                              "restore the MANIFEST from a backup if there is one; a node "
                              "started on it as it is keeps what the files hold"]
    lines += [f"found: {w}" for w in report.warnings]
    lines += [f"a start would {c}" for c in storage.changes]
    if storage.changes or report.warnings:
        lines.append("a node starts on this directory, making the changes above; no "
                     "acknowledged data is lost")
        return EXIT_TORN, lines
    lines.append("clean: a node starts on this directory as it is")
    return EXIT_CLEAN, lines


def files(directory: str, notes: list[str] | None = None) -> list[str]:
    """The snapshot and segments of ``directory`` a start reads, in order (by their
    numbers where the MANIFEST is damaged, which ``notes`` then says)."""
    manifest = None
    try:
        manifest = read_manifest(directory)
    except ValueError as exc:
        if notes is not None:
            notes.append(f"{exc}; the files are taken by their numbers")
    names = os.listdir(directory)
    snaps = sorted(int(m.group(1)) for m in map(SNAPSHOT_RE.match, names) if m)
    segs = sorted(int(m.group(1)) for m in map(SEGMENT_RE.match, names) if m)
    base = snaps[-1] if snaps else 0
    if manifest is not None and manifest.snapshot and manifest.snapshot in snaps:
        base = max(s for s in snaps if s >= manifest.snapshot)
    out = [snapshot_name(base)] if base else []
    out += [segment_name(s) for s in segs if s >= base]
    return out


def records(directory: str) -> Iterator[tuple[str, int, Any, str | None]]:
    """(file, offset, item, None) for each record; (file, offset, None, why) where a file
    stops early (a torn tail or corruption), or the MANIFEST is damaged."""
    notes: list[str] = []
    names = files(directory, notes)
    for note in notes:
        yield "MANIFEST", 0, None, note
    for name in names:
        with open(os.path.join(directory, name), "rb") as f:
            buf = f.read()
        scan = wal.LogScan(buf)
        for off, item in scan:
            yield name, off, item, None
        if scan.damage is not None:
            yield name, scan.damage.offset, None, (
                f"{scan.damage.kind}: {scan.damage.reason}; {len(buf) - scan.damage.offset} "
                "bytes not shown")


def _pairs(flat: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(flat, list):
        for i in range(0, len(flat) - 1, 2):
            yield flat[i], flat[i + 1]


def lines_of(item: Any) -> Iterator[str]:
    """A record as readable lines (one per key for MSET, CHUNK, DROP and TOMBS)."""
    kind = KINDS.get(item[0], f"KIND-{item[0]}") if isinstance(item, list) and item else "?"
    body = item[1:] if isinstance(item, list) else []
    if kind == "SET" and len(body) == 2:
        yield f"SET {escape(body[0])} {escape(body[1])}"
    elif kind == "SET" and len(body) == 3:
        yield f"SET {escape(body[0])} {escape(body[1])} PXAT {body[2]}"
    elif kind in ("ONCE", "ONCERUN") and len(body) == 4 and isinstance(body[3], bytes):
        seqs = _seqs(body[1])
        yield f"{kind} {escape(body[0])} {seqs} -> {_json_value(body[2])}"
        for _, inner in wal.LogScan(body[3]):
            for line in lines_of(inner):
                yield "  " + line
    elif kind == "ATOMIC" and len(body) == 1 and isinstance(body[0], bytes):
        yield "ATOMIC"
        for _, inner in wal.LogScan(body[0]):
            for line in lines_of(inner):
                yield "  " + line
    elif kind == "PXAT" and body:
        for k, v in _pairs(body[0]):
            yield f"PXAT {escape(k)} {v}" if v else f"PERSIST {escape(k)}"
    elif kind in ("MSET", "CHUNK") and body:
        for k, v in _pairs(body[0]):
            yield f"{kind} {escape(k)} {escape(v)}"
    elif kind in ("DEL",) and body:
        yield f"DEL {escape(body[0])}"
    elif kind in ("DROP", "TOMBS", "DELS") and body and isinstance(body[0], list):
        for k in body[0]:
            yield f"{kind} {escape(k)}"
    else:
        yield f"{kind} " + " ".join(_json_value(b) for b in body)


# records that hold records (a tagged write's, a transaction's): where, in their fields
_NESTED = {"ONCE": 3, "ONCERUN": 3, "ATOMIC": 0}


def record_json(item: Any) -> dict[str, Any]:
    """A record as JSON can hold it: its kind and fields, and, for a record that holds
    records, those decoded in ``records`` (as the text dump shows them)."""
    kind = KINDS.get(item[0], item[0]) if isinstance(item, list) and item else None
    fields = item[1:] if isinstance(item, list) else item
    at = _NESTED.get(kind) if isinstance(kind, str) else None
    if at is not None and isinstance(fields, list) and len(fields) > at \
            and isinstance(fields[at], bytes):
        return {"kind": kind, "fields": _plain(fields[:at] + fields[at + 1:]),
                "records": [record_json(inner) for _, inner in wal.LogScan(fields[at])]}
    return {"kind": kind, "fields": _plain(fields)}


def _seqs(seqs: Any) -> str:
    """A run's sequence numbers: ``first..last`` when they follow on (a pipeline's run
    of a thousand SETs is one line), else each."""
    if not isinstance(seqs, list):
        return str(seqs)
    if len(seqs) > 2 and all(type(n) is int for n in seqs) \
            and seqs == list(range(seqs[0], seqs[0] + len(seqs))):
        return f"{seqs[0]}..{seqs[-1]}"
    return " ".join(map(str, seqs))


def _json_value(obj: Any) -> str:
    return json.dumps(_plain(obj), sort_keys=True)


def _plain(obj: Any) -> Any:
    """CBOR data as JSON can hold it: bytes become escaped strings."""
    if isinstance(obj, (bytes, bytearray)):
        return escape(obj)[1:-1]
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj


def dump(directory: str, as_json: bool, out: Any) -> int:
    why = not_data(directory)
    if why is not None:
        print(f"zkv wal dump: error: {directory}: {why}", file=sys.stderr)
        return EXIT_ERROR
    holder = lockfile.holder(directory)
    if holder is not None:
        print(f"zkv wal dump: error: data directory {directory} is in use by a running node "
              f"(pid {holder}): its files are changing; stop it first", file=sys.stderr)
        return EXIT_ERROR
    damaged = False
    for name, off, item, why in records(directory):
        if why is not None:
            damaged = True
            if as_json:
                out.write(json.dumps({"file": name, "offset": off, "damage": why}) + "\n")
            else:
                out.write(f"{name}@{off} !! {why}\n")
            continue
        if as_json:
            out.write(json.dumps({"file": name, "offset": off, **record_json(item)}) + "\n")
        else:
            for line in lines_of(item):
                out.write(f"{name}@{off} {line}\n")
    return EXIT_TORN if damaged else EXIT_CLEAN


def repair(directory: str) -> tuple[int, list[str]]:
    why = not_data(directory)
    if why is not None:
        return EXIT_ERROR, [f"cannot repair: {directory}: {why}"]
    holder = lockfile.holder(directory)
    if holder is not None:
        return EXIT_ERROR, [f"cannot repair: data directory {directory} is in use by a running "
                            f"node (pid {holder}): stop it first"]
    storage = Storage(directory, repair=True)
    try:
        report = storage.open()
    except ZkvError as exc:
        return EXIT_ERROR, [f"cannot repair: {exc}"]
    finally:
        storage.close()
    lines = [f"{directory}: {report.records} records, {report.keys} keys kept"]
    lines += report.warnings
    if not report.warnings:
        lines.append("nothing to repair")
    return EXIT_CLEAN, lines


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except BrokenPipeError:  # the reader stopped reading (| head): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so that exiting flushes nowhere)
        return EXIT_CLEAN
    except OSError as exc:  # unreadable files: a clear line, never a traceback
        print(f"zkv wal {args.action}: error: {exc.filename or args.dir}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR


def _main(args: argparse.Namespace) -> int:
    if args.action == "dump":
        return dump(args.dir, args.json, sys.stdout)
    status, lines = check(args.dir) if args.action == "check" else repair(args.dir)
    stream = sys.stdout if status in (EXIT_CLEAN, EXIT_TORN) else sys.stderr
    for line in lines:
        if status == EXIT_ERROR:  # (as every zkv command says an error: "zkv wal check: ")
            line = f"zkv wal {args.action}: error: {line.removeprefix(f'cannot {args.action}: ')}"
        print(line, file=stream)
    return status


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "wal", help="check, dump or repair a node's data directory, offline",
        description="A node's data directory, offline (stop the node first). check exits "
                    f"{EXIT_CLEAN} when a node would start on it as it is, {EXIT_TORN} when a "
                    f"start would cut a torn tail (nothing lost), {EXIT_DAMAGED} when a node "
                    "would refuse it (corruption, missing files), 1 when it cannot be read.")
    p.add_argument("action", choices=["check", "dump", "repair"])
    p.add_argument("dir", metavar="DIR", help="the node's data directory")
    p.add_argument("--json", action="store_true", help="dump: one JSON object per record")
    p.set_defaults(func=main)
