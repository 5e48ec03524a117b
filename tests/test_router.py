"""The routing core (zkv.core.router) as scripted interactions, without a socket.

Real nodes (zkv.node.Node, driven through ``handle`` on their own data directories)
sit behind a fake network that can drop, delay and reorder messages; routers at
different epochs talk to them; a move is stepped through every phase by hand, its
streams replaced by batches handed to the destination directly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from zkv.core import protocol as P
from zkv.core import router as router_module
from zkv.core.cluster import ClusterState
from zkv.core.placement import Placement
from zkv.core.ring import RangeSet, key_hash
from zkv.core.router import Router
from zkv.mover import new_move
from zkv.node import Node

A, B, C = "127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"
LIMITS = P.Limits(max_key_bytes=1024, max_value_bytes=1 << 16, max_batch=100,
                  max_message_bytes=1 << 20)


class Net:
    """Nodes behind a fake network. ``drop`` (0..1) loses messages each way; ``shuffle``
    delivers a turn's replies in a random order; ``hold`` keeps replies back for later."""

    def __init__(self, nodes: dict[str, Node], seed: int = 1) -> None:
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.drop = 0.0
        self.shuffle = False
        self.held: list[tuple[int, bytes]] = []
        self.hold = False
        self.sent: list[tuple[str, int]] = []  # (node, epoch) of every envelope

    def config(self, state: ClusterState, *names: str) -> None:
        """The config manager's push: every named node (all by default) takes it."""
        for name in names or tuple(self.nodes):
            reply = self.call(name, "XCONFIG", {"config": state.to_json(), "name": name})
            assert reply == {"epoch": state.epoch}, reply

    def call(self, name: str, op: str, *args: Any) -> Any:
        node = self.nodes[name]
        [[*_, body]] = node.handle([b"admin", P.encode_request(op, *args)])
        node.storage.commit(durable=True)
        return P.decode_reply(body)

    def step(self, router: Router, now: float) -> list[tuple[Any, bytes]]:
        """Carry out one Ready: envelopes to nodes, their replies back. The answers."""
        ready = router.ready()
        replies: list[tuple[int, bytes]] = []
        for name, items in ready.sends.items():
            self.sent.append((name, ready.epoch))
            if self.rng.random() < self.drop:
                continue  # the request is lost: the router's deadline will say so
            node = self.nodes[name]
            messages = node.handle([b"router", P.encode_envelope(ready.epoch, items)])
            node.storage.commit()
            for message in messages:
                for tag, body in P.decode_reply_envelope(message[-1]):
                    if self.rng.random() >= self.drop:
                        replies.append((tag, body))
        if self.shuffle:
            self.rng.shuffle(replies)
        if self.hold:
            self.held.extend(replies)
            replies = []
        for tag, body in replies:
            router.reply(tag, body, now)
        return ready.answers

    def release(self, router: Router, now: float) -> None:
        held, self.held = self.held, []
        for tag, body in held:
            router.reply(tag, body, now)

    def run(self, router: Router, requests: list[list[Any]], now: float = 0.0,
            configs: dict[int, ClusterState] | None = None) -> list[Any]:
        """Send requests (client ids 0..n-1); step until every one is answered (feeding the
        router a configuration it asks for from ``configs``); the decoded answers."""
        for i, req in enumerate(requests):
            router.request(i, P.encode_request(*req), now)
        answers: dict[int, Any] = {}
        for _ in range(50):
            for client, body in self.step(router, now):
                answers[client] = decode(body)
            if len(answers) == len(requests):
                break
            wants = router.need
            if configs and router.parked and wants in configs:
                router.set_placement(Placement(configs[wants]))
            now += 0.01
            router.tick(now)
        return [answers.get(i, "NO ANSWER") for i in range(len(requests))]


def decode(body: bytes) -> Any:
    item = cbor2.loads(body)
    return item[1] if item[0] == P.OK else ("ERR", item[1])


