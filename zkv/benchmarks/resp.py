"""``zkv bench --compare --resp``: redis-benchmark itself against zkv's RESP front,
redis-server and twemproxy (nutcracker) in front of as many redis-servers as zkv has
nodes, beside zkv's own ZeroMQ front driven by zkv's load generator at the same
concurrency. Each is skipped, saying why, where its program is missing.

Rows are named ``TARGET MODE`` (``zkv-resp c50``); the modes are redis-benchmark's
``-c 1``, ``-c 50`` and ``-c 50 -P 16``. The ratios compare zkv's RESP front with
each peer in the same mode (and, at ``-c 50``, with the ZeroMQ front: the RESP front
should add nothing)."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from ..errors import Unavailable


def free_port() -> int:
    from .harness import free_port as pick

    return pick()

MODES = (("c1", 1, 1), ("c50", 50, 1), ("c50-P16", 50, 16))
TESTS = ("set", "get", "incr")  # what both redis-benchmark and zkv bench run


def missing(program: str, package: str) -> str | None:
    if shutil.which(program) is None:
        return f"{program} is not installed (apt-get install {package})"
    return None


def wait_port(address: str, timeout: float = 20.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise Unavailable(f"nothing listens on {address}") from None
            time.sleep(0.05)


def start_twemproxy(children: Any, servers: list[str], port: int) -> str:
    """nutcracker in front of ``servers`` (ketama over fnv1a_64, as Codis-less setups
    run it): its listening address."""
    conf = os.path.join(children.workdir, "nutcracker.yml")
    lines = ["zkvbench:", f"  listen: 127.0.0.1:{port}", "  hash: fnv1a_64",
             "  distribution: ketama", "  redis: true", "  auto_eject_hosts: false",
             "  timeout: 10000", "  servers:"]
    lines += [f"    - {s}:1" for s in servers]
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    log = os.path.join(children.workdir, "nutcracker.log")
    argv = ["nutcracker", "-c", conf, "-o", log, "-s", str(free_port())]
    with open(os.path.join(children.workdir, "nutcracker.out"), "wb") as out:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, cwd=children.workdir,
                                 start_new_session=True)
    children.popens.append((popen, log))
    address = f"127.0.0.1:{port}"
    wait_port(address)
    return address


def redis_benchmark(address: str, test: str, clients: int, pipeline: int, requests: int,
                    value_bytes: int, keyspace: int) -> dict[str, float]:
    """One redis-benchmark run: ops/s and latency percentiles (ms)."""
    host, port = address.rsplit(":", 1)
    argv = ["redis-benchmark", "-h", host, "-p", port, "-t", test, "-n", str(requests),
            "-c", str(clients), "-P", str(pipeline), "-d", str(value_bytes),
            "-r", str(keyspace), "--csv"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise Unavailable(f"redis-benchmark against {address} failed: "
                          f"{(out.stderr or out.stdout).strip()[-300:]}")
    rows = [r for r in csv.DictReader(io.StringIO(out.stdout)) if r.get("test")]
    if not rows:
        raise Unavailable(f"redis-benchmark against {address} printed no result: "
                          f"{out.stdout.strip()[-300:]}")
    row = rows[0]
    return {"ops_per_sec": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
            "p99_ms": float(row["p99_latency_ms"]), "max_ms": float(row["max_latency_ms"])}


def run(cfg: Any, children: Any, resp_address: str, proxy: str, runner_for: Callable[..., Any],
        report: dict[str, Any], say: Callable[[str], None]) -> None:
    """Fill ``report["resp"]``: rows and ratios."""
    why = missing("redis-benchmark", "redis-tools")
    if why is not None:
        report["skipped"]["resp"] = why
        say(f"RESP rows skipped: {why}")
        return
    targets: list[tuple[str, str]] = [("zkv-resp", resp_address)]
    if missing("redis-server", "redis-server") is None:
        targets.append(("redis", start_redis(children, cfg.fsync, "resp-redis")))
        why = missing("nutcracker", "nutcracker")
        if why is None:
            servers = [start_redis(children, cfg.fsync, f"resp-shard{i}")
                       for i in range(cfg.nodes)]
            targets.append(("twemproxy", start_twemproxy(children, servers, free_port())))
        else:
            report["skipped"]["twemproxy"] = why
            say(f"twemproxy skipped: {why}")
    else:
        report["skipped"]["redis"] = missing("redis-server", "redis-server")
    tests = [t for t in TESTS if t in cfg.tests] or list(TESTS)
    rows: list[dict[str, Any]] = []
    for mode, clients, pipeline in MODES:
        for test in tests:
            for target, address in targets:
                say(f"redis-benchmark {target} {test} -c {clients} -P {pipeline}")
                result = redis_benchmark(address, test, clients, pipeline, cfg.requests,
                                         cfg.value_bytes, cfg.keyspace)
                rows.append({"target": target, "mode": mode, "test": test, **result})
            # zkv's own front, the same load from zkv's own load generator
            zmq_cfg = dataclasses.replace(cfg, clients=clients, pipeline=pipeline,
                                          window=pipeline > 1,
                                          workers=1 if clients == 1 else 2)
            runner = runner_for(zmq_cfg)
            if test == "get":
                runner.fill_zkv(proxy)
            res = runner.run("zkv-zmq", proxy, "zkv", test)
            rows.append({"target": "zkv-zmq", "mode": mode, "test": test,
                         "ops_per_sec": res.ops_per_sec, "p50_ms": res.p50_ms,
                         "p99_ms": res.p99_ms, "max_ms": None, "errors": res.errors})
    by = {(r["target"], r["mode"], r["test"]): r["ops_per_sec"] for r in rows}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for mode, _, _ in MODES:
        for test in tests:
            mine = by.get(("zkv-resp", mode, test))
            if not mine:
                continue
            ratios.setdefault(mode, {})[test] = {
                peer: round(mine / by[(peer, mode, test)], 3)
                for peer in ("zkv-zmq", "redis", "twemproxy")
                if by.get((peer, mode, test))}
    report["resp"] = {"rows": rows, "ratios": ratios,
                      "note": "redis-benchmark drives every row but zkv-zmq (zkv's own load "
                              "generator on the ZeroMQ front); ratios are zkv-resp / peer"}


def start_redis(children: Any, fsync: str, name: str) -> str:
    port = free_port()
    data = os.path.join(children.workdir, name)
    os.makedirs(data)
    children.spawn(name, [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
        "--appendonly", "yes", "--appendfsync", fsync, "--save", "", "--daemonize", "no",
        "--protected-mode", "no",
    ], ready="Ready to accept connections")
    return f"127.0.0.1:{port}"


def show(section: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title="RESP: redis-benchmark (zkv-zmq: zkv's own client and front, same "
                        "load)", title_justify="left")
    for name in ("target", "mode", "test", "ops/s", "p50 ms", "p99 ms", "zkv-resp ÷ this"):
        table.add_column(name, justify="left" if name in ("target", "mode", "test")
                         else "right")
    ratios = section["ratios"]
    for r in section["rows"]:
        ratio = ratios.get(r["mode"], {}).get(r["test"], {}).get(r["target"])
        table.add_row(r["target"], r["mode"], r["test"], f"{r['ops_per_sec']:,.0f}",
                      f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                      "" if ratio is None else f"{ratio:.2f}x")
    console.print(table)
