"""A soak run: a mixed load for minutes while storage nodes are restarted on a schedule.

    python -m zkv.benchmarks.soak [--minutes 5] [--restart-every 20] [--clients 4]
                                  [--replicas N] [--json]

Not part of CI. It starts three nodes (fsync always) and a proxy in a temporary
directory, runs writers/deleters/readers (each client owns its keys, so the
expected value of every key is known), and every ``--restart-every`` seconds
kills one node with SIGKILL and starts it again (round robin). Each phase
between restarts reports operations, errors and the resident memory of every
process; at the end every key is read back and compared. The run fails (exit 1)
if any acknowledged write was lost, or if memory grew without bound (the last
phase's RSS more than twice the first's, after the warm-up phase).

With ``--replicas N`` every shard has N replicas, and each restart picks a node at
random (primary or replica) and keeps it down for ``--down`` seconds (default 3)
before starting it again: long enough for a primary's shard to fail over.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from ..client import Client
from ..errors import ZkvError
from .harness import Children, start_cluster


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Load:
    """Clients that each own a slice of the keys and remember what they may hold."""

    def __init__(self, proxy: str, clients: int, keys: int) -> None:
        self.proxy = proxy
        self.expected: dict[bytes, set[bytes | None]] = {}
        self.lock = threading.Lock()
        self.ops = 0
        self.errors = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, clients, keys), daemon=True)
                        for i in range(clients)]

    def _run(self, me: int, clients: int, keys: int) -> None:
        rng = random.Random(me)
        mine = [b"soak-%d" % k for k in range(me, keys, clients)]
        expected = self.expected
        with Client(self.proxy, timeout=2.0, retries=1) as c:
            n = 0
            while not self.stop.is_set():
                key = rng.choice(mine)
                roll = rng.random()
                n += 1
                try:
                    if roll < 0.5:
                        value = b"%d-%d" % (me, n)
                        try:
                            c.set(key, value)
                            expected[key] = {value}
                        except ZkvError:
                            expected.setdefault(key, {None}).add(value)
                            raise
                    elif roll < 0.65:
                        try:
                            c.delete(key)
                            expected[key] = {None}
                        except ZkvError:
                            expected.setdefault(key, {None}).add(None)
                            raise
                    else:
                        c.get(key)
                    with self.lock:
                        self.ops += 1
                except ZkvError:
                    with self.lock:
                        self.errors += 1
                    time.sleep(0.01)

    def take(self) -> tuple[int, int]:
        with self.lock:
            ops, errors = self.ops, self.errors
            self.ops = self.errors = 0
        return ops, errors


def verify(proxy: str, expected: dict[bytes, set[bytes | None]]) -> int:
    """Read every key back; how many hold a value no acknowledged write left there."""
    keys = sorted(expected)
    lost = 0
    with Client(proxy, timeout=10.0, retries=3) as c:
        for i in range(0, len(keys), 1000):
            chunk = keys[i : i + 1000]
            for key, got in zip(chunk, c.mget(chunk)):
                if got not in expected[key]:
                    lost += 1
    return lost


def soak(minutes: float, restart_every: float, clients: int, keys: int,
         say: Any = print, replicas: int = 0, down: float = 3.0) -> dict[str, Any]:
    rng = random.Random(7)
    names = [f"node{i}" + (f"r{j}" if j else "") for i in range(1, 4)
             for j in range(replicas + 1)]
    with tempfile.TemporaryDirectory(prefix="zkv-soak-") as workdir:
        children = Children(workdir)
        try:
            proxy, nodes = start_cluster(children, 3, "always", replicas=replicas)
            load = Load(proxy, clients, keys)
            for t in load.threads:
                t.start()
            phases: list[dict[str, Any]] = []
            end = time.monotonic() + minutes * 60
            victim = 0
            while time.monotonic() < end:
                time.sleep(min(restart_every, max(0.0, end - time.monotonic())))
                ops, errors = load.take()
                rss = {os.path.basename(log)[:-4]: rss_of(popen.pid)
                       for popen, log in children.popens if popen.poll() is None}
                phase = {"phase": len(phases) + 1, "ops": ops, "errors": errors, "rss": rss}
                phases.append(phase)
                say(json.dumps(phase))
                if time.monotonic() >= end:
                    break
                name = rng.choice(names) if replicas else f"node{victim % 3 + 1}"
                victim += 1
                say(json.dumps({"restart": name}))
                restart_node(children, name, down if replicas else 0.0)
            load.stop.set()
            for t in load.threads:
                t.join(10)
            lost = verify(proxy, load.expected)
        finally:
            children.close()
    totals = [sum(dict(p["rss"]).values()) for p in phases]
    bounded = len(totals) < 3 or totals[-1] <= 2 * max(totals[1], 1)
    return {"phases": phases, "restarts": max(0, len(phases) - 1), "lost": lost,
            "keys": len(load.expected), "memory_bounded": bounded}


def restart_node(children: Children, name: str, down: float = 0.0) -> None:
    """kill -9 the node called ``name`` and, ``down`` seconds later, start it again on
    the same port and data."""
    for i, (popen, log) in enumerate(children.popens):
        if os.path.basename(log) == f"{name}.log" and popen.poll() is None:
            argv = [str(a) for a in popen.args]  # type: ignore[union-attr]
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)
            children.popens.pop(i)
            time.sleep(down)
            children.spawn(name, argv, ready="zkv node")
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zkv.benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--restart-every", type=float, default=20.0, metavar="SECONDS")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="replicas per shard; restarts then pick any node at random")
    p.add_argument("--down", type=float, default=3.0, metavar="SECONDS",
                   help="with --replicas: how long a killed node stays down (default 3)")
    p.add_argument("--json", action="store_true", help="print only the final JSON summary")
    args = p.parse_args(argv)
    if args.replicas < 0 or args.down < 0:
        p.error("--replicas and --down must not be negative")
    result = soak(args.minutes, args.restart_every, args.clients, args.keys,
                  say=(lambda s: None) if args.json else print, replicas=args.replicas,
                  down=args.down)
    print(json.dumps(result if args.json else {k: v for k, v in result.items()
                                                if k != "phases"}))
    return 0 if result["lost"] == 0 and result["memory_bounded"] else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["soak"]
