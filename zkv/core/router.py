"""The routing core: client requests and node replies in, messages out. No I/O.

The proxy, a follower proxy and the direct-routing client are thin shells around a
:class:`Router` (the way etcd-io/raft's ``Step``/``Ready`` works): the shell feeds
it what arrives and the time, and carries out what it returns.

    router.request(client, body, now)     a client's request (its body, undecoded)
    router.reply(tag, body, now)          a node's reply to one of our requests
    router.tick(now)                      deadlines
    router.set_placement(placement)       a new cluster configuration
    router.set_down(node, down)           what heartbeats say
    router.ready() -> Ready               requests to send (per node), replies to give

Every request to a node is sent with the epoch of the placement it was routed by
(the shell puts each node's requests of a loop turn into one envelope,
``zkv.core.protocol.encode_envelope``). A node refuses a request routed by another
epoch than its own; the router then parks what was refused, says in
``Ready.wants`` which epoch it needs, and routes it again once
:meth:`set_placement` gives it one that new. Nothing refused that way was applied,
so sending it again is safe.

A client request becomes a job. Single-key commands on keys that stay put are
forwarded as they are and their reply given back as it is. MGET, MSET and PIPE are
split per node and merged in the client's order, within the reply budget. A key
being moved takes the move protocol's steps, each a state of its job, not a
callback: a read asks the new owner (XGET), then the old one when the new one has
no state of it; a DEL asks the old owner whether the key exists before writing its
tombstone at the new one; during a rollback (MOVE ABORT) writes to those ranges are
refused. A bug in any step becomes an error reply to that client, never a dead loop.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    CommandError,
    CrossNode,
    InternalError,
    LimitExceeded,
    Moved,
    NodeBehind,
    NodeUnavailable,
    OutcomeUnknown,
    ProtocolError,
    StaleEpoch,
    Timeout,
    Unavailable,
    ZkvError,
)
from . import protocol as P
from .keyspace import PRESENT, UNKNOWN
from .once import MAX_CLIENT_ID
from .placement import Placement
from .ring import key_hash
from .timings import Timings

log = logging.getLogger("zkv.router")

__all__ = ["CORE_OPS", "Ready", "Router"]

# The commands a router serves by itself; anything else is the shell's (INFO, admin).
CORE_OPS = frozenset(("MGET", "MSET", "MSETNX", "PIPE", "SCAN", "KEYS", "PING", "DBSIZE",
                      "ONCE")) | P.SINGLE_KEY_OPS
MAX_REROUTES = 8  # times one request may be refused for a stale view before it fails
BEHIND_RETRY = 0.05  # seconds before a request a node was behind for is sent again
KEYS_PAGE = 10_000
# Keys written during a move's copy that a router remembers, to know which reads may
# fall back to the old owner while the new one is down (see Router.dirty).
MAX_DIRTY = 1_000_000

(_GET_NEW, _GET_OLD, _DEL_STATE, _DEL_EXISTS, _DEL_WRITE, _PLAIN, _GROUP, _SCAN, _ANY_NEW,
 _PEEK_OLD, _FILL_NEW, _SEEN_OLD) = range(12)
# SET options that make it read the key's state first (during a move, that state may
# still be at the old owner)
_STATEFUL_SET = ("keepttl", "nx", "xx", "get", "ifeq")


@dataclass
class Ready:
    """What the shell must do now: send ``sends[node]`` (tag, body) pairs to each node in
    one envelope of epoch ``epoch``; give each client its reply; and, if ``wants`` is
    set, obtain a configuration of at least that epoch."""

    epoch: int
    sends: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    answers: list[tuple[Any, bytes]] = field(default_factory=list)
    wants: int | None = None


class Op:
    """One key's command within a job: what it is, and where its result goes."""

    __slots__ = ("args", "body", "ident", "job", "kind", "slot", "state", "tries")

    def __init__(self, job: Job, slot: int, kind: str, args: list[Any],
                 body: bytes | None = None, ident: tuple[bytes, int] | None = None) -> None:
        self.job, self.slot, self.kind, self.args, self.body = job, slot, kind, args, body
        self.ident = ident  # (client id, seq) of a write tagged for safe retries
        self.state: Any = None  # the chain's memory (what the old owner said, ...)
        self.tries = 0

    def item(self) -> list[Any]:
        """The op as a request (tagged, if it was)."""
        if self.ident is None:
            return [self.kind, *self.args]
        return ["ONCE", self.ident[0], self.ident[1], [self.kind, *self.args]]

    @property
    def key(self) -> bytes:
        return self.args[0]  # type: ignore[no-any-return]

    @property
    def write(self) -> bool:
        return self.kind in P.WRITE_OPS


class Job:
    """One client request: its ops' results gather here, and it answers once."""

    __slots__ = ("client", "deadline", "done", "encode", "ident", "in_turn", "kind", "left",
                 "over", "raw", "results", "used", "value_budget")

    def __init__(self, client: Any, kind: str, parts: int, deadline: float) -> None:
        self.client, self.kind, self.deadline = client, kind, deadline
        self.results: list[Any] = [None] * parts
        self.left = parts
        self.done = False
        self.raw: bytes | None = None  # a reply forwarded as it is (single commands)
        self.value_budget: int | None = None
        self.used = 0
        self.over = False  # MGET: the budget ran out, the whole reply is TOO_LARGE
        self.ident: tuple[bytes, int] | None = None  # a tagged MSET's (client id, seq)
        self.in_turn: dict[bytes, _Turn] | None = None  # moving keys' ops, one at a time


class _Turn:
    """The ops of one job on one moving key: the one under way, and those after it."""

    __slots__ = ("after", "finished", "op", "routing")

    def __init__(self, op: Op) -> None:
        self.op = op
        self.after: collections.deque[Op] = collections.deque()
        self.routing = False  # the next op is being routed (its result may come at once)
        self.finished = False  # ...and it did


