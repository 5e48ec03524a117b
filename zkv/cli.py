"""``zkv cli``: a terminal client in the manner of redis-cli.

    zkv cli                          interactive shell (history, HELP, tab completion)
    zkv cli SET username Alice       run one command and exit
    zkv cli --raw GET username       unstyled output, for scripts

Exit status of a one-shot command: 0 on success, 1 when the server answered
with an error or could not be reached in time, 2 for a usage mistake.
Arguments are split as a shell does, so quote values with spaces:
``SET greeting "hello world"``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from .client import Client, MoveHandle, wait_in_sync
from .core import protocol as P
from .errors import ConfigError, ZkvError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
HISTORY = os.path.expanduser("~/.zkv_history")


class UsageError(Exception):
    pass


def parse_command(tokens: list[str]) -> tuple[str, list[Any]]:
    """Typed tokens -> (op, args) for Client.call, or UsageError saying what is wrong."""
    if not tokens:
        raise UsageError("empty command")
    op = tokens[0].upper()
    cmd = P.COMMANDS.get(op)
    if cmd is None or cmd.kind == P.INTERNAL:
        raise UsageError(f"unknown command '{tokens[0]}'; type HELP for the list")
    if op == "PIPE":
        raise UsageError("PIPE is sent by client libraries (zkv.Client.pipeline()); "
                         "in the shell, run the commands one at a time")
    rest = tokens[1:]
    kinds = [k.rstrip("?") for k in cmd.user_args]
    if kinds in (["keys"], ["pairs"]):
        if not rest or (kinds == ["pairs"] and len(rest) % 2):
            raise UsageError(f"usage: {cmd.usage}")
        return op, [[_bytes(t) for t in rest]]
    if kinds[-1:] == ["options"]:
        return op, _admin_args(cmd, rest)
    if kinds[-1:] in (["setopts"], ["getexopts"]):  # SET and GETEX: Redis's option words
        fixed = len(kinds) - 1
        if len(rest) < fixed:
            raise UsageError(f"wrong number of arguments; usage: {cmd.usage}")
        try:
            opts = P.options_from_words(op, [_bytes(t) for t in rest[fixed:]])
        except ZkvError as exc:
            raise UsageError(f"{exc}; usage: {cmd.usage}") from None
        return op, [_bytes(t) for t in rest[:fixed]] + ([opts] if opts else [])
    if kinds[-1:] == ["expireflag"] and len(rest) == len(kinds) + 1:
        rest = [*rest[:-2], f"{rest[-2]} {rest[-1]}"]  # (XX GT, XX LT: one flag on the wire)
    if not cmd.required <= len(rest) <= len(cmd.user_args):
        raise UsageError(f"wrong number of arguments; usage: {cmd.usage}")
    args: list[Any] = []
    for kind, token in zip(kinds, rest):
        if kind == "count":
            if not _digits(token) or int(token) < 1:
                raise UsageError(f"COUNT must be a positive integer, not {token!r}")
            args.append(int(token))
        elif kind in ("cursor", "addr", "replica_action"):
            args.append(token)
        else:
            args.append(_bytes(token))
    return op, args


def _bytes(token: str) -> bytes:
    """An argument's bytes: those of the command line or the terminal, as typed (bytes
    that are not UTF-8 come through Python as surrogates, and go back as they came)."""
    return token.encode("utf-8", "surrogateescape")


def _digits(token: str) -> bool:
    """ASCII digits only (str.isdigit takes '²' and other digits int() refuses)."""
    return token.isascii() and token.isdigit()


ADMIN_FLAGS = {"ADD": ("dry-run", "rate", "weight"), "REMOVE": ("dry-run", "rate", "force"),
               "MOVE": ("force",), "FAILOVER": ("force",)}


def _admin_args(cmd: P.Command, rest: list[str]) -> list[Any]:
    flags = [t for t in rest if t.startswith("--")]
    plain = [t for t in rest if not t.startswith("--")]
    allowed = ADMIN_FLAGS.get(cmd.name, ())
    shown = " ".join(f"[--{f}{'=N' if f in ('rate', 'weight') else ''}]" for f in allowed)
    first = {"MOVE": "ABORT", "FAILOVER": "SHARD [HOST:PORT]"}.get(cmd.name, "HOST:PORT")
    if not 1 <= len(plain) <= (2 if cmd.name == "FAILOVER" else 1):
        raise UsageError(f"usage: {cmd.name} {first} {shown}")
    options: dict[str, Any] = {}
    for flag in flags:
        name, _, value = flag[2:].partition("=")
        if name not in allowed:
            raise UsageError(f"unknown option {flag!r}; {cmd.name} takes {shown}")
        if name in ("dry-run", "force"):
            if value:
                raise UsageError(f"--{name} takes no value")
            options[name.replace("-", "_")] = True
        elif _digits(value.replace(".", "", 1)):
            options[name] = float(value)
        else:
            raise UsageError(f"--{name} needs a number: --{name}=N")
    if cmd.name == "FAILOVER":
        if options and len(plain) < 2:
            raise UsageError("FAILOVER --force needs the node to promote: FAILOVER SHARD "
                             "HOST:PORT --force")
        return [*plain, options] if options else plain
    if cmd.name == "MOVE" and plain[0].upper() != "ABORT":
        raise UsageError(f"usage: MOVE ABORT {shown}")
    return [plain[0].upper() if cmd.name == "MOVE" else plain[0], options]


def text(value: bytes) -> str:
    """A value as the shell shows it: quoted text, or escaped bytes when not UTF-8."""
    try:
        return '"' + value.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
    except UnicodeDecodeError:
        return repr(value)[1:]


WIDE = 200  # columns for tables printed into a pipe or a file


class Printer:
    """Renders results: rich styling for people, plain lines with --raw."""

    def __init__(self, raw: bool, console: Console | None = None) -> None:
        self.raw = raw
        if console is None:
            console = Console(highlight=False, soft_wrap=True)
            if not console.is_terminal:  # piped: rich's 80 columns would cut tables short
                console = Console(highlight=False, soft_wrap=True,
                                  width=max(console.width, WIDE))
        self.console = console

    def out(self, line: str) -> None:
        if self.raw:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        else:
            self.console.print(line, markup=False)

    def value(self, value: bytes | None) -> None:
        if self.raw:
            sys.stdout.buffer.write((value or b"") + b"\n")
            sys.stdout.flush()
        else:
            shown = "(nil)" if value is None else text(value)
            self.console.print(shown, style="bold" if value else "dim", markup=False)

    def warn(self, line: str) -> None:
        """Something the user must know of a command that succeeded (stderr)."""
        if self.raw:
            sys.stderr.write(f"warning: {line}\n")
        else:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"warning: {line}", style="yellow", markup=False)

    def error(self, exc: ZkvError | UsageError) -> None:
        code = getattr(exc, "code", "USAGE")
        if self.raw:
            sys.stderr.write(f"(error) {code} {exc}\n")
        else:
            Console(stderr=True, highlight=False, soft_wrap=True).print(
                f"(error) {code} {exc}", style="red", markup=False)

    def result(self, op: str, result: Any) -> None:
        show: Callable[[Any], None] = getattr(self, f"_{op.lower()}", self._default)
        show(result)

    def _default(self, result: Any) -> None:
        if isinstance(result, bytes) or result is None:
            self.value(result)
        elif isinstance(result, bool) or isinstance(result, int):
            self.out(str(int(result)) if self.raw else f"(integer) {int(result)}")
        elif isinstance(result, list):
            self._list(result)
        elif isinstance(result, dict):
            self._mapping(result)
        else:
            self.out(str(result))

    _get = _default

    def _list(self, items: list[Any]) -> None:
        if not items:
            self.out("" if self.raw else "(empty list)")
        for i, item in enumerate(items, 1):
            if self.raw:
                data = (b"" if item is None else item if isinstance(item, bytes)
                        else str(item).encode())
                sys.stdout.buffer.write(data + b"\n")  # nil is an empty line, as in redis-cli
                sys.stdout.flush()
            else:
                shown = ("(nil)" if item is None else text(item) if isinstance(item, bytes)
                         else str(item))
                self.console.print(f"{i}) {shown}", markup=False)

    def _scan(self, result: Any) -> None:
        cursor, keys = result
        self.out(cursor if self.raw else f"cursor: {cursor}")
        self._list(keys)

    def _mapping(self, data: dict[str, Any], title: str | None = None) -> None:
        if self.raw:
            for k, v in data.items():
                self.out(f"{k}:{v}")
            return
        table = Table(title=title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="cyan")
        table.add_column()
        for k, v in data.items():
            table.add_row(str(k), self._cell(v))
        self.console.print(table)

    def _cell(self, v: Any) -> str:
        if isinstance(v, bytes):
            return text(v)
        if isinstance(v, dict):
            return ", ".join(f"{k}={x}" for k, x in v.items())
        return "-" if v is None else str(v)

    def _info(self, info: dict[str, Any]) -> None:
        if "nodes" not in info:
            return self._mapping(info)
        self._mapping(info["proxy"], title="proxy")
        self._mapping(info.get("totals", {}), title="totals")
        for addr, node in info["nodes"].items():
            self._mapping(node, title=f"node {addr}")

    def _nodes(self, nodes: list[dict[str, Any]]) -> None:
        replicated = any("role" in n for n in nodes)
        if self.raw:
            raw_cols = ["address", "state", "keys", "share"]
            if replicated:
                raw_cols += ["shard", "role", "replication", "lag_s"]
            for n in nodes:
                self.out(" ".join(str(n.get(k, "-")) for k in raw_cols))
            return
        table = Table(title="nodes")
        weighted = any(n.get("weight", 1) != 1 for n in nodes)
        cols = ["address", "state", "keys", "share", "weight", "fsync"]
        if replicated:  # a shard's primary, then its replicas (rows come in that order)
            cols[2:2] = ["role", "replication", "lag"]
        if not weighted and replicated:
            cols.remove("weight")
        for col in cols:
            table.add_column(col, justify="right" if col in ("keys", "share", "weight", "lag")
                             else "left")
        for n in nodes:
            state = n["state"]
            cells = {
                "address": n["address"],
                "state": f"[green]{state}[/]" if state == "up" else f"[red]{state}[/]",
                "keys": "-" if n.get("keys") is None else f"{n['keys']:,}",
                "share": f"{n['share'] * 100:.1f}%",
                "weight": f"{n.get('weight', 1):g}",
                "fsync": n.get("fsync") or "-",
            }
            if replicated:
                replica = n.get("role") == "replica"
                repl = n.get("replication") or "?"
                colour = "green" if repl == "in_sync" else "red" if repl == "lost" else "yellow"
                cells["role"] = "└ replica" if replica else "primary"
                cells["replication"] = f"[{colour}]{repl}[/]" if replica or repl == "lost" \
                    else "-"
                cells["lag"] = "-" if n.get("lag_s") is None else f"{n['lag_s']:.2f}s"
            table.add_row(*(cells[c] for c in cols))
        self.console.print(table)

    def plan(self, op: str, addr: str, plan: dict[str, Any]) -> None:
        head = "would move" if plan.get("dry_run") else "moving"
        self.out(f"{op} {addr}: {head} {plan['moved'] * 100:.1f}% of the keys")
        for t in plan.get("transfers", []):
            self.out(f"  {t['source']} -> {t['dest']}: {t['fraction'] * 100:.1f}% of the key space")

    def follow(self, handle: MoveHandle) -> dict[str, Any]:
        """Poll the move's progress into a rich progress display until it finishes."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.fields[keys_text]}/{task.fields[total_text]} keys"),
            TextColumn("{task.fields[mib]:.1f} MiB"), TextColumn("{task.fields[rate]:,.0f} keys/s"),
            TimeElapsedColumn(),
        )
        tasks: dict[tuple[str, str], Any] = {}
        said: set[str] = set()
        with Progress(*columns, console=self.console, transient=False) as progress:
            def update(status: dict[str, Any]) -> None:
                error = status.get("error")
                if error and error not in said:  # (a step the move keeps retrying)
                    said.add(error)
                    progress.console.print(
                        f"move {status.get('phase', '')}: {error}; it is retried (STATUS "
                        "shows it; MOVE ABORT gives up the move)", markup=False,
                        highlight=False)
                elapsed = max(status.get("elapsed_s", 0.0), 1e-3)
                for st in status["streams"]:
                    pair = (st["source"], st["dest"])
                    if pair not in tasks:
                        tasks[pair] = progress.add_task(
                            f"{st['source']} -> {st['dest']}", total=None,
                            keys_text="0", total_text="?", mib=0.0, rate=0.0)
                    total = st.get("total")
                    keys = st["keys"]
                    if st["done"]:
                        total = keys if total is None else max(total, keys)
                    progress.update(
                        tasks[pair], completed=keys, total=total, keys_text=f"{keys:,}",
                        total_text=f"{total:,}" if total is not None else "?",
                        mib=st["bytes"] / 2**20, rate=keys / elapsed,
                    )
            final = handle.wait(on_progress=update)
            if final.get("streams"):  # (the counts the move ended with, not the last poll's)
                update({"streams": [dict(st, done=True) for st in final["streams"]],
                        "elapsed_s": final.get("elapsed_s") or 0.0})
            for task in tasks.values():
                t = progress.tasks[task]
                # (a full bar; the counts stay as they were: 0/0 for a stream with no keys)
                progress.update(task, total=t.completed or 1, completed=t.completed or 1)
        return final

    def _ring(self, data: dict[str, Any]) -> None:
        self._mapping(data)

    def _status(self, data: dict[str, Any]) -> None:
        move = data.get("move")
        self._mapping({k: v for k, v in data.items() if k != "move"})
        if not move:
            self.out("move: none")
            return
        self.out(f"move: {move['kind'].upper()} {move['node']} id={move['id']} "
                 f"phase={move['phase']} elapsed={move['elapsed_s']}s"
                 + (f" error={move['error']}" if move.get("error") else ""))
        for st in move["streams"]:
            total = "?" if st.get("total") is None else f"{st['total']:,}"
            self.out(f"  {st['source']} -> {st['dest']}: {st['keys']:,}/{total} keys, "
                     f"{st['bytes'] / 2**20:.1f} MiB{' done' if st['done'] else ''}")