@pytest.fixture(name="nodes")  # (test_transactions.py uses it too)
def router_nodes(tmp_path: Path) -> Iterator[dict[str, Node]]:
    made = {}
    for name in (A, B, C):
        host, port = name.rsplit(":", 1)
        node = Node(host, int(port), str(tmp_path / port), fsync="no", limits=LIMITS)
        node.recovery = node.storage.open()
        made[name] = node
    yield made
    for node in made.values():
        node.storage.close()


def state(epoch: int, members: list[str], move: dict[str, Any] | None = None) -> ClusterState:
    return ClusterState(epoch, {m: 1.0 for m in members}, 64, move)


def router_for(st: ClusterState, timeout: float = 1.0, **kw: Any) -> Router:
    return Router(Placement(st), LIMITS, timeout, **kw)


def test_single_and_multi_key_commands_reach_their_owners(nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B, C])
    net.config(s1)
    r = router_for(s1)
    keys = [b"k%d" % i for i in range(60)]
    assert net.run(r, [["MSET", [x for k in keys for x in (k, b"v" + k)]]]) == ["OK"]
    owners = {k: Placement(s1).owner(k) for k in keys}
    for k in keys:  # each key is on its owner, and only there
        assert nodes[owners[k]].storage.keyspace.data[k] == b"v" + k
        assert sum(k in n.storage.keyspace.data for n in nodes.values()) == 1
    got = net.run(r, [["GET", keys[0]], ["EXISTS", keys[1]], ["DEL", keys[2]],
                      ["MGET", keys[4:14] + [b"nope"]], ["GET", keys[2]],
                      ["PIPE", [["GET", keys[3]], ["PING"], ["SET", b"p", b"1"], ["NOPE"]]]])
    assert got[0] == b"v" + keys[0] and got[1] == 1 and got[2] == 1
    assert got[3] == [b"v" + k for k in keys[4:14]] + [None]
    pipe = got[5]
    assert pipe[0] == [P.OK, b"v" + keys[3]] and pipe[1] == [P.OK, "PONG"]
    assert pipe[2] == [P.OK, "OK"] and pipe[3][0] == P.ERR
    assert sorted(net.run(r, [["KEYS", b"k5*"]])[0]) == sorted(
        k for k in keys if k.startswith(b"k5"))
    # everything was sent in envelopes of the router's epoch
    assert {e for _, e in net.sent} == {1}


def test_a_stale_router_is_refused_then_routes_by_the_new_epoch(nodes: dict[str, Node]) -> None:
    """Router R1 still at epoch 1 when the nodes are at 2 (C joined, no data to move in
    this script): every request of R1 is refused unapplied (STALE_EPOCH), R1 asks for
    epoch 2, and once given it sends again where the new ring says."""
    net = Net(nodes)
    s1, s2 = state(1, [A, B]), state(2, [A, B, C])
    net.config(s1)
    r1 = router_for(s1)
    keys = [b"s%d" % i for i in range(40)]
    net.config(s2)
    answers = net.run(r1, [["SET", k, b"x"] for k in keys], configs={2: s2})
    assert answers == ["OK"] * len(keys)
    assert r1.placement.epoch == 2
    p2 = Placement(s2)
    for k in keys:
        assert nodes[p2.owner(k)].storage.keyspace.data[k] == b"x"
    assert any(n.storage.keyspace.data for n in [nodes[C]])
    # R1's first envelopes were refused; nothing of them was applied at the old owners
    for k in keys:
        for name, node in nodes.items():
            if name != p2.owner(k):
                assert k not in node.storage.keyspace.data


