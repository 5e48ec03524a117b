"""Expiry, counters and conditional writes as pure code (zkv.core.strings, zkv.core.keyspace,
zkv.core.expiry) with a fake clock; property tests against a model (a dict with
deadlines); deadlines through the log, snapshots, move batches and rollbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_storage import open_storage, reopen, wait_snapshot_done

from zkv.core import protocol as P
from zkv.core import strings as S
from zkv.core import wal
from zkv.core.expiry import SLOT_MS, ExpiryWheel
from zkv.core.keyspace import PRESENT, UNKNOWN, Keyspace
from zkv.core.ring import RangeSet
from zkv.core.transfer import decode_batch, encode_batch
from zkv.errors import CommandError, LimitExceeded, ProtocolError

T0 = 1_800_000_000_000  # "now" in ms since the epoch


def replayed(records: bytes) -> Keyspace:
    ks = Keyspace()
    ks.replay(wal.LogScan(records))
    ks.reindex()
    return ks


# -- SET and its options --------------------------------------------------------------
def test_set_options_follow_redis() -> None:
    ks = Keyspace()
    assert S.set_(ks, b"k", b"v", {"ex": 10}, T0)[0] == "OK"
    assert S.ttl(ks, b"k", T0, False) == 10 and S.ttl(ks, b"k", T0, True) == 10_000
    assert S.set_(ks, b"k", b"w", {"nx": True}, T0) == (None, b"")  # present: not set
    assert S.set_(ks, b"k", b"w", {"xx": True, "keepttl": True}, T0)[0] == "OK"
    assert ks.get(b"k", T0) == b"w" and ks.deadline(b"k") == T0 + 10_000  # kept
    assert S.set_(ks, b"k", b"x", {"get": True}, T0)[0] == b"w"
    assert ks.deadline(b"k") is None  # a plain SET takes the deadline away
    assert S.set_(ks, b"new", b"v", {"xx": True}, T0) == (None, b"")
    assert S.set_(ks, b"new", b"v", {"nx": True, "get": True}, T0)[0] is None
    assert ks.get(b"new", T0) == b"v"
    # IFEQ: compare-and-set
    assert S.set_(ks, b"new", b"v2", {"ifeq": b"nope"}, T0)[0] is None
    assert S.set_(ks, b"new", b"v2", {"ifeq": b"v", "get": True}, T0)[0] == b"v"
    assert ks.get(b"new", T0) == b"v2"
    assert S.set_(ks, b"absent", b"v", {"ifeq": b"v"}, T0)[0] is None
    # absolute times; one already past leaves no key (as if set, then expired)
    S.set_(ks, b"at", b"v", {"pxat": T0 + 5}, T0)
    assert S.expiretime(ks, b"at", T0, True) == T0 + 5
    assert S.set_(ks, b"at", b"v", {"exat": T0 // 1000 - 1}, T0)[0] == "OK"
    assert ks.get(b"at", T0) is None and b"at" not in ks.data


def test_option_checks_name_what_is_wrong() -> None:
    check = P.check_request
    with pytest.raises(ProtocolError, match="at most one"):
        check(["SET", b"k", b"v", {"ex": 1, "px": 5}])
    with pytest.raises(ProtocolError, match="at most one"):
        check(["SET", b"k", b"v", {"nx": True, "xx": True}])
    with pytest.raises(ProtocolError, match="at most one"):
        check(["SET", b"k", b"v", {"ex": 1, "keepttl": True}])
    with pytest.raises(CommandError, match="invalid expire time in 'set'"):
        check(["SET", b"k", b"v", {"ex": 0}])
    with pytest.raises(ProtocolError, match="no option 'bogus'"):
        check(["SET", b"k", b"v", {"bogus": 1}])
    with pytest.raises(ProtocolError, match="integer"):
        check(["INCRBY", b"k", b"12x"])
    with pytest.raises(ProtocolError, match="NX, XX, GT or LT"):
        check(["EXPIRE", b"k", 5, "SOON"])
    assert check(["INCRBY", b"k", b"-12"]) == ("INCRBY", [b"k", -12])
    assert P.options_from_words("SET", [b"EX", b"10", b"nx", b"GET"]) == \
        {"ex": 10, "nx": True, "get": True}
    with pytest.raises(ProtocolError, match="syntax error"):
        P.options_from_words("SET", [b"EX"])
    with pytest.raises(ProtocolError, match="does not take 'PERSIST'"):
        P.options_from_words("SET", [b"PERSIST"])


def test_a_huge_expire_is_refused_not_overflowed() -> None:
    ks = Keyspace()
    ks.set(b"k", b"v")
    with pytest.raises(CommandError, match="invalid expire time in 'expire'"):
        S.expire(ks, "EXPIRE", b"k", (1 << 63) - 1, None, T0)
    assert ks.deadline(b"k") is None


# -- counters ---------------------------------------------------------------------------
def test_counters_are_signed_64_bit_decimal_text() -> None:
    ks = Keyspace()
    assert S.incrby(ks, b"n", 1, T0)[0] == 1 and ks.get(b"n", T0) == b"1"
    assert S.incrby(ks, b"n", -11, T0)[0] == -10 and ks.get(b"n", T0) == b"-10"
    ks.set(b"max", str(S.INT64_MAX).encode())
    with pytest.raises(CommandError, match="overflow"):
        S.incrby(ks, b"max", 1, T0)
    assert S.incrby(ks, b"max", -1, T0)[0] == S.INT64_MAX - 1
    for bad in (b"abc", b"1.5", b" 1", b"+1", b"01", b"-0", b"", b"9" * 20):
        ks.set(b"bad", bad)
        with pytest.raises(CommandError, match="not an integer"):
            S.incrby(ks, b"bad", 1, T0)
        assert ks.get(b"bad", T0) == bad  # unchanged
    S.set_(ks, b"t", b"5", {"ex": 100}, T0)
    assert S.incrby(ks, b"t", 1, T0)[0] == 6 and ks.deadline(b"t") == T0 + 100_000
    # DECRBY of -2**63: its negation is no 64-bit integer, refused whatever the value
    # (even where the sum would fit: -2**63 - (-2**63) == 0), as Redis refuses it
    ks.set(b"min", str(S.INT64_MIN).encode())
    with pytest.raises(CommandError, match="decrement would overflow"):
        S.decrby(ks, b"min", S.INT64_MIN, T0)
    assert ks.get(b"min", T0) == str(S.INT64_MIN).encode()
    assert S.decrby(ks, b"n", 5, T0)[0] == -15


def test_append_strlen_getset_getdel_setnx_msetnx() -> None:
    ks = Keyspace()
    assert S.append(ks, b"a", b"xy", T0, 10)[0] == 2 and S.append(ks, b"a", b"z", T0, 10)[0] == 3
    with pytest.raises(LimitExceeded, match="maximum allowed size"):
        S.append(ks, b"a", b"x" * 8, T0, 10)
    assert S.strlen(ks, b"a", T0) == 3 and S.strlen(ks, b"none", T0) == 0
    assert S.getset(ks, b"a", b"new", T0)[0] == b"xyz"
    assert S.getdel(ks, b"a", T0)[0] == b"new" and b"a" not in ks.data
    assert S.getdel(ks, b"a", T0) == (None, b"")
    assert S.setnx(ks, b"l", b"1", T0)[0] == 1 and S.setnx(ks, b"l", b"2", T0)[0] == 0
    assert S.msetnx(ks, [b"x", b"1", b"l", b"2"], T0)[0] == 0 and b"x" not in ks.data
    assert S.msetnx(ks, [b"x", b"1", b"y", b"2"], T0)[0] == 1


# -- expiry -------------------------------------------------------------------------------
def test_expire_flags_and_ttl_replies() -> None:
    ks = Keyspace()
    assert S.ttl(ks, b"k", T0, False) == -2 and S.expiretime(ks, b"k", T0, True) == -2
    assert S.expire(ks, "EXPIRE", b"k", 10, None, T0)[0] == 0  # no key
    ks.set(b"k", b"v")
    assert S.ttl(ks, b"k", T0, False) == -1
    assert S.expire(ks, "EXPIRE", b"k", 10, "XX", T0)[0] == 0
    assert S.expire(ks, "EXPIRE", b"k", 10, "GT", T0)[0] == 0  # none counts as forever
    assert S.expire(ks, "EXPIRE", b"k", 10, "NX", T0)[0] == 1
    assert S.expire(ks, "EXPIRE", b"k", 20, "NX", T0)[0] == 0
    assert S.expire(ks, "PEXPIRE", b"k", 5_000, "GT", T0)[0] == 0
    assert S.expire(ks, "PEXPIRE", b"k", 5_000, "LT", T0)[0] == 1
    assert S.ttl(ks, b"k", T0 + 1_499, False) == 4  # rounded, as Redis rounds
    assert S.expire(ks, "EXPIREAT", b"k", T0 // 1000 + 60, "GT", T0)[0] == 1
    assert S.persist(ks, b"k", T0)[0] == 1 and S.persist(ks, b"k", T0)[0] == 0
    assert S.expire(ks, "EXPIRE", b"k", -1, None, T0)[0] == 1  # past: deleted
    assert b"k" not in ks.data


def test_a_due_key_is_absent_to_every_command_and_never_comes_back() -> None:
    ks = Keyspace()
    S.set_(ks, b"k", b"5", {"px": 100}, T0)
    later = T0 + 100
    assert ks.get(b"k", later) is None and ks.state(b"k", later)[0] != PRESENT
    assert S.ttl(ks, b"k", later, True) == -2 and ks.live_count(later) == 0
    assert S.persist(ks, b"k", later)[0] == 0  # does not resurrect it
    assert S.expire(ks, "EXPIRE", b"k", 100, None, later)[0] == 0
    assert S.set_(ks, b"k", b"x", {"xx": True}, later)[0] is None
    assert S.incrby(ks, b"k", 1, later)[0] == 1  # starts from nothing
    assert ks.deadline(b"k") is None  # and has no deadline of the dead key's


def test_getex() -> None:
    ks = Keyspace()
    ks.set(b"k", b"v")
    assert S.getex(ks, b"k", {"ex": 5}, T0)[0] == b"v" and ks.deadline(b"k") == T0 + 5000
    assert S.getex(ks, b"k", {}, T0)[0] == b"v" and ks.deadline(b"k") == T0 + 5000
    assert S.getex(ks, b"k", {"persist": True}, T0)[0] == b"v" and ks.deadline(b"k") is None
    assert S.getex(ks, b"none", {"ex": 5}, T0) == (None, b"")


def test_active_expiry_finds_every_due_key_a_bounded_number_at_a_time() -> None:
    ks = Keyspace()
    for i in range(5000):
        ks.set(b"k%d" % i, b"v", T0 + (i % 50) * 10)
    ks.set(b"forever", b"v")
    ks.commit()
    now = T0 + 1000
    total, rounds = 0, 0
    while True:
        gone, record = ks.expire(now, 700)
        assert gone <= 700
        if not gone:
            break
        total += gone
        rounds += 1
        item = next(iter(wal.LogScan(record or b"")))[1]
        assert item[0] == wal.DELS and len(item[1]) == gone
    assert total == 5000 and rounds >= 5000 // 700
    assert list(ks.data) == [b"forever"] and not ks.expires


def test_the_wheel_does_not_hand_out_a_slot_before_it_ends() -> None:
    w = ExpiryWheel()
    w.add(b"a", T0 + 50)
    assert w.due(T0 + 99, 10) == []  # (T0 is a slot's start: the slot ends at T0 + 100)
    assert w.due(((T0 + 50) // SLOT_MS + 1) * SLOT_MS, 10) == [b"a"]
    assert w.next_due() is None


def test_stale_wheel_entries_are_bounded() -> None:
    ks = Keyspace()
    ks.set(b"k", b"v")
    for i in range(20_000):  # the same key's deadline, set again and again
        ks.set_deadline(b"k", T0 + 10_000_000 + i)
    ks.commit()
    ks.expire(T0, 10)
    assert ks.wheel.entries < 5000


def test_a_rollback_restores_deadlines() -> None:
    ks = Keyspace()
    ks.set(b"k", b"v", T0 + 1000)
    ks.commit()
    mark = ks.mark()
    S.set_(ks, b"k", b"w", {}, T0)
    S.set_(ks, b"n", b"w", {"ex": 1}, T0)
    ks.rollback_to(mark)
    assert ks.get(b"k", T0) == b"v" and ks.deadline(b"k") == T0 + 1000
    assert b"n" not in ks.expires
    assert ks.expire(T0 + 1000 + SLOT_MS, 10)[0] == 1  # still found by active expiry


def test_deadlines_survive_replay_and_snapshots(tmp_path: Path, opened: list[Any]) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1)
    ks = st.keyspace
    for i in range(50):
        st.pending += S.set_(ks, b"t%d" % i, b"v", {"pxat": T0 + 1 + i}, T0)[1]
    st.pending += ks.set(b"plain", b"v")
    st.pending += S.expire(ks, "PEXPIREAT", b"t0", T0 + 777, None, T0)[1]
    st.pending += S.persist(ks, b"t1", T0)[1]
    st.commit()
    want = dict(ks.expires)
    assert want[b"t0"] == T0 + 777 and b"t1" not in want and b"plain" not in want
    st, _ = reopen(st, opened)  # from the log
    assert st.keyspace.expires == want
    st.start_snapshot()
    st.pending += S.set_(st.keyspace, b"after", b"v", {"pxat": T0 + 9}, T0)[1]
    st.commit()
    wait_snapshot_done(st)
    want[b"after"] = T0 + 9
    st, rec = reopen(st, opened)  # from the snapshot and the new segment
    assert rec.snapshot is not None and st.keyspace.expires == want
    assert st.keyspace.expire(T0 + 10_000, 10_000)[0] == len(want)  # the wheel was rebuilt


def test_move_batches_carry_deadlines_and_skip_due_keys() -> None:
    batch = encode_batch("m", "a:1", 0, [b"k", b"v", b"j", b"w"], True, 2, None,
                         [b"k", T0 + 5])
    *_, dels, deadlines, outcomes = decode_batch(batch)
    assert dels == [] and deadlines == {b"k": T0 + 5} and outcomes == []
    with pytest.raises(ProtocolError, match="deadlines"):
        decode_batch(encode_batch("m", "a:1", 0, [], True, 0, None, [b"k", "soon"]))
    dst = Keyspace()
    dst.open_move("m", RangeSet.full())
    taken, _ = dst.absorb("m", [b"k", b"v", b"j", b"w", b"due", b"x"], (),
                          {b"k": T0 + 5, b"due": T0 - 1}, T0)
    assert taken == 2 and dst.deadline(b"k") == T0 + 5 and b"due" not in dst.data


def test_replicated_records_mean_the_same_on_a_replica() -> None:
    primary = Keyspace()
    records = S.set_(primary, b"a", b"1", {"px": 50}, T0)[1]
    records += S.set_(primary, b"b", b"1", {"ex": 50}, T0)[1]
    records += S.persist(primary, b"b", T0)[1]
    records += S.incrby(primary, b"c", 3, T0)[1]
    gone, rec = primary.expire(T0 + 1000, 100)
    records += rec or b""
    replica = Keyspace()
    for _, item in wal.LogScan(records):
        replica.apply_live(item)
    assert gone == 1 and replica.data == primary.data and replica.expires == primary.expires
    assert replayed(records).data == primary.data


def test_a_moving_key_at_the_new_owner_is_unknown_until_filled() -> None:
    ks = Keyspace()
    ks.open_move("m", RangeSet.full())
    assert ks.state(b"k", T0)[0] == UNKNOWN


# -- a model: a dict with deadlines ---------------------------------------------------------
KEYS = [b"a", b"b"]
command = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.sampled_from([b"1", b"x", b"-5"]),
              st.fixed_dictionaries({}, optional={
                  "px": st.integers(1, 300), "nx": st.just(True), "xx": st.just(True),
                  "keepttl": st.just(True), "get": st.just(True)})),
    st.tuples(st.just("incr"), st.sampled_from(KEYS), st.integers(-3, 3)),
    st.tuples(st.just("pexpire"), st.sampled_from(KEYS), st.integers(-10, 300),
              st.sampled_from([None, "NX", "XX", "GT", "LT", "XX GT", "XX LT"])),
    st.tuples(st.just("persist"), st.sampled_from(KEYS)),
    st.tuples(st.just("del"), st.sampled_from(KEYS)),
    st.tuples(st.just("tick"), st.integers(0, 200)),
    st.tuples(st.just("reap"), st.integers(1, 5)),
)


class Model:
    """What Redis's documentation says, written as plainly as possible."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.deadlines: dict[bytes, int] = {}

    def live(self, key: bytes, now: int) -> bytes | None:
        if key in self.deadlines and self.deadlines[key] <= now:
            self.values.pop(key, None)
            self.deadlines.pop(key)
        return self.values.get(key)

    def set(self, key: bytes, value: bytes, opts: dict[str, Any], now: int) -> Any:
        old = self.live(key, now)
        if opts.get("nx") and opts.get("xx"):
            return "invalid"
        if opts.get("nx") and old is not None or opts.get("xx") and old is None:
            return old if opts.get("get") else None
        deadline = now + opts["px"] if "px" in opts else None
        if opts.get("keepttl") and old is not None:
            deadline = self.deadlines.get(key)
        self.values[key] = value
        self.deadlines.pop(key, None)
        if deadline is not None:
            self.deadlines[key] = deadline
        return old if opts.get("get") else "OK"


