"""Staging buffers: pages written straight into the shm segment and put without a client copy."""

from __future__ import annotations

import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier_client import AsyncKVTierClient, KVTierClient, Page
from kvtier_client.shm_layout import DATA_OFFSET
from kvtier_client.staging import StagingArea

SHAPE = (2, 16, 2, 64)  # float16: 8 KiB per tensor


def fill(page: Page, seed: int) -> Page:
    rng = np.random.default_rng(seed)
    page.k[...] = rng.standard_normal(SHAPE)
    page.v[...] = rng.standard_normal(SHAPE)
    return page


def same(got: object, page: Page) -> bool:
    return (got is not None and np.array_equal(got.k, page.k)  # type: ignore[attr-defined]
            and np.array_equal(got.v, page.v))  # type: ignore[attr-defined]


def test_staging_area_first_fit_alignment_merge_and_double_free() -> None:
    area = StagingArea(1024, 1024 + 640)
    a, b, c = area.alloc(100), area.alloc(64), area.alloc(200)
    assert (a, b, c) == (1024, 1152, 1216)  # rounded up to 64-byte runs
    assert area.alloc(300) is None and area.used_bytes == 128 + 64 + 256
    assert area.alloc(192) == 1472  # the rest, exactly
    area.free(b)
    assert area.alloc(65) is None  # the 64-byte hole is too small
    area.free(a)
    assert area.alloc(192) == 1024  # a and b merged into one run
    area.free(c)
    with pytest.raises(ValueError, match="released already"):
        area.free(c)


def test_staged_put_sends_no_bytes_through_the_request_area(daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20,
                      staging_bytes=256 << 10) as c:
        page = fill(c.staged_page(SHAPE, start_position=7), 1)
        seg = c._shm.session.segment  # type: ignore[union-attr]
        assert seg.staged_offset(page.k.reshape(-1).view(np.uint8).data) is not None
        seg.view[DATA_OFFSET:DATA_OFFSET + 64] = bytes(64)
        assert c.put([b"a"], [page]) == ["stored"]
        assert bytes(seg.view[DATA_OFFSET:DATA_OFFSET + 64]) == bytes(64)  # nothing copied
        plain = Page(page.k.copy(), page.v.copy(), 7)
        got = c.get([b"a"])[0]
        assert same(got, plain) and got is not None and got.start_position == 7
        page.k[...] = 0  # refill and put under another key: the daemon kept its own copy
        c.put([b"b"], [page])
        assert same(c.get([b"a"])[0], plain) and same(c.get([b"b"])[0], page)


def test_slots_are_reused_after_release_and_run_out_into_ordinary_memory(
        daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20,
                      staging_bytes=64 << 10) as c:
        pages = [c.staged_page(SHAPE) for _ in range(5)]  # 16 KiB each: 4 fit
        seg = c._shm.session.segment  # type: ignore[union-attr]
        inside = [seg.staged_offset(p.k.reshape(-1).view(np.uint8).data) is not None
                  for p in pages]
        assert inside == [True] * 4 + [False]
        assert c.put([b"x"], [fill(pages[4], 5)]) == ["stored"]  # ordinary arrays still work
        assert same(c.get([b"x"])[0], pages[4])
        first = pages[0].k.ctypes.data
        c.release_page(pages[0])
        c.release_page(pages[4])  # not staged: nothing to give back
        assert c.staged_page(SHAPE).k.ctypes.data == first
        with pytest.raises(ValueError, match="float16 or float32"):
            c.staged_page(SHAPE, "bfloat16")
    with pytest.raises(ValueError, match="staging_bytes"):
        KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20, staging_bytes=2 << 20)


def test_get_replies_never_overwrite_staged_pages(daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 16,
                      staging_bytes=32 << 10, chunk_bytes=64 << 10) as c:
        staged = fill(c.staged_page(SHAPE), 1)
        keep = Page(staged.k.copy(), staged.v.copy())
        others = [fill(Page(np.empty(SHAPE, np.float16), np.empty(SHAPE, np.float16)), i)
                  for i in range(2, 8)]
        keys = [b"o%d" % i for i in range(len(others))]
        c.put(keys, others)
        assert all(same(g, p) for g, p in zip(c.get(keys), others))  # more than the area
        assert same(staged, keep)