def test_dbsize_and_keys_are_sent_again_by_a_newer_epoch(nodes: dict[str, Node],
                                                         monkeypatch: Any) -> None:
    """A FAILOVER makes a new epoch with the same ring: a DBSIZE or KEYS in flight by the
    old one is refused by the nodes that have the new one, and is sent again by it,
    counting every key once (a KEYS walk starts the refused member again)."""
    net = Net(nodes)
    s1, s2 = state(1, [A, B, C]), state(2, [A, B, C])
    net.config(s1)
    r = router_for(s1)
    keys = [b"d%03d" % i for i in range(300)]
    assert net.run(r, [["MSET", [x for k in keys[i:i + 100] for x in (k, b"v")]]
                       for i in range(0, 300, 100)]) == ["OK"] * 3
    net.config(s2)  # the manager's push: the nodes have the new epoch, the router not yet
    dbsize, listed = net.run(r, [["DBSIZE"], ["KEYS", b"d*"]], configs={2: s2})
    assert dbsize == 300 and sorted(listed) == keys
    assert r.placement.epoch == 2
    # refused mid-walk (pages of 10 keys): that member's walk starts again, no key twice
    monkeypatch.setattr(router_module, "KEYS_PAGE", 10)
    s3 = state(3, [A, B, C])
    r.request("k", P.encode_request("KEYS", b"d*"), 1.0)
    assert net.step(r, 1.0) == []  # every member's first page, by epoch 2
    net.config(s3)
    answers: list[Any] = []
    now = 1.0
    while not answers and now < 2.0:
        answers += net.step(r, now)
        if r.need == 3 and r.placement.epoch < 3:
            r.set_placement(Placement(s3))
        now += 0.01
        r.tick(now)
    [(_, body)] = answers
    assert sorted(decode(body)) == keys
    # refused by a configuration with other nodes: no count of a ring that is gone
    s5 = state(5, [A, B])
    net.config(s5)
    [answer] = net.run(r, [["DBSIZE"]], now=3.0, configs={5: s5})
    assert answer[0] == "ERR" and r.placement.epoch == 5
    # a member still behind the router: waited for, then counted
    s4 = state(6, [A, B, C])
    net.config(s4, B)
    r3 = router_for(s4)
    r3.request("c", P.encode_request("DBSIZE"), 0.0)
    assert net.step(r3, 0.0) == []  # A and C are at epoch 5: BEHIND
    net.config(s4, A, C)
    r3.tick(0.06)
    answers = net.step(r3, 0.06) + net.step(r3, 0.06)
    assert [(c, decode(b)) for c, b in answers] == [("c", 300)]


def test_a_router_waits_for_a_node_that_is_behind(nodes: dict[str, Node]) -> None:
    """The router has epoch 2 and node C not yet (its push is late): C answers BEHIND,
    the router sends again a moment later, by when C has it."""
    net = Net(nodes)
    s1, s2 = state(1, [A, B, C]), state(2, [A, B, C, "127.0.0.1:7009"])
    net.config(s1)
    net.config(s2, A, B)
    r = router_for(s2)
    key = next(k for k in (b"b%d" % i for i in range(1000)) if Placement(s2).owner(k) == C)
    r.request("c", P.encode_request("SET", key, b"1"), 0.0)
    assert net.step(r, 0.0) == []  # refused: C is at epoch 1
    net.config(s2, C)
    r.tick(0.06)
    answers = net.step(r, 0.06) + net.step(r, 0.06)  # (answers come in the next Ready)
    assert [(c, decode(b)) for c, b in answers] == [("c", "OK")]


def move_state(base: ClusterState, new_members: list[str], phase: str, epoch: int,
               members: list[str] | None = None) -> ClusterState:
    move = new_move(base, "add", C, {m: 1.0 for m in new_members},
                    {"batch_keys": 100, "batch_bytes": 1 << 16})
    move["phase"] = phase
    return ClusterState(epoch, {m: 1.0 for m in (members or list(base.members))},
                        base.vnodes, move)


