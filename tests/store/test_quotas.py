"""Quotas per namespace: a namespace at its quota makes room among its own pages only; a page
that cannot fit its quota is RESOURCE_EXHAUSTED; usage per namespace, top N and "other"."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.config import QuotasConfig, load_settings
from kvtier.errors import CapacityExhausted, ConfigError
from kvtier.store.stats import OTHER_NAMESPACES
from kvtier.types import Codec, Medium

from .helpers import PAGE_BYTES, StoreFactory, key, make_page, make_settings, tier, wait_until

BIG = 1 << 20


def _tiers() -> list[Any]:
    return [tier("hot", Medium.DEVICE, Codec.NONE, BIG),
            tier("warm", Medium.HOST, Codec.INT8, BIG),
            tier("cold", Medium.HOST, Codec.INT4, BIG)]


def _store(make_store: StoreFactory, quotas: dict[str, Any]) -> Any:
    return make_store(make_settings(_tiers(), quotas=quotas), start=True, mover=False)


def _tiers_of(store: Any, ns: str, n: int) -> list[str | None]:
    return list(store.lookup(ns, [key(i) for i in range(n)]).tiers)


def test_tier_quota_demotes_the_namespaces_own_pages(make_store: StoreFactory) -> None:
    store = _store(make_store, {"namespaces": {"a": {"tiers": {"hot": 4 * PAGE_BYTES}}}})
    for i in range(10):
        store.put("b", [(key(i), make_page(100 + i))])
    for i in range(10):
        assert store.put("a", [(key(i), make_page(i))])[0].value == "stored"
    a = _tiers_of(store, "a", 10)
    assert a[6:] == ["hot"] * 4 and set(a[:6]) == {"warm"}  # its least recent went down
    assert _tiers_of(store, "b", 10) == ["hot"] * 10  # never another namespace's
    row = {r.name: r for r in store.stats().namespaces}["a"]
    assert row.tiers["hot"] == 4 * PAGE_BYTES


def test_memory_quota_pushes_its_coldest_pages_out_first(make_store: StoreFactory) -> None:
    quota = 6 * PAGE_BYTES
    store = _store(make_store, {"namespaces": {"a": {"bytes": quota}}})
    for i in range(8):
        store.put("b", [(key(i), make_page(100 + i))])
    for i in range(30):
        store.put("a", [(key(i), make_page(i))])
        row = {r.name: r for r in store.stats().namespaces}["a"]
        assert row.bytes <= quota and row.quota_bytes == quota
    a = _tiers_of(store, "a", 30)
    assert a[-1] == "hot" and None in a  # the newest kept; the oldest left memory
    assert a.index(None) == 0 and all(t is None for t in a[:a.index("hot")] if t is None)
    assert _tiers_of(store, "b", 8) == ["hot"] * 8
    assert store.stats().tiers[-1].evictions.get("capacity", 0) >= 1  # all a's


def test_a_page_larger_than_its_quota_is_refused(make_store: StoreFactory) -> None:
    store = _store(make_store, {"namespaces": {"a": {"bytes": PAGE_BYTES // 2}},
                                "default": {"tiers": {"hot": PAGE_BYTES}}})
    with pytest.raises(CapacityExhausted, match="quota"):
        store.put("a", [(key(0), make_page(0))])
    assert store.lookup("a", [key(0)]).prefix_length == 0  # nothing half-placed
    assert store.stats().quota_refusals == 1
    # the default applies to each other namespace on its own
    store.put("c", [(key(0), make_page(0))])
    store.put("c", [(key(1), make_page(1))])
    store.put("d", [(key(0), make_page(2))])
    assert _tiers_of(store, "c", 2) == ["warm", "hot"] and _tiers_of(store, "d", 1) == ["hot"]


def test_usage_names_the_top_namespaces_and_sums_the_rest(make_store: StoreFactory) -> None:
    store = _store(make_store, {"top_namespaces": 2})
    for n, ns in enumerate(["w", "x", "y", "z"]):
        for i in range(n + 1):
            store.put(ns, [(key(i), make_page(i))])
    rows = store.stats().namespaces
    assert [r.name for r in rows] == ["z", "y", OTHER_NAMESPACES]
    assert rows[0].bytes == 4 * PAGE_BYTES and rows[1].bytes == 3 * PAGE_BYTES
    assert rows[2].bytes == 3 * PAGE_BYTES and rows[2].namespaces == 2
    store.delete("z", [key(i) for i in range(4)])
    assert [r.name for r in store.stats().namespaces] == ["y", "x", OTHER_NAMESPACES]


def test_quota_accounting_follows_moves_and_deletes(make_store: StoreFactory) -> None:
    store = _store(make_store, {"namespaces": {"a": {"bytes": BIG}}})
    store.put("a", [(key(0), make_page(0)), (key(1), make_page(1))])
    assert store.promote("a", [key(0)], "hot") == [True]
    store.demote("a", [key(0)], "cold")
    row = {r.name: r for r in store.stats().namespaces}["a"]
    assert row.tiers["hot"] == PAGE_BYTES and 0 < row.tiers["cold"] < PAGE_BYTES
    store.delete("a", [key(0), key(1)])
    wait_until(lambda: all(r.name != "a" for r in store.stats().namespaces))


def test_quota_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not memory tiers"):
        load_settings(quotas={"namespaces": {"a": {"tiers": {"remote": 10}}}})
    with pytest.raises(ConfigError, match="greater than 0"):
        load_settings(quotas={"namespaces": {"a": {"bytes": 0}}})
    with pytest.raises(ConfigError, match="valid integer"):
        load_settings(quotas={"namespaces": {"a": {"tiers": {"hot": True}}}})
    monkeypatch.setenv("KVTIER_QUOTAS", '{"namespaces": {"t": {"bytes": 1048576}}}')
    q = load_settings().quotas
    assert isinstance(q, QuotasConfig) and q.of("t") is not None and q.of("u") is None
