"""MULTI/EXEC on the RESP front. Pure: no sockets, no clock.

What Redis Cluster offers, and for the same reason: a transaction runs on one node,
so its keys must live on one node (the same hash tag: ``{user1}:name`` and
``{user1}:visits``). Between MULTI and EXEC each command is checked and queued
(``+QUEUED``); EXEC sends them all to their node as one atomic pipeline (zkv's PIPE
with ``atomic``): the node runs them with no other request between, answers each
(an error in one does not undo the others, as on Redis) and logs their writes as one
record, so a crash keeps all of them or none. EXEC is refused whole, with nothing
run, when the keys are on more than one node (``-CROSSSLOT``) or being moved
(``-TRYAGAIN``). As on Redis, an unknown command or a wrong number of words while
queueing makes EXEC answer ``-EXECABORT`` (so does a command a transaction here
cannot hold), while a command with a bad option is queued and its error is its
answer at EXEC. What waits for EXEC, PINGs and ECHOs included, is bounded by
``max_batch`` commands and ``max_message_bytes``.

Not offered: WATCH (optimistic locking needs versions of keys that zkv does not
keep; it answers an error, so a client never believes a key is watched), and the
commands that are not about one node's keys (SCAN, KEYS, DBSIZE, MSETNX, the
connection and server commands), which are refused while queueing.

redis-py's ``r.pipeline()`` is a transaction (MULTI/EXEC) unless it is given
``transaction=False``; so is redis-cli's MULTI.
"""

from __future__ import annotations

from typing import Any

from ..errors import ZkvError
from . import protocol as P
from .resp import (
    OK,
    Context,
    Forward,
    Plan,
    Reply,
    Session,
    Shape,
    array,
    error,
    error_reply,
    forward,
    planned,
)

QUEUED = b"+QUEUED\r\n"
QUEUED_COST = 256  # bytes counted per queued command besides its words
EXECABORT = "EXECABORT Transaction discarded because of previous errors."
# refused while queueing: not commands on one node's keys
_NOT_QUEUED = frozenset((b"scan", b"keys", b"dbsize", b"msetnx", b"select", b"hello",
                         b"auth", b"client", b"command", b"info", b"time", b"config",
                         b"flushall", b"flushdb"))
_AT_ONCE = frozenset((b"quit", b"reset"))  # run at once, inside MULTI too (as on Redis)
# queued with the answer they have now
_CONSTANT = frozenset((b"ping", b"echo", b"unwatch"))


class Queued:
    """One queued command: the node commands it became, and how their results make
    its reply (``data``: a reply known already, for PING and ECHO)."""

    __slots__ = ("data", "items", "kind", "shape")

    def __init__(self, items: list[list[Any]], kind: str, shape: Shape | None,
                 data: bytes = b"") -> None:
        self.items, self.kind, self.shape, self.data = items, kind, shape, data

    def reply(self, results: list[Any], session: Session) -> bytes:
        """Its reply, from its items' results (reply items of the node's PIPE)."""
        if not self.items:
            return self.data
        assert self.shape is not None
        value: Any
        try:
            if self.kind == "one":
                value = P.result_of(results[0])
            elif self.kind == "items":  # DEL or EXISTS of many keys: the shape counts
                value = results
            elif self.kind == "values":  # MGET
                value = [P.result_of(r) for r in results]
            else:  # MSET: OK, or its first error
                for r in results:
                    P.result_of(r)
                value = "OK"
        except ZkvError as exc:
            value = exc
        return self.shape(value, session)


