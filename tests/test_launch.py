"""``zkv up``: a whole topology under honcho, with prefixed logs, stopped by Ctrl-C."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import REPO, Procs, Topo, free_port, wait_until

import zkv
from zkv.config import load_topology
from zkv.launch import commands


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


@pytest.fixture
def reap() -> Iterator[list[Callable[[], str]]]:
    """Sources of ``zkv up`` output; every process honcho says it started is killed at
    the end, so a failing test leaves no nodes behind (they are not in the process
    group of ``zkv up`` that the ``procs`` finaliser kills)."""
    sources: list[Callable[[], str]] = []
    try:
        yield sources
    finally:
        for source in sources:
            for pid in re.findall(r"started \(pid=(\d+)\)", source()):
                if alive(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)


def cluster_pids(address: str, nodes: int) -> dict[str, int]:
    """The pid of the proxy and of every node, as INFO reports them."""
    c = zkv.Client(address, timeout=2.0, retries=0)
    try:
        def ready() -> Any:
            info = c.info()
            up = [n for n in info["nodes"].values() if "pid" in n]
            return info if len(up) == nodes else None

        info = wait_until(ready, 15, what="every node answering INFO")
        pids = {"proxy": int(info["proxy"]["pid"])}
        pids.update({addr: int(n["pid"]) for addr, n in info["nodes"].items()})
        return pids
    finally:
        c.close()


def use(address: str) -> None:
    c = zkv.Client(address, timeout=3.0, retries=2)
    try:
        data = {f"up:{i}": f"v{i}" for i in range(100)}
        assert c.mset(data)
        assert c.mget(list(data)) == [v.encode() for v in data.values()]
        assert {n["state"] for n in c.nodes()} == {"up"}
    finally:
        c.close()


def test_commands_one_per_node_and_the_proxy(tmp_path: Path) -> None:
    topo = Topo(tmp_path / "a dir with spaces", 3)
    topology = load_topology(topo.path)
    cmds = commands(topology, str(topo.path), python="/opt/my python/bin/python")
    assert [name for name, _ in cmds] == ["node1", "node2", "node3", "proxy"]
    for (_name, cmd), port in zip(cmds, topo.node_ports):
        argv = shlex.split(cmd)
        assert argv[:4] == ["exec", "/opt/my python/bin/python", "-m", "zkv"]
        assert argv[4] == "node"
        assert argv[argv.index("--config") + 1] == str(topo.path)
        assert argv[argv.index("--port") + 1] == str(port)
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
    argv = shlex.split(cmds[-1][1])
    assert argv[4:] == ["proxy", "--config", str(topo.path)]


def test_followers_are_started_following_the_proxy(tmp_path: Path) -> None:
    topo = Topo(tmp_path / "t", 2)
    text = topo.path.read_text() + "followers:\n  - port: 18001\n  - address: 127.0.0.1:18002\n"
    topo.path.write_text(text)
    cmds = dict(commands(load_topology(topo.path), str(topo.path)))
    for name, port in (("follower1", "18001"), ("follower2", "18002")):
        argv = shlex.split(cmds[name])
        assert argv[4] == "proxy"
        assert argv[argv.index("--port") + 1] == port
        assert argv[argv.index("--follow") + 1] == topo.proxy_addr


def test_the_procfile_starts_what_zkv_up_starts() -> None:
    """honcho start (the Procfile) and zkv up run the same processes under the same names."""
    procfile = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, cmd = line.partition(":")
            procfile[name.strip()] = shlex.split(cmd)
    up = {name: shlex.split(cmd) for name, cmd in
          commands(load_topology(REPO / "configs/local.yaml"), "configs/local.yaml")}
    assert list(procfile) == list(up)

    def what(argv: list[str]) -> tuple[str, ...]:  # the role, the config, port, manager
        rest = argv[argv.index("zkv") + 1:] if "zkv" in argv else argv[argv.index("-m") + 2:]
        opts = dict(zip(rest[1::2], rest[2::2]))
        return (rest[0], opts["--config"], opts.get("--port", ""), opts.get("--follow", ""))

    for name in up:
        assert procfile[name][0] == "exec", name
        assert what(procfile[name]) == what(up[name]), name


def test_commands_for_the_example_topologies() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        topology = load_topology(path)
        cmds = commands(topology, str(path))
        assert len(cmds) == len(topology.all_nodes()) + 1 + len(topology.followers), path
        assert len({name for name, _ in cmds}) == len(cmds)
        assert all(cmd.startswith("exec ") for _, cmd in cmds)


@pytest.mark.timeout(90)
def test_up_starts_everything_with_prefixed_logs_and_sigint_stops_it_all(
    tmp_path: Path, procs: Procs, reap: list[Callable[[], str]]
) -> None:
    topo = Topo(tmp_path / "my cluster", 3)
    up = procs.start("up", str(topo.path))
    reap.append(lambda: up.output)
    up.wait_for("zkv proxy ", 30)
    for i in (1, 2, 3):
        line = up.wait_for(f"zkv node {topo.node_addrs[i - 1]}", 15)
        assert re.search(rf"\bnode{i}\s*\| zkv node ", line), line
    assert re.search(r"\bproxy\s*\| zkv proxy ", up.wait_for("zkv proxy "))
    assert "Traceback" not in up.output

    pids = cluster_pids(topo.proxy_addr, 3)
    use(topo.proxy_addr)
    assert all(alive(pid) for pid in pids.values())
    # a second zkv up of the same topology starts nothing, and says why before anything
    again = subprocess.run([sys.executable, "-m", "zkv", "up", str(topo.path)],
                           cwd=procs.cwd, capture_output=True, text=True, timeout=30,
                           check=False)
    assert again.returncode == 1, again
    assert "seems to be running already" in again.stderr and f"in use by pid {pids['proxy']}" \
        in again.stderr, again.stderr
    assert "Ctrl-C" not in again.stdout and "Traceback" not in again.stderr

    started = time.monotonic()
    up.signal(signal.SIGINT)  # to zkv up alone: it must stop the others
    code = up.wait_exit(20)
    assert code in (0, 130), up.output
    wait_until(lambda: not any(alive(p) for p in pids.values()), 10,
               what="every node and the proxy gone")
    assert time.monotonic() - started < 15
    out = up.output
    assert "Traceback" not in out, out
    for name in ("node1", "node2", "node3", "proxy"):
        assert re.search(rf"{name} stopped \(rc=0\)", out), out


@pytest.mark.timeout(90)
def test_ctrl_c_in_a_terminal_stops_everything(
    tmp_path: Path, reap: list[Callable[[], str]]
) -> None:
    """Ctrl-C reaches the whole foreground process group, as in a real terminal."""
    topo = Topo(tmp_path, 3)
    child = pexpect.spawn(sys.executable, ["-m", "zkv", "up", str(topo.path)], cwd=str(tmp_path),
                          timeout=30, encoding="utf-8", dimensions=(50, 200),
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = io.StringIO()
    child.logfile_read = seen
    reap.append(seen.getvalue)
    pids: dict[str, int] = {}

    def started() -> bool:
        child.expect([pexpect.TIMEOUT], timeout=0.1)  # pump the output into `seen`
        text = re.sub(r"\x1b\[[0-9;]*m", "", seen.getvalue())
        names = [f"node{i}\\s*\\| zkv node {a}" for i, a in enumerate(topo.node_addrs, 1)]
        names.append(f"proxy\\s*\\| zkv proxy {topo.proxy_addr}")
        return all(re.search(n, text) for n in names)

    try:
        wait_until(started, 30, interval=0, what="every start line, prefixed")
        assert "\x1b[" in seen.getvalue(), "no colours in a terminal"
        pids = cluster_pids(topo.proxy_addr, 3)
        use(topo.proxy_addr)
        child.sendintr()
        child.expect(pexpect.EOF, timeout=20)
        child.close()
        assert child.exitstatus in (0, 130) or child.signalstatus == signal.SIGINT
        wait_until(lambda: not any(alive(p) for p in pids.values()), 10,
                   what="every node and the proxy gone")
    finally:
        child.close(force=True)


@pytest.mark.timeout(90)
def test_when_one_process_dies_up_stops_the_rest(
    tmp_path: Path, procs: Procs, reap: list[Callable[[], str]]
) -> None:
    topo = Topo(tmp_path, 2)
    up = procs.start("up", str(topo.path))
    reap.append(lambda: up.output)
    up.wait_for("zkv proxy ", 30)
    pids = cluster_pids(topo.proxy_addr, 2)
    os.kill(pids[topo.node_addrs[0]], signal.SIGKILL)
    code = up.wait_exit(20)
    assert code != 0
    wait_until(lambda: not any(alive(p) for p in pids.values()), 10,
               what="every process gone")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name,text,expect", [
    ("missing.yaml", None, "no such config file"),
    ("bad.yaml", "nodes:\n  - address: 127.0.0.1:9\n    fsync: maybe\n", "nodes[0].fsync"),
])
def test_up_with_a_bad_config_is_one_clear_line(
    tmp_path: Path, name: str, text: str | None, expect: str
) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    for how in ([str(path)], ["--config", str(path)]):  # (as zkv node and proxy take it too)
        done = subprocess.run([sys.executable, "-m", "zkv", "up", *how], cwd=tmp_path,
                              capture_output=True, text=True, timeout=20, check=False)
        assert done.returncode != 0
        output = (done.stdout + done.stderr).strip()
        assert "Traceback" not in output
        assert len(output.splitlines()) == 1, output
        assert output.startswith("zkv up: error: ") and str(path) in output and expect in output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("argv,expect", [
    (["up", "a.yaml", "--config", "b.yaml"], "two topologies given"),
    (["proxy", "--port", "1", "--follow", "127.0.0.1:2", "--node", "127.0.0.1:3"],
     "do not go with --follow"),
    (["proxy", "--port", "1", "--follow", "127.0.0.1:2", "--min-in-sync", "2"],
     "--min-in-sync does not go with --follow"),
])
def test_flags_that_contradict_each_other_are_refused(tmp_path: Path, argv: list[str],
                                                      expect: str) -> None:
    """(one of them used to be ignored without a word)"""
    done = subprocess.run([sys.executable, "-m", "zkv", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 1 and expect in done.stderr and "Traceback" not in done.stderr


@pytest.mark.timeout(90)
def test_up_serves_redis_clients_where_the_topology_says(
    tmp_path: Path, procs: Procs, reap: list[Callable[[], str]]
) -> None:
    redis = pytest.importorskip("redis")
    resp, follower, follower_resp = free_port(), free_port(), free_port()
    topo = Topo(tmp_path / "t", 2, proxy={"resp_port": resp})
    topo.path.write_text(topo.path.read_text() + f"followers:\n  - port: {follower}\n"
                         f"    resp_port: {follower_resp}\n")
    up = procs.start("up", str(topo.path))
    reap.append(lambda: up.output)
    assert f"(Redis clients: {resp})" in up.wait_for("zkv up: ", 15)
    up.wait_for("zkv proxy ", 30)
    up.wait_for(f"follows={topo.proxy_addr}", 30)
    cluster_pids(topo.proxy_addr, 2)
    for port in (resp, follower_resp):
        r = redis.Redis(port=port, socket_timeout=5)
        try:
            wait_until(lambda r=r: r.ping(), 10, what=f"the RESP front on {port}")
            assert r.set(f"up-resp-{port}", "yes") and r.get(f"up-resp-{port}") == b"yes"
        finally:
            r.close()


def test_up_with_a_data_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    topo = tmp_path / "t.yaml"
    topo.write_text(f"proxy:\n  port: {free_port()}\n  state_dir: {tmp_path / 'st'}\n"
                    f"nodes:\n  - address: 127.0.0.1:{free_port()}\n"
                    f"    data_dir: {tmp_path / 'afile'}\n")
    done = subprocess.run([sys.executable, "-m", "zkv", "up", str(topo)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "it is a file, not a directory" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.timeout(30)
def test_up_with_a_port_in_use_names_it_and_starts_nothing(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    topo = tmp_path / "t.yaml"
    topo.write_text(f"proxy:\n  port: {free_port()}\n  state_dir: {tmp_path / 'st'}\n"
                    f"  resp_port: {taken}\n"
                    f"nodes:\n  - address: 127.0.0.1:{free_port()}\n"
                    f"    data_dir: {tmp_path / 'n1'}\n")
    try:
        done = subprocess.run([sys.executable, "-m", "zkv", "up", str(topo)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=20, check=False)
    finally:
        busy.close()
    assert done.returncode == 1
    assert f"127.0.0.1:{taken} (the proxy's RESP front)" in done.stderr
    assert "nothing was started" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not (tmp_path / "n1").exists() and not (tmp_path / "st").exists()
