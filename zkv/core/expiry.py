"""When keys with a time to live fall due: the keyspace's expiry wheel. No clock.

Deadlines are absolute, in milliseconds since the Unix epoch, and the map of
deadlines (``Keyspace.expires``) is the truth. The wheel only says which keys
may be due: it files each key under the slot of SLOT_MS milliseconds its deadline
falls in, and :meth:`ExpiryWheel.due` hands out the keys of the slots that have
ended, a bounded number per call, so that expiring a million keys at once costs
the node many short turns rather than one long one. An entry is advisory: a key
whose deadline changed (or that went) since it was filed is checked against the
map and passed over. Redis samples keys with a TTL at random instead; a wheel
finds every due key without sampling, at one list slot (8 bytes) per deadline.

Entries that no longer match a deadline (a TTL set again and again) are bounded:
when they outnumber the deadlines by COMPACT_FACTOR, the wheel is rebuilt from
the map.
"""

from __future__ import annotations

import heapq

SLOT_MS = 100
MAX_DEADLINE = 1 << 62  # ms since the epoch: far past any real date, still an int64
COMPACT_FACTOR = 2
COMPACT_MIN = 4096


class ExpiryWheel:
    __slots__ = ("entries", "heap", "slots")

    def __init__(self) -> None:
        self.slots: dict[int, list[bytes]] = {}
        self.heap: list[int] = []  # slot numbers, each once
        self.entries = 0

    def add(self, key: bytes, deadline: int) -> None:
        slot = deadline // SLOT_MS
        keys = self.slots.get(slot)
        if keys is None:
            self.slots[slot] = [key]
            heapq.heappush(self.heap, slot)
        else:
            keys.append(key)
        self.entries += 1

    def due(self, now_ms: int, limit: int) -> list[bytes]:
        """Up to ``limit`` keys filed under slots that ended by ``now_ms`` (to check)."""
        out: list[bytes] = []
        heap, slots = self.heap, self.slots
        end = (now_ms // SLOT_MS)  # slots before this one have ended
        while heap and heap[0] < end and len(out) < limit:
            slot = heap[0]
            keys = slots[slot]
            take = min(limit - len(out), len(keys))
            out.extend(keys[len(keys) - take:])
            del keys[len(keys) - take:]
            if not keys:
                heapq.heappop(heap)
                del slots[slot]
        self.entries -= len(out)
        return out

    def next_due(self) -> int | None:
        """When the earliest filed slot ends (ms), or None when nothing is filed."""
        return (self.heap[0] + 1) * SLOT_MS if self.heap else None

    def needs_compaction(self, deadlines: int) -> bool:
        return self.entries > COMPACT_FACTOR * deadlines + COMPACT_MIN

    def rebuild(self, deadlines: dict[bytes, int]) -> None:
        self.slots, self.heap, self.entries = {}, [], 0
        for key, deadline in deadlines.items():
            self.add(key, deadline)
