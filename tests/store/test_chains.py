"""Prefix-closed store: chains cut from the tail, no kept orphans, worker hints, prefetch."""

from __future__ import annotations

import pytest

from kvtier.config import TierConfig
from kvtier.errors import InvalidArgument
from kvtier.store.chains import ChainLinks
from kvtier.store.hints import HintBook
from kvtier.store.policy import LRUPolicy
from kvtier.types import Codec, EvictionReason, Medium, Namespace, PageId, PageKey

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier

NS = "tenant"


def two_tiers(hot_pages: int, warm_pages: int) -> list[TierConfig]:
    return [tier("hot", Medium.DEVICE, Codec.NONE, hot_pages * PAGE_BYTES),
            tier("warm", Medium.HOST, Codec.NONE, warm_pages * PAGE_BYTES)]


def where(store: object, keys: list[bytes]) -> list[str | None]:
    return [store.lookup(NS, [k]).tiers[0] for k in keys]  # type: ignore[attr-defined]


def test_a_chain_is_demoted_from_its_tail(make_store: StoreFactory) -> None:
    store = make_store(make_settings(two_tiers(4, 16)), LRUPolicy())
    chain = [key(i) for i in range(3)]
    store.put(NS, [(k, make_page(i)) for i, k in enumerate(chain)])  # one chain: 0 <- 1 <- 2
    store.put(NS, [(key(10), make_page(10))])
    store.put(NS, [(key(11), make_page(11))])  # hot is full: LRU's victim would be 0
    assert where(store, chain) == ["hot", "hot", "warm"]
    store.put(NS, [(key(12), make_page(12))])
    assert where(store, chain) == ["hot", "warm", "warm"]
    assert store.lookup(NS, chain).prefix_length == 3


def test_the_last_tier_keeps_no_orphans(make_store: StoreFactory) -> None:
    # hot 2 pages over warm 2 pages: 5 pages of one chain cannot all stay; whatever leaves
    # the last tier takes its successors with it, so what is left is a prefix.
    store = make_store(make_settings(two_tiers(2, 2)), LRUPolicy())
    chain = [key(i) for i in range(5)]
    for i in range(5):  # a worker puts a chain page by page, after a lookup of the chain
        store.lookup(NS, chain)
        store.put(NS, [(chain[i], make_page(i))], chain_positions=[i])
    tiers = where(store, chain)
    n = store.lookup(NS, chain).prefix_length
    assert n >= 1 and all(t is not None for t in tiers[:n]) and all(t is None for t in tiers[n:])
    evictions = sum(t.evictions.get("capacity", 0) + t.evictions.get("orphan", 0)
                    for t in store.stats().tiers)
    assert evictions == 5 - n


def test_an_evicted_page_takes_its_successors(make_store: StoreFactory) -> None:
    store = make_store(make_settings(two_tiers(8, 8)), LRUPolicy())
    store.put(NS, [(key(i), make_page(i)) for i in range(3)])
    store.demote(NS, [key(0)], "warm")
    from kvtier.store import transfer

    e = store._engine  # noqa: SLF001 - the eviction path the mover takes
    head = PageId(Namespace(NS), PageKey(key(0)))
    assert transfer.evict(e, head, 1, EvictionReason.CAPACITY)
    assert where(store, [key(i) for i in range(3)]) == [None, None, None]
    hot = store.stats().tiers[0]
    assert hot.evictions.get("orphan") == 2


def test_queue_hints_keep_and_prefetch_a_queued_prefix(make_store: StoreFactory) -> None:
    store = make_store(make_settings(two_tiers(4, 16)), LRUPolicy())
    chain = [key(i) for i in range(3)]
    store.put(NS, [(k, make_page(i)) for i, k in enumerate(chain)])
    for j in range(10, 14):  # newer pages push the chain down to warm
        store.put(NS, [(key(j), make_page(j))])
    assert where(store, chain) == ["warm"] * 3
    assert store.hint(NS, queued=[chain + [b"not-yet"]]) == 3
    store.rebalance()  # the prefetch pass (a thread does it when the mover runs)
    assert where(store, chain) == ["hot"] * 3
    store.put(NS, [(key(20), make_page(20))])  # hot is full: queued pages are kept
    assert where(store, chain) == ["hot"] * 3
    store.put(NS, [(key(21), make_page(21))])
    assert where(store, chain) == ["hot"] * 3
    got = store.get(NS, chain)
    assert [g.tier for g in got if g] == ["hot"] * 3
    st = store.stats()
    assert (st.prefetched, st.prefetch_hits) == (3, 3)
    store.hint(NS, queued=[])  # the queue is empty now: nothing is kept for it
    for j in range(30, 34):
        store.put(NS, [(key(j), make_page(j))])
    assert "warm" in where(store, chain)


