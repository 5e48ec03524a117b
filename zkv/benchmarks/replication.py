"""Failover time and catch-up rate, against the move rate, measured in one run.

    python -m zkv.benchmarks.replication [--keys N] [--rounds 3] [--json]

Also part of ``zkv bench --replicas N`` (its "replication" section).

A shard of a primary and a replica (``zkv node`` processes, fsync no, the default
heartbeats: 500 ms x 3) behind a ``zkv proxy`` is loaded with N keys of 100 bytes.

- Catch-up rate: a new empty node is attached with REPLICA ADD; the rate is N over
  the time until NODES shows it in sync.
- Move rate (the baseline, same run): a new empty node joins the ring with ADD; the
  rate is the keys it holds afterwards over the ADD's duration.
- Failover time: a client writes one key of the shard in a loop; its primary is
  killed (SIGKILL); the time is from the kill until a write is taken again, which
  is detection (the heartbeats, and the replica's grace period) plus promotion.
  The old primary is started again and syncs back before the next round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from ..client import Client, wait_in_sync
from ..errors import ZkvError
from .harness import Children, free_port, in_children, start_node, zkv_argv

VALUE = b"v" * 100


def _load(c: Client, keys: int) -> None:
    for start in range(0, keys, 1000):
        c.mset({b"key:%09d" % i: VALUE for i in range(start, min(keys, start + 1000))})


def _kill(children: Children, address: str) -> list[str]:
    """SIGKILL the node listening at ``address``; its argv, to start it again."""
    port = address.rsplit(":", 1)[1]
    for i, (popen, _) in enumerate(children.popens):
        argv = [str(a) for a in popen.args]  # type: ignore[union-attr]
        if "node" in argv and port in argv and popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)
            children.popens.pop(i)
            return argv
    raise LookupError(f"no node process at {address}")


def _primary(c: Client, shard: str) -> str:
    return next(str(r["address"]) for r in c.nodes()
                if r.get("shard") == shard and r.get("role") == "primary")


def measure(children: Children, keys: int = 50_000, rounds: int = 3,
            say: Any = print) -> dict[str, Any]:
    shard = start_node(children, "no", "shard")
    replica = start_node(children, "no", "shard-replica")
    port = free_port()
    children.spawn("replication-proxy", zkv_argv(
        "proxy", "--port", str(port), "--state-dir", os.path.join(children.workdir, "rproxy"),
        "--node", shard, "--replica", f"{shard}={replica}"), ready="zkv proxy")
    proxy = f"127.0.0.1:{port}"
    out: dict[str, Any] = {"keys": keys}
    with Client(proxy, timeout=30.0) as c:
        wait_in_sync(c, replica, 30)
        _load(c, keys)
        fresh = start_node(children, "no", "fresh-replica")
        began = time.monotonic()
        c.add_replica(shard, fresh, wait_timeout=600)
        took = time.monotonic() - began
        out["catch_up_keys_per_sec"] = round(keys / took)
        say(f"catch-up: {keys} keys in {took:.2f} s")
        joining = start_node(children, "no", "joining")
        began = time.monotonic()
        c.add_node(joining, wait_timeout=600)
        took = time.monotonic() - began
        moved = next(int(r["keys"] or 0) for r in c.nodes() if r["address"] == joining)
        out["move_keys_per_sec"] = round(moved / took)
        out["catch_up_vs_move"] = round(out["catch_up_keys_per_sec"]
                                        / max(1, out["move_keys_per_sec"]), 3)
        say(f"move: {moved} keys in {took:.2f} s")
        c.remove_replica(fresh)
        key = next(b"probe-%d" % i for i in range(1000)
                   if c.call("RING", b"probe-%d" % i)["owner"] == shard)
        times = []
        with Client(proxy, timeout=0.5, retries=0) as writer:
            for _ in range(rounds):
                wait_in_sync(c, next(r["address"] for r in c.nodes()
                                     if r.get("shard") == shard and r["role"] == "replica"),
                             120)
                victim = _primary(c, shard)
                argv = _kill(children, victim)
                began = time.monotonic()
                while True:
                    try:
                        writer.set(key, b"x")
                        break
                    except ZkvError:
                        time.sleep(0.01)
                times.append(round(time.monotonic() - began, 3))
                say(f"failover: writes taken again {times[-1]:.2f} s after the kill")
                children.spawn(f"restarted-{len(times)}", argv, ready="zkv node")
        out["failover_seconds"] = times
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zkv.benchmarks.replication",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = p.parse_args(argv)
    if args.keys < 1 or args.rounds < 1:
        p.error("--keys and --rounds must be positive")
    say = (lambda s: None) if args.json else print
    result = in_children("zkv-repl-", lambda children: measure(
        children, args.keys, args.rounds, say=say))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
