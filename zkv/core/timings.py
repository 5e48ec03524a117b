"""Latency histograms in fixed buckets, cheap enough to fill per request (one bisect
and two additions). Pure: the callers measure the time; zkv.metrics exposes these
to Prometheus, and INFO and zkv top read them.
"""

from __future__ import annotations

import bisect

# seconds: from 50 us (a GET at a node) to 10 s (a timeout)
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Timings:
    """Latency histograms by label (an op), cheap enough to fill per request."""

    __slots__ = ("counts", "sums")

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, label: str, seconds: float) -> None:
        counts = self.counts.get(label)
        if counts is None:
            counts = self.counts[label] = [0] * (len(BUCKETS) + 1)
            self.sums[label] = 0.0
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[label] += seconds

    def total(self) -> list[int]:
        """Counts per bucket over every label."""
        out = [0] * (len(BUCKETS) + 1)
        for counts in list(self.counts.values()):
            for i, n in enumerate(counts):
                out[i] += n
        return out


def quantile(counts: list[int], q: float) -> float | None:
    """The upper bound (seconds) of the bucket holding quantile ``q`` of ``counts`` (one
    count per BUCKETS entry, then the overflow), or None without samples."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return BUCKETS[i] if i < len(BUCKETS) else float("inf")
    return float("inf")
