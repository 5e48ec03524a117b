"""The WAL record codec, bytes in and records out: no files, no sockets.

What recovery relies on: every whole record comes back; a log cut anywhere in its
last record is a torn tail at that record's offset (never corruption); a bad record
followed by good ones is corruption at the right offset; and no input, however
mangled, makes the reader raise.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zkv.core import wal

pytestmark = pytest.mark.timeout(60)


def build(items: list[Any]) -> tuple[bytes, list[int]]:
    """A log holding ``items``, and the offset of each record."""
    buf = bytearray()
    offsets = []
    for item in items:
        offsets.append(len(buf))
        buf += wal.encode(item)
    return bytes(buf), offsets


def scan(buf: bytes, start: int = 0) -> tuple[list[tuple[int, Any]], wal.LogScan]:
    s = wal.LogScan(buf, start)
    return list(s), s


def sample_items(n: int) -> list[Any]:
    items: list[Any] = []
    for i in range(n):
        key = f"key-{i}".encode()
        if i % 7 == 3:
            items.append((wal.DEL, key))
        elif i % 5 == 4:
            items.append((wal.MSET, [key, b"a" * i, key + b"x", bytes(range(i % 256))]))
        else:
            items.append((wal.SET, key, bytes([i % 256]) * (i % 300)))
    return items


def as_lists(item: Any) -> Any:
    """CBOR gives tuples back as lists."""
    if isinstance(item, (tuple, list)):
        return [as_lists(x) for x in item]
    return item


def test_round_trip_of_many_records() -> None:
    items = sample_items(2000)
    buf, offsets = build(items)
    got, s = scan(buf)
    assert [off for off, _ in got] == offsets
    assert [item for _, item in got] == as_lists(items)
    assert s.damage is None
    assert s.end == len(buf)


def test_round_trip_is_binary_safe() -> None:
    keys = [b"", b"\x00", b"a b", b"line\nbreak", "ключ ✓".encode(), bytes(range(256))]
    items = [(wal.SET, k or b"k", k + b"\x00\xff" * 3) for k in keys]
    items.append((wal.SET, b"big", b"\x00" * (1 << 20)))
    buf, _ = build(items)
    got, s = scan(buf)
    assert [item for _, item in got] == as_lists(items)
    assert s.damage is None


def test_scan_from_a_start_offset() -> None:
    buf, offsets = build(sample_items(10))
    got, s = scan(buf, offsets[4])
    assert [off for off, _ in got] == offsets[4:]
    assert s.damage is None


def test_empty_buffer_has_no_records_and_no_damage() -> None:
    got, s = scan(b"")
    assert got == [] and s.damage is None and s.end == 0


@pytest.mark.parametrize("last_value", [b"v", b"\x00" * 40, bytes(range(256)) * 2])
def test_cut_at_every_byte_of_the_last_record_is_a_torn_tail(last_value: bytes) -> None:
    items = sample_items(20) + [(wal.SET, b"last", last_value)]
    buf, offsets = build(items)
    last = offsets[-1]
    for cut in range(last, len(buf)):
        got, s = scan(buf[:cut])
        assert [item for _, item in got] == as_lists(items[:-1]), cut
        assert s.end == last, cut
        if cut == last:
            assert s.damage is None
        else:
            assert s.damage is not None, cut
            assert s.damage.offset == last, cut
            assert s.damage.corrupt is False, (cut, s.damage)
            assert s.damage.kind == "torn tail"
    got, s = scan(buf)
    assert len(got) == len(items) and s.damage is None


def test_fed_whole_then_one_byte_at_a_time() -> None:
    """Every prefix of a log reads as whole records plus at most a torn tail."""
    items = sample_items(12)
    buf, offsets = build(items)
    for cut in range(len(buf) + 1):
        got, s = scan(buf[:cut])
        ends = [*offsets[1:], len(buf)]
        whole = [o for o, end in zip(offsets, ends) if o < cut and end <= cut]
        assert [off for off, _ in got] == whole, cut
        if s.damage is not None:
            assert not s.damage.corrupt, (cut, s.damage)
            assert s.damage.offset == s.end


def test_flipped_byte_in_the_middle_record_is_corruption_at_its_offset() -> None:
    items = sample_items(21)
    buf, offsets = build(items)
    mid = offsets[10]
    bad = bytearray(buf)
    bad[(mid + offsets[11]) // 2] ^= 0x40
    got, s = scan(bytes(bad))
    assert [item for _, item in got] == as_lists(items[:10])
    assert s.damage is not None
    assert s.damage.corrupt is True
    assert s.damage.offset == mid
    assert s.damage.kind == "corruption"


def test_any_flipped_byte_of_the_middle_record_is_corruption() -> None:
    """Header bytes too: a damaged length must not make the rest look like a torn tail."""
    items = [(wal.SET, b"k%d" % i, b"value-%d" % i * 3) for i in range(21)]
    buf, offsets = build(items)
    mid, after = offsets[10], offsets[11]
    for pos in range(mid, after):
        for mask in (0x01, 0x10, 0x80):
            bad = bytearray(buf)
            bad[pos] ^= mask
            got, s = scan(bytes(bad))
            assert [item for _, item in got] == as_lists(items[:10]), (pos - mid, mask)
            assert s.damage is not None, (pos - mid, mask)
            assert s.damage.corrupt is True, (pos - mid, mask, s.damage)
            assert s.damage.offset == mid, (pos - mid, mask, s.damage)


def test_flipped_byte_in_the_last_record_is_a_torn_tail() -> None:
    items = sample_items(10)
    buf, offsets = build(items)
    bad = bytearray(buf)
    bad[-3] ^= 0xFF
    got, s = scan(bytes(bad))
    assert len(got) == 9
    assert s.damage is not None and not s.damage.corrupt
    assert s.damage.offset == offsets[-1]


@pytest.mark.parametrize("zeros", [1, 3, 8, 9, 4096])
def test_trailing_zero_bytes_are_a_torn_tail(zeros: int) -> None:
    items = sample_items(10)
    buf, _ = build(items)
    got, s = scan(buf + b"\x00" * zeros)
    assert [item for _, item in got] == as_lists(items)
    assert s.damage is not None
    assert s.damage.corrupt is False
    assert s.damage.offset == len(buf)


@pytest.mark.parametrize("inner_records", [1, 3, 20])
def test_torn_record_whose_value_holds_a_whole_log_is_torn_not_corrupt(
    inner_records: int,
) -> None:
    """A value may be a zkv log itself (say, a backup stored as a value). If its outer
    record is torn, the whole records inside the value must not be taken for records
    that follow a bad one."""
    inner, _ = build([(wal.SET, b"in%d" % i, b"x" * i) for i in range(inner_records)])
    items = sample_items(5) + [(wal.SET, b"backup", inner)]
    buf, offsets = build(items)
    last = offsets[-1]
    for cut in range(last + 1, len(buf)):
        got, s = scan(buf[:cut])
        assert len(got) == 5, cut
        assert s.damage is not None
        assert s.damage.offset == last
        assert s.damage.corrupt is False, (cut - last, s.damage)


def test_record_with_a_value_holding_a_log_then_corruption_after_it() -> None:
    """The embedded log is data: whole, it reads back as a value; a later bad record
    followed by good ones is still corruption at the bad record."""
    inner, _ = build([(wal.SET, b"in%d" % i, b"x" * i) for i in range(10)])
    items = [(wal.SET, b"backup", inner)] + sample_items(10)
    buf, offsets = build(items)
    got, s = scan(buf)
    assert got[0][1] == [wal.SET, b"backup", inner] and s.damage is None
    bad = bytearray(buf)
    bad[offsets[3] + 9] ^= 0x01
    got, s = scan(bytes(bad))
    assert len(got) == 3
    assert s.damage is not None and s.damage.corrupt and s.damage.offset == offsets[3]


def test_non_cbor_payload_with_a_good_checksum_stops_the_scan() -> None:
    items = sample_items(3)
    buf, _ = build(items)
    junk = wal.encode_payload(b"\xff\xff")  # a valid frame around invalid CBOR
    got, s = scan(buf + junk)
    assert len(got) == 3
    assert s.damage is not None and s.damage.offset == len(buf) and not s.damage.corrupt
    got, s = scan(buf + junk + buf)
    assert len(got) == 3
    assert s.damage is not None and s.damage.offset == len(buf) and s.damage.corrupt


def check_scan_invariants(buf: bytes) -> list[tuple[int, Any]]:
    s = wal.LogScan(buf)
    got = list(s)  # must never raise
    offsets = [off for off, _ in got]
    assert offsets == sorted(set(offsets))
    assert 0 <= s.end <= len(buf)
    if s.damage is None:
        assert s.end == len(buf)
    else:
        assert s.damage.offset == s.end < len(buf)
        assert isinstance(s.damage.reason, str) and s.damage.reason
        assert isinstance(s.damage.corrupt, bool)
    return got


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_never_raise(buf: bytes) -> None:
    check_scan_invariants(buf)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=60)), min_size=1, max_size=12),
    st.data(),
)
def test_fuzz_mangled_logs_never_raise_and_keep_the_good_prefix(
    pairs: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    items = [(wal.SET, k, v) for k, v in pairs]
    buf, offsets = build(items)
    mangled = bytearray(buf)
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        pos = data.draw(st.integers(0, len(mangled) - 1), label="pos")
        mangled[pos] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(mangled)), label="cut")
    tail = data.draw(st.binary(max_size=40), label="tail")
    got = check_scan_invariants(bytes(mangled[:cut]) + tail)
    # Whole records before the first damaged byte always come back unchanged.
    first_bad = next((i for i, (a, b) in enumerate(zip(buf, mangled)) if a != b), len(buf))
    limit = min(first_bad, cut)
    intact = [i for i, off in enumerate(offsets) if off + len(wal.encode(items[i])) <= limit]
    assert [item for _, item in got[: len(intact)]] == as_lists([items[i] for i in intact])
