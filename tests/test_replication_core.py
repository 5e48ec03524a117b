"""The replication core (zkv.core.replication) and its data, without a socket: what a
primary may answer and when, what a replica accepts, and what the config manager
decides from the reports it gets."""

from __future__ import annotations

from typing import Any

import pytest

from zkv.core import wal
from zkv.core.cluster import ClusterState
from zkv.core.keyspace import Keyspace
from zkv.core.replication import BEACON, GRACE, LAG, LEASE, RESYNC, Primary, Replica, plan, promote
from zkv.errors import ClusterError
from zkv.replicator import split_records

A, B, C = "127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"


def primary(in_sync: list[str], replicas: list[str] | None = None, now: float = 0.0,
            synced: bool = True) -> Primary:
    """A primary whose out-of-sync replicas have sync sessions, and whose in-sync ones
    have sessions that caught up (as after a join)."""
    p = Primary("S", "run", now)
    replicas = replicas if replicas is not None else in_sync
    p.configure(replicas, [])
    for addr in replicas:
        msg = p.start_session(addr, now)
        assert msg["sync"] and msg["seq"] == 0
        assert p.ack(addr, msg["session"], 0, synced, now) is False  # not in sync yet
    p.configure(replicas, in_sync)
    return p


def test_a_turn_is_answered_only_once_every_in_sync_replica_holds_it() -> None:
    p = primary([A, B])
    sends = p.ship(b"records", 1.0)
    assert sorted(a for a, _ in sends) == [A, B]
    assert all(m["data"] == b"records" and m["seq"] == 1 for _, m in sends)
    assert p.committed() < p.lsn  # nobody has acknowledged it
    assert p.ack(A, sends[0][1]["session"], 1, True, 1.1)
    assert p.committed() < p.lsn  # B still owes it
    p.ack(B, sends[1][1]["session"], 1, True, 1.1)
    assert p.committed() == p.lsn


def test_an_acknowledgement_of_an_old_session_or_a_bad_seq_counts_for_nothing() -> None:
    p = primary([A])
    p.ship(b"r", 1.0)
    assert not p.ack(A, "another-session", 1, True, 1.0)
    assert not p.ack(A, p.peers[A].session, "1", True, 1.0)
    assert p.committed() < p.lsn


def test_a_replica_out_of_sync_does_not_hold_answers_back() -> None:
    p = primary([A], [A, B])
    sends = dict(p.ship(b"r", 1.0))
    assert set(sends) == {A, B}  # B is shipped to (it is catching up)...
    p.ack(A, sends[A]["session"], sends[A]["seq"], True, 1.0)
    assert p.committed() == p.lsn  # ...but nobody waits for it
    assert p.copies() == 2


def test_the_lease_runs_from_the_send_time_of_the_newest_acknowledged_message() -> None:
    p = primary([A], now=0.0)
    msg = dict(p.ship(b"r", 10.0))[A]
    assert not p.lease_ok(10.0)  # acknowledged only at time 0 (the sync)
    p.ack(A, msg["session"], msg["seq"], True, 10.9)  # acked late: the lease is from 10.0
    assert p.lease_ok(10.0 + LEASE - 0.01)
    assert not p.lease_ok(10.0 + LEASE + 0.01)
    assert primary([], [A]).lease_ok(1e9)  # nobody in sync: no lease to hold


def test_a_silent_in_sync_replica_is_reported_and_a_caught_up_one_offered() -> None:
    p = primary([A], [A, B])
    sends = dict(p.ship(b"r", 5.0))
    p.ack(B, sends[B]["session"], sends[B]["seq"], True, 5.0)
    report = p.report(5.0 + LAG / 2)
    assert report["laggards"] == [] and report["caught_up"] == [B]
    report = p.report(5.0 + LAG + 0.01)
    assert report["laggards"] == [A]
    assert report["state"] == {A: "in_sync", B: "synced"}


def test_a_restarted_primary_cannot_answer_for_its_in_sync_replicas() -> None:
    """A new run has no session with a replica the configuration calls in sync: it may
    not hold what this run logged, so the primary has no lease and reports it."""
    p = Primary("S", "run2", 0.0)
    p.configure([A], [A])
    assert p.committed() == -1 and not p.lease_ok(0.0)
    assert p.report(0.0)["laggards"] == [A]
    assert p.ship(b"r", 0.0) == []  # nothing to ship it: no session
    beacons, restart = p.tick(10.0)
    assert beacons == [] and restart == []  # in sync: the config manager decides first


