"""Fixtures shared by the tests: free ports, real zkv processes, raw sockets.

Every process a test starts is killed in a finaliser; every socket closes with
linger 0; every receive has a timeout, so a broken build fails instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from zkv import protocol as P

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A zkv process started by a test, with its output collected in the background."""

    def __init__(self, args: list[str], cwd: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "zkv", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.popen.poll() is not None:
                time.sleep(0.1)  # let the reader catch the last lines
                for line in list(self.lines):
                    if text in line:
                        return line
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before printing {text!r}:\n"
                    + self.output
                )
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(2)
        return code

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; kill -9 if it does not stop."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                return self.wait_exit(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


class Procs:
    def __init__(self, cwd: str) -> None:
        self.cwd = cwd
        self.all: list[Proc] = []

    def start(self, *args: str, ready: str | None = None, timeout: float = 20.0,
              env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), self.cwd, env)
        self.all.append(proc)
        if ready is not None:
            proc.wait_for(ready, timeout)
        return proc

    def node(self, port: int, data_dir: str, *extra: str, ready: bool = True) -> Proc:
        return self.start(
            "node", "--port", str(port), "--data-dir", data_dir, *extra,
            ready="zkv node" if ready else None,
        )

    def close(self) -> None:
        for proc in self.all:
            try:
                proc.signal(signal.SIGCONT)
                proc.kill()
            except Exception:
                pass


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    manager = Procs(str(tmp_path))
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


class Raw:
    """A bare DEALER socket for sending hand-made frames, with receive timeouts."""

    def __init__(self, ctx: zmq.Context[Any], addr: str, timeout_ms: int = 5000) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.sock.connect(f"tcp://{addr}")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([b"", *frames])

    def recv(self) -> list[bytes]:
        try:
            frames = self.sock.recv_multipart()
        except zmq.Again:
            raise AssertionError("no reply within the timeout") from None
        assert frames[0] == b"", frames
        return frames[1:]

    def call(self, op: str, *args: Any) -> Any:
        self.send(P.encode_request(op, *args))
        return P.decode_reply(self.recv()[-1])

    def close(self) -> None:
        self.sock.close(0)


@pytest.fixture
def raw(zctx: zmq.Context[Any]) -> Iterator[Any]:
    made: list[Raw] = []

    def connect(addr: str, timeout_ms: int = 5000) -> Raw:
        r = Raw(zctx, addr, timeout_ms)
        made.append(r)
        return r

    try:
        yield connect
    finally:
        for r in made:
            r.close()
