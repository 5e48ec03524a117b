"""The rebalance planner: exactly the hashes that change owner move, from old owner to new."""

from __future__ import annotations

import json
import random
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkv.core.planner import Transfer, moved_fraction, plan, summary
from zkv.core.ring import HASH_SPACE, Ring, key_hash, ranges_of
from zkv.errors import ClusterError

ports = st.integers(min_value=1, max_value=65535)
vnodes = st.integers(min_value=1, max_value=48)


@st.composite
def ring_and_newcomer(draw: st.DrawFn) -> tuple[Ring, str, float]:
    """A ring of 1..6 members, and an address that is not in it with a weight."""
    chosen = draw(st.lists(ports, min_size=2, max_size=7, unique=True))
    weights = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=7, max_size=7))
    members = {f"127.0.0.1:{p}": w for p, w in zip(chosen[1:], weights)}
    return Ring(members, vnodes=draw(vnodes)), f"127.0.0.1:{chosen[0]}", weights[-1]


def _probes(old: Ring, new: Ring, seed: int) -> set[int]:
    """Every arc edge of both rings and its neighbours, plus random hashes and keys."""
    rng = random.Random(seed)
    probes = {rng.randrange(HASH_SPACE) for _ in range(100)}
    probes |= {key_hash(rng.randbytes(8)) for _ in range(100)}
    for ring in (old, new):
        for lo, hi, _ in ring.arcs():
            probes |= {lo - 1, lo, lo + 1, hi - 1, hi}
    return {h for h in probes if 0 <= h < HASH_SPACE}


def _check_exact(old: Ring, new: Ring, transfers: list[Transfer], seed: int) -> None:
    """Changed hashes lie in exactly one transfer, old owner to new; unchanged in none."""
    for h in _probes(old, new, seed):
        before, after = old.owner_of_hash(h), new.owner_of_hash(h)
        holders = [(t.source, t.dest) for t in transfers if t.ranges.contains(h)]
        assert holders == ([] if before == after else [(before, after)]), hex(h)


def _check_against_ranges(old: Ring, new: Ring, transfers: list[Transfer]) -> None:
    """Each transfer is what its source owned before and its dest owns after."""
    expected = {
        (s, d): ranges_of(old, s).intersection(ranges_of(new, d))
        for s in old.members
        for d in new.members
        if s != d
    }
    assert {(t.source, t.dest): t.ranges for t in transfers} == {
        pair: rs for pair, rs in expected.items() if not rs.is_empty()
    }


# -- ADD -----------------------------------------------------------------------------------------


@given(ring_and_newcomer(), st.integers(0, 2**32))
def test_add_moves_only_to_the_newcomer(case: tuple[Ring, str, float], seed: int) -> None:
    old, newcomer, weight = case
    new = old.with_member(newcomer, weight)
    transfers = plan(old, new)
    assert all(t.dest == newcomer and t.source in old for t in transfers)
    assert [(t.source, t.dest) for t in transfers] == sorted((t.source, t.dest) for t in transfers)
    assert all(not t.ranges.is_empty() for t in transfers)
    assert moved_fraction(transfers) == ranges_of(new, newcomer).fraction()
    _check_exact(old, new, transfers, seed)
    _check_against_ranges(old, new, transfers)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_add_to_n_minus_one_moves_about_one_nth(n: int) -> None:
    old = Ring([f"127.0.0.1:{8081 + i}" for i in range(n - 1)])
    moved = moved_fraction(plan(old, old.with_member(f"127.0.0.1:{8081 + n - 1}")))
    assert 0.85 / n <= moved <= 1.15 / n


@settings(max_examples=20)
@given(st.lists(ports, min_size=3, max_size=9, unique=True))
def test_add_moves_about_one_nth_for_any_members(chosen: list[int]) -> None:
    old = Ring([f"10.0.0.1:{p}" for p in chosen[1:]])
    moved = moved_fraction(plan(old, old.with_member(f"10.0.0.1:{chosen[0]}")))
    assert 0.8 / len(chosen) <= moved <= 1.2 / len(chosen)


# -- REMOVE --------------------------------------------------------------------------------------


