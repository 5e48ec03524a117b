"""``zkv top [--proxy HOST:PORT]``: a live full-screen view of a running cluster.

Refreshed every second from INFO, NODES and STATUS through the proxy (the ZeroMQ
front; no metrics port needed): per node its state, ops/s, p50/p99 service time
(from the node's sampled latency histogram, over the last refresh), keys, memory,
log size and errors/s; per proxy requests/s and errors/s; a move under way with its
phase. Nodes in trouble (down, erroring, slow) sort first and are coloured. ``q``
(or Ctrl-C) quits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from typing import Any

from .client import Client
from .core.timings import quantile
from .errors import ConfigError, ZkvError
from .watch import human

SLOW = 0.01  # a node whose p99 is over this many seconds is shown as slow


class Sampler:
    """Turns successive INFO replies into rates and recent latencies."""

    def __init__(self) -> None:
        self.last: dict[str, Any] | None = None
        self.last_at = 0.0
        self._streams: tuple[dict[tuple[str, str], int], float] = ({}, 0.0)

    def rows(self, info: dict[str, Any], nodes: list[dict[str, Any]],
             now: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        before = self.last or {}
        span = now - self.last_at if self.last is not None else 0.0
        out = []
        for entry in nodes:
            addr = entry["address"]
            # INFO is by shard (its primary answers); a replica's row has NODES' figures
            key = entry.get("shard", addr) if entry.get("role", "primary") == "primary" \
                else addr
            node = info.get("nodes", {}).get(key, {})
            old = before.get("nodes", {}).get(key, {})
            ops = sum(node.get("ops", {}).values()) if "ops" in node else None
            old_ops = sum(old.get("ops", {}).values()) if "ops" in old else None
            buckets = node.get("latency_buckets")
            old_buckets = old.get("latency_buckets") or [0] * len(buckets or [])
            recent = ([a - b for a, b in zip(buckets, old_buckets)]
                      if buckets and span else buckets)
            row = {
                "address": addr, "state": entry.get("state", "?"),
                "role": entry.get("moving") or _role(entry),
                "keys": node.get("keys", entry.get("keys")), "memory": node.get("rss_bytes"),
                "log": node.get("log_bytes"),
                "ops_s": _rate(ops, old_ops, span),
                "errors_s": _rate(node.get("errors"), old.get("errors"), span),
                "p50": quantile(recent, 0.5) if recent else None,
                "p99": quantile(recent, 0.99) if recent else None,
            }
            row["trouble"] = (row["state"] != "up") * 4 + bool(row["errors_s"]) * 2 + (
                (row["p99"] or 0) > SLOW) + (entry.get("role") == "replica"
                                             and not entry.get("in_sync"))
            out.append(row)
        out.sort(key=lambda r: (-r["trouble"], r["address"]))
        proxy, old_proxy = info.get("proxy", {}), before.get("proxy", {})
        summary = {
            "address": proxy.get("address"), "epoch": proxy.get("epoch"),
            "requests_s": _rate(proxy.get("requests"), old_proxy.get("requests"), span),
            "errors_s": _rate(proxy.get("errors"), old_proxy.get("errors"), span),
            "clients": int(proxy.get("clients", 0)) + int(proxy.get("resp_clients", 0)),
            "keys": info.get("totals", {}).get("keys"),
        }
        self.last, self.last_at = info, now
        return out, summary

    def stream_rates(self, status: dict[str, Any], now: float) -> dict[tuple[str, str], float]:
        """Keys per second of each stream of the move under way, since the last call."""
        move = status.get("move") or {}
        keys = {(s.get("source", ""), s.get("dest", "")): int(s.get("keys") or 0)
                for s in move.get("streams", [])}
        before, at = self._streams
        self._streams = (keys, now)
        span = now - at
        return {pair: max(0, n - before[pair]) / span for pair, n in keys.items()
                if pair in before and span > 0}


def _role(entry: dict[str, Any]) -> str:
    """A NODES row's role: member, or in a replicated shard primary / replica (with its
    replication state and lag)."""
    role = entry.get("role")
    if role != "replica":
        return str(role or "member")
    lag = entry.get("lag_s")
    return f"replica {entry.get('replication', '?')}" + (f" {lag:.2f}s" if lag else "")


def _rate(now_value: Any, before: Any, span: float) -> float | None:
    if not isinstance(now_value, int) or not isinstance(before, int) or span <= 0:
        return None
    return max(0, now_value - before) / span


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return ">10000"
    return f"{seconds * 1000:.2f}" if seconds < 0.01 else f"{seconds * 1000:.0f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def render(rows: list[dict[str, Any]], summary: dict[str, Any], status: dict[str, Any],
           proxy: str) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"zkv top  proxy {proxy}  epoch {summary['epoch']}  "
                f"{_num(summary['requests_s'])} req/s  {_num(summary['errors_s'])} err/s  "
                f"{summary['clients']} clients  {_num(summary['keys'])} keys   (q quits)",
                style="bold")
    # (no borders, one space between columns: 80 columns fit a cluster's rows, and a
    # wider terminal gets them unchanged rather than stretched)
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0), header_style="bold")
    widest = max([len(r["address"]) for r in rows] + [4])
    table.add_column("node", no_wrap=True, min_width=widest)  # never cut an address
    for name in ("state", "role", "ops/s", "p50ms", "p99ms", "keys", "memory", "log",
                 "err/s"):
        table.add_column(name, justify="left" if name in ("state", "role") else "right",
                         no_wrap=True)
    for r in rows:
        style = "bold red" if r["state"] != "up" else (
            "yellow" if r["trouble"] else "")
        table.add_row(r["address"], r["state"], r["role"], _num(r["ops_s"]), _ms(r["p50"]),
                      _ms(r["p99"]), _num(r["keys"]),
                      human(r["memory"]) if r["memory"] is not None else "-",
                      human(r["log"]) if r["log"] is not None else "-",
                      _num(r["errors_s"]), style=style)
    parts: list[Any] = [head, table]
    move = status.get("move")
    if move:
        parts.append(Text(f"move {move.get('id', '')}: {move.get('kind', '')} "
                          f"{move.get('node', '')}, phase {move.get('phase', '')}"
                          + (" (aborting)" if move.get("aborting") else "")
                          + (f", error: {move['error']}" if move.get("error") else ""),
                          style="cyan"))
        parts.append(_streams(move.get("streams", []), summary.get("stream_rates", {})))
    return Group(*parts)


def _streams(streams: list[dict[str, Any]], rates: dict[tuple[str, str], float]) -> Any:
    """A move's streams, each with a bar (keys sent of its total) and its rate."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    table = Table(show_header=True, box=None, expand=True)
    for name in ("stream", "progress", "keys", "keys/s"):
        table.add_column(name, justify="right" if name in ("keys", "keys/s") else "left",
                         ratio=3 if name == "progress" else None)
    for st in streams:
        total = st.get("total")
        done = bool(st.get("done"))
        keys = int(st.get("keys") or 0)
        bar = ProgressBar(total=float(total or max(keys, 1)),
                          completed=float(total or keys) if done else float(keys))
        rate = rates.get((st.get("source", ""), st.get("dest", "")))
        table.add_row(f"{st.get('source')} -> {st.get('dest')}", bar,
                      f"{keys:,}" + (f" / {total:,}" if total else ""),
                      "done" if done else _num(rate))
    return table