def help_text(op: str | None = None) -> str:
    if op:
        cmd = P.COMMANDS.get(op.upper())
        if cmd is None or cmd.kind == P.INTERNAL:
            return f"unknown command '{op}'"
        return f"{cmd.usage}\n  {cmd.help}"
    lines = ["Commands (case-insensitive; quote values with spaces as in a shell):"]
    for cmd in P.USER_COMMANDS:
        if cmd.name == "PIPE":
            continue
        lines.append(f"  {cmd.usage:<42} {cmd.help}")
    lines.append("  HELP [COMMAND]                             This help.")
    lines.append("  EXIT | QUIT                                Leave the shell.")
    return "\n".join(lines)


def run_one(client: Client, printer: Printer, tokens: list[str]) -> int:
    """Run one command line; returns its exit status."""
    if tokens and tokens[0].upper() == "HELP":
        printer.out(help_text(tokens[1] if len(tokens) > 1 else None))
        return EXIT_OK
    try:
        op, args = parse_command(tokens)
    except UsageError as exc:
        printer.error(exc)
        return EXIT_USAGE
    try:
        if op in ("ADD", "REMOVE", "MOVE"):
            return run_admin(client, printer, op, args)
        if op == "REPLICA" and args[0] == "ADD":
            return run_replica_add(client, printer, args)
        result = client.call(op, *args)
    except ZkvError as exc:
        printer.error(exc)
        return EXIT_ERROR
    printer.result(op, result)
    if op == "NODES" and not printer.raw:
        try:
            move = client.status().get("move")
        except ZkvError:  # (a follower whose config manager is down: NODES was answered)
            move = None
        if move:
            printer.out(f"move under way: {move['kind'].upper()} {move['node']} "
                        f"(phase {move['phase']}); STATUS shows its progress")
    return EXIT_OK