@given(ring_and_newcomer(), st.integers(0, 2**32), st.data())
def test_remove_moves_only_from_the_leaver(
    case: tuple[Ring, str, float], seed: int, data: st.DataObject
) -> None:
    ring, newcomer, weight = case
    old = ring.with_member(newcomer, weight)
    leaver = data.draw(st.sampled_from(old.members))
    new = old.without_member(leaver)
    transfers = plan(old, new)
    assert transfers and all(t.source == leaver and t.dest in new for t in transfers)
    assert moved_fraction(transfers) == ranges_of(old, leaver).fraction()
    _check_exact(old, new, transfers, seed)
    _check_against_ranges(old, new, transfers)


@given(ring_and_newcomer())
def test_remove_then_add_gives_back_the_same_ring(case: tuple[Ring, str, float]) -> None:
    ring, newcomer, weight = case
    old = ring.with_member(newcomer, weight)
    back = old.without_member(newcomer).with_member(newcomer, weight)
    assert back == old and hash(back) == hash(old)
    assert plan(old, back) == []
    assert list(back.arcs()) == list(old.arcs())


@given(ring_and_newcomer())
def test_a_plan_reversed_is_the_plan_back(case: tuple[Ring, str, float]) -> None:
    old, newcomer, weight = case
    new = old.with_member(newcomer, weight)
    forth = {(t.source, t.dest): t.ranges for t in plan(old, new)}
    back = {(t.dest, t.source): t.ranges for t in plan(new, old)}
    assert forth == back


# -- general rings and edge cases ----------------------------------------------------------------


@given(
    st.dictionaries(st.sampled_from("abcdefg"), st.sampled_from([0.5, 1.0, 3.0]), min_size=1),
    st.dictionaries(st.sampled_from("abcdefg"), st.sampled_from([0.5, 1.0, 3.0]), min_size=1),
    vnodes,
    st.integers(0, 2**32),
)
def test_any_two_rings_plan_exactly(
    a: dict[str, float], b: dict[str, float], v: int, seed: int
) -> None:
    old, new = Ring(a, vnodes=v), Ring(b, vnodes=v)
    transfers = plan(old, new)
    _check_exact(old, new, transfers, seed)
    _check_against_ranges(old, new, transfers)


def test_identical_rings_need_no_transfers() -> None:
    ring = Ring(["a:1", "b:1", "c:1"])
    assert plan(ring, Ring(["c:1", "b:1", "a:1"])) == []
    assert moved_fraction([]) == 0.0 and summary(ring, ring) == []


def test_from_an_empty_ring_nothing_moves() -> None:
    assert plan(Ring(), Ring(["a:1"])) == []


def test_removing_the_last_node_is_refused() -> None:
    with pytest.raises(ClusterError, match="last node"):
        plan(Ring(["a:1"]), Ring())
    with pytest.raises(ClusterError, match="last node"):
        summary(Ring(["a:1"]), Ring())


def test_single_member_to_two_members() -> None:
    old = Ring(["a:1"], vnodes=16)
    new = old.with_member("b:1")
    [transfer] = plan(old, new)
    assert (transfer.source, transfer.dest) == ("a:1", "b:1")
    assert transfer.ranges == ranges_of(new, "b:1")


def test_summary_lists_fractions_per_pair() -> None:
    old = Ring(["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"])
    new = old.with_member("127.0.0.1:8084")
    rows = summary(old, new)
    assert [(r["source"], r["dest"]) for r in rows] == [
        (f"127.0.0.1:{p}", "127.0.0.1:8084") for p in (8081, 8082, 8083)
    ]
    assert sum(r["fraction"] for r in rows) == pytest.approx(moved_fraction(plan(old, new)))
    assert all(r["intervals"] > 0 for r in rows)
    json.dumps(rows)  # printable as-is


# -- Transfer serialisation ----------------------------------------------------------------------


def test_transfer_round_trips_through_json_and_cbor() -> None:
    old = Ring(["a:1", "b:1"], vnodes=8)
    for t in plan(old, old.with_member("c:1")):
        assert Transfer.from_dict(json.loads(json.dumps(t.to_dict()))) == t
        assert Transfer.from_dict(cbor2.loads(cbor2.dumps(t.to_dict()))) == t


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a map"),
        ({"dest": "b", "ranges": []}, "'source'"),
        ({"source": "a", "dest": 3, "ranges": []}, "'dest'"),
        ({"source": "a", "dest": "a", "ranges": []}, "to itself"),
        ({"source": "a", "dest": "b"}, "must be a list"),
        ({"source": "a", "dest": "b", "ranges": [[2, 1]]}, "not an interval"),
    ],
)
def test_transfer_from_dict_refuses_bad_input(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Transfer.from_dict(data)
