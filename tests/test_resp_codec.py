"""The RESP codec (zkv.core.resp), without a socket: reading commands, planning them,
writing replies. Replies are checked by parsing them back with hiredis, the parser
Redis clients use."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zkv.core import protocol as P
from zkv.core import resp
from zkv.errors import (
    CommandError,
    LimitExceeded,
    NodeUnavailable,
    StorageError,
    Timeout,
    Unavailable,
)

STREAM = (b"*3\r\n$3\r\nSET\r\n$3\r\nk\x001\r\n$4\r\na\r\nb\r\n"  # binary key, CRLF in value
          b"PING\r\n"
          b'GET "x y" \'z\'\r\n'
          b"*0\r\n"
          b"*1\r\n$4\r\nPING\r\n")
COMMANDS = [[b"SET", b"k\x001", b"a\r\nb"], [b"PING"], [b"GET", b"x y", b"z"], [b"PING"]]


def reader(max_args: int = 100, max_bulk: int = 1000, max_request: int = 10_000) -> Any:
    return resp.RespReader(max_args, max_bulk, max_request)


def parse(data: bytes) -> Any:
    r = hiredis.Reader()
    r.feed(data)
    out = r.gets()
    assert r.gets() is False, "one reply, nothing after it"
    return out


def test_reads_a_stream_whole_byte_by_byte_and_with_trailing_data() -> None:
    assert reader().feed(STREAM) == COMMANDS
    r, out = reader(), []
    for i in range(len(STREAM)):
        out += r.feed(STREAM[i : i + 1])
    assert out == COMMANDS
    r = reader()
    assert r.feed(STREAM + b"*2\r\n$3\r\nGET\r\n$1") == COMMANDS  # a command begun
    assert r.buffered == len(b"*2\r\n$3\r\nGET\r\n$1")
    assert r.feed(b"0\r\n0123456789\r\n") == [[b"GET", b"0123456789"]]
    assert r.buffered == 0


def test_feed_limit_leaves_the_rest_buffered_in_order() -> None:
    r = reader()
    assert r.feed(STREAM, limit=1) == COMMANDS[:1]
    assert r.feed(b"", limit=2) == COMMANDS[1:3]
    assert r.feed(b"") == COMMANDS[3:]


@pytest.mark.parametrize("data, says", [
    (b"*101\r\n", "multibulk length"),  # more arguments than a command may have
    (b"*1\r\n$1001\r\n", "bulk length"),  # a longer string than a value may be
    (b"*1\r\n:1\r\n", "expected '\\$'"),  # commands are arrays of bulk strings only
    (b"*1\r\n*1\r\n$1\r\na\r\n", "expected '\\$'"),  # no nesting
    (b"*x\r\n", "multibulk length"),
    (b"*1\r\n$-5\r\n", "bulk length"),
    (b"*1\r\n$3\r\nabcde\r\n", "CRLF"),
    (b"*" + b"9" * 40, "multibulk length"),  # a header that never ends
    (b"GET \"a\r\n", "unbalanced quotes"),
    (b"GET \"a\"b\r\n", "unbalanced quotes"),
    (b"x" * (resp.MAX_INLINE + 10), "too big inline"),
    # forms Python's int() takes and hiredis does not: refused here, before hiredis
    (b"*01\r\n$4\r\nPING\r\n", "multibulk length"),
    (b"*+1\r\n$4\r\nPING\r\n", "multibulk length"),
    (b"* 1\r\n$4\r\nPING\r\n", "multibulk length"),
    (b"*1\r\n$04\r\nPING\r\n", "bulk length"),
    (b"*1\r\n$1_0\r\n0123456789\r\n", "bulk length"),
    (b"*1\r\n$-0\r\n", "bulk length"),
])
def test_bad_input_is_a_protocol_error_naming_it(data: bytes, says: str) -> None:
    with pytest.raises(resp.RespProtocolError, match=says):
        reader().feed(data)


def test_a_request_over_the_byte_limit_is_refused_before_it_is_buffered_whole() -> None:
    r = reader(max_args=100, max_bulk=1000, max_request=1500)
    head = b"*4\r\n$3\r\nSET\r\n" + b"$1000\r\n" + b"a" * 1000 + b"\r\n" + b"$1000\r\n"
    with pytest.raises(resp.RespProtocolError, match="more than 1500 bytes"):
        r.feed(head + b"b" * 10)


def test_a_negative_array_count_is_no_command_as_redis_takes_it() -> None:
    assert reader().feed(b"*-5\r\n*1\r\n$4\r\nPING\r\n") == [[b"PING"]]
    with pytest.raises(resp.RespProtocolError, match="bulk length"):
        reader().feed(b"*1\r\n$-5\r\n")


def test_many_empty_strings_cost_what_they_weigh() -> None:
    """hiredis is fed only whole, checked commands: an array header promising more
    elements than allowed never reaches it (it would allocate them up front)."""
    with pytest.raises(resp.RespProtocolError):
        reader().feed(b"*4000000000\r\n")
    r = reader(max_args=20_002, max_bulk=1000, max_request=1 << 20)
    cmd = b"*20000\r\n" + b"$0\r\n\r\n" * 20000
    assert r.feed(cmd) == [[b""] * 20000]


@given(st.binary(max_size=200))
def test_garbage_parses_or_is_a_protocol_error(data: bytes) -> None:
    r = reader()
    try:
        for command in r.feed(data):
            assert isinstance(command, list) and all(isinstance(a, bytes) for a in command)
    except resp.RespProtocolError:
        pass


@given(st.lists(st.lists(st.binary(max_size=30), min_size=1, max_size=5), max_size=5),
       st.integers(1, 7))
def test_any_commands_in_any_chunks_come_out_the_same(commands: list[list[bytes]],
                                                      chunk: int) -> None:
    data = b"".join(b"*%d\r\n" % len(c) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in c)
                    for c in commands)
    r, out = reader(), []
    for i in range(0, len(data), chunk):
        out += r.feed(data[i : i + chunk])
    assert out == commands


def test_inline_splitting_follows_redis() -> None:
    assert resp.split_inline(b'set "a\\x41\\n\\"" \'it\\\'s\' plain  ') == [
        b"set", b'aA\n"', b"it's", b"plain"]
    assert resp.split_inline(b"   ") == []
    assert resp.split_inline(b'"" x') == [b"", b"x"]


# -- planning ---------------------------------------------------------------------------
def ctx(admin: bool = False) -> resp.Context:
    return resp.Context(P.DEFAULT_LIMITS, resp.Cursors(), admin, now=1700000000.25, port=6380)


def plan(*args: bytes, session: resp.Session | None = None, admin: bool = False) -> Any:
    return resp.plan_command(session or resp.Session(7), list(args), ctx(admin))


def test_unknown_commands_and_wrong_arity_answer_as_redis_does() -> None:
    p = plan(b"FOO", b"bar", b"baz")
    assert isinstance(p, resp.Reply) and not p.close
    assert parse(p.data).args[0] == (
        "ERR unknown command 'FOO', with args beginning with: 'bar' 'baz' ")
    assert str(parse(plan(b"GET").data)) == "ERR wrong number of arguments for 'get' command"
    assert str(parse(plan(b"MSET", b"a", b"1", b"b").data)) == (
        "ERR wrong number of arguments for 'mset' command")


def test_data_commands_become_checked_zkv_requests() -> None:
    p = plan(b"get", b"k")
    assert isinstance(p, resp.Forward) and (p.op, p.args) == ("GET", [b"k"])
    p = plan(b"DEL", b"a", b"b")
    assert (p.op, p.args) == ("PIPE", [[["DEL", b"a"], ["DEL", b"b"]]])
    p = plan(b"MSET", b"a", b"1", b"b", b"2")
    assert (p.op, p.args) == ("MSET", [[b"a", b"1", b"b", b"2"]])
    big = plan(b"SET", b"k" * (P.DEFAULT_LIMITS.max_key_bytes + 1), b"v")
    assert isinstance(big, resp.Reply) and b"over the limit" in big.data
    p = plan(b"SET", b"k", b"v", b"EX", b"10", b"NX")
    assert isinstance(p, resp.Forward) and p.args == [b"k", b"v", {"ex": 10, "nx": True}]
    assert b"syntax error" in plan(b"SET", b"k", b"v", b"EX").data
    for bad in (b"05", b"-0", b"+5", b" 5"):  # integers as Redis reads them (string2ll)
        assert b"not an integer" in plan(b"SET", b"k", b"v", b"EX", bad).data, bad
    # an option twice is taken, the last EX counting; conflicting ones are refused
    # (as redis-server 7 answers each)
    p = plan(b"SET", b"k", b"v", b"EX", b"10", b"EX", b"20", b"NX", b"NX", b"GET", b"GET")
    assert isinstance(p, resp.Forward) and p.args == [b"k", b"v",
                                                      {"ex": 20, "nx": True, "get": True}]
    assert isinstance(plan(b"SET", b"k", b"v", b"KEEPTTL", b"KEEPTTL"), resp.Forward)
    assert isinstance(plan(b"GETEX", b"k", b"PERSIST", b"PERSIST"), resp.Forward)
    for words in ([b"EX", b"10", b"PX", b"100"], [b"EX", b"10", b"KEEPTTL"], [b"NX", b"XX"]):
        assert b"syntax error" in plan(b"SET", b"k", b"v", *words).data, words


@pytest.mark.parametrize(("words", "message"), [
    # the words Redis answers these with, checked against redis-server 7
    ([b"EXPIRE", b"k", b"10", b"NX", b"XX"],
     "ERR NX and XX, GT or LT options at the same time are not compatible"),
    ([b"EXPIRE", b"k", b"10", b"NX", b"GT"],
     "ERR NX and XX, GT or LT options at the same time are not compatible"),
    ([b"PEXPIRE", b"k", b"10", b"GT", b"LT"],
     "ERR GT and LT options at the same time are not compatible"),
    ([b"EXPIRE", b"k", b"10", b"SOON"], "ERR Unsupported option SOON"),
    ([b"SETEX", b"k", b"0", b"v"], "ERR invalid expire time in 'setex' command"),
    ([b"PSETEX", b"k", b"-5", b"v"], "ERR invalid expire time in 'psetex' command"),
])
def test_option_mistakes_answer_in_redis_words(words: list[bytes], message: str) -> None:
    p = plan(*words)
    assert isinstance(p, resp.Reply) and parse(p.data).args[0] == message


def test_expire_flags_redis_allows_together() -> None:
    p = plan(b"EXPIRE", b"k", b"10", b"XX", b"GT")  # (the same as GT alone)
    assert isinstance(p, resp.Forward) and p.args == [b"k", 10, "GT"]
    p = plan(b"EXPIRE", b"k", b"10", b"nx", b"NX")
    assert isinstance(p, resp.Forward) and p.args == [b"k", 10, "NX"]


def test_shapes_turn_zkv_results_into_redis_replies() -> None:
    s2, s3 = resp.Session(1), resp.Session(2, proto=3)
    get = plan(b"GET", b"k")
    assert get.shape(b"v", s2) == b"$1\r\nv\r\n"
    assert get.shape(None, s2) == b"$-1\r\n" and get.shape(None, s3) == b"_\r\n"
    dels = plan(b"DEL", b"a", b"a", b"b")
    assert dels.shape([[0, True], [0, False], [0, True]], s2) == b":2\r\n"
    # a DEL whose key's node failed: the error, saying what went elsewhere
    down = [P.ERR, "NODE_DOWN", "node 127.0.0.1:1 is down"]
    assert dels.shape([[0, True], down, [0, False]], s2) == (
        b"-CLUSTERDOWN node 127.0.0.1:1 is down; 1 of the 3 keys were not deleted, and 1 of "
        b"the others were\r\n")
    exists = plan(b"EXISTS", b"a", b"a")
    assert exists.shape([[0, 1], [0, 1]], s2) == b":2\r\n"
    assert exists.shape([[0, 1], down], s2) == b"-CLUSTERDOWN node 127.0.0.1:1 is down\r\n"
    assert plan(b"MGET", b"a", b"b").shape([b"1", None], s2) == b"*2\r\n$1\r\n1\r\n$-1\r\n"
    assert plan(b"TYPE", b"a").shape(1, s2) == b"+string\r\n"
    assert plan(b"TYPE", b"a").shape(0, s2) == b"+none\r\n"


@pytest.mark.parametrize("exc, prefix", [
    (NodeUnavailable("node 127.0.0.1:1 is down"), "CLUSTERDOWN"),
    (Unavailable("a rollback is under way"), "TRYAGAIN"),
    (Timeout("no answer"), "TIMEOUT"),
    (StorageError("disk full"), "MISCONF"),
    (LimitExceeded("too big"), "ERR"),
])
def test_errors_map_to_redis_conventions(exc: Any, prefix: str) -> None:
    reply = plan(b"GET", b"k").shape(exc, resp.Session(1))
    err = parse(reply)
    assert isinstance(err, hiredis.ReplyError) and str(err) == f"{prefix} {exc.message}"


def test_error_messages_stay_on_one_line() -> None:
    assert resp.error("ERR a\r\nb\nc") == b"-ERR a  b c\r\n"


def test_scan_cursors_are_integers_mapped_to_zkv_cursors() -> None:
    c = ctx()
    p = resp.plan_command(resp.Session(1), [b"SCAN", b"0", b"MATCH", b"a*", b"COUNT", b"5"], c)
    assert (p.op, p.args) == ("SCAN", ["0", b"a*", 5])
    reply = parse(p.shape(["ab12:1:f00-3", [b"a1"]], resp.Session(1)))
    number = int(reply[0])
    assert number > 0 and reply[1] == [b"a1"]
    nxt = resp.plan_command(resp.Session(1), [b"SCAN", str(number).encode()], c)
    assert nxt.args[0] == "ab12:1:f00-3"  # the same zkv cursor, from any connection
    assert parse(p.shape(["0", []], resp.Session(1)))[0] == b"0"

    bad = resp.plan_command(resp.Session(1), [b"SCAN", b"99999"], c)
    assert b"invalid cursor" in bad.data
    assert b"syntax error" in resp.plan_command(resp.Session(1), [b"SCAN", b"0", b"X"], c).data


def test_one_connections_scans_cannot_push_out_anothers_cursors() -> None:
    """The table is bounded; each connection's newest cursors are its own, so a client
    making cursors by the thousand pushes out only its own."""
    cursors = resp.Cursors(size=100, per_owner=4)
    victim = cursors.number("v-1", owner=1)
    for i in range(10_000):
        cursors.number(f"a-{i}", owner=2)
    assert cursors.cursor(str(victim).encode()) == "v-1"
    newest = cursors.number("a-last", owner=2)
    assert cursors.cursor(str(newest).encode()) == "a-last"
    with pytest.raises(CommandError, match="invalid cursor"):
        cursors.cursor(b"5")  # one of the attacker's first: gone
    # a closed connection's cursors still work from another, until the oldest go
    cursors.forget_owner(1)
    assert cursors.cursor(str(victim).encode()) == "v-1"
    for owner in range(3, 40):
        for i in range(4):
            cursors.number(f"o{owner}-{i}", owner=owner)
    with pytest.raises(CommandError):
        cursors.cursor(str(victim).encode())
    assert len(cursors._by_number) <= 100


def test_hello_switches_protocol_and_answers_a_map() -> None:
    s = resp.Session(9)
    p = plan(b"HELLO", b"3", b"SETNAME", b"app", session=s)
    assert s.proto == 3 and s.name == b"app"
    hello = parse(p.data)
    assert hello[b"proto"] == 3 and hello[b"id"] == 9 and hello[b"server"] == b"redis"
    assert b"NOPROTO" in plan(b"HELLO", b"4", session=s).data and s.proto == 3
    for bad in (b"abc", b"03"):  # as Redis answers both
        assert plan(b"HELLO", bad, session=s).data == \
            b"-ERR Protocol version is not an integer or out of range\r\n"
    p2 = plan(b"HELLO", b"2", session=s)
    flat = parse(p2.data)
    assert s.proto == 2 and flat[flat.index(b"proto") + 1] == 2


def test_client_and_connection_commands() -> None:
    s = resp.Session(5)
    assert plan(b"CLIENT", b"SETNAME", b"worker-1", session=s).data == resp.OK
    assert parse(plan(b"CLIENT", b"GETNAME", session=s).data) == b"worker-1"
    assert parse(plan(b"CLIENT", b"ID", session=s).data) == 5
    assert plan(b"CLIENT", b"SETINFO", b"LIB-NAME", b"redis-py", session=s).data == resp.OK
    # a value that would forge CLIENT INFO's fields (helper-22), or of any length: refused
    forged = plan(b"CLIENT", b"SETINFO", b"LIB-NAME", b"x\r\nid=999 name=admin", session=s)
    assert forged.data.startswith(b"-ERR LIB-NAME cannot contain spaces")
    assert b"over 128 bytes" in plan(b"CLIENT", b"SETINFO", b"LIB-VER", b"1" * 129,
                                     session=s).data
    assert "lib-name=redis-py " in resp.client_line(s)
    assert b"space" in plan(b"CLIENT", b"SETNAME", b"a b", session=s).data
    assert plan(b"SELECT", b"0").data == resp.OK
    assert b"out of range" in plan(b"SELECT", b"1").data
    assert plan(b"QUIT").close and plan(b"QUIT").data == resp.OK
    assert parse(plan(b"ECHO", b"hi\r\n").data) == b"hi\r\n"
    assert parse(plan(b"TIME").data) == [b"1700000000", b"250000"]
    assert parse(plan(b"COMMAND", b"COUNT").data) == len(resp.SPECS)
    docs = parse(plan(b"COMMAND", b"DOCS", b"get").data)
    assert docs[0] == b"get" and b"arguments" in docs[1]


def test_flushall_needs_the_admin_flag() -> None:
    assert parse(plan(b"FLUSHALL").data).args[0].startswith("NOPERM")
    assert isinstance(plan(b"FLUSHALL", admin=True), resp.Local)
    assert b"syntax error" in plan(b"FLUSHALL", b"NOW", admin=True).data


def test_info_text_is_in_redis_format() -> None:
    infos = {"proxy": {"pid": 1, "uptime_s": 5, "requests": 3, "errors": 0, "epoch": 2},
             "nodes": {"127.0.0.1:1": {"keys": 2}, "127.0.0.1:2": {"error": "down"}},
             "totals": {"keys": 2, "keys_with_ttl": 1, "live_bytes": 10}}
    text = resp.info_text(infos, [], ctx())
    fields = dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)
    assert fields["redis_version"] == resp.REDIS_VERSION
    assert fields["redis_mode"] == "standalone"
    assert fields["db0"] == "keys=2,expires=1,avg_ttl=0"
    assert fields["nodes_up"] == "1"
    only = resp.info_text(infos, ["keyspace"], ctx())
    assert only.startswith("# Keyspace\r\n") and "redis_version" not in only
    assert resp.info_text(infos, ["nosuch"], ctx()) == ""  # (Redis: an empty reply)


def test_commands_before_bad_bytes_come_back_then_the_error() -> None:
    r = reader()
    assert r.feed(b"PING\r\n*1\r\n:5\r\n") == [[b"PING"]]
    assert r.failed is not None
    with pytest.raises(resp.RespProtocolError, match="expected"):
        r.feed(b"")


@given(st.sampled_from(["GET", "DEL", "EXISTS", "SET"]), st.binary(max_size=70_000),
       st.binary(max_size=300))
def test_keyed_requests_encode_as_cbor2_would(op: str, key: bytes, value: bytes) -> None:
    args = [key, value] if op == "SET" else [key]
    assert P.encode_keyed(op, args) == P.encode_request(op, *args)


def test_connections_made_one_after_another_cannot_push_out_a_live_scan() -> None:
    """helper-22's attack: many connections each make their share of cursors and close;
    a connection still scanning keeps its cursor. With more live connections than the
    table holds, those holding the most give first."""
    cursors = resp.Cursors(size=100, per_owner=4)
    victim = cursors.number("v-1", owner=1)
    for owner in range(2, 500):  # each makes 4 (its whole share), then closes
        for i in range(4):
            cursors.number(f"o{owner}-{i}", owner=owner)
        cursors.forget_owner(owner)
    assert cursors.cursor(str(victim).encode()) == "v-1"
    for owner in range(500, 560):  # live ones, 240 cursors for a table of 100
        for i in range(4):
            cursors.number(f"o{owner}-{i}", owner=owner)
    assert cursors.cursor(str(victim).encode()) == "v-1"  # it holds the fewest
    assert len(cursors._by_number) <= 100
    newest = cursors.number("v-2", owner=1)
    assert cursors.cursor(str(newest).encode()) == "v-2"
