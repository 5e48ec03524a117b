"""The zkv configuration model (frozen dataclasses) and its YAML loader. No sockets.

A *topology* is one proxy and the storage nodes it shards keys across. It comes
from a YAML file (:func:`load_topology`) or from ``zkv proxy --node HOST:PORT ...``
(:func:`topology_from_flags`). Every key is optional except each node's ``port``
(or ``address``); unknown keys are errors::

    limits:                  # shared by the proxy and every node (DESIGN.md section 5)
      max_key_bytes: 65536
      max_value_bytes: 16777216
      max_batch: 10000
      max_frames: 8
      max_message_bytes: 67108864
    proxy:
      host: 127.0.0.1
      port: 8000
      state_dir: ./data/proxy
      timeout_ms: 2000       # per-request deadline
      heartbeat_ms: 500
      heartbeat_misses: 3    # missed heartbeats before a node is marked down
      vnodes: 2048           # ring points per unit of weight (zkv.core.ring.DEFAULT_VNODES)
      move_batch_keys: 1000
      move_batch_bytes: 1048576
      move_rate: null        # keys per second while rebalancing; null = unthrottled
      max_clients: 10000     # connections; past it new ones are shed (zkv.guard)
      client_buffer_bytes: 67108864  # unread reply bytes a client may pile up
    defaults:                # applied to every node unless the node overrides
      fsync: everysec        # always | everysec | no
      snapshot_factor: 4     # log may grow to this multiple of live data (> 1)
      snapshot_min_bytes: 4194304
      max_clients: 10000
      client_buffer_bytes: 67108864
    nodes:
      - address: 127.0.0.1:8081     # or host: + port: (IPv6: "[::1]:8081")
        data_dir: ./data/127.0.0.1-8081
        fsync: everysec
        weight: 1

Secure default: the proxy and nodes bind to 127.0.0.1 unless the file says otherwise.

Paths: ``data_dir`` and ``state_dir`` are kept exactly as written. Relative paths
are relative to the working directory of the process that uses them (the Procfile
runs everything from the repository root); ``~`` is not expanded. A node without
``data_dir`` uses ``./data/HOST-PORT``.

Errors: every problem is one :class:`~zkv.errors.ConfigError` that starts with
the file name, then the field path, then what is wrong and what is allowed::

    configs/x.yaml: nodes[1].fsync: 'sometimes' is not one of always, everysec, no
"""

from __future__ import annotations

import difflib
import importlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .core.protocol import Limits
from .core.ring import MAX_VNODES, MAX_WEIGHT, check_points
from .errors import ConfigError

__all__ = [
    "FSYNC_POLICIES",
    "FollowerConfig",
    "NodeConfig",
    "ProxyConfig",
    "Topology",
    "format_address",
    "load_topology",
    "parse_address",
    "parse_topology",
    "topology_from_flags",
]

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PROXY_PORT = 8000
FALLBACK_VNODES = 256
DEFAULT_MAX_CLIENTS = 10_000
DEFAULT_CLIENT_BUFFER = 64 * 1024 * 1024
FLAGS_SOURCE = "<flags>"
MiB = 1024 * 1024

Check = Callable[[Any], Any]

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Bad(Exception):
    """A value that breaks a rule; the caller adds the file name and the field path."""


# --- value checkers: each returns the normalised value or raises _Bad -------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"text {value!r}"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _integer(low: int, high: int | None = None) -> Check:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"expected {allowed}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise _Bad(f"{value} is out of range; expected {allowed}")
        return value

    return check


