"""What the worst requests cost: each request class that once cost a server far more
than it weighed, sent to a node and to a proxy, with its reply time and the server's
peak memory growth, beside a plain 1 MiB SET measured in the same run.

    python -m zkv.benchmarks.hostile [--keys 200000] [--json]

Not part of CI (it takes about a minute and a few GiB of headroom). It starts one
node and a proxy in a temporary directory. Peak memory is the process's VmHWM,
reset before each request (``/proc/PID/clear_refs``; where that is not allowed the
figure is the growth of the running peak).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import cbor2
import zmq

from ..client import Client
from ..core import protocol as P
from .harness import Children, start_cluster

MiB = 1 << 20


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Target:
    def __init__(self, ctx: zmq.Context[Any], name: str, address: str, pid: int) -> None:
        self.name, self.address, self.pid = name, address, pid
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{address}")
        self.tag = 0

    def send(self, body: bytes, timeout: float = 120.0) -> tuple[float, int, str]:
        """One request: (seconds to its reply, peak memory growth, what came back)."""
        reset_peak(self.pid)
        before = peak_rss(self.pid)
        self.tag += 1
        tag = struct.pack("<Q", self.tag)
        started = time.perf_counter()
        self.sock.send_multipart([tag, body])
        while True:
            if not self.sock.poll(int(timeout * 1000)):
                return time.perf_counter() - started, peak_rss(self.pid) - before, "no reply"
            frames = self.sock.recv_multipart()
            if frames[0] == tag:
                break
        elapsed = time.perf_counter() - started
        item = cbor2.loads(frames[-1])
        what = "OK" if item[0] == P.OK else f"{item[1]}: {item[2][:70]}"
        return elapsed, peak_rss(self.pid) - before, what

    def close(self) -> None:
        self.sock.close(0)


def empty_arrays(n: int) -> bytes:
    return b"\x9a" + struct.pack(">I", n) + b"\x80" * n


def shared_mset(value_bytes: int, refs: int) -> bytes:
    value = b"\xd8\x1c" + cbor2.dumps(b"v" * value_bytes)
    return (b"\x82\x64MSET" + b"\x99" + struct.pack(">H", 2 * refs) + b"\x41k" + value
            + b"\x41k\xd8\x1d\x00" * (refs - 1))


def requests(limits: P.Limits) -> list[tuple[str, Callable[[], bytes], str]]:
    return [
        ("a plain SET of 1 MiB (the baseline)", lambda: P.encode_request(
            "SET", b"baseline", b"b" * MiB), "both"),
        ("8M empty arrays in 8 MiB", lambda: empty_arrays(8_000_000), "both"),
        ("64M empty arrays at the message limit",
         lambda: empty_arrays(limits.max_message_bytes - 64), "both"),
        ("MSET of a 1 MiB value shared 200 times (tags 28/29)",
         lambda: shared_mset(MiB, 200), "both"),
        ("PIPE of 40 GETs of a 16 MiB value", lambda: P.encode_request(
            "PIPE", [["GET", b"big"]] * 40), "both"),
        (f"PIPE of {limits.max_batch} GETs of a 16 MiB value", lambda: P.encode_request(
            "PIPE", [["GET", b"big"]] * limits.max_batch), "both"),
        ("MGET of 40 x 16 MiB", lambda: P.encode_request("MGET", [b"big"] * 40), "both"),
        ("KEYS with a 4 MiB pattern", lambda: P.encode_request("KEYS", b"a*" * (2 * MiB)),
         "both"),
        ("SCAN page, the worst pattern allowed (1 KiB, 32 stars)", lambda: P.encode_request(
            "SCAN", "0", (b"*x" * 32 + b"y" * 960)[:1024], 10_000), "node"),
        ("SCAN with cursor 10**5000", lambda: cbor2.dumps(["SCAN", 10**5000]), "both"),
        ("KEYS of every key", lambda: P.encode_request("KEYS", b"*"), "both"),
        ("ADD dry run, weight 1e6", lambda: P.encode_request(
            "ADD", "127.0.0.1:1", {"weight": 1e6, "dry_run": True}), "proxy"),
        ("ADD dry run, weight NaN", lambda: P.encode_request(
            "ADD", "127.0.0.1:1", {"weight": float("nan"), "dry_run": True}), "proxy"),
        ("ADD dry run, weight 64 (the largest allowed)", lambda: P.encode_request(
            "ADD", "127.0.0.1:1", {"weight": 64, "dry_run": True}), "proxy"),
    ]


def unread_replies(ctx: zmq.Context[Any], target: Target, n: int = 400) -> tuple[float, int]:
    """``n`` GETs of a 1 MiB value on a socket that never reads: the server's peak growth."""
    reset_peak(target.pid)
    before = peak_rss(target.pid)
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 64 * 1024)
    s.connect(f"tcp://{target.address}")
    body = P.encode_request("GET", b"mib")
    started = time.perf_counter()
    for i in range(n):
        s.send_multipart([b"%d" % i, body])
    time.sleep(3.0)
    growth = peak_rss(target.pid) - before
    s.close(0)
    return time.perf_counter() - started, growth