def run_admin(client: Client, printer: Printer, op: str, args: list[Any]) -> int:
    """ADD/REMOVE: show the plan, then follow the move to its end with a progress bar.
    MOVE ABORT and REMOVE --force: say what happens (and what is lost), then follow."""
    plan: dict[str, Any] = client.call(op, *args)
    if op == "MOVE" or plan.get("forced"):
        if plan.get("lost"):
            printer.warn(f"{args[0]} removed by force: {plan['lost']} are LOST")
        if plan.get("message"):
            printer.out(f"{op} {args[0]}: {plan['message']}")
        # (MOVE ABORT's handle follows a rollback: its end is what was asked for)
        handle = MoveHandle(client, plan, rollback=op == "MOVE")
        if handle.id is None or handle.status() is None:
            printer.out(f"{op} {args[0]}: done (epoch {client.status()['epoch']})")
            return EXIT_OK
    else:
        printer.plan(op, args[0], plan)
        if plan.get("dry_run"):
            return EXIT_OK
        handle = MoveHandle(client, plan, op, args[0])
        if handle.id is None:
            printer.out(f"{op} {args[0]}: done (epoch {plan['epoch']}); there were no keys "
                        "to move")
            return EXIT_OK
    if printer.raw:
        final = handle.wait()
    else:
        final = printer.follow(handle)
    printer.out(f"{op} {args[0]}: done (epoch {final['epoch']})")
    return EXIT_OK


