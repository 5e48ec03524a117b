"""The ``zkv`` command line: ``zkv node``, ``zkv proxy``, ``zkv cli``, ``zkv up``, ``zkv bench``.

Each subcommand parses its flags here and hands over to the module that owns
the work. A user's mistake (a bad flag, a bad config, a busy port, a damaged
data file) ends with one line on stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .config import FSYNC_POLICIES
from .errors import ConfigError, ZkvError

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _add_security_flags(p: argparse.ArgumentParser, resp: bool = False) -> None:
    g = p.add_argument_group("security (CURVE; see the README's Security section)")
    g.add_argument("--curve-key", default=None, metavar="FILE",
                   help="this process's secret key (the cluster key, from zkv keygen)")
    g.add_argument("--server-key", default=None, metavar="FILE",
                   help="the public key other cluster processes present (default: the "
                        "public half of --curve-key)")
    g.add_argument("--cluster-keys", default=None, metavar="DIR",
                   help="directory of further public keys with cluster rights")
    g.add_argument("--clients", default=None, metavar="DIR",
                   help="directory of public keys allowed data commands")
    g.add_argument("--admins", default=None, metavar="DIR",
                   help="directory of public keys allowed data and admin commands")
    g.add_argument("--insecure", action="store_true",
                   help="allow listening on an address other than loopback without CURVE")
    if resp:
        g.add_argument("--resp-password-file", default=None, metavar="FILE",
                       help="require AUTH on the RESP front with the password in FILE")


def _security(args: argparse.Namespace, topo: Any, what: str) -> Any:
    """(settings, Curve or None) from a topology's security section and the flags."""
    from .config import SecurityConfig
    from .security import curve_for

    base = topo.security if topo is not None else SecurityConfig()
    settings = base.merged(key=args.curve_key, server_key=args.server_key,
                           cluster_keys=args.cluster_keys, clients=args.clients,
                           admins=args.admins, insecure=args.insecure,
                           resp_password_file=getattr(args, "resp_password_file", None))
    return settings, curve_for(settings, what)


def _secure(args: argparse.Namespace, topo: Any, host: str, what: str,
            resp_port: int | None = None, node: bool = False) -> Callable[[Any], None]:
    """Check a node's or proxy's security settings before anything is opened or written
    (off loopback without CURVE, it must not start: not even lock a state directory);
    returns what gives the server its CURVE identity (and the RESP front its password)."""
    from .config import format_address
    from .security import check_exposure, check_resp_exposure, read_password

    settings, curve = _security(args, topo, what)
    if node and curve is not None and curve.server_public != curve.public:
        # (a node presents its own key to every peer, and its links to other nodes,
        # replication's and streams', expect the server key: the two are one key, or
        # those links never get through, and nothing said so)
        raise ConfigError(
            f"{what}: the server key ({settings.server_key}) is not the public half of this "
            f"node's key ({settings.key}): every node holds the one cluster key, which it "
            "presents and expects of other nodes; leave the server key out")
    check_exposure(host, curve, settings.insecure, what)
    password = (read_password(settings.resp_password_file)
                if settings.resp_password_file and resp_port else None)
    if resp_port:
        check_resp_exposure(host, password, settings.insecure,
                            f"the RESP front {format_address(host, resp_port)}")

    def give(server: Any) -> None:
        server.curve, server.insecure = curve, settings.insecure
        if password is not None:
            server.resp_password = password

    return give


def _keygen(args: argparse.Namespace) -> int:
    from .security import keygen

    public, secret = keygen(args.path)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600: keep it on this machine)")
    return 0


def _add_keygen_parser(sub: Any) -> None:
    p = sub.add_parser("keygen", help="write a CURVE key pair (PATH.key, PATH.key_secret)")
    p.add_argument("path", metavar="PATH/NAME", help="e.g. keys/cluster or keys/clients/app")
    p.set_defaults(func=_keygen)


def _node(args: argparse.Namespace) -> int:
    from .config import NodeConfig, format_address, load_topology
    from .node import Node

    topo = None
    if args.config:
        topo = load_topology(args.config)
        key = format_address(args.host, args.port) if args.host and args.port else args.port
        if key is None:
            raise ZkvError("--config needs --port (or --host and --port) to pick the node")
        cfg = topo.node(key)
        limits = cfg.limits
    else:
        if args.port is None:
            raise ZkvError("zkv node needs --port (or --config FILE --port N)")
        cfg = NodeConfig(host=args.host or "127.0.0.1", port=args.port)
        limits = cfg.limits
    fsync = args.fsync or cfg.fsync  # both already checked: argparse choices, config validation
    node = Node(
        host=cfg.host,
        port=cfg.port,
        data_dir=args.data_dir or cfg.resolved_data_dir(),
        fsync=fsync,
        limits=limits,
        snapshot_factor=cfg.snapshot_factor,
        snapshot_min_bytes=cfg.snapshot_min_bytes,
        repair=args.repair,
        max_clients=args.max_clients or cfg.max_clients,
        client_buffer_bytes=cfg.client_buffer_bytes,
    )
    node.metrics_port = args.metrics_port or cfg.metrics_port
    _secure(args, topo, cfg.host, f"node {node.address}", node=True)(node)
    node.run(on_ready=lambda line: print(line, flush=True))
    return 0


