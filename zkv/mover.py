"""Driving one rebalancing move (ADD or REMOVE) to its end, step by step.

A move is a record in the proxy's state (``ClusterState.move``) that passes
through its phases, each persisted before it takes effect::

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

MOVE ABORT rolls a move back to the old membership. In *prepare* nothing has
been routed to the destinations yet, so the record simply goes. In *copy* the
destinations hold writes made during the move, which must not vanish::

    revert          still the new ring (reads as in copy), but writes to the
                    moving ranges are refused for the moment: each destination
                    streams everything it holds of them, deletes included, back
                    to the old owner, which takes it over what it had (an
                    OVERWRITE move). Nothing writes those ranges meanwhile, so
                    the copy back is exact.
    revert-cleanup  the old ring is the ring again (a new epoch); the
                    destinations drop what they received and every node closes
                    the move.

``force`` (MOVE ABORT --force, REMOVE --force) gives up on nodes that are down
instead of waiting for them: a stream to or from a node that is down is
skipped, and what it would have carried is reported as lost, loudly.

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

from .core.cluster import ClusterState
from .core.planner import Transfer, plan
from .core.ring import RangeSet, Ring
from .core.transfer import MAX_BATCH_KEYS
from .errors import ClusterError, ZkvError

log = logging.getLogger("zkv.mover")

POLL_INTERVAL = 0.25
RETRY_INTERVAL = 1.0
RESTART_GRACE = 2.0  # a stream the source finished but the destination did not: restart after this
STEP_TIMEOUT = 60.0
# Seconds to wait on entering a phase before its first step: none in production; the
# fault tests set ZKV_MOVE_PHASE_PAUSE to kill processes at a known phase of a move:
# "1.5" (every phase) or "copy=1.5,cleanup=2" (those phases only).


def _phase_pauses(text: str) -> dict[str, float]:
    pauses: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        phase, _, seconds = part.rpartition("=")
        try:
            pauses[phase or "*"] = max(0.0, float(seconds))
        except ValueError:
            log.warning("ZKV_MOVE_PHASE_PAUSE: %r is not PHASE=SECONDS; ignored", part)
    return pauses


PHASE_PAUSES = _phase_pauses(os.environ.get("ZKV_MOVE_PHASE_PAUSE", ""))


def phase_pause(phase: str) -> float:
    return PHASE_PAUSES.get(phase, PHASE_PAUSES.get("*", 0.0))


class Shell(Protocol):
    def send(self, addr: str, op: str, args: list[Any],
             done: Callable[[Any], None], timeout: float = ...) -> None: ...

    def commit(self, state: ClusterState) -> None: ...

    def current(self) -> ClusterState: ...

    def is_up(self, addr: str) -> bool: ...

    def settled(self) -> bool: ...


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


PHASES = ("prepare", "copy", "cleanup", "revert", "revert-cleanup")


class MoveDriver:
    """Carries the move in ``state.move`` through its phases; :meth:`tick` drives it."""

    def __init__(self, shell: Shell, state: ClusterState) -> None:
        assert state.move is not None
        self.shell = shell
        self.state = state
        self.move: dict[str, Any] = state.move
        self.transfers = transfers_of(self.move)
        self.waiting = 0  # replies outstanding for the current step
        self.gen = 0  # bumped on every phase change: replies to older steps are ignored
        self.error: str | None = None
        self.finished = False
        self.counts: dict[tuple[str, str], dict[str, Any]] = {}  # each stream's last report
        self.aborted = False  # MOVE ABORT was taken (in prepare: the move is just gone)
        self.next_at = time.monotonic() + phase_pause(self.phase)
        self._reset_streams()

    def _reset_streams(self) -> None:
        self.pulls: dict[str, str] = {}
        self.progress: dict[tuple[str, str], dict[str, Any]] = {}
        self.sent_at: dict[tuple[str, str], float] = {}
        self.done_streams: set[tuple[str, str]] = {
            (a, b) for a, b in self.move.get("skipped", []) if self.reverting}
        self.dropped: set[str] = set()  # nodes that finished forgetting what they sent

    # -- helpers ----------------------------------------------------------------
    @property
    def phase(self) -> str:
        return str(self.move["phase"])

    @property
    def reverting(self) -> bool:
        return self.phase in ("revert", "revert-cleanup")

    @property
    def force(self) -> bool:
        return bool(self.move.get("force"))

    @property
    def stream_id(self) -> str:
        """The id the nodes know the current streams by (a rollback has its own)."""
        return str(self.move["revert_id"] if self.reverting else self.move["id"])

    def streams(self) -> list[Transfer]:
        """The streams of the current phase: the move's, or the same reversed."""
        if self.reverting:
            return [Transfer(t.dest, t.source, t.ranges) for t in self.transfers]
        return self.transfers

    @staticmethod
    def _ranges(transfers: list[Transfer], addr: str, side: str) -> RangeSet:
        union = RangeSet()
        for t in transfers:
            if getattr(t, side) == addr:
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
        gen = self.gen

        def make(addr: str) -> Callable[[Any], None]:
            def done(result: Any) -> None:
                if gen != self.gen:
                    return  # a reply to a step of a phase since left (MOVE ABORT, say)
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

    def _commit(self, move: dict[str, Any] | None,
                members: dict[str, float] | None = None) -> None:
        """Persist and apply a new state (one epoch on); the old phase's steps are
        forgotten. It is made from the newest configuration, not the driver's copy: a
        failover or an in-sync change may have come in between, and must not be undone."""
        self.state = self.shell.current().with_move(move, members)
        if move is not None:
            self.move = move
        self.shell.commit(self.state)
        self.gen += 1
        self.waiting = 0
        self.next_at = time.monotonic() + phase_pause(self.phase)

    def _set_phase(self, phase: str, **extra: Any) -> None:
        move = dict(self.move, phase=phase, **extra)
        members = None
        if phase == "copy" or (phase == "cleanup" and self.phase == "prepare"):
            members = self.move["new"]  # the new ring takes effect
        elif phase == "revert-cleanup":
            members = self.move["old"]  # the old ring is back
        reset = (phase == "revert") != self.reverting
        self._commit(move, members)
        if reset:
            self._reset_streams()
        log.info("move %s: %s", move["id"], phase)

    def _finish(self) -> None:
        self._commit(None)
        self.finished = True
        log.info("move %s %s", self.move["id"],
                 "rolled back" if self.reverting else "finished")

    # -- what an operator may ask ------------------------------------------------------
    def abort(self, force: bool) -> str:
        """MOVE ABORT: what happens now, in words. ClusterError if it is too late."""
        phase = self.phase
        if phase in ("prepare", "copy"):
            self.aborted = True
        if phase == "prepare":
            for dest in sorted({t.dest for t in self.transfers}):  # best effort: no data there
                self.shell.send(dest, "XEND", [{"id": self.move["id"]}], lambda r: None, 10.0)
            self._finish()
            return "the move had not started copying; it is gone and nothing changed"
        if phase == "copy":
            self._set_phase("revert", force=force, revert_id=f"{self.move['id']}-revert",
                            skipped=[])
            return ("rolling back: the destinations copy what they hold of the moving ranges "
                    "back to the old owners (writes to those ranges wait until it is done)")
        if phase == "revert":
            if force and not self.force:
                self._commit(dict(self.move, force=True))
            return "already rolling back" + (" (now giving up on nodes that are down)"
                                              if force else "")
        raise ClusterError(
            f"move {self.move['id']} is in its {phase} phase: everything has been copied and "
            "it can no longer be rolled back; wait for it to finish"
        )

    def force_finish(self, addr: str) -> str:
        """REMOVE ADDR --force during the REMOVE of ADDR: finish without its data."""
        if self.phase == "prepare":
            self._set_phase("cleanup", force=True)
        elif self.phase == "copy":
            self._set_phase("cleanup", force=True)
        elif self.phase == "cleanup":
            self._commit(dict(self.move, force=True))
        else:
            raise ClusterError(f"move {self.move['id']} is being rolled back; wait for it")
        return f"finishing the REMOVE of {addr} without it: its keys not yet copied are lost"

    # -- phases --------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.finished or self.waiting or now < self.next_at or not self.shell.settled():
            return  # (a new configuration still on its way to the nodes: steps wait)
        self.next_at = now + POLL_INTERVAL
        phase = self.phase
        if phase == "prepare":
            self._open(lambda: self._set_phase("copy"), purge=True)
        elif phase in ("copy", "revert"):
            if self.force:
                self._skip_down_streams()
            if not self.pulls:
                self._open(lambda: None, purge=False)
            else:
                self._copy(now)
        elif phase == "cleanup":
            self._cleanup()
        elif phase == "revert-cleanup":
            self._revert_cleanup()

    def _skip_down_streams(self) -> None:
        """With force: give up on the streams to or from a node that is down."""
        skipped = [list(pair) for pair in self.move.get("skipped", [])]
        for t in self.streams():
            pair = (t.source, t.dest)
            if pair in self.done_streams:
                continue
            down = [a for a in pair if not self.shell.is_up(a)]
            if down:
                log.error("move %s: %s is down; giving up on the stream %s -> %s: the keys it "
                          "would carry (%.1f%% of the key space) are LOST",
                          self.move["id"], ", ".join(down), t.source, t.dest,
                          100 * t.fraction())
                self.done_streams.add(pair)
                skipped.append(list(pair))
        if len(skipped) != len(self.move.get("skipped", [])):
            self._commit(dict(self.move, skipped=skipped))
            if self.pulls:
                self.pulls = {d: p for d, p in self.pulls.items()
                              if any(t.dest == d and (t.source, t.dest) not in self.done_streams
                                     for t in self.streams())}

    def _open(self, then: Callable[[], None], purge: bool) -> None:
        """XBEGIN at every destination (idempotent; it also tells us their PULL
        endpoints). In prepare it purges stale keys a bounded step per request,
        so it is repeated until every destination says it is ready. A rollback's
        destinations (the old owners) open in OVERWRITE mode and purge nothing."""
        streams = [t for t in self.streams() if (t.source, t.dest) not in self.done_streams]
        dests = sorted({t.dest for t in streams})
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
            elif not dests:
                self._copy(time.monotonic())  # nothing left to stream (all skipped)
            else:
                then()

        spec: dict[str, Any] = {"id": self.stream_id, "purge": purge}
        if self.reverting:
            spec["mode"] = "overwrite"
        self._step(
            [(d, "XBEGIN", [{**spec, "ranges": self._ranges(streams, d, "dest").to_list()}])
             for d in dests],
            got, after,
        )

    def _send(self, t: Transfer) -> list[tuple[str, str, list[Any]]]:
        self.sent_at[(t.source, t.dest)] = time.monotonic()
        spec: dict[str, Any] = {
            "id": self.stream_id, "source": t.source, "dest": t.dest,
            "pull": self.pulls[t.dest], "ranges": t.ranges.to_list(),
            "batch_keys": self.move["batch_keys"], "batch_bytes": self.move["batch_bytes"],
            "rate": self.move.get("rate"),
        }
        if self.reverting:
            spec["tombs"] = True
        return [(t.source, "XSEND", [spec])]

    def _copy(self, now: float) -> None:
        streams = self.streams()
        pending = [t for t in streams if (t.source, t.dest) not in self.done_streams]
        if not pending:
            self._set_phase("revert-cleanup" if self.reverting else "cleanup")
            return
        if any(t.dest not in self.pulls for t in pending):
            self.pulls.clear()  # a destination to open (again)
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
        sid = self.stream_id
        # a destination that restarted has a new PULL endpoint: every stream to it starts
        # again (what its sources still send goes to the old one, and is lost)
        moved: dict[str, str] = {}
        for t in pending:
            endpoint = pull_endpoint(t.dest, stats.get(t.dest, {}))
            if endpoint and endpoint != self.pulls.get(t.dest):
                moved[t.dest] = endpoint
        self.pulls.update(moved)
        for t in pending:
            pair = (t.source, t.dest)
            dest, source = stats.get(t.dest, {}), stats.get(t.source, {})
            inc = next((s for s in dest.get("incoming", [])
                        if s.get("id") == sid and s.get("source") == t.source), None)
            out = next((s for s in source.get("outgoing", [])
                        if s.get("id") == sid and s.get("dest") == t.dest), None)
            if t.dest in moved:
                restart.append(t)
                continue
            if sid not in dest.get("open", [sid]):
                self.pulls.clear()  # the destination lost the move?! open it again first
                return
            self.progress[pair] = {
                "keys": inc.get("keys", 0) if inc else 0,
                "bytes": inc.get("bytes", 0) if inc else 0,
                "total": out.get("total_keys") if out else None,
            }
            if inc:  # (kept past the phase's end, for outcome())
                self.counts[pair] = self.progress[pair]
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
        elif all((t.source, t.dest) in self.done_streams for t in self.streams()):
            self._set_phase("revert-cleanup" if self.reverting else "cleanup")

    def _live(self, nodes: list[str]) -> list[str]:
        """``nodes``, without those that are down when ``force`` gives up on them."""
        return [n for n in nodes if not self.force or self.shell.is_up(n)]

    def _cleanup(self) -> None:
        """Sources forget what they handed over (a bounded step per XDROP, repeated
        until done); then destinations close the move and the record goes."""
        sources = self._live(sorted({t.source for t in self.transfers} - self.dropped))
        if sources:
            self._drop_step(sources, self.move["id"], "source")
            return
        dests = self._live(sorted({t.dest for t in self.transfers}))
        self._step([(d, "XEND", [{"id": self.move["id"]}]) for d in dests],
                   lambda a, r: None, self._finish)

    def _drop_step(self, nodes: list[str], move_id: str, side: str) -> None:
        def got(addr: str, result: Any) -> None:
            if isinstance(result, dict) and result.get("done"):
                self.dropped.add(addr)

        def again() -> None:
            self.next_at = 0.0

        self._step([(n, "XDROP", [{"id": move_id,
                                   "ranges": self._ranges(self.transfers, n, side).to_list()}])
                    for n in nodes], got, again)

    def _revert_cleanup(self) -> None:
        """The old ring is back: the destinations forget what they had received, and
        every node closes the move and the rollback."""
        dests = self._live(sorted({t.dest for t in self.transfers} - self.dropped))
        if dests:
            self._drop_step(dests, self.stream_id, "dest")
            return
        requests = [(d, "XEND", [{"id": self.move["id"]}])
                    for d in self._live(sorted({t.dest for t in self.transfers}))]
        requests += [(s, "XEND", [{"id": self.stream_id}])
                     for s in self._live(sorted({t.source for t in self.transfers}))]
        self._step(requests, lambda a, r: None, self._finish)

    def outcome(self) -> dict[str, Any]:
        """What a finished move came to: its last status, and ``outcome``: "finished"
        (the new membership is in effect) or "rolled back" (MOVE ABORT: the old one is)."""
        status = self.status()
        for st in status["streams"]:  # (the counts a stream ended with: a phase that
            # came after it, a rollback's cleanup say, has reset what status() reads)
            st.update(self.counts.get((st["source"], st["dest"]), {}))
        return {**status, "phase": "done",
                "outcome": "rolled back" if self.aborted or self.reverting else "finished"}

    def status(self) -> dict[str, Any]:
        streams = []
        cleaning = self.phase in ("cleanup", "revert-cleanup")
        for t in self.streams():
            pair = (t.source, t.dest)
            p = self.progress.get(pair, {})
            streams.append({
                "source": t.source, "dest": t.dest, "share": round(t.fraction(), 6),
                "keys": p.get("keys", 0), "bytes": p.get("bytes", 0), "total": p.get("total"),
                "done": pair in self.done_streams or cleaning,
            })
        lost = [f"{a} -> {b}" for a, b in self.move.get("skipped", [])]
        return {
            "id": self.move["id"], "kind": self.move["kind"], "node": self.move["node"],
            "phase": self.phase, "error": self.error, "streams": streams,
            "rate": self.move.get("rate"), "aborting": self.reverting,
            "force": self.force, "lost_streams": lost,
            "elapsed_s": round(time.time() - float(self.move.get("started_at", time.time())), 3),
        }
