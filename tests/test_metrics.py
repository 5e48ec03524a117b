"""Prometheus metrics (--metrics-port) scraped over HTTP from a real node and proxy:
the counters move as requests are made."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, wait_until

import zkv

prometheus = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(procs: Any, tmp_path: Path) -> dict[str, Any]:
    node_port, node_metrics = free_port(), free_port()
    proxy_port, proxy_metrics = free_port(), free_port()
    procs.start("node", "--port", str(node_port), "--data-dir", str(tmp_path / "n"),
                "--fsync", "always", "--metrics-port", str(node_metrics), ready="zkv node ")
    procs.start("proxy", "--port", str(proxy_port), "--state-dir", str(tmp_path / "s"),
                "--node", f"127.0.0.1:{node_port}", "--metrics-port", str(proxy_metrics),
                ready="zkv proxy ")
    client = zkv.Client(f"127.0.0.1:{proxy_port}", timeout=5)
    wait_until(lambda: client.ping(), 10, what="the proxy answering")
    yield {"client": client, "node": node_metrics, "proxy": proxy_metrics,
           "node_addr": f"127.0.0.1:{node_port}"}
    client.close()


def test_counters_and_histograms_move_with_requests(served: dict[str, Any]) -> None:
    c = served["client"]
    node0, proxy0 = scrape(served["node"]), scrape(served["proxy"])
    for i in range(25):
        c.set(f"m{i}", "v" * 10)
    for i in range(40):
        c.get(f"m{i}")
    with pytest.raises(zkv.LimitExceeded):
        c.get("k" * 70_000)
    with pytest.raises(zkv.ZkvError):
        c.call("SCAN", "not-a-cursor")
    node, proxy = scrape(served["node"]), scrape(served["proxy"])

    def grew(samples: Any, before: Any, name: str, **labels: str) -> float:
        return value(samples, name, **labels) - value(before, name, **labels)

    assert grew(proxy, proxy0, "zkv_requests_total", op="SET") == 25
    assert grew(proxy, proxy0, "zkv_requests_total", op="GET") == 40
    assert grew(proxy, proxy0, "zkv_errors_total", op="?", code="TOO_LARGE") == 1
    assert grew(proxy, proxy0, "zkv_errors_total", op="SCAN", code="BAD_COMMAND") == 1
    assert grew(proxy, proxy0, "zkv_request_duration_seconds_count", op="GET") == 40
    assert value(proxy, "zkv_request_duration_seconds_bucket", op="GET", le="+Inf") >= 40
    assert value(proxy, "zkv_node_up", node=served["node_addr"]) == 1
    assert grew(node, node0, "zkv_requests_total", op="SET") == 25
    assert grew(node, node0, "zkv_request_duration_seconds_count", op="GET") == 40
    assert value(node, "zkv_keys") == 25
    assert value(node, "zkv_live_bytes") == sum(len(f"m{i}") + 10 for i in range(25))
    assert grew(node, node0, "zkv_fsyncs_total") >= 1  # fsync always: one per write turn
    assert value(node, "zkv_fsync_duration_seconds_count") == value(node, "zkv_fsyncs_total")
    assert value(node, "zkv_log_bytes") > 0 and value(node, "zkv_rss_bytes") > 0
    assert value(node, "zkv_epoch") >= 1


def test_node_errors_by_op_and_code(served: dict[str, Any]) -> None:
    direct = zkv.Client(served["node_addr"], timeout=5)  # straight to the node
    try:
        before = scrape(served["node"])
        with pytest.raises(zkv.ZkvError):
            direct.call("SCAN", "not-a-cursor")
        after = scrape(served["node"])
    finally:
        direct.close()
    assert value(after, "zkv_errors_total", op="SCAN", code="BAD_COMMAND") \
        - value(before, "zkv_errors_total", op="SCAN", code="BAD_COMMAND") == 1


def test_a_metrics_port_in_use_is_one_clear_error(procs: Any, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        node = procs.start("node", "--port", str(free_port()), "--data-dir",
                           str(tmp_path / "n"), "--metrics-port", str(port))
        assert node.wait_exit(20) == 1
        assert f"cannot serve metrics on 127.0.0.1:{port}" in node.output
        proxy = procs.start("proxy", "--port", str(free_port()), "--state-dir",
                            str(tmp_path / "s"), "--metrics-port", str(port))
        assert proxy.wait_exit(20) == 1
        assert f"cannot serve metrics on 127.0.0.1:{port}" in proxy.output
        assert "Traceback" not in node.output + proxy.output
    finally:
        taken.close()