def test_idle_replicas_get_beacons_and_stale_sessions_restart() -> None:
    p = primary([A], [A, B])
    beacons, restart = p.tick(BEACON / 2)
    assert beacons == [] and restart == []
    beacons, restart = p.tick(BEACON + 0.01)
    assert sorted(a for a, _ in beacons) == [A, B]
    assert all(m["data"] == b"" for _, m in beacons)
    p.refused(B, p.peers[B].session, "gap")
    _, restart = p.tick(RESYNC)
    assert restart == [B]  # out of sync and broken: a new sync session
    old = p.peers[B].session
    assert p.start_session(B, RESYNC)["session"] != old


def test_too_many_unacknowledged_messages_break_a_session() -> None:
    p = primary([], [A])
    for i in range(10_001):
        p.ship(b"r", float(i))
    assert p.peers[A].broken


def test_a_replica_follows_one_session_in_order() -> None:
    r = Replica(started=0.0)
    assert "no session" in r.accept({"session": "s1", "seq": 1}, 1.0)
    assert r.accept({"session": "s1", "seq": 0, "sync": True}, 1.0) == ""
    assert r.accept({"session": "s1", "seq": 1}, 1.1) == ""
    assert "arrived where 2" in r.accept({"session": "s1", "seq": 3}, 1.2)
    assert "no session" in r.accept({"session": "s1", "seq": 4}, 1.3)  # it ended
    assert r.silent(1.1 + GRACE) == pytest.approx(GRACE)
    assert r.accept({"session": "s2", "seq": 0, "sync": True}, 2.0) == ""
    assert r.accept({"session": 5, "seq": 0}, 2.0)  # malformed
    # a session that ended (damaged data) leaves none: "" is no session to continue
    r.session, r.synced = "", True
    assert "no session" in r.accept({"session": "", "seq": r.next_seq}, 2.1)


def test_a_replica_told_its_primary_stepped_down_serves_at_once_when_promoted() -> None:
    p = primary([A, B], [A, B, C])
    p.refused(C, p.peers[C].session, "gone")  # a broken session is told nothing
    r = Replica(started=0.0)
    assert r.accept({"session": p.peers[A].session, "seq": 0, "sync": True}, 1.0) == ""
    assert r.serves_from() == pytest.approx(1.0 + LEASE)  # the primary's lease may run
    farewell = dict(p.resign())
    assert set(farewell) == {A, B}
    assert farewell[A]["resign"] is True and farewell[A]["data"] == b""
    assert not r.resign({**farewell[A], "session": "another"})  # not the one it follows
    assert not r.resign({**farewell[A], "session": 3})
    assert r.serves_from() == pytest.approx(1.0 + LEASE)
    assert r.resign(farewell[A])
    assert r.serves_from() == float("-inf")
    # a new session (a new primary's) is not vouched for by the old one's farewell
    assert r.accept({"session": "next", "seq": 0, "sync": True}, 5.0) == ""
    assert r.serves_from() == pytest.approx(5.0 + LEASE)


def state(primary_: str = A, replicas: list[str] | None = None,
          in_sync: list[str] | None = None) -> ClusterState:
    replicas = [B] if replicas is None else replicas
    base = ClusterState(7, {"S": 1.0, "T": 1.0}, 16)
    return base.with_shard("S", primary_, replicas, replicas if in_sync is None else in_sync)


def test_the_manager_drops_a_laggard_and_adds_a_caught_up_replica() -> None:
    s = state(in_sync=[B], replicas=[B, C])
    new = plan(s, "S", True, {A: {"role": "primary", "laggards": [B], "caught_up": [C]}})
    assert new is not None and new.epoch == s.epoch + 1
    assert new.shards["S"]["in_sync"] == []  # one change at a time: the drop first
    joins = {A: {"role": "primary", "laggards": [], "caught_up": [C]},
             C: {"role": "replica", "primary": A}}
    assert plan(new, "S", True, {A: joins[A]}) is None  # (once it answers itself)
    new2 = plan(new, "S", True, joins)
    assert new2 is not None and new2.shards["S"]["in_sync"] == [C]
    assert plan(new2, "S", True, {A: {"role": "primary", "laggards": [],
                                      "caught_up": []}}) is None


def test_the_manager_promotes_only_a_silent_in_sync_replica_of_a_dead_primary() -> None:
    s = state()
    silent = {B: {"role": "replica", "primary": A, "silent": GRACE + 0.1}}
    assert plan(s, "S", True, silent) is None  # the primary answers: no promotion
    assert plan(s, "S", False, {B: {**silent[B], "silent": GRACE - 0.1}}) is None
    assert plan(s, "S", False, {B: {**silent[B], "primary": C}}) is None  # another's
    assert plan(state(in_sync=[]), "S", False, silent) is None  # not in sync
    new = plan(s, "S", False, silent)
    assert new is not None
    assert new.shards["S"] == {"primary": B, "replicas": [A], "in_sync": []}
    assert new.primary("S") == B and new.nodes_of("S") == [B, A]


