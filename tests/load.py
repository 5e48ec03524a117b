"""A load of client threads for the tests that kill and move things under it.

Each worker thread has its own client and its own keys, and keeps for every key the
set of values it may hold: exactly one after an acknowledged call, more after a call
that raised zkv.Unavailable (a timeout, a node down: the outcome is unknown), None
meaning deleted. Any other error is a failure of the test. Reads must return one of
the possible values; afterwards :func:`read_back` checks every key the same way.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass
from itertools import accumulate
from typing import Any, Self

import zkv
from zkv.core.ring import Ring

Possible = dict[bytes, set[bytes | None]]


@dataclass(frozen=True)
class Mix:
    """The shares of a worker's calls: SET, DEL, MSET of 3 keys, MGET of 3 keys; the
    rest are single GETs."""

    set: float
    delete: float
    mset: float
    mget: float


class Worker(threading.Thread):
    """SET, DEL, GET, MSET and MGET on its own keys (``<name>-00000`` ...), in the
    proportions of ``mix``, sleeping ``pause`` seconds after each call."""

    def __init__(self, address: str, name: str, keys: int, stop: threading.Event,
                 initial: dict[bytes, bytes], mix: Mix, pause: float = 0.0,
                 seed: int = 0, direct: bool = False) -> None:
        super().__init__(daemon=True, name=f"worker-{name}")
        self.client = zkv.Client(address, timeout=2.0, retries=0, direct=direct)
        self.tag = name.encode()
        self.keys = [b"%s-%05d" % (self.tag, i) for i in range(keys)]
        self.rng = random.Random(f"{name}-{seed}")
        self.stop = stop
        self.bounds = list(accumulate(astuple(mix)))
        self.pause = pause
        self.possible: Possible = {k: {initial.get(k)} for k in self.keys}
        self.acked_sets = 0
        self.acked_dels = 0
        self.unknown = 0  # writes that raised
        self.reads = 0
        self.read_errors = 0
        self.stale_reads: list[tuple[bytes, Any, set[Any]]] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        set_, delete, mset, mget = self.bounds
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                key = self.rng.choice(self.keys)
                r = self.rng.random()
                if r < set_:
                    value = b"%s-%d" % (key, n)
                    self._write({key: value}, self.client.set, key, value)
                elif r < delete:
                    self._write({key: None}, self.client.delete, key)
                elif r < mset:
                    values: dict[bytes, bytes | None] = {
                        k: b"%s-%d-m" % (k, n) for k in set(self.rng.sample(self.keys, 3))}
                    self._write(values, self.client.mset, values)
                elif r < mget:
                    self._read(self.rng.sample(self.keys, 3))
                else:
                    self._read([key])
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            self.failure = exc
        finally:
            self.client.close()

    def _write(self, values: dict[bytes, bytes | None], call: Any, *args: Any) -> None:
        try:
            call(*args)
        except zkv.Unavailable:  # Timeout, NodeUnavailable: applied or not, unknown
            self.unknown += 1
            for k, v in values.items():
                self.possible[k].add(v)
            time.sleep(0.02)
            return
        for k, v in values.items():
            self.possible[k] = {v}
            if v is None:
                self.acked_dels += 1
            else:
                self.acked_sets += 1

    def _read(self, keys: list[bytes]) -> None:
        try:
            got = self.client.mget(keys) if len(keys) > 1 else [self.client.get(keys[0])]
        except zkv.Unavailable:
            self.read_errors += 1
            time.sleep(0.02)
            return
        self.reads += len(keys)
        for k, v in zip(keys, got):
            if v not in self.possible[k]:
                self.stale_reads.append((k, v, set(self.possible[k])))


class Load:
    """Worker threads on disjoint key sets (``<prefix><n>-...``), started and stopped
    as a context."""

    def __init__(self, address: str, mix: Mix, initial: dict[bytes, bytes] | None = None,
                 workers: int = 4, keys_each: int = 500, pause: float = 0.0,
                 prefix: str = "w", direct: bool = False) -> None:
        self.stop = threading.Event()
        self.workers = [Worker(address, f"{prefix}{w}", keys_each, self.stop, initial or {},
                               mix, pause, seed=w, direct=direct) for w in range(workers)]

    def __enter__(self) -> Self:
        for w in self.workers:
            w.start()
        time.sleep(0.3)  # let the load get going before anything changes
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for w in self.workers:
            w.join(20)

    def possible(self) -> Possible:
        out: Possible = {}
        for w in self.workers:
            out.update(w.possible)
        return out

    def totals(self) -> dict[str, int]:
        return {
            "acked_sets": sum(w.acked_sets for w in self.workers),
            "acked_dels": sum(w.acked_dels for w in self.workers),
            "unknown": sum(w.unknown for w in self.workers),
            "reads": sum(w.reads for w in self.workers),
            "read_errors": sum(w.read_errors for w in self.workers),
            "stale_reads": sum(len(w.stale_reads) for w in self.workers),
        }

    def check_threads(self) -> None:
        for w in self.workers:
            assert not w.is_alive(), f"{w.name} did not stop"
            assert w.failure is None, f"{w.name} failed: {w.failure!r}"
        stale = [s for w in self.workers for s in w.stale_reads]
        assert not stale, (f"{len(stale)} reads returned a value that was neither the latest "
                           f"acknowledged one nor an unknown-outcome one: {stale[:5]}")


def read_back(mget: Callable[[list[bytes]], list[bytes | None]], expected: Possible,
              tally: dict[str, int] | None = None) -> dict[bytes, bytes]:
    """Read every key back, 1000 to an ``mget``: each must hold one of its possible
    values (a lost acknowledged write or an undone acknowledged delete is a loss).
    Adds the keys checked and the losses to ``tally``'s ``keys_checked`` and ``losses``
    if given. Returns the keys that exist, with their values."""
    keys = sorted(expected)
    found: dict[bytes, bytes] = {}
    losses: list[tuple[bytes, Any, Any]] = []
    for i in range(0, len(keys), 1000):
        chunk = keys[i:i + 1000]
        for key, value in zip(chunk, mget(chunk)):
            if value not in expected[key]:
                losses.append((key, value, expected[key]))
            if value is not None:
                found[key] = value
    if tally is not None:
        tally["keys_checked"] += len(keys)
        tally["losses"] += len(losses)
    assert not losses, f"{len(losses)} keys lost or reverted, e.g. {losses[:5]}"
    return found


def assert_counts_match_ring(client: zkv.Client, present: set[bytes]) -> dict[str, int]:
    """No move under way, and every node holds exactly the keys the ring gives it: none
    left on an old owner."""
    status = client.status()
    assert status["move"] is None
    ring = Ring(status["members"], status["vnodes"])
    want = {m: 0 for m in ring.members}
    for key in present:
        want[ring.owner(key)] += 1
    have = {n["address"]: n["keys"] for n in client.nodes()}
    assert have == want, f"node key counts {have} != the ring's shares {want}"
    return have