def idle_connections(children: Children, node: str, n: int = 1500) -> dict[str, Any]:
    """``n`` idle connections against a proxy whose file limit is 1024: its CPU share
    while they stay, and what a new client meets."""
    from ..guard import raise_fd_limit
    from .harness import free_port, zkv_argv

    raise_fd_limit()
    port = free_port()
    argv = zkv_argv("proxy", "--port", str(port), "--node", node, "--state-dir",
                    os.path.join(children.workdir, "proxy-1024"))
    children.spawn("proxy-1024", ["prlimit", "--nofile=1024:1024", *argv], ready="zkv proxy")
    target = Target(zmq.Context.instance(), "proxy", f"127.0.0.1:{port}",
                    children.popens[-1][0].pid)
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, n + 64)

    def cpu() -> float:
        with open(f"/proc/{target.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(f"tcp://{target.address}")
        socks.append(s)
    time.sleep(2.0)
    spent = cpu()
    time.sleep(3.0)
    share = (cpu() - spent) / 3.0
    started = time.perf_counter()
    try:
        Client(target.address, timeout=5, retries=0).ping()
        answer = "answered"
    except Exception as exc:  # noqa: BLE001 - reported as the result
        answer = f"{type(exc).__name__}: {str(exc)[:60]}"
    waited = time.perf_counter() - started
    for s in socks:
        s.close(0)
    ctx.destroy(0)
    target.close()
    return {"connections": n, "cpu_share": round(share, 3), "new_client": answer,
            "new_client_s": round(waited, 3)}


def run(keys: int, only: list[str] | None = None, idle: bool = True) -> dict[str, Any]:
    limits = P.Limits()
    out: dict[str, Any] = {"rows": []}
    with tempfile.TemporaryDirectory(prefix="zkv-hostile-") as workdir:
        children = Children(workdir)
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            proxy, nodes = start_cluster(children, 1, "no")
            pids = [p.pid for p, _ in children.popens]
            node = Target(ctx, "node", nodes[0], pids[0])
            front = Target(ctx, "proxy", proxy, pids[1])
            with Client(proxy, timeout=60) as c:
                c.set("big", b"B" * limits.max_value_bytes)
                c.set("mib", b"M" * MiB)
                batch = 1000
                for start in range(0, keys, batch):
                    c.mset({b"key:%09d" % i: b"v" for i in range(start, start + batch)})
            for name, body, where in requests(limits):
                if only and "baseline" not in name and not any(o in name for o in only):
                    continue
                data = body()
                for target in (node, front):
                    if where not in ("both", target.name):
                        continue
                    seconds, growth, what = target.send(data)
                    out["rows"].append({"request": name, "target": target.name,
                                        "bytes": len(data), "seconds": round(seconds, 4),
                                        "peak_growth_mib": round(growth / MiB, 1),
                                        "reply": what})
            for target in (node, front) if not only or any("never read" in o for o in only) \
                    else ():
                seconds, growth = unread_replies(ctx, target)
                out["rows"].append({"request": "400 GETs of 1 MiB, never read",
                                    "target": target.name, "bytes": 400 * 20,
                                    "seconds": None,
                                    "peak_growth_mib": round(growth / MiB, 1),
                                    "reply": "(not read)"})
            if idle:
                out["idle_connections"] = idle_connections(children, nodes[0])
            node.close()
            front.close()
        finally:
            ctx.destroy(0)
            children.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zkv.benchmarks.hostile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=200_000, help="keys loaded first")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only the requests whose name holds TEXT (repeatable)")
    parser.add_argument("--no-idle", action="store_true",
                        help="skip the 1500 idle connections (needs prlimit)")
    args = parser.parse_args(argv)
    report = run(args.keys, args.only, not args.no_idle)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    base = {r["target"]: r for r in report["rows"] if "baseline" in r["request"]}
    print(f"{'request':<58} {'to':<6} {'bytes':>9} {'seconds':>8} {'x base':>7} "
          f"{'peak MiB':>8}  reply")
    for r in report["rows"]:
        if r["seconds"] is None:
            secs, ratio = f"{'-':>8}", f"{'-':>7}"
        else:
            secs = f"{r['seconds']:>8.4f}"
            ratio = f"{r['seconds'] / max(base[r['target']]['seconds'], 1e-6):>7.1f}"
        print(f"{r['request'][:58]:<58} {r['target']:<6} {r['bytes']:>9} {secs} {ratio} "
              f"{r['peak_growth_mib']:>8.1f}  {r['reply']}")
    if "idle_connections" in report:
        print("1500 idle connections:", report["idle_connections"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
