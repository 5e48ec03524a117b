"""The key buckets that let a scan page without a copy of the key list (zkv.core.buckets),
and the keyspace keeping them in step with its map through commits and rollbacks."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.core.buckets import LOAD, KeyBuckets
from zkv.core.keyspace import Keyspace


def scan_all(b: KeyBuckets, want: int = 7) -> list[bytes]:
    out: list[bytes] = []
    cursor = 0
    while True:
        keys, cursor = b.walk(cursor, want, 1000, 1 << 30)
        out.extend(keys)
        if cursor == 0:
            return out


def test_the_table_grows_a_bucket_at_a_time_and_keeps_every_key() -> None:
    b = KeyBuckets()
    keys = [b"key:%d" % i for i in range(10_000)]
    for i, k in enumerate(keys):
        b.add(k)
        assert b.buckets >= (i + 1) // LOAD  # never much over LOAD keys a bucket
    assert sorted(scan_all(b)) == sorted(keys) and len(b) == len(keys)
    for k in keys[::2]:
        b.remove(k)
    assert sorted(scan_all(b)) == sorted(keys[1::2])


ops = st.lists(st.tuples(st.sampled_from(["add", "del", "page"]), st.integers(0, 300)),
               max_size=400)


@settings(max_examples=200)
@given(ops)
def test_a_scan_returns_every_key_present_from_its_start_to_its_end(script: list[tuple[str, int]]
                                                                    ) -> None:
    """Keys are added and removed between pages (so buckets split under the cursor):
    every key present for the whole scan is returned; nothing never present is."""
    b = KeyBuckets()
    present: set[bytes] = set()
    for i in range(150):
        b.add(b"k%d" % i)
        present.add(b"k%d" % i)
    always = set(present)
    ever = set(present)
    found: list[bytes] = []
    cursor, started = 0, False
    for op, n in script:
        key = b"k%d" % n
        if op == "add" and key not in present:
            b.add(key)
            present.add(key)
            ever.add(key)
        elif op == "del" and key in present:
            b.remove(key)
            present.discard(key)
            always.discard(key)
        elif op == "page" and (cursor or not started):
            started = True
            keys, cursor = b.walk(cursor, 5, 1000, 1 << 30)
            found.extend(keys)
    while cursor or not started:
        started = True
        keys, cursor = b.walk(cursor, 5, 1000, 1 << 30)
        found.extend(keys)
    assert always <= set(found) <= ever


def test_a_page_holds_memory_for_its_keys_not_for_the_keyspace() -> None:
    """A scan's memory is independent of the number of keys: with 200,000 keys a page
    of about 10 allocates a few KiB (the old SCAN copied the whole key list: 1.6 MB)."""
    b = KeyBuckets(b"key:%08d" % i for i in range(200_000))
    tracemalloc.start()
    try:
        cursor, pages = 0, 0
        while pages < 50:
            keys, cursor = b.walk(cursor, 10, 1000, 1 << 30)
            pages += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, peak


def test_a_page_stops_at_its_byte_and_bucket_bounds() -> None:
    b = KeyBuckets(b"%06d" % i + b"x" * 1000 for i in range(2000))
    keys, cursor = b.walk(0, 10_000, 10_000, 64 * 1024)
    assert cursor and 64 <= len(keys) <= 64 + 3 * LOAD  # whole buckets, ~64 KiB of keys
    keys, cursor = b.walk(0, 10_000, 3, 1 << 30)
    assert cursor == 3


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["set", "del", "commit", "rollback"]),
                          st.integers(0, 60)), max_size=200))
def test_the_keyspace_keeps_its_buckets_equal_to_its_map(script: list[tuple[str, int]]) -> None:
    ks = Keyspace()
    for op, n in script:
        key = b"k%d" % n
        if op == "set":
            ks.set(key, b"v%d" % n)
        elif op == "del":
            ks.delete(key)
        elif op == "commit":
            ks.commit()
        else:
            ks.rollback()
        assert sorted(ks.buckets) == sorted(ks.data)


def test_rolling_back_to_a_mark_undoes_only_what_came_after_it() -> None:
    ks = Keyspace()
    ks.set(b"a", b"1")
    mark = ks.mark()
    ks.set(b"a", b"2")
    ks.set(b"b", b"1")
    ks.delete(b"a")
    ks.rollback_to(mark)
    assert ks.data == {b"a": b"1"} and sorted(ks.buckets) == [b"a"]
    ks.rollback()
    assert ks.data == {} and list(ks.buckets) == [] and ks.live_bytes == 0


def test_after_many_keys_go_the_tables_are_made_anew_holding_the_same() -> None:
    """Keyspace.compact: only once half the keys (and COMPACT_KEYS) have gone since the
    peak; afterwards the map, the deadlines, the buckets, active expiry and a scan
    under way are as they were."""
    from zkv.core import keyspace as K

    ks = Keyspace()
    n = 2 * K.COMPACT_KEYS + 10
    keys = [b"k%07d" % i for i in range(n)]
    for i, key in enumerate(keys):
        ks.set(key, b"v", 10**12 + i if i % 2 else None)
    ks.commit()
    assert not ks.compact() and ks.peak == n
    first, cursor = ks.buckets.walk(0, 1000, 1 << 20, 1 << 20)
    for key in keys[: n // 2 - 10]:  # not quite half gone: kept as they are
        ks.delete(key)
    ks.commit()
    table = ks.data
    assert not ks.compact() and ks.data is table
    for key in keys[n // 2 - 10 : n // 2 + 1]:
        ks.delete(key)
    ks.commit()
    data, expires = dict(ks.data), dict(ks.expires)
    assert ks.compact() and ks.data is not table and ks.peak == len(data)
    assert ks.data == data and ks.expires == expires
    assert sorted(ks.buckets) == sorted(data)
    rest: list[bytes] = []
    while cursor:  # a scan begun before goes on where it was, missing nothing
        page, cursor = ks.buckets.walk(cursor, 1000, 1 << 20, 1 << 20)
        rest += page
    assert set(data) <= set(first) | set(rest)
    assert not ks.compact()  # nothing more went
    assert ks.expire(10**13, 10**6)[0] == len(expires) and len(ks) == len(data) - len(expires)
