"""The same-host shared-memory path: used when local, bound to one namespace, cleaned up."""

from __future__ import annotations

import glob
import os
from typing import Any

import grpc
import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier_client import KVTierClient, Page
from kvtier_client import shm as shm_client
from kvtier_client.errors import AbortedError, DeadlineExceededError, InvalidArgumentError
from kvtier_client.shm import Segment
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

from .conftest import make_page, wait_for


def _sessions(d: Daemon) -> int:
    return len(d._shm)


def test_local_client_uses_shm_and_leaves_nothing_in_dev_shm(daemon: Daemon) -> None:
    before = set(glob.glob("/dev/shm/kvtier-*"))
    c = KVTierClient(daemon.grpc_address, "tenant-a")  # auto: loopback -> shared memory
    page = make_page(1)
    c.put([b"a"], [page])
    assert c.uses_shared_memory and _sessions(daemon) == 1
    got = c.get([b"a"])[0]
    assert got is not None and np.array_equal(got.k, page.k) and np.array_equal(got.v, page.v)
    assert set(glob.glob("/dev/shm/kvtier-*")) == before  # unlinked once attached
    c.close()
    assert wait_for(lambda: _sessions(daemon) == 0)  # disconnect ends the session


def test_results_do_not_alias_the_segment(daemon: Daemon) -> None:
    with KVTierClient(daemon.grpc_address, "tenant-a") as c:
        c.put([b"a", b"b"], [make_page(1), make_page(2)])
        first = c.get([b"a"])[0]
        c.get([b"b"])  # overwrites the segment's request area
        assert first is not None and np.array_equal(first.k, make_page(1).k)


