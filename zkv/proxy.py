"""The proxy that owns a cluster's state directory: its config manager.

It is a router shell (zkv.shell) that also keeps the cluster configuration: it is
its only writer, keeps it in the state directory (locked: one manager a cluster),
and sends every new configuration to every node it involves (XCONFIG) before
letting it take effect. ADD, REMOVE and MOVE ABORT are driven step by step by
zkv.mover; heartbeats bring a node that missed a configuration up to date.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from . import durable, lockfile
from .config import format_address, parse_address
from .core import protocol as P
from .core.cluster import NODE_KEY, ClusterState
from .core.planner import moved_fraction, plan, summary
from .core.replication import plan as plan_shard
from .core.replication import promote
from .core.ring import DEFAULT_VNODES, MAX_WEIGHT, Ring
from .errors import ClusterError, ConfigError, NodeUnavailable, ZkvError
from .mover import (
    SETTINGS,
    MoveDriver,
    check_settings,
    new_move,
    repair_settings,
)
from .shell import (
    DEFAULT_CLIENT_BUFFER,
    DEFAULT_MAX_CLIENTS,
    ProxyShell,
)

log = logging.getLogger("zkv.proxy")

STATE_FILE = "cluster.json"
REMOVED_FILE = "removed.json"  # replicas REPLICA REMOVE took out (load_removed)
TELL_EVERY = 2.0  # seconds between tries to tell a removed replica (down then) it is out
HANDOVER_HOLD_MS = 1500  # what a FAILOVER's old primary holds its requests for, at most
KEY_COUNT_EVERY = 5.0  # seconds between the INFO polls that count each node's keys


def load_state(state_dir: str) -> ClusterState | None:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path}: cannot read the proxy state: {exc}") from None
    return ClusterState.from_json(data, path)


def lock_state_dir(state_dir: str) -> int:
    """flock the state directory for this process (one config manager per cluster); the
    lock's file descriptor, held until the process exits. ClusterError if another proxy
    holds it or the directory cannot be used."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        return lockfile.acquire(state_dir)
    except lockfile.Locked as exc:
        raise ClusterError(
            f"the state directory {state_dir} is in use by another proxy (pid {exc.holder}); "
            "one proxy owns a cluster's state: start another with its own --state-dir"
        ) from None
    except OSError as exc:
        raise ClusterError(
            f"cannot use {state_dir} as the proxy's state directory: {exc.strerror or exc}"
        ) from None


def _refuse_unresolvable(addresses: list[str]) -> None:
    """A new cluster's nodes must have names that resolve: a mistyped host would become a
    member that is down for ever, with its share of the keys failing. (Only at the
    first start: a saved cluster's member that does not resolve today is down, as any.)"""
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ClusterError(
                f"node {address}: cannot resolve {host} "
                f"({getattr(exc, 'strerror', None) or exc}); check --node, --replica or "
                "the topology's nodes (nothing was started or saved)") from None


def load_removed(state_dir: str) -> dict[str, Any]:
    """Replicas taken out by REPLICA REMOVE: address -> {shard, epoch}. A topology that
    still lists one does not bring it back on a restart (REPLICA ADD does)."""
    path = os.path.join(state_dir, REMOVED_FILE)
    try:
        data = durable.read_json(path)
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path}: cannot read the replicas REPLICA REMOVE took out "
                           f"({exc}); fix or delete it (deleting it lets the topology's "
                           "replicas back in)") from None
    if data is None:
        return {}
    found = data.get("replicas") if isinstance(data, dict) else None
    if not isinstance(found, dict) or not all(isinstance(k, str) for k in found):
        raise ClusterError(f"{path}: expected {{\"replicas\": {{ADDRESS: {{...}}}}}}; fix or "
                           "delete it (deleting it lets the topology's replicas back in)")
    for addr in found:
        try:
            parse_address(addr, "a replica's address")
        except ConfigError as exc:
            raise ClusterError(f"{path}: {exc}; fix or delete it (deleting it lets the "
                               "topology's replicas back in)") from None
    return dict(found)


def save_removed(state_dir: str, removed: dict[str, Any]) -> None:
    durable.write_json(os.path.join(state_dir, REMOVED_FILE), {"replicas": removed},
                       indent=2)


def save_state(state_dir: str, state: ClusterState) -> None:
    """Write the state atomically and durably (temp file, fsync, rename, fsync dir)."""
    os.makedirs(state_dir, exist_ok=True)
    durable.write_json(os.path.join(state_dir, STATE_FILE), state.to_json(), indent=2)