def stream(net: Net, move_id: str, source: str, dest: str, ranges: RangeSet) -> None:
    """What a move's stream does: the source's keys of ``ranges``, batched to ``dest``."""
    data = net.nodes[source].storage.keyspace.data
    pairs = [x for k, v in data.items() if ranges.contains(key_hash(k)) for x in (k, v)]
    for i in range(0, len(pairs), 50):
        dest_node = net.nodes[dest]
        _, record = dest_node.storage.keyspace.absorb(move_id, pairs[i:i + 50])
        if record:
            dest_node.storage.pending += record
        dest_node.storage.commit(durable=True)


def test_a_move_stepped_through_every_phase_loses_nothing(nodes: dict[str, Node]) -> None:
    """ADD of C to {A, B}, one phase at a time, with a router at the current epoch and a
    stale one that lags a phase behind, over a network that shuffles replies. Writes
    and deletes land everywhere in the move; at the end every key reads its latest
    value through either router, and every node holds exactly its share."""
    net = Net(nodes, seed=3)
    net.shuffle = True
    s1 = state(1, [A, B])
    net.config(s1)
    live, stale = router_for(s1), router_for(s1)
    keys = [b"m%03d" % i for i in range(120)]
    expected: dict[bytes, bytes | None] = {k: b"v0-" + k for k in keys}
    assert net.run(live, [["MSET", [x for k in keys[i:i + 60] for x in (k, expected[k])]]
                          for i in (0, 60)]) == ["OK", "OK"]

    prepare = move_state(s1, [A, B, C], "prepare", 2)
    copy = move_state(s1, [A, B, C], "copy", 3, members=[A, B, C])
    cleanup = move_state(s1, [A, B, C], "cleanup", 4, members=[A, B, C])
    done = state(5, [A, B, C])
    configs = {2: prepare, 3: copy, 4: cleanup, 5: done}
    move_id = prepare.move["id"]  # type: ignore[index]
    transfers = prepare.move["transfers"]  # type: ignore[index]
    ranges_to_c = RangeSet()
    for t in transfers:
        ranges_to_c = ranges_to_c.union(RangeSet.from_list(t["ranges"]))

    def write(router: Router, n: int, tag: str) -> None:
        reqs: list[list[Any]] = []
        for k in keys[n::7]:
            if (int.from_bytes(k[-2:], "big") + n) % 3 == 0:
                reqs.append(["DEL", k])
                expected[k] = None
            else:
                expected[k] = f"{tag}-".encode() + k
                reqs.append(["SET", k, expected[k]])
        answers = net.run(router, reqs, configs=configs)
        assert all(a in ("OK", 0, 1) for a in answers), answers

    def check(router: Router) -> None:
        got = net.run(router, [["GET", k] for k in keys], configs=configs)
        assert got == [expected[k] for k in keys]

    # prepare: the destination opens the move; routing is still the old ring
    net.config(prepare)
    assert net.call(C, "XBEGIN", {"id": move_id, "ranges": ranges_to_c.to_list(),
                                  "purge": True})["ready"]
    live.set_placement(Placement(prepare))
    write(live, 0, "prepare")
    write(stale, 1, "stale-prepare")  # stale at epoch 1: refused, routed again at 2
    check(live)

    # copy: the new ring takes effect; reads ask C first, then the old owner
    net.config(copy)
    live.set_placement(Placement(copy))
    write(live, 2, "copy")
    check(live)
    for t in transfers[:1]:  # half the streams so far
        stream(net, move_id, t["source"], C, RangeSet.from_list(t["ranges"]))
    write(stale, 3, "stale-copy")  # still at 2 (prepare): refused, routed again at 3
    check(live)
    for t in transfers[1:]:
        stream(net, move_id, t["source"], C, RangeSet.from_list(t["ranges"]))
    check(stale)

    # cleanup: the sources drop what they handed over, C closes the move
    net.config(cleanup)
    live.set_placement(Placement(cleanup))
    for t in transfers:
        while not net.call(t["source"], "XDROP", {"id": move_id,
                                                   "ranges": t["ranges"]})["done"]:
            pass
    net.call(C, "XEND", {"id": move_id})
    write(live, 4, "cleanup")
    net.config(done)
    live.set_placement(Placement(done))
    check(live)
    check(stale)
    final = Placement(done)
    for name, node in nodes.items():
        assert set(node.storage.keyspace.data) == {
            k for k, v in expected.items() if v is not None and final.owner(k) == name}


