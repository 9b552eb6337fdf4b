"""The asyncio client's same-host shared-memory path: same semantics and fallbacks as the sync one."""

from __future__ import annotations

import asyncio
import glob
import os
import time
from typing import Any

import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier_client import AsyncKVTierClient, KVTierClient, Page
from kvtier_client import shm as shm_mod


def make_page(seed: int, shape: tuple[int, ...] = (2, 16, 2, 64)) -> Page:
    rng = np.random.default_rng(seed)
    return Page(rng.standard_normal(shape).astype(np.float16),
                rng.standard_normal(shape).astype(np.float16), seed)


def same(got: Any, page: Page) -> bool:
    return (got is not None and np.array_equal(got.k, page.k) and np.array_equal(got.v, page.v)
            and got.start_position == page.start_position)


async def wait_for(cond: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_local_async_client_uses_shm_and_leaves_nothing_behind(daemon: Daemon) -> None:
    before = set(glob.glob("/dev/shm/kvtier-*"))
    c = AsyncKVTierClient(daemon.grpc_address, "tenant-a")  # auto: loopback -> shm
    page = make_page(1)
    assert await c.put([b"a"], [page]) == ["stored"]
    assert c.uses_shared_memory and len(daemon._shm) == 1
    assert same((await c.get([b"a"]))[0], page)
    assert set(glob.glob("/dev/shm/kvtier-*")) == before  # unlinked once attached
    await c.close()
    assert await wait_for(lambda: len(daemon._shm) == 0)  # closing ends the session


async def test_large_async_puts_copy_while_the_call_is_in_flight(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier_client.core as core

    if not shm_mod.OVERLAP_SAFE:
        pytest.skip("overlapped puts are x86-64 only")
    fills: list[int] = []
    real = core.fill_segment

    def spy(segment: Any, plan: Any, fill: int, chunk: int = shm_mod.FILL_CHUNK) -> None:
        fills.append(fill)
        real(segment, plan, fill, chunk)

    monkeypatch.setattr(core, "fill_segment", spy)
    big = [make_page(i, (4, 256, 8, 64)) for i in range(3)]
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a", overlap_copy=True,
                                 lend_bytes=0) as a:
        assert await a.put([b"b0"], big[:1]) == ["stored"]
        assert await a.put([b"b1", b"b2"], big[1:]) == ["stored"] * 2
        assert fills == [1, 2]
        got = await a.get([b"b0", b"b1", b"b2"])
    assert all(same(g, p) for g, p in zip(got, big))


async def test_async_and_sync_clients_read_each_others_pages(daemon: Daemon) -> None:
    pages = [make_page(i) for i in range(3)]
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a") as a:
        await a.put([b"p0", b"p1"], pages[:2])
        with KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False) as s:
            s.put([b"p2"], pages[2:])
            assert all(same(g, p) for g, p in zip(s.get([b"p0", b"p1"]), pages))
        got = await a.get([b"p0", b"p1", b"p2", b"missing"])
        assert a.uses_shared_memory
    assert all(same(g, p) for g, p in zip(got, pages)) and got[3] is None


async def test_pages_beyond_the_segment_go_inline(daemon: Daemon) -> None:
    """A 64 KiB segment holds one 32 KiB page: the rest of a batch goes inline both ways."""
    pages = [make_page(i, (2, 32, 2, 64)) for i in range(4)]  # 16 KiB per tensor
    keys = [b"k%d" % i for i in range(4)]
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a", shm_bytes=1 << 16,
                                 chunk_bytes=48 << 10) as c:
        assert await c.put(keys, pages) == ["stored"] * 4
        assert c.uses_shared_memory
        got = await c.get(keys)  # one page in the segment, one inline, two deferred
    assert all(same(g, p) for g, p in zip(got, pages))


async def test_session_ended_by_the_daemon_falls_back_inline(daemon: Daemon) -> None:
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a") as c:
        await c.put([b"a"], [make_page(1)])
        assert c.uses_shared_memory
        daemon._shm.close_all()  # what stop() does
        assert same((await c.get([b"a"]))[0], make_page(1))
        assert not c.uses_shared_memory
        assert await c.put([b"b"], [make_page(2)]) == ["stored"]
        assert same((await c.get([b"b"]))[0], make_page(2))


async def test_daemon_that_cannot_see_the_segment_means_inline(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a daemon on another host answers (it cannot open the path): inline, no error."""

    class Elsewhere(shm_mod.Segment):
        def __init__(self, size: int, staging_bytes: int = 0, lend_bytes: int = 0) -> None:
            super().__init__(size, staging_bytes, lend_bytes)
            os.unlink(self.path)  # mapped here, absent for the daemon

    monkeypatch.setattr(shm_mod, "Segment", Elsewhere)
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a", shared_memory=True) as c:
        assert await c.put([b"a"], [make_page(1)]) == ["stored"]
        assert not c.uses_shared_memory
        assert same((await c.get([b"a"]))[0], make_page(1))
    assert await wait_for(lambda: len(daemon._shm) == 0)


async def test_remote_target_and_shm_off_stay_inline(daemon: Daemon) -> None:
    port = daemon.grpc_address.rsplit(":", 1)[1]
    for client in (AsyncKVTierClient(daemon.grpc_address, "t", shared_memory=False),
                   AsyncKVTierClient(f"0.0.0.0:{port}", "t")):  # not a loopback name: remote
        async with client as c:
            await c.put([b"a"], [make_page(1)], namespace="t")
            assert same((await c.get([b"a"]))[0], make_page(1))
            assert not c.uses_shared_memory
    assert await wait_for(lambda: len(daemon._shm) == 0)


async def test_other_namespaces_go_inline_and_stay_apart(daemon: Daemon) -> None:
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a") as c:
        await c.put([b"k"], [make_page(1)])
        await c.put([b"k"], [make_page(2)], namespace="tenant-b")  # not the session's: inline
        assert same((await c.get([b"k"]))[0], make_page(1))
        assert same((await c.get([b"k"], namespace="tenant-b"))[0], make_page(2))
        assert c.uses_shared_memory and len(daemon._shm) == 1


async def test_concurrent_coroutines_never_see_each_others_pages(daemon: Daemon) -> None:
    """One segment per client: transfers through it are serialized, never interleaved."""
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a") as c:

        async def worker(w: int) -> list[bytes]:
            bad = []
            for i in range(10):
                key, page = b"w%d-%d" % (w, i), make_page(100 * w + i)
                await c.put([key], [page])
                if not same((await c.get([key]))[0], page):
                    bad.append(key)
            return bad

        results = await asyncio.gather(*(worker(w) for w in range(4)))
        assert c.uses_shared_memory
    assert results == [[]] * 4


async def test_bad_input_still_gets_clear_errors_over_shm(daemon: Daemon) -> None:
    from kvtier_client import InvalidArgumentError

    k = np.zeros((1, 4, 1, 8), np.float16)
    async with AsyncKVTierClient(daemon.grpc_address, "tenant-a") as c:
        with pytest.raises(InvalidArgumentError) as info:
            await c.put([b"nan"], [Page(k, np.full_like(k, np.nan))])
        assert "v holds NaN" in str(info.value)
        assert c.uses_shared_memory  # the session survives a refused put
        assert await c.put([b"ok"], [Page(k, k)]) == ["stored"]
