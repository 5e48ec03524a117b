"""The ``zkv`` command line: ``zkv node``, ``zkv proxy``, ``zkv cli``, ``zkv up``, ``zkv bench``.

Each subcommand parses its flags here and hands over to the module that owns
the work. A user's mistake (a bad flag, a bad config, a busy port, a damaged
data file) ends with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable, Sequence

from .errors import ZkvError

EXIT_USAGE = 2


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _node(args: argparse.Namespace) -> int:
    from .config import FSYNC_POLICIES, NodeConfig, load_topology
    from .node import Node

    if args.config:
        topo = load_topology(args.config)
        key = f"{args.host}:{args.port}" if args.host and args.port else args.port
        if key is None:
            raise ZkvError("--config needs --port (or --host and --port) to pick the node")
        cfg = topo.node(key)
        limits = cfg.limits
    else:
        if args.port is None:
            raise ZkvError("zkv node needs --port (or --config FILE --port N)")
        cfg = NodeConfig(host=args.host or "127.0.0.1", port=args.port)
        limits = cfg.limits
    fsync = args.fsync or cfg.fsync
    if fsync not in FSYNC_POLICIES:
        raise ZkvError(f"--fsync must be one of {', '.join(FSYNC_POLICIES)}")
    node = Node(
        host=cfg.host,
        port=cfg.port,
        data_dir=args.data_dir or cfg.resolved_data_dir(),
        fsync=fsync,
        limits=limits,
        snapshot_factor=cfg.snapshot_factor,
        snapshot_min_bytes=cfg.snapshot_min_bytes,
        repair=args.repair,
    )
    node.run(on_ready=lambda line: print(line, flush=True))
    return 0


def _add_node_parser(sub: Any) -> None:
    p = sub.add_parser("node", help="run a storage node")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port to bind")
    p.add_argument("--data-dir", default=None, help="data directory (default ./data/HOST-PORT)")
    p.add_argument("--fsync", choices=["always", "everysec", "no"], default=None,
                   help="when the log is fsynced (default everysec)")
    p.add_argument("--config", default=None, help="YAML topology to take the node's settings from")
    p.add_argument("--repair", action="store_true",
                   help="start even if the log is corrupt, keeping the good prefix")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_node)


def _parsers() -> list[Callable[[Any], None]]:
    parsers: list[Callable[[Any], None]] = [_add_node_parser]
    for name in ("proxy", "cli", "up", "bench"):
        try:
            module = __import__(f"zkv._cmd_{name}", fromlist=["add_parser"])
        except ImportError:
            continue
        parsers.append(module.add_parser)
    return parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zkv", description="zkv: a sharded, persistent key-value store")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _parsers():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(getattr(args, "verbose", False))
    try:
        return int(args.func(args) or 0)
    except ZkvError as exc:
        print(f"zkv {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