def _add_node_parser(sub: Any) -> None:
    p = sub.add_parser("node", help="run a storage node")
    p.add_argument("--host", type=_host_name, default=None,
                   help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port_number, default=None, help="port to bind")
    p.add_argument("--data-dir", default=None, help="data directory (default ./data/HOST-PORT)")
    p.add_argument("--fsync", choices=FSYNC_POLICIES, default=None,
                   help="when the log is fsynced (default everysec)")
    p.add_argument("--config", default=None, help="YAML topology to take the node's settings from")
    p.add_argument("--repair", action="store_true",
                   help="start even if data files are damaged or missing, keeping what can be "
                        "read and reporting what is lost")
    p.add_argument("--max-clients", type=_positive_int, default=None, metavar="N",
                   help="connections served at once; newer ones are shed (default 10000)")
    p.add_argument("--metrics-port", type=_port_number, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics")
    _add_security_flags(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_node)


def _proxy(args: argparse.Namespace) -> int:
    from .config import ProxyConfig, format_address, load_topology, parse_address
    from .proxy import Proxy

    members: dict[str, float] = {}
    replicas: dict[str, list[str]] = {}
    topo = None
    if args.config:
        topo = load_topology(args.config)
        cfg = topo.proxy
        members = topo.members()
        replicas = topo.replica_map()
    else:
        cfg = ProxyConfig()
    for text in args.node or []:
        host, port = parse_address(text, "--node")
        members[format_address(host, port)] = 1.0  # [::1]:8081 keeps its brackets
    for text in args.replica or []:
        primary, sep, replica = text.partition("=")
        if not sep:
            raise ZkvError(f"--replica {text!r}: expected PRIMARY=REPLICA (HOST:PORT=HOST:PORT)")
        shard = format_address(*parse_address(primary, "--replica PRIMARY"))
        copy = format_address(*parse_address(replica, "--replica REPLICA"))
        if shard not in members:
            raise ZkvError(f"--replica {text}: {shard} is not a node (give it with --node, "
                           "or in --config)")
        if copy in members or any(copy in r for r in replicas.values()) or copy == shard:
            raise ZkvError(f"--replica {text}: {copy} is already a node of the cluster")
        replicas.setdefault(shard, []).append(copy)
    if args.follow:
        from .follower import Follower

        host, port = parse_address(args.follow, "--follow")
        if args.state_dir:
            raise ZkvError("a follower keeps no state: --follow and --state-dir do not go "
                           "together (the config manager at --follow owns the state)")
        if args.node or args.replica:
            raise ZkvError("a follower learns the nodes from the config manager at --follow: "
                           "--node and --replica do not go with --follow")
        if args.min_in_sync:
            raise ZkvError("min_in_sync is the config manager's setting, which a follower "
                           "learns from it: --min-in-sync does not go with --follow")
        follower = Follower(
            manager=format_address(host, port),
            host=args.host or cfg.host,
            port=args.port or _follower_port(args),
            seeds=list(members),
            timeout_ms=args.timeout_ms or cfg.timeout_ms,
            heartbeat_ms=cfg.heartbeat_ms,
            heartbeat_misses=cfg.heartbeat_misses,
            limits=cfg.limits,
            max_clients=args.max_clients or cfg.max_clients,
            client_buffer_bytes=cfg.client_buffer_bytes,
        )
        entry = _follower_entry(args, follower.port)
        follower.enable_resp(args.resp_port or (entry.resp_port if entry else None),
                             args.resp_admin or cfg.resp_admin)
        follower.metrics_port = args.metrics_port or (entry.metrics_port if entry else None)
        _secure(args, topo, follower.host, f"proxy {follower.address}",
                follower.resp_port)(follower)
        follower.run(on_ready=lambda line: print(line, flush=True))
        return 0
    give = _secure(args, topo, args.host or cfg.host,
                   f"proxy {format_address(args.host or cfg.host, args.port or cfg.port)}",
                   args.resp_port or cfg.resp_port)
    proxy = Proxy(
        host=args.host or cfg.host,
        port=args.port or cfg.port,
        state_dir=args.state_dir or cfg.state_dir,
        members=members,
        vnodes=cfg.vnodes,
        timeout_ms=args.timeout_ms or cfg.timeout_ms,
        heartbeat_ms=cfg.heartbeat_ms,
        heartbeat_misses=cfg.heartbeat_misses,
        limits=cfg.limits,
        move_batch_keys=cfg.move_batch_keys,
        move_batch_bytes=cfg.move_batch_bytes,
        move_rate=cfg.move_rate,
        max_clients=args.max_clients or cfg.max_clients,
        client_buffer_bytes=cfg.client_buffer_bytes,
        replicas=replicas,
        min_in_sync=args.min_in_sync or cfg.min_in_sync,
    )
    proxy.enable_resp(args.resp_port or cfg.resp_port, args.resp_admin or cfg.resp_admin)
    proxy.metrics_port = args.metrics_port or cfg.metrics_port
    give(proxy)
    proxy.run(on_ready=lambda line: print(line, flush=True))
    return 0


def _follower_port(args: argparse.Namespace) -> int:
    """The port of the topology's only follower (else --port must say)."""
    from .config import load_topology

    followers = load_topology(args.config).followers if args.config else ()
    if len(followers) == 1:
        return followers[0].port
    raise ZkvError("--follow needs --port to say where this follower listens")


def _follower_entry(args: argparse.Namespace, port: int) -> Any:
    """The topology's entry for the follower on ``port`` (its RESP and metrics ports:
    the proxy section's are the config manager's own), or None."""
    from .config import load_topology

    if not args.config:
        return None
    for f in load_topology(args.config).followers:
        if f.port == port:
            return f
    return None


def _host_name(text: str) -> str:
    """--host: an address or name to bind (an empty one would silently mean 127.0.0.1)."""
    if not text.strip() or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an address: give one, such as 127.0.0.1, 0.0.0.0 or ::")
    return text


def _port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def _add_proxy_parser(sub: Any) -> None:
    p = sub.add_parser("proxy", help="run the proxy clients connect to")
    p.add_argument("--host", type=_host_name, default=None,
                   help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port_number, default=None, help="port to bind (default 8000)")
    p.add_argument("--config", default=None, help="YAML topology (initial membership, settings)")
    p.add_argument("--state-dir", default=None,
                   help="where membership and moves are kept (default ./data/proxy)")
    p.add_argument("--node", action="append", metavar="HOST:PORT",
                   help="initial member (repeatable); ignored once the state dir has members")
    p.add_argument("--timeout-ms", type=_positive_int, default=None,
                   help="per-request deadline")
    p.add_argument("--max-clients", type=_positive_int, default=None, metavar="N",
                   help="connections served at once; newer ones are shed (default 10000)")
    p.add_argument("--resp-port", type=_port_number, default=None, metavar="PORT",
                   help="also serve Redis clients (RESP) on PORT, e.g. redis-cli -p PORT")
    p.add_argument("--metrics-port", type=_port_number, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics")
    p.add_argument("--resp-admin", action="store_true",
                   help="allow admin commands (FLUSHALL, FLUSHDB) on the RESP front")
    p.add_argument("--replica", action="append", metavar="PRIMARY=REPLICA",
                   help="a replica for the shard of node PRIMARY (repeatable): "
                        "--replica 127.0.0.1:8081=127.0.0.1:9081")
    p.add_argument("--min-in-sync", type=_positive_int, default=None, metavar="N",
                   help="copies (primary included) a shard needs to take writes (default 1)")
    p.add_argument("--follow", default=None, metavar="HOST:PORT",
                   help="run a follower proxy: learn the configuration from the config "
                        "manager at HOST:PORT (keeps no state of its own)")
    _add_security_flags(p, resp=True)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_proxy)


def _parsers() -> list[Callable[[Any], None]]:
    from . import backup, bench, cli, launch, top, waltool

    return [_add_node_parser, _add_proxy_parser, _add_keygen_parser, cli.add_parser,
            launch.add_parser, bench.add_parser, waltool.add_parser, top.add_parser,
            backup.add_parsers]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; for ``command`` node or proxy, that one alone (the
    others' modules, rich's among them, are not imported: a node or proxy starts a
    third faster)."""
    parser = argparse.ArgumentParser(
        prog="zkv", description="zkv: a sharded, persistent key-value store"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    alone = {"node": _add_node_parser, "proxy": _add_proxy_parser}.get(command or "")
    for add in [alone] if alone is not None else _parsers():
        add(sub)
    return parser


def _command_parser(parser: argparse.ArgumentParser,
                    command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (zkv cli's for cli), or the top level's for none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            chosen: argparse.ArgumentParser = action.choices[command]
            return chosen
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command's own usage line, not the top level's
        _command_parser(parser, args.command).error(
            f"unrecognized arguments: {' '.join(extra)}")
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
    except BrokenPipeError:  # the reader stopped reading (| head): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so that exiting flushes nowhere)
        return 0


if __name__ == "__main__":
    sys.exit(main())
