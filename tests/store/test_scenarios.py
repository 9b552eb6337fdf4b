"""Deterministic scenarios with tiny tiers: exact demotion order and placement (LRU, LFU)."""

from __future__ import annotations

import pytest
import torch

from kvtier.codecs import encode
from kvtier.config import CodecConfig
from kvtier.store.policy import LFUPolicy, LRUPolicy, Policy
from kvtier.store.store import TierStore
from kvtier.types import Codec, Medium, Precision

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier

NS = "tenant-a"


def blob_size(codec: Codec) -> int:
    return len(encode(make_page(0), codec, CodecConfig()))


def where(store: TierStore, n: int) -> list[str | None]:
    return store.lookup(NS, [key(i) for i in range(n)]).tiers


def four_page_hot(make_store: StoreFactory, policy: Policy) -> TierStore:
    """hot holds 4 pages (mover: above 90% -> down to 50%); warm and cold are roomy."""
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 4 * PAGE_BYTES, high=0.9, low=0.5),
        tier("warm", Medium.HOST, Codec.INT8, 64 * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4, 64 * PAGE_BYTES),
    ])
    store = make_store(settings, policy)
    for i in range(4):
        assert store.put(NS, [(key(i), make_page(i))])[0].value == "stored"
    store.get(NS, [key(3)])
    store.get(NS, [key(3)])
    store.get(NS, [key(3)])
    store.get(NS, [key(0)])
    return store


@pytest.mark.parametrize(
    ("policy", "after_put", "after_mover"),
    [
        # LRU order by last access: 1, 2, 3, 0, (4 newest)
        (LRUPolicy(), ["hot", "warm", "hot", "hot", "hot"],
         ["hot", "warm", "warm", "warm", "hot"]),
        # LFU counts: 0->2, 1->1, 2->1, 3->4, 4->1; ties by oldest access: 1, 2, 4
        (LFUPolicy(), ["hot", "warm", "hot", "hot", "hot"],
         ["hot", "warm", "warm", "hot", "warm"]),
    ],
    ids=["lru", "lfu"],
)
def test_demotion_order(make_store: StoreFactory, policy: Policy, after_put: list[str],
                        after_mover: list[str]) -> None:
    store = four_page_hot(make_store, policy)
    # hot is at its hard capacity: the put makes room synchronously (one victim)
    store.put(NS, [(key(4), make_page(4))])
    assert where(store, 5) == after_put
    # 5 pages = 100% > 90%: the mover pass demotes victims down to 50% (2 pages)
    store.rebalance()
    assert where(store, 5) == after_mover
    hot = store.stats().tiers[0]
    assert (hot.pages, hot.bytes, hot.demotions) == (2, 2 * PAGE_BYTES, 3)


def test_cascade_down_the_stack_and_evict_from_the_last(make_store: StoreFactory) -> None:
    b8, b4 = blob_size(Codec.INT8), blob_size(Codec.INT4)
    assert b4 < b8
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 2 * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, 2 * b8),
        tier("cold", Medium.HOST, Codec.INT4, 2 * b4),
    ])
    store = make_store(settings)
    for i in range(7):
        store.put(NS, [(key(i), make_page(i))])
    assert where(store, 7) == [None, "cold", "cold", "warm", "warm", "hot", "hot"]
    st = {t.name: t for t in store.stats().tiers}
    assert st["hot"].demotions == 5 and st["warm"].demotions == 3
    assert st["cold"].evictions["capacity"] == 1
    assert [st[n].bytes for n in ("hot", "warm", "cold")] == [2 * PAGE_BYTES, 2 * b8, 2 * b4]
    assert store.lookup(NS, [key(5), key(6), key(0)]).prefix_length == 2