@settings(max_examples=500, deadline=None)
@given(st.lists(command, min_size=8, max_size=60))
def test_expiry_and_counters_match_a_model(commands: list[Any]) -> None:
    ks, model, now = Keyspace(), Model(), T0
    log = b""
    for cmd in commands:
        kind = cmd[0]
        if kind == "tick":
            now += cmd[1]
            continue
        if kind == "reap":
            _, record = ks.expire(now, cmd[1])
            log += record or b""
            continue
        key = cmd[1]
        old = model.live(key, now)
        if kind == "set":
            opts = cmd[3]
            if ("px" in opts) + ("keepttl" in opts) > 1 or ("nx" in opts) + ("xx" in opts) > 1:
                continue  # refused by the protocol's checks
            got, record = S.set_(ks, key, cmd[2], opts, now)
            assert got == model.set(key, cmd[2], opts, now)
        elif kind == "incr":
            try:
                got, record = S.incrby(ks, key, cmd[2], now)
            except CommandError:
                assert old is not None and S.parse_int(old) is None
                continue
            n = int(old or b"0") + cmd[2]
            model.values[key] = str(n).encode()
            assert got == n
        elif kind == "pexpire":
            got, record = S.expire(ks, "PEXPIRE", key, cmd[2], cmd[3], now)
            current = model.deadlines.get(key)
            new = now + cmd[2]
            flags = set(cmd[3].split()) if cmd[3] else set()
            ok = old is not None and not (
                "NX" in flags and current is not None or "XX" in flags and current is None
                or "GT" in flags and (current is None or new <= current)
                or "LT" in flags and current is not None and new >= current)
            assert got == int(ok)
            if ok:
                model.deadlines[key] = new
                model.live(key, now)
        elif kind == "persist":
            got, record = S.persist(ks, key, now)
            assert got == int(old is not None and key in model.deadlines)
            model.deadlines.pop(key, None)
        else:
            existed, rec = ks.delete(key)
            record = rec or b""
            model.values.pop(key, None)
            model.deadlines.pop(key, None)
        ks.commit()
        log += record
        for k in KEYS:
            assert ks.get(k, now) == model.live(k, now)
            live = model.live(k, now)
            want_ttl = -2 if live is None else (
                -1 if k not in model.deadlines else model.deadlines[k] - now)
            assert S.ttl(ks, k, now, True) == want_ttl
        assert ks.live_count(now) == len([k for k in KEYS if model.live(k, now) is not None])
    # what the log says is what was served, deadlines included
    again = replayed(log)
    for k in KEYS:
        assert again.get(k, now) == ks.get(k, now)
        assert S.ttl(again, k, now, True) == S.ttl(ks, k, now, True)


