"""Leases on device-pool blocks (what CUDA IPC sessions hold): every state transition, the
per-session limit, expiry, and that a leased block is never given back under its reader."""

from __future__ import annotations

import gc

import pytest
import torch

from kvtier.errors import CapacityExhausted, Conflict, NotFound
from kvtier.store.device_leases import DeviceLeases, LeaseKind, LeaseState
from kvtier.store.device_pool import ALIGN, DevicePool
from kvtier.types import Page

SHAPE = (1, 8, 1, 8)  # 128 bytes of K: a block of two aligned halves
BLOCK = 2 * ALIGN


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _setup(pool_blocks: int = 8, max_blocks: int = 4):  # type: ignore[no-untyped-def]
    pool = DevicePool(pool_blocks * BLOCK, torch.device("cpu"))
    clock = Clock()
    leases = DeviceLeases(pool, max_bytes=max_blocks * BLOCK, ttl_s=10.0, clock=clock)
    return pool, leases, clock


def _pool_page(pool: DevicePool, fill: float) -> Page:
    kv = pool.new_kv(torch.float16, SHAPE)
    assert kv is not None
    kv[0].fill_(fill)
    kv[1].fill_(-fill)
    return Page(k=kv[0], v=kv[1], start_position=0)


def test_a_read_lease_keeps_the_block_until_released() -> None:
    pool, leases, _ = _setup()
    sid = leases.open_session("ns")
    page = _pool_page(pool, 3.0)
    lease = leases.lend(sid, page)
    assert lease.kind is LeaseKind.READ and leases.state(lease.lease_id) is LeaseState.OPEN
    assert lease.k_offset == pool.offset_of(page.k) and lease.v_offset == pool.offset_of(page.v)
    assert lease.dtype == "float16" and lease.shape == SHAPE and lease.nbytes == 128
    view = pool.buffer[lease.k_offset:lease.k_offset + lease.nbytes].view(torch.float16)
    del page  # the tier let go of the page (demoted, deleted)
    gc.collect()
    assert pool.stats().used_bytes == BLOCK  # the lease still holds it
    other = pool.new_kv(torch.float16, SHAPE)  # another block, not this one
    assert other is not None and pool.offset_of(other[0]) != lease.k_offset
    assert bool((view == 3.0).all())
    assert leases.release(sid, [lease.lease_id]) == 1
    assert leases.state(lease.lease_id) is LeaseState.RELEASED
    gc.collect()
    assert pool.stats().used_bytes == BLOCK  # only the other block


def test_only_pool_pages_are_lent() -> None:
    _, leases, _ = _setup()
    sid = leases.open_session("ns")
    with pytest.raises(Conflict, match="device pool"):
        leases.lend(sid, Page(k=torch.zeros(SHAPE), v=torch.zeros(SHAPE), start_position=0))


def test_a_write_lease_commits_its_block_as_a_page() -> None:
    pool, leases, _ = _setup()
    sid = leases.open_session("ns")
    lease = leases.reserve(sid, torch.bfloat16, SHAPE, start_position=64)
    assert lease is not None and lease.kind is LeaseKind.WRITE
    # the worker writes through its IPC mapping of the pool: here, straight into the buffer
    pool.buffer[lease.k_offset:lease.k_offset + lease.nbytes].view(torch.bfloat16).fill_(1.5)
    pool.buffer[lease.v_offset:lease.v_offset + lease.nbytes].view(torch.bfloat16).fill_(2.5)
    page = leases.commit(sid, lease.lease_id)
    assert leases.state(lease.lease_id) is LeaseState.COMMITTED
    assert page.start_position == 64 and page.k.dtype == torch.bfloat16
    assert bool((page.k == 1.5).all()) and bool((page.v == 2.5).all())
    assert pool.holds(page.k)
    with pytest.raises(NotFound, match="no open lease"):
        leases.commit(sid, lease.lease_id)
    assert leases.held_bytes(sid) == 0  # the store holds the page now, not the session


def test_read_leases_do_not_commit_and_sessions_stay_apart() -> None:
    pool, leases, _ = _setup()
    a, b = leases.open_session("ns"), leases.open_session("other")
    assert leases.namespace(b) == "other"
    lease = leases.lend(a, _pool_page(pool, 1.0))
    with pytest.raises(Conflict, match="read lease"):
        leases.commit(a, lease.lease_id)
    with pytest.raises(NotFound):
        leases.commit(b, lease.lease_id)
    with pytest.raises(NotFound):
        leases.release(b, [lease.lease_id])
    assert leases.release(a, [lease.lease_id, 999]) == 1  # unknown ids are skipped
    assert leases.release(a, [lease.lease_id]) == 0  # released twice: a no-op
    with pytest.raises(NotFound, match="no device session"):
        leases.lend("nope", _pool_page(pool, 1.0))


def test_a_session_cannot_pin_more_than_its_limit() -> None:
    pool, leases, _ = _setup(pool_blocks=8, max_blocks=2)
    sid = leases.open_session("ns")
    first = leases.reserve(sid, torch.float16, SHAPE, 0)
    leases.lend(sid, _pool_page(pool, 1.0))
    with pytest.raises(CapacityExhausted, match="release some"):
        leases.reserve(sid, torch.float16, SHAPE, 0)
    with pytest.raises(CapacityExhausted):
        leases.lend(sid, _pool_page(pool, 2.0))
    assert first is not None
    leases.release(sid, [first.lease_id])
    assert leases.reserve(sid, torch.float16, SHAPE, 0) is not None


def test_reserve_says_none_when_the_pool_is_full() -> None:
    pool, leases, _ = _setup(pool_blocks=2, max_blocks=8)
    sid = leases.open_session("ns")
    assert leases.reserve(sid, torch.float16, SHAPE, 0) is not None
    assert leases.reserve(sid, torch.float16, SHAPE, 0) is not None
    assert leases.reserve(sid, torch.float16, SHAPE, 0) is None


def test_leases_past_their_deadline_expire_and_sessions_end() -> None:
    pool, leases, clock = _setup()
    sid = leases.open_session("ns")
    old = leases.lend(sid, _pool_page(pool, 1.0))
    clock.now += 6
    young = leases.reserve(sid, torch.float16, SHAPE, 0)
    assert young is not None
    clock.now += 5  # old is 11 s old, young 5
    assert leases.sweep() == 1
    assert leases.state(old.lease_id) is LeaseState.EXPIRED
    assert leases.state(young.lease_id) is LeaseState.OPEN
    assert leases.end_session(sid) == 1
    assert leases.state(young.lease_id) is LeaseState.RELEASED
    with pytest.raises(NotFound):
        leases.held_bytes(sid)
    assert leases.end_session(sid) == 0
    gc.collect()
    assert pool.stats().used_bytes == 0
