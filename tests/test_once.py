"""Safe retries (zkv.core.once): a write tagged with a client id and a sequence number is
applied once however often it is sent, across a restart, a snapshot, a failover
(replicas apply the same records) and a move (the stream carries the outcomes);
and, through real processes, a client whose replies are lost ends with the exact
count."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from conftest import Cluster, wait_until
from test_storage import open_storage, reopen, wait_snapshot_done

import zkv
from zkv.core import once, wal
from zkv.core import protocol as P
from zkv.core.keyspace import Keyspace
from zkv.core.ring import RangeSet
from zkv.core.transfer import Outgoing, RangeScan
from zkv.node import Node

pytestmark = pytest.mark.timeout(120)
CLIENT = b"c" * 16


def tagged(seq: int, *request: Any) -> bytes:
    return P.encode_request("ONCE", CLIENT, seq, list(request))


def result(reply: bytes) -> Any:
    return P.decode_reply(reply)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Any]:
    made: list[Node] = []

    def make(name: str) -> Node:
        node = Node("127.0.0.1", 1, str(tmp_path / name), fsync="no")
        node.recovery = node.storage.open()
        made.append(node)
        return node

    yield make
    for node in made:
        node.storage.close()


# -- the table ---------------------------------------------------------------------------
def test_the_window_is_bounded_per_client_and_in_all(monkeypatch: Any) -> None:
    table = once.Outcomes()
    for seq in range(once.WINDOW + 10):
        table.remember(b"a", seq, seq)
    assert len(table) == once.WINDOW and not table.get(b"a", 9)[0]
    assert table.get(b"a", once.WINDOW + 9) == (True, once.WINDOW + 9)
    monkeypatch.setattr(once, "MAX_ENTRIES", 300)
    for seq in range(100):
        table.remember(b"b", seq, "OK")
    assert len(table) <= 300 and b"a" not in table.clients  # the oldest client went
    assert table.get(b"b", 99) == (True, "OK")


def test_a_rolled_back_turn_remembers_nothing() -> None:
    table = once.Outcomes()
    table.remember(b"a", 1, "first")
    table.commit()
    mark = table.mark()
    table.remember(b"a", 1, "second")
    table.remember(b"a", 2, 2)
    table.remember(b"z", 1, 1)
    table.clear()
    table.rollback_to(mark)
    assert list(table.items()) == [(b"a", 1, "first")] and len(table) == 1


def test_what_is_let_go_is_known_to_be_forgotten(monkeypatch: Any) -> None:
    """Past the window, a seq is refused as of unknown outcome, not taken for new; the
    floors travel in the flat table (snapshots, moves, replica syncs) and roll back."""
    monkeypatch.setattr(once, "WINDOW", 4)
    table = once.Outcomes()
    for seq in range(1, 11):
        table.remember(b"a", seq, seq)
    assert [table.forgotten(b"a", s) for s in (1, 6, 7, 11)] == [True, True, False, False]
    assert table.get(b"a", 7) == (True, 7) and not table.forgotten(b"b", 1)
    copy = once.Outcomes()
    copy.merge(table.flat())
    assert copy.forgotten(b"a", 6) and not copy.forgotten(b"a", 7) and copy.get(b"a", 10)[0]
    table.commit()
    mark = table.mark()
    table.remember(b"a", 11, 11)  # lets 7 go
    table.clear()
    assert not table.forgotten(b"a", 6)
    table.rollback_to(mark)
    assert table.forgotten(b"a", 6) and not table.forgotten(b"a", 7)
    monkeypatch.setattr(once, "MAX_ENTRIES", 6)
    for seq in range(1, 5):
        table.remember(b"b", seq, "OK")  # the oldest client goes whole: its floor stays
    assert b"a" not in table.clients and table.forgotten(b"a", 10)


def test_a_run_remembered_at_once_ends_as_one_by_one_would(monkeypatch: Any) -> None:
    """A primary remembers a pipeline's run at once; replay and its replicas, one by
    one from the ONCERUN record: both must end with the same table."""
    monkeypatch.setattr(once, "WINDOW", 5)
    monkeypatch.setattr(once, "MAX_ENTRIES", 6)
    monkeypatch.setattr(once, "CLIENT_COST", 0)
    live, replayed = once.Outcomes(), once.Outcomes()
    for table in (live, replayed):
        table.remember(b"x", 1, 1)
        table.remember(b"y", 1, 1)
        table.commit()
    live.remember_all(b"z", range(1, 12), "OK")
    for seq in range(1, 12):
        replayed.remember(b"z", seq, "OK", live=False)
    assert live.clients == replayed.clients and live.entries == replayed.entries == 6
    assert dict(live.floors) == dict(replayed.floors) == {b"x": 1, b"z": 6}
    live.rollback_to(0)  # the turn's commit failed: as before it
    assert list(live.items()) == [(b"x", 1, 1), (b"y", 1, 1)] and not live.floors


def test_outcomes_taken_from_elsewhere_are_the_first_to_go_and_keep_their_order(
        monkeypatch: Any) -> None:
    """A move's or a sync's table: what the receiver applied itself stays (a retry of
    it finds it), and a table copied whole keeps which client wrote last."""
    monkeypatch.setattr(once, "WINDOW", 8)
    source, dest = once.Outcomes(), once.Outcomes()
    for seq in range(1, 9):
        source.remember(b"c", seq, seq)
        dest.remember(b"c", 100 + seq, seq)
    dest.merge(source.flat())
    assert all(dest.get(b"c", 100 + s)[0] for s in range(1, 9))
    assert not dest.forgotten(b"c", 101) and dest.forgotten(b"c", 8)
    live = once.Outcomes()
    for client in (b"old", b"mid", b"new"):
        live.remember(client, 1, "OK")
        live.remember(client, 2, "OK")
    copy, replayed = once.Outcomes(), once.Outcomes()
    taken = copy.merge(live.flat())
    replayed.merge(taken)  # the ONCES record the copy logged, read back
    for table in (copy, replayed):
        assert list(table.items()) == list(live.items())


def test_a_pipelined_write_past_the_window_is_refused_too(nodes: Any, monkeypatch: Any
                                                          ) -> None:
    monkeypatch.setattr(once, "WINDOW", 4)
    node = nodes("n")
    for seq in range(1, 11):
        node.run_body(tagged(seq, "SET", b"k", b"%d" % seq), False)
    items = result(node.run_body(pipe(tagged_item(2, "SET", b"k", b"2"),
                                      tagged_item(11, "SET", b"j", b"x")), False))
    assert items[0][0] != P.OK and "no longer remembered" in str(items[0])
    assert items[1] == [P.OK, "OK"]
    node.storage.commit()
    assert node.storage.keyspace.get(b"k", 0) == b"10"


def test_large_outcomes_are_kept_as_their_size() -> None:
    assert once.kept(b"x" * (once.MAX_OUTCOME_BYTES + 1)) == {"big": once.MAX_OUTCOME_BYTES + 1}
    assert once.kept(b"small") == b"small" and once.kept(7) == 7


# -- on a node -----------------------------------------------------------------------------
def test_a_retried_write_returns_its_first_outcome(nodes: Any) -> None:
    node = nodes("n")
    assert result(node.run_body(tagged(1, "INCR", b"k"), False)) == 1
    assert result(node.run_body(tagged(1, "INCR", b"k"), False)) == 1  # a retry
    assert result(node.run_body(tagged(2, "INCR", b"k"), False)) == 2  # the next write
    assert result(node.run_body(tagged(3, "SET", b"l", b"v", {"nx": True}), False)) == "OK"
    assert result(node.run_body(tagged(3, "SET", b"l", b"v", {"nx": True}), False)) == "OK"
    assert result(node.run_body(tagged(4, "SET", b"l", b"w", {"nx": True}), False)) is None
    node.storage.commit()
    assert node.storage.keyspace.get(b"k", 0) == b"2" and node.counters["RETRIED"] == 2
    with pytest.raises(zkv.ProtocolError, match="ONCE tags a write"):
        result(node.run_body(tagged(5, "GET", b"k"), False))


def test_a_retry_past_the_window_is_refused_not_applied_again(
        nodes: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(once, "WINDOW", 4)
    node = nodes("n")
    for seq in range(1, 11):
        node.run_body(tagged(seq, "INCR", b"k"), False)
    with pytest.raises(zkv.OutcomeUnknown, match="no longer remembered"):
        result(node.run_body(tagged(2, "INCR", b"k"), False))
    with pytest.raises(zkv.OutcomeUnknown):  # asked by a router for a moving key
        result(node.run_body(P.encode_request("XSEEN", {"client": CLIENT, "seq": 2}), False))
    node.storage.commit()
    assert node.storage.keyspace.get(b"k", 0) == b"10"
    assert isinstance(zkv.OutcomeUnknown(""), zkv.Timeout)  # what a client's except sees


def pipe(*items: list[Any]) -> bytes:
    return P.encode_request("PIPE", list(items))


def tagged_item(seq: int, *request: Any) -> list[Any]:
    return ["ONCE", CLIENT, seq, list(request)]


def test_a_retried_pipeline_applies_nothing_twice(tmp_path: Path) -> None:
    """Tagged SETs in a PIPE take the short path, logged as one ONCERUN record with
    their outcomes; a retry of the PIPE, before and after a restart, undoes no later
    write and counts no INCR twice."""
    def open_node() -> Node:
        node = Node("127.0.0.1", 1, str(tmp_path / "n"), fsync="no")
        node.recovery = node.storage.open()
        return node

    node = open_node()
    body = pipe(tagged_item(1, "SET", b"a", b"first"), ["GET", b"a"],
                tagged_item(2, "SET", b"b", b"first", {"px": 10**9}),
                ["ONCE", b"other", 1, ["SET", b"c", b"x"]],  # another client: a new run
                tagged_item(3, "INCR", b"n"), tagged_item(4, "SET", b"d", b"x"))
    want = [[P.OK, "OK"], [P.OK, b"first"], [P.OK, "OK"], [P.OK, "OK"], [P.OK, 1],
            [P.OK, "OK"]]
    assert result(node.run_body(body, False)) == want
    records = [item for _, item in wal.LogScan(bytes(node.storage.pending))]
    assert [r[0] for r in records].count(wal.ONCERUN) == 3
    node.storage.commit()
    for key in (b"a", b"b"):  # written since by someone else
        node.run_body(P.encode_request("SET", key, b"later"), False)
    assert result(node.run_body(body, False))[::2] == want[::2]  # the first outcomes
    node.storage.commit(durable=True)
    node.storage.close()
    node = open_node()  # from the log: the writes and their outcomes
    try:
        assert result(node.run_body(body, False))[::2] == want[::2]
        ks = node.storage.keyspace
        assert ks.get(b"a", 0) == b"later" and ks.get(b"b", 0) == b"later"
        assert ks.get(b"n", 0) == b"1" and node.counters["RETRIED"] == 5
    finally:
        node.storage.close()


def test_a_torn_oncerun_record_loses_both_the_writes_and_their_outcomes() -> None:
    ks = Keyspace()
    record = wal.encode((wal.ONCERUN, CLIENT, [1, 2], "OK",
                         wal.encode((wal.MSET, [b"a", b"1", b"b", b"2"]))))
    ks.replay(wal.LogScan(record[:-3]))
    assert not ks.data and not ks.once.get(CLIENT, 1)[0]
    ks.replay(wal.LogScan(record))
    assert ks.data == {b"a": b"1", b"b": b"2"} and ks.once.get(CLIENT, 2) == (True, "OK")


def test_a_failed_write_is_not_remembered(nodes: Any) -> None:
    node = nodes("n")
    node.run_body(P.encode_request("SET", b"k", b"text"), False)
    with pytest.raises(zkv.CommandError, match="not an integer"):
        result(node.run_body(tagged(1, "INCR", b"k"), False))
    node.run_body(P.encode_request("SET", b"k", b"5"), False)
    assert result(node.run_body(tagged(1, "INCR", b"k"), False)) == 6  # tried anew


def test_outcomes_survive_a_restart_and_a_snapshot(tmp_path: Path, opened: list[Any]) -> None:
    st, _ = open_storage(tmp_path / "d", opened, snapshot_min_bytes=1)
    ks = st.keyspace
    ks.once.remember(CLIENT, 1, 41)
    st.pending += wal.encode((wal.ONCE, CLIENT, 1, 41, ks.set(b"k", b"41")))
    st.commit()
    st, _ = reopen(st, opened)  # from the log: both the write and its outcome
    assert st.keyspace.once.get(CLIENT, 1) == (True, 41) and st.keyspace.data == {b"k": b"41"}
    st.start_snapshot()
    wait_snapshot_done(st)
    st, rec = reopen(st, opened)
    assert rec.snapshot is not None and st.keyspace.once.get(CLIENT, 1) == (True, 41)


def test_a_torn_once_record_loses_both_the_write_and_its_outcome() -> None:
    ks = Keyspace()
    record = wal.encode((wal.ONCE, CLIENT, 1, 1, wal.encode((wal.SET, b"k", b"1"))))
    ks.replay(wal.LogScan(record[:-3]))
    assert not ks.data and not ks.once.get(CLIENT, 1)[0]


def test_a_replica_remembers_what_its_primary_applied(nodes: Any) -> None:
    primary = nodes("p")
    primary.run_body(tagged(1, "INCRBY", b"k", 5), False)
    shipped = primary.storage.commit()
    replica = Keyspace()
    for _, item in wal.LogScan(shipped):
        replica.apply_live(item)
    assert replica.once.get(CLIENT, 1) == (True, 5) and replica.data == {b"k": b"5"}


def test_a_moved_key_keeps_its_outcomes(nodes: Any) -> None:
    """The source applied the write; the key moves; the retry goes to the destination,
    which answers the first outcome from the table the stream brought."""
    source, dest = nodes("src"), nodes("dst")
    assert result(source.run_body(tagged(1, "INCR", b"k"), False)) == 1
    source.storage.commit()
    dest.storage.keyspace.open_move("m", RangeSet.full())
    ks = source.storage.keyspace
    out = Outgoing("m", "src:1", "dst:1", RangeScan(ks.buckets, RangeSet.full()),
                   outcomes=ks.once.flat)
    batches = []
    while not out.done:
        batch = out.next_batch(ks.data, 0.0)
        if batch is not None:
            batches.append(batch)
    dest.receive(batches)
    assert result(dest.run_body(tagged(1, "INCR", b"k"), False)) == 1  # not applied again
    assert dest.storage.keyspace.data == {b"k": b"1"}


# -- through real processes -------------------------------------------------------------------
class DroppingLink:
    """A fake network between a client and the proxy: a ROUTER in front, a DEALER
    behind, that forwards every request and drops every ``drop``-th reply."""

    def __init__(self, ctx: zmq.Context[Any], upstream: str, drop: int = 2) -> None:
        self.front = ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.back = ctx.socket(zmq.DEALER)
        self.back.setsockopt(zmq.LINGER, 0)
        self.back.connect(f"tcp://{upstream}")
        self.drop, self.replies, self.dropped = drop, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(20))
            if self.front in events:
                self.back.send_multipart(self.front.recv_multipart())
            if self.back in events:
                reply = self.back.recv_multipart()
                self.replies += 1
                if self.replies % self.drop == 0:
                    self.dropped += 1
                    continue
                self.front.send_multipart(reply)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.front.close(0)
        self.back.close(0)


def test_lost_replies_leave_the_exact_count(make_cluster: Any, zctx: zmq.Context[Any]) -> None:
    cluster: Cluster = make_cluster(nodes=2)
    link = DroppingLink(zctx, cluster.address, drop=3)
    try:
        c = zkv.Client(f"127.0.0.1:{link.port}", timeout=0.25, retries=5)
        for _ in range(30):
            c.incr("count")
        c.close()
    finally:
        link.close()
    assert link.dropped >= 8
    direct = cluster.client()
    assert direct.get("count") == b"30"
    direct.close()


def test_lost_replies_of_pipelines_and_batches_leave_the_exact_count(
        make_cluster: Any, zctx: zmq.Context[Any]) -> None:
    """Pipelines and call_many tag their writes too: what got no reply is sent again
    (in rounds, so that a retry follows fewer newer writes than a node remembers)."""
    cluster: Cluster = make_cluster(nodes=2)
    link = DroppingLink(zctx, cluster.address, drop=3)
    try:
        c = zkv.Client(f"127.0.0.1:{link.port}", timeout=0.25, retries=12)
        for _ in range(3):
            p = c.pipeline()
            for i in range(3000):
                p.incr(b"p%d" % i)
            assert len(p.execute()) == 3000
        # one key, so one node sees all 12000: more than it remembers per client
        results = c.call_many([("INCR", [b"m"])] * (once.WINDOW + 4000))
        assert not [r for r in results if isinstance(r, Exception)]
        c.close()
    finally:
        link.close()
    assert link.dropped >= 3
    direct = cluster.client()
    assert direct.mget([b"p%d" % i for i in range(3000)]) == [b"3"] * 3000
    assert direct.get(b"m") == b"%d" % (once.WINDOW + 4000)
    direct.close()


def test_transactions_with_lost_replies_leave_the_exact_count(
        make_cluster: Any, zctx: zmq.Context[Any]) -> None:
    """A transaction whose reply was lost is sent again whole; its writes are tagged,
    so the node answers their first outcomes instead of applying them twice."""
    cluster: Cluster = make_cluster(nodes=2)
    link = DroppingLink(zctx, cluster.address, drop=3)
    try:
        c = zkv.Client(f"127.0.0.1:{link.port}", timeout=0.25, retries=5)
        for i in range(30):
            with c.pipeline(transaction=True) as p:
                p.incr(b"{t}:a").incr(b"{t}:b").set(b"{t}:last", b"%d" % i)
                assert p.execute()[:2] == [i + 1, i + 1]
        c.close()
    finally:
        link.close()
    assert link.dropped >= 8
    direct = cluster.client()
    assert direct.mget([b"{t}:a", b"{t}:b", b"{t}:last"]) == [b"30", b"30", b"29"]
    direct.close()


def test_a_proxy_killed_between_apply_and_reply_leaves_the_exact_count(
        make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=2)
    stop = threading.Event()
    done = [0] * 4
    errors: list[BaseException] = []

    def work(i: int) -> None:
        client = zkv.Client(cluster.address, timeout=1.0, retries=20)
        try:
            while not stop.is_set():
                client.incr("hits")
                done[i] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(2):
        time.sleep(0.7)
        cluster.kill_proxy()  # SIGKILL: whatever it had applied and not answered is lost
        cluster.restart_proxy()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    c = cluster.client(timeout=5.0, retries=2)
    wait_until(lambda: c.get("hits") is not None, 10)
    assert int(c.get("hits") or 0) == sum(done)
    retried = sum(int(n.get("ops", {}).get("RETRIED", 0)) for n in c.info()["nodes"].values())
    print(f"increments={sum(done)} retried at the nodes={retried}")
    c.close()


def test_the_wire_form_is_what_other_clients_can_send(make_cluster: Any) -> None:
    """ONCE is plain CBOR: any client can tag its writes the same way."""
    cluster: Cluster = make_cluster(nodes=1)
    c = cluster.client()
    body = cbor2.dumps(["ONCE", b"other-client", 7, ["APPEND", b"log", b"x"]])
    for _ in range(3):
        assert P.decode_reply(c._exchange(body)) == 1
    assert c.get("log") == b"x"
    c.close()


def test_a_retry_whose_outcome_was_too_large_to_keep_says_it_was_applied(nodes: Any) -> None:
    node = nodes("n")
    big = b"x" * (once.MAX_OUTCOME_BYTES + 1)
    node.run_body(P.encode_request("SET", b"k", big), False)
    assert result(node.run_body(tagged(1, "GETSET", b"k", b"new"), False)) == big
    with pytest.raises(zkv.CommandError, match="applied already.*read the key"):
        result(node.run_body(tagged(1, "GETSET", b"k", b"new"), False))
    assert node.storage.keyspace.get(b"k", 0) == b"new"


@pytest.mark.parametrize("seq", [0, 23, 24, 255, 256, 65536, 2**32, 2**63 - 1])
def test_the_short_path_reads_a_tagged_write_as_the_general_path_does(seq: int) -> None:
    for inner in (["SET", b"key", b"x" * 300], ["DEL", b"k"], ["SET", b"", b""]):
        body = P.encode_request("ONCE", CLIENT, seq, inner)
        general = P.check_request(_General(cbor2.loads(body)))  # (no short path)
        assert P._fast_once(body, P.DEFAULT_LIMITS) == general
        assert P.check_request(cbor2.loads(body)) == general  # a PIPE's item
        for cut in range(len(body)):  # a torn body is refused, never misread
            try:
                P.parse_request(body[:cut])
            except zkv.ProtocolError:
                pass
    for refused in (["GET", b"k"], ["SET", b"k", b"v", b"extra"]):
        assert P._fast_once(P.encode_request("ONCE", CLIENT, seq, refused),
                            P.DEFAULT_LIMITS) is None


class _General(list):  # type: ignore[type-arg]
    """A request that the short paths of check_request (type(item) is list) pass by."""
