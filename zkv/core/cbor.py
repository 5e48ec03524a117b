"""Bounded CBOR decoding for bytes that come from the network. No I/O.

A CBOR item can cost far more to decode than it weighs: a few MiB of empty
arrays decode into millions of Python objects, and semantic tags let a small
body stand for a huge one (shared references, tags 28/29), for a big integer
(tag 2), or for work of their own (a regular expression, tag 35). zkv's
messages are plain arrays, maps, byte and text strings, integers, floats and
the simple values, so :func:`decode` accepts exactly that, and checks the
shape before the work is done:

* every tag is refused, built-in or not (no shared references, no regular
  expressions), but for tag 2 on at most :data:`MAX_BIGNUM_BYTES` bytes: the
  upper end of hash space, ``2**64``, is a bignum in CBOR;
* indefinite lengths are refused (zkv never writes them);
* nesting is bounded by ``max_depth`` (the outermost array is depth 1; cbor2
  counts a tag as a level too);
* the number of items is bounded by ``max_items``, and each array or map by
  ``max_len`` entries.

The item bound works without a pre-pass for small bodies: an item takes at
least one byte, so a body of at most ``max_items`` bytes cannot hold more.
Larger bodies are walked head by head first (:func:`check_shape`), which
stops at the first head over a bound, so a bad body costs at most
``max_items`` steps whatever its size. Anything else raises :class:`Malformed`,
whose message says what was wrong.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import cbor2

__all__ = ["Malformed", "check_shape", "decode"]

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from


MAX_BIGNUM_BYTES = 9  # enough for 2**64


class Malformed(ValueError):
    """The bytes are not a CBOR item zkv accepts; the message says why."""


def _refuse_tag(*_: Any) -> Any:
    raise Malformed("CBOR tags are not allowed")


def _small_bignum(value: Any, *_: Any) -> int:
    """Tag 2 (an unsigned bignum), decoded only when it is small."""
    if type(value) is not bytes or len(value) > MAX_BIGNUM_BYTES:
        raise Malformed(f"bignums of more than {MAX_BIGNUM_BYTES} bytes are not allowed")
    return int.from_bytes(value, "big")


class _EveryTag(dict[int, Any]):
    """cbor2's table of semantic decoders, overridden for every tag number."""

    def __contains__(self, tag: object) -> bool:
        return True

    def get(self, tag: object, default: Any = None) -> Any:
        return _small_bignum if tag == 2 else _refuse_tag

    def __getitem__(self, tag: object) -> Any:
        return self.get(tag)


_NO_TAGS = _EveryTag()


def check_shape(body: bytes, max_items: int, max_depth: int, max_len: int,
                max_top: int | None = None) -> int:
    """Walk the item heads of ``body`` without building anything; the number of items.

    Raises :class:`Malformed` at the first head that breaks a bound, at a tag or
    an indefinite length, at a truncated item, or at bytes after the item. The
    outermost container may hold at most ``max_top`` entries (``max_len`` if None).
    """
    n = len(body)
    pos = items = depth = 0
    remaining = 1  # items still to read in the innermost open container
    stack: list[int] = []
    try:
        while True:
            if remaining == 0:
                if not stack:
                    break
                remaining = stack.pop()
                depth -= 1
                continue
            remaining -= 1
            items += 1
            if items > max_items:
                raise Malformed(f"more than {max_items} items in one message")
            ib = body[pos]
            major, info = ib >> 5, ib & 31
            pos += 1
            if info < 24:
                arg = info
            elif info == 24:
                arg = body[pos]
                pos += 1
            elif info == 25:
                arg = _U16(body, pos)[0]
                pos += 2
            elif info == 26:
                arg = _U32(body, pos)[0]
                pos += 4
            elif info == 27:
                arg = _U64(body, pos)[0]
                pos += 8
            elif major == 7 and info == 31:
                raise Malformed("an unexpected break code")
            elif info == 31:
                raise Malformed("indefinite-length items are not allowed")
            else:
                raise Malformed(f"reserved additional information {info}")
            if major == 2 or major == 3:
                pos += arg
                if pos > n:
                    raise Malformed("a string runs past the end of the message")
            elif major == 4 or major == 5:
                limit = max_top if (max_top is not None and depth == 0) else max_len
                if arg > limit:
                    kind = "an array" if major == 4 else "a map"
                    raise Malformed(f"{kind} of {arg} entries; at most {limit} allowed here")
                if major == 5:
                    arg *= 2
                if arg:
                    depth += 1
                    if depth > max_depth:
                        raise Malformed(f"containers nested deeper than {max_depth}")
                    stack.append(remaining)
                    remaining = arg
            elif major == 6:
                if arg != 2:
                    raise Malformed("CBOR tags are not allowed")
                if pos >= n or not 0x40 <= body[pos] <= 0x40 + MAX_BIGNUM_BYTES:
                    raise Malformed(
                        f"bignums of more than {MAX_BIGNUM_BYTES} bytes are not allowed")
                remaining += 1  # the bignum's bytes follow as an item of their own
    except (IndexError, struct.error):
        raise Malformed("the message ends inside an item") from None
    if pos != n:
        raise Malformed(f"{n - pos} bytes after the item; a message is exactly one item")
    return items


def decode(body: bytes, max_items: int, max_depth: int, max_len: int,
           max_top: int | None = None) -> Any:
    """Decode one CBOR item from untrusted ``body`` within the bounds (see the module)."""
    if len(body) > max_items:
        check_shape(body, max_items, max_depth, max_len, max_top)
        try:
            return cbor2.loads(body, semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag,
                               max_depth=max_depth, allow_indefinite=False,
                               strict_hashable_types=True)
        except Exception as exc:  # cbor2 raises several types for malformed input
            raise Malformed(_reason(exc)) from None
    stream = io.BytesIO(body)
    try:
        item = cbor2.CBORDecoder(
            stream, semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag, max_depth=max_depth,
            allow_indefinite=False, strict_hashable_types=True,
        ).decode()
    except Exception as exc:
        raise Malformed(_reason(exc)) from None
    if stream.tell() != len(body):
        raise Malformed(
            f"{len(body) - stream.tell()} bytes after the item; a message is exactly one item"
        )
    return item


def _reason(exc: Exception) -> str:
    """cbor2's complaint, with our own refusal (raised inside a tag decoder) unwrapped."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, Malformed):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return f"not valid CBOR: {exc}"
