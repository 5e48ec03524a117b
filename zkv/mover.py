"""Driving one rebalancing move (ADD or REMOVE) to its end, step by step.

A move is a record in the proxy's state (``ClusterState.move``) that passes
through three phases, each persisted before it takes effect::

    prepare   every destination opens the move: it forgets stale keys in the
              ranges it will receive and starts keeping tombstones there.
              Routing still follows the old ring.
    copy      the new ring is the ring (epoch + 1): writes go to the new owner;
              reads of a moving key ask the new owner first and fall back to
              the old one when the new one has no state of the key. Each source
              streams its ranges to its destination (PUSH -> PULL); the proxy
              polls the destinations until every stream is durably applied,
              and restarts any stream that broke (a node restarted, say).
    cleanup   sources drop the ranges they handed over, destinations close the
              move (and forget their tombstones); then the record is removed.

Every step is idempotent on the nodes, so a proxy that restarts simply runs the
phase it finds in its state again: a move is always finished, never stranded.
The driver does no I/O itself: it asks the proxy to ``send`` requests (with a
callback for the reply) and to ``commit`` a new state.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from .cluster import ClusterState
from .errors import ClusterError, ZkvError
from .planner import Transfer, plan
from .ring import RangeSet, Ring
from .transfer import MAX_BATCH_KEYS

log = logging.getLogger("zkv.mover")

POLL_INTERVAL = 0.25
RETRY_INTERVAL = 1.0
RESTART_GRACE = 2.0  # a stream the source finished but the destination did not: restart after this
STEP_TIMEOUT = 60.0
# Seconds to wait on entering each phase before its first step. Zero in production;
# the fault tests set it to kill processes at a known phase of a move.
PHASE_PAUSE = float(os.environ.get("ZKV_MOVE_PHASE_PAUSE", "0") or 0)


class Shell(Protocol):
    def send(self, addr: str, op: str, args: list[Any],
             done: Callable[[Any], None], timeout: float = ...) -> None: ...

    def commit(self, state: ClusterState) -> None: ...


SETTINGS = ("rate", "batch_keys", "batch_bytes")


def check_settings(options: dict[str, Any], max_batch_bytes: int) -> dict[str, Any]:
    """The move settings among ``options`` (rate, batch_keys, batch_bytes), each checked;
    ClusterError naming the option and what it may be. Pure."""
    out: dict[str, Any] = {}
    for name in SETTINGS:
        if name not in options or options[name] is None:
            continue
        value = options[name]
        if name == "rate":
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ClusterError(
                    f"rate must be a positive number of keys per second, not {value!r}; "
                    "nothing changed"
                )
            out[name] = float(value)
            continue
        high = MAX_BATCH_KEYS if name == "batch_keys" else max_batch_bytes
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise ClusterError(f"{name} must be an integer from 1 to {high}, not {value!r}; "
                               "nothing changed")
        out[name] = value
    return out


def repair_settings(move: dict[str, Any], defaults: dict[str, Any],
                    max_batch_bytes: int) -> tuple[dict[str, Any], list[str]]:
    """A persisted move whose settings are not valid (written by an older zkv that did
    not check them) with each bad one replaced by its default, and what was replaced."""
    fixed, notes = dict(move), []
    for name in SETTINGS:
        try:
            check_settings({name: move.get(name)}, max_batch_bytes)
        except ClusterError:
            notes.append(f"move {move.get('id')}: {name} {move.get(name)!r} is not valid; "
                         f"using {defaults.get(name)!r}")
            fixed[name] = defaults.get(name)
    return fixed, notes


def new_move(state: ClusterState, kind: str, node: str, new_members: dict[str, float],
             options: dict[str, Any]) -> dict[str, Any]:
    """The record of a move from ``state`` to ``new_members`` (pure)."""
    old_ring = state.ring()
    new_ring = Ring(new_members, state.vnodes)
    transfers = plan(old_ring, new_ring)
    return {
        "id": f"e{state.epoch + 1}",
        "kind": kind,
        "node": node,
        "old": dict(state.members),
        "new": dict(new_members),
        "phase": "prepare",
        "transfers": [t.to_dict() for t in transfers],
        "rate": options.get("rate"),
        "batch_keys": int(options.get("batch_keys", 1000)),
        "batch_bytes": int(options.get("batch_bytes", 1 << 20)),
        "started_at": time.time(),
    }


def pull_endpoint(dest: str, reply: Any) -> str | None:
    """Where a destination's PULL socket is reached: its PULL port at the host the ring
    names it by (the node may be bound to a wildcard address it cannot advertise)."""
    if not isinstance(reply, dict):
        return None
    port = reply.get("pull_port")
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return f"tcp://{dest.rsplit(':', 1)[0]}:{port}"
    pull = reply.get("pull")  # a node from before pull_port
    return pull if isinstance(pull, str) else None


def transfers_of(move: dict[str, Any]) -> list[Transfer]:
    return [Transfer.from_dict(t) for t in move["transfers"]]


def moving_ranges(move: dict[str, Any]) -> RangeSet:
    union = RangeSet()
    for t in transfers_of(move):
        union = union.union(t.ranges)
    return union


class MoveDriver:
    """Carries the move in ``state.move`` through its phases; :meth:`tick` drives it."""

    def __init__(self, shell: Shell, state: ClusterState) -> None:
        assert state.move is not None
        self.shell = shell
        self.state = state
        self.move: dict[str, Any] = state.move
        self.transfers = transfers_of(self.move)
        self.waiting = 0  # replies outstanding for the current step
        self.error: str | None = None
        self.pulls: dict[str, str] = {}
        self.progress: dict[tuple[str, str], dict[str, Any]] = {}
        self.sent_at: dict[tuple[str, str], float] = {}
        self.done_streams: set[tuple[str, str]] = set()
        self.dropped: set[str] = set()  # sources that finished forgetting what they sent
        self.finished = False
        self.next_at = time.monotonic() + PHASE_PAUSE

    # -- helpers ----------------------------------------------------------------
    @property
    def phase(self) -> str:
        return str(self.move["phase"])

    def _dest_ranges(self, dest: str) -> RangeSet:
        union = RangeSet()
        for t in self.transfers:
            if t.dest == dest:
                union = union.union(t.ranges)
        return union

    def _source_ranges(self, source: str) -> RangeSet:
        union = RangeSet()
        for t in self.transfers:
            if t.source == source:
                union = union.union(t.ranges)
        return union

    def _step(self, requests: list[tuple[str, str, list[Any]]],
              on_result: Callable[[str, Any], None], then: Callable[[], None]) -> None:
        """Send requests; when all answered OK run ``then``; on any error retry later."""
        if not requests:
            then()
            return
        self.waiting = len(requests)
        failed: list[str] = []

        def make(addr: str) -> Callable[[Any], None]:
            def done(result: Any) -> None:
                if isinstance(result, ZkvError):
                    failed.append(f"{addr}: {result}")
                else:
                    on_result(addr, result)
                self.waiting -= 1
                if self.waiting == 0:
                    if failed:
                        self.error = "; ".join(failed)
                        log.warning("move %s (%s): %s; retrying", self.move["id"], self.phase,
                                    self.error)
                        self.next_at = time.monotonic() + RETRY_INTERVAL
                    else:
                        self.error = None
                        then()
            return done

        for addr, op, args in requests:
            self.shell.send(addr, op, args, make(addr), STEP_TIMEOUT)

    def _set_phase(self, phase: str) -> None:
        state = self.state
        move = dict(self.move, phase=phase)
        if phase == "copy":
            state = state.with_members(self.move["new"])  # epoch + 1: the new ring takes effect
        self.state = state.with_move(move)
        self.move = move
        self.shell.commit(self.state)
        self.next_at = time.monotonic() + PHASE_PAUSE
        log.info("move %s: %s", move["id"], phase)

    # -- phases --------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.finished or self.waiting or now < self.next_at:
            return
        self.next_at = now + POLL_INTERVAL
        if self.phase == "prepare":
            self._open(lambda: self._set_phase("copy"), purge=True)
        elif self.phase == "copy":
            if not self.pulls:
                self._open(lambda: None, purge=False)
            else:
                self._copy(now)
        elif self.phase == "cleanup":
            self._cleanup()

    def _open(self, then: Callable[[], None], purge: bool) -> None:
        """XBEGIN at every destination (idempotent; it also tells us their PULL
        endpoints). In prepare it purges stale keys a bounded step per request,
        so it is repeated until every destination says it is ready."""
        dests = sorted({t.dest for t in self.transfers})
        unready: list[str] = []

        def got(addr: str, result: Any) -> None:
            endpoint = pull_endpoint(addr, result)
            if endpoint is not None:
                self.pulls[addr] = endpoint
                if not result.get("ready", True):
                    unready.append(addr)

        def after() -> None:
            if unready:
                self.next_at = 0.0  # more purging to do: go again at once
            else:
                then()

        self._step(
            [(d, "XBEGIN", [{"id": self.move["id"], "ranges": self._dest_ranges(d).to_list(),
                             "purge": purge}])
             for d in dests],
            got, after,
        )

    def _send(self, t: Transfer) -> list[tuple[str, str, list[Any]]]:
        self.sent_at[(t.source, t.dest)] = time.monotonic()
        return [(t.source, "XSEND", [{
            "id": self.move["id"], "dest": t.dest, "pull": self.pulls[t.dest],
            "ranges": t.ranges.to_list(), "batch_keys": self.move["batch_keys"],
            "batch_bytes": self.move["batch_bytes"], "rate": self.move.get("rate"),
        }])]

    def _copy(self, now: float) -> None:
        pending = [t for t in self.transfers if (t.source, t.dest) not in self.done_streams]
        if not pending:
            self._set_phase("cleanup")
            return
        unsent = [t for t in pending if (t.source, t.dest) not in self.sent_at]
        if unsent:
            self._step([r for t in unsent for r in self._send(t)], lambda a, r: None, lambda: None)
            return
        nodes = sorted({t.dest for t in pending} | {t.source for t in pending})
        stats: dict[str, Any] = {}
        self._step([(n, "XSTAT", []) for n in nodes],
                   lambda addr, result: stats.__setitem__(addr, result),
                   lambda: self._judge(pending, stats, time.monotonic()))

    def _judge(self, pending: list[Transfer], stats: dict[str, Any], now: float) -> None:
        """Mark finished streams; restart the ones that broke or went missing."""
        restart: list[Transfer] = []
        for t in pending:
            pair = (t.source, t.dest)
            dest, source = stats.get(t.dest, {}), stats.get(t.source, {})
            inc = next((s for s in dest.get("incoming", [])
                        if s.get("id") == self.move["id"] and s.get("source") == t.source), None)
            out = next((s for s in source.get("outgoing", [])
                        if s.get("id") == self.move["id"] and s.get("dest") == t.dest), None)
            endpoint = pull_endpoint(t.dest, dest)
            if endpoint and endpoint != self.pulls.get(t.dest):
                self.pulls[t.dest] = endpoint  # the destination restarted
                restart.append(t)
                continue
            if self.move["id"] not in dest.get("open", [self.move["id"]]):
                self.pulls.clear()  # the destination lost the move?! open it again first
                return
            self.progress[pair] = {
                "keys": inc.get("keys", 0) if inc else 0,
                "bytes": inc.get("bytes", 0) if inc else 0,
                "total": out.get("total_keys") if out else None,
            }
            if inc and inc.get("done"):
                self.done_streams.add(pair)
            elif inc and inc.get("broken"):
                restart.append(t)
            elif (out is None or out.get("done")) and now - self.sent_at[pair] > RESTART_GRACE:
                restart.append(t)
        if restart:
            log.info("move %s: restarting %d stream(s)", self.move["id"], len(restart))
            self._step([r for t in restart for r in self._send(t)], lambda a, r: None,
                       lambda: None)
        elif len(self.done_streams) == len(self.transfers):
            self._set_phase("cleanup")

    def _cleanup(self) -> None:
        """Sources forget what they handed over (a bounded step per XDROP, repeated
        until done); then destinations close the move and the record goes."""
        sources = sorted({t.source for t in self.transfers} - self.dropped)
        if sources:
            def got(addr: str, result: Any) -> None:
                if isinstance(result, dict) and result.get("done"):
                    self.dropped.add(addr)

            def again() -> None:
                self.next_at = 0.0

            self._step([(s, "XDROP", [{"id": self.move["id"],
                                       "ranges": self._source_ranges(s).to_list()}])
                        for s in sources], got, again)
            return
        dests = sorted({t.dest for t in self.transfers})

        def finish() -> None:
            self.state = self.state.with_move(None)
            self.shell.commit(self.state)
            self.finished = True
            log.info("move %s finished", self.move["id"])

        self._step([(d, "XEND", [{"id": self.move["id"]}]) for d in dests],
                   lambda a, r: None, finish)

    def status(self) -> dict[str, Any]:
        streams = []
        for t in self.transfers:
            pair = (t.source, t.dest)
            p = self.progress.get(pair, {})
            streams.append({
                "source": t.source, "dest": t.dest, "share": round(t.fraction(), 6),
                "keys": p.get("keys", 0), "bytes": p.get("bytes", 0), "total": p.get("total"),
                "done": pair in self.done_streams or self.phase == "cleanup",
            })
        return {
            "id": self.move["id"], "kind": self.move["kind"], "node": self.move["node"],
            "phase": self.phase, "error": self.error, "streams": streams,
            "rate": self.move.get("rate"),
            "elapsed_s": round(time.time() - float(self.move.get("started_at", time.time())), 3),
        }