def test_promotion_keeps_every_other_node_as_a_replica_out_of_sync() -> None:
    s = state(replicas=[B, C])
    new = promote(s, "S", C)
    assert new.shards["S"] == {"primary": C, "replicas": [A, B], "in_sync": []}
    assert new.link_keys() == {"S": C, "T": "T", "@" + A: A, "@" + B: B}
    assert new.shard_of(A) == "S" and new.shard_of("T") == "T" and new.shard_of(C) == "S"
    assert new.shard_of("127.0.0.1:1") is None


def test_the_configuration_keeps_its_shards_and_refuses_damaged_ones() -> None:
    s = state()
    again = ClusterState.from_json(s.to_json(), "test")
    assert again == s
    plain = ClusterState(1, {"S": 1.0}, 16)
    assert "shards" not in plain.to_json()  # an unreplicated cluster's file is unchanged
    for bad in ({"S": {"primary": A, "replicas": [B], "in_sync": [C]}},
                {"S": {"primary": A, "replicas": [A], "in_sync": []}},
                {"S": {"primary": 5, "replicas": [], "in_sync": []}},
                {"S": []}):
        doc: dict[str, Any] = {**s.to_json(), "shards": bad}
        with pytest.raises(ClusterError, match="shards"):
            ClusterState.from_json(doc, "test")
    with pytest.raises(ClusterError, match="min_in_sync"):
        ClusterState.from_json({**s.to_json(), "min_in_sync": 0}, "test")


def test_records_ship_in_pieces_cut_at_record_boundaries() -> None:
    records = [wal.encode((wal.SET, b"k%d" % i, b"x" * (i * 10))) for i in range(50)]
    data = b"".join(records)
    pieces = split_records(data, 1000)
    assert b"".join(pieces) == data
    assert len(pieces) > 1
    for piece in pieces:
        scan = wal.LogScan(piece)
        found = list(scan)
        assert found and scan.damage is None
        assert len(piece) <= 1000 or len(found) == 1  # over the limit: one big record
    big = wal.encode((wal.SET, b"big", b"y" * 5000))
    assert split_records(records[0] + big + records[1], 1000) == [records[0], big, records[1]]


def test_a_replica_applies_shipped_records_as_live_changes() -> None:
    """What a primary logs, applied at a replica, gives the same data, with scans'
    buckets kept and a failed commit undone."""
    src, dst = Keyspace(), Keyspace()
    records = b"".join([src.set(b"a", b"1"), src.set(b"b", b"2"), src.mset([b"c", b"3"]),
                        src.delete(b"a")[1] or b"", src.forget([b"b"]) or b""])
    src.commit()
    for _, item in wal.LogScan(records):
        dst.apply_live(item)
    assert dst.data == src.data == {b"c": b"3"}
    assert sorted(k for bucket in dst.buckets.lists for k in bucket) == [b"c"]
    dst.rollback()  # a commit that failed: back to nothing
    assert dst.data == {} and dst.live_bytes == 0
    with pytest.raises((TypeError, ValueError)):
        dst.apply_live((wal.SET, "text", b"v"))
    with pytest.raises(ValueError):
        dst.apply_live((99, b"k"))


def test_a_replica_whose_session_broke_before_it_joined_cannot_vouch_for_anything() -> None:
    """Reported caught up, then its session broke (or a new one began) before the new
    configuration reached the primary: in the in-sync set it counts as broken, so it
    is reported and leaves again, and nothing is acknowledged on its word."""
    p = primary([], [A])
    assert p.report(0.0)["caught_up"] == [A]
    p.refused(A, p.peers[A].session, "gap")
    p.start_session(A, 5.0)  # a new sync: its copy is not complete
    p.configure([A], [A])
    assert p.peers[A].broken and p.report(5.0)["laggards"] == [A]
    p.ship(b"r", 5.0)
    assert p.committed() < p.lsn and not p.lease_ok(5.0)


def test_a_restarted_primary_hands_over_to_an_answering_in_sync_replica() -> None:
    """It may have lost the tail of its log (fsync everysec, power loss): the replica
    holding every acknowledged write is promoted; with none answering, the replica
    leaves the in-sync set instead and the primary carries on."""
    s = state()
    fresh = Primary("S", "run2", 0.0)
    fresh.configure([B], [B])
    mine = fresh.report(0.0)
    assert mine["fresh"] == [B]
    replica = {"role": "replica", "primary": A, "silent": 0.1}
    new = plan(s, "S", True, {A: mine, B: replica})
    assert new is not None and new.primary("S") == B and new.shards["S"]["in_sync"] == []
    alone = plan(s, "S", True, {A: mine})
    assert alone is not None and alone.primary("S") == A
    assert alone.shards["S"]["in_sync"] == []


