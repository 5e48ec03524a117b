"""The storage node: a ROUTER socket in front of a Storage.

One thread runs one poll loop. Each turn it drains the requests that are
waiting (up to a limit), executes them against the in-memory map, commits the
log records they produced with one write (and one fsync under ``always``), and
only then sends the replies: group commit, and no acknowledgement before the
write is as durable as the policy promises.

With CURVE (zkv.security) its ROUTER takes any allowed key and its PULL socket
cluster keys only; each request is checked against the role of the key it came
from (internal operations need the cluster key).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import durable
from . import frames as wire
from .config import format_address, parse_address
from .core import once, strings, wal
from .core import protocol as P
from .core.cluster import ClusterState
from .core.expiry import MAX_DEADLINE
from .core.keyspace import FILL, OVERWRITE, UNKNOWN, Keyspace
from .core.placement import FROZEN, Placement
from .core.replication import SYNC_MOVE
from .core.ring import RangeSet, key_hash
from .core.timings import Timings
from .core.transfer import (
    MAX_BATCH_KEYS,
    Incoming,
    Outgoing,
    RangeScan,
    SnapshotStream,
    decode_batch,
)
from .errors import (
    ClusterError,
    CommandError,
    InternalError,
    LimitExceeded,
    Moved,
    NodeBehind,
    OutcomeUnknown,
    ProtocolError,
    StaleEpoch,
    StorageError,
    Unavailable,
    ZkvError,
)
from .guard import (
    FD_RESERVE,
    FRONT_HWM,
    ROUTER_ID_PREFIX,
    ConnectionGuard,
    OutputBudget,
    client_limit,
    raise_fd_limit,
    rss_bytes,
)
from .replicator import FREE_OPS, XREPL_HEAD, Replicator
from .security import CLUSTER, CLUSTER_DOMAIN, IMPOSTOR, Curve, check_exposure, require
from .storage import Recovery, Storage

log = logging.getLogger("zkv.node")

MAX_BATCH_PER_TURN = 2048
MAX_HOLD_MS = 1500  # the longest a handover may hold a primary's data requests
HELD_BYTES = 64 << 20  # what a handover holds at most (more runs as it comes)
_OK_ITEM = [P.OK, "OK"]
# A SCAN page visits at most this many buckets and looks at about this many bytes of
# keys, whatever COUNT asks, so that one page never holds the loop for long.
FLUSH_RUN = 10_000  # keys in one log record of a FLUSHALL
BACKUP_STALL = 60.0  # seconds a backup stream may wait for its reader before it closes
SCAN_MAX_BUCKETS = 4096
SCAN_MAX_KEY_BYTES = 1 << 20
CLUSTER_FILE = "CLUSTER"  # the cluster configuration the node was last given
# Moves a node takes part in at once (incoming, outgoing streams, range scans): a
# handful in practice; the bound keeps a stray or hostile request from piling up
# sockets and state.
MAX_MOVES = 64
# Active expiry takes keys a slice at a time (about a millisecond), and while requests
# come in, one slice in EXPIRE_SHARE of the node's time at most (Redis gives it 25%).
EXPIRE_SLICE = 200
EXPIRE_SHARE = 4
# Room left in a reply for the framing of each item and for error items.
ITEM_OVERHEAD = 16
ERROR_ITEM_BYTES = 256


class Node:
    def __init__(
        self,
        host: str,
        port: int,
        data_dir: str,
        fsync: str = "everysec",
        limits: P.Limits = P.DEFAULT_LIMITS,
        snapshot_factor: float = 4.0,
        snapshot_min_bytes: int = 4 << 20,
        repair: bool = False,
        max_clients: int = 10_000,
        client_buffer_bytes: int = 64 << 20,
    ) -> None:
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_clients = max_clients
        self.client_buffer_bytes = client_buffer_bytes
        self.guards: list[ConnectionGuard] = []
        self.out: OutputBudget | None = None
        self.host, self.port = host, port
        self.limits = limits
        self.storage = Storage(data_dir, fsync, snapshot_factor, snapshot_min_bytes, repair)
        # Names this run of the node in SCAN cursors: bucket numbers mean nothing to
        # another process (the buckets hash with Python's per-process salt).
        self.incarnation = secrets.token_hex(4)
        self.counters: dict[str, int] = {}
        self.errors = 0
        self.expired = 0  # keys deleted by active expiry
        self.error_codes: dict[tuple[str, str], int] = {}  # (op, code) -> error replies
        self.timings = Timings()  # service time by op, while metrics are served
        self.timed = False
        self._seen = 0
        self.metrics_port: int | None = None
        # CURVE (zkv.security): set before run; None serves without it (loopback only,
        # unless ``insecure``)
        self.curve: Curve | None = None
        self.insecure = False
        self.peer_role: str | None = None  # the role of the key whose message is handled
        self.started = time.monotonic()
        self.recovery: Recovery | None = None
        self._stop = False
        self._durable = False  # this turn wrote move records: fsync whatever the policy
        self.pull_endpoint = ""
        self.pull_port = 0
        self.outgoing: dict[tuple[str, str], Outgoing | SnapshotStream] = {}
        self.pushes: dict[tuple[str, str], zmq.Socket[bytes]] = {}
        self.incoming: dict[tuple[str, str], Incoming] = {}
        self.jobs: dict[tuple[str, str], RangeScan] = {}
        self.finished_jobs: dict[tuple[str, str], None] = {}  # in order, oldest first
        self.ctx: zmq.Context[Any] | None = None
        self._handlers: dict[str, Callable[[list[Any]], Any]] = {
            "PING": lambda a: "PONG",
            "INFO": lambda a: self.info(),
            "GET": self._get,
            "EXISTS": lambda a: int(self._get(a) is not None),
            "SET": self._set,
            "DEL": self._del,
            "MGET": self._mget,
            "MSET": self._mset,
            "SETNX": lambda a: self._wrote(strings.setnx(self._ks, a[0], a[1], _now())),
            "GETSET": lambda a: self._wrote(strings.getset(self._ks, a[0], a[1], _now())),
            "GETDEL": lambda a: self._wrote(strings.getdel(self._ks, a[0], _now())),
            "GETEX": lambda a: self._wrote(strings.getex(self._ks, a[0], (a + [{}])[1],
                                                         _now())),
            "APPEND": lambda a: self._wrote(strings.append(
                self._ks, a[0], a[1], _now(), self.limits.max_value_bytes)),
            "STRLEN": lambda a: strings.strlen(self._ks, a[0], _now()),
            "INCR": lambda a: self._wrote(strings.incrby(self._ks, a[0], 1, _now())),
            "DECR": lambda a: self._wrote(strings.incrby(self._ks, a[0], -1, _now())),
            "INCRBY": lambda a: self._wrote(strings.incrby(self._ks, a[0], a[1], _now())),
            "DECRBY": lambda a: self._wrote(strings.decrby(self._ks, a[0], a[1], _now())),
            "EXPIRE": lambda a: self._expire("EXPIRE", a),
            "PEXPIRE": lambda a: self._expire("PEXPIRE", a),
            "EXPIREAT": lambda a: self._expire("EXPIREAT", a),
            "PEXPIREAT": lambda a: self._expire("PEXPIREAT", a),
            "TTL": lambda a: strings.ttl(self._ks, a[0], _now(), False),
            "PTTL": lambda a: strings.ttl(self._ks, a[0], _now(), True),
            "EXPIRETIME": lambda a: strings.expiretime(self._ks, a[0], _now(), False),
            "PEXPIRETIME": lambda a: strings.expiretime(self._ks, a[0], _now(), True),
            "PERSIST": lambda a: self._wrote(strings.persist(self._ks, a[0], _now())),
            "MSETNX": lambda a: self._wrote(strings.msetnx(self._ks, a[0], _now())),
            "DBSIZE": lambda a: self._ks.live_count(_now()),
            "ONCE": self._once,
            "SCAN": self._scan,
            "KEYS": self._keys,
            "PIPE": self._pipe,
            "XBEGIN": self._xbegin,
            "XEND": self._xend,
            "XDROP": self._xdrop,
            "XSEND": self._xsend,
            "XSTAT": lambda a: self.move_status(),
            "XGET": lambda a: list(self._ks.state(a[0], _now())),
            "XPEEK": self._xpeek,
            "XFILL": self._xfill,
            "XSEEN": self._xseen,
            "XDEL": self._xdel,
            "XCONFIG": self._xconfig,
            "XBACKUP": self._xbackup,
            "XFLUSH": self._xflush,
            "XHEALTH": self._xhealth,
            "XHANDOVER": self._xhandover,
            "XREPL": lambda a: self.repl.xrepl(a),
            "CONFIG": lambda a: self.config_doc(),
        }
        # The cluster configuration this node was last given (zkv.core.placement): which keys
        # it serves at which epoch, and the name the ring knows it by.
        self.placement: Placement | None = None
        self.ring_name = self.address
        self.config_address: str | None = None  # how the config manager reaches this node
        self.cluster_tag = b""  # names its cluster in envelopes (zkv.core.protocol)
        self._checking = False  # the request being run is checked key by key
        self.routers: dict[bytes, float] = {}  # who sent envelopes lately, and when
        self._refused_pushers: set[str] = set()  # keys whose stream batches were dropped
        self.repl = Replicator(self)  # this node's part in its shard's replication
        self.touched = False  # the request being run read or wrote data (see serve)
        # A planned handover (XHANDOVER): until then (monotonic; 0: none), or until the
        # next configuration, data requests wait here, unrun, with their peer's role
        self.hold_until = 0.0
        self.held: collections.deque[tuple[list[bytes], str | None]] = collections.deque()
        self.held_bytes = 0

    # -- commands ----------------------------------------------------------
    @property
    def _ks(self) -> Keyspace:
        return self.storage.keyspace

    def _wrote(self, outcome: tuple[Any, bytes]) -> Any:
        """A command's reply, its records added to this turn's (zkv.core.strings)."""
        result, records = outcome
        if records:
            self.storage.pending += records
        return result

    def _get(self, a: list[Any]) -> Any:
        ks = self.storage.keyspace
        value = ks.data.get(a[0])
        if value is not None and ks.expires:
            return ks.get(a[0], _now())
        return value

    def _set(self, a: list[Any]) -> Any:
        if len(a) > 2 and a[2]:
            return self._wrote(strings.set_(self._ks, a[0], a[1], a[2], _now()))
        self.storage.pending += self.storage.keyspace.set(a[0], a[1])
        return "OK"

    def _once(self, a: list[Any]) -> Any:
        """A write tagged for safe retries (zkv.core.once): its first outcome if this node
        has applied it already, else applied now, its records and outcome logged as
        one ONCE record."""
        client, seq, (op, args) = a
        return self._once_apply(client, seq, op, lambda: self.execute(op, args))

    def _once_apply(self, client: bytes, seq: int, op: str, apply: Callable[[], Any]) -> Any:
        ks = self._ks
        seen, outcome = ks.once.get(client, seq)
        if seen:
            self.counters["RETRIED"] = self.counters.get("RETRIED", 0) + 1
            if isinstance(outcome, dict) and once.BIG in outcome:
                raise CommandError(
                    f"this {op} was applied already (a retry); its reply of "
                    f"{outcome[once.BIG]} bytes was not kept: read the key to see it")
            return outcome
        if ks.once.forgotten(client, seq):
            raise _forgotten(op)
        pending = self.storage.pending
        start = len(pending)
        result = apply()
        records = bytes(pending[start:])
        del pending[start:]
        outcome = once.kept(result)
        ks.once.remember(client, seq, outcome)
        pending += wal.encode((wal.ONCE, client, seq, outcome, records))
        return result

    def _expire(self, command: str, a: list[Any]) -> Any:
        return self._wrote(strings.expire(self._ks, command, a[0], a[1],
                                          a[2] if len(a) > 2 else None, _now()))

    def _xpeek(self, a: list[Any]) -> Any:
        """A key's whole state for a move's read-modify-write (zkv.core.router): [state,
        value, deadline]."""
        ks = self._ks
        state, value = ks.state(a[0], _now())
        return [state, value, ks.deadline(a[0]) if value is not None else None]

    def _xseen(self, a: list[Any]) -> Any:
        """Whether this node applied a tagged write, and its outcome (for a retry of it
        routed elsewhere by a move): [True, outcome] or [False]."""
        spec = a[0] if a else None
        if not isinstance(spec, dict) or not once.valid_id(spec.get("client"),
                                                           spec.get("seq")):
            raise ProtocolError("XSEEN takes {client, seq}")
        table = self._ks.once
        seen, outcome = table.get(spec["client"], spec["seq"])
        if not seen and table.forgotten(spec["client"], spec["seq"]):
            raise _forgotten("write")
        return [True, outcome] if seen else [False]

    def _xfill(self, a: list[Any]) -> Any:
        """Take a moving key's state from its old owner where this node knows none yet
        (a value, with its deadline, or absence as a tombstone); whether it was taken."""
        ks = self._ks
        spec = a[0] if a else None
        if (not isinstance(spec, dict) or type(spec.get("key")) is not bytes
                or not (spec.get("value") is None or type(spec["value"]) is bytes)
                or not (spec.get("deadline") is None or type(spec["deadline"]) is int
                        and 0 < spec["deadline"] <= MAX_DEADLINE)):
            raise ProtocolError("XFILL takes {key, value (or null), deadline (or null)}")
        key = spec["key"]
        P.check_stored(key, spec.get("value"), self.limits)
        if ks.state(key, _now())[0] != UNKNOWN:
            return False
        if spec.get("value") is None:
            _, record = ks.delete(key)  # in a range being received: leaves a tombstone
        else:
            record = ks.set(key, spec["value"], spec.get("deadline"))
        self._log(record)
        return True

    def _del(self, a: list[Any]) -> Any:
        ks = self.storage.keyspace
        expired = bool(ks.expires) and a[0] in ks.data and ks.get(a[0], _now()) is None
        existed, record = ks.delete(a[0])
        if record is not None:
            self.storage.pending += record
        return int(existed and not expired)

    def _mget(self, a: list[Any]) -> Any:
        ks = self.storage.keyspace
        get: Callable[[bytes], bytes | None] = ks.data.get
        if ks.expires:
            now = _now()
            get = lambda k: ks.get(k, now)  # noqa: E731
        budget = (a[1] if len(a) > 1 else self.limits.max_message_bytes) - 1024
        out = []
        used = 0
        for k in a[0]:
            value = get(k)
            if value is not None:
                used += len(value) + ITEM_OVERHEAD
                if used > budget:
                    raise LimitExceeded(
                        f"the reply to MGET would be over {budget} bytes (max_message_bytes, "
                        "or this node's share of it); ask for fewer keys at once"
                    )
            out.append(value)
        return out

    def _mset(self, a: list[Any]) -> Any:
        self.storage.pending += self.storage.keyspace.mset(a[0])
        return "OK"

    def _xflush(self, a: list[Any]) -> Any:
        """FLUSHALL: every key goes (logged as drops, in runs), unless a move is open
        here; the number of keys dropped."""
        ks = self.storage.keyspace
        if ks.receiving is not None or self.jobs:
            raise CommandError(f"node {self.ring_name} has a move open; FLUSHALL waits "
                               "until it is done")
        keys = list(ks.data)
        for start in range(0, len(keys), FLUSH_RUN):
            record = ks.forget(keys[start : start + FLUSH_RUN])
            if record is not None:
                self.storage.pending += record
        return len(keys)

    def _scan_start(self, cursor: str) -> int:
        if cursor == "0":
            return 0
        run, sep, bucket = cursor.partition("-")
        if not sep or not bucket.isdigit() or len(bucket) > 12:
            raise CommandError(f"bad SCAN cursor {cursor!r}; start again from 0")
        if run != self.incarnation:
            raise CommandError(
                f"SCAN cursor {cursor!r} is not from this run of node {self.address} (it "
                "restarted, or the cursor came from another node of its shard before a "
                "failover); start again from 0"
            )
        return int(bucket)

    def _scan(self, a: list[Any]) -> Any:
        """One page: the keys of whole buckets from the cursor on (see zkv.core.buckets). No
        state is kept between pages, so a scan costs the node nothing while it waits."""
        cursor, pattern, count = (a + [None, None])[:3]
        start = self._scan_start(cursor)
        match = P.glob_matcher(pattern)
        test: Callable[[bytes], Any] | None = None if match is None else match.fullmatch
        ks = self._ks
        if ks.expires:
            now, expires, matches = _now(), ks.expires, test
            test = lambda k: (expires.get(k, now + 1) > now  # noqa: E731
                              and (matches is None or bool(matches(k))))
        keys, nxt = ks.buckets.walk(start, count or 1000, SCAN_MAX_BUCKETS,
                                    SCAN_MAX_KEY_BYTES, test)
        return ["0" if nxt == 0 else f"{self.incarnation}-{nxt}", keys]

    def _keys(self, a: list[Any]) -> Any:
        match = P.glob_matcher(a[0] if a else None)
        budget = self.limits.max_message_bytes - 1024
        out = []
        used = 0
        now, expires = _now(), self._ks.expires
        for k in self.storage.keyspace.data:
            if (match is None or match.fullmatch(k)) and (
                    not expires or expires.get(k, now + 1) > now):
                used += len(k) + ITEM_OVERHEAD
                if used > budget:
                    raise LimitExceeded(
                        f"KEYS would return more than max_message_bytes ({budget} bytes); "
                        "use SCAN, which pages"
                    )
                out.append(k)
        return out

    def _pipe(self, a: list[Any]) -> Any:
        """Run a pipeline's commands in order. Plain GETs and SETs (tagged for safe
        retries or not) take a short path; a run of consecutive SETs is logged as one
        MSET record instead of one each, inside one ONCERUN record with the outcomes
        of those tagged.

        The reply is built within a budget (max_message_bytes, or the share the proxy
        asks for): once values would take it over, each further GET that finds a value
        answers TOO_LARGE in its place, while every other command still runs and
        reports its own result. So a reply never outgrows the budget, and a write is
        never reported failed because a read beside it was too big.

        Atomic (``a[2]``, RESP's MULTI/EXEC): the same, and its records are logged as one
        ATOMIC record, so that a crash keeps all of its writes or none. (No other request
        runs between its commands in any case: a node runs one message at a time.)"""
        if len(a) > 2 and a[2]:
            for item in a[0]:  # refused whole, before anything runs: each item, each key
                op, args = P.check_pipe_item(item, self.limits)
                if self._checking:
                    self._check_keys(op, args)
            pending = self.storage.pending
            start = len(pending)
            answers = self._pipe([a[0], a[1]])
            if len(pending) > start:
                records = bytes(pending[start:])
                del pending[start:]
                pending += wal.encode((wal.ATOMIC, records))
            return answers
        out: list[Any] = []
        commands = a[0]
        budget = ((a[1] if len(a) > 1 else self.limits.max_message_bytes)
                  - ERROR_ITEM_BYTES * len(commands) - 1024)
        used = 0
        over: list[Any] | None = None  # the item that stands for a value over the budget
        ks = self.storage.keyspace
        data, put, table = ks.data, ks.put, ks.once
        max_key, max_value = self.limits.max_key_bytes, self.limits.max_value_bytes
        run = _Run()  # the SETs since the last record was logged
        gets = sets = 0
        now = _now()
        check = self._checking  # a plain request to a node of a cluster: key by key
        for item in commands:
            if type(item) is list and not check:  # (checked: every command takes the
                cmd, seq = item, -1               # general path, which checks its key)
                if len(item) == 4 and item[0] == "ONCE" and type(item[3]) is list \
                        and item[3] and item[3][0] == "SET":
                    client, seq, cmd = item[1], item[2], item[3]
                    if not once.valid_id(client, seq) or not table.fresh(client, seq) \
                            or client == run.client and seq in run.seqs:
                        cmd = item  # a retry, say: the general path answers it
                    elif client != run.client:
                        if run.pairs:
                            run.log(self.storage, table)
                        run.client = client
                n = len(cmd)
                if n == 4 and cmd[0] == "SET" and type(cmd[3]) is dict \
                        and len(cmd[3]) == 1:  # SET key value EX|PX|EXAT|PXAT n
                    _, key, value, opts = cmd
                    deadline = _simple_deadline(opts, now)
                    if (deadline is not None and type(key) is bytes and type(value) is bytes
                            and len(key) <= max_key and len(value) <= max_value):
                        put(key, value)
                        ks.put_deadline(key, deadline)
                        run.timed[key] = deadline
                        run.pairs += (key, value)
                        if cmd is not item:
                            run.seqs[seq] = None
                        out.append(_OK_ITEM)
                        sets += 1
                        continue
                elif n == 2 and cmd[0] == "GET":
                    key = cmd[1]
                    if type(key) is bytes and len(key) <= max_key:
                        value = data.get(key)
                        if value is not None and ks.expires:
                            value = ks.get(key, _now())
                        gets += 1
                        if value is not None:
                            if used + len(value) + ITEM_OVERHEAD > budget:
                                over = over or P.error_item(self._over_budget(budget))
                                out.append(over)
                                continue
                            used += len(value) + ITEM_OVERHEAD
                        out.append([P.OK, value])
                        continue
                elif n == 3 and cmd[0] == "SET":
                    _, key, value = cmd
                    if (type(key) is bytes and type(value) is bytes and len(key) <= max_key
                            and len(value) <= max_value and key not in run.timed):
                        put(key, value)
                        run.pairs += (key, value)
                        if cmd is not item:
                            run.seqs[seq] = None
                        out.append(_OK_ITEM)
                        sets += 1
                        continue
            if run.pairs:
                run.log(self.storage, table)
            try:
                op, args = P.check_pipe_item(item, self.limits)
                if check:
                    self._check_keys(op, args)
                result = self.execute(op, args)
                if type(result) is bytes:
                    # (a write's old value is answered whatever the budget: it is applied;
                    # a reply over max_message_bytes fails, and undoes, the whole PIPE)
                    if used + len(result) + ITEM_OVERHEAD > budget and op in P.READ_OPS:
                        raise self._over_budget(budget)
                    used += len(result) + ITEM_OVERHEAD
                out.append(P.reply_item(result))
            except ZkvError as exc:
                out.append(P.error_item(exc))
        if run.pairs:
            run.log(self.storage, table)
        counters = self.counters
        if gets:
            counters["GET"] = counters.get("GET", 0) + gets
        if sets:
            counters["SET"] = counters.get("SET", 0) + sets
        return out

    @staticmethod
    def _over_budget(budget: int) -> LimitExceeded:
        return LimitExceeded(
            f"not returned: this value does not fit in what is left of the pipeline's reply "
            f"budget of {budget} bytes (max_message_bytes); GET this key on its own"
        )

    # -- rebalancing (driven by the proxy) --------------------------------------
    def _move_args(self, a: list[Any], *fields: str) -> list[Any]:
        """The named fields of an internal request's map, each checked (ProtocolError
        naming the field otherwise), so that no malformed field gets further."""
        spec = a[0] if a else None
        if not isinstance(spec, dict) or not all(f in spec for f in fields):
            raise ProtocolError(f"expected a map with {', '.join(fields)}")
        out = []
        for name in fields:
            try:
                out.append(self._field(name, spec[name]))
            except (ValueError, TypeError, ZkvError) as exc:
                raise ProtocolError(f"{name}: {exc}") from None
        return out

    def _field(self, name: str, value: Any) -> Any:
        if name == "ranges":
            if isinstance(value, list) and len(value) > P.MAX_RANGES:
                raise ValueError(f"more than {P.MAX_RANGES} ranges")
            return RangeSet.from_list(value)
        if name == "id":
            if not isinstance(value, str) or not 0 < len(value) <= 64:
                raise ValueError("a move id is text of 1 to 64 characters")
            return value
        if name in ("purge", "tombs"):
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        if name == "mode":
            if value not in (FILL, OVERWRITE):
                raise ValueError(f"must be {FILL!r} or {OVERWRITE!r}")
            return value
        if name == "source":
            host, port = parse_address(value if isinstance(value, str) else "", "source")
            return format_address(host, port)
        if name == "dest":
            host, port = parse_address(value if isinstance(value, str) else "", "dest")
            return format_address(host, port)
        if name == "pull":
            if not isinstance(value, str) or not value.startswith("tcp://"):
                raise ValueError("must be a tcp://HOST:PORT endpoint")
            host, port = parse_address(value[len("tcp://"):], "pull")
            return f"tcp://{format_address(host, port)}"
        if name == "batch_keys":
            return _bounded_int(value, 1, MAX_BATCH_KEYS)
        if name == "batch_bytes":
            return _bounded_int(value, 1, self.limits.max_message_bytes // 2)
        if name == "rate":
            if value is None:
                return None
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError("must be a positive number of keys per second, or null")
            return float(value)
        raise ValueError("unknown field")  # pragma: no cover - fields are named in code

    def _log(self, record: bytes | None) -> None:
        if record is not None:
            self.storage.pending += record
            self._durable = True

    log_record = _log

    def _xhealth(self, a: list[Any]) -> Any:
        health: dict[str, Any] = {"epoch": self.epoch, "routers": self._routers_seen()}
        report = self.repl.report()
        if report is not None:
            health["repl"] = report
        return health

    def _xhandover(self, a: list[Any]) -> Any:
        """A planned handover of this primary's shard (the config manager's FAILOVER):
        data requests are held, unrun, for up to ``ms`` or until the next configuration
        comes (naming the new primary: then they are refused unapplied, STALE_EPOCH, and
        their routers send them there). The reply waits, like a write's, until every
        in-sync replica holds every write made before it: so the replica promoted next
        holds them all, and none is left waiting to be told its outcome is unknown."""
        spec = a[0] if a else None
        ms = spec.get("ms") if isinstance(spec, dict) else None
        if type(ms) is not int or not 0 < ms <= MAX_HOLD_MS:
            raise ProtocolError(f"expected a map with ms (1 to {MAX_HOLD_MS})")
        if self.repl.primary is None:
            raise ClusterError(f"node {self.address} is not a shard's primary; there is "
                               "nothing to hand over")
        self.hold_until = time.monotonic() + ms / 1000
        log.warning("shard %s: handing over (XHANDOVER); data requests held up to %d ms",
                    self.repl.shard, ms)
        return {"epoch": self.epoch}

    def _holds(self, body: bytes) -> bool:
        """Whether a request is held during a handover: every data request (an envelope,
        or a plain request not in FREE_OPS), while the hold has room."""
        if self.held_bytes + len(body) > HELD_BYTES:
            return False  # (then it runs: its outcome may be unknown, as before)
        if body[:3] == P.ENVELOPE or body[:3] == P.ENVELOPE_TAGGED:
            return True
        if body[:7] == XREPL_HEAD:
            return False
        try:
            op, _ = P.parse_request(body, self.limits)
        except ZkvError:
            return False  # (answered with its error now)
        return op not in FREE_OPS and op != "XHANDOVER"

    def held_turn(self, now: float) -> bool:
        """Whether held requests are to run now (the hold is over)."""
        if self.hold_until and now >= self.hold_until:
            log.info("shard %s: no new configuration came during the handover; the held "
                     "requests run here", self.repl.shard)
            self.hold_until = 0.0
        return bool(self.held) and not self.hold_until

    # (for zkv.replicator)
    def out_send(self, reply: list[bytes]) -> None:
        assert self.out is not None
        self.out.send(reply)

    def open_stream(self, key: tuple[str, str], pull: str) -> None:
        self._open_push(key, pull)

    def close_stream(self, key: tuple[str, str]) -> None:
        self._close_push(key)

    def commit(self, durable: bool = False) -> None:
        """Commit this turn's records, and ship them to the replicas (a primary)."""
        self.repl.shipped(self.storage.commit(durable=durable))

    def _chunked(self, kind: str, move_id: str, ranges: RangeSet) -> tuple[int, bool]:
        """One bounded step of forgetting the keys of ``ranges``: (keys gone, finished).
        A scan runs over several requests so that serving never stalls on a big node."""
        ks = self.storage.keyspace
        job = self.jobs.get((kind, move_id))
        if job is None:
            if (kind, move_id) in self.finished_jobs:
                return 0, True
            if len(self.jobs) >= MAX_MOVES:
                raise CommandError(f"{len(self.jobs)} range scans are under way on this node; "
                                   f"at most {MAX_MOVES}")
            job = self.jobs[(kind, move_id)] = RangeScan(ks.buckets, ranges)
        gone = job.step()
        self._log(ks.forget(gone))
        if job.done:
            del self.jobs[(kind, move_id)]
            self.finished_jobs[(kind, move_id)] = None
            while len(self.finished_jobs) > 4 * MAX_MOVES:  # the oldest are long settled
                del self.finished_jobs[next(iter(self.finished_jobs))]
        return len(gone), job.done

    def _xbegin(self, a: list[Any]) -> Any:
        move_id, ranges, purge = self._move_args(a, "id", "ranges", "purge")
        (mode,) = self._move_args(a, "mode") if "mode" in a[0] else (FILL,)
        if mode == OVERWRITE and purge:
            raise ProtocolError("mode: a move that overwrites keeps what is here: no purge")
        incoming = self.storage.keyspace.incoming
        if move_id not in incoming and len(incoming) >= MAX_MOVES:
            raise CommandError(f"{len(incoming)} moves are open on this node; at most {MAX_MOVES}")
        self._log(self.storage.keyspace.open_move(move_id, ranges, mode))
        ready = True
        if purge:  # before the copy starts: keys already here in these ranges are stale
            _, ready = self._chunked("purge", move_id, ranges)
        return {"pull": self.pull_endpoint, "pull_port": self.pull_port, "ready": ready}

    def _xend(self, a: list[Any]) -> Any:
        (move_id,) = self._move_args(a, "id")
        self._stop_outgoing(move_id)  # a move given up (MOVE ABORT) stops its streams too
        self._log(self.storage.keyspace.close_move(move_id))
        for key in [k for k in self.incoming if k[0] == move_id]:
            del self.incoming[key]
        return "OK"

    def _xdrop(self, a: list[Any]) -> Any:
        move_id, ranges = self._move_args(a, "id", "ranges")
        self._stop_outgoing(move_id)
        dropped, done = self._chunked("drop", move_id, ranges)
        return {"dropped": dropped, "done": done}

    def _xdel(self, a: list[Any]) -> Any:
        """A DEL of a moving key at its new owner: [deleted, whether the key was known
        here]. A tagged DEL's spec ({client, seq, also}: also, whether the old owner
        had the key) makes the outcome, deleted or also, remembered like a ONCE's."""
        key = a[0]
        state, _ = self.storage.keyspace.state(key, _now())
        spec = a[1] if len(a) > 1 else None
        if spec is None:
            return [self._del([key]), int(state == 2)]
        if (not isinstance(spec, dict) or not once.valid_id(spec.get("client"), spec.get("seq"))
                or spec.get("also") not in (0, 1)):
            raise ProtocolError("XDEL takes a key and {client, seq, also}")
        also = spec["also"]
        return [self._once_apply(spec["client"], spec["seq"], "DEL",
                                 lambda: int(bool(self._del([key])) or bool(also))),
                int(state == 2)]

    def _xsend(self, a: list[Any]) -> Any:
        move_id, dest, pull, ranges, batch_keys, batch_bytes, rate = self._move_args(
            a, "id", "dest", "pull", "ranges", "batch_keys", "batch_bytes", "rate"
        )
        spec = a[0]
        # the name the ring knows this node by (it may be bound to 0.0.0.0)
        (source,) = self._move_args(a, "source") if "source" in spec else (self.address,)
        (tombs,) = self._move_args(a, "tombs") if "tombs" in spec else (False,)
        key = (move_id, dest)
        self._open_push(key, pull)
        ks = self.storage.keyspace
        scan = RangeScan(ks.buckets, ranges)
        out = Outgoing(move_id, source, dest, scan, batch_keys, batch_bytes, rate,
                       started=time.monotonic(), outcomes=ks.once.flat)
        if tombs:  # a rollback: this node's deletes during the move go back too
            out.dels = [k for k in ks.tombstones if ranges.contains(key_hash(k))]
            out.dels_total = len(out.dels)
            out.expired_deletes = True
        self.outgoing[key] = out
        return "OK"

    def _xbackup(self, a: list[Any]) -> Any:
        """Stream a copy of every key, as of now, to a ``zkv backup`` PULL socket
        ({"id", "pull"}); {"id", "close": true} ends it. The keys, and their bytes."""
        spec = a[0] if a else None
        if not isinstance(spec, dict) or not isinstance(spec.get("id"), str) \
                or not 0 < len(spec["id"]) <= 64:
            raise ProtocolError("XBACKUP takes a map with id (text) and pull (an endpoint)")
        key = (spec["id"], "backup")
        if spec.get("close") is True:
            self._close_push(key)
            return "OK"
        pull = spec.get("pull")
        if not isinstance(pull, str) or not pull.startswith("tcp://") or len(pull) > 300:
            raise ProtocolError("XBACKUP pull must be a tcp:// endpoint")
        if self.storage.keyspace.receiving is not None or self.jobs:
            raise CommandError(f"node {self.ring_name} has a move open; back up once it is "
                               "done")
        self._open_push(key, pull)
        ks = self.storage.keyspace
        items = list(ks.data.items())  # this moment's data: a prefix of what was acked
        self.outgoing[key] = SnapshotStream(spec["id"], self.ring_name, items,
                                            dict(ks.expires), last_progress=time.monotonic(),
                                            move_id=spec["id"])
        return {"keys": len(items), "bytes": ks.live_bytes}

    def _open_push(self, key: tuple[str, str], pull: str) -> None:
        """The PUSH socket of a new outgoing stream (a move's or a backup's) to ``pull``,
        replacing any stream of the same key; the caller adds the stream itself."""
        self._close_push(key)
        if len(self.outgoing) >= MAX_MOVES:
            raise CommandError(f"{len(self.outgoing)} streams leave this node already; "
                               f"at most {MAX_MOVES}")
        assert self.ctx is not None
        push = self.ctx.socket(zmq.PUSH)
        if self.curve is not None:
            self.curve.connect(push)  # every PULL presents the cluster key
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.IPV6, 1)
        push.setsockopt(zmq.SNDHWM, 4)
        try:
            push.connect(pull)
        except zmq.ZMQError as exc:
            push.close(0)
            raise ProtocolError(f"pull: cannot connect to {pull}: {exc}") from None
        self.pushes[key] = push

    def _close_push(self, key: tuple[str, str]) -> None:
        sock = self.pushes.pop(key, None)
        if sock is not None:
            sock.close(0)
        self.outgoing.pop(key, None)

    def _stop_outgoing(self, move_id: str) -> None:
        for key in [k for k in self.outgoing if k[0] == move_id]:
            self._close_push(key)

    def move_status(self) -> dict[str, Any]:
        ks = self.storage.keyspace
        return {
            "pull": self.pull_endpoint,
            "pull_port": self.pull_port,
            "open": sorted(ks.incoming),
            "tombstones": len(ks.tombstones),
            "incoming": [
                {"id": mid, "source": src, **st.status()}
                for (mid, src), st in self.incoming.items()
            ],
            "outgoing": [{"id": mid, **out.status()} for (mid, _), out in self.outgoing.items()],
        }

    def pump(self, now: float) -> bool:
        """Send what the outgoing streams may send now; whether any has work it could
        do right away (so the loop should not sleep)."""
        busy = False
        ks = self.storage.keyspace
        data, expires, now_ms = ks.data, ks.expires, _now()
        for key, out in list(self.outgoing.items()):
            push = self.pushes[key]
            for _ in range(4):
                batch = out.next_batch(data, now, expires, now_ms)
                if batch is None:
                    break
                try:
                    push.send(batch, zmq.NOBLOCK)
                except zmq.Again:
                    out.held = batch
                    break
                if isinstance(out, SnapshotStream):
                    out.last_progress = now
            if isinstance(out, SnapshotStream) and now - out.last_progress > BACKUP_STALL:
                # (a stream sent whole is closed then too, by now surely delivered)
                what = (f"replica sync to {key[1]}" if out.backup_id.startswith(SYNC_MOVE)
                        else f"backup {out.backup_id}")
                if out.done and out.held is None:
                    log.debug("%s: sent whole; stream closed", what)
                else:
                    log.warning("%s: nobody took its batches for %.0f s; stream closed",
                                what, BACKUP_STALL)
                self._close_push(key)
                continue
            busy = busy or not (out.done or out.throttled or out.held is not None)
        return busy

    def receive(self, bodies: list[bytes]) -> None:
        """Apply batches from other nodes' streams; they count (in XSTAT) only once
        the one fsync that covers them all is done."""
        counted = []
        for body in bodies:
            try:
                (move_id, source, seq, pairs, final, total, dels, deadlines,
                 outcomes) = decode_batch(body)
            except ProtocolError as exc:
                log.warning("dropped a bad transfer batch: %s", exc)
                continue
            if move_id not in self.storage.keyspace.incoming:
                continue  # a stream for a move this node does not have open
            taking = pairs
            if move_id.startswith(SYNC_MOVE):  # a replica's copy (zkv.replicator)
                found = self.repl.sync_batch(move_id, source, pairs)
                if found is None:
                    continue
                taking = found
            stream = self.incoming.setdefault((move_id, source), Incoming())
            in_order = stream.accept(seq)
            taken, record = self.storage.keyspace.absorb(move_id, taking, dels, deadlines,
                                                          _now())
            if record is not None:
                self.storage.pending += record
            if outcomes:  # the source's recent tagged writes: their retries come here now
                merged = self.storage.keyspace.once.merge(outcomes)
                if merged:
                    self.storage.pending += wal.encode((wal.ONCES, merged))
            counted.append((stream, in_order, pairs, taken, final, total, dels))
        try:
            self.commit(durable=True)
        except StorageError:
            for stream, *_ in counted:
                stream.broken = True
            raise
        for stream, in_order, pairs, taken, final, total, dels in counted:
            stream.keys += len(pairs) // 2 + len(dels)
            stream.taken += taken
            stream.bytes += sum(len(x) for x in pairs if isinstance(x, bytes))
            if final and in_order and not stream.broken:
                stream.done = stream.keys == total
                stream.broken = not stream.done
        self.repl.streams_done()

    def execute(self, op: str, args: list[Any]) -> Any:
        handler = self._handlers.get(op)
        if handler is None:
            raise CommandError(f"{op} is not served by a storage node ({self.address}): "
                               "send it to the cluster's proxy")
        if op != "ONCE":  # (counted as the write it tags)
            self.counters[op] = self.counters.get(op, 0) + 1
        return handler(args)

    def info(self) -> dict[str, Any]:
        ks = self.storage.keyspace
        rec = self.recovery
        p = self.placement
        return {
            "role": "node",
            "address": self.address,
            # the configuration this node holds: its cluster, epoch, and what it is in it
            "cluster": p.state.cluster if p is not None else None,
            "epoch": self.epoch,
            "name": self.ring_name if p is not None else None,
            "config_address": self.config_address,
            "in_cluster": self._named(),  # named by that configuration
            "pid": os.getpid(),
            "keys": len(ks),
            "keys_with_ttl": len(ks.expires),
            "expired_keys": self.expired,  # deleted by active expiry since the start
            "live_bytes": ks.live_bytes,
            "rss_bytes": rss_bytes(),
            "fsync": self.storage.fsync,
            "data_dir": self.storage.dir,
            "data_id": self.storage.identity,  # (zkv.storage: which copy the directory is)
            "uptime_s": round(time.monotonic() - self.started, 3),
            "ops": dict(self.counters),
            "latency_buckets": self.timings.total(),  # counts per zkv.core.timings.BUCKETS
            "errors": self.errors,
            "routers": self._routers_seen(),  # proxies and direct clients of late
            "recovered_keys": rec.keys if rec else 0,
            "recovery_s": round(rec.seconds, 4) if rec else 0.0,
            **self.storage.stats(),
            **(self.guards[0].stats() if self.guards else {}),
            **(self.out.stats() if self.out is not None else {}),
        }

    # -- the loop ------------------------------------------------------------
    def _routers_seen(self, within: float = 10.0) -> int:
        now = time.monotonic()
        for ident in [i for i, t in self.routers.items() if now - t > within]:
            del self.routers[ident]
        return len(self.routers)

    @property
    def epoch(self) -> int:
        return self.placement.epoch if self.placement is not None else 0

    def handle(self, frames: list[bytes]) -> list[list[bytes]]:
        """One request message in, its reply messages out (routing frames preserved): one
        reply for a plain request, one or more reply envelopes for an envelope."""
        if len(frames) > self.limits.max_frames:
            self.errors += 1
            return [[
                *frames[:-1],
                P.encode_error(
                    "BAD_REQUEST",
                    f"{len(frames)} frames in one message; at most {self.limits.max_frames}",
                ),
            ]]
        routing, body = frames[:-1], frames[-1]
        if self.hold_until and self._holds(body):
            self.held.append((frames, self.peer_role))
            self.held_bytes += len(body)
            return []
        if body[:3] == P.ENVELOPE or body[:3] == P.ENVELOPE_TAGGED:
            # (a router names each of its links ROUTER_ID#n: count routers, not links)
            self.routers[routing[0].partition(b"#")[0] if routing else b""] = time.monotonic()
            return self._handle_envelope(routing, body)
        if body[:7] == XREPL_HEAD:
            reply = self.repl.steady(body)
            if reply is not None:
                return [[*routing, reply]]
        placement = self.placement
        return [[*routing,
                 self.run_body(body, placement is not None and not placement.trivial)]]

    def clock_start(self) -> float:
        """A request's start, if its service time is measured (perf_counter), else 0.0:
        every request while metrics are served, else one in 32 (what INFO's latency and
        zkv top show)."""
        self._seen += 1
        return time.perf_counter() if self.timed or not self._seen & 31 else 0.0

    def run_body(self, body: bytes, check: bool) -> bytes:
        """One request body in, its reply body out. With ``check``, a keyed request is
        refused (MOVED) unless this node serves its keys at its epoch: a request that
        carries no epoch is judged by this node's configuration."""
        mark = self.storage.mark()
        op = "?"
        began = self.clock_start()
        try:
            op, args = P.parse_request(body, self.limits)
            if self.curve is not None:
                require(self.peer_role, op, P.COMMANDS[op].kind, f"node {self.address}")
            if self.repl.gated:
                self.repl.gate(op)
            self._checking = check
            if check:
                self._check_keys(op, args)
            result = self.execute(op, args)
            if self.repl.gated and op not in FREE_OPS:
                # a primary's reply waits for its replicas: what it read may not be on
                # them yet, and a move's step (XSTAT done, say) must not be taken for
                # done before the destination's replicas hold what it received
                self.touched = True
            reply = P.encode_ok_items(result) if op == "PIPE" else P.encode_ok(result)
            if len(reply) > self.limits.max_message_bytes:
                raise LimitExceeded(
                    f"the reply to {op} would be {len(reply)} bytes, over the "
                    f"max_message_bytes limit of {self.limits.max_message_bytes}; ask for less"
                )
            if began:
                self.timings.observe(op, time.perf_counter() - began)
            return reply
        except ZkvError as exc:
            self._count_error(op, exc.code)
            self.storage.rollback_to(mark)  # an error reply: nothing of it applied
            return P.encode_exc(exc)
        except Exception as exc:  # a bug must not take the node down, nor half apply
            log.exception("internal error")
            self._count_error(op, "INTERNAL")
            self.storage.rollback_to(mark)
            return P.encode_exc(InternalError(f"{type(exc).__name__}: {exc}"))

    def _count_error(self, op: str, code: str, n: int = 1) -> None:
        self.errors += n
        key = (op, code)
        self.error_codes[key] = self.error_codes.get(key, 0) + n

    def _handle_envelope(self, routing: list[bytes], body: bytes) -> list[list[bytes]]:
        """The requests a router sent together: refused as a whole if routed by another
        epoch than this node's, else each run in turn. Same-epoch requests are not
        checked key by key: the router placed them by this very configuration."""
        try:
            epoch, items, cluster = P.decode_envelope(body, MAX_BATCH_PER_TURN)
        except ProtocolError as exc:
            self.errors += 1
            return [[*routing, P.encode_exc(exc)]]
        refusal = self._cluster_refusal() if cluster and cluster != self.cluster_tag \
            and self.cluster_tag else self._epoch_refusal(epoch)
        refused = P.encode_exc(refusal) if refusal is not None else b""
        if refusal is not None:
            self._count_error("ENVELOPE", refusal.code, len(items))
        limit = self.limits.max_message_bytes - 4096
        messages: list[list[bytes]] = []
        chunk: list[tuple[int, bytes]] = []
        size = 0
        # (a router placed these by this very configuration; a data key's envelope, the
        # direct client's, is checked key by key: it could name any key)
        check = self.curve is not None and self.peer_role != CLUSTER
        # What one envelope's replies may come to: past it, the rest are not run. A few
        # KB of pipelined GETs of a big value made gigabytes of replies in one turn,
        # and a node that long in one turn misses its heartbeats for everyone.
        total, most = 0, self.limits.max_message_bytes
        for tag, request in items:
            if total > most and not refused:
                self._count_error("ENVELOPE", LimitExceeded.code)
                reply = P.encode_exc(LimitExceeded(
                    f"not run: the replies to the requests sent with this one came to "
                    f"{total} bytes, over max_message_bytes ({most}); send fewer large "
                    "reads at once; nothing changed"))
            else:
                reply = refused or self.run_body(request, check)
            if chunk and size + len(reply) > limit:
                messages.append([*routing, P.encode_reply_envelope(chunk)])
                chunk, size = [], 0
            chunk.append((tag, reply))
            size += len(reply) + 12
            total += len(reply)
        messages.append([*routing, P.encode_reply_envelope(chunk)])
        return messages

    def _cluster_refusal(self) -> ZkvError:
        assert self.placement is not None
        return ClusterError(
            f"node {self.ring_name} belongs to cluster {self.placement.state.cluster}; this "
            "request was routed by another cluster's configuration (a proxy with a state "
            "directory of its own?); nothing changed")

    def _epoch_refusal(self, epoch: int) -> ZkvError | None:
        mine = self.epoch
        if epoch == mine and self.placement is not None:
            return None
        if epoch < mine:
            return StaleEpoch(
                f"node {self.ring_name} is at epoch {mine}; this request was routed by epoch "
                f"{epoch}: refresh the configuration and send it again",
                {"epoch": mine})
        return NodeBehind(
            f"node {self.ring_name} is at epoch {mine}, behind the request's {epoch}: it has "
            "not got that configuration yet (the config manager sends it)", {"epoch": mine})

    _READS = frozenset(("XGET", "XPEEK", "MGET")) | (P.SINGLE_KEY_OPS - P.WRITE_OPS)
    _KEYED = frozenset(("XGET", "XPEEK", "XFILL", "MGET", "XDEL", "MSET", "MSETNX")) \
        | P.SINGLE_KEY_OPS

    def _check_keys(self, op: str, args: list[Any]) -> None:
        if op == "ONCE":
            op, args = args[2]
        if op not in self._KEYED:
            return
        write = op not in self._READS
        if op == "MGET":
            keys = args[0]
        elif op == "XFILL":
            keys = [args[0].get("key", b"")] if isinstance(args[0], dict) else []
        elif op == "MSET" or op == "MSETNX":
            keys = args[0][0::2]
        else:
            keys = args[:1]
        for key in keys:
            self._check_key(key, write)

    def _check_key(self, key: bytes, write: bool) -> None:
        assert self.placement is not None
        refusal = self.placement.refuse(self.ring_name, key, write)
        if refusal is None:
            return
        if refusal.code == FROZEN:
            raise Unavailable(
                f"key {key[:64]!r} is in a range whose move is being rolled back (MOVE ABORT):"
                " writes to it wait until the rollback is done; nothing changed")
        raise Moved(f"key {key[:64]!r} is served by {refusal.owner} at epoch "
                    f"{self.placement.epoch}, not by {self.ring_name}",
                    {"owner": refusal.owner, "epoch": self.placement.epoch})

    # -- the cluster configuration -------------------------------------------------------
    def _xconfig(self, a: list[Any]) -> Any:
        """The config manager's new configuration: kept (durably) if it is not older than
        the one this node has, before the manager lets it take effect."""
        spec = a[0] if a else None
        if not isinstance(spec, dict) or "config" not in spec:
            raise ProtocolError("expected a map with config (and name)")
        try:
            state = ClusterState.from_json(spec["config"], "XCONFIG")
            name = spec.get("name", self.ring_name)
            host, port = parse_address(name if isinstance(name, str) else "", "name")
        except ZkvError as exc:
            raise ProtocolError(f"config: {exc}") from None
        if state.epoch < self.epoch:
            raise StaleEpoch(f"node {self.ring_name} is at epoch {self.epoch}, newer than "
                             f"{state.epoch}", {"epoch": self.epoch})
        placement = Placement(state)  # checks the document further (rings, ranges)
        name = format_address(host, port)
        path = os.path.join(self.storage.dir, CLUSTER_FILE)
        address = spec.get("address")
        if address is not None:
            try:
                address = format_address(*parse_address(str(address), "address"))
            except ZkvError as exc:
                raise ProtocolError(f"config: {exc}") from None
        self._check_same_node(state, address)
        was_named = self.placement is not None and self._named()
        try:
            durable.write_json(path, {"config": state.to_json(), "name": name,
                                      "address": address})
        except OSError as exc:
            raise StorageError(f"cannot keep the cluster configuration in {path}: "
                               f"{exc.strerror or exc}") from None
        self.placement, self.ring_name, self.config_address = placement, name, address
        self.cluster_tag = P.cluster_tag(state.cluster)
        self.repl.configure(state, name, address)
        self.hold_until = 0.0  # (a handover's held requests run, at this epoch)
        if was_named and not self._named():
            log.warning("%s", self._out_of_cluster())
        return {"epoch": self.epoch}

    def _out_of_cluster(self) -> str:
        return (f"node {self.address} is no longer in the cluster (its configuration, epoch "
                f"{self.epoch}, does not name it): it serves nothing until it is added again "
                "(ADD, or REPLICA ADD)")

    def _named(self) -> bool:
        """Whether the configuration this node holds names it (as a member, a moving node,
        or a shard's primary or replica)."""
        held = self.placement.state if self.placement is not None else None
        return held is not None and (
            (self.config_address or self.ring_name) in held.addresses()
            or self.ring_name in held.involved())

    def _check_same_node(self, state: ClusterState, address: str | None) -> None:
        """Refuse a configuration that would make this node two nodes: one of another
        cluster (a proxy with a state directory of its own) while this node serves in
        its own, or one that names this node at a second address (an ADD of an alias,
        such as localhost for 127.0.0.1) while it still names it at the first. Either
        would route one set of keys two ways, and what one way writes the other would
        not read (or a move's cleanup would delete)."""
        held = self.placement.state if self.placement is not None else None
        if held is None:
            return
        mine = self.config_address or self.ring_name
        named = self._named()
        if held.cluster and state.cluster != held.cluster:
            keys = len(self.storage.keyspace)
            if named or keys:
                raise ClusterError(
                    f"node {mine} belongs to cluster {held.cluster} (epoch {held.epoch}"
                    f"{', as ' + self.ring_name if named else ''}, {keys} keys); a "
                    f"configuration of cluster {state.cluster or '(no id)'} is refused. Is "
                    "a second proxy with its own state directory pointed at this node?")
        elif address is not None and address != mine and mine in state.addresses():
            raise ClusterError(
                f"this node is {mine} in this cluster's configuration (epoch {held.epoch}); "
                f"it cannot also be {address}: two addresses for one node would route its "
                "keys two ways")

    def load_config(self) -> None:
        """The configuration kept in the data directory, if any (a damaged one is set
        aside: the config manager sends the current one again)."""
        path = os.path.join(self.storage.dir, CLUSTER_FILE)
        try:
            data = durable.read_json(path)
            if data is None:
                return
            state = ClusterState.from_json(data.get("config"), path)
            host, port = parse_address(str(data.get("name", self.address)), "name")
            self.placement, self.ring_name = Placement(state), format_address(host, port)
            address = data.get("address")
            self.config_address = address if isinstance(address, str) else None
            self.cluster_tag = P.cluster_tag(state.cluster)
            self.repl.configure(state, self.ring_name,
                                address if isinstance(address, str) else None)
            if not self._named():
                log.warning("%s", self._out_of_cluster())
        except (ValueError, ZkvError, AttributeError) as exc:
            log.warning("%s: cannot use the kept cluster configuration (%s); waiting for the "
                        "config manager to send it", path, exc)

    def config_doc(self) -> dict[str, Any]:
        p = self.placement
        return {"epoch": self.epoch, "name": self.ring_name,
                "config": p.state.to_json() if p is not None else None}

    def serve(self, sock: zmq.Socket[bytes], pull: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        for guard in self.guards:
            poller.register(guard.monitor, zmq.POLLIN)
        repl = self.repl
        repl.poller = poller
        for link in repl.by_socket:
            poller.register(link, zmq.POLLIN)
        out = self.out
        assert out is not None
        storage = self.storage
        busy = False
        next_tidy = 0.0
        pull_keys = self.curve.keyring if self.curve is not None else None
        served, expire_next = False, 0.0  # (requests since active expiry's last slice)
        while not self._stop:
            events = dict(poller.poll(0 if busy else 100))
            for guard in self.guards:
                if guard.monitor in events:
                    guard.handle()
            backlog = self.held if self.held and self.held_turn(time.monotonic()) else None
            if sock in events or backlog:
                # (free: replies that need no replica's word)
                replies: list[list[bytes]] = []
                free: list[list[bytes]] = []
                handle = self.handle
                keyring = self.curve.keyring if self.curve is not None else None
                turn_bytes = 0  # the replies of one turn wait for its commit: bound them
                # (a copy of the keys on its way somewhere: deadlines are logged whole)
                storage.keyspace.full_records = bool(self.outgoing) or repl.catching_up()
                for _ in range(MAX_BATCH_PER_TURN):
                    self.touched = False
                    if backlog:  # (what a handover held, first)
                        frames, self.peer_role = backlog.popleft()
                        self.held_bytes -= len(frames[-1])
                    elif keyring is not None:
                        frames, user = wire.recv_user(sock)
                        role = keyring.role(user)
                        if role != CLUSTER and frames[0].startswith(ROUTER_ID_PREFIX):
                            role = IMPOSTOR  # (its replies would skip the client budget)
                        self.peer_role = role
                    else:
                        frames = wire.recv(sock)
                    for reply in handle(frames):
                        (replies if self.touched or not repl.gated else free).append(reply)
                        turn_bytes += len(reply[-1])
                    if turn_bytes > self.limits.max_message_bytes or not (
                            backlog or wire.waiting(sock)):
                        break
                try:
                    self.commit(durable=self._durable)
                except StorageError as exc:
                    log.error("%s", exc)
                    replies = [self.failed_reply(r, P.encode_exc(exc)) for r in replies]
                    free = [self.failed_reply(r, P.encode_exc(exc)) for r in free]
                self._durable = False
                for reply in free:
                    out.send(reply)
                for reply in repl.hold(replies):
                    out.send(reply)
            if repl.by_socket:
                for link in [s for s in repl.by_socket if s in events]:
                    repl.answered(link)
            if pull in events:
                bodies = []
                for _ in range(8):
                    try:
                        frame = pull.recv(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    # (a key taken out of the key directories is refused at once, even
                    # on a connection it opened before: ZAP saw only its handshake)
                    if pull_keys is not None:
                        user = str(frame.get("User-Id"))
                        if pull_keys.role(user) != CLUSTER:
                            self._refused_push(user)
                            continue
                    bodies.append(frame.bytes)
                try:
                    self.receive(bodies)
                except StorageError as exc:
                    log.error("transfer batches not applied: %s", exc)
            now = time.monotonic()
            if repl.primary is not None:
                repl.tick(now)
            busy = bool(self.outgoing) and self.pump(now) or bool(backlog)
            if sock in events:
                served = True
            if storage.keyspace.expires and repl.replica is None and (
                    not served or now >= expire_next):
                # a slice at a time; while requests come in, at most a quarter of the time
                began = time.perf_counter()
                busy = self.expire_due(EXPIRE_SLICE) or busy
                expire_next = now + (EXPIRE_SHARE - 1) * (time.perf_counter() - began)
                served = False
            storage.tick(now)
            if now >= next_tidy:
                next_tidy = now + 1.0
                out.tidy()
                if storage.keyspace.compact():  # many keys went: give their memory back
                    _trim_heap()
                    log.info("tables made anew for %d keys, after many went: memory given "
                             "back", len(storage.keyspace))
                if self.curve is not None and self.curve.keyring is not None:
                    self.curve.keyring.refresh(now)

    def _refused_push(self, user: str) -> None:
        """A stream batch from a key that has no cluster rights now: dropped, said once."""
        self.errors += 1
        if user not in self._refused_pushers:
            self._refused_pushers.add(user)
            log.warning("dropped a transfer batch from key %s: it has no cluster rights "
                        "(now; was it taken out of the key directories?)", user)

    def expire_due(self, limit: int) -> bool:
        """Active expiry, at most ``limit`` keys a turn: delete keys whose deadline has
        passed and log (and replicate) the deletes. Whether more may be due now."""
        ks = self.storage.keyspace
        now = _now()
        gone, record = ks.expire(now, limit)
        if record is None:
            return False
        self.storage.pending += record
        try:
            self.commit()
        except StorageError as exc:
            log.error("expired keys not deleted: %s", exc)
            return False
        self.expired += gone
        due = ks.wheel.next_due()
        return due is not None and due <= now

    @staticmethod
    def failed_reply(reply: list[bytes], error: bytes) -> list[bytes]:
        """A reply of a turn whose commit failed: every answer in it becomes ``error``."""
        body = reply[-1]
        if body[:3] == P.REPLY_ENVELOPE:
            tags = [tag for tag, _ in P.decode_reply_envelope(body)]
            return [*reply[:-1], P.encode_reply_envelope([(t, error) for t in tags])]
        return [*reply[:-1], error]

    def stop(self, *_: Any) -> None:
        self._stop = True

    def run(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Open the data directory and serve until stopped (SIGTERM, SIGINT)."""
        check_exposure(self.host, self.curve, self.insecure, f"node {self.address}")
        self.recovery = self.storage.open()
        self.load_config()
        ctx = zmq.Context()
        if self.curve is not None:
            self.curve.start(ctx, f"node {self.address}")
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        # (an envelope around a request of the largest size is a little larger)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes + 4096)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, FRONT_HWM)
        self.ctx = ctx
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 16)
        pull.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        host = f"[{self.host}]" if ":" in self.host else self.host
        for s in (sock, pull):
            s.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            self.curve.serve(sock)
            self.curve.serve(pull, CLUSTER_DOMAIN)  # moves, catch-up: cluster keys only
        try:
            sock.bind(f"tcp://{host}:{self.port}")
            pull.bind(f"tcp://{host}:*")
        except zmq.ZMQError as exc:
            self.storage.close()
            ctx.destroy(0)
            raise StorageError(f"cannot listen on {self.address}: {exc}") from exc
        self.pull_endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pull_port = int(self.pull_endpoint.rsplit(":", 1)[1])
        self.max_clients = client_limit(self.max_clients, raise_fd_limit(), FD_RESERVE)
        self.guards = [ConnectionGuard(sock, self.max_clients, f"node {self.address}"),
                       ConnectionGuard(pull, self.max_clients, f"node {self.address} (pull)")]
        self.out = OutputBudget(sock, self.client_buffer_bytes, exempt=ROUTER_ID_PREFIX)
        if self.metrics_port:
            from . import metrics

            try:
                metrics.serve(self.host, self.metrics_port, lambda: metrics.node_families(self))
            except OSError as exc:
                self.storage.close()
                ctx.destroy(0)
                raise StorageError(f"cannot serve metrics on {self.host}:{self.metrics_port}: "
                                   f"{exc.strerror or exc}") from exc
            self.timed = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        rec = self.recovery
        line = (
            f"zkv node {self.address} data={self.storage.dir} fsync={self.storage.fsync} "
            f"recovered {rec.keys} keys from {rec.records} records in {rec.seconds:.3f}s"
        )
        if on_ready:
            on_ready(line)
        try:
            self.serve(sock, pull)
        finally:
            self.storage.close()
            if self.curve is not None:
                self.curve.stop()
            ctx.destroy(0)
            log.info("node %s stopped; all acknowledged writes are on disk", self.address)


def _simple_deadline(opts: dict[Any, Any], now: int) -> int | None:
    """The deadline of SET's options when they are one EX, PX, EXAT or PXAT still ahead
    (what caches send, on the short path); None for anything else (the general path
    checks and does it)."""
    (name, amount), = opts.items()
    if (name not in strings.EXPIRY_OPTIONS or type(amount) is not int
            or not 0 < amount <= MAX_DEADLINE):
        return None
    deadline = strings.absolute(name, amount, now)
    return deadline if now < deadline <= MAX_DEADLINE else None


class _Run:
    """A pipeline's run of SETs on the short path, until it is logged: the pairs (as
    one MSET record), the deadlines some of them set (then one PXAT record: replay
    clears deadlines with the MSET and sets these again), and the sequence numbers
    of those tagged by ``client`` (then all of it inside one ONCERUN record, so that
    the writes and their outcomes stay or go together, and the outcomes remembered
    at once)."""

    __slots__ = ("client", "pairs", "seqs", "timed")

    def __init__(self) -> None:
        self.client: bytes | None = None
        self.pairs: list[bytes] = []
        self.timed: dict[bytes, int] = {}
        self.seqs: dict[int, None] = {}  # (a dict: in order, and a duplicate is seen)

    def log(self, storage: Any, table: once.Outcomes) -> None:
        records = wal.encode((wal.MSET, self.pairs))
        if self.timed:
            records += wal.encode((wal.PXAT, [x for kd in self.timed.items() for x in kd]))
        if self.seqs:
            assert self.client is not None
            seqs = list(self.seqs)
            table.remember_all(self.client, seqs, "OK")
            records = wal.encode((wal.ONCERUN, self.client, seqs, "OK", records))
        storage.pending += records
        self.pairs, self.timed, self.seqs = [], {}, {}


def _trim_heap() -> None:
    """Ask the C allocator to give its free memory back to the system (glibc's
    malloc_trim; elsewhere nothing happens)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _forgotten(op: str) -> OutcomeUnknown:
    return OutcomeUnknown(
        f"this {op} names a write (a retry, most likely) whose outcome is no longer "
        f"remembered: its client sent more than {once.WINDOW} writes since, or very many "
        "clients wrote; it may have been applied, and was not applied again: read the key")


def _now() -> int:
    """The wall clock in milliseconds since the Unix epoch: what deadlines are in."""
    return int(time.time() * 1000)


def _bounded_int(value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"must be an integer from {low} to {high}")
    return value

