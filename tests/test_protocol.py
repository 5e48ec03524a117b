"""The wire codec as pure functions: bounded decoding, the fast path, field checks,
glob patterns and the limits' own consistency (zkv.core.protocol, zkv.core.cbor, zkv.core.glob)."""

from __future__ import annotations

import struct
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zkv.core import cbor, glob
from zkv.core import protocol as P
from zkv.errors import LimitExceeded, ProtocolError, UnknownCommand

LIMITS = P.Limits(max_key_bytes=1024, max_value_bytes=4096, max_batch=50,
                  max_message_bytes=1 << 20)


def refused(body: bytes, limits: P.Limits = LIMITS) -> str:
    with pytest.raises(ProtocolError) as info:
        P.parse_request(body, limits)
    return str(info.value)


# -- amplification: structure that costs far more than it weighs --------------------


def test_many_empty_arrays_are_refused_at_the_first_head() -> None:
    # 8M empty arrays in 8 MiB used to decode into 8M lists (~600 MiB, seconds)
    body = b"\x9a" + struct.pack(">I", 8_000_000) + b"\x80" * 8_000_000
    message = refused(body, P.DEFAULT_LIMITS)
    assert "an array of 8000000 entries" in message and "at most 8" in message


def test_a_request_with_more_items_than_its_shape_allows_is_refused() -> None:
    # a PIPE of [] commands: each tiny, far more than max_batch allows in one message
    body = cbor2.dumps(["PIPE", [[]] * 100_000])
    assert "entries; at most 100 allowed" in refused(body)
    nested = cbor2.dumps(["MGET", [[b"k"] * 40] * 40])  # 1,600 items under a 50-key limit
    assert "more than 664 items" in refused(nested)  # 12 items a command (max_items)


def test_nesting_deeper_than_any_request_is_refused() -> None:
    item: Any = b"k"
    for _ in range(6):
        item = [item]
    assert "nest" in refused(cbor2.dumps(["GET", item]))


def test_shared_references_are_refused() -> None:
    # tag 28 marks a value shareable, tag 29 refers back to it: one 1 KiB value
    # referenced many times would re-encode (and be logged) many times over
    value = b"\xd8\x1c" + cbor2.dumps(b"v" * 1000)
    refs = b"\xd8\x1d\x00" * 40
    pairs = bytes([0x98, 82]) + cbor2.dumps(b"k0") + value + b"".join(
        cbor2.dumps(b"k%d" % i) + b"\xd8\x1d\x00" for i in range(1, 41))
    body = b"\x82\x64MSET" + pairs
    assert "tags are not allowed" in refused(body)
    assert refs  # (the same refusal for bodies large enough to be walked first)
    big = b"\x82\x64MSET" + bytes([0x98, 2 * 20]) + \
        cbor2.dumps(b"k") + value + (cbor2.dumps(b"k") + b"\xd8\x1d\x00") * 19
    assert len(big) > LIMITS.max_items  # walked by check_shape before any decoding
    assert "tags are not allowed" in refused(big)


@pytest.mark.parametrize("tag", [0, 1, 2, 3, 4, 30, 35, 36, 37, 258, 55799, 9999])
def test_every_tag_is_refused(tag: int) -> None:
    # tag 35 would compile a regular expression, tag 2 build a bignum of any size
    body = cbor2.dumps(["GET", cbor2.CBORTag(tag, b"\x01" * 20)])
    message = refused(body)
    assert ("bignums of more than 9 bytes" if tag == 2 else "tags are not allowed") in message


def test_a_huge_integer_cursor_is_a_clear_error_not_internal() -> None:
    body = cbor2.dumps(["SCAN", 10**5000])  # a bignum: tag 2 over 2 KiB
    assert "bignums of more than 9 bytes" in refused(body)
    with pytest.raises(ProtocolError, match="numeric cursor"):
        P.check_request(["SCAN", 2**64 + 5], LIMITS)
    with pytest.raises(ProtocolError, match="cursor must be"):
        P.check_request(["SCAN", "x" * 200], LIMITS)