def run_replica_add(client: Client, printer: Printer, args: list[Any]) -> int:
    """REPLICA ADD: attach, then follow the sync with a progress bar until in sync."""
    reply = client.call("REPLICA", *args)
    shard, addr = reply["shard"], reply["replica"]
    printer.out(f"REPLICA ADD {addr}: joins shard {shard} (epoch {reply['epoch']}); syncing")
    if printer.raw or not printer.console.is_terminal:  # (a bar would leave a blank line)
        wait_in_sync(client, addr)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      console=printer.console, transient=True) as bar:
            task = bar.add_task(f"copying shard {shard} to {addr}", total=None)

            def shown(row: dict[str, Any], primary: int | None) -> None:
                bar.update(task, completed=row.get("keys") or 0, total=primary)

            wait_in_sync(client, addr, progress=shown)
    printer.out(f"REPLICA ADD {addr}: in sync (epoch {client.status()['epoch']})")
    return EXIT_OK


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # pragma: no cover - not on every platform
        return
    words = [c.name for c in P.USER_COMMANDS if c.name != "PIPE"] + ["HELP", "EXIT", "QUIT"]

    def complete(prefix: str, state: int) -> str | None:
        line = readline.get_line_buffer()
        if " " in line.lstrip():
            return None
        matches = [w + " " for w in words if w.startswith(prefix.upper())]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")
    try:
        readline.read_history_file(HISTORY)
    except OSError:
        pass
    import atexit

    def save() -> None:
        try:
            readline.write_history_file(HISTORY)
        except OSError:
            pass

    atexit.register(save)


