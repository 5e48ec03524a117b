"""A node's files without the network: commit, recovery, torn tails, corruption,
snapshots, the directory lock and a disk that refuses writes."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from zkv.core import wal
from zkv.errors import LogCorruption, StorageError
from zkv.storage import Storage, segment_name, snapshot_name

pytestmark = pytest.mark.timeout(60)


def open_storage(path: Path, opened: list[Storage], **kwargs: Any) -> tuple[Storage, Any]:
    st = Storage(str(path), **{"fsync": "no", **kwargs})
    opened.append(st)
    return st, st.open()


def reopen(st: Storage, opened: list[Storage], **kwargs: Any) -> tuple[Storage, Any]:
    st.close()
    return open_storage(Path(st.dir), opened, **kwargs)


def put(st: Storage, key: bytes, value: bytes) -> None:
    st.pending += st.keyspace.set(key, value)
    st.commit()


def delete(st: Storage, key: bytes) -> None:
    _, record = st.keyspace.delete(key)
    if record is not None:
        st.pending += record
    st.commit()


def mset(st: Storage, pairs: dict[bytes, bytes]) -> None:
    st.pending += st.keyspace.mset([x for kv in pairs.items() for x in kv])
    st.commit()


def fill(st: Storage, n: int = 50) -> dict[bytes, bytes]:
    expected: dict[bytes, bytes] = {}
    for i in range(n):
        key, value = b"key-%d" % i, b"value-%d-" % i + bytes([i % 256]) * (i % 40)
        put(st, key, value)
        expected[key] = value
    return expected


def log_path(st: Storage, seq: int = 1) -> Path:
    return Path(st.dir) / segment_name(seq)


def record_offsets(path: Path) -> list[int]:
    return [off for off, _ in wal.LogScan(path.read_bytes())]


def data_bytes(path: Path) -> int:
    """Bytes of logs and snapshots in a data directory (the files that must stay bounded)."""
    total = 0
    for p in path.iterdir():
        if p.name.startswith(("wal-", "snap-")):
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # renamed or deleted by the snapshot meanwhile
                pass
    return total


# -- commit and recovery ------------------------------------------------------


def test_commit_close_reopen_gives_the_same_map(tmp_path: Path, opened: list[Storage]) -> None:
    st, rec = open_storage(tmp_path / "d", opened, fsync="always")
    assert rec.keys == 0 and rec.warnings == []
    expected = fill(st, 200)
    delete(st, b"key-7")
    del expected[b"key-7"]
    delete(st, b"never-there")
    mset(st, {b"m1": b"\x00\n ", "ключ".encode(): "значение ✓".encode(), b"key-8": b"new"})
    expected.update({b"m1": b"\x00\n ", "ключ".encode(): "значение ✓".encode(), b"key-8": b"new"})
    put(st, b"big", os.urandom(1 << 20))
    expected[b"big"] = st.keyspace.data[b"big"]
    assert st.keyspace.data == expected
    live = st.keyspace.live_bytes

    st2, rec2 = reopen(st, opened)
    assert st2.keyspace.data == expected
    assert st2.keyspace.live_bytes == live == sum(len(k) + len(v) for k, v in expected.items())
    assert rec2.keys == len(expected)
    # sets, one DEL (the missing key logs nothing), MSET, big
    assert rec2.records == 200 + 1 + 1 + 1
    assert rec2.warnings == []
    # It keeps working after a reopen, appending to the same log.
    put(st2, b"after", b"reopen")
    st3, _ = reopen(st2, opened)
    assert st3.keyspace.data == {**expected, b"after": b"reopen"}


def test_uncommitted_changes_are_rolled_back(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    put(st, b"a", b"1")
    st.pending += st.keyspace.set(b"a", b"2")
    st.pending += st.keyspace.set(b"b", b"2")
    st.keyspace.delete(b"a")
    st.rollback()
    assert st.keyspace.data == {b"a": b"1"}
    assert st.keyspace.live_bytes == 2
    st2, _ = reopen(st, opened)
    assert st2.keyspace.data == {b"a": b"1"}


def test_torn_tail_is_cut_and_kept_beside_the_log(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    expected = fill(st, 30)
    st.close()
    path = log_path(st)
    good = path.stat().st_size
    partial = wal.encode((wal.SET, b"torn", b"x" * 100))[:57]
    with open(path, "ab") as f:
        f.write(partial)

    st2, rec = open_storage(tmp_path / "d", opened)
    assert st2.keyspace.data == expected
    kept = Path(f"{path}.torn-{good}")
    assert kept.read_bytes() == partial
    assert path.stat().st_size == good
    assert len(rec.warnings) == 1
    assert str(path) in rec.warnings[0] and str(good) in rec.warnings[0]
    assert "torn" in rec.warnings[0]

    # New writes go after the good prefix and replay cleanly.
    put(st2, b"later", b"ok")
    st3, rec3 = reopen(st2, opened)
    assert st3.keyspace.data == {**expected, b"later": b"ok"}
    assert rec3.warnings == []


def test_trailing_zeros_are_a_torn_tail(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    expected = fill(st, 10)
    st.close()
    path = log_path(st)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00" * 4096)
    st2, rec = open_storage(tmp_path / "d", opened)
    assert st2.keyspace.data == expected
    assert Path(f"{path}.torn-{good}").stat().st_size == 4096
    assert len(rec.warnings) == 1


def flip_middle_record(path: Path) -> int:
    """Flip one byte in the payload of the middle record; return that record's offset."""
    offsets = record_offsets(path)
    mid = offsets[len(offsets) // 2]
    data = bytearray(path.read_bytes())
    data[mid + wal.HEADER_SIZE + 3] ^= 0x20
    path.write_bytes(bytes(data))
    return mid


def test_flipped_byte_mid_log_refuses_to_open(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    fill(st, 40)
    st.close()
    path = log_path(st)
    before = path.read_bytes()
    mid = flip_middle_record(path)
    damaged = path.read_bytes()

    with pytest.raises(LogCorruption) as info:
        open_storage(tmp_path / "d", opened)
    err = info.value
    assert err.path == str(path)
    assert err.offset == mid
    assert str(path) in str(err)
    assert f"offset {mid}" in str(err)
    assert len(before) == len(damaged)
    # Refusing must not touch the evidence.
    assert path.read_bytes() == damaged
    assert not list(Path(st.dir).glob("*.torn-*"))
    assert not list(Path(st.dir).glob("*.corrupt-*"))


def test_repair_keeps_the_good_prefix_and_reports_the_drop(
    tmp_path: Path, opened: list[Storage]
) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    expected = fill(st, 40)
    st.close()
    path = log_path(st)
    mid = flip_middle_record(path)
    size = path.stat().st_size
    kept_prefix = dict(list(expected.items())[:20])

    with pytest.raises(LogCorruption):
        open_storage(tmp_path / "d", opened)
    # The refusal released the directory: a repair can follow in the same process.
    st2, rec = open_storage(tmp_path / "d", opened, repair=True)
    assert st2.keyspace.data == kept_prefix
    assert rec.keys == 20
    assert len(rec.warnings) == 1
    warning = rec.warnings[0]
    assert str(path) in warning and str(mid) in warning and str(size - mid) in warning
    kept = Path(f"{path}.corrupt-{mid}")
    assert kept.stat().st_size == size - mid
    assert path.stat().st_size == mid

    put(st2, b"after", b"repair")
    st3, rec3 = reopen(st2, opened)  # no repair needed any more
    assert st3.keyspace.data == {**kept_prefix, b"after": b"repair"}
    assert rec3.warnings == []


# -- snapshots -----------------------------------------------------------------


def wait_snapshot_done(st: Storage, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while st.stats()["snapshot_running"]:
        assert time.monotonic() < deadline, "snapshot did not finish"
        time.sleep(0.005)
        st.tick(time.monotonic())


def test_snapshots_keep_the_files_bounded(tmp_path: Path, opened: list[Storage]) -> None:
    min_bytes = 16 * 1024
    st, _ = open_storage(
        tmp_path / "d", opened, snapshot_min_bytes=min_bytes, snapshot_factor=2.0
    )
    keys = [b"k%02d" % i for i in range(20)]
    expected: dict[bytes, bytes] = {}
    written = 0
    peak = 0
    during = 0  # writes since the running snapshot started
    for i in range(20_000):
        key = keys[i % len(keys)]
        value = b"%08d" % i + b"v" * 92
        put(st, key, value)
        expected[key] = value
        written += len(value)
        st.tick(time.monotonic())
        if st.stats()["snapshot_running"]:
            during += 1
            # Writes go on while a snapshot is written, and the log grows by what they
            # add; cap that (this loop can outrun a slow fsync by 100s of KB) so the
            # bound checked is the snapshot policy's, not the disk's latency.
            if during >= 50:
                wait_snapshot_done(st)
        else:
            during = 0
        if i % 100 == 0:
            peak = max(peak, data_bytes(tmp_path / "d"))
    wait_snapshot_done(st)
    live = st.keyspace.live_bytes
    assert live == sum(len(k) + len(v) for k, v in expected.items())
    assert written > 100 * (live + min_bytes)  # the log would be far larger without snapshots
    assert st.snapshots_written >= 10
    bound = 4 * (live + min_bytes)
    assert peak <= bound, (peak, bound)
    assert data_bytes(tmp_path / "d") <= bound
    # Only the newest snapshot and the segments after it are left.
    snaps = sorted(p.name for p in (tmp_path / "d").glob("snap-*"))
    assert len(snaps) == 1
    assert st.stats()["log_bytes"] == sum(
        p.stat().st_size for p in (tmp_path / "d").glob("wal-*.log")
    )

    st2, rec = reopen(st, opened)
    assert st2.keyspace.data == expected
    assert rec.snapshot == snaps[0]
    assert rec.warnings == []


def test_deletes_survive_a_snapshot(tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1)
    expected = fill(st, 30)
    for i in range(0, 30, 3):
        delete(st, b"key-%d" % i)
        del expected[b"key-%d" % i]
    st.start_snapshot()
    put(st, b"during", b"snapshot")  # lands in the new segment
    delete(st, b"key-1")
    expected[b"during"] = b"snapshot"
    del expected[b"key-1"]
    wait_snapshot_done(st)
    st2, rec = reopen(st, opened)
    assert rec.snapshot is not None
    assert st2.keyspace.data == expected


def test_leftover_snapshot_temp_file_is_ignored(tmp_path: Path, opened: list[Storage]) -> None:
    """A crash while a snapshot was written leaves a new segment and a partial temp file."""
    d = tmp_path / "d"
    st, _ = open_storage(d, opened)
    expected = fill(st, 40)
    st.close()
    # What start_snapshot leaves before the rename: the next segment and the temp file.
    (d / segment_name(2)).write_bytes(wal.encode((wal.SET, b"in-seg-2", b"yes")))
    expected[b"in-seg-2"] = b"yes"
    partial = wal.encode((wal.META, {"snapshot": 1, "seq": 2})) + wal.encode(
        (wal.CHUNK, [b"key-1", b"WRONG", b"ghost", b"boo"])
    )
    (d / (snapshot_name(2) + ".tmp")).write_bytes(partial[:-5])
    # Even a complete snapshot is not trusted until it has been renamed.
    whole = partial + wal.encode((wal.META, {"end": 2}))
    (d / (snapshot_name(3) + ".tmp")).write_bytes(whole)

    st2, rec = open_storage(d, opened)
    assert st2.keyspace.data == expected
    assert rec.snapshot is None
    assert not list(d.glob("*.tmp"))
    put(st2, b"more", b"x")
    st3, _ = reopen(st2, opened)
    assert st3.keyspace.data == {**expected, b"more": b"x"}


def test_snapshot_then_crash_before_old_segments_were_deleted(
    tmp_path: Path, opened: list[Storage]
) -> None:
    """The snapshot was renamed but the old segments are still there: they must not be
    replayed on top of it out of order (a DEL in the new segment must stay deleted)."""
    d = tmp_path / "d"
    st, _ = open_storage(d, opened)
    expected = fill(st, 20)
    st.close()
    old_log = (d / segment_name(1)).read_bytes()
    st2, _ = open_storage(d, opened, snapshot_min_bytes=1)
    st2.start_snapshot()
    wait_snapshot_done(st2)
    delete(st2, b"key-3")
    del expected[b"key-3"]
    st2.close()
    (d / segment_name(1)).write_bytes(old_log)  # as if the unlink never happened
    st3, _ = open_storage(d, opened)
    assert st3.keyspace.data == expected
    assert not (d / segment_name(1)).exists()


# -- the lock -------------------------------------------------------------------


def test_second_storage_on_the_same_directory_is_refused(
    tmp_path: Path, opened: list[Storage]
) -> None:
    d = tmp_path / "d"
    st, _ = open_storage(d, opened)
    put(st, b"a", b"1")
    other = Storage(str(d))
    with pytest.raises(StorageError) as info:
        other.open()
    assert str(d) in str(info.value)
    assert str(os.getpid()) in str(info.value)
    # The refused one changed nothing; the first still works.
    put(st, b"b", b"2")
    st2, _ = reopen(st, opened)
    assert st2.keyspace.data == {b"a": b"1", b"b": b"2"}


# -- a disk that refuses -------------------------------------------------------------


def failing_write(
    monkeypatch: pytest.MonkeyPatch, st: Storage, partial: bool
) -> list[int]:
    """Make writes to the log fail with ENOSPC (after writing part of the data if
    ``partial``); other writes go through. Returns the list of failed call sizes."""
    real_write = os.write
    calls: list[int] = []

    def write(fd: int, data: Any) -> int:
        if fd != st.fd:
            return real_write(fd, data)
        calls.append(len(data))
        if partial and len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("zkv.storage.os.write", write)
    return calls


@pytest.mark.parametrize("partial", [False, True], ids=["nothing-written", "half-written"])
def test_failed_write_is_rolled_back_and_nothing_earlier_is_lost(
    tmp_path: Path, opened: list[Storage], monkeypatch: pytest.MonkeyPatch, partial: bool
) -> None:
    st, _ = open_storage(tmp_path / "d", opened, fsync="always")
    expected = fill(st, 20)
    size = log_path(st).stat().st_size

    calls = failing_write(monkeypatch, st, partial)
    st.pending += st.keyspace.set(b"key-1", b"overwritten")
    st.pending += st.keyspace.set(b"new", b"value")
    _, record = st.keyspace.delete(b"key-2")  # a DEL in the same failed batch
    assert record is not None
    st.pending += record
    with pytest.raises(StorageError) as info:
        st.commit()
    monkeypatch.undo()
    assert calls, "the fake write was never called"
    assert str(tmp_path / "d") in str(info.value)
    assert os.strerror(errno.ENOSPC) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    # Nothing of the failed batch is visible, in memory or on disk.
    assert st.keyspace.data == expected
    assert st.keyspace.live_bytes == sum(len(k) + len(v) for k, v in expected.items())
    assert log_path(st).stat().st_size == size

    put(st, b"next", b"works")
    expected[b"next"] = b"works"
    st2, rec = reopen(st, opened)
    assert st2.keyspace.data == expected
    assert rec.warnings == []


def test_failed_fsync_is_rolled_back(
    tmp_path: Path, opened: list[Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    st, _ = open_storage(tmp_path / "d", opened, fsync="always")
    expected = fill(st, 5)

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr("zkv.storage.os.fdatasync", fdatasync)
    st.pending += st.keyspace.set(b"x", b"y")
    with pytest.raises(StorageError):
        st.commit()
    monkeypatch.undo()
    assert st.keyspace.data == expected
    put(st, b"z", b"1")
    st2, _ = reopen(st, opened)
    assert st2.keyspace.data == {**expected, b"z": b"1"}


# -- files that go missing or are damaged (a MANIFEST says what the data needs) ---------


def snapshotted(tmp_path: Path, opened: list[Storage]) -> tuple[Storage, dict[bytes, bytes]]:
    """A storage whose data sits in a snapshot and two segments after it."""
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1 << 40)
    expected = fill(st, 40)
    st.start_snapshot()
    wait_snapshot_done(st)
    for i in range(10):
        put(st, b"after-%d" % i, b"x")
        expected[b"after-%d" % i] = b"x"
    st.start_snapshot()  # a second segment; its snapshot is deleted below to keep wal-2
    wait_snapshot_done(st)
    put(st, b"last", b"write")
    expected[b"last"] = b"write"
    st.close()
    return st, expected


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(("wal-", "snap-")))


def test_a_missing_snapshot_refuses_to_start_naming_it(tmp_path: Path,
                                                       opened: list[Storage]) -> None:
    st, expected = snapshotted(tmp_path, opened)
    d = tmp_path / "d"
    assert files(d) == ["snap-00000003.zkv", "wal-00000003.log"]
    (d / "snap-00000003.zkv").unlink()
    with pytest.raises(StorageError) as info:
        open_storage(d, opened)
    message = str(info.value)
    assert "is missing snap-00000003.zkv" in message and "--repair" in message
    assert files(d) == ["wal-00000003.log"]  # nothing was changed
    # --repair goes on with what is left: the writes after the snapshot, latest values
    st2, rec = open_storage(d, opened, repair=True)
    assert st2.keyspace.data == {b"last": b"write"}
    assert any("missing snap-00000003.zkv" in w and "lost" in w for w in rec.warnings)
    st2.close()
    st3, rec3 = open_storage(d, opened)  # repaired: it starts without --repair now
    assert st3.keyspace.data == {b"last": b"write"} and rec3.warnings == []


def test_a_missing_segment_refuses_to_start_and_repair_keeps_the_prefix(
        tmp_path: Path, opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1 << 40)
    put(st, b"a", b"1")
    st.start_snapshot()
    wait_snapshot_done(st)  # snap-2 + wal-2
    put(st, b"b", b"2")
    # a rotation without a snapshot: start one and let it fail, keeping wal-2 and wal-3
    monkey_fail = pytest.MonkeyPatch()
    monkey_fail.setattr("zkv.storage.write_snapshot",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    st.start_snapshot()
    wait_snapshot_done(st)
    monkey_fail.undo()
    put(st, b"a", b"3")
    put(st, b"c", b"4")
    st.close()
    d = tmp_path / "d"
    assert files(d) == ["snap-00000002.zkv", "wal-00000002.log", "wal-00000003.log"]
    (d / "wal-00000002.log").unlink()  # its write of b would vanish, a's old value come back
    with pytest.raises(StorageError, match="is missing wal-00000002.log"):
        open_storage(d, opened)
    st2, rec = open_storage(d, opened, repair=True)
    assert st2.keyspace.data == {b"a": b"1"}  # the snapshot; wal-3 set aside after the gap
    assert (d / "wal-00000003.log.dropped").exists()
    assert any("missing wal-00000002.log" in w for w in rec.warnings)


def test_a_missing_last_segment_is_found_by_the_manifest(tmp_path: Path,
                                                         opened: list[Storage]) -> None:
    st, _ = snapshotted(tmp_path, opened)
    d = tmp_path / "d"
    (d / "wal-00000003.log").unlink()  # the newest writes; nothing after it to notice
    with pytest.raises(StorageError, match="is missing wal-00000003.log"):
        open_storage(d, opened)


def test_a_flipped_bit_in_a_snapshot_is_loaded_around_by_repair(tmp_path: Path,
                                                                opened: list[Storage]) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1 << 40)
    expected = {}
    for i in range(5000):  # several snapshot chunks of 1000 keys
        put(st, b"k%05d" % i, b"v" * 20)
        expected[b"k%05d" % i] = b"v" * 20
    st.start_snapshot()
    wait_snapshot_done(st)
    st.close()
    snap = tmp_path / "d" / "snap-00000002.zkv"
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a chunk in the middle
    snap.write_bytes(bytes(data))
    with pytest.raises(LogCorruption) as info:
        open_storage(tmp_path / "d", opened)
    assert "--repair to load every record that can still be read" in str(info.value)
    st2, rec = open_storage(tmp_path / "d", opened, repair=True)
    got = st2.keyspace.data
    assert 3000 <= len(got) < 5000 and all(expected[k] == v for k, v in got.items())
    assert any(f"{5000 - len(got)} of its 5000 keys are lost" in w for w in rec.warnings)
    assert st2.wants_snapshot()  # a fresh snapshot replaces the damaged one
    st2.start_snapshot()
    wait_snapshot_done(st2)
    st3, rec3 = reopen(st2, opened)
    assert st3.keyspace.data == got and rec3.warnings == []


@pytest.mark.parametrize("kind", ["file", "missing-parent-is-a-file"])
def test_a_data_dir_that_cannot_be_used_is_one_clear_error(tmp_path: Path,
                                                           opened: list[Storage],
                                                           kind: str) -> None:
    target = tmp_path / "f"
    target.write_text("not a directory")
    path = target if kind == "file" else target / "sub"
    with pytest.raises(StorageError) as info:
        open_storage(path, opened)
    assert str(path) in str(info.value)
    assert "directory" in str(info.value)
    assert "File exists" not in str(info.value)  # (what makedirs says of a file)
    if kind == "file":
        assert "it is a file, not a directory" in str(info.value)


def test_a_torn_tail_on_a_full_disk_is_refused_not_cut_blindly(
        tmp_path: Path, opened: list[Storage], monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = open_storage(tmp_path / "d", opened)
    fill(st, 5)
    st.close()
    with open(log_path(st), "ab") as f:
        f.write(b"\x10\x00\x00\x00torn")
    size = log_path(st).stat().st_size
    real_open = open

    def full(path: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if ".torn-" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(StorageError) as info:
        open_storage(tmp_path / "d", opened)
    monkeypatch.undo()
    assert "cannot keep the" in str(info.value) and "No space left" in str(info.value)
    assert log_path(st).stat().st_size == size  # nothing cut


def test_disk_errors_starting_a_snapshot_keep_the_node_writing(
        tmp_path: Path, opened: list[Storage], monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1)
    expected = fill(st, 5)
    real_open = os.open

    def no_new_files(path: Any, flags: int, *a: Any) -> int:
        if "wal-00000002" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr("zkv.storage.os.open", no_new_files)
    st.tick(time.monotonic())  # wants a snapshot; cannot start a segment: logged, retried
    assert st.seq == 1 and not st.stats()["snapshot_running"]
    put(st, b"still", b"writing")
    expected[b"still"] = b"writing"
    monkeypatch.undo()
    st2, rec = reopen(st, opened)
    assert st2.keyspace.data == expected and rec.warnings == []


def test_resync_over_random_bytes_does_linear_work() -> None:
    rng = __import__("random").Random(7)
    buf = bytes(rng.getrandbits(8) for _ in range(1 << 20))
    work = wal.Work()
    assert wal.resync(buf, 0, work=work) is None
    assert work.crc_bytes <= 4 * len(buf), work.crc_bytes


# -- the directory's identity (what a replicated shard records for each copy) -------------
def test_a_directory_keeps_its_identity_and_a_new_or_repaired_one_gets_another(
        tmp_path: Path, opened: list[Storage]) -> None:
    st, expected = snapshotted(tmp_path, opened)
    d = tmp_path / "d"
    first, _ = open_storage(d, opened)
    identity = first.identity
    assert len(identity) == 16 and first.keyspace.data == expected
    first.start_snapshot()  # (a MANIFEST rewritten by a snapshot keeps it)
    wait_snapshot_done(first)
    again, _ = reopen(first, opened)
    assert again.identity == identity
    again.close()
    other, _ = open_storage(tmp_path / "other", opened)
    assert other.identity not in ("", identity)  # a new directory is another copy
    # a MANIFEST from before identities: the directory gets one, kept from then on
    manifest = json.loads((d / "MANIFEST").read_text())
    del manifest["id"]
    (d / "MANIFEST").write_text(json.dumps(manifest))
    legacy, _ = open_storage(d, opened)
    assert legacy.identity not in ("", identity) and legacy.keyspace.data == expected
    kept = legacy.identity
    legacy2, _ = reopen(legacy, opened)
    assert legacy2.identity == kept
    legacy2.close()
    # --repair going on without data makes it another copy too (it lost what it held)
    for name in files(d):
        if name.startswith("snap-"):
            (d / name).unlink()
    repaired, rec = open_storage(d, opened, repair=True)
    assert rec.warnings and repaired.identity not in ("", kept)
    # a damaged id in the MANIFEST is a damaged MANIFEST
    repaired.close()
    manifest = json.loads((d / "MANIFEST").read_text())
    (d / "MANIFEST").write_text(json.dumps({**manifest, "id": "not an id!"}))
    with pytest.raises(StorageError, match="MANIFEST is damaged"):
        open_storage(d, opened)
