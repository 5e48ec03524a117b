"""The keys of a node in small buckets, so that a scan needs no copy of the key list. No I/O.

A Python dict cannot be iterated across requests while it changes, so SCAN (and a
move's range scan) used to copy the whole key list when it started: memory in
proportion to the keys, for every scan open. :class:`KeyBuckets` keeps the keys
a second time, by reference, in a table of short lists grown by *linear
hashing*: a key lives in bucket ``h & (base - 1)``, or ``h & (2 * base - 1)``
once that bucket has been split; when the table holds more than
:data:`LOAD` keys a bucket on average, the next bucket in order is split in two
(a few dozen keys moved, never the whole table).

A scan is then a bucket number, with no state on the node: it visits buckets in
order and returns whole buckets. Every key present from the start of a scan to
its end is returned, because a key only ever moves to a later bucket (splitting
bucket ``s`` moves keys to ``s + base``); a key may be returned twice if its
bucket splits behind the cursor. The table only grows.

Buckets use Python's ``hash()``, which is salted per process: fine for an index
that lives and dies with the process (a scan's cursor names the process it came
from), and never used where a key's place must agree between processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

LOAD = 32  # keys per bucket, on average, before the next split
FIRST = 16  # buckets in a new table


class KeyBuckets:
    __slots__ = ("base", "count", "lists", "split")

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self.lists: list[list[bytes]] = [[] for _ in range(FIRST)]
        self.base = FIRST  # the table has base + split buckets
        self.split = 0  # buckets below this one have been split at this level
        self.count = 0
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return self.count

    def _index(self, key: bytes) -> int:
        h = hash(key)
        i = h & (self.base - 1)
        if i < self.split:
            i = h & (2 * self.base - 1)
        return i

    def add(self, key: bytes) -> None:
        """Index a key that is not indexed yet."""
        self.lists[self._index(key)].append(key)
        self.count += 1
        if self.count > LOAD * len(self.lists):
            self._grow()

    def remove(self, key: bytes) -> None:
        """Forget an indexed key."""
        self.lists[self._index(key)].remove(key)
        self.count -= 1

    def _grow(self) -> None:
        s, mask = self.split, 2 * self.base - 1
        keep: list[bytes] = []
        move: list[bytes] = []
        for key in self.lists[s]:
            (keep if hash(key) & mask == s else move).append(key)
        self.lists[s] = keep
        self.lists.append(move)  # bucket s + base
        self.split += 1
        if self.split == self.base:
            self.base *= 2
            self.split = 0

    @property
    def buckets(self) -> int:
        return len(self.lists)

    def walk(self, start: int, want: int, max_buckets: int, max_bytes: int,
             keep: Callable[[bytes], object] | None = None) -> tuple[list[bytes], int]:
        """Keys of whole buckets from bucket ``start`` on, until ``want`` keys (before
        ``keep`` filters them), ``max_bytes`` bytes of keys or ``max_buckets`` buckets
        have been looked at; and the bucket to go on from (0 when the table is done)."""
        lists = self.lists
        found: list[bytes] = []
        seen = size = 0
        i = start
        end = min(len(lists), start + max_buckets)
        while i < end and seen < want and size < max_bytes:
            bucket = lists[i]
            seen += len(bucket)
            for key in bucket:
                size += len(key)
                if keep is None or keep(key):
                    found.append(key)
            i += 1
        return found, (0 if i >= len(lists) else i)

    def compact(self) -> None:
        """Every bucket a list made anew, the same keys in the same places: after many
        keys went, the old lists (made as keys came in, scattered among them) would keep
        the allocator's memory from going back to the system."""
        self.lists = [list(bucket) for bucket in self.lists]

    def __iter__(self) -> Iterator[bytes]:
        for bucket in self.lists:
            yield from bucket