def test_malformed_reports_change_nothing() -> None:
    s = state()
    for report in ({"role": "primary", "laggards": "B", "caught_up": 5, "fresh": None},
                   {"role": "primary", "laggards": [7, None]}, {"role": 3}, {}):
        assert plan(s, "S", True, {A: report, B: {"role": "replica", "silent": "x"}}) is None
    assert plan(s, "S", False, {B: {"role": "replica", "primary": A, "silent": "x"}}) is None


def test_unacknowledged_bytes_are_bounded_too() -> None:
    p = primary([], [A])
    for _ in range(20):
        p.ship(b"x" * (16 << 20), 1.0)
    assert "bytes" in p.peers[A].broken


# -- data directory identities: a node restarted on an empty or other directory -------------
def with_ids(ids: dict[str, str], in_sync: list[str] | None = None) -> ClusterState:
    s = state(in_sync=in_sync)
    return s.with_shard("S", A, [B], s.shards["S"]["in_sync"], ids)


def test_a_joining_replica_and_the_copies_already_counted_on_get_their_ids_recorded() -> None:
    fresh = state(in_sync=[])
    mine = {"role": "primary", "caught_up": [], "sessions": {B: "run-1"}, "data_id": "aa"}
    # a shard new, or from before ids: its primary's copy as it is now
    s = plan(fresh, "S", True, {A: mine})
    assert s is not None and s.shards["S"]["ids"] == {A: "aa"}
    assert plan(s, "S", True, {A: mine}) is None  # nothing more to do
    mine["caught_up"] = [B]
    other_session = {B: {"role": "replica", "primary": A, "session": "run-2", "data_id": "bb"}}
    # a replica that restarted since the copy it made was complete does not join with it
    assert plan(s, "S", True, {A: mine, **other_session}) is None
    joined = plan(s, "S", True, {A: mine, B: {**other_session[B], "session": "run-1"}})
    assert joined is not None and joined.shards["S"]["in_sync"] == [B]
    assert joined.shards["S"]["ids"] == {A: "aa", B: "bb"}
    again = ClusterState.from_json(joined.to_json(), "test")
    assert again == joined


def test_a_primary_on_another_directory_is_replaced_by_an_answering_replica_or_kept_out() -> None:
    s = with_ids({A: "aa", B: "bb"})
    wiped = {"role": "primary", "laggards": [B], "fresh": [B], "data_id": "ff"}
    # B is down: the wiped primary's report must not shrink the in-sync set (its
    # replicas would then sync from an empty copy); the shard waits
    assert plan(s, "S", True, {A: wiped}) is None
    assert plan(s, "S", True, {A: {"role": "lost", "data_id": "ff"}}) is None
    # B answers with its own directory: it takes over at once
    b = {B: {"role": "replica", "primary": A, "silent": 0.1, "data_id": "bb"}}
    new = plan(s, "S", True, {A: wiped, **b})
    assert new is not None and new.primary("S") == B and new.shards["S"]["ids"] == {B: "bb"}
    # B answers, but from a directory of its own that is not the copy: nobody
    assert plan(s, "S", True, {A: wiped, B: {**b[B], "data_id": "ee"}}) is None


def test_an_in_sync_replica_on_another_directory_leaves_the_set_and_is_never_promoted() -> None:
    s = with_ids({A: "aa", B: "bb"})
    fine = {"role": "primary", "laggards": [], "data_id": "aa"}
    other = {"role": "replica", "primary": A, "silent": GRACE + 1, "data_id": "ee"}
    dropped = plan(s, "S", True, {A: fine, B: other})
    assert dropped is not None and dropped.shards["S"]["in_sync"] == []
    assert dropped.shards["S"]["ids"] == {A: "aa"}  # (only the copies counted on)
    assert plan(s, "S", False, {B: other}) is None  # the primary is dead: still not B
    new = plan(s, "S", False, {B: {**other, "data_id": "bb"}})
    assert new is not None and new.primary("S") == B


def test_a_forced_promotion_records_the_new_copy() -> None:
    s = with_ids({A: "aa", B: "bb"})
    same = promote(s, "S", A, "a2")  # the primary itself, on a new directory, adopted
    assert same.shards["S"] == {"primary": A, "replicas": [B], "in_sync": [],
                                "ids": {A: "a2"}}
    other = promote(s, "S", B, "b2")
    assert other.shards["S"] == {"primary": B, "replicas": [A], "in_sync": [],
                                 "ids": {B: "b2"}}


def test_damaged_ids_in_a_configuration_are_refused() -> None:
    s = with_ids({A: "aa", B: "bb"})
    for ids in ({A: "not hex"}, {"127.0.0.1:1": "aa"}, [A], {A: 7}):
        doc = s.to_json()
        doc["shards"]["S"] = {**doc["shards"]["S"], "ids": ids}
        with pytest.raises(ClusterError, match="ids"):
            ClusterState.from_json(doc, "test")