def test_lookup_prefetch_promotes_the_present_prefix(make_store: StoreFactory) -> None:
    store = make_store(make_settings(two_tiers(4, 16)), LRUPolicy(), start=True)
    chain = [key(i) for i in range(2)]
    store.put(NS, [(k, make_page(i)) for i, k in enumerate(chain)])
    store.demote(NS, chain, "warm")
    assert store.lookup(NS, chain + [key(9)]).tiers == ["warm", "warm", None]
    store.lookup(NS, chain + [key(9)], prefetch=True)
    from .helpers import wait_until

    wait_until(lambda: where(store, chain) == ["hot", "hot"], what="prefetch thread")
    assert store.stats().prefetched == 2


def test_an_ended_session_goes_first_and_expected_reuse_is_kept(
        make_store: StoreFactory) -> None:
    store = make_store(make_settings(two_tiers(3, 16)), LRUPolicy())
    store.put(NS, [(key(0), make_page(0))], session="a")
    store.put(NS, [(key(1), make_page(1))], session="b", expected_reuse_s=[60.0])
    store.put(NS, [(key(2), make_page(2))], session="c")
    store.hint(NS, ended_sessions=["c"])
    store.put(NS, [(key(3), make_page(3))])  # LRU would demote 0; c ended: 2 goes
    assert where(store, [key(i) for i in range(4)]) == ["hot", "hot", "warm", "hot"]
    store.put(NS, [(key(4), make_page(4))])  # next: 0 (1 is expected back within a minute)
    assert where(store, [key(i) for i in range(5)]) == ["warm", "hot", "warm", "hot", "hot"]


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.hint(NS, queued=[[b"k"] * 5000]), "queued"),
    (lambda s: s.hint(NS, queued=[[b""]]), "key"),
    (lambda s: s.hint(NS, ended_sessions=["x" * 300]), "ended_sessions"),
    (lambda s: s.lookup(NS, [b"k"], session="x" * 300), "session"),
    (lambda s: s.put(NS, [(b"k", make_page(0))], expected_reuse_s=[-1.0]),
     "expected_reuse_s"),
    (lambda s: s.put(NS, [(b"k", make_page(0))], expected_reuse_s=[float("nan")]),
     "expected_reuse_s"),
    (lambda s: s.put(NS, [(b"k", make_page(0))], expected_reuse_s=[1.0, 2.0]),
     "expected_reuse_s"),
])
def test_bad_hints_name_the_field(make_store: StoreFactory, call: object, field: str) -> None:
    store = make_store(make_settings(two_tiers(3, 16)))
    with pytest.raises(InvalidArgument) as e:
        call(store)  # type: ignore[operator]
    assert e.value.field == field


def test_chain_links_are_bounded_and_cut_cycles() -> None:
    ns = Namespace("n")
    pids = [PageId(ns, PageKey(b"%d" % i)) for i in range(10)]
    links = ChainLinks(capacity=4)
    links.note_put(pids, list(range(10)))
    assert len(links) == 4 and links.parent(pids[9]) == pids[8] and links.parent(pids[1]) is None
    links.note_put([pids[0], pids[1], pids[0]], [1, 2, 3])  # a cycle from bad input
    assert set(links.descendants(pids[0])) <= set(pids)
    probe = ChainLinks()
    probe.note_lookup(pids[:4], present=2)  # 0, 1 present: never linked by a lookup
    assert probe.parent(pids[1]) is None
    probe.note_put([pids[3]], [0])  # position 0: a root, whatever the lookup said
    assert probe.parent(pids[3]) is None
    probe.note_put([pids[2]], [2])  # the rest of the chain, put after the lookup
    assert probe.parent(pids[2]) == pids[1]
    book = HintBook(max_pages=2)
    book.used(pids[:5], "s")
    book.end_sessions("n", ["s"])
    assert book.classes(pids[:5]) == [1, 1, 1, 0, 0]  # only the last two pages are remembered