def test_lost_and_late_replies_are_timeouts_never_wrong_answers(nodes: dict[str, Node]) -> None:
    net = Net(nodes, seed=7)
    s1 = state(1, [A, B, C])
    net.config(s1)
    r = router_for(s1, timeout=0.05)
    net.hold = True  # replies come after the deadline
    r.request("w", P.encode_request("SET", b"late", b"1"), 0.0)
    assert net.step(r, 0.0) + net.step(r, 0.0) == []
    r.tick(0.1)
    [(client, body)] = r.ready().answers
    assert client == "w" and decode(body) == ("ERR", "TIMEOUT")
    assert b"outcome of a write is unknown" in body
    net.release(r, 0.2)  # the late reply is dropped, not given to anyone
    assert r.ready().answers == []
    net.hold = False
    net.drop = 0.5
    answers = net.run(r, [["GET", b"late"] for _ in range(40)])
    assert set(map(str, answers)) <= {"b'1'", "('ERR', 'TIMEOUT')"}


def test_a_node_down_fails_its_keys_fast_and_the_rest_are_served(nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B, C])
    net.config(s1)
    r = router_for(s1)
    r.set_down(B, True, 0.0)
    p = Placement(s1)
    on_b = next(k for k in (b"d%d" % i for i in range(1000)) if p.owner(k) == B)
    on_a = next(k for k in (b"d%d" % i for i in range(1000)) if p.owner(k) == A)
    got = net.run(r, [["SET", on_b, b"1"], ["SET", on_a, b"1"],
                      ["PIPE", [["SET", on_a, b"2"], ["SET", on_b, b"2"]]]])
    assert got[0] == ("ERR", "NODE_DOWN") and got[1] == "OK"
    assert got[2][0] == [P.OK, "OK"] and got[2][1][1] == "NODE_DOWN"


def test_writes_to_a_range_being_rolled_back_are_refused_unapplied(
        nodes: dict[str, Node]) -> None:
    net = Net(nodes)
    s1 = state(1, [A, B])
    copy = move_state(s1, [A, B, C], "copy", 3, members=[A, B, C])
    revert = ClusterState(4, copy.members, copy.vnodes, {**copy.move, "phase": "revert"})
    net.config(revert)
    r = router_for(revert)
    p = Placement(revert)
    moving = next(k for k in (b"r%d" % i for i in range(5000)) if p.moving_key(k))
    got = net.run(r, [["SET", moving, b"x"], ["DEL", moving], ["MSET", [moving, b"y"]]])
    assert all(g == ("ERR", "UNAVAILABLE") for g in got), got
    assert all(moving not in n.storage.keyspace.data for n in nodes.values())


def test_a_long_pipeline_on_a_moving_key_refused_at_once_takes_no_recursion(
        nodes: dict[str, Node]) -> None:
    """A pipeline of many commands on one moving key, sent during the copy: the first
    SET is under way and the rest wait their turns; the rollback begins; when the
    first's reply comes, the rest are refused one after another at once, in a loop
    (a recursion as deep as the pipeline is long would end in RecursionError)."""
    net = Net(nodes)
    s1 = state(1, [A, B])
    copy = move_state(s1, [A, B, C], "copy", 3, members=[A, B, C])
    revert = ClusterState(4, copy.members, copy.vnodes, {**copy.move, "phase": "revert"})
    net.config(copy)
    moving = next(k for k in (b"r%d" % i for i in range(5000))
                  if Placement(copy).moving_key(k))
    router = Router(Placement(copy), P.DEFAULT_LIMITS, 1.0)
    body = P.encode_request("PIPE", [["SET", moving, b"%d" % i] for i in range(5000)])
    router.request(0, body, 0.0)
    net.hold = True
    assert net.step(router, 0.0) == []
    net.hold = False
    net.config(revert)
    router.set_placement(Placement(revert))
    net.release(router, 0.0)
    [(_, reply)] = router.ready().answers  # one answer, once
    [first, *rest] = decode(reply)
    assert first[0] == P.OK and len(rest) == 4999
    assert all(i[0] == P.ERR and i[1] == "UNAVAILABLE" for i in rest)


