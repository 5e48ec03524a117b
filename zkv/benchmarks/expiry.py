"""The cost of active expiry: reads while a million keys expire, against reads while
as many keys do not, measured in one run; and the memory of a key with a deadline.

    python -m zkv.benchmarks.expiry [--keys 1000000] [--nodes 2] [--seconds 3] [--json]

A cluster of ``zkv node`` processes (fsync no) behind a ``zkv proxy``:

1. Baseline: N keys of 32 bytes with no deadline (and the snapshot their load
   starts finished); for S seconds a reader does
   pipelined GETs of 100 keys (of a small set of its own, so that what is read
   does not expire) and counts them.
2. Expiry: N more keys, all due at one moment just after they are loaded; the
   same reader runs for S seconds from that moment, while the nodes delete them.
   Reported: the reads' ratio to the baseline, how long until every expired key
   was deleted (the nodes' key counts back to the baseline's), and the resident
   memory the nodes gave back.
3. Memory (in this process, tracemalloc): bytes per key of a Keyspace of N keys
   without deadlines and with them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc
from typing import Any

from ..client import Client
from ..core.keyspace import Keyspace
from .harness import Children, in_children, start_cluster

VALUE = b"v" * 32
READ_KEYS = [b"reader:%04d" % i for i in range(100)]


def _load(c: Client, prefix: bytes, keys: int, pxat: int | None) -> None:
    for start in range(0, keys, 20_000):
        with c.pipeline() as p:
            for i in range(start, min(keys, start + 20_000)):
                p.set(prefix + b"%09d" % i, VALUE, pxat=pxat)
            p.execute()


def _reads(c: Client, seconds: float) -> float:
    """GETs per second, pipelined 100 at a time, for ``seconds``."""
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        with c.pipeline() as p:
            for k in READ_KEYS:
                p.get(k)
            p.execute()
        done += len(READ_KEYS)
    return done / (time.perf_counter() - began)


def _settle(c: Client, limit: float = 120.0) -> float:
    """Wait until no node is writing a snapshot (a big load starts one, and its writer
    thread would share the node's time with what is measured); seconds waited."""
    began = time.time()
    while time.time() - began < limit and any(
            n.get("snapshot_running") for n in c.info()["nodes"].values()):
        time.sleep(0.2)
    return time.time() - began


def _held(c: Client) -> tuple[int, int]:
    nodes = c.info()["nodes"].values()
    return (sum(int(n.get("keys", 0)) for n in nodes),
            sum(int(n.get("rss_bytes", 0)) for n in nodes))


def keyspace_bytes(keys: int) -> dict[str, float]:
    """Bytes per key of a Keyspace holding ``keys`` keys, without and with deadlines."""
    out: dict[str, float] = {}
    for name, deadline in (("no_ttl", None), ("ttl", 1 << 41)):
        tracemalloc.start()
        ks = Keyspace()
        base = tracemalloc.get_traced_memory()[0]
        for i in range(keys):
            ks.set(b"key:%09d" % i, VALUE, deadline)
        ks.commit()
        out[f"{name}_bytes_per_key"] = round((tracemalloc.get_traced_memory()[0] - base) / keys,
                                             1)
        tracemalloc.stop()
        del ks
    out["ttl_extra_bytes_per_key"] = round(out["ttl_bytes_per_key"]
                                           - out["no_ttl_bytes_per_key"], 1)
    return out


def measure(children: Children, keys: int, nodes: int, seconds: float,
            say: Any = print) -> dict[str, Any]:
    proxy, _ = start_cluster(children, nodes, "no")
    out: dict[str, Any] = {"keys": keys, "nodes": nodes, "seconds": seconds}
    with Client(proxy, timeout=60.0) as c:
        c.mset({k: VALUE for k in READ_KEYS})
        began = time.time()
        _load(c, b"steady:", keys, None)
        loading = time.time() - began  # (the next load takes about as long)
        settling = _settle(c)  # (and its snapshot as long again)
        base_keys, base_rss = _held(c)
        out["reads_baseline"] = round(_reads(c, seconds))
        say(f"baseline: {out['reads_baseline']:,} GETs/s with {keys:,} keys held")
        due = int((time.time() + 1.5 * (loading + settling) + 2.0) * 1000)
        _load(c, b"short:", keys, due)
        _settle(c, max(0.0, due / 1000 - time.time()))
        held, rss = _held(c)
        out["loaded_before_due"] = held - base_keys == keys
        out["snapshot_in_window"] = any(n.get("snapshot_running")
                                        for n in c.info()["nodes"].values())
        wait = due / 1000 - time.time()
        if wait > 0:
            time.sleep(wait)
        out["reads_while_expiring"] = round(_reads(c, seconds))
        out["reads_ratio"] = round(out["reads_while_expiring"] / out["reads_baseline"], 3)
        say(f"while {keys:,} keys expire: {out['reads_while_expiring']:,} GETs/s "
            f"({out['reads_ratio']}x)")
        while _held(c)[0] > base_keys and time.time() * 1000 < due + 120_000:
            time.sleep(0.1)
        out["all_deleted_after_s"] = round(time.time() - due / 1000, 2)
        final_keys, final_rss = _held(c)
        out["keys_left_expired"] = final_keys - base_keys
        out["rss_held_by_expiring_mib"] = round((rss - base_rss) / 2**20, 1)
        # CPython keeps what it freed for reuse rather than giving it to the OS: what
        # shows the memory came back is that as many keys again do not grow the nodes
        _load(c, b"again:", keys, int((time.time() + 3600) * 1000))
        out["rss_growth_on_reload_mib"] = round((_held(c)[1] - final_rss) / 2**20, 1)
        say(f"every expired key deleted {out['all_deleted_after_s']} s after the deadline; "
            f"RSS {out['rss_held_by_expiring_mib']} MiB for them; as many keys again grew "
            f"it by {out['rss_growth_on_reload_mib']} MiB")
    out["memory"] = keyspace_bytes(min(keys, 200_000))
    say(f"memory per key: {out['memory']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zkv.benchmarks.expiry", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args(argv)
    if args.keys < 1 or args.nodes < 1 or args.seconds <= 0:
        p.error("--keys, --nodes and --seconds must be positive")
    say = (lambda s: None) if args.json else print
    result = in_children("zkv-expiry-", lambda children: measure(
        children, args.keys, args.nodes, args.seconds, say=say))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