def test_a_deadline_pushed_later_is_not_taken_at_the_old_one() -> None:
    ks = Keyspace()
    S.set_(ks, b"k", b"v", {"px": 100}, T0)
    S.expire(ks, "PEXPIRE", b"k", 10_000, "GT", T0)  # its old slot's entry stays behind
    ks.commit()
    assert ks.expire(T0 + 1000, 100) == (0, None) and ks.get(b"k", T0 + 1000) == b"v"
    assert ks.expire(T0 + 10_000 + SLOT_MS, 100)[0] == 1


@pytest.mark.parametrize("change", ["persist", "extend"])
def test_a_replica_copying_its_primary_keeps_a_later_deadline_change(change: str) -> None:
    """The copy is taken, then the deadline changes, then the copy's batch arrives:
    the replica holds the key as the primary does now."""
    primary = Keyspace()
    primary.full_records = True  # as a node has it while a replica copies its keys
    S.set_(primary, b"k", b"v", {"px": 1000}, T0)
    primary.commit()
    copy, copy_deadlines = list(primary.data.items()), dict(primary.expires)
    if change == "persist":
        _, record = S.persist(primary, b"k", T0)
    else:
        _, record = S.expire(primary, "EXPIRE", b"k", 3600, None, T0)
    replica = Keyspace()
    replica.open_move("sync:x", RangeSet.full())
    for _, item in wal.LogScan(record):
        replica.apply_live(item)
    later = T0 + 2000  # the copy's deadline has passed when its batch is applied
    replica.absorb("sync:x", [x for kv in copy for x in kv], (), copy_deadlines, later)
    assert replica.get(b"k", later) == primary.get(b"k", later) == b"v"
    assert replica.deadline(b"k") == primary.deadline(b"k")