def test_hash_space_end_is_a_small_bignum_that_moves_may_carry() -> None:
    body = cbor2.dumps(["XBEGIN", {"id": "e2", "ranges": [[0, 2**64]], "purge": True}])
    op, args = P.parse_request(body, LIMITS)
    assert op == "XBEGIN" and args[0]["ranges"] == [[0, 2**64]]


def test_indefinite_lengths_and_trailing_bytes_are_refused() -> None:
    assert "indefinite" in refused(b"\x9f\x63GET\x41k\xff")
    assert "after the item" in refused(cbor2.dumps(["GET", b"k"]) + b"\x00")


def test_a_large_request_is_walked_before_it_is_decoded() -> None:
    # over max_items bytes: check_shape runs first and stops at the first bad head
    body = cbor2.dumps(["MSET", [b"k", b"v" * 3000] * 25])
    assert len(body) > LIMITS.max_items
    op, args = P.parse_request(body, LIMITS)
    assert op == "MSET" and len(args[0]) == 50
    bad = body[:-1]  # truncated
    assert "ends inside" in refused(bad) or "runs past" in refused(bad)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_a_protocol_error(data: bytes) -> None:
    try:
        P.parse_request(data, LIMITS)
    except ProtocolError:
        pass


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64 - 1) | st.binary(max_size=20)
    | st.text(max_size=10) | st.floats(),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=40))
def test_any_cbor_item_parses_or_raises_a_protocol_error(item: Any) -> None:
    try:
        P.parse_request(cbor2.dumps(item), LIMITS)
    except ProtocolError:
        pass


# -- the fast path ----------------------------------------------------------------------


@given(st.sampled_from(["GET", "DEL", "EXISTS", "SET"]), st.binary(max_size=1100),
       st.binary(max_size=4200))
def test_the_fast_path_agrees_with_the_general_one(op: str, key: bytes, value: bytes) -> None:
    item = [op, key, value] if op == "SET" else [op, key]
    body = cbor2.dumps(item)
    try:
        fast = P.parse_request(body, LIMITS)
    except ProtocolError as exc:
        fast = type(exc)  # type: ignore[assignment]
    try:
        general = P.check_request(cbor2.loads(body), LIMITS)
    except ProtocolError as exc:
        general = type(exc)  # type: ignore[assignment]
    assert fast == general


def test_lowercase_and_text_requests_still_take_the_general_path() -> None:
    assert P.parse_request(cbor2.dumps(["get", "key"]), LIMITS) == ("GET", [b"key"])
    with pytest.raises(UnknownCommand):
        P.parse_request(cbor2.dumps(["GETT", b"k"]), LIMITS)


# -- fields -----------------------------------------------------------------------------


def test_options_must_be_a_small_map_of_plain_values() -> None:
    with pytest.raises(ProtocolError, match="at most 16"):
        P.check_request(["ADD", "127.0.0.1:1", {f"k{i}": 1 for i in range(20)}], LIMITS)
    with pytest.raises(ProtocolError, match="option values"):
        P.check_request(["ADD", "127.0.0.1:1", {"weight": [1, 2]}], LIMITS)


def test_a_reply_budget_is_capped_by_the_message_limit() -> None:
    op, args = P.check_request(["MGET", [b"a"], 10**12], LIMITS)
    assert args[1] == LIMITS.max_message_bytes
    with pytest.raises(ProtocolError, match="budget"):
        P.check_request(["PIPE", [["PING"]], -1], LIMITS)
    assert P.COMMANDS["MGET"].usage == "MGET KEYS"  # the budget is not the user's business


# -- limits that cannot work together ------------------------------------------------------


