"""The hash ring: stable hashing, hash tags, balance, and the RangeSet algebra."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zkv.core.ring import (
    DEFAULT_VNODES,
    HASH_SPACE,
    RangeSet,
    Ring,
    hash_tag,
    key_hash,
    ranges_of,
)
from zkv.errors import ClusterError

THREE = ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
FOURTH = "127.0.0.1:8084"
N_KEYS = 1_000_000

ports = st.integers(min_value=1, max_value=65535)
member_sets = st.sets(ports, min_size=1, max_size=6).map(
    lambda ps: [f"127.0.0.1:{p}" for p in sorted(ps)]
)
hashes = st.one_of(
    st.integers(0, HASH_SPACE - 1), st.sampled_from([0, 1, HASH_SPACE - 2, HASH_SPACE - 1])
)


# -- key_hash and hash tags ----------------------------------------------------------------------

# Computed once and pinned: if these change, every deployed cluster's data is misplaced.
PINNED = [
    (b"", 16476032584258269876),
    (b"a", 4681665781835383343),
    (b"hello", 12085107955937391741),
    (b"\x00\xff", 12738201167342902500),
    (b"{user1}.a", 14914577609760747527),
]


@pytest.mark.parametrize(("key", "expected"), PINNED)
def test_key_hash_is_pinned(key: bytes, expected: int) -> None:
    assert key_hash(key) == expected


def _blake(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def test_key_hash_is_unsigned_64_bit_blake2b() -> None:
    assert key_hash(b"hello") == _blake(b"hello")
    assert all(0 <= key_hash(bytes([i]) * i) < HASH_SPACE for i in range(256))


@pytest.mark.parametrize(
    ("key", "tag"),
    [
        (b"{user1}.a", b"user1"),
        (b"x{user1}y", b"user1"),
        (b"{}x", None),  # nothing between the braces: the whole key
        (b"x{", None),  # no closing brace
        (b"x}", None),
        (b"{a", None),
        (b"a}{b}", b"b"),  # a '}' before the first '{' does not count
        (b"foo{}{bar}", None),  # only the first '{' is considered
        (b"foo{bar}{zap}", b"bar"),
        (b"{{a}}", b"{a"),
        (b"a{\x00}b", b"\x00"),
        (b"plain", None),
        (b"", None),
    ],
)
def test_hash_tag_follows_redis_rules(key: bytes, tag: bytes | None) -> None:
    assert hash_tag(key) == tag
    assert key_hash(key) == _blake(key if tag is None else tag)


def test_keys_with_one_tag_hash_alike() -> None:
    assert key_hash(b"{user1}.a") == key_hash(b"{user1}.b") == key_hash(b"user1")
    assert key_hash(b"{}x") != key_hash(b"{}y")


def test_tagged_keys_share_an_owner() -> None:
    ring = Ring(THREE)
    owners = {ring.owner(b"{user1}.%d" % i) for i in range(200)}
    assert owners == {ring.owner(b"user1")}


# -- owner ---------------------------------------------------------------------------------------


@given(member_sets, st.randoms(use_true_random=False), st.lists(st.binary(), max_size=20))
def test_owner_does_not_depend_on_input_order(
    members: list[str], rnd: random.Random, keys: list[bytes]
) -> None:
    shuffled = members[:]
    rnd.shuffle(shuffled)
    a, b = Ring(members, vnodes=16), Ring(shuffled, vnodes=16)
    c = Ring(dict.fromkeys(reversed(members), 1.0), vnodes=16)
    assert a == b == c
    for key in keys:
        assert a.owner(key) == b.owner(key) == c.owner(key)


def _brute_owner(ring: Ring, h: int) -> str:
    points = sorted(
        (key_hash(f"{addr}#{i}".encode()), addr)
        for addr, weight in ring.weights.items()
        for i in range(max(1, round(ring.vnodes * weight)))
    )
    return next((addr for point, addr in points if point >= h), points[0][1])


@given(member_sets, st.integers(1, 8), st.lists(hashes, max_size=30))
def test_owner_is_first_point_at_or_after_the_hash(
    members: list[str], vnodes: int, hs: list[int]
) -> None:
    ring = Ring(members, vnodes=vnodes)
    for h in hs:
        assert ring.owner_of_hash(h) == _brute_owner(ring, h)


def test_explain_names_the_owning_point() -> None:
    ring = Ring(THREE)
    for key in [b"hello", b"{user1}.a", b"", b"\x00" * 40]:
        info = ring.explain(key)
        assert info["key_hash"] == key_hash(key)
        assert info["hash_tag"] == hash_tag(key)
        assert info["owner"] == ring.owner(key)
        own_points = {_blake(f"{info['owner']}#{i}".encode()) for i in range(ring.vnodes)}
        assert info["point"] in own_points
        # no point of any member lies between the key's hash and its owning point
        owned = ranges_of(ring, info["owner"])
        assert RangeSet.arc(info["key_hash"], info["point"] + 1).difference(owned).is_empty()


def test_single_member_owns_everything() -> None:
    ring = Ring(["solo:1"], vnodes=1)
    assert {ring.owner(b"%d" % i) for i in range(100)} == {"solo:1"}
    assert ring.owner_of_hash(0) == ring.owner_of_hash(HASH_SPACE - 1) == "solo:1"
    assert ranges_of(ring, "solo:1") == RangeSet.full()
    assert ring.shares() == {"solo:1": 1.0}


# -- balance (the contract in DESIGN.md section 1) -----------------------------------------------


@pytest.fixture(scope="module")
def placements() -> Counter[tuple[str, str]]:
    """(owner with 3 members, owner once a 4th joins) counted over 1M seeded random keys."""
    rng = random.Random(1)
    before, after = Ring(THREE), Ring(THREE).with_member(FOURTH)
    hashes = (key_hash(rng.randbytes(16)) for _ in range(N_KEYS))  # what owner(key) looks up
    return Counter((before.owner_of_hash(h), after.owner_of_hash(h)) for h in hashes)


def test_three_members_hold_at_most_110_percent_of_the_mean(
    placements: Counter[tuple[str, str]],
) -> None:
    counts: Counter[str] = Counter()
    for (before, _), n in placements.items():
        counts[before] += n
    assert set(counts) == set(THREE)
    assert max(counts.values()) / (N_KEYS / 3) <= 1.10


def test_adding_a_fourth_moves_about_a_quarter_and_only_to_it(
    placements: Counter[tuple[str, str]],
) -> None:
    moved = {pair: n for pair, n in placements.items() if pair[0] != pair[1]}
    assert 0.18 <= sum(moved.values()) / N_KEYS <= 0.32
    assert {after for _, after in moved} == {FOURTH}


def test_balance_holds_for_many_member_sets() -> None:
    rng = random.Random(7)
    for _ in range(20):
        hosts = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.1" for _ in range(3)]
        ring = Ring([f"{h}:{rng.randrange(1024, 65536)}" for h in hosts])
        assert max(ring.shares().values()) * 3 <= 1.10, ring


def test_shares_sum_to_one_and_match_ranges() -> None:
    ring = Ring({"a:1": 1.0, "b:1": 0.5, "c:1": 3.0}, vnodes=64)
    shares = ring.shares()
    assert math.isclose(sum(shares.values()), 1.0)
    for addr, share in shares.items():
        assert ranges_of(ring, addr).fraction() == share


def test_ranges_partition_the_hash_space() -> None:
    ring = Ring(THREE, vnodes=32)
    parts = [ranges_of(ring, addr) for addr in THREE]
    assert sum(p.size() for p in parts) == HASH_SPACE
    assert parts[0].union(parts[1]).union(parts[2]) == RangeSet.full()
    assert parts[0].intersection(parts[1]).is_empty()
    assert ranges_of(ring, "not-a-member:1").is_empty()


def test_a_member_of_weight_two_gets_twice_the_share() -> None:
    shares = Ring({"heavy:1": 2.0, "light:1": 1.0, "light:2": 1.0}).shares()
    for light in ("light:1", "light:2"):
        assert 1.8 <= shares["heavy:1"] / shares[light] <= 2.2


def test_tiny_weights_still_get_one_point() -> None:
    ring = Ring({"a:1": 1.0, "tiny:1": 1e-9}, vnodes=4)
    assert ring.shares()["tiny:1"] > 0


# -- immutability, equality, membership changes --------------------------------------------------


def test_rings_compare_by_members_weights_and_vnodes() -> None:
    assert Ring(["a:1", "b:1"]) == Ring({"b:1": 1, "a:1": 1.0})
    assert Ring(["a:1", "b:1"]) != Ring(["a:1", "b:1"], vnodes=8)
    assert Ring(["a:1", "b:1"]) != Ring({"a:1": 1.0, "b:1": 2.0})
    assert len({Ring(["a:1"]), Ring(["a:1"]), Ring(["b:1"])}) == 2


def test_properties_do_not_leak_state() -> None:
    ring = Ring(["b:1", "a:1"], vnodes=8)
    assert ring.members == ("a:1", "b:1")
    assert ring.vnodes == 8
    ring.weights["a:1"] = 5.0
    assert ring.weights == {"a:1": 1.0, "b:1": 1.0}
    assert "a:1" in ring and "z:1" not in ring and len(ring) == 2


def test_with_and_without_member_return_new_rings() -> None:
    ring = Ring(THREE, vnodes=16)
    bigger = ring.with_member(FOURTH, 2.0)
    assert bigger.weights[FOURTH] == 2.0 and FOURTH not in ring
    assert bigger.without_member(FOURTH) == ring
    with pytest.raises(ClusterError, match="already a member"):
        ring.with_member(THREE[0])
    with pytest.raises(ClusterError, match="not a member"):
        ring.without_member(FOURTH)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vnodes", [0, -1, 1.5, True, "8", None])
def test_bad_vnodes_are_refused(vnodes: Any) -> None:
    with pytest.raises(ValueError, match="vnodes"):
        Ring(THREE, vnodes=vnodes)


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, "1", None, True])
def test_bad_weights_are_refused(weight: Any) -> None:
    with pytest.raises(ValueError, match="weight of a:1"):
        Ring({"a:1": weight})
    with pytest.raises(ValueError, match="weight of b:1"):
        Ring(["a:1"]).with_member("b:1", weight)


@pytest.mark.parametrize("members", [[""], [b"a:1"], [None]])
def test_bad_addresses_are_refused(members: Any) -> None:
    with pytest.raises(ValueError, match="member"):
        Ring(members)


def test_duplicate_and_string_members_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Ring(["a:1", "a:1"])
    with pytest.raises(TypeError, match="one string"):
        Ring("a:1")


def test_empty_ring_has_no_owner() -> None:
    ring = Ring()
    with pytest.raises(ClusterError, match="the ring has no members"):
        ring.owner(b"k")
    with pytest.raises(ClusterError, match="the ring has no members"):
        ring.explain(b"k")
    assert ring.shares() == {} and list(ring.arcs()) == []
    assert Ring(["a:1"]).without_member("a:1") == ring


@pytest.mark.parametrize("h", [-1, HASH_SPACE])
def test_hash_outside_the_space_is_refused(h: int) -> None:
    with pytest.raises(ValueError, match="outside the hash space"):
        Ring(THREE).owner_of_hash(h)


# -- RangeSet ------------------------------------------------------------------------------------

bounds = st.one_of(st.integers(0, 40), st.integers(0, HASH_SPACE), st.just(HASH_SPACE))
intervals = st.lists(st.tuples(bounds, bounds).map(lambda t: (min(t), max(t))), max_size=8)


def _brute(ivs: list[tuple[int, int]], h: int) -> bool:
    return any(lo <= h < hi for lo, hi in ivs)


def _probes(*sets: list[tuple[int, int]]) -> set[int]:
    points = {0, 1, 20, 41, HASH_SPACE - 1}
    for ivs in sets:
        for lo, hi in ivs:
            points |= {lo - 1, lo, lo + 1, hi - 1, hi, hi + 1}
    return {p for p in points if 0 <= p < HASH_SPACE}


def test_rangeset_normalises() -> None:
    rs = RangeSet([(5, 10), (0, 3), (3, 4), (8, 12), (20, 20)])
    assert list(rs) == [(0, 4), (5, 12)]
    assert rs.size() == 11 and len(rs) == 2 and not rs.is_empty()
    assert rs == RangeSet([(5, 12), (0, 4)])
    assert RangeSet().is_empty() and RangeSet([(7, 7)]) == RangeSet()


def test_wrapping_arc_is_split_in_two() -> None:
    rs = RangeSet.arc(HASH_SPACE - 10, 5)
    assert list(rs) == [(0, 5), (HASH_SPACE - 10, HASH_SPACE)]
    assert rs.contains(HASH_SPACE - 1) and rs.contains(0) and not rs.contains(5)
    assert RangeSet.arc(3, 9) == RangeSet([(3, 9)])
    assert RangeSet.full().fraction() == 1.0 and RangeSet.full().complement().is_empty()


@given(intervals)
def test_rangeset_is_sorted_merged_and_in_bounds(ivs: list[tuple[int, int]]) -> None:
    flat = [b for iv in RangeSet(ivs) for b in iv]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)  # strictly increasing
    assert all(0 <= b <= HASH_SPACE for b in flat)


@given(intervals, st.lists(st.integers(0, HASH_SPACE - 1), max_size=10))
def test_contains_agrees_with_brute_force(ivs: list[tuple[int, int]], extra: list[int]) -> None:
    rs = RangeSet(ivs)
    for h in _probes(ivs) | set(extra):
        assert rs.contains(h) == _brute(ivs, h) == (h in rs)
    assert rs.size() == sum(hi - lo for lo, hi in rs)


@given(intervals, intervals)
def test_set_algebra_agrees_with_brute_force(
    a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    ra, rb = RangeSet(a), RangeSet(b)
    for h in _probes(a, b):
        x, y = _brute(a, h), _brute(b, h)
        assert ra.union(rb).contains(h) == (x or y)
        assert ra.intersection(rb).contains(h) == (x and y)
        assert ra.difference(rb).contains(h) == (x and not y)
        assert ra.complement().contains(h) == (not x)


@given(intervals)
def test_rangeset_round_trips_through_list_json_and_cbor(ivs: list[tuple[int, int]]) -> None:
    rs = RangeSet(ivs)
    assert RangeSet.from_list(rs.to_list()) == rs
    assert RangeSet.from_list(json.loads(json.dumps(rs.to_list()))) == rs
    assert RangeSet.from_list(cbor2.loads(cbor2.dumps(rs.to_list()))) == rs
    assert hash(RangeSet(ivs)) == hash(rs)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "must be a list"),
        ("0-5", "must be a list"),
        ({"lo": 0}, "must be a list"),
        ([1, 2], r"ranges\[0\] must be a \[lo, hi\] pair"),
        ([[1]], r"ranges\[0\] must be a \[lo, hi\] pair"),
        ([[0, 1], [1, 2, 3]], r"ranges\[1\] must be a \[lo, hi\] pair"),
        ([["1", 2]], "bounds must be ints"),
        ([[1.0, 2]], "bounds must be ints"),
        ([[True, 2]], "bounds must be ints"),
        ([[-1, 2]], "not an interval"),
        ([[0, HASH_SPACE + 1]], "not an interval"),
        ([[5, 3]], "not an interval"),
    ],
)
def test_from_list_refuses_bad_shapes(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RangeSet.from_list(data)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@given(json_like)
def test_from_list_either_parses_or_raises_value_error(data: Any) -> None:
    try:
        rs = RangeSet.from_list(data)
    except ValueError:
        return
    assert RangeSet.from_list(rs.to_list()) == rs


def test_rangeset_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="interval 1"):
        RangeSet([(0, 1), (2, HASH_SPACE + 5)])
    assert repr(RangeSet([(0, 16)])) == "RangeSet([0x0, 0x10))"
    assert DEFAULT_VNODES >= 1