def test_a_pipeline_write_is_answered_whatever_the_reply_budget(tmp_path: Path) -> None:
    """A GETDEL in a PIPE whose GETs used the budget up: applied, and answered."""
    from zkv.node import Node

    node = Node("127.0.0.1", 1, str(tmp_path / "n"), fsync="no")
    node.recovery = node.storage.open()
    try:
        node.run_body(P.encode_request("SET", b"big", b"x" * 50_000), False)
        node.run_body(P.encode_request("SET", b"k", b"y" * 20_000), False)
        reply = P.decode_reply(node.run_body(P.encode_request(
            "PIPE", [["GET", b"big"], ["GETDEL", b"k"]], 62_000), False))
        assert reply[1] == [P.OK, b"y" * 20_000] and b"k" not in node.storage.keyspace.data
        with pytest.raises(CommandError, match="cannot be used in a pipeline"):
            P.check_pipe_item(["ONCE", b"c", 1, ["MSET", [b"a", b"1"]]])
    finally:
        node.storage.close()


def test_a_rollback_stream_deletes_what_expired_at_the_new_owner() -> None:
    """MOVE ABORT copies the new owner's keys back over the old owner's; one that
    expired there meanwhile must not leave the old owner's older value standing."""
    from zkv.core.transfer import Outgoing, RangeScan

    new_owner, old_owner = Keyspace(), Keyspace()
    S.set_(new_owner, b"k", b"v2", {"px": 100}, T0)  # written during the move
    new_owner.set(b"j", b"w2")
    old_owner.set(b"k", b"v1")  # from before the move
    old_owner.set(b"j", b"w1")
    old_owner.open_move("back", RangeSet.full(), "overwrite")
    out = Outgoing("back", "new:1", "old:1", RangeScan(new_owner.buckets, RangeSet.full()),
                   expired_deletes=True)
    batches = []
    while not out.done:
        batch = out.next_batch(new_owner.data, 0.0, new_owner.expires, T0 + 500)
        if batch is not None:
            batches.append(batch)
    for batch in batches:
        *_, pairs, _, _, dels, deadlines, _ = decode_batch(batch)
        old_owner.absorb("back", pairs, dels, deadlines, T0 + 500)
    assert old_owner.data == {b"j": b"w2"}


