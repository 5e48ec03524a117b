"""Client.pipeline() and Client.call_many() through a real proxy and three nodes:
results in the order asked, errors in place, commands spread over every node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from conftest import Cluster, module_cluster
from hypothesis import given
from hypothesis import strategies as st

import zkv
from zkv.core import protocol as P
from zkv.core.ring import Ring

LIMITS = {"max_key_bytes": 64, "max_value_bytes": 1024}


@pytest.fixture(scope="module")
def shared(request: Any, tmp_path_factory: Any) -> Iterator[Cluster]:
    yield from module_cluster(request, tmp_path_factory, limits=LIMITS)


@pytest.fixture
def c(shared: Cluster) -> Iterator[zkv.Client]:
    with zkv.Client(shared.address, timeout=5.0) as client:
        yield client


@pytest.mark.timeout(60)
def test_results_come_back_in_the_order_asked_across_every_node(c: zkv.Client) -> None:
    keys = [f"pipe-order-{i}" for i in range(120)]
    status = c.status()
    owners = {Ring(status["members"], status["vnodes"]).owner(k.encode()) for k in keys}
    assert len(owners) == 3  # the pipeline really spans every node
    with c.pipeline() as p:
        for i, k in enumerate(keys):
            p.set(k, f"v{i}")
        for k in reversed(keys):
            p.get(k)
        p.exists(keys[0]).delete(keys[0]).exists(keys[0]).get(keys[0]).ping()
        results = p.execute()
    assert results[:120] == [True] * 120
    assert results[120:240] == [f"v{i}".encode() for i in reversed(range(120))]
    assert results[240:] == [True, True, False, None, True]
    assert c.mget(keys[1:4]) == [b"v1", b"v2", b"v3"]


@pytest.mark.timeout(60)
def test_a_write_then_a_read_of_the_same_key_in_one_pipeline_sees_the_write(
    c: zkv.Client,
) -> None:
    with c.pipeline() as p:
        p.set("pipe-rw", "one").get("pipe-rw").set("pipe-rw", "two").get("pipe-rw")
        p.delete("pipe-rw").get("pipe-rw")
        assert p.execute() == [True, b"one", True, b"two", True, None]


@pytest.mark.timeout(60)
def test_errors_stay_in_place_and_the_rest_still_runs(c: zkv.Client) -> None:
    with c.pipeline() as p:
        p.set("pipe-err-a", "fine")
        p.set("pipe-err-b", "x" * 2000)  # over max_value_bytes
        p.set("k" * 100, "v")  # over max_key_bytes
        p.get("pipe-err-a")
        results = p.execute(raise_on_error=False)
    assert results[0] is True and results[3] == b"fine"
    assert isinstance(results[1], zkv.LimitExceeded)
    assert isinstance(results[2], zkv.LimitExceeded)
    assert c.get("pipe-err-b") is None  # the refused write was not applied
    with c.pipeline() as p:
        p.set("pipe-err-c", "applied").set("pipe-err-d", "y" * 2000)
        with pytest.raises(zkv.LimitExceeded):
            p.execute()  # raises the first error, after every command ran
    assert c.get("pipe-err-c") == b"applied"


@pytest.mark.timeout(60)
def test_a_pipeline_longer_than_one_message_is_sent_in_several(c: zkv.Client) -> None:
    # 2,500 commands go as three PIPE messages, all in flight at once
    with c.pipeline() as p:
        for i in range(2500):
            p.set(f"pipe-long-{i}", f"{i}")
        p.get("pipe-long-0").get("pipe-long-2499")
        results = p.execute()
    assert results == [True] * 2500 + [b"0", b"2499"]


@pytest.mark.timeout(60)
def test_an_empty_pipeline_sends_nothing_and_call_many_keeps_order(c: zkv.Client) -> None:
    assert c.pipeline().execute() == []
    c.set("many-a", "1")
    results = c.call_many([("GET", [b"many-a"]), ("NOPE", []), ("GET", [b"many-missing"]),
                           ("SET", [b"many-b", b"2"]), ("GET", [b"many-b"])])
    assert results[0] == b"1" and isinstance(results[1], zkv.UnknownCommand)
    assert results[2:] == [None, "OK", b"2"]


reply_items = st.lists(st.one_of(
    st.tuples(st.just(0), st.one_of(st.binary(max_size=300), st.none(), st.just("OK"),
                                    st.integers(-2**70, 2**70), st.text(max_size=20),
                                    st.lists(st.binary(max_size=5), max_size=3))).map(list),
    st.tuples(st.just(1), st.text(max_size=10), st.text(max_size=30)).map(list),
), max_size=40)


@given(reply_items)
def test_fast_reply_encoding_is_byte_for_byte_cbor2(items: list[Any]) -> None:
    assert P.encode_ok_items(items) == cbor2.dumps([0, items])
    assert P.decode_reply(P.encode_ok_items(items)) == items
