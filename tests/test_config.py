"""Tests for zkv.config: the shipped topologies load, and every bad config is a
ConfigError that names the file and the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zkv.config import (
    FSYNC_POLICIES,
    NodeConfig,
    ProxyConfig,
    Topology,
    format_address,
    load_topology,
    parse_address,
    parse_topology,
    topology_from_flags,
)
from zkv.core.protocol import Limits
from zkv.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NODE = "nodes:\n  - address: 127.0.0.1:8081\n"


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message


# --- the shipped configs ---------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    topo = load_topology(path)
    assert topo.source == str(path)
    assert topo.nodes
    assert topo.proxy.host == "127.0.0.1"
    assert all(n.host == "127.0.0.1" for n in topo.nodes)


def test_shipped_configs_are_the_expected_ones() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"local.yaml", "five.yaml", "weighted.yaml"} <= names


def test_local_yaml() -> None:
    topo = load_topology(CONFIGS / "local.yaml")
    assert topo.proxy.port == 8000
    assert topo.proxy.state_dir == "./data/proxy"
    assert [n.port for n in topo.nodes] == [8081, 8082, 8083]
    assert [n.resolved_data_dir() for n in topo.nodes] == [
        f"./data/127.0.0.1-{port}" for port in (8081, 8082, 8083)
    ]
    assert {n.fsync for n in topo.nodes} == {"everysec"}
    assert topo.members() == {f"127.0.0.1:{p}": 1.0 for p in (8081, 8082, 8083)}
    assert topo.proxy.limits == Limits()
    assert topo.nodes[0].limits == Limits()
    assert topo.proxy.resp_port == 6380 and topo.proxy.resp_admin is False
    assert [f.resp_port for f in topo.followers] == [6381]


def test_five_yaml() -> None:
    topo = load_topology(CONFIGS / "five.yaml")
    assert topo.proxy.port == 8000
    assert [n.port for n in topo.nodes] == [8081, 8082, 8083, 8084, 8085]
    assert all(n.resolved_data_dir().startswith("./data/five/") for n in topo.nodes)


def test_replicated_yaml() -> None:
    topo = load_topology(CONFIGS / "replicated.yaml")
    assert [n.port for n in topo.nodes] == [8081, 8082, 8083]
    assert topo.replica_map() == {f"127.0.0.1:{p}": [f"127.0.0.1:{p + 10}"]
                                  for p in (8081, 8082, 8083)}
    assert [n.port for n in topo.all_nodes()] == [8081, 8091, 8082, 8092, 8083, 8093]
    assert {n.fsync for n in topo.all_nodes()} == {"always"}
    assert topo.node(8092).resolved_data_dir() == "./data/replicated/127.0.0.1-8092"
    assert topo.members() == {f"127.0.0.1:{p}": 1.0 for p in (8081, 8082, 8083)}


def test_replicas_take_their_primarys_settings_unless_they_set_their_own(
        tmp_path: Path) -> None:
    topo = load_topology(write(tmp_path, (
        "defaults: {fsync: \"no\"}\n"
        "nodes:\n"
        "  - address: 127.0.0.1:8081\n"
        "    fsync: always\n"
        "    replicas: [127.0.0.1:8091, {port: 8092, fsync: everysec}]\n"
        "  - address: 127.0.0.1:8082\n"), "r.yaml"))
    assert topo.replica_map() == {"127.0.0.1:8081": ["127.0.0.1:8091", "127.0.0.1:8092"]}
    assert topo.node("127.0.0.1:8091").fsync == "always"
    assert topo.node(8092).fsync == "everysec"
    assert topo.node(8082).fsync == "no"
    assert topo.node(8091).resolved_data_dir() == os.path.join(".", "data", "127.0.0.1-8091")
    assert topo.proxy.min_in_sync == 1


def test_weighted_yaml() -> None:
    topo = load_topology(CONFIGS / "weighted.yaml")
    assert sorted(topo.members().values()) == [1.0, 1.0, 2.0]
    assert "always" in {n.fsync for n in topo.nodes}
    assert all(n.resolved_data_dir().startswith("./data/weighted/") for n in topo.nodes)


# --- good YAML ----------------------------------------------------------------------------


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    topo = load_topology(write(tmp_path, "nodes:\n  - port: 9001\n", "min.yaml"))
    node = topo.nodes[0]
    assert node == NodeConfig(port=9001)
    assert node.host == "127.0.0.1" and node.address == "127.0.0.1:9001"
    assert node.resolved_data_dir() == os.path.join(".", "data", "127.0.0.1-9001")
    assert node.fsync == "everysec" and node.weight == 1.0
    assert node.snapshot_factor == 4.0 and node.snapshot_min_bytes == 4 * 1024 * 1024
    assert topo.proxy.address == "127.0.0.1:8000"
    assert topo.proxy.vnodes >= 1 and topo.proxy.move_rate is None


def test_defaults_limits_and_overrides(tmp_path: Path) -> None:
    text = """