def test_counters_deadlines_and_retries_through_a_move(nodes: dict[str, Node]) -> None:
    """INCRs on keys whose move is under way are applied once, on the state the old
    owner had; a tagged write applied before the move and retried during it gets its
    first outcome (the old owner is asked); a read of a deadline not yet streamed
    comes from the old owner."""
    net = Net(nodes, seed=5)
    s1 = state(1, [A, B])
    net.config(s1)
    live = router_for(s1)
    keys = [b"c%03d" % i for i in range(60)]
    first = net.run(live, [["ONCE", b"client-1", i, ["INCRBY", k, 10]]
                           for i, k in enumerate(keys)])
    assert first == [10] * len(keys)
    assert net.run(live, [["SET", b"ttl", b"v", {"pxat": 1 << 45}]]) == ["OK"]
    doomed = [b"d%03d" % i for i in range(60)]
    assert net.run(live, [["MSET", [x for k in doomed for x in (k, b"v")]]]) == ["OK"]
    prepare = move_state(s1, [A, B, C], "prepare", 2)
    copy = move_state(s1, [A, B, C], "copy", 3, members=[A, B, C])
    configs = {2: prepare, 3: copy}
    move_id = prepare.move["id"]  # type: ignore[index]
    ranges = RangeSet()
    for t in prepare.move["transfers"]:  # type: ignore[index]
        ranges = ranges.union(RangeSet.from_list(t["ranges"]))
    net.config(prepare)
    net.call(C, "XBEGIN", {"id": move_id, "ranges": ranges.to_list(), "purge": True})
    net.config(copy)
    live.set_placement(Placement(copy))
    moving = [k for k in keys if Placement(copy).moving_key(k)]
    assert moving, "some counters must be moving"
    # the retries of the writes applied before the move: their first outcome
    again = net.run(live, [["ONCE", b"client-1", i, ["INCRBY", k, 10]]
                           for i, k in enumerate(keys)], configs=configs)
    assert again == first
    # new increments, tagged and not, on the moving keys: once each, on the old state
    assert net.run(live, [["ONCE", b"client-2", i, ["INCR", k]]
                          for i, k in enumerate(moving)], configs=configs) == [11] * len(moving)
    assert net.run(live, [["INCR", k] for k in moving], configs=configs) == [12] * len(moving)
    assert net.run(live, [["SET", k, b"x", {"nx": True}] for k in moving],
                   configs=configs) == [None] * len(moving)
    if Placement(copy).moving_key(b"ttl"):
        assert net.run(live, [["PEXPIRETIME", b"ttl"]], configs=configs) == [1 << 45]
    # a tagged DEL of a key still only at its old owner, its reply lost, the key set
    # again, the DEL retried: its first outcome, and the later SET is not undone
    gone = next(k for k in doomed if Placement(copy).moving_key(k))
    delete = ["ONCE", b"client-4", 1, ["DEL", gone]]
    assert net.run(live, [delete], configs=configs) == [1]
    assert net.run(live, [["SET", gone, b"again"]], configs=configs) == ["OK"]
    assert net.run(live, [delete], configs=configs) == [1]
    assert net.run(live, [["GET", gone]], configs=configs) == [b"again"]
    # with the old owner down, it cannot say whether it applied a tagged write: refused
    # (worth a retry), never applied on the chance that it was not
    old = Placement(copy).old_owner(moving[0])
    live.set_down(old, True, 0.0)
    refused = net.run(live, [["ONCE", b"client-3", 1, ["INCR", moving[0]]]], configs=configs)
    assert refused == [("ERR", "UNAVAILABLE")]
    live.set_down(old, False, 0.0)
    for t in prepare.move["transfers"]:  # type: ignore[index]
        stream(net, move_id, t["source"], C, RangeSet.from_list(t["ranges"]))
    got = net.run(live, [["GET", k] for k in keys], configs=configs)
    assert got == [b"12" if k in moving else b"10" for k in keys]