def run(proxy: str, interval: float, count: int | None) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console(highlight=False)  # addresses as typed, not split by colouring
    if not console.is_terminal:  # piped: rich's 80 columns would cut the table short
        from .cli import WIDE

        console = Console(highlight=False, width=max(console.width, WIDE))
    sampler = Sampler()
    client = Client(proxy, timeout=max(2.0, interval * 2))
    stdin = sys.stdin
    keys = stdin.isatty()
    saved = termios.tcgetattr(stdin) if keys else None
    shown = 0
    failed = False
    try:
        if keys:
            tty.setcbreak(stdin.fileno())
        # on a terminal, one screen redrawn; into a pipe or file, each frame printed in
        # turn, as top -b does (a Live display off a terminal shows only its last frame,
        # at the end: without --count, never)
        live = Live(console=console, screen=True, auto_refresh=False) \
            if console.is_terminal else None

        def show(frame: Any) -> None:
            if live is not None:
                live.update(frame, refresh=True)
            else:
                console.print(frame)

        with live if live is not None else contextlib.nullcontext():
            while count is None or shown < count:
                try:
                    info, nodes, status = client.info(), client.nodes(), client.status()
                except (ZkvError, AttributeError, KeyError, TypeError) as exc:
                    from rich.text import Text

                    failed = True
                    what = exc if isinstance(exc, ZkvError) else "not a zkv proxy"
                    if not shown:  # (nothing to watch: say so once and stop, as top does;
                        # a proxy lost later is shown until it is back)
                        raise _NothingToWatch(f"zkv top: error: {proxy}: {what}") from None
                    show(Text(f"zkv top: {proxy}: {what}", style="bold red"))
                else:
                    failed = False
                    now = time.monotonic()
                    rows, summary = sampler.rows(info, nodes, now)
                    summary["stream_rates"] = sampler.stream_rates(status, now)
                    show(render(rows, summary, status, proxy))
                shown += 1
                if _wait_for_q(stdin if keys else None, interval):
                    break
    except KeyboardInterrupt:
        pass
    except _NothingToWatch as exc:
        print(exc, file=sys.stderr)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        client.close()
    return 1 if failed else 0


class _NothingToWatch(Exception):
    """The first look at the proxy failed: there is nothing to show."""


def _wait_for_q(stdin: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if stdin is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([stdin], [], [], left)
        if ready and os.read(stdin.fileno(), 1) in (b"q", b"Q"):
            return True


def main(args: argparse.Namespace) -> int:
    from .config import parse_address

    try:
        parse_address(args.proxy, "--proxy")
    except ConfigError as exc:
        print(f"zkv top: error: {exc}", file=sys.stderr)
        return 2
    return run(args.proxy, args.interval, args.count)


def add_parser(sub: Any) -> None:
    from .cli import _count, _seconds

    p = sub.add_parser("top", help="a live view of a running cluster (q quits)")
    p.add_argument("--proxy", default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="the proxy to watch (default 127.0.0.1:8000)")
    p.add_argument("-i", "--interval", type=_seconds, default=1.0,
                   help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=_count, default=None, metavar="N",
                   help="stop after N refreshes (default: until q)")
    p.set_defaults(func=main)