limits: {max_key_bytes: 100, max_batch: 5}
proxy: {port: 7000, move_rate: 50, timeout_ms: 100}
defaults: {fsync: always, snapshot_factor: 2, snapshot_min_bytes: 0}
nodes:
  - {address: "127.0.0.1:8081"}
  - {host: localhost, port: 8082, fsync: "no", weight: 0.5, data_dir: /tmp/x}
"""
    topo = load_topology(write(tmp_path, text, "ok.yaml"))
    first, second = topo.nodes
    assert first.fsync == "always" and second.fsync == "no"
    assert first.snapshot_factor == 2.0 and isinstance(first.snapshot_factor, float)
    assert second.data_dir == "/tmp/x" and second.weight == 0.5
    assert topo.proxy.move_rate == 50.0 and topo.proxy.port == 7000
    assert topo.proxy.limits == Limits(max_key_bytes=100, max_batch=5)
    assert first.limits is topo.proxy.limits


def test_empty_sections_are_allowed(tmp_path: Path) -> None:
    topo = load_topology(write(tmp_path, "proxy:\nlimits:\ndefaults:\n" + NODE, "e.yaml"))
    assert topo.proxy == ProxyConfig()


def test_ipv6_node(tmp_path: Path) -> None:
    text = 'nodes:\n  - address: "[::1]:8081"\n  - {host: "::1", port: 8082}\n'
    topo = load_topology(write(tmp_path, text, "v6.yaml"))
    assert [n.address for n in topo.nodes] == ["[::1]:8081", "[::1]:8082"]
    assert topo.node("[::1]:8082").port == 8082


def test_relative_paths_are_kept_as_written(tmp_path: Path) -> None:
    text = "proxy: {state_dir: rel/proxy}\nnodes:\n  - {port: 8081, data_dir: rel/n1}\n"
    topo = load_topology(write(tmp_path, text, "rel.yaml"))
    assert topo.proxy.state_dir == "rel/proxy"
    assert topo.nodes[0].resolved_data_dir() == "rel/n1"


# --- bad YAML: file problems -------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.yaml")
    assert "no such" in message


def test_unreadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir.yaml"
    directory.mkdir()
    assert "cannot read" in load_error(directory)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"nodes: \xff\xfe\n")
    assert "UTF-8" in load_error(path)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes:\n  - port: 8081\n  - port: [8082\n")
    message = load_error(path)
    assert "line " in message and "column " in message and "invalid YAML" in message


def test_empty_file(tmp_path: Path) -> None:
    assert "empty" in load_error(write(tmp_path, "# nothing\n"))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", "42\n"])
def test_wrong_top_level_type(tmp_path: Path, text: str) -> None:
    assert "expected a mapping" in load_error(write(tmp_path, text))


def test_duplicate_key_in_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes:\n  - port: 8081\n    port: 8082\n")
    message = load_error(path)
    assert "nodes[0]: key 'port' is given twice (lines 2 and 3)" in message


# --- bad YAML: fields ----------------------------------------------------------------------

BAD_FIELDS = [
    # (id, yaml, fragments the message must contain)
    ("unknown top key", "nodez: []\n" + NODE, ["unknown key 'nodez'", "allowed keys: limits"]),
    ("unknown proxy key", "proxy: {prot: 1}\n" + NODE,
     ["proxy: unknown key 'prot'", "did you mean 'port'", "allowed keys: host, port"]),
    ("unknown node key", "nodes:\n  - {port: 8081, wieght: 2}\n",
     ["nodes[0]: unknown key 'wieght'", "weight"]),
    ("unknown limits key", "limits: {max_keys: 1}\n" + NODE, ["limits: unknown key 'max_keys'"]),
    ("unknown defaults key", "defaults: {port: 1}\n" + NODE,
     ["defaults: unknown key 'port'", "fsync, snapshot_factor, snapshot_min_bytes"]),
    ("fsync choice", "nodes:\n  - {port: 8081}\n  - {port: 8082, fsync: sometimes}\n",
     ["nodes[1].fsync: 'sometimes' is not one of always, everysec, no"]),
    ("fsync yaml bool", "nodes:\n  - {port: 8081, fsync: no}\n",
     ["nodes[0].fsync: false (a boolean) is not one of always, everysec, no"]),
    ("defaults fsync", "defaults: {fsync: never}\n" + NODE, ["defaults.fsync: 'never'"]),
    ("port text", "nodes:\n  - {port: '8081'}\n",
     ["nodes[0].port: expected an integer", "text '8081'"]),
    ("port bool", "nodes:\n  - {port: true}\n", ["nodes[0].port", "boolean"]),
    ("port float", "nodes:\n  - {port: 8081.0}\n", ["nodes[0].port: expected an integer"]),
    ("port range", "nodes:\n  - {port: 70000}\n",
     ["nodes[0].port: 70000 is out of range", "1 to 65535"]),
    ("port zero", "proxy: {port: 0}\n" + NODE, ["proxy.port: 0 is out of range"]),
    ("proxy host", "proxy: {host: 'bad host!'}\n" + NODE, ["proxy.host: 'bad host!'"]),
    ("timeout zero", "proxy: {timeout_ms: 0}\n" + NODE,
     ["proxy.timeout_ms: 0 is out of range", ">= 1"]),
    ("heartbeat negative", "proxy: {heartbeat_ms: -5}\n" + NODE, ["proxy.heartbeat_ms"]),
    ("misses zero", "proxy: {heartbeat_misses: 0}\n" + NODE, ["proxy.heartbeat_misses"]),
    ("vnodes text", "proxy: {vnodes: many}\n" + NODE, ["proxy.vnodes: expected an integer"]),
    ("move rate zero", "proxy: {move_rate: 0}\n" + NODE, ["proxy.move_rate", "greater than 0"]),
    ("move batch bytes", "proxy: {move_batch_bytes: 0}\n" + NODE, ["proxy.move_batch_bytes"]),
    ("state_dir empty", "proxy: {state_dir: ''}\n" + NODE,
     ["proxy.state_dir: expected a directory path"]),
    ("weight zero", "nodes:\n  - {port: 8081, weight: 0}\n",
     ["nodes[0].weight: 0 is out of range"]),
    ("weight text", "nodes:\n  - {port: 8081, weight: heavy}\n",
     ["nodes[0].weight: expected a number"]),
    ("weight bool", "nodes:\n  - {port: 8081, weight: true}\n", ["nodes[0].weight", "boolean"]),
    ("weight inf", "nodes:\n  - {port: 8081, weight: .inf}\n",
     ["nodes[0].weight: inf is out of range"]),
    ("snapshot factor", "defaults: {snapshot_factor: 1}\n" + NODE,
     ["defaults.snapshot_factor: 1 is out of range", "greater than 1"]),
    ("snapshot bytes", "nodes:\n  - {port: 8081, snapshot_min_bytes: -1}\n",
     ["nodes[0].snapshot_min_bytes: -1 is out of range"]),
    ("data_dir type", "nodes:\n  - {port: 8081, data_dir: 5}\n",
     ["nodes[0].data_dir: expected a directory path"]),
    ("limit zero", "limits: {max_batch: 0}\n" + NODE, ["limits.max_batch: 0 is out of range"]),
    ("limit bool", "limits: {max_frames: true}\n" + NODE, ["limits.max_frames", "boolean"]),
    ("limit over message",
     "limits: {max_key_bytes: 10, max_value_bytes: 100, max_message_bytes: 50}\n" + NODE,
     ["limits.max_value_bytes: 100 is larger than limits.max_message_bytes (50)"]),
    ("message under default", "limits: {max_message_bytes: 100}\n" + NODE,
     ["limits.max_message_bytes: 100 is smaller than limits.max_key_bytes (65536, the default)"]),
    ("move batch over message",
     ("limits: {max_key_bytes: 10, max_value_bytes: 10, max_message_bytes: 8192}\n"
      "proxy: {move_batch_bytes: 10000}\n" + NODE),
     ["proxy.move_batch_bytes: 10000 is larger than limits.max_message_bytes (8192)"]),
    # limits that cannot work together
    ("value as large as a message",
     "limits: {max_value_bytes: 1048576, max_message_bytes: 1048576}\n" + NODE,
     ["limits.max_message_bytes", "must hold a SET of the longest key and the largest value",
      "at least max_key_bytes + max_value_bytes + 4096"]),
    ("too few frames for a client", "limits: {max_frames: 2}\n" + NODE,
     ["limits.max_frames", "at least 3"]),
    ("followers type", "followers: {port: 8001}\n" + NODE,
     ["followers: expected a list"]),
    ("follower on the proxy", "proxy: {port: 8000}\nfollowers: [{port: 8000}]\n" + NODE,
     ["followers[0]: address 127.0.0.1:8000 is already used by the proxy"]),
    ("follower without a port", "followers: [{host: 127.0.0.1}]\n" + NODE,
     ["followers[0]: missing port"]),
    ("resp port range", "proxy: {resp_port: 70000}\n" + NODE,
     ["proxy.resp_port: 70000 is out of range"]),
    ("resp admin text", "proxy: {resp_admin: 'yes'}\n" + NODE,
     ["proxy.resp_admin: expected true or false"]),
    ("resp port on a node", "proxy: {resp_port: 8081}\n" + NODE,
     ["nodes[0]: address 127.0.0.1:8081 is already used by the proxy's RESP front"]),
    ("follower resp port taken", "proxy: {resp_port: 6380}\nfollowers: [{port: 8001, "
     "resp_port: 6380}]\n" + NODE,
     ["followers[0].resp_port: 127.0.0.1:6380 is already used by the proxy's RESP front"]),
    ("metrics port on the proxy", "proxy: {port: 8000, metrics_port: 8000}\n" + NODE,
     ["is already used by the proxy"]),
    ("node metrics port on a node",
     "nodes:\n  - {port: 8081, metrics_port: 8082}\n  - {port: 8082}\n",
     ["nodes[1]: address 127.0.0.1:8082 is already used by nodes[0].metrics_port"]),
    ("section type", "proxy: [1, 2]\n" + NODE, ["proxy: expected a mapping", "a list"]),
    ("limits type", "limits: 5\n" + NODE, ["limits: expected a mapping"]),
    ("nodes missing", "proxy: {port: 8000}\n", ["nodes: missing"]),
    ("nodes empty", "nodes: []\n", ["nodes: the list is empty"]),
    ("nodes type", "nodes: {port: 8081}\n", ["nodes: expected a list"]),
    ("node type", "nodes:\n  - 127.0.0.1:8081\n", ["nodes[0]: expected a mapping"]),
    ("node null", "nodes:\n  -\n", ["nodes[0]: expected a mapping", "null"]),
    ("node without port", "nodes:\n  - {port: 8081}\n  - {host: 127.0.0.1}\n",
     ["nodes[1]: missing port"]),
    ("address and port", "nodes:\n  - {address: '127.0.0.1:8081', port: 8081}\n",
     ["nodes[0]: give either address or host and port"]),
    ("address and host", "nodes:\n  - {address: '127.0.0.1:8081', host: 127.0.0.1}\n",
     ["nodes[0]: give either address or host and port"]),
    ("address no port", "nodes:\n  - address: 127.0.0.1\n",
     ["nodes[0].address: '127.0.0.1' is not HOST:PORT", "missing :PORT"]),
    ("address bad port", "nodes:\n  - address: 'h:99999'\n", ["nodes[0].address", "out of range"]),
    ("address v6 unbracketed", "nodes:\n  - address: '::1:8081'\n",
     ["nodes[0].address", "brackets"]),
    ("address type", "nodes:\n  - address: 8081\n", ["nodes[0].address: expected text HOST:PORT"]),
    ("duplicate node", ("nodes:\n  - address: 127.0.0.1:8081\n  - address: 127.0.0.1:8082\n"
                         "  - {host: 127.0.0.1, port: 8081}\n"),
     ["nodes[2]: address 127.0.0.1:8081 is already used by nodes[0]"]),
    ("node on proxy", "nodes:\n  - address: 127.0.0.1:8081\n  - address: 127.0.0.1:8000\n",
     ["nodes[1]: address 127.0.0.1:8000 is already used by the proxy"]),
    ("node on custom proxy",
     "proxy: {host: 0.0.0.0, port: 9000}\nnodes:\n  - address: 0.0.0.0:9000\n",
     ["nodes[0]: address 0.0.0.0:9000 is already used by the proxy"]),
    ("same host spelled twice",
     "nodes:\n  - address: LOCALHOST:8081\n  - address: localhost:8081\n",
     ["nodes[1]: address localhost:8081 is already used by nodes[0]"]),
    ("shared data_dir", "nodes:\n  - {port: 8081, data_dir: ./d}\n  - {port: 8082, data_dir: d/}\n",
     ["nodes[1].data_dir: 'd/' is already used by nodes[0].data_dir"]),
    ("data_dir is proxy state", "nodes:\n  - {port: 8081, data_dir: ./data/proxy}\n",
     ["nodes[0].data_dir", "the proxy's state_dir"]),
    ("replicas not a list", "nodes:\n  - {port: 8081, replicas: 127.0.0.1:8091}\n",
     ["nodes[0].replicas: expected a list of HOST:PORT"]),
    ("replica address bad", "nodes:\n  - {port: 8081, replicas: [nowhere]}\n",
     ["nodes[0].replicas[0].address"]),
    ("replica on its primary", "nodes:\n  - {port: 8081, replicas: [127.0.0.1:8081]}\n",
     ["nodes[0].replicas[0]: address 127.0.0.1:8081 is already used by nodes[0]"]),
    ("replica on another node",
     "nodes:\n  - {port: 8081, replicas: [127.0.0.1:8082]}\n  - {port: 8082}\n",
     ["nodes[1]: address 127.0.0.1:8082 is already used by nodes[0].replicas[0]"]),
    ("replica weight", "nodes:\n  - {port: 8081, replicas: [{port: 8091, weight: 2}]}\n",
     ["nodes[0].replicas[0]", "weight"]),
    ("replica shares a data_dir",
     "nodes:\n  - {port: 8081, data_dir: d, replicas: [{port: 8091, data_dir: d}]}\n",
     ["nodes[0].replicas[0].data_dir: 'd' is already used by nodes[0].data_dir"]),
    ("min_in_sync zero", "proxy: {min_in_sync: 0}\n" + NODE, ["proxy.min_in_sync"]),
    ("min_in_sync above a shard's copies",
     "proxy: {min_in_sync: 2}\nnodes:\n  - {port: 8081, replicas: [127.0.0.1:8091]}\n"
     "  - {port: 8082}\n",
     ["nodes[1] (127.0.0.1:8082): 1 copy", "fewer than proxy.min_in_sync (2)"]),
]


@pytest.mark.parametrize(("text", "fragments"), [c[1:] for c in BAD_FIELDS],
                         ids=[c[0] for c in BAD_FIELDS])
def test_bad_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = load_error(write(tmp_path, text))
    for fragment in fragments:
        assert fragment in message, message


def test_parse_topology_prefixes_the_source() -> None:
    data = {"nodes": [{"port": 1}, {"port": 2, "fsync": "sometimes"}]}
    with pytest.raises(ConfigError) as info:
        parse_topology(data, "configs/x.yaml")
    assert str(info.value) == (
        "configs/x.yaml: nodes[1].fsync: 'sometimes' is not one of always, everysec, no"
    )


def test_non_text_keys_are_unknown(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, "nodes:\n  - {port: 8081, 1: 2}\n"))
    assert "nodes[0]: unknown key 1" in message


# --- addresses -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8000", ("127.0.0.1", 8000)),
    ("localhost:1", ("localhost", 1)),
    ("Node-1.Example.COM:65535", ("node-1.example.com", 65535)),
    ("zkv_node1:8081", ("zkv_node1", 8081)),
    ("[::1]:8000", ("::1", 8000)),
    ("[0:0::1]:8000", ("::1", 8000)),
    ("0.0.0.0:8081", ("0.0.0.0", 8081)),
    (" 127.0.0.1:8000 ", ("127.0.0.1", 8000)),
])
def test_parse_address_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", [
    "127.0.0.1", "127.0.0.1:", ":8000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:80x",
    "127.0.0.1:+80", "127.0.0.1:-1", "::1:8000", "[::1]8000", "[127.0.0.1]:8000", "[::1]:",
    "bad host:80", "-bad:80", "999.1.1.1:80", "1.2.3:80", "", "a..b:80",
])
def test_parse_address_bad(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, what="--node")
    assert str(info.value).startswith("--node: ")
    assert repr(text.strip()) in str(info.value) or repr(text) in str(info.value)


def test_parse_address_rejects_non_text() -> None:
    with pytest.raises(ConfigError, match="expected text HOST:PORT"):
        parse_address(8000)  # type: ignore[arg-type]


@pytest.mark.parametrize(("host", "port", "text"), [
    ("127.0.0.1", 8000, "127.0.0.1:8000"), ("::1", 80, "[::1]:80"), ("db", 1, "db:1"),
])
def test_format_address_round_trips(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert parse_address(text) == (host, port)


# --- the model ------------------------------------------------------------------------------


def test_fsync_policies() -> None:
    assert FSYNC_POLICIES == ("always", "everysec", "no")


def test_dataclasses_are_frozen_and_validated() -> None:
    node = NodeConfig(port=8081, weight=2)
    assert node.weight == 2.0 and isinstance(node.weight, float)
    with pytest.raises(AttributeError):
        node.port = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="^port: 0 is out of range"):
        NodeConfig(port=0)
    with pytest.raises(ConfigError, match="^fsync: 'sometimes'"):
        NodeConfig(port=1, fsync="sometimes")
    with pytest.raises(ConfigError, match="^timeout_ms"):
        ProxyConfig(timeout_ms=0)
    assert NodeConfig(host="[::1]", port=1).host == "::1"
    assert NodeConfig(port=1, data_dir="x").resolved_data_dir() == "x"


def test_proxy_defaults_bind_to_loopback() -> None:
    proxy = ProxyConfig()
    assert (proxy.host, proxy.port, proxy.state_dir) == ("127.0.0.1", 8000, "./data/proxy")
    assert (proxy.timeout_ms, proxy.heartbeat_ms, proxy.heartbeat_misses) == (2000, 500, 3)
    assert (proxy.move_batch_keys, proxy.move_batch_bytes) == (1000, 1024 * 1024)
    assert proxy.vnodes >= 1
    assert NodeConfig(port=1).host == "127.0.0.1"


def _topology() -> Topology:
    return parse_topology({"nodes": [
        {"address": "127.0.0.1:8081"},
        {"address": "127.0.0.1:8082", "weight": 2},
        {"address": "10.0.0.2:8082"},
    ]}, "t.yaml")


def test_node_lookup() -> None:
    topo = _topology()
    assert topo.node("127.0.0.1:8081") is topo.nodes[0]
    assert topo.node(8081) is topo.nodes[0]
    assert topo.node("8081") is topo.nodes[0]
    assert topo.node("10.0.0.2:8082") is topo.nodes[2]
    assert topo.node("127.0.0.1:8082").weight == 2.0
    assert topo.node(" 127.0.0.1:8081 ") is topo.nodes[0]


@pytest.mark.parametrize(("wanted", "fragment"), [
    (9999, "no node at port 9999; the nodes are 127.0.0.1:8081"),
    ("127.0.0.1:9999", "no node at 127.0.0.1:9999"),
    (8082, "port 8082 matches several nodes (127.0.0.1:8082, 10.0.0.2:8082); give HOST:PORT"),
    ("nonsense", "'nonsense' is not HOST:PORT"),
])
def test_node_lookup_errors(wanted: str | int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        _topology().node(wanted)
    assert str(info.value).startswith("t.yaml: ")
    assert fragment in str(info.value)


def test_members() -> None:
    assert _topology().members() == {
        "127.0.0.1:8081": 1.0, "127.0.0.1:8082": 2.0, "10.0.0.2:8082": 1.0,
    }


# --- flags ----------------------------------------------------------------------------------


def test_topology_from_flags() -> None:
    proxy = ProxyConfig(port=9000, limits=Limits(max_batch=7))
    topo = topology_from_flags(["127.0.0.1:8081", "[::1]:8082"], proxy)
    assert topo.source == "<flags>"
    assert topo.proxy is proxy
    assert [n.address for n in topo.nodes] == ["127.0.0.1:8081", "[::1]:8082"]
    assert all(n.limits.max_batch == 7 for n in topo.nodes)
    assert topo.node(8082).host == "::1"


@pytest.mark.parametrize(("nodes", "fragment"), [
    ([], "no nodes given"),
    (["127.0.0.1"], "--node: '127.0.0.1' is not HOST:PORT"),
    (["127.0.0.1:8081", "127.0.0.1:8081"], "already used by --node 127.0.0.1:8081 (#1)"),
    (["127.0.0.1:8000"], "already used by the proxy"),
])
def test_topology_from_flags_errors(nodes: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        topology_from_flags(nodes, ProxyConfig())
    assert fragment in str(info.value)