def test_a_tagged_mset_is_one_client_to_the_nodes_and_safe_to_retry(
        nodes: dict[str, Node]) -> None:
    """Each key's SET of a tagged MSET has an id of its own, all under one client per
    node's table (a client each would crowd out every real client's outcomes)."""
    net = Net(nodes)
    s1 = state(1, [A, B])
    net.config(s1)
    r = router_for(s1)
    pairs = [x for i in range(80) for x in (b"m%03d" % i, b"v")]
    request = ["ONCE", b"client-1", 7, ["MSET", pairs]]
    assert net.run(r, [request]) == ["OK"]
    assert net.run(r, [["SET", b"m000", b"later"]]) == ["OK"]
    assert net.run(r, [request]) == ["OK"]  # a retry: applied once, the later SET stays
    assert net.run(r, [["GET", b"m000"]]) == [b"later"]
    for name in (A, B):
        table = nodes[name].storage.keyspace.once
        assert list(table.clients) == [b"client-1/m"] and 10 < len(table) < 70


def test_a_pipelines_commands_on_a_moving_key_run_in_order(nodes: dict[str, Node]) -> None:
    """A pipeline's commands on one key whose range is being moved take a chain of steps
    each (the new owner, maybe the old one): they run one after another, as the
    pipeline orders them, never side by side (a SET then a GET of one key read the
    value from before the SET), before the copy, during it and after it."""
    net = Net(nodes, seed=5)
    net.shuffle = True
    s1 = state(1, [A, B])
    net.config(s1)
    prepare = move_state(s1, [A, B, C], "prepare", 2)
    copy = move_state(s1, [A, B, C], "copy", 3, members=[A, B, C])
    move_id = prepare.move["id"]  # type: ignore[index]
    transfers = prepare.move["transfers"]  # type: ignore[index]
    moving = RangeSet()
    for t in transfers:
        moving = moving.union(RangeSet.from_list(t["ranges"]))
    keys = [k for k in (b"o%03d" % i for i in range(400)) if moving.contains(key_hash(k))][:12]
    assert len(keys) == 12
    router = router_for(s1)
    assert net.run(router, [["MSET", [x for k in keys for x in (k, b"old")]]]) == ["OK"]
    net.config(prepare)
    assert net.call(C, "XBEGIN", {"id": move_id, "ranges": moving.to_list(),
                                  "purge": True})["ready"]
    net.config(copy)
    router.set_placement(Placement(copy))

    def pipeline(k: bytes, tag: bytes) -> list[Any]:
        items = [["GET", k], ["SET", k, tag + b"1"], ["GET", k], ["APPEND", k, b"+"],
                 ["GET", k], ["DEL", k], ["GET", k], ["SET", k, tag + b"2"], ["GET", k]]
        [reply] = net.run(router, [["PIPE", items]])
        return [r[1] if r[0] == P.OK else ("ERR", r[1]) for r in reply]

    for n, k in enumerate(keys):
        if n == len(keys) // 2:  # half way: the copy arrives at the new owner
            for t in transfers:
                stream(net, move_id, t["source"], C, RangeSet.from_list(t["ranges"]))
        assert pipeline(k, b"t%d" % n) == [
            b"old", "OK", b"t%d1" % n, len(b"t%d1+" % n), b"t%d1+" % n, 1, None, "OK",
            b"t%d2" % n], k
