"""Prometheus metrics for a node or a proxy (``--metrics-port PORT``), through
prometheus-client.

Nothing is added to the hot path for counters: a process keeps its counts anyway
(requests by op, errors by code, bytes, fsyncs, ...) and a custom collector reads
them when Prometheus scrapes. Latency is the one thing measured per request, into a
:class:`~zkv.core.timings.Timings` (fixed buckets: one bisect and two additions per
request, and only while metrics are on), exposed as histograms. prometheus-client's own HTTP server
serves ``/metrics`` from a daemon thread; it reads the counts while the loop runs
(ints, and copies of small dicts, under the GIL).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from .core.timings import BUCKETS, Timings

log = logging.getLogger("zkv.metrics")

def histogram(timings: Timings, name: str, documentation: str, label: str = "op") -> Any:
    """``timings`` as a Prometheus histogram family."""
    from prometheus_client.core import HistogramMetricFamily

    fam = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for key, counts in list(timings.counts.items()):
        total = 0
        buckets = []
        for bound, n in zip((*map(str, BUCKETS), "+Inf"), counts):
            total += n
            buckets.append((bound, total))
        fam.add_metric([key] if label else [], buckets, timings.sums.get(key, 0.0))
    return fam


def _family(kind: Any, name: str, documentation: str, values: dict[Any, Any] | float,
            labels: tuple[str, ...] = ()) -> Any:
    """A counter or gauge family: one value, or one per label tuple (or single label)."""
    fam = kind(name, documentation, labels=list(labels) or None)
    if isinstance(values, dict):
        for key, value in list(values.items()):
            fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    else:
        fam.add_metric([], values)
    return fam


def _counter(name: str, documentation: str, values: dict[Any, Any] | int,
             labels: tuple[str, ...] = ()) -> Any:
    from prometheus_client.core import CounterMetricFamily

    return _family(CounterMetricFamily, name, documentation, values, labels)


def _gauge(name: str, documentation: str, values: dict[Any, Any] | float,
           labels: tuple[str, ...] = ()) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return _family(GaugeMetricFamily, name, documentation, values, labels)


class Collector:
    """Reads a process's counts at scrape time; ``source()`` gives the families."""

    def __init__(self, source: Callable[[], Iterator[Any]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        try:
            yield from self.source()
        except Exception:  # noqa: BLE001 - a scrape must never take the process down
            log.exception("collecting metrics failed")


def serve(host: str, port: int, families: Callable[[], Iterator[Any]]) -> Any:
    """Serve ``/metrics`` on host:port from a daemon thread; the registry used."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(families))
    start_http_server(port, addr=host, registry=registry)
    return registry


def node_families(node: Any) -> Iterator[Any]:
    """The metrics of a storage node (zkv.node.Node)."""
    from .guard import rss_bytes

    st = node.storage
    ks = st.keyspace
    yield _counter("zkv_requests", "Requests served, by op.", dict(node.counters), ("op",))
    yield _counter("zkv_errors", "Error replies, by op and code.", dict(node.error_codes),
                   ("op", "code"))
    yield histogram(node.timings, "zkv_request_duration_seconds",
                              "Service time of a request at the node, by op.")
    yield _gauge("zkv_keys", "Keys held.", len(ks))
    yield _gauge("zkv_keys_with_deadline", "Keys held that have a deadline (a TTL).",
                 len(ks.expires))
    yield _counter("zkv_expired_keys", "Keys deleted by active expiry.", node.expired)
    yield _gauge("zkv_retry_outcomes", "Outcomes of recent tagged writes kept for their "
                 "retries (zkv.core.once).", len(ks.once))
    yield _gauge("zkv_live_bytes", "Bytes of keys and values held.", ks.live_bytes)
    yield _gauge("zkv_rss_bytes", "Resident memory of the process.", rss_bytes())
    yield _gauge("zkv_log_bytes", "Bytes of the live log segments.", st.log_bytes)
    yield _gauge("zkv_snapshot_bytes", "Bytes of the snapshot.", st.snapshot_bytes)
    yield _counter("zkv_fsyncs", "fsyncs of the log.", st.fsyncs)
    yield histogram(st.fsync_timings, "zkv_fsync_duration_seconds", "Time an fsync of the log "
                                  "took.", label="")
    yield _counter("zkv_snapshots", "Snapshots written.", st.snapshots_written)
    yield histogram(st.snapshot_timings, "zkv_snapshot_duration_seconds",
                                     "Time a snapshot took, start to finish.", label="")
    clients = node.guards[0].stats()["clients"] if node.guards else 0
    yield _gauge("zkv_connected_clients", "Connections open (proxies, direct clients).",
                 clients)
    yield _gauge("zkv_epoch", "Cluster configuration epoch this node holds.", node.epoch)
    sent_keys: dict[tuple[str, str], int] = {}
    sent_bytes: dict[tuple[str, str], int] = {}
    for out in list(node.outgoing.values()):
        sent_keys[(out.move_id, out.dest)] = out.sent_keys
        sent_bytes[(out.move_id, out.dest)] = out.sent_bytes
    yield _counter("zkv_move_sent_keys", "Keys streamed to another node by a move, per "
                   "stream.", sent_keys, ("move", "destination"))
    yield _counter("zkv_move_sent_bytes", "Bytes streamed to another node by a move, per "
                   "stream.", sent_bytes, ("move", "destination"))
    primary = node.repl.primary
    if primary is not None:
        now = time.monotonic()
        peers = list(primary.peers.values())
        yield _gauge("zkv_replication_lag_seconds", "How long the oldest record shipped to "
                     "a replica has waited for its acknowledgement, per replica.",
                     {p.addr: p.age(now) for p in peers}, ("replica",))
        yield _gauge("zkv_replica_in_sync", "Whether a replica is in the in-sync set (1) or "
                     "not (0), per replica.", {p.addr: int(p.in_sync) for p in peers},
                     ("replica",))
        yield _gauge("zkv_lease_valid", "Whether this primary holds its lease from its "
                     "in-sync replicas.", int(primary.lease_ok(now)))


def proxy_families(shell: Any) -> Iterator[Any]:
    """The metrics of a proxy or follower (zkv.shell.ProxyShell)."""
    from .guard import rss_bytes

    router = shell.router
    ops = dict(router.ops)
    for op, n in list(shell.op_counts.items()):
        ops[op] = ops.get(op, 0) + n
    yield _counter("zkv_requests", "Client requests, by op (both fronts).", ops, ("op",))
    codes = dict(router.error_codes)
    for key, n in list(shell.error_codes.items()):
        codes[key] = codes.get(key, 0) + n
    yield _counter("zkv_errors", "Error replies to clients, by op (? where the request "
                   "was not readable) and code.", codes, ("op", "code"))
    yield histogram(router.timings, "zkv_request_duration_seconds",
                                "Time from a client request to its reply, by op.")
    yield _gauge("zkv_in_flight_requests", "Requests sent to nodes and not yet answered.",
                 len(shell.pending) + router.in_flight)
    clients = shell.guard.stats()["clients"] if shell.guard is not None else 0
    yield _gauge("zkv_connected_clients", "Client connections open, by front.",
                 {"zmq": clients, "resp": len(shell.resp.conns) if shell.resp else 0},
                 ("front",))
    yield _gauge("zkv_node_up", "Whether this proxy sees the node up (1) or down (0).",
                 {addr: 1 if shell.health.is_up(addr) else 0
                  for addr in shell.configured_links()},
                 ("node",))
    yield _gauge("zkv_epoch", "Cluster configuration epoch this proxy routes by.",
                 shell.state.epoch)
    yield _gauge("zkv_move_active", "Whether a move (ADD, REMOVE, MOVE ABORT) is under way.",
                 1 if shell.state.move is not None else 0)
    if hasattr(shell, "failovers"):  # the config manager
        yield _counter("zkv_failovers", "Replicas promoted to primary by this config "
                       "manager.", shell.failovers)
    yield _gauge("zkv_rss_bytes", "Resident memory of the process.", rss_bytes())
