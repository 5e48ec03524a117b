"""``zkv cli``: one-shot commands for scripts (output and exit status), and the
interactive shell driven through a real pseudo-terminal with pexpect."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest
from conftest import REPO, Cluster, free_port, module_cluster

import zkv

LIMITS = {"max_key_bytes": 64, "max_value_bytes": 4096}


@pytest.fixture(scope="module")
def shared(request: Any, tmp_path_factory: Any) -> Iterator[Cluster]:
    yield from module_cluster(request, tmp_path_factory, limits=LIMITS)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI process: history goes to a HOME of the test's own."""
    return {**os.environ, "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}


Run = Callable[..., "subprocess.CompletedProcess[bytes]"]


@pytest.fixture
def cli(shared: Cluster, env: dict[str, str]) -> Run:
    """``cli("SET", "k", "v")`` runs ``zkv cli --proxy ADDR SET k v`` once."""

    def run(*words: str, proxy: str | None = None, options: tuple[str, ...] = ()) -> Any:
        return subprocess.run(
            [sys.executable, "-m", "zkv", "cli", "--proxy", proxy or shared.address,
             *options, *words],
            cwd=REPO, env=env, capture_output=True, timeout=30, check=False,
        )

    return run


def out(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode()


def no_traceback(done: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in done.stdout + done.stderr, done.stderr.decode()


# -- one-shot commands -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_seed_commands_set_and_get(cli: Run) -> None:
    done = cli("SET", "username", "Alice")
    assert done.returncode == 0 and out(done).strip() == "OK", done
    done = cli("GET", "username")
    assert done.returncode == 0 and "Alice" in out(done)
    done = cli("GET", "username", options=("--raw",))
    assert done.returncode == 0 and done.stdout == b"Alice\n"
    done = cli("get", "username")  # commands are case-insensitive
    assert done.returncode == 0 and "Alice" in out(done)


@pytest.mark.timeout(60)
def test_values_with_spaces_quoted_as_in_a_shell(shared: Cluster, env: dict[str, str]) -> None:
    base = f"{shlex.quote(sys.executable)} -m zkv cli --proxy {shared.address}"
    done = subprocess.run(f'{base} SET greeting "hello world"', shell=True, cwd=REPO,
                          env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 0 and out(done).strip() == "OK"
    done = subprocess.run(f"{base} --raw GET greeting", shell=True, cwd=REPO, env=env,
                          capture_output=True, timeout=30, check=False)
    assert done.stdout == b"hello world\n"
    assert shared.client().get("greeting") == b"hello world"


@pytest.mark.timeout(60)
def test_newlines_and_utf8_round_trip(cli: Run, shared: Cluster) -> None:
    value = "line one\nline two ✓ ключ 値"
    assert cli("SET", "ключ 🔑", value).returncode == 0
    assert shared.client().get("ключ 🔑") == value.encode()
    assert cli("GET", "ключ 🔑", options=("--raw",)).stdout == value.encode() + b"\n"
    styled = out(cli("GET", "ключ 🔑"))
    assert "line two ✓ ключ 値" in styled
    # a value that is not UTF-8 is shown escaped, and raw as it is
    shared.client().set("binary", b"\xff\x00\xfe")
    assert cli("GET", "binary", options=("--raw",)).stdout == b"\xff\x00\xfe\n"
    assert "\\xff\\x00\\xfe" in out(cli("GET", "binary"))
    # bytes on the command line that are not UTF-8 are the key's bytes, as given
    key = os.fsdecode(b"raw\xff\xfe")
    done = cli("SET", key, "v")
    no_traceback(done)
    assert done.returncode == 0 and shared.client().get(b"raw\xff\xfe") == b"v"
    assert cli("GET", key, options=("--raw",)).stdout == b"v\n"
    shared.client().delete(b"raw\xff\xfe")  # (other tests scan these keys as text)


@pytest.mark.timeout(60)
def test_data_commands(cli: Run, shared: Cluster) -> None:
    assert out(cli("MSET", "a", "1", "b", "2", "c", "3")).strip() == "OK"
    # --raw shows a missing value as an empty line, as redis-cli does
    assert out(cli("MGET", "a", "b", "nope", "c", options=("--raw",))).split("\n") == [
        "1", "2", "", "3", ""]
    shown = out(cli("MGET", "a", "nope"))
    assert '1) "1"' in shown and "2) (nil)" in shown
    assert out(cli("EXISTS", "a", options=("--raw",))).strip() == "1"
    assert out(cli("DEL", "a", options=("--raw",))).strip() == "1"
    assert out(cli("DEL", "a", options=("--raw",))).strip() == "0"
    assert "(integer) 0" in out(cli("EXISTS", "a"))
    assert "(nil)" in out(cli("GET", "a"))
    assert out(cli("GET", "a", options=("--raw",))) == "\n"
    assert sorted(out(cli("KEYS", "[bc]", options=("--raw",))).split()) == ["b", "c"]
    lines = out(cli("SCAN", "0", "*", "1000", options=("--raw",))).splitlines()
    assert lines[0]  # the next cursor comes first
    assert out(cli("PING")).strip() == "PONG"


@pytest.mark.timeout(60)
def test_direct_routes_on_the_client(cli: Run, shared: Cluster) -> None:
    """``zkv cli --direct``: the same commands, the same answers, routed on the client."""
    direct = ("--direct", "--raw")
    assert out(cli("SET", "cli-direct", "yes", options=direct)).strip() == "OK"
    assert out(cli("GET", "cli-direct", options=("--raw",))).strip() == "yes"  # via the proxy
    assert out(cli("MSET", "d1", "1", "d2", "2", options=direct)).strip() == "OK"
    assert out(cli("MGET", "d1", "nope", "d2", options=direct)).split("\n") == ["1", "", "2", ""]
    assert out(cli("DEL", "d1", options=direct)).strip() == "1"
    assert "epoch" in out(cli("STATUS", options=("--direct",)))  # the proxy's own command
    done = cli("GET", options=("--direct",))
    assert done.returncode == 2 and b"Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_cluster_commands(cli: Run, shared: Cluster) -> None:
    nodes = out(cli("NODES", options=("--raw",))).splitlines()
    assert sorted(line.split()[0] for line in nodes) == sorted(shared.node_addrs)
    assert all(line.split()[1] == "up" for line in nodes)
    table = out(cli("NODES"))
    assert all(addr in table for addr in shared.node_addrs) and "share" in table
    ring = out(cli("RING", "{user1}.a", options=("--raw",)))
    owner = [line for line in ring.splitlines() if line.startswith("owner:")]
    assert owner and owner[0].split(":", 1)[1] == shared.client().ring("{user1}.b")["owner"]
    assert "totals" in out(cli("INFO"))
    assert "epoch" in out(cli("STATUS"))


@pytest.mark.timeout(60)
def test_exit_status_and_one_line_errors(cli: Run, shared: Cluster) -> None:
    # usage mistakes: 2
    for words in (["GET"], ["NOPE", "x"], ["MSET", "a"], ["SCAN", "0", "*", "zero"],
                  ["SCAN", "0", "*", "²"], ["ADD", "127.0.0.1:1", "--weight=²"]):
        done = cli(*words)
        assert done.returncode == 2, (words, done)
        assert b"(error)" in done.stderr and done.stdout == b""
        no_traceback(done)
    # errors from the server: 1
    done = cli("SET", "k" * 65, "v")
    assert done.returncode == 1 and b"TOO_LARGE" in done.stderr
    assert len(done.stderr.decode().strip().splitlines()) == 1
    done = cli("SET", "k", "v" * 4097)
    assert done.returncode == 1 and b"TOO_LARGE" in done.stderr
    done = cli("SCAN", "garbage-cursor")
    assert done.returncode == 1 and b"BAD_COMMAND" in done.stderr
    no_traceback(done)


@pytest.mark.timeout(60)
def test_an_unreachable_proxy_exits_1(cli: Run) -> None:
    """As redis-cli: "Connection refused" at once, not after the timeout (here 60 s)."""
    nowhere = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = cli("GET", "k", proxy=nowhere, options=("--timeout", "60"))
    assert time.monotonic() - started < 10
    assert done.returncode == 1 and b"Connection refused" in done.stderr
    assert nowhere.encode() in done.stderr
    no_traceback(done)
    done = cli("SET", "k", "v", proxy=nowhere, options=("--timeout", "60", "--raw"))
    assert done.returncode == 1 and b"cannot connect" in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("options", [("--proxy", "localhost"), ("--proxy", "127.0.0.1:99999"),
                                     ("--proxy", ""), ("--timeout", "0"), ("--timeout", "soon"),
                                     ("--no-such-flag",)])
def test_bad_options_are_usage_errors(env: dict[str, str], options: tuple[str, ...]) -> None:
    done = subprocess.run([sys.executable, "-m", "zkv", "cli", *options, "GET", "k"],
                          cwd=REPO, env=env, capture_output=True, timeout=30, check=False)
    assert done.returncode == 2, done
    no_traceback(done)
    assert options[0].encode() in done.stderr
    assert b"usage: zkv [-h] COMMAND" not in done.stderr  # zkv cli's own usage, if any


def test_help_one_shot(cli: Run) -> None:
    done = cli("HELP", "GET")
    assert done.returncode == 0 and "GET KEY" in out(done)
    listing = out(cli("HELP"))
    for name in ("SET", "GET", "DEL", "MGET", "MSET", "SCAN", "NODES", "EXIT"):
        assert name in listing
    assert "XGET" not in listing  # internal commands are not advertised


# -- the interactive shell in a pseudo-terminal ---------------------------------------------


def _default_sigint() -> None:
    """In the shell's process before it starts: Ctrl-C as a terminal user has it. A
    test run started in the background by a non-interactive shell (``cmd &``) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt for it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def shell(shared: Cluster, env: dict[str, str]) -> Iterator[Callable[..., pexpect.spawn]]:
    made: list[pexpect.spawn] = []

    def spawn(proxy: str | None = None) -> pexpect.spawn:
        child = pexpect.spawn(
            sys.executable, ["-m", "zkv", "cli", "--proxy", proxy or shared.address],
            cwd=str(REPO), env=env, timeout=10, encoding="utf-8", dimensions=(50, 160),
            preexec_fn=_default_sigint,
        )
        made.append(child)
        child.expect_exact("type HELP")
        prompt(child)
        return child

    try:
        yield spawn
    finally:
        for child in made:
            child.close(force=True)


def prompt(child: pexpect.spawn) -> str:
    """Wait for the next prompt; the output since the last one."""
    child.expect(r"zkv [^\r\n]*> ")
    return str(child.before)


def command(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    return prompt(child)


@pytest.mark.timeout(60)
def test_shell_seed_session(shell: Callable[..., pexpect.spawn], shared: Cluster,
                            env: dict[str, str]) -> None:
    child = shell()
    assert "OK" in command(child, "SET username Alice")
    assert "Alice" in command(child, "GET username")
    assert "GET KEY" in command(child, "HELP GET")
    child.sendline("EXIT")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert shared.client().get("username") == b"Alice"
    history = Path(env["HOME"], ".zkv_history").read_text()
    assert "SET username Alice" in history and "GET username" in history


@pytest.mark.timeout(60)
def test_shell_quoting_errors_completion_and_eof(shell: Callable[..., pexpect.spawn],
                                                 shared: Cluster) -> None:
    child = shell()
    assert "OK" in command(child, 'SET greeting "hello world"')
    assert "hello world" in command(child, "GET greeting")
    assert shared.client().get("greeting") == b"hello world"
    assert "OK" in command(child, "set 'it''s' 'a \"quoted\" value'")
    assert shared.client().get("its") == b'a "quoted" value'
    # mistakes are reported and the shell goes on
    assert "usage: GET KEY" in command(child, "GET")
    assert "unknown command" in command(child, "FROB x")
    assert "cannot parse" in command(child, 'SET x "unterminated')
    assert "TOO_LARGE" in command(child, "SET " + "k" * 65 + " v")
    assert command(child, "").strip() == ""
    # tab completion of command names
    child.send("STRL\t")  # (a unique prefix: GE is GET, GETSET, GETDEL and GETEX)
    child.expect_exact("STRLEN ")
    child.sendline("greeting")
    assert "11" in prompt(child)
    assert "nodes" in command(child, "NODES")
    # Ctrl-C abandons the line, Ctrl-D leaves with status 0
    child.send("GET half-typed")
    child.expect_exact("GET half-typed")
    # as a person would: CPython's readline misses a SIGINT that lands while it is
    # still handling the keys before it (it only checks for signals in its select)
    time.sleep(0.3)
    child.sendintr()
    try:
        child.expect(r"zkv [^\r\n]*> ", timeout=3)
    except pexpect.TIMEOUT:  # the key was missed: send what the terminal sends for it
        child.kill(signal.SIGINT)
        prompt(child)
    assert "PONG" in command(child, "PING") and child.isalive()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.timeout(60)
def test_shell_survives_an_unreachable_proxy() -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    child = pexpect.spawn(
        sys.executable,
        ["-m", "zkv", "cli", "--proxy", nowhere, "--timeout", "0.3"],
        cwd=str(REPO), env={**os.environ, "HOME": "/nonexistent-home"}, timeout=10,
        encoding="utf-8",
    )
    try:
        prompt(child)
        assert "Connection refused" in command(child, "GET k")
        assert "Connection refused" in command(child, "SET k v")
        child.sendline("QUIT")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_client_and_cli_agree_on_the_value(cli: Run, shared: Cluster) -> None:
    shared.client().set("from-client", zkv.__version__)
    assert cli("GET", "from-client", options=("--raw",)).stdout.decode().strip() == \
        zkv.__version__


# -- watching: --stat and --latency ------------------------------------------------------


@pytest.mark.timeout(60)
def test_stat_prints_a_line_per_interval(cli: Run, shared: Cluster) -> None:
    c = shared.client()
    c.mset({f"stat:{i}": "x" for i in range(30)})
    done = cli(options=("--stat", "--count", "3", "-i", "0.2"))
    assert done.returncode == 0, done.stderr
    no_traceback(done)
    lines = out(done).splitlines()
    assert lines[0].split() == ["keys", "mem", "rss", "clients", "requests", "req/s",
                                "errors", "nodes", "epoch"]
    rows = [line.split() for line in lines[1:]]
    assert len(rows) == 3
    keys = c.info()["totals"]["keys"]
    assert all(int(r[0]) >= 30 for r in rows) and int(rows[-1][0]) <= keys
    assert rows[-1][7] == f"{len(shared.node_addrs)}/{len(shared.node_addrs)}"
    assert int(rows[2][4]) > int(rows[0][4])  # each INFO is a request too
    assert rows[1][5].isdigit()  # requests per second from the second line on


@pytest.mark.timeout(60)
def test_latency_reports_min_max_avg(cli: Run) -> None:
    done = cli(options=("--latency", "--count", "2"))
    assert done.returncode == 0, done.stderr
    lines = out(done).splitlines()
    assert len(lines) == 2
    for line in lines:
        m = re.fullmatch(r"min: ([\d.]+), max: ([\d.]+), avg: ([\d.]+) \((\d+) samples\)", line)
        assert m, line
        low, high, avg, n = float(m[1]), float(m[2]), float(m[3]), int(m[4])
        assert 0 < low <= avg <= high and n > 10


@pytest.mark.timeout(30)
def test_watching_takes_no_command_and_needs_a_server(cli: Run, shared: Cluster) -> None:
    done = cli("GET", "x", options=("--stat",))
    assert done.returncode == 2 and b"take no command" in done.stderr + done.stdout
    done = cli(options=("--stat", "--latency"))
    assert done.returncode == 2
    done = cli(options=("--latency", "--count", "1", "--timeout", "0.3"),
               proxy=f"127.0.0.1:{free_port()}")
    assert done.returncode != 0
    no_traceback(done)
    done = cli(options=("--stat", "--count", "1"), proxy=shared.node_addrs[0])
    assert done.returncode == 1 and "not a proxy" in out(done)


@pytest.mark.timeout(90)
def test_add_shows_each_streams_true_counts(make_cluster: Any, tmp_path: Path) -> None:
    """A stream with nothing to copy shows 0/0 keys, not 1/0 (the full bar is drawn
    without changing the count)."""
    cluster = make_cluster(nodes=2)
    port = free_port()
    cluster.procs.node(port, str(tmp_path / "new"))
    done = subprocess.run([sys.executable, "-m", "zkv", "cli", "--proxy", cluster.address,
                           "ADD", f"127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done
    # (a move this small may end before a poll sees its totals: then they show as ?)
    counts = re.findall(r"(\d+)/(\d+|\?) keys", done.stdout)
    assert counts and all(a == "0" and b in ("0", "?") for a, b in counts), done.stdout