@pytest.mark.parametrize("change", ["persist", "extend", "getex"])
def test_a_deadline_change_logs_a_few_bytes_whatever_the_value(change: str) -> None:
    """With no copy under way, EXPIRE, PERSIST and GETEX of a big value log a PXAT
    record of the key and its deadline (not the value again), and replay to the same."""
    ks = Keyspace()
    big = b"x" * (1 << 20)
    S.set_(ks, b"k", big, {"px": 1000}, T0)
    ks.commit()
    if change == "persist":
        _, record = S.persist(ks, b"k", T0)
    elif change == "extend":
        _, record = S.expire(ks, "EXPIRE", b"k", 3600, None, T0)
    else:
        _, record = S.getex(ks, b"k", {"ex": 60}, T0)
    assert len(record) < 64
    again = Keyspace()
    for _, item in wal.LogScan(wal.encode((wal.SET, b"k", big, T0 + 1000)) + record):
        again.apply(item)
    assert again.get(b"k", T0) == big and again.deadline(b"k") == ks.deadline(b"k")


@pytest.mark.parametrize("full", [False, True])
def test_append_logs_the_suffix_and_replays_to_the_same(full: bool) -> None:
    """APPEND of a byte to a big value logs the byte (not the value again) and keeps
    the deadline; while a copy is under way (full_records) it logs the whole key. A
    replay and a replica applying the records get the same key."""
    ks = Keyspace()
    ks.full_records = full
    big = b"x" * (1 << 20)
    log = S.set_(ks, b"k", big, {"px": 5000}, T0)[1]
    ks.commit()
    for piece in (b"y", b"zz"):
        size, record = S.append(ks, b"k", piece, T0, 1 << 24)
        ks.commit()
        assert (len(record) > len(big)) is full
        log += record
    size, record = S.append(ks, b"new", b"v", T0, 1 << 24)  # a missing key: set
    log += record
    assert size == 1 and ks.get(b"k", T0) == big + b"yzz"
    assert ks.deadline(b"k") == T0 + 5000
    replayed_ks, replica = Keyspace(), Keyspace()
    for _, item in wal.LogScan(log):
        replayed_ks.apply(item)
        replica.apply_live(item)
    replica.commit()
    for other in (replayed_ks, replica):
        assert other.get(b"k", T0) == big + b"yzz" and other.get(b"new", T0) == b"v"
        assert other.deadline(b"k") == T0 + 5000 and other.live_bytes == ks.live_bytes
    with pytest.raises(LimitExceeded):
        S.append(ks, b"k", b"!" * 10, T0, len(big) + 3)