def test_without_a_session_staged_pages_are_ordinary(daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False,
                      staging_bytes=1 << 20) as c:
        page = fill(c.staged_page(SHAPE), 3)
        assert page.k.flags.owndata and c.put([b"a"], [page]) == ["stored"]
        assert same(c.get([b"a"])[0], page)
        c.release_page(page)


def test_staged_pages_outlive_their_session(daemon: Daemon) -> None:
    c = KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20, staging_bytes=256 << 10)
    page = fill(c.staged_page(SHAPE), 4)
    daemon._shm.close_all()  # the daemon ends the session; the client drops its segment
    assert c.put([b"a"], [page]) == ["stored"]  # goes inline from the old segment's memory
    assert not c.uses_shared_memory and same(c.get([b"a"])[0], page)
    c.close()
    assert float(page.k.sum()) == float(page.k.sum())  # still mapped while the page lives


async def test_async_client_stages_pages_too(daemon: Daemon) -> None:
    async with AsyncKVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20,
                                 staging_bytes=256 << 10) as c:
        page = fill(await c.staged_page(SHAPE), 6)
        assert c.uses_shared_memory
        assert await c.put([b"a"], [page]) == ["stored"]
        assert same((await c.get([b"a"]))[0], page)
        await c.release_page(page)


def test_a_staged_page_refilled_after_an_abandoned_put_is_never_stored_late(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon reads a staged put late (queued, slow); the client's deadline passed and
    the worker refilled the page. The late put must store nothing: the refilled bytes are not
    the page its key names. (The client marks the segment it leaves behind as reused.)"""
    import threading
    import time

    import kvtier.transport.cache.servicer as servicer_mod
    from kvtier_client import DeadlineExceededError

    real = servicer_mod.copy_pages
    done = threading.Event()

    def late(*args: object, **kw: object) -> object:
        time.sleep(0.6)  # the client times out and the worker refills meanwhile
        try:
            return real(*args, **kw)  # type: ignore[arg-type]
        finally:
            done.set()

    with KVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20,
                      staging_bytes=256 << 10) as c:
        page = fill(c.staged_page(SHAPE), 1)
        monkeypatch.setattr(servicer_mod, "copy_pages", late)
        with pytest.raises(DeadlineExceededError):
            c.put([b"old"], [page], timeout_s=0.2)
        fill(page, 2)  # the worker reuses the page for its next chunk
        assert done.wait(5)
        monkeypatch.undo()
        time.sleep(0.1)  # the late handler's store, had it gone on
        assert daemon.context.store.page_info("t", b"old") is None
        assert c.put([b"new"], [page]) == ["stored"]
        assert same(c.get([b"new"])[0], page) and c.get([b"old"]) == [None]


async def test_an_async_staged_put_cancelled_by_its_task_is_never_stored_late(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above with the asyncio client, whose put is cancelled by its task (no gRPC error)."""
    import asyncio
    import threading
    import time

    import kvtier.transport.cache.servicer as servicer_mod

    real = servicer_mod.copy_pages
    started, done = threading.Event(), threading.Event()

    def late(*args: object, **kw: object) -> object:
        started.set()
        time.sleep(0.6)
        try:
            return real(*args, **kw)  # type: ignore[arg-type]
        finally:
            done.set()

    async with AsyncKVTierClient(daemon.grpc_address, "t", shm_bytes=1 << 20,
                                 staging_bytes=256 << 10) as a:
        page = fill(await a.staged_page(SHAPE), 1)
        monkeypatch.setattr(servicer_mod, "copy_pages", late)
        task = asyncio.create_task(a.put([b"old"], [page]))
        assert await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fill(page, 2)
        assert await asyncio.to_thread(done.wait, 5)
        monkeypatch.undo()
        await asyncio.sleep(0.1)
        assert daemon.context.store.page_info("t", b"old") is None
        assert await a.put([b"new"], [page]) == ["stored"]
        assert same((await a.get([b"new"]))[0], page)