@dataclass
class _Sent:
    """A request in flight: to whom, for which ops, how it is to be read."""

    node: str
    kind: int
    ops: list[Op]
    deadline: float
    epoch: int
    extra: Any = None


class Router:
    def __init__(self, placement: Placement, limits: P.Limits, timeout: float,
                 knows_every_write: bool = False) -> None:
        self.placement = placement
        self.limits = limits
        self.timeout = timeout
        self.down: set[str] = set()
        self._seq = 0
        self.inflight: dict[int, _Sent] = {}
        self.deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self.parked: list[Op] = []  # refused for a stale view: routed again at ``need``
        self.need = 0
        self.delayed: list[tuple[float, Op]] = []  # refused by a node behind: again soon
        self.now = 0.0
        self._ready = Ready(placement.epoch)
        # A key written through this router during a move's copy, and whether this router
        # saw every such write (only a router that is the only one can): then a read of
        # a key not among them may fall back to the old owner while the new one is down.
        self.knows_every_write = knows_every_write
        self.dirty: set[bytes] = set()
        self.dirty_known = False
        self.requests = 0
        self.errors = 0
        # for the metrics (zkv.metrics): requests by op, errors by code, and while
        # ``timed``, request-to-reply times by op
        self.ops: dict[str, int] = {}
        self.error_codes: dict[tuple[str, str], int] = {}  # (op, code) -> error replies
        self.timings = Timings()
        self.timed = False

    # -- inputs ------------------------------------------------------------------------
    def set_placement(self, placement: Placement) -> None:
        old_move = self.placement.state.move
        new_move = placement.state.move
        if placement.moving is None:
            self.dirty.clear()
            self.dirty_known = False
        elif self.placement.moving is None or (old_move or {}).get("id") != (new_move or {}).get(
                "id"):
            # a copy starts, seen from its start: every write of it goes through here
            self.dirty.clear()
            self.dirty_known = self.knows_every_write
        self.placement = placement
        self._ready.epoch = placement.epoch
        if self.parked and placement.epoch >= self.need:
            parked, self.parked = self.parked, []
            for op in parked:
                if not op.job.done:
                    self._route(op)

    def set_down(self, node: str, down: bool, now: float) -> None:
        if down:
            if node in self.down:
                return
            self.down.add(node)
            lost = [tag for tag, sent in self.inflight.items() if sent.node == node]
            for tag in lost:
                sent = self.inflight.pop(tag)
                self._fail_sent(sent, NodeUnavailable(
                    f"{self.placement.state.describe(node)} went down with this request "
                    "in flight; "
                    "the outcome of a write is unknown"))
        else:
            self.down.discard(node)

    def request(self, client: Any, body: bytes, now: float) -> None:
        """A client's request body, undecoded."""
        self.now = now
        self.requests += 1
        try:
            op, args = P.parse_request(body, self.limits)
        except ZkvError as exc:
            self._answer_error(client, exc)
            return
        self.request_parsed(client, op, args, body, now)

    def request_parsed(self, client: Any, op: str, args: list[Any], body: bytes | None,
                       now: float) -> None:
        """A request already parsed (by a shell that serves other commands itself);
        ``body``: its encoding, when the shell has it (else made where needed)."""
        ident: tuple[bytes, int] | None = None
        if op == "ONCE":  # a tagged write: routed (and counted) as its request, sent tagged
            ident, (op, args) = (args[0], args[1]), args[2]
        self.ops[op] = self.ops.get(op, 0) + 1
        self.now = now
        deadline = now + self.timeout
        try:
            if op in P.SINGLE_KEY_OPS:
                job = Job(client, "one", 1, deadline)
                self._route(Op(job, 0, op, args, body, ident))
            elif op == "MSETNX":
                self._msetnx(client, args, body, deadline, ident)
            elif op == "DBSIZE":
                self._dbsize(client, deadline)
            elif op == "MGET":
                self._mget(client, args, deadline)
            elif op == "MSET":
                self._mset(client, args, deadline, ident)
            elif op == "PIPE" and len(args) > 2 and args[2]:
                self._atomic(client, args[0], args[1], deadline)
            elif op == "PIPE":
                self._pipe(client, args[0], deadline)
            elif op == "PING":
                self._answer_body(client, P.encode_ok("PONG"))
            elif op == "SCAN":
                self._scan(client, args, deadline)
            elif op == "KEYS":
                self._keys(client, args, deadline)
            else:
                raise CommandError(f"{op} is not served here")
        except ZkvError as exc:
            self._answer_error(client, exc, op)
        except Exception as exc:  # noqa: BLE001 - one boundary per request
            log.exception("internal error routing %s", op)
            self._answer_error(client, InternalError(f"{type(exc).__name__}: {exc}"), op)

    def reply(self, tag: int, body: bytes, now: float) -> None:
        """A node's reply body to request ``tag``."""
        self.now = now
        sent = self.inflight.pop(tag, None)
        if sent is None:
            return  # a late reply to a request that already timed out
        try:
            self._on_reply(sent, body, now)
        except Exception as exc:  # noqa: BLE001 - the boundary around every step
            log.exception("internal error handling a reply from %s", sent.node)
            self._fail_sent(sent, InternalError(f"{type(exc).__name__}: {exc}"))

    def envelope_reply(self, node: str, body: bytes, waiting: set[int] | None,
                       now: float) -> None:
        """A node's answer to an envelope: a reply envelope (each entry to its request;
        its tags leave ``waiting``), or one error refusing the whole envelope (every tag
        still ``waiting`` fails with it). ``waiting``: the envelope's unanswered tags,
        None when it is no longer known (late)."""
        if body[:3] == P.REPLY_ENVELOPE:
            try:
                entries = P.decode_reply_envelope(body)
            except ZkvError:
                entries = []
            for tag, entry in entries:
                self.reply(tag, entry, now)
                if waiting is not None:
                    waiting.discard(tag)
        elif waiting is not None:
            try:
                P.decode_reply(body)
                error: ZkvError = ProtocolError(f"node {node} answered an envelope oddly")
            except ZkvError as exc:
                error = exc
            self.fail_tags(list(waiting), error)
            waiting.clear()

    def tick(self, now: float) -> None:
        self.now = now
        deadlines, inflight = self.deadlines, self.inflight
        while deadlines and deadlines[0][0] <= now:
            _, tag = deadlines.popleft()
            sent = inflight.pop(tag, None)
            if sent is not None:
                self._fail_sent(sent, Timeout(
                    f"node {sent.node} did not answer in time; the outcome of a write is "
                    "unknown"))
        if self.delayed and self.delayed[0][0] <= now:
            due = [op for when, op in self.delayed if when <= now]
            self.delayed = [(w, o) for w, o in self.delayed if w > now]
            for op in due:
                if not op.job.done:
                    self._route(op)
        if self.parked:
            keep = []
            for op in self.parked:
                if op.job.done:
                    continue
                if op.job.deadline <= now:
                    self._result(op, Unavailable(
                        f"no configuration at epoch {self.need} (or later) came in time: "
                        "refused unapplied by a node that had it; try again"))
                else:
                    keep.append(op)
            self.parked = keep

    def ready(self) -> Ready:
        out = self._ready
        if self.parked and self.need > self.placement.epoch:
            out.wants = self.need
        self._ready = Ready(self.placement.epoch)
        return out

    @property
    def in_flight(self) -> int:
        return len(self.inflight)

    # -- sending -----------------------------------------------------------------------
    def _send(self, node: str, body: bytes, kind: int, ops: list[Op], deadline: float,
              extra: Any = None) -> None:
        if node in self.down:
            raise NodeUnavailable(f"{self.placement.state.describe(node)} is down")
        self._seq += 1
        tag = self._seq
        self._ready.sends.setdefault(node, []).append((tag, body))
        self.inflight[tag] = _Sent(node, kind, ops, deadline, self.placement.epoch, extra)
        self.deadlines.append((deadline, tag))

    def _send_call(self, call: _Call) -> None:
        try:
            self._send(call.node, call.body, _SCAN, [], call.deadline, call)
        except ZkvError as exc:
            call(exc)

    def _answer_body(self, client: Any, body: bytes) -> None:
        self._ready.answers.append((client, body))

    def _answer_error(self, client: Any, exc: ZkvError, op: str = "?") -> None:
        self.errors += 1
        key = (op, exc.code)
        self.error_codes[key] = self.error_codes.get(key, 0) + 1
        self._ready.answers.append((client, P.encode_exc(exc)))

    # -- routing one op --------------------------------------------------------------------
    def _route(self, op: Op) -> None:
        """Send an op where the placement says, as a step of its chain if its key moves."""
        try:
            if op.kind == "CALL":  # a whole-cluster call's part, refused once: again
                call = op.args[0]
                p = self.placement
                if p.state.move is not None or frozenset(p.ring.members) != call.members:
                    raise Unavailable(
                        "the cluster's nodes changed under this DBSIZE or KEYS (a move); "
                        "nothing of it was kept: run it again")
                self._send_call(call)
                return
            if op.kind == "RAWPIPE":  # a pipeline sent whole to one node: split it anew
                self._pipe(op.job.client, op.args[0], op.job.deadline)
                return
            if op.kind == "ATOMIC":
                self._send_atomic(op)
                return
            p = self.placement
            if p.moving is not None and p.moving_key(op.key):
                self._moving(op)
                return
            if not len(p.ring):
                raise Unavailable("the cluster has no nodes yet (ADD one)")
            node = p.owner(op.key)
            self._send(node, self._body(op), _PLAIN, [op], op.job.deadline)
        except ZkvError as exc:
            self._result(op, exc)

    def _route_in_turn(self, op: Op) -> None:
        """Route a moving key's op of a job of many once the job's earlier ops on that key
        are done. Each takes a chain of steps (the new owner, perhaps the old one), so
        two at once could pass each other: a pipeline's SET then GET of one key would
        read the value from before the SET."""
        job = op.job
        if job.in_turn is None:
            job.in_turn = {}
        turn = job.in_turn.get(op.key)
        if turn is not None:
            turn.after.append(op)
            return
        job.in_turn[op.key] = _Turn(op)
        self._route(op)

    def _next_in_turn(self, op: Op) -> None:
        """``op`` is done: the next ops of its job on its key go, one at a time (in a
        loop, not by recursion: many may be answered at once, refused say)."""
        in_turn = op.job.in_turn
        turn = in_turn.get(op.key) if in_turn else None
        if turn is None or turn.op is not op:
            return
        if turn.routing:  # answered while the loop below routed it: the loop goes on
            turn.finished = True
            return
        while turn.after:
            turn.op = turn.after.popleft()
            turn.routing, turn.finished = True, False
            self._route(turn.op)
            turn.routing = False
            if not turn.finished:
                return  # under way: its result brings the next
        assert in_turn is not None
        del in_turn[op.key]

    def _moving(self, op: Op) -> None:
        """The first step of a moving key's chain (the rest are in :meth:`_chain`)."""
        p = self.placement
        key = op.key
        new, old = p.owner(key), p.old_owner(key)
        if op.write and p.phase == "revert":
            self._result(op, Unavailable(
                f"key {key[:64]!r} is in a range whose move is being rolled back (MOVE "
                "ABORT): writes to it wait until the rollback is done; nothing changed"))
            return
        if op.ident is not None and op.write and op.state is None:
            # a tagged write may be the retry of one the old owner applied before the
            # move: ask it first (it takes no writes of these keys any more)
            op.state = "asked"
            try:
                self._send(old, P.encode_request("XSEEN", {"client": op.ident[0],
                                                           "seq": op.ident[1]}),
                           _SEEN_OLD, [op], op.job.deadline, (new, old))
                return
            except NodeUnavailable as exc:
                self._result(op, _cannot_say(op, old, exc))
                return
        self._moving_steps(op, new, old)

    def _moving_steps(self, op: Op, new: str, old: str) -> None:
        key = op.key
        if op.kind == "SET" and not (len(op.args) > 2 and op.args[2]
                                     and any(o in op.args[2] for o in _STATEFUL_SET)):
            self._written(key)
            self._send(new, self._body(op), _PLAIN, [op], op.job.deadline)
        elif op.kind == "DEL":
            self._send(new, P.encode_request("XGET", key), _DEL_STATE, [op], op.job.deadline,
                       (new, old))
        elif op.kind == "MSETNX":
            raise Unavailable("the keys of this MSETNX are being moved between nodes; "
                              "nothing was set: try again when the move is done")
        elif op.kind not in ("GET", "EXISTS"):
            # any other command: where the new owner knows the key's state, it runs
            # there; else a read runs at the old owner, and a write first brings the
            # state over (XPEEK at the old owner, XFILL at the new) and then runs
            self._send(new, P.encode_request("XGET", key), _ANY_NEW, [op], op.job.deadline,
                       (new, old))
        else:
            try:
                self._send(new, P.encode_request("XGET", key), _GET_NEW, [op],
                           op.job.deadline, (new, old))
            except NodeUnavailable as exc:  # the new owner is down: maybe the old one
                self._chain(_Sent(new, _GET_NEW, [op], op.job.deadline, self.placement.epoch,
                                  (new, old)), exc)

    @staticmethod
    def _body(op: Op) -> bytes:
        return op.body if op.body is not None else P.encode_request(*op.item())

    def _written(self, key: bytes) -> None:
        if not self.dirty_known:
            return
        if len(self.dirty) >= MAX_DIRTY:
            log.warning("more than %d keys written during this move: reads of moving keys no "
                        "longer fall back to the old owner while a new one is down", MAX_DIRTY)
            self.dirty_known = False
            self.dirty.clear()
        else:
            self.dirty.add(key)

    # -- replies -----------------------------------------------------------------------
    def _on_reply(self, sent: _Sent, body: bytes, now: float) -> None:
        if sent.kind == _PLAIN and len(sent.ops) == 1 and sent.ops[0].job.kind == "one":
            op = sent.ops[0]
            if not _is_error(body):
                job = op.job
                if not job.done:
                    job.done = True
                    if self.timed:
                        self._timed(op.kind, job)
                    self._answer_body(job.client, body)
                return
        try:
            result: Any = P.decode_reply(body)
        except ZkvError as exc:
            result = exc
        if isinstance(result, (StaleEpoch, NodeBehind, Moved)):
            self._refused(sent, result, now)
            return
        if sent.kind == _PLAIN:
            self._result(sent.ops[0], result)
        elif sent.kind == _GROUP:
            self._group_result(sent, result)
        elif sent.kind == _SCAN:
            sent.extra(result)
        else:
            self._chain(sent, result)

    def _refused(self, sent: _Sent, exc: ZkvError, now: float) -> None:
        """The node would not take these ops as routed (nothing of them was applied):
        route them again, by a newer configuration when ours is the stale one."""
        ops = sent.ops
        if sent.kind == _SCAN:
            call = sent.extra
            if not isinstance(call, _Call):  # a SCAN page: its cursor was that process's
                call(Unavailable(
                    f"the cluster's configuration changed under this SCAN "
                    f"({exc.code}: a FAILOVER, say); start it again from 0"))
                return
            if call.restart is not None:
                call.body = call.restart()
            op = Op(Job(None, "call", 1, call.deadline), 0, "CALL", [call])
            op.tries = call.tries
            call.tries += 1
            ops = [op]
        epoch = exc.details.get("epoch")
        for op in ops:
            op.tries += 1
            op.state = None  # its chain starts again where it is routed (XSEEN too)
            if op.tries > MAX_REROUTES:
                self._result(op, exc)
            elif isinstance(exc, NodeBehind):
                self.delayed.append((now + BEHIND_RETRY, op))  # it is catching up
            elif sent.epoch < self.placement.epoch:
                self._route(op)  # we have a newer configuration already
            else:
                want = epoch if isinstance(epoch, int) and epoch > sent.epoch \
                    else sent.epoch + 1
                self.need = max(self.need, want)
                self.parked.append(op)

    def _fail_sent(self, sent: _Sent, exc: ZkvError) -> None:
        """A request that got no reply (timed out, or its node went down)."""
        if sent.kind == _SCAN:
            sent.extra(exc)
        elif sent.kind == _GROUP:
            self._group_result(sent, exc)
        elif sent.kind == _PLAIN:
            self._result(sent.ops[0], exc)
        else:
            self._chain(sent, exc)  # a read of a moving key may still ask the old owner

    def fail_tags(self, tags: list[int], exc: ZkvError) -> None:
        """Requests whose whole envelope was refused (the shell saw a plain error reply)."""
        for tag in tags:
            sent = self.inflight.pop(tag, None)
            if sent is not None:
                self._fail_sent(sent, exc)

    def _step(self, op: Op, node: str, body: bytes, kind: int, extra: Any) -> None:
        """Send the next step of an op's chain; if it cannot go, the op fails with why."""
        try:
            self._send(node, body, kind, [op], op.job.deadline, extra)
        except ZkvError as exc:
            self._result(op, exc)

    def _chain(self, sent: _Sent, result: Any) -> None:
        """The next step of a moving key's chain (see the module)."""
        op = sent.ops[0]
        new, old = sent.extra
        if sent.kind == _SEEN_OLD:
            if isinstance(result, list) and result and result[0] is True:
                outcome = result[1] if len(result) > 1 else None
                if isinstance(outcome, dict):
                    outcome = CommandError(f"this {op.kind} was applied already (a retry); "
                                           "its reply was too large to keep: read the key")
                self._result(op, outcome)  # the first outcome: not applied again
            elif isinstance(result, OutcomeUnknown):
                self._result(op, result)
            elif isinstance(result, ZkvError):
                # the old owner cannot say: going on could apply a retry twice
                self._result(op, _cannot_say(op, old, result))
            else:  # not applied there: go on
                try:
                    self._moving_steps(op, new, old)
                except ZkvError as exc:
                    self._result(op, exc)
            return
        if sent.kind == _GET_NEW:
            if isinstance(result, ZkvError):
                if (isinstance(result, Unavailable) and self.dirty_known
                        and op.key not in self.dirty):
                    self._step(op, old, P.encode_request(op.kind, op.key), _GET_OLD, (new, old))
                else:
                    self._result(op, result)
                return
            state, value = result
            if state == UNKNOWN:
                self._step(op, old, P.encode_request(op.kind, op.key), _GET_OLD, (new, old))
            elif op.kind == "GET":
                self._result(op, value if state == PRESENT else None)
            else:
                self._result(op, int(state == PRESENT))
        elif sent.kind == _GET_OLD:
            self._result(op, result)
        elif sent.kind == _DEL_STATE:
            if isinstance(result, ZkvError):
                self._result(op, result)
            elif result[0] == UNKNOWN:
                self._step(op, old, P.encode_request("EXISTS", op.key), _DEL_EXISTS, (new, old))
            else:
                self._del_write(op, new, old, 0)
        elif sent.kind == _DEL_EXISTS:
            if isinstance(result, ZkvError):
                self._result(op, result)  # nothing was deleted: the truth
            else:
                self._del_write(op, new, old, int(result))
        elif sent.kind == _DEL_WRITE:
            if isinstance(result, ZkvError):
                self._result(op, result)
            else:
                self._result(op, int(bool(result[0]) or bool(op.state)))
        elif isinstance(result, ZkvError):
            self._result(op, result)  # nothing of a write was applied where it failed
        elif sent.kind == _ANY_NEW:
            if result[0] != UNKNOWN:
                self._run_at(op, new)
            elif not op.write:
                self._step(op, old, self._body(op), _PLAIN, None)
            else:
                self._step(op, old, P.encode_request("XPEEK", op.key), _PEEK_OLD, (new, old))
        elif sent.kind == _PEEK_OLD:
            state, value, deadline = result
            fill = {"key": op.key, "value": value if state == PRESENT else None,
                    "deadline": deadline if state == PRESENT else None}
            self._step(op, new, P.encode_request("XFILL", fill), _FILL_NEW, (new, old))
        elif sent.kind == _FILL_NEW:
            self._run_at(op, new)

    def _run_at(self, op: Op, node: str) -> None:
        if op.write:
            self._written(op.key)
        self._step(op, node, self._body(op), _PLAIN, None)

    def _del_write(self, op: Op, new: str, old: str, existed_elsewhere: int) -> None:
        op.state = existed_elsewhere
        self._written(op.key)
        # (tagged, the new owner remembers the outcome, deleted or existed elsewhere)
        body = P.encode_request("XDEL", op.key) if op.ident is None else P.encode_request(
            "XDEL", op.key, {"client": op.ident[0], "seq": op.ident[1],
                             "also": existed_elsewhere})
        self._step(op, new, body, _DEL_WRITE, (new, old))

    # -- results -----------------------------------------------------------------------
    def _result(self, op: Op, result: Any) -> None:
        """An op's outcome (a value, or a ZkvError): into its job, which may then answer."""
        job = op.job
        if job.done:
            return
        if job.kind == "call":
            job.done = True
            op.args[0](result)
            return
        if job.kind == "one":
            job.done = True
            if self.timed:
                self._timed("PIPE" if op.kind == "RAWPIPE" else op.kind, job)
            if isinstance(result, ZkvError):
                self._answer_error(job.client, result,
                                   "PIPE" if op.kind == "RAWPIPE" else op.kind)
            elif op.kind == "RAWPIPE" or op.kind == "ATOMIC":
                self._answer_body(job.client, P.encode_ok_items(result))
            else:
                self._answer_body(job.client, P.encode_ok(result))
            return
        if job.value_budget is not None and type(result) is bytes and not op.write:
            if job.used + len(result) + 16 > job.value_budget:
                if job.kind == "mget":
                    job.done = True
                    self._answer_error(job.client, LimitExceeded(
                        f"the reply would be over {job.value_budget} bytes "
                        "(max_message_bytes); ask for fewer keys at once"), "MGET")
                    return
                result = LimitExceeded(
                    "not returned: this value does not fit in what is left of the "
                    f"pipeline's reply budget of {job.value_budget} bytes "
                    "(max_message_bytes); GET this key on its own")
            else:
                job.used += len(result) + 16
        if job.results[op.slot] is None:
            job.left -= 1
        job.results[op.slot] = _Done(result)
        if job.in_turn:
            self._next_in_turn(op)  # (its ops may all be answered in it, and the job too)
        if job.left == 0 and not job.done:
            self._finish(job)

    def _timed(self, op: str, job: Job) -> None:
        """Request to reply, for the metrics (a job's deadline says when it came)."""
        self.timings.observe(op, self.now - (job.deadline - self.timeout))

    def _finish(self, job: Job) -> None:
        job.done = True
        if self.timed:
            self._timed(job.kind.upper(), job)
        values = [r.value for r in job.results]
        try:
            if job.kind == "mget":
                for v in values:
                    if isinstance(v, ZkvError):
                        raise v
                body = P.encode_ok(values)
            elif job.kind == "mset":
                for v in values:
                    if isinstance(v, ZkvError):
                        raise v
                body = P.encode_ok("OK")
            else:  # pipe
                body = P.encode_ok_items([
                    P.error_item(v) if isinstance(v, ZkvError) else
                    (v.item if isinstance(v, _Item) else P.reply_item(v)) for v in values])
        except ZkvError as exc:
            self._answer_error(job.client, exc, job.kind.upper())
            return
        if len(body) > self.limits.max_message_bytes:
            self._answer_error(job.client, LimitExceeded(
                f"the reply would be {len(body)} bytes, over the max_message_bytes limit "
                f"of {self.limits.max_message_bytes}; ask for less"), job.kind.upper())
            return
        self._answer_body(job.client, body)

    # -- many keys ---------------------------------------------------------------------
    def _mget(self, client: Any, args: list[Any], deadline: float) -> None:
        keys: list[bytes] = args[0]
        job = Job(client, "mget", len(keys), deadline)
        job.value_budget = self.limits.max_message_bytes - 256 * len(keys) - 1024
        self._dispatch(job, [Op(job, i, "GET", [k]) for i, k in enumerate(keys)])

    def _mset(self, client: Any, args: list[Any], deadline: float,
              ident: tuple[bytes, int] | None = None) -> None:
        pairs: list[bytes] = args[0]
        p = self.placement
        if p.phase == "revert" and p.moving is not None:
            for key in pairs[0::2]:
                if p.moving_key(key):
                    raise Unavailable(
                        f"key {key[:64]!r} is in a range whose move is being rolled back "
                        "(MOVE ABORT): writes to it wait until the rollback is done; "
                        "nothing changed")
        n = len(pairs) // 2
        job = Job(client, "mset", n, deadline)
        job.ident = ident
        # (tagged, each key's SET has an id of its own, however it is routed: a retry
        # routed otherwise, or a table of outcomes moved to another node, finds it)
        self._dispatch(job, [Op(job, i, "SET", [pairs[2 * i], pairs[2 * i + 1]], None,
                                None if ident is None else _part_id(ident, i))
                             for i in range(n)])

    def _pipe(self, client: Any, items: list[Any], deadline: float) -> None:
        job = Job(client, "pipe", len(items), deadline)
        job.value_budget = self.limits.max_message_bytes - 256 * len(items) - 1024
        ops: list[Op] = []
        for i, item in enumerate(items):
            try:
                op, args = P.check_pipe_item(item, self.limits)
            except ZkvError as exc:
                job.results[i] = _Done(exc)
                job.left -= 1
                continue
            if op == "PING":
                job.results[i] = _Done(_Item(P.reply_item("PONG")))
                job.left -= 1
                continue
            if op == "ONCE":
                ops.append(Op(job, i, args[2][0], args[2][1], None, (args[0], args[1])))
                continue
            ops.append(Op(job, i, op, args))
        if job.left == 0:
            self._finish(job)
            return
        p = self.placement
        owners: list[str] | None = None
        if p.moving is None and len(p.ring):
            owner = p.ring.owner
            owners = [owner(o.args[0]) for o in ops]  # once per key: hashing is the cost
            first = owners[0]
            if len(ops) == len(items) and first not in self.down and all(
                    o == first for o in owners):
                # every command goes to one node: its reply is the client's, as it is
                single = Job(client, "one", 1, deadline)
                self._send(first, P.encode_request("PIPE", items), _PLAIN,
                           [Op(single, 0, "RAWPIPE", [items])], deadline)
                return
        self._dispatch(job, ops, owners)

    def _atomic(self, client: Any, items: list[Any], budget: int, deadline: float) -> None:
        """An atomic pipeline (RESP's MULTI/EXEC): every command goes, in one message,
        to the one node that owns all its keys, which runs them with nothing between
        and logs them as one record. Refused whole (nothing run) when its keys are on
        more than one node, or when a move takes any of them (TRYAGAIN on RESP)."""
        keys = []
        for item in items:
            op, args = P.check_pipe_item(item, self.limits)
            if op == "ONCE":
                keys.append(args[2][1][0])
            elif op != "PING":
                keys.append(args[0])
        job = Job(client, "one", 1, deadline)
        self._route(Op(job, 0, "ATOMIC", [items, budget, keys]))

    def _send_atomic(self, op: Op) -> None:
        items, budget, keys = op.args
        p = self.placement
        if not len(p.ring):
            raise Unavailable("the cluster has no nodes yet (ADD one)")
        if p.moving is not None and any(p.moving_key(k) for k in keys):
            raise Unavailable("keys of this transaction are being moved between nodes; "
                              "nothing was run: try again when the move is done")
        owners = {p.owner(k) for k in keys} if keys else {p.owner(b"")}
        if len(owners) > 1:
            raise CrossNode(
                f"the keys of this transaction live on {len(owners)} nodes; one node runs "
                "a transaction, so keep its keys together with a hash tag ({user1}:a and "
                "{user1}:b live on one node); nothing was run")
        node = owners.pop()
        self._send(node, P.encode_request("PIPE", items, budget, True), _PLAIN, [op],
                   op.job.deadline)

    def _dispatch(self, job: Job, ops: list[Op], owners: list[str] | None = None) -> None:
        """Keys that stay put go to their owner grouped (one MGET, MSET or PIPE a node,
        with its share of the reply budget); moving keys take their chains one by one.
        (``owners``: each op's owner, when the caller has them and nothing moves.)"""
        p = self.placement
        groups: dict[str, list[Op]] = {}
        if owners is not None and p.moving is None:
            for op, node in zip(ops, owners):
                group = groups.get(node)
                if group is None:
                    groups[node] = [op]
                else:
                    group.append(op)
        else:
            for op in ops:
                if p.moving is not None and p.moving_key(op.key) or not len(p.ring):
                    self._route_in_turn(op)
                else:
                    groups.setdefault(p.owner(op.key), []).append(op)
        share = self.limits.max_message_bytes // max(1, len(groups))
        for node, group in groups.items():
            if job.kind == "mget":
                body = P.encode_request("MGET", [o.key for o in group], share)
            elif job.kind == "mset" and job.ident is None:
                body = P.encode_request("MSET", [x for o in group for x in o.args])
            else:  # a PIPE (or a tagged MSET: a PIPE of its keys' tagged SETs)
                body = P.encode_request("PIPE", [o.item() for o in group], share)
            try:
                self._send(node, body, _GROUP, group, job.deadline)
            except ZkvError as exc:
                for op in group:
                    self._result(op, exc)

    def _group_result(self, sent: _Sent, result: Any) -> None:
        ops = sent.ops
        if isinstance(result, ZkvError):
            for op in ops:
                self._result(op, result)
            return
        job = ops[0].job
        if job.kind == "mget":
            for op, value in zip(ops, result):
                self._result(op, value)
        elif job.kind == "mset" and job.ident is None:
            for op in ops:
                self._result(op, "OK")
        else:
            if job.value_budget is not None and not job.done:
                ops = self._ok_items(job, ops, result)
                result = result[len(sent.ops) - len(ops):]
            for op, item in zip(ops, result):
                try:
                    self._result(op, P.result_of(item))
                except ZkvError as exc:
                    if isinstance(exc, (StaleEpoch, NodeBehind, Moved)):
                        self._refused(_Sent(sent.node, _PLAIN, [op], sent.deadline,
                                            sent.epoch), exc, self.now)
                    else:
                        self._result(op, exc)

    def _ok_items(self, job: Job, ops: list[Op], items: list[Any]) -> list[Op]:
        """A node's pipeline reply items that succeeded, put in the job as they are (no
        decoding and re-encoding of each), within its reply budget. Returns the ops from
        the first item that needs more care (an error, or over the budget) on."""
        budget = job.value_budget
        assert budget is not None
        used = job.used
        results = job.results
        done = 0
        for op, item in zip(ops, items):
            if type(item) is not list or len(item) != 2 or item[0] != P.OK:
                break
            value = item[1]
            if type(value) is bytes:
                if used + len(value) + 16 > budget:
                    break
                used += len(value) + 16
            slot = op.slot
            if results[slot] is None:
                job.left -= 1
            results[slot] = _Done(_Item(item))
            done += 1
        job.used = used
        if job.left == 0 and done == len(ops):
            self._finish(job)
        return ops[done:]

    def _msetnx(self, client: Any, args: list[Any], body: bytes | None,
                deadline: float, ident: tuple[bytes, int] | None = None) -> None:
        pairs: list[bytes] = args[0]
        keys = pairs[0::2]
        first = key_hash(keys[0])
        if any(key_hash(k) != first for k in keys[1:]):
            raise CommandError(
                "MSETNX keys must live on one shard: give them one hash tag, as in "
                "{user1}:name {user1}:mail (only the part in braces is hashed)")
        job = Job(client, "one", 1, deadline)
        op = Op(job, 0, "MSETNX", [keys[0], pairs], body, ident)
        if body is None:
            item = ["MSETNX", pairs]
            op.body = P.encode_request(*(item if ident is None else
                                         ["ONCE", ident[0], ident[1], item]))
        self._route(op)

    def _dbsize(self, client: Any, deadline: float) -> None:
        """DBSIZE: every node's count of live keys, summed (not during a move, when keys
        are on two nodes; an error if any node cannot say)."""
        if self.placement.state.move is not None:
            raise CommandError("DBSIZE is not available while a move is under way (keys "
                               "are on two nodes); retry when STATUS shows no move")
        members = list(self.placement.ring.members)
        state = _KeysWalk(len(members))
        if not members:
            self._answer_body(client, P.encode_ok(0))
            return

        def count(result: Any) -> None:
            if state.done:
                return
            if isinstance(result, ZkvError):
                state.done = True
                self._answer_error(client, result, "DBSIZE")
                return
            state.used += int(result)
            state.left -= 1
            if state.left == 0:
                state.done = True
                self._answer_body(client, P.encode_ok(state.used))

        body = P.encode_request("DBSIZE")
        ring = frozenset(members)
        for addr in members:
            self._send_call(_Call(addr, body, deadline, count, ring))

    # -- listing -----------------------------------------------------------------------
    def _no_listing_during_move(self) -> None:
        if self.placement.state.move is not None:
            raise CommandError(
                "SCAN and KEYS are not available while a move is under way "
                "(keys are on two nodes); retry when STATUS shows no move"
            )

    def _scan(self, client: Any, args: list[Any], deadline: float) -> None:
        cursor: str = args[0]
        pattern = args[1] if len(args) > 1 else None
        count = args[2] if len(args) > 2 else 1000
        self._no_listing_during_move()
        members = self.placement.ring.members
        if not members:
            self._answer_body(client, P.encode_ok(["0", []]))
            return
        fingerprint = ring_fingerprint(self.placement)
        if cursor == "0":
            idx, node_cursor = 0, "0"
        else:
            try:
                ring_text, idx_text, node_cursor = cursor.split(":", 2)
                idx = int(idx_text)
            except ValueError:
                raise CommandError(f"bad SCAN cursor {cursor!r}; start again from 0") from None
            if ring_text != fingerprint or not 0 <= idx < len(members):
                raise CommandError("the cluster changed during the SCAN; start again from 0")

        def page(result: Any) -> None:
            if isinstance(result, ZkvError):
                self._answer_error(client, result)
                return
            nxt, keys = result
            if nxt != "0":
                out = [f"{fingerprint}:{idx}:{nxt}", keys]
            elif idx + 1 < len(members):
                out = [f"{fingerprint}:{idx + 1}:0", keys]
            else:
                out = ["0", keys]
            self._answer_body(client, P.encode_ok(out))

        self._send(members[idx], P.encode_request("SCAN", node_cursor, pattern, count), _SCAN,
                   [], deadline, page)

    def _keys(self, client: Any, args: list[Any], deadline: float) -> None:
        """KEYS walks every node with SCAN pages, all nodes at once, so that no node ever
        spends one turn on its whole keyspace."""
        self._no_listing_during_move()
        pattern = args[0] if args else None
        members = list(self.placement.ring.members)
        if not members:
            self._answer_body(client, P.encode_ok([]))
            return
        budget = self.limits.max_message_bytes - 1024
        state = _KeysWalk(len(members))
        found_at: dict[str, list[bytes]] = {addr: [] for addr in members}
        ring = frozenset(members)

        def first_page() -> bytes:
            return P.encode_request("SCAN", "0", pattern, KEYS_PAGE)

        def restart(addr: str) -> bytes:  # refused for a stale view: that member anew
            state.used -= sum(len(k) + 16 for k in found_at[addr])
            found_at[addr] = []
            return first_page()

        def walk(addr: str, cursor: str, tries: int) -> None:
            def page(result: Any) -> None:
                if state.done:
                    return
                if isinstance(result, ZkvError):
                    state.done = True
                    self._answer_error(client, result)
                    return
                nxt, found = result
                found_at[addr].extend(found)
                state.used += sum(len(k) + 16 for k in found)
                if state.used > budget:
                    state.done = True
                    self._answer_error(client, LimitExceeded(
                        f"KEYS would return more than max_message_bytes ({budget} bytes); "
                        "use SCAN, which pages"))
                elif nxt != "0":
                    walk(addr, nxt, call.tries)
                else:
                    state.left -= 1
                    if state.left == 0:
                        state.done = True
                        self._answer_body(client, P.encode_ok(
                            [k for m in members for k in found_at[m]]))

            body = first_page() if cursor == "0" else P.encode_request(
                "SCAN", cursor, pattern, KEYS_PAGE)
            call = _Call(addr, body, deadline, page, ring, lambda: restart(addr), tries)
            self._send_call(call)

        for addr in members:
            walk(addr, "0", 0)