def _number_above(bound: float) -> Check:
    allowed = f"a number greater than {bound:g}"

    def check(value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Bad(f"expected {allowed}, got {_describe(value)}")
        if not math.isfinite(value) or value <= bound:
            raise _Bad(f"{value} is out of range; expected {allowed}")
        return float(value)

    return check


def _number_in(low: float, high: float) -> Check:
    allowed = f"a number greater than {low:g} and at most {high:g}"

    def check(value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Bad(f"expected {allowed}, got {_describe(value)}")
        if not math.isfinite(value) or not low < value <= high:
            raise _Bad(f"{value} is out of range; expected {allowed}")
        return float(value)

    return check


def _choice(options: Sequence[str]) -> Check:
    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            shown = repr(value) if isinstance(value, str) else _describe(value)
            raise _Bad(f"{shown} is not one of {', '.join(options)}")
        return value

    return check


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected a directory path, got {_describe(value)}")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_describe(value)}")
    return value


def _optional(check: Check) -> Check:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _host(value: Any) -> str:
    """A hostname or IP address, normalised (IPs in canonical form, names lowercased)."""
    if not isinstance(value, str) or not value:
        raise _Bad(f"expected a host name or IP address, got {_describe(value)}")
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    last_label = text.rsplit(".", 1)[-1]
    if len(text) <= 253 and _HOSTNAME.fullmatch(text) and not last_label.isdigit():
        return text.lower()
    raise _Bad(f"{value!r} is not a host name or IP address")


_port = _integer(1, 65535)


def _port_text(text: str) -> int:
    if not _PORT_TEXT.fullmatch(text):
        raise _Bad(f"port {text!r} is not a number from 1 to 65535")
    return int(_port(int(text)))


def _split_address(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise _Bad("an IPv6 address is written [ADDRESS]:PORT")
        if not isinstance(_ip_or_none(host), ipaddress.IPv6Address):
            raise _Bad(f"{host!r} in brackets is not an IPv6 address")
        return _host(host), _port_text(port)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise _Bad("missing :PORT")
    if ":" in host:
        raise _Bad("write an IPv6 address in brackets, e.g. [::1]:8000")
    if not host:
        raise _Bad("missing HOST before :PORT")
    return _host(host), _port_text(port)


def _ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _Bad(f"expected text HOST:PORT, got {_describe(value)}")
    try:
        return _split_address(value.strip())
    except _Bad as exc:
        raise _Bad(f"{value!r} is not HOST:PORT: {exc}") from None


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``; ConfigError naming ``what``."""
    try:
        return _address(text)
    except _Bad as exc:
        raise ConfigError(f"{what}: {exc}") from None


def format_address(host: str, port: int) -> str:
    """The ``host:port`` text for an address (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the model -------------------------------------------------------------------


def _default_vnodes() -> int:
    """The ring's default, if zkv.core.ring is there to say it."""
    try:
        ring = importlib.import_module("zkv.core.ring")
    except ImportError:
        return FALLBACK_VNODES
    return int(getattr(ring, "DEFAULT_VNODES", FALLBACK_VNODES))


def _validate(obj: Any, table: Mapping[str, Check]) -> None:
    """Check (and normalise) the fields of a frozen dataclass after __init__."""
    for name, check in table.items():
        try:
            object.__setattr__(obj, name, check(getattr(obj, name)))
        except _Bad as exc:
            raise ConfigError(f"{name}: {exc}") from None
    if not isinstance(obj.limits, Limits):
        raise ConfigError(f"limits: expected a Limits, got {_describe(obj.limits)}")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """One storage node: where it listens, where it keeps data, how it syncs."""

    host: str = DEFAULT_HOST
    port: int
    data_dir: str | None = None  # None: ./data/HOST-PORT (see resolved_data_dir)
    fsync: str = "everysec"
    weight: float = 1.0  # share of the ring relative to other nodes
    snapshot_factor: float = 4.0  # log may grow to this multiple of live data
    snapshot_min_bytes: int = 4 * MiB  # no snapshot for logs smaller than this
    max_clients: int = DEFAULT_MAX_CLIENTS  # connections; newer ones are shed
    client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER  # unread reply bytes per client
    metrics_port: int | None = None  # Prometheus metrics (zkv.metrics); off unless set
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _validate(self, _NODE_FIELDS)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def resolved_data_dir(self) -> str:
        """``data_dir`` as written, or the default ``./data/HOST-PORT``."""
        if self.data_dir is not None:
            return self.data_dir
        return os.path.join(".", "data", f"{self.host}-{self.port}")


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy: where clients reach it, and how it watches and rebalances nodes."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PROXY_PORT
    state_dir: str = "./data/proxy"
    timeout_ms: int = 2000  # per-request deadline
    heartbeat_ms: int = 500
    heartbeat_misses: int = 3  # missed heartbeats before a node is marked down
    vnodes: int = field(default_factory=_default_vnodes)
    move_batch_keys: int = 1000
    move_batch_bytes: int = 1 * MiB
    move_rate: float | None = None  # keys per second while moving; None = unthrottled
    max_clients: int = DEFAULT_MAX_CLIENTS  # connections; newer ones are shed
    client_buffer_bytes: int = DEFAULT_CLIENT_BUFFER  # unread reply bytes per client
    resp_port: int | None = None  # the RESP front (Redis clients); off unless set
    resp_admin: bool = False  # admin commands (FLUSHALL) allowed on the RESP front
    metrics_port: int | None = None  # Prometheus metrics (zkv.metrics); off unless set
    min_in_sync: int = 1  # copies (primary included) a shard needs to take writes
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        _validate(self, _PROXY_FIELDS)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True, kw_only=True)
class FollowerConfig:
    """A follower proxy: where clients reach it (it follows the topology's proxy)."""

    host: str = DEFAULT_HOST
    port: int
    resp_port: int | None = None  # this follower's RESP front; off unless set
    metrics_port: int | None = None  # this follower's Prometheus metrics; off unless set

    def __post_init__(self) -> None:
        for name, check in (("host", _host), ("port", _port), ("resp_port", _optional(_port)),
                            ("metrics_port", _optional(_port))):
            try:
                object.__setattr__(self, name, check(getattr(self, name)))
            except _Bad as exc:
                raise ConfigError(f"{name}: {exc}") from None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class SecurityConfig:
    """A process's CURVE settings (a topology's ``security:`` section, or flags; see
    zkv.security). Paths as given, relative to the working directory; the files are
    read when a process starts."""

    key: str | None = None  # this process's secret key file (--curve-key)
    server_key: str | None = None  # the servers' public key file (default: key's own)
    cluster_keys: str | None = None  # directory of further cluster public keys
    clients: str | None = None  # directory of data clients' public keys
    admins: str | None = None  # directory of admin clients' public keys
    insecure: bool = False  # listen off loopback without CURVE, knowingly
    resp_password_file: str | None = None  # the RESP front's AUTH password

    def merged(self, **flags: Any) -> SecurityConfig:
        """These settings with every flag that was given (not None/False) taking over."""
        values = {k: v for k, v in flags.items() if v is not None and v is not False}
        return SecurityConfig(**{**self.__dict__, **values})


@dataclass(frozen=True)
class Topology:
    """The proxy and the nodes, as read from ``source`` (a file name or ``<flags>``)."""

    proxy: ProxyConfig
    nodes: tuple[NodeConfig, ...]  # the ring's members: each a shard's first primary
    source: str
    followers: tuple[FollowerConfig, ...] = ()
    # each shard's replicas (zkv.core.replication), by the address of the node they copy
    replicas: dict[str, tuple[NodeConfig, ...]] = field(default_factory=dict)
    security: SecurityConfig = field(default_factory=SecurityConfig)  # CURVE keys (zkv.security)

    def all_nodes(self) -> list[NodeConfig]:
        """Every storage node to run: the members, each followed by its replicas."""
        out = []
        for n in self.nodes:
            out.append(n)
            out.extend(self.replicas.get(n.address, ()))
        return out

    def listeners(self) -> list[tuple[str, str, int]]:
        """(who, host, port) for every port the topology's processes listen on."""
        out: list[tuple[str, str, int]] = []
        for n in self.all_nodes():
            out.append((f"node {n.address}", n.host, n.port))
            if n.metrics_port:
                out.append((f"node {n.address}'s metrics", n.host, n.metrics_port))
        p = self.proxy
        out.append(("the proxy", p.host, p.port))
        out += [(f"the proxy's {what}", p.host, port)
                for what, port in (("RESP front", p.resp_port), ("metrics", p.metrics_port))
                if port]
        for f in self.followers:
            out.append((f"follower {f.address}", f.host, f.port))
            out += [(f"follower {f.address}'s {what}", f.host, port)
                    for what, port in (("RESP front", f.resp_port),
                                       ("metrics", f.metrics_port)) if port]
        return out

    def replica_map(self) -> dict[str, list[str]]:
        """Shard name -> its replicas' addresses (shards with replicas only)."""
        return {k: [r.address for r in v] for k, v in self.replicas.items() if v}

    def node(self, address_or_port: str | int) -> NodeConfig:
        """The node at ``"host:port"``, or the only node on a port (int or digits)."""
        want, matches = self._matching(address_or_port)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            known = ", ".join(n.address for n in self.all_nodes())
            raise ConfigError(f"{self.source}: no node at {want}; the nodes are {known}")
        found = ", ".join(n.address for n in matches)
        raise ConfigError(
            f"{self.source}: {want} matches several nodes ({found}); give HOST:PORT"
        )

    def _matching(self, wanted: str | int) -> tuple[str, list[NodeConfig]]:
        port = _port_only(wanted)
        if port is not None:
            return f"port {port}", [n for n in self.all_nodes() if n.port == port]
        try:
            host, port = parse_address(str(wanted), "node address")
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None
        address = format_address(host, port)
        return address, [n for n in self.all_nodes() if n.address == address]

    def members(self) -> dict[str, float]:
        """Ring membership: node address -> weight, in the order the nodes are listed."""
        return {n.address: n.weight for n in self.nodes}


def _port_only(wanted: str | int) -> int | None:
    """The port a lookup asks for when it gives no host (an int or a digit string)."""
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        return wanted
    if isinstance(wanted, str) and wanted.strip().isdecimal():
        return int(wanted)
    return None


_NODE_FIELDS: dict[str, Check] = {
    "host": _host,
    "port": _port,
    "data_dir": _optional(_path),
    "fsync": _choice(FSYNC_POLICIES),
    "weight": _number_in(0, MAX_WEIGHT),
    "snapshot_factor": _number_above(1),
    "snapshot_min_bytes": _integer(0),
    "max_clients": _integer(1, 1 << 20),
    "client_buffer_bytes": _integer(1 << 20),
    "metrics_port": _optional(_port),
}
_NODE_ENTRY_FIELDS: dict[str, Check] = {"address": _address, **_NODE_FIELDS}
_DEFAULTS_FIELDS = {k: _NODE_FIELDS[k] for k in ("fsync", "snapshot_factor", "snapshot_min_bytes",
                                                  "max_clients", "client_buffer_bytes")}
_PROXY_FIELDS: dict[str, Check] = {
    "host": _host,
    "port": _port,
    "state_dir": _path,
    "timeout_ms": _integer(1),
    "heartbeat_ms": _integer(1),
    "heartbeat_misses": _integer(1),
    "vnodes": _integer(1, MAX_VNODES),
    "move_batch_keys": _integer(1),
    "move_batch_bytes": _integer(1),
    "move_rate": _optional(_number_above(0)),
    "max_clients": _integer(1, 1 << 20),
    "client_buffer_bytes": _integer(1 << 20),
    "resp_port": _optional(_port),
    "resp_admin": _boolean,
    "metrics_port": _optional(_port),
    "min_in_sync": _integer(1, 64),
}
_LIMIT_FIELDS: dict[str, Check] = {f.name: _integer(1) for f in fields(Limits)}
_SECURITY_FIELDS: dict[str, Check] = {
    "key": _optional(_path),
    "server_key": _optional(_path),
    "cluster_keys": _optional(_path),
    "clients": _optional(_path),
    "admins": _optional(_path),
    "insecure": _boolean,
    "resp_password_file": _optional(_path),
}
_TOP_KEYS = ("limits", "proxy", "defaults", "nodes", "followers", "security")


# --- parsing a decoded YAML document ------------------------------------------------


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _checked(value: Any, check: Check, path: str) -> Any:
    try:
        return check(value)
    except _Bad as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _mapping(data: object, path: str) -> dict[Any, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {_describe(data)}")
    return data


def _reject_unknown(mapping: Mapping[Any, Any], allowed: Collection[str], path: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{path}: " if path else ""
            raise ConfigError(
                f"{where}unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
            )


def _section(data: object, table: Mapping[str, Check], path: str) -> dict[str, Any]:
    mapping = _mapping(data, path)
    _reject_unknown(mapping, table, path)
    return {key: _checked(value, table[key], _join(path, key)) for key, value in mapping.items()}


def _limits(data: object) -> Limits:
    values = _section(data, _LIMIT_FIELDS, "limits")
    cap = values.get("max_message_bytes", Limits.max_message_bytes)
    for name in ("max_key_bytes", "max_value_bytes"):
        size = values.get(name, getattr(Limits, name))
        if size <= cap:
            continue
        if name in values:
            raise ConfigError(
                f"limits.{name}: {size} is larger than limits.max_message_bytes ({cap}); "
                "it must be at most that"
            )
        raise ConfigError(
            f"limits.max_message_bytes: {cap} is smaller than limits.{name} "
            f"({size}, the default); raise it or lower {name}"
        )
    try:
        return Limits(**values)
    except ValueError as exc:
        field_name = next((n for n in ("max_frames", "max_message_bytes") if n in str(exc)),
                          "max_message_bytes")
        raise ConfigError(f"limits.{field_name}: {exc}") from None


def _proxy(data: object, limits: Limits) -> ProxyConfig:
    proxy = ProxyConfig(**_section(data, _PROXY_FIELDS, "proxy"), limits=limits)
    if proxy.move_batch_bytes > limits.max_message_bytes:
        raise ConfigError(
            f"proxy.move_batch_bytes: {proxy.move_batch_bytes} is larger than "
            f"limits.max_message_bytes ({limits.max_message_bytes}); a move batch "
            "must fit in one message"
        )
    return proxy


def _node(data: object, path: str, defaults: Mapping[str, Any], limits: Limits,
          table: Mapping[str, Check] | None = None) -> NodeConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping with address (or host and port), got {_describe(data)}"
        )
    values = _section(data, _NODE_ENTRY_FIELDS if table is None else table, path)
    address = values.pop("address", None)
    if address is not None:
        if "host" in values or "port" in values:
            raise ConfigError(f"{path}: give either address or host and port, not both")
        values["host"], values["port"] = address
    elif "port" not in values:
        raise ConfigError(f"{path}: missing port; give port (and host) or address HOST:PORT")
    return NodeConfig(**{**defaults, **values}, limits=limits)


def _nodes(data: object, defaults: Mapping[str, Any], limits: Limits
           ) -> tuple[list[NodeConfig], dict[str, tuple[NodeConfig, ...]]]:
    if data is None:
        raise ConfigError("nodes: missing; list at least one node, e.g. - address: 127.0.0.1:8081")
    if not isinstance(data, list):
        raise ConfigError(f"nodes: expected a list of nodes, got {_describe(data)}")
    if not data:
        raise ConfigError("nodes: the list is empty; list at least one node")
    nodes, replicas = [], {}
    for i, item in enumerate(data):
        extra = None
        if isinstance(item, dict) and "replicas" in item:
            item = dict(item)
            extra = item.pop("replicas")
        node = _node(item, f"nodes[{i}]", defaults, limits)
        nodes.append(node)
        if extra is not None:
            replicas[node.address] = _replicas(extra, f"nodes[{i}].replicas", node, limits)
    return nodes, replicas


# A replica takes its primary's settings unless it sets its own; its weight is the shard's.
_REPLICA_FIELDS = {k: v for k, v in _NODE_ENTRY_FIELDS.items() if k != "weight"}


def _replicas(data: object, path: str, primary: NodeConfig,
              limits: Limits) -> tuple[NodeConfig, ...]:
    """A node's ``replicas:``: addresses ("HOST:PORT"), or entries like a node's."""
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of HOST:PORT (or node entries), "
                          f"got {_describe(data)}")
    inherited = {k: getattr(primary, k) for k in _DEFAULTS_FIELDS}
    out = []
    for i, item in enumerate(data):
        entry = {"address": item} if isinstance(item, str) else item
        out.append(_node(entry, f"{path}[{i}]", inherited, limits, _REPLICA_FIELDS))
    return tuple(out)


def _check_distinct(proxy: ProxyConfig, nodes: Sequence[NodeConfig], labels: Sequence[str]) -> None:
    """No two processes on one host:port, no two sharing a data directory."""
    by_address = {proxy.address: "the proxy"}
    for port, label in ((proxy.resp_port, "resp_port"), (proxy.metrics_port, "metrics_port")):
        if port is not None:
            where = format_address(proxy.host, port)
            if where in by_address:
                raise ConfigError(f"proxy.{label}: {where} is already used by "
                                  f"{by_address[where]}")
            by_address[where] = ("the proxy's RESP front" if label == "resp_port"
                                 else "the proxy's metrics")
    by_dir = {os.path.normpath(proxy.state_dir): "the proxy's state_dir"}
    for node, label in zip(nodes, labels):
        if node.address in by_address:
            raise ConfigError(
                f"{label}: address {node.address} is already used by {by_address[node.address]}"
            )
        by_address[node.address] = label
        if node.metrics_port is not None:
            where = format_address(node.host, node.metrics_port)
            if where in by_address:
                raise ConfigError(f"{label}.metrics_port: {where} is already used by "
                                  f"{by_address[where]}")
            by_address[where] = f"{label}.metrics_port"
        directory = node.resolved_data_dir()
        if os.path.normpath(directory) in by_dir:
            raise ConfigError(
                f"{label}.data_dir: {directory!r} is already used by "
                f"{by_dir[os.path.normpath(directory)]}; every node needs a directory of its own"
            )
        by_dir[os.path.normpath(directory)] = f"{label}.data_dir"


def _topology(data: object, source: str) -> Topology:
    if data is None:
        raise ConfigError("the file is empty; expected a mapping with a nodes list")
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping (keys {', '.join(_TOP_KEYS)}) at the top level, "
            f"got {_describe(data)}"
        )
    _reject_unknown(data, _TOP_KEYS, "")
    limits = _limits(data.get("limits"))
    proxy = _proxy(data.get("proxy"), limits)
    defaults = _section(data.get("defaults"), _DEFAULTS_FIELDS, "defaults")
    nodes, replicas = _nodes(data.get("nodes"), defaults, limits)
    everyone, labels = [], []
    for i, n in enumerate(nodes):
        everyone.append(n)
        labels.append(f"nodes[{i}]")
        for j, r in enumerate(replicas.get(n.address, ())):
            everyone.append(r)
            labels.append(f"nodes[{i}].replicas[{j}]")
    _check_distinct(proxy, everyone, labels)
    for i, n in enumerate(nodes):
        copies = 1 + len(replicas.get(n.address, ()))
        if copies < proxy.min_in_sync:
            raise ConfigError(
                f"nodes[{i}] ({n.address}): {copies} {'copy' if copies == 1 else 'copies'} "
                f"(the node and {copies - 1} replicas), fewer than proxy.min_in_sync "
                f"({proxy.min_in_sync}): its shard could take no write. List more replicas "
                "for it, or lower min_in_sync")
    try:
        check_points({n.address: n.weight for n in nodes}, proxy.vnodes)
    except ValueError as exc:
        raise ConfigError(f"nodes: {exc}") from None
    followers = _followers(data.get("followers"), proxy, everyone)
    security = SecurityConfig(**_section(data.get("security"), _SECURITY_FIELDS, "security"))
    return Topology(proxy=proxy, nodes=tuple(nodes), source=source, followers=followers,
                    replicas=replicas, security=security)


def _followers(data: object, proxy: ProxyConfig,
               nodes: Sequence[NodeConfig]) -> tuple[FollowerConfig, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(f"followers: expected a list of followers, got {_describe(data)}")
    taken = {proxy.address: "the proxy", **{n.address: "a node" for n in nodes}}
    if proxy.resp_port is not None:
        taken[format_address(proxy.host, proxy.resp_port)] = "the proxy's RESP front"
    if proxy.metrics_port is not None:
        taken[format_address(proxy.host, proxy.metrics_port)] = "the proxy's metrics"
    for n in nodes:
        if n.metrics_port is not None:
            taken[format_address(n.host, n.metrics_port)] = "a node's metrics"
    out = []
    for i, item in enumerate(data):
        path = f"followers[{i}]"
        values = _section(item, {"address": _address, "host": _host, "port": _port,
                                 "resp_port": _optional(_port),
                                 "metrics_port": _optional(_port)}, path)
        address = values.pop("address", None)
        if address is not None:
            values["host"], values["port"] = address
        if "port" not in values:
            raise ConfigError(f"{path}: missing port; give port (and host) or address")
        follower = FollowerConfig(**values)
        if follower.address in taken:
            raise ConfigError(
                f"{path}: address {follower.address} is already used by {taken[follower.address]}")
        taken[follower.address] = path
        for field_name in ("resp_port", "metrics_port"):
            extra = getattr(follower, field_name)
            if extra is not None:
                where = format_address(follower.host, extra)
                if where in taken:
                    raise ConfigError(f"{path}.{field_name}: {where} is already used by "
                                      f"{taken[where]}")
                taken[where] = f"{path}.{field_name}"
        out.append(follower)
    return tuple(out)


def parse_topology(data: object, source: str) -> Topology:
    """Validate a decoded YAML document; every error starts with ``source``."""
    try:
        return _topology(data, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def topology_from_flags(nodes: list[str], proxy: ProxyConfig) -> Topology:
    """The topology of ``zkv proxy --node HOST:PORT ...``: default settings for each node."""
    if not nodes:
        raise ConfigError("no nodes given; add at least one --node HOST:PORT")
    configs = []
    for text in nodes:
        host, port = parse_address(text, "--node")
        configs.append(NodeConfig(host=host, port=port, limits=proxy.limits))
    labels = [f"--node {text} (#{i + 1})" for i, text in enumerate(nodes)]
    _check_distinct(proxy, configs, labels)
    return Topology(proxy=proxy, nodes=tuple(configs), source=FLAGS_SOURCE)


# --- reading the file ----------------------------------------------------------------


def _duplicate_keys(node: Any, path: str, seen: set[int]) -> None:
    """Refuse a key given twice in one mapping (PyYAML would silently keep the last)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], Any] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                earlier = first.setdefault((key.tag, key.value), key)
                if earlier is not key:
                    where = f"{path}: " if path else ""
                    raise ConfigError(
                        f"{where}key {key.value!r} is given twice "
                        f"(lines {earlier.start_mark.line + 1} and {key.start_mark.line + 1})"
                    )
            _duplicate_keys(value, _join(path, getattr(key, "value", "?")), seen)


def _parse_yaml(text: str) -> object:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _at(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_error(exc: Exception) -> str:
    """``line L, column C: invalid YAML: problem (context started at line L, column C)``."""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    detail = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context:
        where = f" at {_at(context_mark)}" if context_mark is not None else ""
        detail = f"{detail} ({context}{where})"
    mark = problem_mark or context_mark
    prefix = f"{_at(mark)}: " if mark is not None else ""
    return f"{prefix}invalid YAML: {detail}"


def _read(source: str) -> str:
    try:
        with open(source, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte offset {exc.start})") from None


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a YAML topology; every error is a ConfigError naming the file."""
    source = os.fspath(path)
    text = _read(source)
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_error(exc)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return parse_topology(data, source)
