"""``zkv bench`` on tiny runs: its options are honoured and ``--json`` has the documented
shape. Nothing here asserts a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Cluster

from zkv import bench
from zkv.core import protocol as P

RESULT_KEYS = {"target", "test", "ops_per_sec", "p50_ms", "p99_ms", "p999_ms", "requests",
               "errors"}


def run_bench(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zkv", "bench", *args], check=False, cwd=tmp_path,
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    proc = run_bench(tmp_path, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)  # the whole of stdout is one object
    assert set(report) >= {"config", "results", "ratios"}
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        for k in RESULT_KEYS - {"target", "test"}:
            assert isinstance(r[k], (int, float)) and r[k] >= 0, (k, r)
        assert r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"]
    return report


# -- the pure parts ------------------------------------------------------------------------


def test_split_and_percentile() -> None:
    assert bench.split(10, 3) == [4, 3, 3]
    assert sum(bench.split(7, 7)) == 7
    values = [i / 1000 for i in range(1, 1001)]
    assert bench.percentile(values, 0.5) == 0.5
    assert bench.percentile(values, 0.999) == 0.999
    assert bench.percentile([], 0.5) == 0.0


@pytest.mark.parametrize("test", bench.TESTS)
def test_the_floor_answers_with_zkvs_reply_size(test: str) -> None:
    value = b"x" * 100
    for pipeline, window in ((1, False), (10, False), (10, True)):
        keys = iter(bench.key_pool(100) * 10)
        cmds = bench.commands(test, keys, value, pipeline)
        pipe = bench.uses_pipe(test, pipeline, window)
        bodies = bench.round_bodies(cmds, pipe)
        assert len(bodies) == (1 if pipe or pipeline == 1 else pipeline)
        reply = bench.reply_body(test, pipeline, window, value)
        result = P.decode_reply(reply)
        if pipe:
            assert len(result) == pipeline
        elif test == "mget":
            assert result == [value] * bench.KEYS_PER_MULTI
        assert bench.reply_errors(reply, pipe) == 0


# -- whole runs ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_options_are_honoured(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "set,mget", "-n", "200", "-c", "2", "-P", "10",
                        "-r", "300", "-d", "20", "--nodes", "2")
    cfg = report["config"]
    assert (cfg["tests"], cfg["requests"], cfg["clients"], cfg["pipeline"]) == (
        ["set", "mget"], 200, 2, 10)
    assert (cfg["value_bytes"], cfg["keyspace"], cfg["nodes"], cfg["fsync"]) == (
        20, 300, 2, "everysec")
    assert [(r["target"], r["test"]) for r in report["results"]] == [("zkv", "set"),
                                                                      ("zkv", "mget")]
    for r in report["results"]:
        assert r["requests"] == 200 and r["errors"] == 0 and r["ops_per_sec"] > 0
    assert report["ratios"] == {}


@pytest.mark.timeout(60)
def test_counters_and_sets_with_a_deadline(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "incr,setex", "-n", "200", "-c", "2", "-P", "10",
                        "-r", "50", "--nodes", "2")
    assert [r["test"] for r in report["results"]] == ["incr", "setex"]
    for r in report["results"]:
        assert r["requests"] == 200 and r["errors"] == 0 and r["ops_per_sec"] > 0


@pytest.mark.timeout(60)
def test_one_client_with_a_window_of_requests(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "get", "-n", "100", "-P", "7", "--window",
                        "-r", "50", "--fsync", "no", "--nodes", "1")
    assert report["config"]["window"] is True and report["config"]["fsync"] == "no"
    (r,) = report["results"]
    assert r["requests"] == 105  # rounded up to whole rounds of 7
    assert r["errors"] == 0


@pytest.mark.timeout(90)
def test_compare_runs_every_target(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "set,get", "-n", "100", "-P", "5", "-r", "100",
                        "--compare")
    targets = {r["target"] for r in report["results"]}
    assert {"zkv", "zkv-direct", "direct", "floor", "floor-1hop"} <= targets
    if "redis" not in targets:
        assert "redis" in report["skipped"] and report["skipped"]["redis"]
    for test in ("set", "get"):
        assert {r["target"] for r in report["results"] if r["test"] == test} == targets
        assert set(report["ratios"][test]) == targets - {"zkv", "zkv-direct"}
        assert set(report["ratios_direct"][test]) == targets - {"zkv-direct"}
        assert all(x > 0 for x in report["ratios"][test].values())
        assert all(x > 0 for x in report["ratios_direct"][test].values())
    assert all(r["errors"] == 0 for r in report["results"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("clients", [1, 3])
def test_direct_runs_the_direct_routing_client(tmp_path: Path, clients: int) -> None:
    report = bench_json(tmp_path, "-t", "set,get", "-n", "60", "-r", "100", "-c", str(clients),
                        "-P", "3", "--direct")
    assert {r["target"] for r in report["results"]} == {"zkv-direct"}
    assert all(r["errors"] == 0 and r["requests"] >= 60 for r in report["results"])


@pytest.mark.timeout(60)
def test_against_a_running_proxy_with_a_table(tmp_path: Path, cluster: Cluster) -> None:
    proc = run_bench(tmp_path, "--proxy", cluster.address, "-t", "set", "-n", "50")
    assert proc.returncode == 0, proc.stderr
    assert "SET: 1 client(s), one request at a time" in proc.stdout
    assert "zkv" in proc.stdout and "ops/s" in proc.stdout
    assert cluster.client().set("after-the-bench", "ok")  # the cluster is left running


@pytest.mark.timeout(60)
def test_memory_and_recovery_on_a_small_scale(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "--memory", "2000", "--recovery", "2000", "--nodes", "2")
    assert report["results"] == []  # only the extras were asked for
    mem, rec = report["memory"], report["recovery"]
    assert mem["keys"] == mem["keys_stored"] == 2000 and mem["nodes"] == 2
    assert mem["dict_bytes_per_key"] > 0 and "zkv_ttl_bytes_per_key" in mem
    assert rec["records"] == 2000 and rec["ratio"] > 0 and rec["replay_records_per_s"] > 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [
    ["-t", "set,frobnicate"], ["-n", "0"], ["-c", "lots"], ["--fsync", "sometimes"],
    ["--proxy", "nowhere"], ["--no-such-flag"],
])
def test_a_bad_flag_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    proc = run_bench(tmp_path, *args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr.strip().splitlines()[-1]
    assert proc.stdout == ""


@pytest.mark.timeout(120)
def test_resp_rows_by_redis_benchmark(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "set,get", "-n", "400", "-r", "100", "--resp")
    if "resp" in report.get("skipped", {}):
        assert "redis-benchmark" in report["skipped"]["resp"]
        pytest.skip(report["skipped"]["resp"])
    section = report["resp"]
    rows = {(r["target"], r["mode"], r["test"]) for r in section["rows"]}
    for mode in ("c1", "c50", "c50-P16"):
        for test in ("set", "get"):
            assert ("zkv-resp", mode, test) in rows and ("zkv-zmq", mode, test) in rows
            assert section["ratios"][mode][test]["zkv-zmq"] > 0
    peers = {t for t, _, _ in rows} - {"zkv-resp", "zkv-zmq"}
    for peer in ("redis", "twemproxy"):
        assert peer in peers or peer in report["skipped"]
    assert all(r["ops_per_sec"] > 0 for r in section["rows"])


@pytest.mark.timeout(30)
def test_resp_starts_its_own_cluster(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--resp", "--proxy", "127.0.0.1:1")
    assert proc.returncode == 1 and "leave out --proxy" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(90)
def test_metrics_on_and_off_in_one_run(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "set,get", "-n", "200", "-r", "200", "--metrics")
    assert {r["target"] for r in report["results"]} == {"zkv", "zkv-metrics"}
    assert set(report["ratios_metrics"]) == {"set", "get"}
    assert all(x > 0 for x in report["ratios_metrics"].values())


@pytest.mark.timeout(60)
def test_curve_on_and_off_in_one_run(tmp_path: Path, monkeypatch: Any) -> None:
    """zkv bench --curve: every test on the plain cluster and on one with CURVE on (keys
    made for the run), and each one's ratio. Keys the environment names for clients
    (ZKV_CURVE_KEY) are for the user's clusters, not the bench's own."""
    monkeypatch.setenv("ZKV_CURVE_KEY", str(tmp_path / "someone-elses.key_secret"))
    report = bench_json(tmp_path, "-t", "set,get", "-n", "100", "-r", "100", "--nodes", "1",
                        "--curve")
    assert report["config"]["curve"] is True
    assert [(r["target"], r["test"]) for r in report["results"]] == [
        ("zkv", "set"), ("zkv-curve", "set"), ("zkv", "get"), ("zkv-curve", "get")]
    assert all(r["errors"] == 0 and r["requests"] == 100 for r in report["results"])
    assert set(report["ratios_curve"]) == {"set", "get"}
    assert all(set(r) == {"zkv"} and r["zkv"] > 0 for r in report["ratios_curve"].values())


@pytest.mark.timeout(180)
def test_replicas_beside_none_in_one_run(tmp_path: Path) -> None:
    """zkv bench --replicas 1: the same load on a replicated cluster, its ratio to the
    plain one, and the replication figures (catch-up against move rate, failover)."""
    report = bench_json(tmp_path, "-t", "set,get", "-n", "200", "-r", "2000",
                        "--replicas", "1", "--failovers", "1")
    assert {r["target"] for r in report["results"]} == {"zkv", "zkv-replicas"}
    assert all(r["errors"] == 0 for r in report["results"])
    assert set(report["ratios_replicas"]) == {"set", "get"}
    repl = report["replication"]
    assert repl["keys"] == 2000 and repl["catch_up_keys_per_sec"] > 0
    assert repl["move_keys_per_sec"] > 0 and repl["catch_up_vs_move"] > 0
    assert len(repl["failover_seconds"]) == 1 and all(t > 0 for t in repl["failover_seconds"])


@pytest.mark.timeout(90)
def test_follower_runs_each_test_through_a_follower_proxy_too(tmp_path: Path) -> None:
    report = bench_json(tmp_path, "-t", "set,get", "-n", "100", "-r", "100", "--follower")
    assert {(r["target"], r["test"]) for r in report["results"]} == {
        (t, test) for t in ("zkv", "zkv-follower") for test in ("set", "get")}
    assert all(r["errors"] == 0 and r["requests"] >= 100 for r in report["results"])
    assert set(report["ratios_follower"]) == {"set", "get"}
    assert all(x > 0 for x in report["ratios_follower"].values())
