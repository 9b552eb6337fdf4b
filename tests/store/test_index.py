"""The page index on its own: states, byte accounting, stale tickets (no tensors, no bytes)."""

from __future__ import annotations

import pytest

from kvtier.errors import InternalError
from kvtier.store.index import PageIndex, PageState
from kvtier.types import Namespace, PageId, PageKey, Precision

NAMES = ("hot", "warm", "cold")


def pid(n: int, ns: str = "t") -> PageId:
    return PageId(Namespace(ns), PageKey(bytes([n])))


def place(index: PageIndex, p: PageId, tier: int = 0, size: int = 100) -> None:
    version = index.begin_place(p, tier, nbytes=size, chain_position=0, now=1.0)
    assert version is not None
    assert index.reserve(tier, size, capacity=10_000)
    assert index.commit_place(p, version, size, Precision.FULL)


def test_place_is_invisible_until_commit_and_idempotent() -> None:
    index = PageIndex(3)
    version = index.begin_place(pid(1), 0, nbytes=100, chain_position=2, now=1.0)
    assert version is not None
    assert index.visible_tier(pid(1)) is None
    assert index.meta(pid(1), NAMES) is None
    assert index.begin_place(pid(1), 0, nbytes=100, chain_position=2, now=1.0) is None
    assert index.reserve(0, 100, capacity=1000)
    assert index.commit_place(pid(1), version, 100, Precision.FULL)
    assert index.visible_tier(pid(1)) == 0
    assert (index.used(0), index.reserved(0), index.page_count(0)) == (100, 0, 1)
    meta = index.meta(pid(1), NAMES)
    assert meta is not None and meta.tier == "hot" and meta.chain_position == 2


def test_reserve_respects_capacity_and_release() -> None:
    index = PageIndex(1)
    assert index.reserve(0, 600, capacity=1000)
    assert not index.reserve(0, 401, capacity=1000)
    assert index.reserve(0, 400, capacity=1000)
    index.release(0, 400)
    assert index.reserved(0) == 600
    with pytest.raises(InternalError, match="size"):
        index.release(0, 601)


def test_move_switches_tier_in_one_step_and_precision_only_goes_down() -> None:
    index = PageIndex(3)
    place(index, pid(1))
    ticket = index.begin_move(pid(1), 2)
    assert ticket is not None
    rec = index.get(pid(1))
    assert rec is not None and rec.state is PageState.MOVING
    assert index.visible_tier(pid(1)) == 0  # readers keep reading the source
    assert index.begin_move(pid(1), 1) is None  # one move at a time
    assert index.resident_metas(0, NAMES) == []  # not a victim candidate while moving
    assert index.reserve(2, 30, capacity=1000)
    assert index.commit_move(ticket, 30, Precision.INT4)
    assert index.visible_tier(pid(1)) == 2
    assert (index.used(0), index.used(2), index.reserved(2)) == (0, 30, 0)
    up = index.begin_move(pid(1), 0)
    assert up is not None and index.reserve(0, 100, capacity=1000)
    assert index.commit_move(up, 100, Precision.FULL)
    rec = index.get(pid(1))
    assert rec is not None and rec.precision is Precision.INT4 and rec.tier == 0


def test_commit_after_remove_fails_and_stale_ticket_cannot_commit() -> None:
    index = PageIndex(2)
    place(index, pid(1))
    ticket = index.begin_move(pid(1), 1)
    assert ticket is not None and index.reserve(1, 50, capacity=1000)
    removed = index.remove(pid(1))
    assert removed is not None and index.used(0) == 0
    assert not index.commit_move(ticket, 50, Precision.INT8)
    index.release(1, 50)
    place(index, pid(1))  # same key again: a new version
    assert index.reserve(1, 50, capacity=1000)
    assert not index.commit_move(ticket, 50, Precision.INT8)
    assert index.visible_tier(pid(1)) == 0 and index.used(1) == 0


def test_commit_without_reservation_or_wrong_target_is_a_conflict() -> None:
    index = PageIndex(3)
    place(index, pid(1))
    ticket = index.begin_move(pid(1), 1)
    assert ticket is not None
    with pytest.raises(InternalError, match="reservation"):
        index.commit_move(ticket, 10, Precision.INT8)
    index.abort_move(ticket)
    rec = index.get(pid(1))
    assert rec is not None and rec.state is PageState.RESIDENT
    forged = type(ticket)(page=ticket.page, src=0, dst=2, version=ticket.version)
    assert index.begin_move(pid(1), 1) is not None
    with pytest.raises(InternalError, match="state"):
        index.commit_move(forged, 0, Precision.INT4)


def test_abort_place_and_remove_while_placing() -> None:
    index = PageIndex(1)
    version = index.begin_place(pid(1), 0, nbytes=10, chain_position=0, now=0.0)
    assert version is not None
    index.abort_place(pid(1), version)
    assert index.get(pid(1)) is None
    version = index.begin_place(pid(1), 0, nbytes=10, chain_position=0, now=0.0)
    assert version is not None and index.remove(pid(1)) is not None
    assert not index.commit_place(pid(1), version, 10, Precision.FULL)
    assert index.used(0) == 0 and index.page_count(0) == 0


def test_touch_orders_accesses_and_counts() -> None:
    index = PageIndex(1)
    place(index, pid(1))
    place(index, pid(2))
    s1 = index.touch(pid(1), now=5.0, count=True)
    s2 = index.touch(pid(2), now=5.0, count=False)
    assert s1 is not None and s2 is not None and s2 > s1
    metas = {m.page: m for m in index.resident_metas(0, ("hot",))}
    assert metas[pid(1)].access_count == 2 and metas[pid(2)].access_count == 1
    assert index.touch(pid(9), now=5.0, count=True) is None


def test_add_resident_counts_bytes_once() -> None:
    index = PageIndex(2)
    assert index.add_resident(pid(1), 1, 256, 80, Precision.INT4, 3, now=1.0)
    assert not index.add_resident(pid(1), 1, 256, 80, Precision.INT4, 3, now=1.0)
    assert index.used(1) == 80 and index.pages_in(1) == [pid(1)]
