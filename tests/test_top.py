"""`zkv top` under a real pseudo-terminal against a live cluster: every node shows, a
killed node shows as down, q quits; and the rates and latencies it computes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pexpect
import pytest
from conftest import REPO, Cluster

from zkv import top
from zkv.top import Sampler


@pytest.mark.timeout(90)
def test_top_shows_every_node_and_one_in_trouble(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster()
    c = cluster.client()
    c.mset({f"top{i}": "x" for i in range(100)})
    child = pexpect.spawn(sys.executable, ["-m", "zkv", "top", "--proxy", cluster.address,
                                           "-i", "0.3"],
                          cwd=str(REPO), timeout=15, encoding="utf-8", dimensions=(40, 160),
                          env={k: v for k, v in os.environ.items()
                               if k not in ("COLUMNS", "LINES")})
    try:
        try:
            child.expect_exact("ops/s")
        except pexpect.TIMEOUT:
            raise AssertionError(f"zkv top showed: {child.before!r}") from None
        seen: set[str] = set()
        while seen != set(cluster.node_addrs):  # every node, in whatever order it sorts
            child.expect_exact(cluster.node_addrs)
            seen.add(child.after)
        victim = cluster.node_addrs[1]
        cluster.kill_node(victim)
        child.expect(r"down", timeout=15)
        child.send("q")
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # into a pipe, without --count: a frame per interval, as top -b prints them
    piped = subprocess.Popen([sys.executable, "-m", "zkv", "top", "--proxy", cluster.address,
                              "-i", "0.2"], cwd=str(REPO), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert piped.stdout is not None
        os.set_blocking(piped.stdout.fileno(), False)
        out = b""
        deadline = time.monotonic() + 15
        while out.count(b"ops/s") < 2 and time.monotonic() < deadline:
            out += piped.stdout.read() or b""
            time.sleep(0.1)
        assert out.count(b"ops/s") >= 2, out[-500:]
        assert cluster.node_addrs[0].encode() in out
    finally:
        os.killpg(piped.pid, signal.SIGKILL)
        piped.wait(10)


def test_rates_latencies_and_trouble_first() -> None:
    nodes = [{"address": "a", "state": "up"}, {"address": "b", "state": "down"},
             {"address": "c", "state": "up"}]

    def info(ops: int, errors: int, buckets: list[int]) -> dict[str, Any]:
        node = {"ops": {"GET": ops}, "errors": errors, "keys": 5, "rss_bytes": 1 << 20,
                "log_bytes": 10, "latency_buckets": buckets}
        return {"proxy": {"requests": ops * 3, "errors": 0, "epoch": 2},
                "nodes": {"a": dict(node), "c": {**node, "errors": 0}}, "totals": {"keys": 10}}

    s = Sampler()
    s.rows(info(100, 0, [0] * 18), nodes, 10.0)
    buckets = [0] * 18
    buckets[1] = 98  # 98 requests under 100 us
    buckets[8] = 2  # 2 under 25 ms
    rows, summary = s.rows(info(300, 4, buckets), nodes, 12.0)
    assert [r["address"] for r in rows] == ["b", "a", "c"]  # down, then erroring
    a = next(r for r in rows if r["address"] == "a")
    assert a["ops_s"] == 100 and a["errors_s"] == 2
    assert a["p50"] == 0.0001 and a["p99"] == 0.025
    assert summary["requests_s"] == 300


def test_a_move_shows_each_stream_with_its_progress_and_rate() -> None:
    from rich.console import Console

    from zkv.top import render

    s = Sampler()
    streams = [{"source": "n1", "dest": "n9", "keys": 100, "total": 400, "done": False},
               {"source": "n2", "dest": "n9", "keys": 300, "total": 300, "done": True}]
    status = {"move": {"id": "m1", "kind": "add", "node": "n9", "phase": "copy",
                       "streams": streams}}
    s.stream_rates(status, 1.0)
    streams[0]["keys"] = 250
    rates = s.stream_rates(status, 3.0)
    assert rates[("n1", "n9")] == 75.0
    console = Console(width=120, record=True)
    console.print(render([], {"epoch": 3, "requests_s": None, "errors_s": None, "clients": 0,
                              "keys": 0, "stream_rates": rates}, status, "p"))
    text = console.export_text()
    assert "move m1: add n9, phase copy" in text
    assert "n1 -> n9" in text and "250 / 400" in text and "75" in text
    assert "300 / 300" in text and "done" in text


@pytest.mark.timeout(60)
def test_top_with_no_proxy_to_watch_says_so_once_and_stops() -> None:
    from conftest import free_port

    where = f"127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "zkv", "top", "--proxy", where, "-i", "0.2"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"zkv top: error: {where}: cannot connect to {where}: Connection refused (3 attempts)"]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_cluster_fits_an_80_column_terminal_uncut() -> None:
    """Rows of six nodes with large figures, at 80 columns: nothing cut to an ellipsis."""
    from rich.console import Console

    rows = [dict(address=f"127.0.0.1:80{81 + i}", state="up",
                 role="primary" if i < 3 else "replica", ops_s=12345.0, p50=0.00021,
                 p99=0.0031, keys=1234567, memory=123456789, log=98765432, errors_s=0.0,
                 trouble=False) for i in range(6)]
    summary = {"epoch": 12, "requests_s": 23456.0, "errors_s": 0.0, "clients": 5,
               "keys": 3456789}
    console = Console(width=80, record=True, force_terminal=False)
    console.print(top.render(rows, summary, {}, "127.0.0.1:8000"))
    shown = console.export_text()
    assert "…" not in shown and "1,234,567" in shown and "117.74M" in shown, shown
    assert all(len(line) <= 80 for line in shown.splitlines())