def plan(s: Session, name: bytes, args: list[bytes], ctx: Context) -> Plan:
    """MULTI, EXEC, DISCARD, WATCH and UNWATCH, and any command after MULTI."""
    if name == b"multi":
        if s.multi is not None:
            return Reply(error("ERR MULTI calls can not be nested"))
        s.multi, s.multi_failed, s.multi_bytes, s.multi_items = [], False, 0, 0
        return Reply(OK)
    if name == b"discard":
        if s.multi is None:
            return Reply(error("ERR DISCARD without MULTI"))
        s.multi, s.multi_failed = None, False
        return Reply(OK)
    if name == b"exec":
        if s.multi is None:
            return Reply(error("ERR EXEC without MULTI"))
        return _exec(s, ctx)
    if name == b"watch":
        if s.multi is not None:
            return Reply(error("ERR WATCH inside MULTI is not allowed"))
        return Reply(error("ERR WATCH is not supported by zkv: it keeps no versions of keys "
                           "to tell a change by; a transaction (MULTI/EXEC) of keys on "
                           "one node runs with nothing between its commands"))
    if name == b"unwatch" and s.multi is None:
        return Reply(OK)
    if name in _AT_ONCE:
        return planned(s, name, args, ctx)
    queue = s.multi
    assert queue is not None
    if name in _NOT_QUEUED:
        return _refuse(s, f"ERR {name.decode().upper()} cannot be part of a transaction "
                          "on zkv (a transaction runs on one node)")
    got = Reply(OK) if name == b"unwatch" else planned(s, name, args, ctx)
    if isinstance(got, Reply):
        if got.data[:1] != b"-" and name not in _CONSTANT:
            # (no such command yet; refused rather than guessed at)
            return _refuse(s, f"ERR {name.decode().upper()} cannot be part of a "
                              "transaction on zkv")
        # PING and ECHO answer what they answer now; a command whose arguments are
        # wrong (SET k v EX -5), its error, in its place at EXEC, as on Redis
        queued = Queued([], "", None, got.data)
    else:
        made = _as_items(got) if isinstance(got, Forward) else None
        if made is None:
            return _refuse(s, f"ERR {name.decode().upper()} cannot be part of a "
                              "transaction on zkv")
        queued = made
    # (what waits for EXEC is held here: bounded as the one message EXEC becomes is;
    # kept as running totals, so that queueing costs the same for the last command)
    total = s.multi_items + max(1, len(queued.items))
    if total > ctx.limits.max_batch:
        return _refuse(s, f"ERR a transaction is at most {ctx.limits.max_batch} commands "
                          "(keys of MGET, MSET, DEL and EXISTS each count)")
    # (bytes, and what holding a queued command costs here: ~350 B for a small one)
    weight = sum(len(a) + 64 for a in args) + len(queued.data) + QUEUED_COST
    if s.multi_bytes + weight > ctx.limits.max_message_bytes - 4096:
        return _refuse(s, f"ERR a transaction is at most {ctx.limits.max_message_bytes} "
                          "bytes (max_message_bytes)")
    s.multi_bytes += weight
    s.multi_items = total
    queue.append(queued)
    return Reply(QUEUED)


def _refuse(s: Session, text: str) -> Reply:
    s.multi_failed = True
    return Reply(error(text))


def _as_items(f: Forward) -> Queued | None:
    """A planned command as commands of one key each (what an atomic PIPE carries)."""
    if f.op in P.SINGLE_KEY_OPS:
        return Queued([[f.op, *f.args]], "one", f.shape)
    if f.op == "PIPE" and len(f.args) == 1:  # DEL or EXISTS of many keys
        return Queued(list(f.args[0]), "items", f.shape)
    if f.op == "MGET":
        return Queued([["GET", k] for k in f.args[0]], "values", f.shape)
    if f.op == "MSET":
        pairs = f.args[0]
        return Queued([["SET", pairs[i], pairs[i + 1]] for i in range(0, len(pairs), 2)],
                      "ok", f.shape)
    return None


def _exec(s: Session, ctx: Context) -> Plan:
    queue, failed = s.multi or [], s.multi_failed
    s.multi, s.multi_failed = None, False
    if failed:
        return Reply(error(EXECABORT))
    items = [item for q in queue for item in q.items]
    if not items:  # nothing but PING, ECHO (or nothing at all)
        return Reply(array([q.data for q in queue]))

    def shape(result: Any, session: Session) -> bytes:
        if isinstance(result, ZkvError):  # refused whole: nothing of it ran
            return error_reply(result)
        if not isinstance(result, list) or len(result) != len(items):
            return error(f"ERR internal error: {len(items)} commands, an answer of "
                         f"another shape")
        replies, at = [], 0
        for q in queue:
            n = len(q.items)
            replies.append(q.reply(result[at:at + n], session))
            at += n
        return array(replies)

    return forward(ctx, "PIPE", [items, None, True], shape)


__all__ = ["EXECABORT", "QUEUED", "Queued", "plan"]