def shell(client: Client, printer: Printer) -> int:
    _setup_readline()
    # (nothing is sent yet: the first command finds out whether the proxy is there)
    printer.out(f"zkv cli for {client.address}; type HELP for commands, EXIT to leave")
    prompt = f"zkv {client.address}> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            printer.out("")
            return EXIT_OK
        except KeyboardInterrupt:
            printer.out("")
            continue
        try:
            tokens = shlex.split(line)
        except ValueError as exc:
            printer.error(UsageError(f"cannot parse the line: {exc}"))
            continue
        if not tokens:
            continue
        if tokens[0].upper() in ("EXIT", "QUIT"):
            return EXIT_OK
        run_one(client, printer, tokens)


def main(args: argparse.Namespace) -> int:
    printer = Printer(args.raw)
    try:
        client = Client(args.proxy, timeout=args.timeout, direct=args.direct,
                        curve_key=args.curve_key, server_key=args.server_key)
    except ConfigError as exc:  # a bad --proxy or key file: a usage mistake
        printer.error(UsageError(str(exc) if args.curve_key or args.server_key
                                 else f"--proxy: {exc}"))
        return EXIT_USAGE
    with client:
        if args.stat or args.latency:
            from . import watch

            if args.words:
                printer.error(UsageError("--stat and --latency take no command"))
                return EXIT_USAGE
            try:
                if args.stat:
                    return watch.stat(client, args.interval, args.count)
                return watch.latency(client, args.count)
            except KeyboardInterrupt:
                return EXIT_OK
        if args.words:
            return run_one(client, printer, list(args.words))
        return shell(client, printer)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(text: str) -> int:
    if not _digits(text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cli", help="terminal client (interactive, or one command)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxy", default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="the proxy (or a node) to talk to (default 127.0.0.1:8000)")
    p.add_argument("--direct", action="store_true",
                   help="route on the client: data commands go straight to the node that "
                        "owns the key (the proxy gives the configuration)")
    p.add_argument("--raw", action="store_true", help="plain output without styling, for scripts")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for a reply")
    p.add_argument("--curve-key", default=None, metavar="FILE",
                   help="CURVE: this client's secret key file (from zkv keygen)")
    p.add_argument("--server-key", default=None, metavar="FILE",
                   help="CURVE: the cluster's public key file")
    watching = p.add_mutually_exclusive_group()
    watching.add_argument("--stat", action="store_true",
                          help="a line a second of cluster statistics (as redis-cli --stat)")
    watching.add_argument("--latency", action="store_true",
                          help="PING round trips: min, max, avg in ms (as redis-cli --latency)")
    p.add_argument("-i", "--interval", type=_seconds, default=1.0,
                   help="--stat: seconds between lines (default 1)")
    p.add_argument("--count", type=_count, default=None, metavar="N",
                   help="--stat, --latency: stop after N lines (default: until Ctrl-C)")
    p.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND ARGS",
                   help="a command to run once, e.g. SET username Alice")
    p.set_defaults(func=main)