def test_session_is_bound_to_its_namespace(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        stub = pb_grpc.CacheServiceStub(ch)
        seg = Segment(1 << 20)
        call = stub.AttachShm(pb.AttachShmRequest(namespace="tenant-a", path=seg.path,
                                                  size=seg.size, token=seg.token))
        session = next(call).session
        seg.unlink()
        with KVTierClient(daemon.grpc_address, "tenant-b", shared_memory=False) as other:
            other.put([b"secret"], [make_page(9)])
        # a tenant-a session cannot pull tenant-b pages into its segment
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Get(pb.GetRequest(namespace="tenant-b", keys=[b"secret"],
                                        shm_session=session, shm_offset=64,
                                        shm_capacity=1 << 19)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "shm_session" in info.value.details()
        assert bytes(seg.view[64:64 + 16]) == bytes(16)  # nothing was written
        call.cancel()
        seg.close()
    assert wait_for(lambda: _sessions(daemon) == 0)


@pytest.mark.parametrize("path,field", [
    ("/etc/passwd", "path"),
    ("/dev/shm/kvtier-" + "0" * 32, "path"),  # well-formed but absent: not on this host
])
def test_attach_refuses_foreign_paths(daemon: Daemon, path: str, field: str) -> None:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        stub = pb_grpc.CacheServiceStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            next(stub.AttachShm(pb.AttachShmRequest(namespace="a", path=path, size=1 << 20,
                                                    token=os.urandom(16))))
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                     grpc.StatusCode.FAILED_PRECONDITION)
        assert info.value.details().startswith(f"{field}: ")


def test_attach_refuses_a_wrong_token(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        seg = Segment(1 << 20)
        try:
            with pytest.raises(grpc.RpcError) as info:
                next(pb_grpc.CacheServiceStub(ch).AttachShm(pb.AttachShmRequest(
                    namespace="a", path=seg.path, size=seg.size, token=os.urandom(16))))
            assert "token" in info.value.details()
        finally:
            seg.close()


def test_daemon_stop_ends_sessions_and_client_falls_back(daemon: Daemon) -> None:
    c = KVTierClient(daemon.grpc_address, "tenant-a")
    c.put([b"a"], [make_page(1)])
    assert c.uses_shared_memory
    daemon._shm.close_all()  # what stop() does; the client must notice and go inline
    got = c.get([b"a"])[0]
    assert got is not None and np.array_equal(got.k, make_page(1).k)
    assert not c.uses_shared_memory
    c.close()


def test_large_puts_copy_while_the_call_is_in_flight(daemon: Daemon,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a put of >= 256 KiB starts its call first and fills the segment behind it
    (shm_fill); what the daemon keeps is its own copy, unaffected by the client's next
    writes. With overlap_copy=False the bytes are in place before the call."""
    import kvtier_client.core as core

    if not shm_client.OVERLAP_SAFE:
        pytest.skip("overlapped puts are x86-64 only")
    fills: list[int] = []
    real = core.fill_segment

    def spy(segment: Segment, plan: object, fill: int,
            chunk: int = shm_client.FILL_CHUNK) -> None:
        fills.append(fill)
        real(segment, plan, fill, chunk)  # type: ignore[arg-type]

    monkeypatch.setattr(core, "fill_segment", spy)  # what the client's copier runs
    rng = np.random.default_rng(5)
    big = [Page(rng.standard_normal((4, 256, 8, 64)).astype(np.float16),
                rng.standard_normal((4, 256, 8, 64)).astype(np.float16)) for _ in range(3)]
    with KVTierClient(daemon.grpc_address, "tenant-a", lend_bytes=0) as c:
        assert c.put([b"big0"], [big[0]]) == ["stored"]
        assert c.put([b"big1", b"big2", b"small"], [big[1], big[2], make_page(3)]) == \
            ["stored"] * 3
        c.put([b"tiny"], [make_page(4)])  # 32 KiB: copied before the call, no fill
        assert fills == [1, 2] and c.uses_shared_memory
        session = c._shm.session
        assert session is not None
        session.segment.view[64:64 + (4 << 20)] = bytes(4 << 20)  # scribble over the area
        for key, page in [(b"big0", big[0]), (b"big1", big[1]), (b"big2", big[2]),
                          (b"small", make_page(3))]:
            got = c.get([key])[0]
            assert got is not None and np.array_equal(got.k, page.k) \
                and np.array_equal(got.v, page.v)
        bad = Page(big[0].k.copy(), big[0].v.copy())
        bad.v[3, 255, 7, 63] = np.nan  # in the last piece the client writes
        with pytest.raises(InvalidArgumentError, match="v holds NaN or Inf"):
            c.put([b"bad"], [bad])
        assert daemon.context.store.page_info("tenant-a", b"bad") is None
        assert c.put([b"after"], [big[2]]) == ["stored"]  # the session still works
    with KVTierClient(daemon.grpc_address, "tenant-b", lend_bytes=0,
                      overlap_copy=False) as plain:
        assert plain.put([b"big0"], [big[0]]) == ["stored"] and plain.uses_shared_memory
        got = plain.get([b"big0"])[0]
        assert got is not None and np.array_equal(got.v, big[0].v)
    # "tiny" (3) was copied before its call; the failed "bad" (4) voided 5; plain never
    assert fills == [1, 2, 4, 6]


def test_an_overlapped_put_reports_the_calls_error_and_its_copier_ends_with_the_client(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import threading

    import kvtier_client.core as core

    if not shm_client.OVERLAP_SAFE:
        pytest.skip("overlapped puts are x86-64 only")

    def broken_fill(*args: object, **kw: object) -> None:
        raise RuntimeError("copier failed")

    monkeypatch.setattr(core, "fill_segment", broken_fill)
    rng = np.random.default_rng(8)
    big = Page(rng.standard_normal((4, 256, 8, 64)).astype(np.float16),
               rng.standard_normal((4, 256, 8, 64)).astype(np.float16))
    c = KVTierClient(daemon.grpc_address, "tenant-a", overlap_copy=True, lend_bytes=0)
    # the call's error, not the copier's: the daemon waits for the bytes until about the
    # call's deadline (ABORTED), unless the client's deadline strikes first
    with pytest.raises((AbortedError, DeadlineExceededError)):
        c.put([b"x"], [big], timeout_s=0.3)
    monkeypatch.undo()
    monkeypatch.setattr(core, "fill_segment", _fill_then_fail(core.fill_segment))
    with pytest.raises(RuntimeError, match="copier failed"):  # the call succeeded, so the
        c.put([b"y"], [big], timeout_s=5)  # copier's error is the one raised
    monkeypatch.undo()
    assert any(t.name == "kvtier-shm-fill" for t in threading.enumerate())
    del c
    gc.collect()
    assert wait_for(lambda: not any(t.name == "kvtier-shm-fill"
                                    for t in threading.enumerate()))


def _fill_then_fail(real: Any) -> Any:
    def fill(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        raise RuntimeError("copier failed")
    return fill


def test_a_put_the_client_gave_up_on_never_stores_the_next_puts_bytes(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon reads a put's bytes late (queued, slow); meanwhile the client's deadline
    passed and it put other pages through the same part of its segment. The late put must
    store nothing rather than the new bytes under its own key."""
    import threading
    import time

    import kvtier.transport.cache.servicer as servicer_mod

    real = servicer_mod.copy_pages
    first = threading.Event()

    def late(*args: object, **kw: object) -> object:
        if not first.is_set():
            first.set()
            time.sleep(0.6)  # the client times out and writes its next put meanwhile
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(servicer_mod, "copy_pages", late)
    with KVTierClient(daemon.grpc_address, "tenant-a", lend_bytes=0) as c:  # copies its puts
        c.get([b"warm-up"])  # attach the session first
        with pytest.raises(DeadlineExceededError):
            c.put([b"old"], [make_page(1)], timeout_s=0.2)
        assert c.put([b"new"], [make_page(2)], timeout_s=5) == ["stored"]
        assert c.get([b"old"]) == [None]
        got = c.get([b"new"])[0]
        assert got is not None and np.array_equal(got.k, make_page(2).k)


def test_a_call_the_client_gave_up_on_leaves_its_segment_behind(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """A get whose deadline passed may still write into the segment when the daemon gets to
    it: the client attaches a new segment for its next calls, so nothing it reads or puts
    afterwards can be overwritten by that late handler."""
    import time

    store = daemon.context.store
    real = store.get_raw_checked
    slow = {"left": 1}

    def late_get_raw_checked(*args: object) -> object:
        if slow["left"]:
            slow["left"] -= 1
            time.sleep(0.6)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "get_raw_checked", late_get_raw_checked)
    with KVTierClient(daemon.grpc_address, "tenant-a") as c:
        c.put([b"a"], [make_page(1)])
        first = c._shm.session
        with pytest.raises(DeadlineExceededError):
            c.get([b"a"], timeout_s=0.2)
        assert c._shm.session is None  # dropped, not reused
        got = c.get([b"a"])[0]
        assert got is not None and np.array_equal(got.k, make_page(1).k)
        assert c.uses_shared_memory and c._shm.session is not first
        c.put([b"b"], [make_page(2)], timeout_s=5)
        got = c.get([b"b"])[0]
        assert got is not None and np.array_equal(got.v, make_page(2).v)


def test_threads_sharing_one_client_never_see_each_others_pages(daemon: Daemon) -> None:
    """The segment's request area is shared per client: transfers through it are serialized."""
    from concurrent.futures import ThreadPoolExecutor

    c = KVTierClient(daemon.grpc_address, "tenant-a")
    errors: list[str] = []

    def worker(w: int) -> None:
        for i in range(15):
            key = b"w%d-%d" % (w, i)
            page = make_page(100 * w + i)
            c.put([key], [page])
            got = c.get([key])[0]
            if got is None or not np.array_equal(got.k, page.k) or not np.array_equal(got.v,
                                                                                     page.v):
                errors.append(key.decode())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    assert c.uses_shared_memory and not errors
    c.close()


def test_one_put_mixing_segment_and_inline_pages_keeps_order_and_chain(daemon: Daemon) -> None:
    # a 64 KiB segment holds three 16 KiB pages; the other two go inline in the same call
    c = KVTierClient(daemon.grpc_address, "mixed", shm_bytes=1 << 16)
    keys = [b"m%d" % i for i in range(5)]
    pages = [Page(p.k, p.v, 16 * i, chain_position=10 + i)
             for i, p in enumerate(make_page(40 + i) for i in range(5))]
    assert c.put(keys, pages) == ["stored"] * 5
    assert c.uses_shared_memory
    store = daemon.context.store
    for i, (key, page) in enumerate(zip(keys, pages)):
        info = store.page_info("mixed", key)
        assert info is not None and info.chain_position == 10 + i
        got = c.get([key])[0]
        assert got is not None and got.start_position == 16 * i
        assert np.array_equal(got.k, page.k) and np.array_equal(got.v, page.v)
    with pytest.raises(InvalidArgumentError, match="twice"):
        c.put([b"d", b"d"], [make_page(1), make_page(2)])
    bad = make_page(3)
    bad.v[0, 0, 0, 0] = np.inf
    with pytest.raises(InvalidArgumentError, match="v holds NaN or Inf"):
        c.put([b"bad"], [bad])  # checked in the daemon's copy, refused before storing
    assert store.page_info("mixed", b"bad") is None
    assert c.put([b"m0"], [pages[0]]) == ["exists"]
    c.close()