class Proxy(ProxyShell):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        state_dir: str = "./data/proxy",
        members: dict[str, float] | None = None,
        vnodes: int = DEFAULT_VNODES,
        timeout_ms: int = 2000,
        heartbeat_ms: int = 500,
        heartbeat_misses: int = 3,
        limits: P.Limits = P.DEFAULT_LIMITS,
        move_batch_keys: int = 1000,
        move_batch_bytes: int = 1 << 20,
        move_rate: float | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER,
        replicas: dict[str, list[str]] | None = None,
        min_in_sync: int = 1,
    ) -> None:
        self.state_dir = state_dir
        notes: list[str] = []
        self._lock_fd = lock_state_dir(state_dir)
        self._unsaved = False  # a new cluster's first state, saved once the proxy listens
        state = self._initial_state(members or {}, vnodes, notes, replicas or {}, min_in_sync)
        super().__init__(state, host, port, timeout_ms, heartbeat_ms, heartbeat_misses, limits,
                         max_clients, client_buffer_bytes, knows_every_write=True, notes=notes)
        self.move_defaults: dict[str, Any] = {
            "batch_keys": move_batch_keys, "batch_bytes": move_batch_bytes, "rate": move_rate,
        }
        self.publishing: ClusterState | None = None  # sent to the nodes, not yet in effect
        self.driver: MoveDriver | None = None
        self.last_move: dict[str, Any] | None = None  # MoveDriver.outcome() of the last one
        self._admin_busy = False
        self.failovers = 0  # automatic: a primary that stopped answering
        self.handovers = 0  # FAILOVER commands
        self._next_key_count = 0.0
        # replicas REPLICA REMOVE took out that have not been told so yet (down then):
        # tried again every TELL_EVERY until they answer (the word is in removed.json)
        self._untold: set[str] = set()
        self._telling: set[str] = set()
        self._tell_failed: set[str] = set()  # (said so in the log once)
        self._next_tell = 0.0
        self._ops.update({
            "ADD": self._add,
            "REMOVE": self._remove,
            "MOVE": self._move_command,
            "REPLICA": self._replica,
            "FAILOVER": self._failover,
        })

    # -- what the config manager adds to the shell ---------------------------------------
    def _before_serve(self) -> None:
        if self._unsaved:
            save_state(self.state_dir, self.state)
            self._unsaved = False
        self._repair_move()
        self._apply_state(self.state)
        self._warm_up(min(self.timeout, 1.0))
        for addr in sorted(self.state.link_keys()):  # every node gets the configuration
            self._push(addr, self.state, lambda ok: None)  # in effect here (it already is)
        self._untold = {a for a, entry in load_removed(self.state_dir).items()
                        if not (isinstance(entry, dict) and entry.get("told") is True)}
        if self.state.move is not None:
            log.info("resuming move %s (%s)", self.state.move["id"], self.state.move["phase"])
            self.driver = MoveDriver(self, self.state)

    def _ready_line(self) -> str:
        return f"{super()._ready_line()} state={self.state_dir}"

    def _housekeeping(self, now: float) -> None:
        if self._new_reports and self.publishing is None and not self._admin_busy:
            self._new_reports = False  # (judged once each, as heartbeat answers come in)
            try:
                self._replication(now)
            except Exception:  # noqa: BLE001 - a bad report must not take the manager down
                log.exception("internal error while reconfiguring a shard")
        if now >= self._next_key_count:
            self._next_key_count = now + KEY_COUNT_EVERY
            self._poll_keys()
        if self.driver is not None:
            self._tick_driver(now)
        if self._untold and now >= self._next_tell:
            self._next_tell = now + TELL_EVERY
            for addr in sorted(self._untold - self._telling):
                self._tell_removed(addr, self.state)

    def _replication(self, now: float) -> None:
        """Reconfigure a replicated shard when its nodes' reports call for it
        (zkv.core.replication.plan): one change at a time, each a new epoch."""
        reports = self._fresh_reports(now)
        for name in sorted(self.state.shards):
            new = plan_shard(self.state, name, self.health.is_up(name), reports)
            if new is None:
                continue
            old, shard = self.state.shards[name], new.shards[name]
            if shard["primary"] != old["primary"]:
                self.failovers += 1
                mine = reports.get(old["primary"], {})
                recorded = self.state.identity(name, old["primary"])
                why = ("is not answering" if not self.health.is_up(name)
                       else "answers from a data directory that is not the shard's copy"
                       if mine.get("role") == "lost" or recorded and
                       mine.get("data_id") != recorded
                       else "restarted without its replicas' sessions")
                log.warning("shard %s: primary %s %s: promoting in-sync replica %s "
                            "(epoch %d)", name, old["primary"], why, shard["primary"],
                            new.epoch)
            else:
                gone = sorted(set(old["in_sync"]) - set(shard["in_sync"]))
                came = sorted(set(shard["in_sync"]) - set(old["in_sync"]))
                # (a copy fewer is worth a warning; one more is good news)
                what = (f"{', '.join(gone)} leaves the in-sync set (not acknowledging)"
                        if gone else f"{', '.join(came)} is in sync" if came
                        else "the data directory ids of its copies are recorded")
                log.log(logging.WARNING if gone else logging.INFO, "shard %s: %s (epoch %d)",
                        name, what, new.epoch)
            self.repl_reports.clear()  # judged by the new epoch's reports from now on
            self.commit(new)
            return

    def _fresh_reports(self, now: float) -> dict[str, dict[str, Any]]:
        """The nodes' replication reports of late, at this epoch (address -> report)."""
        fresh = 2 * self.health.interval * self.health.misses
        return {addr: report for addr, (when, epoch, report) in self.repl_reports.items()
                if epoch == self.state.epoch and now - when <= fresh}

    def _idle(self) -> bool:
        return self.driver is None and not self._admin_busy

    def _node_epoch(self, addr: str, epoch: int) -> None:
        if epoch < self.state.epoch and self.publishing is None and addr in self._addresses:
            log.info("%s is at epoch %d, behind %d: sending it the configuration",
                     self.state.describe(addr), epoch, self.state.epoch)
            self._push(addr, self.state, lambda ok: None)

    def _wants(self, epoch: int) -> None:
        if self.publishing is None:
            log.warning("a node is at epoch %d, past this config manager's %d: was its state "
                        "directory replaced?", epoch, self.state.epoch)

    # -- membership ------------------------------------------------------------
    def _initial_state(self, members: dict[str, float], vnodes: int, notes: list[str],
                       replicas: dict[str, list[str]], min_in_sync: int) -> ClusterState:
        saved = load_state(self.state_dir)
        if saved is None:
            _refuse_unresolvable([*members, *(a for r in replicas.values() for a in r)])
            shards = {name: {"primary": name, "replicas": list(r), "in_sync": []}
                      for name, r in replicas.items() if r and name in members}
            state = ClusterState(epoch=1 if members else 0, members=dict(members), vnodes=vnodes,
                                 shards=shards, min_in_sync=min_in_sync,
                                 cluster=secrets.token_hex(8))
            _refuse_short(state)
            # saved once the proxy listens (_before_serve): a start that fails to (a port
            # in use, say) leaves no cluster behind to be started by mistake next time
            self._unsaved = True
            return state
        if not saved.cluster:  # kept from before cluster ids: this cluster gets one now
            saved = dataclasses.replace(saved, epoch=saved.epoch + 1,
                                        cluster=secrets.token_hex(8))
            save_state(self.state_dir, saved)
            log.info("cluster id %s (epoch %d): nodes now refuse any other cluster's "
                     "configuration", saved.cluster, saved.epoch)
        saved = self._new_replicas(saved, replicas, min_in_sync)
        if members and (saved.members != members or saved.vnodes != vnodes):
            note = (
                f"the state directory {self.state_dir} holds membership epoch {saved.epoch} "
                f"({', '.join(sorted(saved.members)) or 'no nodes'}); it differs from the "
                "configured nodes, which are ignored (use ADD/REMOVE to change membership)"
            )
            log.warning(note)
            notes.append(note)
        return saved

    def _new_replicas(self, saved: ClusterState, replicas: dict[str, list[str]],
                      min_in_sync: int) -> ClusterState:
        """Replicas the topology lists that the saved configuration does not have yet
        join their shards (out of sync: they sync first), and min_in_sync is the
        topology's; a replica no longer listed stays (it is not dropped silently)."""
        state = saved
        known = saved.addresses()
        removed = load_removed(self.state_dir) if replicas else {}
        for name, wanted in sorted(replicas.items()):
            new = [a for a in wanted if a not in known]
            for a in [a for a in new if a in removed]:
                log.warning("the topology lists %s as a replica of shard %s, but REPLICA "
                            "REMOVE took it out (epoch %s): it stays out. REPLICA ADD %s %s "
                            "brings it back (once it is empty)", a, name,
                            removed[a].get("epoch") if isinstance(removed[a], dict) else "?",
                            name, a)
            new = [a for a in new if a not in removed]
            if name not in saved.members or not new:
                continue
            shard = state.shards.get(name, {"primary": name, "replicas": [], "in_sync": []})
            state = state.with_shard(name, shard["primary"], [*shard["replicas"], *new],
                                     shard["in_sync"])
            log.info("shard %s: new replicas %s from the topology", name, ", ".join(new))
        if state.min_in_sync != min_in_sync:
            state = dataclasses.replace(state, epoch=state.epoch + 1, min_in_sync=min_in_sync)
        _refuse_short(state)
        if state is not saved:
            save_state(self.state_dir, state)
        return state

    def status(self) -> dict[str, Any]:
        return {
            "epoch": self.state.epoch,
            "members": dict(self.state.members),
            "vnodes": self.state.vnodes,
            "move": self.driver.status() if self.driver else None,
            # the last move this proxy saw end (since it started), and how it ended
            "last_move": self.last_move,
            "failovers": self.failovers,
            "handovers": self.handovers,
            "shards": {k: dict(v) for k, v in self.state.shards.items()},
            # a new configuration on its way to the nodes (a failover, say): its epoch
            "reconfiguring": self.publishing.epoch if self.publishing is not None else None,
            "notes": list(self.notes),
        }

    def config_doc(self, since: Any = None) -> dict[str, Any]:
        return {**super().config_doc(since), "manager": self.address}

    def _poll_keys(self) -> None:
        """Every few seconds, each node's key count: what REMOVE --force reports lost."""
        for addr in self._involved():
            if self.health.is_up(addr):
                self._call(addr, "INFO", [], functools.partial(self._note_keys, addr))

    # -- administration: ADD and REMOVE -------------------------------------------
    def send(self, addr: str, op: str, args: list[Any], done: Callable[[Any], None],
             timeout: float = 60.0) -> None:
        """For the move driver: a request to a node, its result to ``done``."""
        if addr not in self.links:
            self._connect(addr)
        self._call(addr, op, args, done, timeout)

    def commit(self, state: ClusterState, then: Callable[[], None] | None = None) -> None:
        """Persist a new configuration, send it to every node it involves, and let it take
        effect here once they all have it (or are down: they get it when they are back),
        so that no node is ever behind a router that routes by it. ``then`` runs once it
        is in effect."""
        save_state(self.state_dir, state)
        self._publish(state, then)

    def _publish(self, state: ClusterState, then: Callable[[], None] | None = None) -> None:
        self.publishing = state
        # every node the new configuration names, over the links of the one in effect
        # (a failover moves a shard's key to another address only once it takes effect)
        keys = sorted({self.key_of(address) for address in state.link_keys().values()})
        for key in keys:
            if key not in self.links:
                self._connect(key)
        targets = [k for k in keys if self.health.is_up(k)]
        left = set(targets)

        def acked(addr: str, ok: bool) -> None:
            left.discard(addr)
            if not left and self.publishing is state:
                self.publishing = None
                self._apply_state(state)
                if then is not None:
                    then()

        if not targets:
            acked("", True)
        for addr in targets:
            self._push(addr, state, functools.partial(acked, addr))

    def _push(self, addr: str, state: ClusterState, done: Callable[[bool], None]) -> None:
        def answered(result: Any) -> None:
            if isinstance(result, ZkvError):
                log.warning("%s did not take epoch %d: %s (it gets it again once it "
                            "answers)", state.describe(addr), state.epoch, result)
            done(not isinstance(result, ZkvError))

        address = self.link_address.get(addr) or self.address_of(addr)
        name = state.shard_of(address) or address
        self._call(addr, "XCONFIG", [{"config": state.to_json(), "name": name,
                                      "address": address}], answered, self.timeout)

    def current(self) -> ClusterState:
        """The newest configuration: the one on its way to the nodes, else the one in
        effect (what the next change must be made from)."""
        return self.publishing if self.publishing is not None else self.state

    def settled(self) -> bool:
        """For the move driver: no configuration is on its way to the nodes."""
        return self.publishing is None

    def _check_admin(self) -> None:
        if self.driver is not None:
            m = self.driver.move
            raise ClusterError(
                f"a move is under way ({m['kind'].upper()} {m['node']}, phase {m['phase']}); "
                "wait for it to finish (STATUS shows its progress)"
            )
        if self.publishing is not None:
            raise ClusterError("a configuration change is being sent to the nodes; try again")
        if self._admin_busy:
            raise ClusterError("another ADD or REMOVE is being started; try again")

    def _plan_reply(self, new: Ring, dry_run: bool) -> dict[str, Any]:
        old = self.ring
        moves = plan(old, new) if old.members else []
        return {
            "dry_run": dry_run,
            "epoch": self.state.epoch,
            "moved": round(moved_fraction(moves), 6),
            "transfers": [dict(t) for t in summary(old, new, moves)],
        }

    def _add(self, routing: list[bytes], args: list[Any]) -> None:
        addr, options = self._admin_target(args, "ADD", ("weight",))
        self._check_admin()
        if addr in self.state.members:
            raise ClusterError(f"{addr} is already a member; nothing changed")
        if addr in self.current().addresses():  # (a replica, or a node mid-move)
            raise ClusterError(f"{addr} is already a node of this cluster (shard "
                               f"{self.current().shard_of(addr)}); nothing changed")
        if self.state.min_in_sync > 1:
            raise ClusterError(
                f"{addr} would be a shard of one copy, fewer than min_in_sync "
                f"({self.state.min_in_sync}): it could take no write. Start the proxy with "
                "its replicas listed (topology replicas:, or --replica), then ADD it; "
                "nothing changed")
        weight = options.get("weight", 1.0)
        if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT):
            raise ClusterError(
                f"weight must be a number > 0 and at most {MAX_WEIGHT:g}, not {weight!r}; "
                "nothing changed"
            )
        try:
            new_ring = self.ring.with_member(addr, float(weight))
        except ValueError as exc:
            raise ClusterError(f"{exc}; nothing changed") from None
        if options.get("dry_run"):
            return self._answer(routing, self._plan_reply(new_ring, True))
        self._with_live_node(routing, addr, lambda: self._start(
            routing, "add", addr, new_ring, options), must_be_empty=True)

    def _remove(self, routing: list[bytes], args: list[Any]) -> None:
        addr, options = self._admin_target(args, "REMOVE", ("force",))
        if options.get("force"):
            return self._force_remove(routing, addr)
        self._check_admin()
        if addr not in self.state.members:
            raise ClusterError(f"{addr} is not a member; nothing changed")
        if len(self.state.members) == 1:
            raise ClusterError(f"cannot remove {addr}: it is the last node; nothing changed")
        new_ring = self.ring.without_member(addr)
        if options.get("dry_run"):
            return self._answer(routing, self._plan_reply(new_ring, True))
        self._with_live_node(routing, addr, lambda: self._start(routing, "remove", addr,
                                                                new_ring, options))

    # -- administration: replicas and failover ---------------------------------------------
    def _node_arg(self, text: str, what: str) -> str:
        try:
            return format_address(*parse_address(text, what))
        except ZkvError as exc:
            raise ClusterError(f"{exc}; nothing changed") from None

    def _shard_arg(self, text: str) -> str:
        name = self._node_arg(text, "shard")
        if name not in self.state.members:
            raise ClusterError(f"{name} is not a shard (the shards are "
                               f"{', '.join(sorted(self.state.members)) or 'none'}); "
                               "nothing changed")
        return name

    def _replica(self, routing: list[bytes], args: list[Any]) -> None:
        """REPLICA ADD SHARD ADDR (an empty node that answers joins the shard and syncs)
        and REPLICA REMOVE ADDR (a replica leaves its shard)."""
        action = args[0]
        self._check_admin()
        state = self.state
        if action == "ADD":
            if len(args) != 3:
                raise ClusterError("usage: REPLICA ADD SHARD HOST:PORT; nothing changed")
            name, addr = self._shard_arg(args[1]), self._node_arg(args[2], "replica")
            # (a shard's name is its first node's address: that node, taken out by
            # REPLICA REMOVE after a FAILOVER, may come back to its own shard)
            returning = addr == name and name in state.shards and not any(
                addr == s["primary"] or addr in s["replicas"] for s in state.shards.values())
            if not returning and (state.shard_of(addr) is not None or addr in state.involved()):
                raise ClusterError(f"{addr} is already a node of this cluster (shard "
                                   f"{state.shard_of(addr)}); nothing changed")
            shard = state.shards.get(name, {"primary": name, "replicas": [], "in_sync": []})

            def attach() -> None:
                new = self.state.with_shard(name, shard["primary"],
                                            [*shard["replicas"], addr], shard["in_sync"])
                log.info("shard %s: replica %s added (epoch %d); it syncs now", name, addr,
                         new.epoch)
                removed = load_removed(self.state_dir)
                if removed.pop(addr, None) is not None:
                    save_removed(self.state_dir, removed)
                self._untold.discard(addr)
                self.commit(new, lambda: self._answer(routing, {
                    "shard": name, "replica": addr, "epoch": new.epoch}))

            self._with_live_node(routing, addr, attach, must_be_empty=True)
            return
        if len(args) != 2:
            raise ClusterError("usage: REPLICA REMOVE HOST:PORT; nothing changed")
        gone = self._node_arg(args[1], "replica")
        home = state.shard_of(gone)
        entry = state.shards.get(home or "")
        if home is None or entry is None or gone not in entry["replicas"]:
            what = f"the primary of shard {home} (FAILOVER it first)" \
                if entry is not None else "not a replica of any shard"
            raise ClusterError(f"{gone} is {what}; nothing changed")
        left = [a for a in entry["replicas"] if a != gone]
        if 1 + len(left) < state.min_in_sync:
            raise ClusterError(
                f"removing {gone} would leave shard {home} {1 + len(left)} "
                f"{'copy' if not left else 'copies'}, fewer "
                f"than min_in_sync ({state.min_in_sync}): its writes would be refused. "
                "REPLICA ADD another first; nothing changed")
        smaller = state.with_shard(home, entry["primary"], left,
                                   [a for a in entry["in_sync"] if a != gone])
        log.info("shard %s: replica %s removed (epoch %d)", home, gone, smaller.epoch)
        removed = load_removed(self.state_dir)
        removed[gone] = {"shard": home, "epoch": smaller.epoch}
        save_removed(self.state_dir, removed)  # (first: a restart must not add it back)

        def removed_() -> None:
            self._answer(routing, {"shard": home, "removed": gone, "epoch": smaller.epoch})
            self._tell_removed(gone, smaller)

        self.commit(smaller, removed_)

    def _tell_removed(self, gone: str, state: ClusterState) -> None:
        """Send a node taken out of the cluster the configuration that no longer names
        it, so that it stops taking itself for a replica. One that is down now is told
        once it is back (tried every TELL_EVERY, across restarts of this proxy: the
        word is kept in removed.json); until then it serves nothing."""
        key = NODE_KEY + gone
        if key in self._addresses:
            self._untold.discard(gone)  # (named again: REPLICA ADD took it back)
            return
        self._untold.add(gone)
        self._telling.add(gone)
        if key not in self.links:
            # (left open once it is told: a REPLICA ADD of the same node may use it;
            # the next configuration's tidying closes it)
            self._connect(key)

        def answered(result: Any) -> None:
            self._telling.discard(gone)
            if isinstance(result, ZkvError):
                if gone not in self._tell_failed:
                    self._tell_failed.add(gone)
                    log.info("node %s, taken out of the cluster, was not told so (%s); "
                             "it is told once it answers", gone, result)
                return
            if gone in self._untold:
                self._untold.discard(gone)
                self._tell_failed.discard(gone)
                removed = load_removed(self.state_dir)
                if isinstance(removed.get(gone), dict):
                    removed[gone]["told"] = True
                    save_removed(self.state_dir, removed)
                log.info("node %s was told it is out of the cluster", gone)

        self._call_connecting(key, "XCONFIG", [{"config": state.to_json(), "name": gone,
                                                "address": gone}], answered)

    def _call_connecting(self, key: str, op: str, args: list[Any],
                         done: Callable[[Any], None]) -> None:
        """``_call`` on a link that may still be connecting (a send on it fails at once):
        tried again every 50 ms until it goes, for one request timeout."""
        deadline = time.monotonic() + self.timeout

        def answered(result: Any) -> None:
            if (isinstance(result, NodeUnavailable) and "not connected" in str(result)
                    and time.monotonic() < deadline):
                self._later(0.05, attempt)
                return
            done(result)

        def attempt() -> None:
            self._call(key, op, args, answered, self.timeout)

        attempt()

    def _failover(self, routing: list[bytes], args: list[Any]) -> None:
        """FAILOVER SHARD [ADDR]: a planned handover to an in-sync replica. The new
        primary serves once the old one's lease has run out (zkv.replicator), so no
        write the old one acknowledged is missed and no two primaries answer."""
        self._check_admin()
        name = self._shard_arg(args[0])
        options = dict(args[2]) if len(args) > 2 else {}
        for option in options:
            if option != "force":
                raise ClusterError(f"unknown option {option!r} for FAILOVER; it takes force")
        if options.get("force", False) not in (True, False):
            raise ClusterError("force must be true or false")
        shard = self.state.shards.get(name)
        if options.get("force"):
            return self._force_failover(routing, name, shard, args[1] if len(args) > 1 else "")
        if shard is None or not shard["replicas"]:
            raise ClusterError(f"shard {name} has no replicas; nothing changed")
        live = [a for a in shard["in_sync"] if self.health.is_up(self.key_of(a))]
        if len(args) > 1:
            target = self._node_arg(args[1], "new primary")
            if target not in shard["in_sync"]:
                state = ("the primary already" if target == shard["primary"]
                         else "not a replica of it" if target not in shard["replicas"]
                         else "not in sync (NODES shows its state)")
                raise ClusterError(f"{target} is {state}; shard {name} stays with "
                                   f"{shard['primary']}")
            if target not in live:
                raise ClusterError(f"{target} does not answer heartbeats; shard {name} "
                                   f"stays with {shard['primary']}")
        elif live:
            target = live[0]
        elif shard["in_sync"]:
            raise ClusterError(f"no in-sync replica of shard {name} answers heartbeats "
                               f"({', '.join(shard['in_sync'])}); nothing changed")
        else:
            raise ClusterError(f"shard {name} has no replica in sync; nothing changed")
        self._admin_busy = True  # (no other change until it is decided)

        def answered(result: Any) -> None:
            if isinstance(result, ZkvError):  # (a heartbeat or two late to say it is down)
                self._admin_busy = False
                self._fail(routing, ClusterError(
                    f"{target} does not answer ({result}); shard {name} stays with "
                    f"{shard['primary']}"))
                return
            if self.state.shards.get(name) != shard or self.publishing is not None:
                self._admin_busy = False
                self._fail(routing, ClusterError(
                    f"shard {name} changed meanwhile (NODES shows it now); nothing changed"))
                return
            expected = self.state.identity(name, target)
            found = result.get("data_id") if isinstance(result, dict) else None
            if expected and found != expected:
                self._admin_busy = False
                self._fail(routing, ClusterError(
                    f"{target} answers from data directory id {found}, not the copy that "
                    f"joined the in-sync set (id {expected}): it was wiped or replaced "
                    f"since; shard {name} stays with {shard['primary']}"))
                return
            # the old primary holds its data requests and answers once its replicas
            # hold every write made before: none of them is left with an unknown
            # outcome, and the held ones go to the new primary. (Without its answer
            # (just died, say) the handover goes on as before: the new primary waits
            # out its lease, and what it had in flight has an unknown outcome.)
            self._call(name, "XHANDOVER", [{"ms": HANDOVER_HOLD_MS}], handed,
                       min(self.timeout, 1.0))

        def handed(result: Any) -> None:
            self._admin_busy = False
            if isinstance(result, ZkvError):
                log.warning("shard %s: the primary %s did not hold its requests for the "
                            "handover (%s); handing over all the same", name,
                            shard["primary"], result)
            if self.state.shards.get(name) != shard or self.publishing is not None:
                self._fail(routing, ClusterError(
                    f"shard {name} changed meanwhile (NODES shows it now); nothing changed"))
                return
            new = promote(self.state, name, target)
            self.handovers += 1
            log.warning("shard %s: FAILOVER from %s to %s (epoch %d)", name,
                        shard["primary"], target, new.epoch)
            self.commit(new, lambda: self._answer(routing, {
                "shard": name, "primary": target, "was": shard["primary"],
                "epoch": new.epoch}))

        # a last word from the new primary itself: a replica killed a moment ago is
        # still up by its heartbeats, and promoting it would leave the shard with none
        self._call(self.key_of(target), "INFO", [], answered, min(self.timeout, 1.0))

    def _force_failover(self, routing: list[bytes], name: str, shard: dict[str, Any] | None,
                        addr: str) -> None:
        """FAILOVER SHARD ADDR --force: the copy at ADDR (a replica, or the primary itself
        on a new data directory) becomes the shard's as it is, for a shard that has no
        in-sync copy left. What the lost copy held and ADDR lacks is lost: refused while
        the shard's primary still serves its copy or an in-sync replica holding it
        answers (then a plain FAILOVER, or nothing, loses nothing)."""
        if shard is None:
            raise ClusterError(f"{name} is not a replicated shard; nothing changed")
        if not addr:
            raise ClusterError("FAILOVER --force needs the node to promote: FAILOVER SHARD "
                               "HOST:PORT --force")
        target = self._node_arg(addr, "new primary")
        if target != shard["primary"] and target not in shard["replicas"]:
            raise ClusterError(f"{target} is not a node of shard {name}; nothing changed")
        reports = self._fresh_reports(time.monotonic())
        primary = shard["primary"]
        mine = reports.get(primary, {})
        recorded = self.state.identity(name, primary)
        lost = mine.get("role") == "lost" or bool(recorded) and "data_id" in mine \
            and mine["data_id"] != recorded
        if self.health.is_up(name) and not lost:  # (or not known to be lost yet)
            raise ClusterError(
                f"shard {name}'s primary {primary} is up and serving the shard's copy; "
                "--force would throw it away. Use FAILOVER without --force; nothing changed")
        live = [a for a in shard["in_sync"] if self.health.is_up(self.key_of(a))]
        for addr in live:
            if "data_id" not in reports.get(addr, {}):
                raise ClusterError(
                    f"in-sync replica {addr} of shard {name} answers but has not reported "
                    "its copy at this epoch yet; try again in a moment. Nothing changed")
            if self.state.identity(name, addr) in ("", reports[addr]["data_id"]):
                raise ClusterError(
                    f"in-sync replica {addr} of shard {name} answers: it holds every "
                    "acknowledged write, and the config manager promotes it on its own (or "
                    "use FAILOVER without --force); nothing changed")
        self._admin_busy = True

        def answered(result: Any) -> None:
            self._admin_busy = False
            found = result.get("data_id") if isinstance(result, dict) else None
            if not isinstance(found, str) or not found:
                self._fail(routing, ClusterError(
                    f"{target} does not answer ({result}); shard {name} stays with "
                    f"{primary}"))
                return
            if self.state.shards.get(name) != shard or self.publishing is not None:
                self._fail(routing, ClusterError(
                    f"shard {name} changed meanwhile (NODES shows it now); nothing changed"))
                return
            new = promote(self.state, name, target, found)
            self.handovers += 1
            keys = result.get("keys")
            lost = (f"whatever the shard's last copy held that {target}'s {keys} keys lack "
                    "is lost")
            log.error("shard %s: FAILOVER to %s --force (epoch %d): its copy (data directory "
                      "id %s) is the shard's now; %s", name, target, new.epoch, found, lost)
            self.commit(new, lambda: self._answer(routing, {
                "shard": name, "primary": target, "was": primary, "epoch": new.epoch,
                "forced": True, "keys": keys, "lost": lost}))

        self._call(self.key_of(target), "INFO", [], answered, min(self.timeout, 1.0))

    def _force_remove(self, routing: list[bytes], addr: str) -> None:
        """REMOVE ADDR --force: a node that is gone for good leaves the ring without its
        keys being moved. They are lost, and said to be: by count, in the reply and the
        log. Refused while the node answers (then a plain REMOVE loses nothing)."""
        if self.health.is_up(addr):
            raise ClusterError(f"{addr} is up: REMOVE it without --force, which moves its "
                               "keys to the other nodes first; nothing changed")
        known = self.node_keys.get(addr)
        lost = (f"{known[0]} keys (as it last reported, {time.time() - known[1]:.0f} s ago)"
                if known else "an unknown number of keys (it has not reported since this "
                "proxy started)")
        if self.driver is not None:
            move = self.driver.move
            if move["node"] == addr and move["kind"] == "remove":
                message = self.driver.force_finish(addr)
            elif move["node"] == addr and move["kind"] == "add":
                message = ("giving up the ADD of " + addr + ": "
                           + self.driver.abort(force=True))
                # (what it held were copies, still at their old owners: only the writes
                # it took during the move are lost)
                lost = ("the writes it took during the move (of its "
                        + (f"{known[0]} keys as it last reported" if known else
                           "keys, a number not reported") + "; the rest are still on their "
                        "old owners)")
            else:
                raise ClusterError(
                    f"{addr} is part of move {move['id']} ({move['kind'].upper()} "
                    f"{move['node']}); roll it back first (MOVE ABORT --force), then REMOVE "
                    f"{addr} --force; nothing changed")
            log.error("REMOVE %s --force during move %s: %s; %s is LOST", addr, move["id"],
                      message, lost)
            return self._answer(routing, {"removed": addr, "forced": True, "id": move["id"],
                                          "epoch": self.state.epoch, "lost": lost,
                                          "message": message})
        if addr not in self.state.members:
            raise ClusterError(f"{addr} is not a member; nothing changed")
        if len(self.state.members) == 1:
            raise ClusterError(f"cannot remove {addr}: it is the last node; nothing changed")
        smaller = self.state.with_members(
            {a: w for a, w in self.state.members.items() if a != addr})
        log.error("REMOVE %s --force: the node is dropped from the ring at epoch %d without "
                  "its keys: %s are LOST", addr, smaller.epoch, lost)
        reply = {"removed": addr, "forced": True, "epoch": smaller.epoch, "lost": lost,
                 "lost_keys": known[0] if known else None}
        self.commit(smaller, lambda: self._answer(routing, reply))

    def _move_command(self, routing: list[bytes], args: list[Any]) -> None:
        """MOVE ABORT [--force]: roll the move under way back (see zkv.mover)."""
        options = dict(args[1]) if len(args) > 1 else {}
        for name in options:
            if name != "force":
                raise ClusterError(f"unknown option {name!r} for MOVE ABORT; it takes force")
        force = options.get("force", False)
        if not isinstance(force, bool):
            raise ClusterError("force must be true or false")
        if self.driver is None:
            raise ClusterError("no move is under way; nothing changed")
        move_id = self.driver.move["id"]
        message = self.driver.abort(force)
        log.warning("MOVE ABORT%s of %s: %s", " --force" if force else "", move_id, message)
        self._answer(routing, {"id": move_id, "epoch": self.state.epoch, "message": message,
                               "move": None if self.driver.finished else self.driver.status()})

    def is_up(self, addr: str) -> bool:
        """For the move driver: whether a node answers its heartbeats."""
        return self.health.is_up(addr)

    def _admin_target(self, args: list[Any], op: str,
                      extra: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        """The node address and the checked options of an ADD or REMOVE: every option is
        validated here, before anything is persisted, so a bad one changes nothing."""
        address = self._node_arg(args[0], "node address")
        options: dict[str, Any] = dict(args[1]) if len(args) > 1 else {}
        allowed = ("dry_run", *extra, *SETTINGS)
        for name in options:
            if name not in allowed:
                raise ClusterError(f"unknown option {name!r} for {op}; it takes "
                                   f"{', '.join(allowed)}; nothing changed")
        if not isinstance(options.get("dry_run", False), bool):
            raise ClusterError("dry_run must be true or false; nothing changed")
        settings = check_settings(options, self.limits.max_message_bytes // 2)
        options.update(settings)
        return address, options

    def _with_live_node(self, routing: list[bytes], addr: str, then: Callable[[], None],
                        must_be_empty: bool = False) -> None:
        """Run ``then`` once ``addr`` answers (INFO); else a clear error, nothing changed.
        With ``must_be_empty``, a node that holds keys is refused: joining would mix
        another data set into this cluster's."""
        self._admin_busy = True
        # (the link to the node at addr: a link named addr may be a shard's, reaching its
        # primary elsewhere when addr is the shard's first node, since failed over)
        key = addr if self.link_address.get(addr, addr) == addr else NODE_KEY + addr
        temporary = key not in self.links
        if temporary:
            self._connect(key)

        def answered(result: Any) -> None:
            self._admin_busy = False
            if isinstance(result, ZkvError):
                if temporary and key in self.links:
                    self._disconnect(key)
                self._fail(routing, ClusterError(
                    f"node {addr} does not answer ({result}); nothing changed"))
                return
            why = self._cannot_join(addr, result) if must_be_empty else None
            if why is not None:
                if temporary and key in self.links:
                    self._disconnect(key)
                self._fail(routing, ClusterError(f"{why}; nothing changed"))
                return
            try:
                then()
            except ZkvError as exc:
                self._fail(routing, exc)

        self._call_connecting(key, "INFO", [], answered)

    def _cannot_join(self, addr: str, info: Any) -> str | None:
        """Why the server at ``addr`` (its INFO: ``info``) cannot join this cluster as a
        new node, or None: it must be a storage node, empty, and not already a node of
        this cluster or of another one under some other address."""
        info = info if isinstance(info, dict) else {}
        role = info.get("role")
        if role != "node":
            return (f"{addr} is not a storage node (it answers as a {role or 'server'} of "
                    "some other kind): only a `zkv node` can join")
        known = info.get("config_address") or info.get("name")
        cluster = info.get("cluster")
        if cluster and cluster == self.state.cluster and known != addr \
                and known in self.current().addresses():
            return (f"{addr} is node {known} of this cluster under another address: one "
                    "node cannot be two")
        if cluster and cluster != self.state.cluster and info.get("in_cluster"):
            return (f"node {addr} belongs to another cluster ({cluster}, epoch "
                    f"{info.get('epoch')}, as {info.get('name')}): its data directory holds "
                    "that cluster's configuration; start it with a new data directory")
        keys = info.get("keys", 0)
        if keys:
            return (f"node {addr} already holds {keys} keys; a node must be empty to join "
                    "(start it with a new data directory)")
        return None

    def _start(self, routing: list[bytes], kind: str, addr: str,
               new_ring: Ring, options: dict[str, Any]) -> None:
        reply = self._plan_reply(new_ring, False)
        new_members = new_ring.weights
        if not self.state.members:  # the first node: nothing to move
            first = self.state.with_members(new_members)
            reply["epoch"] = first.epoch
            self.commit(first, lambda: self._answer(routing, reply))  # once in effect
            return None
        settings = dict(self.move_defaults)
        settings.update({k: v for k, v in options.items() if k in settings and v is not None})
        move = new_move(self.state, kind, addr, new_members, settings)
        started = self.state.with_move(move)
        self.commit(started)  # in effect once every node has it; the driver waits for that
        self.driver = MoveDriver(self, started)
        reply["id"], reply["kind"], reply["node"] = move["id"], kind, addr
        self._answer(routing, reply)

    def _repair_move(self) -> None:
        """A move persisted with settings that are not valid (an older zkv took them
        unchecked) would retry forever: run it with the defaults instead, and say so."""
        move = self.state.move
        if move is None:
            return
        fixed, notes = repair_settings(move, self.move_defaults,
                                       self.limits.max_message_bytes // 2)
        if notes:
            for note in notes:
                log.warning("%s", note)
            self.notes.extend(notes)
            save_state(self.state_dir, self.state.with_move(fixed))
            self.state = self.state.with_move(fixed)

    def _tick_driver(self, now: float) -> None:
        assert self.driver is not None
        try:
            self.driver.tick(now)
        except Exception as exc:  # noqa: BLE001 - a bug in a step: report it, retry later
            log.exception("internal error in move %s", self.driver.move.get("id"))
            self.driver.error = f"internal error: {type(exc).__name__}: {exc}"
            self.driver.waiting = 0
            self.driver.next_at = now + 1.0
        if self.driver.finished and self.publishing is None:
            # (only once its last configuration is in effect: STATUS shows no move then)
            self.last_move = self.driver.outcome()
            self.driver = None
            self._drop_links()

__all__ = ["Proxy", "load_state", "save_state"]


def _refuse_short(state: ClusterState) -> None:
    """A configuration where some shard has fewer copies than min_in_sync is refused:
    that shard could take no write (a mistake, not a setting)."""
    short = state.short_shards()
    if short:
        listed = ", ".join(f"{name} ({copies} {'copy' if copies == 1 else 'copies'})"
                           for name, copies in short)
        raise ConfigError(
            f"min_in_sync is {state.min_in_sync}, more copies than "
            f"{'shard' if len(short) == 1 else 'shards'} {listed} "
            f"{'has' if len(short) == 1 else 'have'}: "
            f"{'it' if len(short) == 1 else 'they'} could take no write. List more replicas "
            "(replicas: in the topology, or "
            "--replica PRIMARY=REPLICA), or lower min_in_sync")
