"""No client can starve the daemon: stalled streams, idle sessions, stream limits, and calls
that end outside their handler counted with their real status."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from kvtier.config import LimitsConfig, load_settings
from kvtier.daemon import Daemon
from kvtier.errors import ConfigError
from kvtier_client import KVTierClient
from kvtier_client.shm import Segment
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

from .conftest import DaemonFactory, make_page, wait_for

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else channels share one connection
SMALL = dict(handler_threads=8, max_streams=4, max_streams_per_peer=2,
             max_streams_per_tenant=3, stream_idle_s=1.0, shm_lease_s=1.0,
             max_shm_sessions=64, max_shm_sessions_per_tenant=64)


def _header(key: bytes) -> pb.PageHeader:
    page = make_page(1)
    return pb.PageHeader(key=key, dtype="float16", shape=list(page.k.shape),
                         k_len=page.k.nbytes, v_len=page.v.nbytes)


def _stalled(release: threading.Event, namespace: str = "t") -> Iterator[pb.PutRequest]:
    """A put stream that sends its header and then nothing until ``release``."""
    yield pb.PutRequest(namespace=namespace, pages=[_header(b"k")])
    release.wait()


def _code(fut: Any) -> grpc.StatusCode:
    try:
        fut.result()
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_stalled_streams_do_not_starve_other_clients(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=dict(SMALL, stream_idle_s=3.0))
    limits = daemon.context.limits
    assert limits is not None
    release = threading.Event()
    channels = [grpc.insecure_channel(daemon.grpc_address, options=OWN_CONNECTION)
                for _ in range(12)]
    try:
        # 12 stalled clients, more than the 8 handler threads, none with a deadline
        calls = [pb_grpc.CacheServiceStub(ch).PutStream.future(_stalled(release, f"n{i}"),
                                                                timeout=None)
                 for i, ch in enumerate(channels)]
        assert wait_for(lambda: limits.open_streams == 4)  # every stream slot is stalled
        with KVTierClient(daemon.grpc_address, "other", shared_memory=False) as c:
            c.put([b"a"], [make_page(2)])
            t0 = time.monotonic()
            for _ in range(20):
                assert c.lookup([b"a"], timeout_s=2.0).prefix_length == 1
            assert time.monotonic() - t0 < 10.0
        codes = [_code(f) for f in calls]  # none hangs: refused at once or cancelled when idle
    finally:
        release.set()
        for ch in channels:
            ch.close()
    # refused at once past max_streams, or cancelled by the idle watchdog: none hangs
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
    # the daemon counts a cancelled stream when its handler ends, which may be after the client
    # saw the cancel
    assert wait_for(lambda: limits.open_streams == 0)
    stats = daemon.context.rpc_stats
    assert wait_for(lambda: ("PutStream", "CANCELLED") in stats.totals())
    assert ("PutStream", "INTERNAL") not in stats.totals()


def test_per_connection_and_per_tenant_stream_limits(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=dict(SMALL, max_streams=6, stream_idle_s=30.0))
    limits = daemon.context.limits
    assert limits is not None
    release = threading.Event()
    channels = [grpc.insecure_channel(daemon.grpc_address, options=OWN_CONNECTION)
                for _ in range(3)]
    try:
        stub, stub2, stub3 = (pb_grpc.CacheServiceStub(ch) for ch in channels)
        held = [stub.PutStream.future(_stalled(release, "a"), timeout=None) for _ in range(2)]
        assert wait_for(lambda: limits.open_streams == 2)
        with pytest.raises(grpc.RpcError) as info:  # a third on the same connection
            stub.PutStream(_stalled(release, "b"), timeout=5.0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer" in info.value.details()
        held.append(stub2.PutStream.future(_stalled(release, "a"), timeout=None))
        assert wait_for(lambda: limits.open_streams == 3)
        with pytest.raises(grpc.RpcError) as info:  # a fourth stream of tenant a
            stub3.PutStream(_stalled(release, "a"), timeout=5.0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_tenant" in info.value.details()
        stub3.PutStream.future(_stalled(release, "b"), timeout=None)  # another tenant: fine
        assert wait_for(lambda: limits.open_streams == 4)
    finally:
        release.set()
        for ch in channels:
            ch.close()
    assert wait_for(lambda: limits.open_streams == 0)


def test_a_getstream_whose_client_reads_nothing_is_cancelled(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=SMALL, max_page_bytes=64 << 20)
    big = np.ones((8, 1024, 8, 128), np.float16)  # 16 MiB a tensor: past any flow window
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False) as c:
        c.put([b"big"], [(big, big, 0)])
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        replies = pb_grpc.CacheServiceStub(ch).GetStream(
            pb.GetRequest(namespace="t", keys=[b"big"], chunk_bytes=1 << 20))
        next(replies)  # then read nothing more
        assert wait_for(lambda: ("GetStream", "CANCELLED")
                        in daemon.context.rpc_stats.totals(), timeout_s=10.0)
        with pytest.raises(grpc.RpcError) as info:
            for _ in replies:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED


def test_idle_shm_sessions_hold_no_thread_and_expire(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=SMALL)
    segments = [Segment(1 << 20) for _ in range(12)]  # more sessions than handler threads
    try:
        with grpc.insecure_channel(daemon.grpc_address) as ch:
            stub = pb_grpc.CacheServiceStub(ch)
            for seg in segments:
                reply = stub.OpenShm(pb.AttachShmRequest(namespace="t", path=seg.path,
                                                         size=seg.size, token=seg.token),
                                     timeout=5.0)
                assert reply.lease_s == pytest.approx(1.0) and reply.session
                seg.unlink()
            assert len(daemon._shm) == 12
            with KVTierClient(daemon.grpc_address, "other", shared_memory=False) as c:
                assert c.lookup([b"x"], timeout_s=2.0).prefix_length == 0
            # nobody renews: the reaper ends them all
            assert wait_for(lambda: len(daemon._shm) == 0, timeout_s=5.0)
            with pytest.raises(grpc.RpcError) as info:
                stub.RenewShm(pb.ShmLeaseRequest(namespace="t", session=reply.session),
                              timeout=5.0)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        for seg in segments:
            seg.close()


def test_client_keeps_its_lease_and_reattaches_when_it_is_lost(
        make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=dict(SMALL, shm_lease_s=0.6))
    with KVTierClient(daemon.grpc_address, "t") as c:
        c.put([b"a"], [make_page(1)])
        assert c.uses_shared_memory
        first = c._shm.session
        time.sleep(2.0)  # idle for three leases: the background renewals keep it
        assert len(daemon._shm) == 1 and c._shm.session is first
        got = c.get([b"a"])[0]
        assert got is not None and np.array_equal(got.k, make_page(1).k)
        assert first is not None
        daemon._shm.detach(first.id)  # as if its lease ran out
        assert wait_for(lambda: first.lost, timeout_s=3.0)
        got = c.get([b"a"])[0]  # a new segment, attached again
        assert got is not None and np.array_equal(got.v, make_page(1).v)
        assert c.uses_shared_memory and c._shm.session is not first
    assert wait_for(lambda: len(daemon._shm) == 0)  # close() ended it on the daemon


def test_shm_sessions_are_limited_per_tenant(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(limits=dict(SMALL, max_shm_sessions_per_tenant=1))
    a, b = Segment(1 << 20), Segment(1 << 20)
    try:
        with grpc.insecure_channel(daemon.grpc_address) as ch:
            stub = pb_grpc.CacheServiceStub(ch)
            stub.OpenShm(pb.AttachShmRequest(namespace="t", path=a.path, size=a.size,
                                             token=a.token), timeout=5.0)
            with pytest.raises(grpc.RpcError) as info:
                stub.OpenShm(pb.AttachShmRequest(namespace="t", path=b.path, size=b.size,
                                                 token=b.token), timeout=5.0)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_shm_sessions_per_tenant" in info.value.details()
    finally:
        a.close()
        b.close()


def test_putstream_ended_by_the_client_is_not_internal(
        make_daemon: DaemonFactory, caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(limits=dict(SMALL, stream_idle_s=30.0), max_page_bytes=1 << 20)
    release = threading.Event()
    with caplog.at_level(logging.INFO, logger="kvtier.transport.interceptor"), \
            grpc.insecure_channel(daemon.grpc_address) as ch:
        stub = pb_grpc.CacheServiceStub(ch)
        cancelled = stub.PutStream.future(_stalled(release), timeout=None)
        assert wait_for(lambda: daemon.context.limits.open_streams == 1)  # type: ignore
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as info:  # passes its deadline
            stub.PutStream(_stalled(release), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        huge = pb.PutRequest(namespace="t", pages=[_header(b"h")],
                             data=b"\0" * (10 << 20))  # over the message limit
        with pytest.raises(grpc.RpcError) as info:
            stub.PutStream(iter([huge]), timeout=5.0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert wait_for(lambda: {("PutStream", "CANCELLED"), ("PutStream", "DEADLINE_EXCEEDED")}
                        <= set(daemon.context.rpc_stats.totals())), \
            daemon.context.rpc_stats.totals()
    totals = daemon.context.rpc_stats.totals()
    assert not [k for k in totals if k[1] in ("INTERNAL", "UNKNOWN")], totals
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_limits_leave_threads_for_unary_calls() -> None:
    with pytest.raises(ValueError, match="handler_threads"):
        LimitsConfig(handler_threads=8, max_streams=8)
    with pytest.raises(ConfigError, match="max_streams"):
        load_settings(limits={"handler_threads": 4, "max_streams": 10})


def test_daemon_refuses_calls_past_max_concurrent_rpcs(make_daemon: DaemonFactory) -> None:
    daemon: Daemon = make_daemon(limits=dict(SMALL, max_concurrent_rpcs=2, max_streams=2,
                                             max_streams_per_peer=8, stream_idle_s=30.0))
    release = threading.Event()
    try:
        with grpc.insecure_channel(daemon.grpc_address) as ch:
            stub = pb_grpc.CacheServiceStub(ch)
            held = [stub.PutStream.future(_stalled(release, f"n{i}"), timeout=None)
                    for i in range(2)]
            assert wait_for(lambda: daemon.context.limits.open_streams == 2)  # type: ignore
            with pytest.raises(grpc.RpcError) as info:
                stub.Lookup(pb.LookupRequest(namespace="t", keys=[b"a"]), timeout=5.0)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            for f in held:
                _code(f)
            assert stub.Lookup(pb.LookupRequest(namespace="t", keys=[b"a"]),
                               timeout=5.0).prefix_length == 0
    finally:
        release.set()
