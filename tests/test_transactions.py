"""Transactions (RESP's MULTI/EXEC; zkv's atomic PIPE), without a socket: what RESP
queues and answers (zkv.core.resptxn), how the routing core sends them (one message to the
one node that owns every key, or refused whole), and how a node runs and logs them
(one ATOMIC record: a crash keeps all of their writes or none). Through redis-py and
real processes: tests/test_resp.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_router import (
    A,
    B,
    C,
    Net,
    move_state,
    router_for,
    router_nodes,  # noqa: F401 - the fixture "nodes"
    state,
)

from zkv.core import protocol as P
from zkv.core import resp, wal
from zkv.core.keyspace import Keyspace
from zkv.core.placement import Placement
from zkv.core.resptxn import EXECABORT, QUEUED
from zkv.errors import CrossNode, ProtocolError, ZkvError
from zkv.node import Node
from zkv.waltool import lines_of


def keys_on_two_nodes(st: Any) -> tuple[bytes, bytes]:
    p = Placement(st)
    first = b"k0"
    for i in range(1, 200):
        other = b"k%d" % i
        if p.owner(other) != p.owner(first):
            return first, other
    raise AssertionError("every key on one node")


# -- the node --------------------------------------------------------------------------
def test_a_node_logs_an_atomic_pipeline_as_one_record(tmp_path: Path) -> None:
    node = Node("127.0.0.1", 1, str(tmp_path / "n"), fsync="no")
    node.recovery = node.storage.open()
    try:
        node.run_body(P.encode_request("SET", b"text", b"abc"), False)
        node.storage.commit()
        body = P.encode_request("PIPE", [["SET", b"a", b"1"], ["INCR", b"n"], ["INCR", b"text"],
                                         ["GET", b"a"], ["DEL", b"gone"]], None, True)
        pending = node.storage.pending
        start = len(pending)
        got = P.decode_reply(node.run_body(body, False))
        assert got[0] == [P.OK, "OK"] and got[1] == [P.OK, 1] and got[2][0] == P.ERR
        assert got[3] == [P.OK, b"1"] and got[4] == [P.OK, 0]  # an error undoes nothing
        records = [item for _, item in wal.LogScan(bytes(pending[start:]))]
        assert [r[0] for r in records] == [wal.ATOMIC]
        inner = [item[0] for _, item in wal.LogScan(records[0][1])]
        assert wal.SET in inner or wal.MSET in inner
        node.storage.commit()
    finally:
        node.storage.close()
    again = Node("127.0.0.1", 1, str(tmp_path / "n"), fsync="no")
    again.recovery = again.storage.open()
    try:
        ks = again.storage.keyspace
        assert ks.get(b"a", 0) == b"1" and ks.get(b"n", 0) == b"1"
        assert ks.get(b"text", 0) == b"abc"
    finally:
        again.storage.close()


def test_a_torn_atomic_record_loses_every_write_of_it() -> None:
    inner = (wal.encode((wal.SET, b"a", b"1")) + wal.encode((wal.MSET, [b"b", b"2"]))
             + wal.encode((wal.DEL, b"c")))
    record = wal.encode((wal.ATOMIC, inner))
    before = wal.encode((wal.SET, b"c", b"old"))
    ks = Keyspace()
    ks.replay(wal.LogScan(before + record[:-3]))
    assert ks.data == {b"c": b"old"}  # none of it: not the SET of a alone
    ks = Keyspace()
    ks.replay(wal.LogScan(before + record))
    assert ks.data == {b"a": b"1", b"b": b"2"}


def test_a_replica_applies_an_atomic_record_whole() -> None:
    ks = Keyspace()
    ks.apply_live((wal.ATOMIC, wal.encode((wal.MSET, [b"x", b"1", b"y", b"2"]))))
    ks.commit()
    assert ks.data == {b"x": b"1", b"y": b"2"}


def test_an_atomic_record_carries_data_records_only() -> None:
    meta = wal.encode((wal.META, {"open": "m", "ranges": []}))
    for bad in ((wal.ATOMIC, meta), (wal.ATOMIC, wal.encode((wal.ATOMIC, b""))),
                (wal.ATOMIC, b"not records"), (wal.ATOMIC, 7)):
        with pytest.raises((ValueError, TypeError)):
            Keyspace().apply(bad)


def test_wal_dump_shows_what_an_atomic_record_holds() -> None:
    inner = wal.encode((wal.SET, b"a", b"1")) + wal.encode((wal.DEL, b"b"))
    assert list(lines_of([wal.ATOMIC, inner])) == ["ATOMIC", '  SET "a" "1"', '  DEL "b"']


# -- the routing core ------------------------------------------------------------------
def test_an_atomic_pipe_goes_whole_to_the_one_owner(nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B, C])
    net.config(s1)
    r = router_for(s1)
    keys = [b"{user7}:%d" % i for i in range(20)]
    owner = Placement(s1).owner(keys[0])
    commands = [["SET", k, b"v"] for k in keys] + [["INCR", keys[0]], ["PING"]]
    [got] = net.run(r, [["PIPE", commands, None, True]])
    assert got[:20] == [[P.OK, "OK"]] * 20 and got[20][0] == P.ERR and got[21] == [P.OK, "PONG"]
    assert [name for name, _ in net.sent] == [owner]  # one envelope, to the owner
    assert all(nodes[owner].storage.keyspace.data[k] == b"v" for k in keys)


def test_an_atomic_pipe_across_nodes_is_refused_and_nothing_runs(
        nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B, C])
    net.config(s1)
    r = router_for(s1)
    a, b = keys_on_two_nodes(s1)
    [got] = net.run(r, [["PIPE", [["SET", a, b"1"], ["SET", b, b"2"]], None, True]])
    assert got[0] == "ERR" and got[1] == "CROSS_NODE"
    assert net.sent == [] and not any(n.storage.keyspace.data for n in nodes.values())
    # not atomic: the same commands are split between their nodes, as always
    assert net.run(r, [["PIPE", [["SET", a, b"1"], ["SET", b, b"2"]]]]) == [
        [[P.OK, "OK"], [P.OK, "OK"]]]


def test_an_atomic_pipe_of_a_moving_key_is_refused_and_nothing_runs(
        nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B])
    copy = move_state(s1, [A, B, C], "copy", 2, members=[A, B, C])
    net.config(copy)
    r = router_for(copy)
    p = Placement(copy)
    moving = next(b"k%d" % i for i in range(500) if p.moving_key(b"k%d" % i))
    [got] = net.run(r, [["PIPE", [["SET", moving, b"1"]], None, True]])
    assert got[0] == "ERR" and got[1] == "UNAVAILABLE"
    assert net.sent == [] and not any(n.storage.keyspace.data for n in nodes.values())


def test_a_stale_router_sends_a_transaction_again_by_the_new_epoch(
        nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1, s2 = state(1, [A, B]), state(2, [A, B, C])
    net.config(s2)  # the nodes are at 2 (C joined, nothing to move in this script)
    r = router_for(s1)
    key = next(b"t%d" % i for i in range(500) if Placement(s2).owner(b"t%d" % i) == C)
    [got] = net.run(r, [["PIPE", [["SET", key, b"1"], ["GET", key]], None, True]],
                    configs={2: s2})
    assert got == [[P.OK, "OK"], [P.OK, b"1"]]
    assert nodes[C].storage.keyspace.data == {key: b"1"}


def test_atomic_takes_true_or_false_only() -> None:
    assert P.check_request(["PIPE", [["PING"]], None, True])[1][2] is True
    with pytest.raises(ProtocolError, match="atomic"):
        P.check_request(["PIPE", [["PING"]], None, 1])


# -- RESP: MULTI, EXEC, DISCARD --------------------------------------------------------
def ctx() -> resp.Context:
    return resp.Context(P.DEFAULT_LIMITS, resp.Cursors(), False, None)


def run(session: resp.Session, *words: bytes) -> Any:
    return resp.plan_command(session, list(words), ctx())


def answer(plan: Any, items: list[Any], session: resp.Session) -> bytes:
    assert isinstance(plan, resp.Forward) and plan.op == "PIPE" and plan.args[2] is True
    return plan.shape(items, session)  # type: ignore[no-any-return]


def test_queued_commands_become_one_atomic_pipe_and_one_array() -> None:
    s = resp.Session(1)
    assert run(s, b"MULTI").data == resp.OK
    for words in ([b"SET", b"{u}a", b"1"], [b"INCR", b"{u}a"], [b"MGET", b"{u}a", b"{u}b"],
                  [b"DEL", b"{u}a", b"{u}b"], [b"PING"], [b"MSET", b"{u}c", b"x"]):
        assert run(s, *words).data == QUEUED
    plan = run(s, b"EXEC")
    assert s.multi is None
    assert plan.args[0] == [["SET", b"{u}a", b"1"], ["INCR", b"{u}a"], ["GET", b"{u}a"],
                            ["GET", b"{u}b"], ["DEL", b"{u}a"], ["DEL", b"{u}b"],
                            ["SET", b"{u}c", b"x"]]
    items = [[P.OK, "OK"], [P.OK, 2], [P.OK, b"2"], [P.OK, None], [P.OK, 1], [P.OK, 0],
             [P.OK, "OK"]]
    assert answer(plan, items, s) == (b"*6\r\n+OK\r\n:2\r\n*2\r\n$1\r\n2\r\n$-1\r\n:1\r\n"
                                      b"+PONG\r\n+OK\r\n")


def test_an_error_inside_answers_in_its_place() -> None:
    s = resp.Session(1)
    run(s, b"MULTI")
    run(s, b"INCR", b"k")
    run(s, b"GET", b"k")
    plan = run(s, b"EXEC")
    items = [[P.ERR, "BAD_COMMAND", "value is not an integer"], [P.OK, b"text"]]
    assert answer(plan, items, s) == (b"*2\r\n-ERR value is not an integer\r\n"
                                      b"$4\r\ntext\r\n")
    # refused whole (nothing ran): the error, as EXEC's answer
    assert plan.shape(CrossNode("keys on 2 nodes"), s) == b"-CROSSSLOT keys on 2 nodes\r\n"


def test_a_command_refused_while_queueing_aborts_exec() -> None:
    for bad in ([b"NOPE"], [b"GET"], [b"SCAN", b"0"], [b"SELECT", b"0"], [b"MSETNX", b"k",
                                                                            b"x"]):
        s = resp.Session(1)
        run(s, b"MULTI")
        run(s, b"SET", b"k", b"1")
        assert run(s, *bad).data[:1] == b"-", bad
        assert run(s, b"GET", b"k").data == QUEUED  # queueing goes on, as on Redis
        assert run(s, b"EXEC").data == resp.error(EXECABORT)
        assert s.multi is None and not s.multi_failed  # and the next one starts afresh
        run(s, b"MULTI")
        assert isinstance(run(s, b"EXEC"), resp.Reply)


def test_multi_exec_discard_and_watch_misused() -> None:
    s = resp.Session(1)
    assert run(s, b"EXEC").data == resp.error("ERR EXEC without MULTI")
    assert run(s, b"DISCARD").data == resp.error("ERR DISCARD without MULTI")
    assert run(s, b"WATCH", b"k").data.startswith(b"-ERR WATCH is not supported")
    assert run(s, b"UNWATCH").data == resp.OK
    run(s, b"MULTI")
    assert run(s, b"MULTI").data == resp.error("ERR MULTI calls can not be nested")
    assert run(s, b"WATCH", b"k").data == resp.error("ERR WATCH inside MULTI is not allowed")
    run(s, b"SET", b"k", b"1")
    assert run(s, b"DISCARD").data == resp.OK and s.multi is None
    assert isinstance(run(s, b"GET", b"k"), resp.Forward)  # not queued any more
    run(s, b"MULTI")
    assert run(s, b"EXEC").data == b"*0\r\n"
    run(s, b"MULTI")
    run(s, b"PING")
    run(s, b"ECHO", b"hi")
    assert run(s, b"EXEC").data == b"*2\r\n+PONG\r\n$2\r\nhi\r\n"
    run(s, b"MULTI")
    run(s, b"RESET")  # as on Redis: the transaction goes with the rest of the state
    assert s.multi is None


def test_a_transaction_is_bounded_by_the_batch_limit() -> None:
    s = resp.Session(1)
    c = resp.Context(P.Limits(max_batch=4), resp.Cursors(), False, None)
    resp.plan_command(s, [b"MULTI"], c)
    assert resp.plan_command(s, [b"MSET", b"a", b"1", b"b", b"2", b"c", b"3"], c).data == QUEUED
    assert resp.plan_command(s, [b"DEL", b"a", b"b"], c).data[:1] == b"-"
    assert resp.plan_command(s, [b"EXEC"], c).data == resp.error(EXECABORT)


def test_what_waits_for_exec_is_bounded_by_max_message_bytes() -> None:
    """Queued commands are held at the proxy until EXEC: no more of them than the one
    message EXEC becomes may carry, however many a client sends."""
    s = resp.Session(1)
    c = resp.Context(P.Limits(max_key_bytes=1024, max_value_bytes=32 << 10,
                              max_message_bytes=64 << 10), resp.Cursors(), False, None)
    resp.plan_command(s, [b"MULTI"], c)
    value = b"x" * (16 << 10)
    answers = [resp.plan_command(s, [b"SET", b"k%d" % i, value], c).data for i in range(8)]
    assert answers[:3] == [QUEUED] * 3 and answers[4:] == [answers[4]] * 4
    assert answers[4].startswith(b"-ERR a transaction is at most 65536 bytes")
    assert s.multi_bytes < 64 << 10
    assert resp.plan_command(s, [b"EXEC"], c).data == resp.error(EXECABORT)
    assert s.multi is None


def test_a_node_refuses_an_atomic_pipe_whole(nodes: dict[str, Node]) -> None:
    """Sent straight to a node (a direct client, say), an atomic PIPE with one key the
    node does not own, or one item a PIPE cannot carry, runs nothing at all."""
    net = Net(nodes)
    s1 = state(1, [A, B, C])
    net.config(s1)
    ours, other = keys_on_two_nodes(s1)
    node = nodes[Placement(s1).owner(ours)]
    for commands, code in (([["SET", ours, b"1"], ["SET", other, b"2"]], "MOVED"),
                           ([["SET", ours, b"1"], ["MGET", [ours]]], "BAD_COMMAND")):
        body = P.encode_request("PIPE", commands, None, True)
        with pytest.raises(ZkvError) as err:
            P.decode_reply(node.run_body(body, True))
        assert err.value.code == code
        node.storage.commit()
        assert ours not in node.storage.keyspace.data


def test_constant_replies_count_against_the_bounds_too() -> None:
    s = resp.Session(1)
    c = resp.Context(P.Limits(max_batch=5, max_key_bytes=1024, max_value_bytes=32 << 10,
                              max_message_bytes=64 << 10), resp.Cursors(), False, None)
    resp.plan_command(s, [b"MULTI"], c)
    answers = [resp.plan_command(s, [b"PING"], c).data for _ in range(6)]
    assert answers[:5] == [QUEUED] * 5 and answers[5].startswith(b"-ERR a transaction is")
    resp.plan_command(s, [b"DISCARD"], c)
    resp.plan_command(s, [b"MULTI"], c)
    echo = [resp.plan_command(s, [b"ECHO", b"x" * (20 << 10)], c).data for _ in range(3)]
    assert echo[:1] == [QUEUED] and echo[2].startswith(b"-ERR a transaction is at most")


def test_bad_arguments_answer_in_place_at_exec_as_on_redis() -> None:
    """Redis aborts a transaction for an unknown command or a wrong number of words;
    a command whose arguments are wrong is queued, and its error is its answer."""
    s = resp.Session(1)
    run(s, b"MULTI")
    assert run(s, b"SET", b"{a}x", b"1", b"EX", b"-5").data == QUEUED
    assert run(s, b"EXPIRE", b"{a}x", b"abc").data == QUEUED
    assert run(s, b"SET", b"{a}y", b"1").data == QUEUED
    plan = run(s, b"EXEC")
    assert isinstance(plan, resp.Forward) and plan.args[0] == [["SET", b"{a}y", b"1"]]
    out = answer(plan, [[P.OK, "OK"]], s)
    assert out.startswith(b"*3\r\n-ERR ") and out.endswith(b"+OK\r\n")
    assert out.count(b"\r\n-ERR ") == 2


def test_exec_with_words_ends_the_transaction() -> None:
    s = resp.Session(1)
    run(s, b"MULTI")
    run(s, b"SET", b"k", b"1")
    assert run(s, b"EXEC", b"x").data == resp.error(
        "EXECABORT Transaction discarded because of: wrong number of arguments for "
        "'exec' command")
    assert s.multi is None and isinstance(run(s, b"SET", b"k", b"2"), resp.Forward)
