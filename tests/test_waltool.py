"""`zkv wal check|dump|repair` against damaged data directories, as a process, checked
against what the node's own recovery (zkv.storage) does on a copy of each."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from test_storage import (  # the node tests' damage generators
    fill,
    flip_middle_record,
    log_path,
    open_storage,
    put,
    snapshotted,
)

from zkv.core import wal
from zkv.errors import LogCorruption, StorageError
from zkv.storage import Storage
from zkv.waltool import EXIT_CLEAN, EXIT_DAMAGED, EXIT_ERROR, EXIT_TORN, escape

pytestmark = pytest.mark.timeout(60)


def zkv_wal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zkv", "wal", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO)


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def clean(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    st, _ = open_storage(tmp / "d", opened)
    expected = fill(st, 30)
    st.close()
    return expected


def torn(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    st, _ = open_storage(tmp / "d", opened)
    expected = fill(st, 30)
    st.close()
    with open(log_path(st), "ab") as f:
        f.write(wal.encode((wal.SET, b"torn", b"x" * 100))[:57])
    return expected


def corrupt(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    st, _ = open_storage(tmp / "d", opened)
    expected = fill(st, 40)
    st.close()
    flip_middle_record(log_path(st))
    return expected


def missing_segment(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    st, expected = snapshotted(tmp, opened)
    (tmp / "d" / "wal-00000003.log").unlink()
    return expected


def missing_snapshot(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    st, expected = snapshotted(tmp, opened)
    (tmp / "d" / "snap-00000003.zkv").unlink()
    return expected


def damaged_manifest(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    expected = clean(tmp, opened)
    (tmp / "d" / "MANIFEST").write_text("{not json")
    return expected


def leftover_tmp(tmp: Path, opened: list[Storage]) -> dict[bytes, bytes]:
    expected = clean(tmp, opened)
    (tmp / "d" / "snap-00000009.zkv.tmp").write_bytes(b"half a snapshot")
    return expected


CASES: list[tuple[str, Callable[[Path, list[Storage]], dict[bytes, bytes]], int]] = [
    ("clean", clean, EXIT_CLEAN),
    ("torn tail", torn, EXIT_TORN),
    ("leftover temp file", leftover_tmp, EXIT_TORN),
    ("corrupt record", corrupt, EXIT_DAMAGED),
    ("missing segment", missing_segment, EXIT_DAMAGED),
    ("missing snapshot", missing_snapshot, EXIT_DAMAGED),
    ("damaged manifest", damaged_manifest, EXIT_DAMAGED),
]


@pytest.mark.parametrize(("make", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_agrees_with_the_node_and_changes_nothing(
        tmp_path: Path, opened: list[Storage], make: Any, status: int) -> None:
    make(tmp_path, opened)
    d = tmp_path / "d"
    before = contents(d)
    shutil.copytree(d, tmp_path / "copy")
    out = zkv_wal("check", str(d))
    assert out.returncode == status, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert contents(d) == before  # a check changes nothing
    # what a node's own start makes of the same files
    node = Storage(str(tmp_path / "copy"), fsync="no")
    try:
        report = node.open()
    except (StorageError, LogCorruption) as exc:
        assert status == EXIT_DAMAGED, f"the node refused ({exc}) but check said {status}"
        assert str(getattr(exc, "offset", "")) in out.stderr
    else:
        node.close()
        assert status != EXIT_DAMAGED
        assert (status == EXIT_TORN) == (contents(tmp_path / "copy") != before
                                         or bool(report.warnings))
        assert f"{report.keys} keys" in out.stdout


@pytest.mark.parametrize(("make", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_repair_is_the_nodes_repair(tmp_path: Path, opened: list[Storage], make: Any,
                                    status: int) -> None:
    make(tmp_path, opened)
    d = tmp_path / "d"
    shutil.copytree(d, tmp_path / "copy")
    out = zkv_wal("repair", str(d))
    assert out.returncode == 0, out.stdout + out.stderr
    node, _ = open_storage(tmp_path / "copy", opened, repair=True)  # zkv node --repair
    expected = dict(node.keyspace.data)
    node.close()
    after, report = open_storage(d, opened)  # starts without --repair now
    assert after.keyspace.data == expected and report.warnings == []
    after.close()
    assert zkv_wal("check", str(d)).returncode == EXIT_CLEAN


def test_dump_shows_every_record_escaped(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    put(st, b"plain", b"value")
    put(st, b"bin\x00\n\"\\", b"\xff\xfe")
    _, record = st.keyspace.delete(b"plain")
    assert record is not None
    st.pending += record
    st.commit()
    st.close()
    with open(log_path(st), "ab") as f:
        f.write(b"\x05\x00\x00")  # a torn tail
    out = zkv_wal("dump", str(tmp_path / "d"))
    lines = out.stdout.splitlines()
    assert 'SET "plain" "value"' in lines[0]
    assert 'SET "bin\\x00\\n\\"\\\\" "\\xff\\xfe"' in lines[1]
    assert 'DEL "plain"' in lines[2]
    assert "torn tail" in lines[3] and "!!" in lines[3]
    assert out.returncode == EXIT_TORN
    js = [json.loads(x) for x in zkv_wal("dump", str(tmp_path / "d"), "--json").stdout.split("\n")
          if x]
    assert js[0] == {"file": "wal-00000001.log", "offset": 0, "kind": "SET",
                     "fields": ["plain", "value"]}
    assert js[1]["fields"] == [escape(b"bin\x00\n\"\\")[1:-1], "\\xff\\xfe"]
    assert "damage" in js[-1]


def test_dump_reads_a_snapshot_then_its_segments(tmp_path: Path, opened: list[Storage]) -> None:
    _, expected = snapshotted(tmp_path, opened)
    out = zkv_wal("dump", str(tmp_path / "d"))
    assert out.returncode == EXIT_CLEAN
    seen: dict[str, str] = {}
    for line in out.stdout.splitlines():
        parts = line.split(" ", 3)  # file@offset KIND "key" "value (maybe with spaces)"
        if parts[1] in ("SET", "CHUNK", "MSET"):
            seen[parts[2]] = parts[3]
    assert seen == {escape(k): escape(v) for k, v in expected.items()}
    assert out.stdout.splitlines()[0].startswith("snap-00000003.zkv@")


def test_a_running_node_and_a_missing_directory_are_refused(tmp_path: Path,
                                                           opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)  # holds the lock, like a running node
    for action in ("check", "repair", "dump"):  # each says so the same way
        out = zkv_wal(action, str(tmp_path / "d"))
        assert out.returncode == EXIT_ERROR and out.stderr.startswith(
            f"zkv wal {action}: error: data directory {tmp_path / 'd'} is in use by a running "
            f"node (pid {os.getpid()})"), out.stderr
        assert "stop it first" in out.stderr
    st.close()
    for action in ("check", "repair", "dump"):
        out = zkv_wal(action, str(tmp_path / "nowhere"))
        assert out.returncode == EXIT_ERROR and out.stderr == (
            f"zkv wal {action}: error: {tmp_path / 'nowhere'}: no such directory\n")
        assert not (tmp_path / "nowhere").exists()
    assert zkv_wal("frobnicate", str(tmp_path)).returncode == 2


def test_a_directory_that_is_not_a_nodes_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8 not a log")
    before = contents(other)
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    for action in ("check", "repair", "dump"):
        out = zkv_wal(action, str(other))
        assert out.returncode == EXIT_ERROR, (action, out)
        assert "not a zkv data directory" in out.stderr, (action, out.stderr)
        assert contents(other) == before  # no LOCK, MANIFEST or log made in it
        out = zkv_wal(action, str(a_file))
        assert out.returncode == EXIT_ERROR and "not a directory" in out.stderr, (action, out)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert zkv_wal("repair", str(empty)).returncode == EXIT_ERROR
    assert list(empty.iterdir()) == []


def test_dump_shows_a_run_of_tagged_writes_with_its_records() -> None:
    from zkv.waltool import lines_of

    inner = wal.encode((wal.MSET, [b"a", b"1", b"b", b"2"]))
    lines = list(lines_of([wal.ONCERUN, b"c", [7, 8], "OK", inner]))
    assert lines == ['ONCERUN "c" 7 8 -> "OK"', '  MSET "a" "1"', '  MSET "b" "2"']
    run = next(lines_of([wal.ONCERUN, b"c", list(range(7, 1007)), "OK", inner]))
    assert run == 'ONCERUN "c" 7..1006 -> "OK"'  # a run that follows on, as a range
    assert next(lines_of([wal.ONCERUN, b"c", [7, 9, 10], "OK", inner])).split()[2:5] == [
        "7", "9", "10"]
    # --json: the records within decoded too, not left as bytes
    from zkv.waltool import record_json

    assert record_json([wal.ONCERUN, b"c", [7, 8], "OK", inner]) == {
        "kind": "ONCERUN", "fields": ["c", [7, 8], "OK"],
        "records": [{"kind": "MSET", "fields": [["a", "1", "b", "2"]]}]}
    assert record_json([wal.ATOMIC, inner])["records"][0]["kind"] == "MSET"


def test_dump_into_a_closed_pipe_stops_quietly(tmp_path: Path, opened: list[Storage]) -> None:
    """zkv wal dump DIR | head: once head has read its lines, the dump stops with no
    error (as cat does)."""
    st, _ = open_storage(tmp_path / "d", opened)
    for i in range(20_000):
        st.pending += st.keyspace.set(b"k%d" % i, b"v" * 20)
    st.commit()
    st.close()
    out = subprocess.run(f"{shlex.quote(sys.executable)} -m zkv wal dump "
                         f"{shlex.quote(str(tmp_path / 'd'))} | head -3", shell=True,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert len(out.stdout.splitlines()) == 3 and out.stderr == ""


def test_a_missing_manifest_is_damage_not_clean(tmp_path: Path, opened: list[Storage]) -> None:
    """Without its MANIFEST, nothing says which segments the data needs: a segment
    deleted with it would go unmissed, and the directory's id changes on a start."""
    clean(tmp_path, opened)
    (tmp_path / "d" / "MANIFEST").unlink()
    out = zkv_wal("check", str(tmp_path / "d"))
    assert out.returncode == EXIT_DAMAGED, out
    assert "has data files but no MANIFEST" in out.stderr and "new id" in out.stderr