class _KeysWalk:
    """A DBSIZE or KEYS request's progress over the nodes: members left to answer, keys
    (or bytes of keys) so far, whether it has answered."""

    __slots__ = ("done", "left", "used")

    def __init__(self, nodes: int) -> None:
        self.left, self.used, self.done = nodes, 0, False


class _Call:
    """One member's part of a whole-cluster call (DBSIZE, a KEYS walk): its reply goes to
    ``done``. Refused for a stale view (a FAILOVER's new epoch, say), it is sent again
    by the newer configuration, as ops are: ``restart`` then gives the body to send
    (a KEYS walk starts that member again, since a cursor belongs to one process)."""

    __slots__ = ("body", "deadline", "done", "members", "node", "restart", "tries")

    def __init__(self, node: str, body: bytes, deadline: float, done: Any,
                 members: frozenset[str], restart: Any = None, tries: int = 0) -> None:
        self.node, self.body, self.deadline, self.done = node, body, deadline, done
        self.members = members  # the ring's when the call began: sent again only by it
        self.restart = restart
        self.tries = tries

    def __call__(self, result: Any) -> None:
        self.done(result)


class _Done:
    """A slot's final result (a value, a ZkvError, or an _Item), set once."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Item:
    """A pipeline reply item made here (PING), put in the reply as it is."""

    __slots__ = ("item",)

    def __init__(self, item: list[Any]) -> None:
        self.item = item


def _part_id(ident: tuple[bytes, int], i: int) -> tuple[bytes, int]:
    """The id of the ``i``-th key's SET of a tagged MSET: one id for all the MSETs of a
    client (its id + "/m"), each part its own seq, so that a node's table holds them
    as one client's window (each part a client of its own would crowd it out)."""
    client, seq = ident
    if len(client) > MAX_CLIENT_ID - 8:
        import hashlib

        client = hashlib.blake2b(client, digest_size=16).digest()
    if seq < 1 << 42 and i < 1 << _PART_BITS:
        return client + b"/m", seq << _PART_BITS | i
    return client + b"/%d" % i, seq  # (seqs this large are not zkv.Client's)


_PART_BITS = 20  # parts of one tagged MSET told apart in the low bits of the seq


def _cannot_say(op: Op, old: str, exc: ZkvError) -> Unavailable:
    return Unavailable(
        f"key {op.key[:64]!r} is being moved and its old owner {old} cannot say whether it "
        f"applied this {op.kind} before (it may be a retry): nothing was applied; try again "
        f"({exc.message})")


def _is_error(body: bytes) -> bool:
    """Whether a reply body is an error ([1, code, message(, details)]), unread."""
    return len(body) > 1 and body[1] == 0x01 and body[0] in (0x83, 0x84)


def ring_fingerprint(placement: Placement) -> str:
    """A short name for the ring in effect (SCAN cursors name the ring they walk)."""
    import hashlib

    ring = placement.ring
    text = repr((sorted(ring.weights.items()), ring.vnodes)).encode()
    return hashlib.blake2b(text, digest_size=4).hexdigest()


def decode_client_error(body: bytes) -> ZkvError | None:
    """The error a reply body reports, or None if it is not one."""
    if not _is_error(body):
        return None
    try:
        P.decode_reply(body)
    except ZkvError as exc:
        return exc
    except ProtocolError:
        return None
    return None
