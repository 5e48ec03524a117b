"""``zkv cli --stat`` and ``zkv cli --latency``: a cluster watched from a terminal, as
``redis-cli --stat`` and ``--latency`` watch a Redis server.

``--stat`` prints a line a second from INFO through the proxy: keys, memory, clients,
requests (and per second), errors, nodes up. ``--latency`` sends PING after PING and
keeps min, max and average round-trip times in milliseconds, on one line. Both run
until Ctrl-C (or for ``--count`` lines/seconds).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .client import Client
from .errors import ZkvError

HEADER = (f"{'keys':>12} {'mem':>9} {'rss':>9} {'clients':>8} {'requests':>14} "
          f"{'req/s':>9} {'errors':>8} {'nodes':>7} {'epoch':>6}")


def human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return str(n)


def stat_line(info: dict[str, Any], previous: tuple[float, int] | None,
              now: float) -> tuple[str, tuple[float, int]]:
    """One --stat line from an INFO reply (and the last line's time and request count)."""
    proxy = info.get("proxy", {})
    totals = info.get("totals", {})
    nodes = info.get("nodes", {})
    requests = int(proxy.get("requests", 0))
    rate = ""
    if previous is not None and now > previous[0]:
        rate = f"{max(0, requests - previous[1]) / (now - previous[0]):.0f}"
    up = sum(1 for n in nodes.values() if "error" not in n)
    clients = int(proxy.get("clients", 0)) + int(proxy.get("resp_clients", 0))
    line = (f"{totals.get('keys', 0):>12} {human(totals.get('live_bytes', 0)):>9} "
            f"{human(proxy.get('rss_bytes', 0) + totals.get('rss_bytes', 0)):>9} "
            f"{clients:>8} {requests:>14} {rate:>9} {proxy.get('errors', 0):>8} "
            f"{f'{up}/{len(nodes)}':>7} {proxy.get('epoch', 0):>6}")
    return line, (now, requests)


def stat(client: Client, interval: float, count: int | None, out: TextIO = sys.stdout) -> int:
    """Exit status 1 when the last INFO failed (or the address is not a proxy's)."""
    previous = None
    lines = 0
    failed = False
    while count is None or lines < count:
        if lines % 20 == 0:
            out.write(HEADER + "\n")
        try:
            info = client.info()
        except ZkvError as exc:
            out.write(f"error: {exc}\n")
            failed = True
        else:
            if "proxy" not in info:
                out.write("error: this is not a proxy (a storage node?): --stat watches a "
                          "cluster through its proxy\n")
                return 1
            line, previous = stat_line(info, previous, time.monotonic())
            out.write(line + "\n")
            failed = False
        out.flush()
        lines += 1
        if count is None or lines < count:
            time.sleep(interval)
    return 1 if failed else 0


def latency(client: Client, count: int | None, out: TextIO = sys.stdout) -> int:
    """PING after PING; a line a second with min, max, avg (ms) and the samples so far."""
    tty = out.isatty()
    samples = 0
    total = 0.0
    low, high = float("inf"), 0.0
    shown = 0
    next_show = time.monotonic() + 1.0
    errors = 0
    while True:
        began = time.perf_counter()
        try:
            client.ping()
        except ZkvError as exc:
            errors += 1
            out.write(f"\nerror: {exc}\n" if tty and samples else f"error: {exc}\n")
            out.flush()
            if not samples:  # never reached: nothing to measure
                return 1
            time.sleep(0.5)
        else:
            ms = (time.perf_counter() - began) * 1000
            samples += 1
            total += ms
            low, high = min(low, ms), max(high, ms)
        now = time.monotonic()
        if now >= next_show and samples:
            next_show = now + 1.0
            line = (f"min: {low:.2f}, max: {high:.2f}, avg: {total / samples:.2f} "
                    f"({samples} samples)")
            out.write(("\r" + line) if tty else line + "\n")
            out.flush()
            shown += 1
            if count is not None and shown >= count:
                if tty:
                    out.write("\n")
                return 0 if not errors else 1
        time.sleep(0.01)  # as redis-cli: about a hundred samples a second
