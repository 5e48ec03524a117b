"""``zkv up``: start a whole topology (nodes and proxy) under honcho.

Every process gets a prefixed, coloured log stream; Ctrl-C (or SIGTERM) stops
them all, each shutting down cleanly. ``Procfile`` at the repository root is
the same launch for ``honcho start``.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import socket
import sys
from typing import Any

from . import lockfile
from .config import Topology, format_address, load_topology
from .errors import ClusterError, ConfigError

DEFAULT_CONFIG = "configs/local.yaml"


def commands(
    topology: Topology, config_path: str, python: str = sys.executable
) -> list[tuple[str, str]]:
    """(name, shell command) for each process of the topology; nodes first."""
    zkv = f"{shlex.quote(python)} -m zkv"
    cfg = shlex.quote(config_path)
    out = [
        (f"node{i}", f"exec {zkv} node --config {cfg} --host {shlex.quote(n.host)} --port {n.port}")
        for i, n in enumerate(topology.all_nodes(), 1)
    ]
    out.append(("proxy", f"exec {zkv} proxy --config {cfg}"))
    manager = shlex.quote(topology.proxy.address)
    several = len(topology.followers) > 1  # one is "follower", as in the Procfile
    out += [
        (f"follower{i if several else ''}",
         f"exec {zkv} proxy --config {cfg} --host {shlex.quote(f.host)} "
         f"--port {f.port} --follow {manager}")
        for i, f in enumerate(topology.followers, 1)
    ]
    return out


def _shards(topology: Topology) -> str:
    copies = topology.replica_map()
    if not copies:
        return ""
    return f" ({len(topology.nodes)} shards, {sum(map(len, copies.values()))} replicas)"


def _in_use(topology: Topology) -> list[str]:
    """The topology's directories that a running process holds, each with its pid."""
    dirs = [(f"node {n.address}", n.resolved_data_dir()) for n in topology.all_nodes()]
    dirs.append(("the proxy", topology.proxy.state_dir))
    out = []
    for who, directory in dirs:
        try:
            pid = lockfile.holder(directory)
        except OSError:
            continue  # (not a directory, say: the process started on it says so)
        if pid is not None:
            out.append(f"{directory} ({who}) is in use by pid {pid}")
    return out


def _ports_taken(topology: Topology) -> list[str]:
    """The topology's ports that something on this machine already listens on."""
    out = []
    for who, host, port in topology.listeners():
        try:
            family, kind, proto, _, where = socket.getaddrinfo(host, port,
                                                               type=socket.SOCK_STREAM)[0]
        except (OSError, UnicodeError):
            continue  # (the process started on it says what is wrong)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds
            try:
                probe.bind(where)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    out.append(f"{format_address(host, port)} ({who})")
    return out


def up(args: argparse.Namespace) -> int:
    from honcho.manager import Manager

    from .security import curve_for, read_password

    if getattr(args, "config_flag", None):
        if args.config not in (DEFAULT_CONFIG, args.config_flag):
            raise ConfigError(f"two topologies given ({args.config} and --config "
                              f"{args.config_flag}): give one")
        args.config = args.config_flag
    topology = load_topology(args.config)  # validate before starting anything
    secure = curve_for(topology.security, f"{args.config}: security") is not None
    if topology.security.resp_password_file:
        read_password(topology.security.resp_password_file)
    busy = _in_use(topology)  # before the banner: nothing of it would start
    if busy:
        raise ClusterError(f"{args.config} seems to be running already: {'; '.join(busy)}")
    taken = _ports_taken(topology)
    if taken:
        raise ClusterError(f"{args.config}: port{'s' if len(taken) > 1 else ''} already in use "
                           f"on this machine, by another program or another topology: "
                           f"{', '.join(taken)}; nothing was started")
    manager = Manager()
    for name, cmd in commands(topology, args.config):
        manager.add_process(name, cmd)
    def resp(port: int | None) -> str:
        return f" (Redis clients: {port})" if port else ""

    followers = "".join(f", a follower on {f.address}{resp(f.resp_port)}"
                        for f in topology.followers)
    print(
        f"zkv up: {len(topology.all_nodes())} nodes{_shards(topology)} and a proxy on "
        f"{topology.proxy.host}:{topology.proxy.port}{resp(topology.proxy.resp_port)}"
        f"{followers} from {args.config}; Ctrl-C stops them all",
        flush=True,
    )
    if secure:
        print(f"zkv up: CURVE is on; connect with zkv cli --curve-key YOUR.key_secret "
              f"--server-key {topology.security.server_key or _public(topology.security.key)}",
              flush=True)
    manager.loop()
    return int(manager.returncode or 0)


def _public(secret: str | None) -> str:
    """The public key file beside a secret one (PATH.key beside PATH.key_secret)."""
    return (secret or "").removesuffix("_secret")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="start a topology (nodes and proxy) in the foreground")
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help=f"YAML topology (default {DEFAULT_CONFIG})")
    p.add_argument("--config", dest="config_flag", metavar="CONFIG", default=None,
                   help="the same, as a flag (as zkv node and zkv proxy take it)")
    p.set_defaults(func=up)