def test_limits_must_fit_a_request_of_the_largest_key_and_value() -> None:
    with pytest.raises(ValueError, match="must hold a SET of the longest key"):
        P.Limits(max_value_bytes=1 << 20, max_message_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_frames must be at least 3"):
        P.Limits(max_frames=2)
    P.Limits(max_key_bytes=10, max_value_bytes=10, max_message_bytes=10 + 10 + 4096)


# -- glob patterns ----------------------------------------------------------------------


def redis_match(p: bytes, s: bytes) -> bool:
    """Redis's stringmatchlen (src/util.c), transcribed, as the reference."""
    def m(pi: int, si: int) -> bool:
        plen, slen = len(p), len(s)
        while pi < plen and si <= slen:
            c = p[pi]
            if c == 0x2A:
                while pi + 1 < plen and p[pi + 1] == 0x2A:
                    pi += 1
                if pi + 1 == plen:
                    return True
                return any(m(pi + 1, k) for k in range(si, slen))
            if si >= slen:
                return False
            if c == 0x3F:
                si += 1
            elif c == 0x5B:
                pi += 1
                neg = pi < plen and p[pi] == 0x5E
                if neg:
                    pi += 1
                hit = False
                while True:
                    if pi >= plen:
                        pi -= 1
                        break
                    if p[pi] == 0x5C and pi + 1 < plen:
                        pi += 1
                        hit = hit or p[pi] == s[si]
                    elif p[pi] == 0x5D:
                        break
                    elif pi + 2 < plen and p[pi + 1] == 0x2D:
                        lo, hi = sorted((p[pi], p[pi + 2]))
                        pi += 2
                        hit = hit or lo <= s[si] <= hi
                    else:
                        hit = hit or p[pi] == s[si]
                    pi += 1
                if neg:
                    hit = not hit
                if not hit:
                    return False
                si += 1
            elif c == 0x5C and pi + 1 < plen:
                pi += 1
                if p[pi] != s[si]:
                    return False
                si += 1
            else:
                if p[pi] != s[si]:
                    return False
                si += 1
            pi += 1
            if si == slen:
                while pi < plen and p[pi] == 0x2A:
                    pi += 1
                break
        return pi == plen and si == slen
    return m(0, 0)


@given(st.binary(max_size=8).map(lambda b: bytes(b"ab*?[]^-\\c"[x % 10] for x in b)),
       st.binary(max_size=6).map(lambda b: bytes(b"abc-^]"[x % 6] for x in b)))
def test_globs_match_as_redis_matches(pattern: bytes, key: bytes) -> None:
    matcher = glob.matcher(pattern)
    assert (matcher is None or bool(matcher.fullmatch(key))) == redis_match(pattern, key)


def test_patterns_are_bounded_in_size_and_wildcards() -> None:
    with pytest.raises(LimitExceeded, match="pattern of 2097152 bytes is over the limit"):
        glob.matcher(b"a" * (2 << 20))
    with pytest.raises(LimitExceeded, match="wildcards"):
        glob.matcher(b"*a" * 40)
    assert glob.matcher(b"\\*" * 40) is not None  # escaped stars are literals
    with pytest.raises(ProtocolError):  # checked when the request is parsed, at the proxy
        P.check_request(["KEYS", b"*" + b"x*" * 40], LIMITS)


def test_many_stars_match_in_linear_time_not_exponential() -> None:
    # *a*a*...*b against a run of a's: a backtracking matcher explores ~2**n paths
    matcher = glob.matcher(b"*a" * 30 + b"*b")
    assert matcher is not None and matcher.fullmatch(b"a" * 5000) is None


def test_check_shape_counts_and_bounds() -> None:
    body = cbor2.dumps(["SET", b"k", b"v"])
    assert cbor.check_shape(body, 10, 2, 10) == 4
    with pytest.raises(cbor.Malformed, match="more than 3 items"):
        cbor.check_shape(body, 3, 2, 10)
    with pytest.raises(cbor.Malformed, match="at most 2 allowed"):
        cbor.check_shape(body, 10, 2, 10, max_top=2)


def test_an_envelope_carries_its_clusters_tag_or_none() -> None:
    items = [(1, b"a"), (2, b"bc")]
    tag = P.cluster_tag("0123456789abcdef")
    assert len(tag) == 8 and tag != P.cluster_tag("another")
    assert P.decode_envelope(P.encode_envelope(7, items, tag), 10) == (7, items, tag)
    # a configuration from before cluster ids: the old form, no tag
    assert P.cluster_tag("") == b""
    assert P.decode_envelope(P.encode_envelope(7, items), 10) == (7, items, b"")
    with pytest.raises(ProtocolError):
        P.decode_envelope(P.encode_envelope(7, items, tag)[:15], 10)