def test_precision_reported_and_kept_on_promotion(make_store: StoreFactory) -> None:
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, 8 * PAGE_BYTES),
        tier("cold", Medium.HOST, Codec.INT4, 8 * PAGE_BYTES),
    ])
    store = make_store(settings)
    store.put(NS, [(key(i), make_page(i)) for i in range(3)])
    assert store.demote(NS, [key(1)], "warm") == [True]
    assert store.demote(NS, [key(2)], "cold") == [True]
    got = store.get(NS, [key(i) for i in range(3)])
    assert [(g.tier, g.precision) for g in got if g] == [
        ("hot", Precision.FULL), ("warm", Precision.INT8), ("cold", Precision.INT4)]
    from_cold = got[2]
    assert from_cold is not None
    assert store.promote(NS, [key(2)], "hot") == [True]
    again = store.get(NS, [key(2)])[0]
    assert again is not None and again.tier == "hot" and again.precision is Precision.INT4
    # promotion decodes the int4 blob and keeps exactly those values
    assert torch.equal(again.page.k, from_cold.page.k)
    assert torch.equal(again.page.v, from_cold.page.v)
    info = store.page_info(NS, key(2))
    assert info is not None and info.precision is Precision.INT4 and info.tier == "hot"
    # demoting it again cannot regain precision either
    assert store.demote(NS, [key(2)], "warm") == [True]
    g = store.get(NS, [key(2)])[0]
    assert g is not None and g.precision is Precision.INT4
    # promote answers True for a page already at or above the tier; demote cannot go up
    assert store.promote(NS, [key(0)], "warm") == [True]
    assert store.demote(NS, [key(2)], "hot") == [False]
    assert store.promote(NS, [b"absent"], "hot") == [False]
    st = {t.name: t for t in store.stats().tiers}
    assert st["hot"].promotions == 1


def test_admission_places_lower_when_the_policy_says_so(make_store: StoreFactory) -> None:
    class NoHot(LRUPolicy):
        def admit(self, page: object, tier: str) -> bool:  # type: ignore[override]
            return tier != "hot"

    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, 8 * PAGE_BYTES),
    ])
    store = make_store(settings, NoHot())
    store.put(NS, [(key(0), make_page(0))])
    got = store.get(NS, [key(0)])[0]
    assert got is not None and got.tier == "warm" and got.precision is Precision.INT8


def test_a_page_too_big_for_the_next_tier_goes_further_down(make_store: StoreFactory) -> None:
    b8, b4 = blob_size(Codec.INT8), blob_size(Codec.INT4)
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 2 * PAGE_BYTES),
        tier("warm", Medium.HOST, Codec.INT8, b8 - 1),  # no int8 page ever fits here
        tier("cold", Medium.HOST, Codec.INT4, 2 * b4),
    ])
    store = make_store(settings)
    for i in range(5):
        store.put(NS, [(key(i), make_page(i))])
    assert where(store, 5) == [None, "cold", "cold", "hot", "hot"]
    st = {t.name: t for t in store.stats().tiers}
    assert st["hot"].demotions == 3 and st["warm"].pages == 0
    assert st["cold"].evictions["capacity"] == 1


def test_prefetch_promotes_into_spare_room_only(make_store: StoreFactory) -> None:
    from kvtier.types import Namespace, PageId, PageKey

    class Prefetching(LRUPolicy):
        picks: list[PageId] = []

        def prefetch(self, limit: int) -> list[PageId]:
            return self.picks[:limit]

    policy = Prefetching()
    settings = make_settings([
        tier("hot", Medium.DEVICE, Codec.NONE, 8 * PAGE_BYTES, high=0.9, low=0.5),
        tier("cold", Medium.HOST, Codec.INT4, 64 * PAGE_BYTES),
    ])
    store = make_store(settings, policy)
    store.put(NS, [(key(i), make_page(i)) for i in range(6)])
    assert store.demote(NS, [key(i) for i in range(6)], "cold") == [True] * 6
    policy.picks = [PageId(Namespace(NS), PageKey(key(i))) for i in (4, 1, 2, 3)]
    store.rebalance()
    # each promoted int4 page holds its tensors and its blob; the low watermark (4 pages of
    # tensors) leaves room for the first picks only, in the policy's order
    fit = (4 * PAGE_BYTES) // (PAGE_BYTES + blob_size(Codec.INT4))
    assert 0 < fit < 4
    tiers = where(store, 6)
    assert [i for i in range(6) if tiers[i] == "hot"] == sorted([4, 1, 2, 3][:fit])
    hot = store.stats().tiers[0]
    assert hot.bytes <= hot.capacity_bytes * hot.low_watermark and hot.demotions == 6
