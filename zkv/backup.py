"""``zkv backup`` and ``zkv restore``: a whole cluster to a directory and back.

    zkv backup --proxy 127.0.0.1:8000 ./backup-2026-12-01
    zkv restore ./backup-2026-12-01 --proxy 127.0.0.1:9000

A backup asks every member (XBACKUP) to copy its keys as of one moment (one loop
turn on that node: a prefix of its acknowledged writes) and stream the copy, in
batches as a move does (PUSH to this process's PULL socket), and writes each node's
stream to a file of its own, in the log's record format (checksummed records; a
restore checks every file whole before it writes anything), then a MANIFEST.json
naming the epoch, the ring and each file's key count, last. Refused while a move is
under way, and failed if the epoch changed before the last stream ended. A restore
loads a backup into an empty cluster of any size: each file's keys go through the
proxy in MSET batches of a thousand, so the new ring places every key.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import zmq

from . import durable
from .client import Client
from .core import wal
from .core.transfer import decode_batch
from .errors import ClusterError, ProtocolError, Unavailable, ZkvError
from .security import CLUSTER_DOMAIN, Curve, Keyring

MANIFEST = "MANIFEST.json"
VERSION = 1
RESTORE_BATCH = 1000  # keys per MSET

Progress = Callable[[int, int], None]  # (keys done, keys in all)


def _file_name(i: int) -> str:
    return f"node-{i:03d}.zkv"


def backup(proxy: str, directory: str, listen: str = "127.0.0.1", timeout: float = 10.0,
           progress: Progress | None = None, curve_key: str | None = None,
           server_key: str | None = None) -> dict[str, Any]:
    """Back the cluster behind ``proxy`` up into ``directory`` (new or empty); the
    manifest written. ``listen``: the address nodes can reach this process at.
    ``curve_key``/``server_key`` as zkv.Client's (with CURVE: the cluster key)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ClusterError(f"{directory} is not a directory; back up into a new directory")
    if os.path.exists(directory) and os.listdir(directory):
        raise ClusterError(f"{directory} is not empty; back up into a new directory")
    with Client(proxy, timeout=timeout, curve_key=curve_key, server_key=server_key) as c:
        curve = c.curve
        if curve is not None and curve.public != curve.server_public:
            raise ClusterError(
                "with CURVE, zkv backup runs with the cluster key (ZKV_CURVE_KEY="
                ".../cluster.key_secret): the nodes stream only to it, and only cluster "
                "keys may ask them to")
        if c.status().get("move") is not None:
            raise ClusterError("a move is under way; back up once STATUS shows none")
        doc = c.call("CONFIG")
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("members"), dict):
        raise ProtocolError(f"{proxy} did not give the cluster configuration")
    members = sorted(config["members"])
    if not members:
        raise ClusterError("the cluster has no nodes: nothing to back up")
    shards = config.get("shards")
    shards = shards if isinstance(shards, dict) else {}
    # each shard's keys from its primary now (after a FAILOVER, not its first node)
    primary = {m: str(e.get("primary") or m) if isinstance(e := shards.get(m), dict) else m
               for m in members}
    made = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot make {directory}: {exc.strerror or exc}") from None
    backup_id = "backup-" + secrets.token_hex(6)
    ctx: zmq.Context[Any] = zmq.Context()
    server = None
    if curve is not None:  # a CURVE server taking pushes from cluster keys only
        server = Curve(curve.public, curve.secret, curve.public, Keyring({}, curve.public))
        server.start(ctx, "zkv backup")
    pull = ctx.socket(zmq.PULL)
    if server is not None:
        server.serve(pull, CLUSTER_DOMAIN)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.setsockopt(zmq.IPV6, 1)
    files: dict[str, Any] = {}
    expected: dict[str, int] = {}  # keys each node said it streams
    finished = False
    try:
        host = f"[{listen}]" if ":" in listen else listen
        try:
            port = pull.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            if made:
                os.rmdir(directory)  # (still empty: nothing was written)
            raise ClusterError(f"cannot listen on {listen!r} for the nodes' streams ({exc}): "
                               "--listen must be an address of this machine that the "
                               "nodes can reach") from None
        endpoint = f"tcp://{host}:{port}"
        for member in members:
            # (one try: --timeout is what a node that does not answer costs; a node
            # that got the request and did not answer closes its stream itself)
            with Client(primary[member], timeout=timeout, retries=0, curve_key=curve_key,
                        server_key=server_key) as node:
                answer = node.call("XBACKUP", {"id": backup_id, "pull": endpoint})
            expected[member] = int(answer["keys"])
        total = sum(expected.values())
        try:
            for i, member in enumerate(members):
                # (every key of the cluster: readable by its owner only)
                f = os.fdopen(os.open(os.path.join(directory, _file_name(i)),
                                      os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                f.write(wal.encode((wal.META, {"backup": backup_id, "node": member})))
                files[member] = f
            got = _receive(pull, backup_id, files, expected, timeout, progress, total)
            for f in files.values():
                f.close()
        except OSError as exc:
            raise ClusterError(f"cannot write the backup in {directory}: "
                               f"{exc.strerror or exc}") from None
        # a move (or FAILOVER) between reading the configuration and the last node's
        # copy could leave keys out: a node may have handed them on before its copy
        with Client(proxy, timeout=timeout, curve_key=curve_key, server_key=server_key) as c:
            now = c.call("CONFIG")
        epoch = now.get("epoch") if isinstance(now, dict) else None
        if epoch != doc.get("epoch"):
            raise ClusterError(
                f"the cluster's configuration changed during the backup (epoch "
                f"{doc.get('epoch')}, now {epoch}: a move, a FAILOVER or a replica joining "
                "or leaving); nothing was kept: run it again")
        manifest = {
            "version": VERSION, "backup": backup_id, "proxy": proxy,
            "taken": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "epoch": doc.get("epoch"), "config": config,
            "nodes": {m: {"file": _file_name(i), "keys": got[m]}
                      for i, m in enumerate(members)},
            "keys": sum(got.values()),
        }
        try:
            durable.fsync_dir(directory)
            durable.write_json(os.path.join(directory, MANIFEST), manifest, indent=2)
        except OSError as exc:
            raise ClusterError(f"cannot write the backup's {MANIFEST} in {directory}: "
                               f"{exc.strerror or exc}") from None
        finished = True
    finally:
        for member in expected:  # (the nodes whose streams were opened)
            try:
                with Client(primary[member], timeout=min(2.0, timeout), retries=0,
                            curve_key=curve_key, server_key=server_key) as node:
                    node.call("XBACKUP", {"id": backup_id, "close": True})
            except ZkvError:
                pass  # the node closes an unread stream itself after a while
        for f in files.values():
            try:
                f.close()
            except OSError:
                pass  # (a full disk: said above; the file goes below)
        if server is not None:
            server.stop()
        ctx.destroy(0)
        if not finished:  # no manifest: what was written is no backup, and goes
            _discard(directory, [_file_name(i) for i in range(len(members))], made)
    return manifest


def _discard(directory: str, names: list[str], made: bool) -> None:
    for name in [*names, MANIFEST]:
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    if made:
        try:
            os.rmdir(directory)
        except OSError:
            pass


def _receive(pull: zmq.Socket[Any], backup_id: str, files: dict[str, Any],
             expected: dict[str, int], timeout: float, progress: Progress | None,
             total: int) -> dict[str, int]:
    seqs = {m: 0 for m in files}
    got = {m: 0 for m in files}
    left = set(files)
    done = 0
    while left:
        if not pull.poll(int(timeout * 1000)):
            raise Unavailable(f"no backup batch from {', '.join(sorted(left))} for "
                              f"{timeout:.0f} s; the backup is incomplete")
        body = pull.recv()
        try:
            bid, source, seq, pairs, final, sent, _, deadlines, _ = decode_batch(body)
        except ProtocolError:
            continue  # not ours
        if bid != backup_id or source not in left:
            continue
        if seq != seqs[source]:
            raise Unavailable(f"the stream from {source} lost a batch (got {seq}, wanted "
                              f"{seqs[source]}); the backup is incomplete: run it again")
        seqs[source] += 1
        f = files[source]
        if pairs:
            f.write(wal.encode((wal.CHUNK, pairs)))
        if deadlines:  # (absolute times: the restored keys expire when these would have)
            f.write(wal.encode((wal.PXAT, [x for kd in deadlines.items() for x in kd])))
        got[source] += len(pairs) // 2
        done += len(pairs) // 2
        if final:
            # (fewer than the node counted at the start: keys that expired meanwhile,
            # which the node does not send; ``sent`` says every batch it sent came)
            if sent != got[source] or got[source] > expected[source]:
                raise Unavailable(f"the stream from {source} ended with {got[source]} keys "
                                  f"of {sent} sent; the backup is incomplete")
            f.write(wal.encode((wal.META, {"end": got[source]})))
            f.flush()
            os.fsync(f.fileno())
            left.discard(source)
        if progress is not None:
            progress(done, total)
    return got


def read_manifest(directory: str) -> dict[str, Any]:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ClusterError(f"{directory} is not a directory: give the directory zkv backup "
                           "wrote")
    if not os.path.exists(directory):
        raise ClusterError(f"{directory}: no such directory")
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ClusterError(f"{path} is missing: not a zkv backup (or an unfinished one)") \
            from None
    except (OSError, ValueError) as exc:
        raise ClusterError(f"{path} cannot be read: {exc}") from None
    nodes = manifest.get("nodes") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION \
            or not isinstance(nodes, dict) or not _count(manifest.get("keys")) \
            or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                       and _count(e.get("keys")) and os.sep not in e["file"]
                       for e in nodes.values()):
        raise ClusterError(f"{path} is not a zkv backup manifest (version {VERSION}): "
                           "nodes must map each node to its file and key count")
    return manifest


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_keys(directory: str, node: str, entry: dict[str, Any],
               backup_id: Any = None) -> tuple[list[list[bytes]], dict[bytes, int]]:
    """A node file's CHUNK records and the deadlines of its keys that have one, checked
    whole (records, end marker, key count, keys and values bytes, the backup's id)."""
    path = os.path.join(directory, entry["file"])
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as exc:
        raise ClusterError(f"{path} (the keys of {node}): {exc.strerror or exc}") from None
    scan = wal.LogScan(buf)
    chunks: list[list[bytes]] = []
    deadlines: dict[bytes, int] = {}
    count, end, ids = 0, None, set()
    for _, item in scan:
        if item[0] == wal.CHUNK and isinstance(item[1], list):
            if len(item[1]) % 2 or not all(type(x) is bytes for x in item[1]):
                raise ClusterError(f"{path} holds a batch that is not keys and values (bytes); "
                                   "nothing was restored")
            chunks.append(item[1])
            count += len(item[1]) // 2
        elif item[0] == wal.PXAT and isinstance(item[1], list):
            flat = item[1]
            deadlines.update((k, t) for k, t in zip(flat[0::2], flat[1::2])
                             if type(k) is bytes and type(t) is int and t > 0)
        elif item[0] == wal.META and isinstance(item[1], dict) and "end" in item[1]:
            end = item[1]["end"]
        elif item[0] == wal.META and isinstance(item[1], dict) and "backup" in item[1]:
            ids.add(item[1]["backup"])
    if scan.damage is not None:
        raise ClusterError(f"{path} is damaged at byte offset {scan.damage.offset} "
                           f"({scan.damage.reason}); nothing was restored")
    if backup_id is not None and ids != {backup_id}:
        named = ", ".join(map(str, ids)) or "none named"
        raise ClusterError(f"{path} is of another backup than its manifest ({named}, not "
                           f"{backup_id}); nothing was restored")
    if end != count or count != entry["keys"]:
        raise ClusterError(f"{path} holds {count} keys, its end marker says {end} and the "
                           f"manifest {entry['keys']}: incomplete; nothing was restored")
    return chunks, deadlines


PARTIAL = ("the cluster holds those keys now: empty it (zkv cli FLUSHALL) to run the restore "
           "again")


def _fits(node: str, chunks: list[list[bytes]], limits: dict[str, Any], proxy: str,
          seen: set[bytes]) -> None:
    """Every key of a node's file once in the backup (``seen``: the keys of the files
    checked before it), and within the target's size limits (else nothing is written)."""
    max_key = limits.get("max_key_bytes")
    max_value = limits.get("max_value_bytes")
    for pairs in chunks:
        for key, value in zip(pairs[0::2], pairs[1::2]):
            if key in seen:
                raise ClusterError(f"the backup holds key {key[:64]!r} twice (again in "
                                   f"{node}'s file); nothing was restored")
            seen.add(key)
            if isinstance(max_key, int) and len(key) > max_key:
                raise ClusterError(
                    f"key {key[:64]!r} is {len(key)} bytes, over the max_key_bytes "
                    f"({max_key}) of the cluster behind {proxy}; nothing was restored")
            if isinstance(max_value, int) and len(value) > max_value:
                raise ClusterError(
                    f"the value of {key[:64]!r} is {len(value)} bytes, over the "
                    f"max_value_bytes ({max_value}) of the cluster behind {proxy}; "
                    "nothing was restored")


def restore(directory: str, proxy: str, timeout: float = 10.0,
            progress: Progress | None = None) -> dict[str, Any]:
    """Load the backup in ``directory`` into the (empty) cluster behind ``proxy``."""
    manifest = read_manifest(directory)
    total = int(manifest.get("keys", 0))
    with Client(proxy, timeout=timeout) as c:
        down = [n["address"] for n in c.nodes() if n.get("state") != "up"]
        if down:  # (its keys would not be counted below, and the restore would stop)
            raise ClusterError(f"node {', '.join(down)} of the cluster behind {proxy} is "
                               "down; restore needs every node up; nothing was restored")
        held = int(c.info().get("totals", {}).get("keys", 0))
        if held:
            raise ClusterError(f"the cluster behind {proxy} holds {held} keys; restore needs "
                               "an empty cluster")
        if c.status().get("move") is not None:
            raise ClusterError("a move is under way; restore once STATUS shows none")
        doc = c.call("CONFIG")
        limits = doc.get("limits") if isinstance(doc, dict) else None
        limits = limits if isinstance(limits, dict) else {}
        nodes = sorted(manifest["nodes"].items())
        if sum(entry["keys"] for _, entry in nodes) != total:
            raise ClusterError(f"the manifest's key count ({total}) is not the sum of its "
                               "nodes'; nothing was restored")
        # every file is checked whole before anything is written, one at a time (what
        # is held meanwhile is one node's keys and values, and every key)
        seen: set[bytes] = set()
        for node, entry in nodes:
            _fits(node, _read_keys(directory, node, entry, manifest.get("backup"))[0],
                  limits, proxy, seen)
        del seen
        done = 0
        started = time.monotonic()
        try:
            for node, entry in nodes:  # (read again, and checked again as it is read)
                try:
                    chunks, deadlines = _read_keys(directory, node, entry,
                                                   manifest.get("backup"))
                except ClusterError as exc:
                    raise ClusterError(f"{entry['file']} changed after it was checked "
                                       f"({str(exc).split(';')[0]})") from None
                for pairs in chunks:
                    for i in range(0, len(pairs), 2 * RESTORE_BATCH):
                        chunk = pairs[i : i + 2 * RESTORE_BATCH]
                        c.mset(dict(zip(chunk[0::2], chunk[1::2])))
                        timed = [k for k in chunk[0::2] if k in deadlines]
                        if timed:
                            with c.pipeline() as p:
                                for key in timed:
                                    p.pexpireat(key, deadlines[key])
                                p.execute()
                        done += len(chunk) // 2
                        if progress is not None:
                            progress(done, total)
                chunks, deadlines = [], {}  # (gone before the next file is read)
        except ZkvError as exc:
            raise ClusterError(f"restore stopped after {done} of {total} keys: {exc}; "
                               f"{PARTIAL}") from None
        except KeyboardInterrupt:
            raise ClusterError(f"interrupted after {done} of {total} keys; {PARTIAL}") \
                from None
    return {"keys": done, "nodes": len(manifest["nodes"]), "backup": manifest.get("backup"),
            "seconds": round(time.monotonic() - started, 3)}


def _with_progress(label: str, run: Callable[[Progress], dict[str, Any]]) -> dict[str, Any]:
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    if not sys.stdout.isatty():  # (a bar, even a transient one, leaves a blank line)
        return run(lambda done, total: None)

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                  transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return run(update)


def backup_main(args: Any) -> int:
    try:
        manifest = _with_progress("backup", lambda p: backup(
            args.proxy, args.dir, args.listen, args.timeout, p))
    except KeyboardInterrupt:
        raise ClusterError(f"interrupted; nothing was kept in {args.dir}") from None
    print(f"backed up {manifest['keys']} keys of {len(manifest['nodes'])} nodes (epoch "
          f"{manifest['epoch']}) into {args.dir}")
    return 0


def restore_main(args: Any) -> int:
    result = _with_progress("restore", lambda p: restore(args.dir, args.proxy,
                                                          args.timeout, p))
    print(f"restored {result['keys']} keys from {result['nodes']} nodes' backup into "
          f"{args.proxy} in {result['seconds']:.1f} s")
    return 0


def add_parsers(sub: Any) -> None:
    from .cli import _seconds

    p = sub.add_parser("backup", help="back a running cluster up into a directory")
    p.add_argument("dir", metavar="DIR", help="a new (or empty) directory")
    p.add_argument("--proxy", default="127.0.0.1:8000", metavar="HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1", metavar="HOST",
                   help="the address of this machine that the nodes can reach "
                        "(they stream to it; default 127.0.0.1)")
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds to wait for a node's next batch (default 10)")
    p.set_defaults(func=backup_main)
    r = sub.add_parser("restore", help="load a backup into an empty cluster")
    r.add_argument("dir", metavar="DIR", help="a directory zkv backup wrote")
    r.add_argument("--proxy", default="127.0.0.1:8000", metavar="HOST:PORT")
    r.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds to wait for each reply (default 10)")
    r.set_defaults(func=restore_main)
