"""Redis-style glob patterns over bytes keys, compiled to bounded regular expressions. No I/O.

The syntax is Redis's (``KEYS``, ``SCAN ... MATCH``): ``*`` any run of bytes,
``?`` one byte, ``[abc]``, ``[a-z]`` and ``[^a]`` byte classes, and ``\\x`` for
a literal ``x``; everything else stands for itself.

A pattern arrives from the network and is matched against every key of a node,
so both its compilation and its matching are bounded:

* :data:`MAX_PATTERN_BYTES` and :data:`MAX_WILDCARDS` (``*`` runs) cap what a
  pattern may be; longer ones are refused with a clear error before any work;
* translation is linear in the pattern, and each ``*`` compiles to an atomic
  group (``(?>.*?SEGMENT)``), which matches the fixed-width segment after it at
  its first position and never backtracks into it. That is exact for globs and
  keeps matching a key linear in the key per segment, never exponential.

Compiled matchers are cached, so a SCAN that sends the same pattern on every page
compiles it once.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ..errors import LimitExceeded

__all__ = ["MAX_PATTERN_BYTES", "MAX_WILDCARDS", "check_pattern", "matcher", "translate"]

MAX_PATTERN_BYTES = 1024
MAX_WILDCARDS = 32


def check_pattern(pattern: bytes) -> bytes:
    """``pattern`` if it is within the bounds; LimitExceeded naming the bound if not."""
    if len(pattern) > MAX_PATTERN_BYTES:
        raise LimitExceeded(
            f"pattern of {len(pattern)} bytes is over the limit of {MAX_PATTERN_BYTES}"
        )
    if pattern.count(b"*") > MAX_WILDCARDS and _star_runs(pattern) > MAX_WILDCARDS:
        raise LimitExceeded(
            f"pattern has {_star_runs(pattern)} '*' wildcards; at most {MAX_WILDCARDS}"
        )
    return pattern


def _star_runs(pattern: bytes) -> int:
    """How many runs of unescaped ``*`` the pattern has (``**`` is one)."""
    runs, i, n, prev_star = 0, 0, len(pattern), False
    while i < n:
        c = pattern[i]
        if c == 0x5C and i + 1 < n:  # backslash: the next byte is literal
            i += 2
            prev_star = False
            continue
        if c == 0x2A:
            if not prev_star:
                runs += 1
            prev_star = True
        else:
            prev_star = False
        i += 1
    return runs


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _byte(b: int) -> str:
    """One byte as a regex atom: itself when it is plain (cheaper to compile), else escaped."""
    return chr(b) if b in _PLAIN else f"\\x{b:02x}"


def _klass(pattern: bytes, i: int) -> tuple[str, int]:
    """The regex for the class starting after ``[`` at ``i``; and where the pattern goes on."""
    n = len(pattern)
    negate = i < n and pattern[i] == 0x5E  # ^
    if negate:
        i += 1
    members: list[str] = []
    while i < n and pattern[i] != 0x5D:  # ]
        c = pattern[i]
        if c == 0x5C and i + 1 < n:  # \x: a literal x
            members.append(_byte(pattern[i + 1]))
            i += 2
            continue
        if i + 2 < n and pattern[i + 1] == 0x2D:  # a-z (Redis takes "a-]" as a range too)
            lo, hi = c, pattern[i + 2]
            if lo > hi:
                lo, hi = hi, lo  # Redis accepts z-a
            members.append(f"{_byte(lo)}-{_byte(hi)}")
            i += 3
            continue
        members.append(_byte(c))
        i += 1
    i += 1  # past the ], or past the end: Redis closes an unterminated class there
    if not members:
        return ("." if negate else "(?!)"), i
    return f"[{'^' if negate else ''}{''.join(members)}]", i


def translate(pattern: bytes) -> str:
    """The regular expression (for ``re.fullmatch`` in DOTALL mode) of a glob."""
    segments: list[list[str]] = [[]]  # fixed-width pieces between runs of *
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:
            segments.append([])
            i += 1
            while i < n and pattern[i] == 0x2A:
                i += 1
            continue
        if c == 0x3F:
            segments[-1].append(".")
            i += 1
        elif c == 0x5B:
            klass, i = _klass(pattern, i + 1)
            segments[-1].append(klass)
        elif c == 0x5C and i + 1 < n:
            segments[-1].append(_byte(pattern[i + 1]))
            i += 2
        else:
            segments[-1].append(_byte(c))
            i += 1
    if len(segments) == 1:
        return "".join(segments[0])
    head, *middle, tail = ("".join(s) for s in segments)
    # *S1*S2*...*Sn: each middle segment at its first position (atomic: no backtracking),
    # then anything, then the tail, which must end the key.
    return head + "".join(f"(?>.*?{seg})" for seg in middle) + ".*" + tail


@lru_cache(maxsize=128)
def _compiled(pattern: bytes) -> re.Pattern[bytes]:
    return re.compile(translate(pattern).encode("ascii"), re.DOTALL)


def matcher(pattern: bytes | None) -> re.Pattern[bytes] | None:
    """A compiled matcher (use ``.fullmatch``) for a checked pattern; None matches every key."""
    if pattern is None or pattern == b"*":
        return None
    return _compiled(check_pattern(pattern))
