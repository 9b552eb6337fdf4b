"""DeviceService over a real gRPC server, with the device pool in host memory: the worker's
CUDA IPC copies are played by reading and writing the pool's buffer in this process (what a
mapped pool is to a worker); ``tests/gpu/test_gpu_ipc.py`` does it across processes on a GPU."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from kvtier.config import Settings, TierConfig
from kvtier.daemon import Daemon
from kvtier.store.device_pool import ALIGN
from kvtier.types import Codec, Medium
from kvtier_client import KVTierClient, Page
from kvtier_proto.v1 import device_pb2 as pb
from kvtier_proto.v1 import device_pb2_grpc as pb_grpc

SHAPE = (2, 16, 2, 64)  # 8 KiB of float16 a tensor
NBYTES = 2 * 16 * 2 * 64 * 2
NS = "tenant-a"


def _settings(pool: bool = True) -> Settings:
    page = 2 * NBYTES
    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                        capacity_bytes=8 * page),
             TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8,
                        capacity_bytes=8 * page)]
    return Settings(grpc_port=0, tiers=tiers, device="cpu",
                    device_pool_bytes=8 * page if pool else None)


@pytest.fixture()
def daemon() -> Iterator[Daemon]:
    d = Daemon(_settings()).start()
    yield d
    d.stop(grace_s=0.5)


class Worker:
    """A raw DeviceService session (the CUDA part of the client needs a GPU)."""

    def __init__(self, d: Daemon, namespace: str = NS) -> None:
        self.channel = grpc.insecure_channel(d.grpc_address)
        self.stub = pb_grpc.DeviceServiceStub(self.channel)
        self.attach = self.stub.AttachDevice(pb.AttachDeviceRequest(namespace=namespace))
        self.reply: pb.AttachDeviceReply = next(self.attach)
        self.session = self.reply.session
        self.namespace = namespace
        pool = d.context.store.device_pool
        assert pool is not None
        self.pool = pool.buffer  # the mapping a worker gets from the IPC handle

    def view(self, offset: int) -> torch.Tensor:
        return self.pool[offset:offset + NBYTES].view(torch.float16).view(SHAPE)

    def req(self, cls: Any, **kw: Any) -> Any:
        return cls(namespace=self.namespace, session=self.session, **kw)

    def close(self) -> None:
        self.attach.cancel()
        self.channel.close()


def _kv(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(SHAPE).astype(np.float16),
            rng.standard_normal(SHAPE).astype(np.float16))


def test_get_lends_hot_pages_and_release_ends_the_lease(daemon: Daemon) -> None:
    k, v = _kv(1)
    with KVTierClient(daemon.grpc_address, NS, shared_memory=False) as c:
        c.put([b"a"], [Page(k, v, 16)])
    w = Worker(daemon)
    try:
        assert w.reply.max_lease_bytes > 0 and w.reply.lease_ttl_s > 0
        assert w.reply.device_uuid == ""  # a host pool: nothing to map across processes
        reply = w.stub.GetDevice(w.req(pb.GetDeviceRequest, keys=[b"a", b"missing"]))
        hit, miss = reply.pages
        assert hit.found and not miss.found and hit.tier == "hot" and hit.precision == 16
        lease = hit.lease
        assert lease.dtype == "float16" and list(lease.shape) == list(SHAPE)
        assert lease.start_position == 16 and lease.k_offset % ALIGN == 0
        assert np.array_equal(w.view(lease.k_offset).numpy(), k)
        assert np.array_equal(w.view(lease.v_offset).numpy(), v)
        released = w.stub.ReleaseDevice(w.req(pb.ReleaseDeviceRequest, leases=[lease.lease]))
        assert released.released == 1
    finally:
        w.close()


def test_a_get_releases_the_leases_of_the_one_before(daemon: Daemon) -> None:
    """The release of a get rides on the session's next call: one round trip a get."""
    k, v = _kv(2)
    with KVTierClient(daemon.grpc_address, NS, shared_memory=False) as c:
        c.put([b"a"], [Page(k, v, 0)])
    w = Worker(daemon)
    try:
        first = w.stub.GetDevice(w.req(pb.GetDeviceRequest, keys=[b"a"])).pages[0].lease.lease
        second = w.stub.GetDevice(w.req(pb.GetDeviceRequest, keys=[b"a"], release=[first]))
        lid = second.pages[0].lease.lease
        assert lid != first
        # the first lease is gone (released once: a second release finds nothing), the second
        # is open until a reserve carries it
        assert w.stub.ReleaseDevice(w.req(pb.ReleaseDeviceRequest, leases=[first])).released == 0
        spec = pb.DevicePageSpec(dtype="float16", shape=list(SHAPE), start_position=0)
        reserved = w.stub.ReserveDevice(w.req(pb.ReserveDeviceRequest, pages=[spec],
                                              release=[lid]))
        assert len(reserved.leases) == 1
        assert w.stub.ReleaseDevice(w.req(pb.ReleaseDeviceRequest, leases=[lid])).released == 0
        assert w.stub.ReleaseDevice(w.req(
            pb.ReleaseDeviceRequest, leases=[reserved.leases[0].lease])).released == 1
    finally:
        w.close()


def test_put_through_reserved_blocks_is_stored_without_a_copy(daemon: Daemon) -> None:
    w = Worker(daemon)
    store = daemon.context.store
    try:
        spec = pb.DevicePageSpec(dtype="float16", shape=list(SHAPE), start_position=32)
        leases = w.stub.ReserveDevice(w.req(pb.ReserveDeviceRequest, pages=[spec, spec])).leases
        pages = [_kv(10), _kv(11)]
        for lease, (k, v) in zip(leases, pages):
            w.view(lease.k_offset).copy_(torch.from_numpy(k))
            w.view(lease.v_offset).copy_(torch.from_numpy(v))
        reply = w.stub.CommitDevice(w.req(pb.CommitDeviceRequest, keys=[b"p0", b"p1"],
                                          leases=[lease.lease for lease in leases]))
        assert list(reply.stored) == [True, True]
        for i, (k, v) in enumerate(pages):
            got = store.get(NS, [b"p%d" % i])[0]
            assert got is not None and got.tier == "hot" and got.page.start_position == 32
            assert np.array_equal(got.page.k.numpy(), k) and np.array_equal(got.page.v.numpy(), v)
        held = store.get_device(NS, [b"p0"])[0]
        assert held is not None
        assert store.device_pool is not None
        assert store.device_pool.offset_of(held.page.k) == leases[0].k_offset  # the same block
        again = w.stub.ReserveDevice(w.req(pb.ReserveDeviceRequest, pages=[spec])).leases[0]
        w.view(again.k_offset).copy_(torch.from_numpy(pages[0][0]))
        w.view(again.v_offset).copy_(torch.from_numpy(pages[0][1]))
        dup = w.stub.CommitDevice(w.req(pb.CommitDeviceRequest, keys=[b"p0"],
                                        leases=[again.lease]))
        assert list(dup.stored) == [False]  # the key existed: its block goes back
        with pytest.raises(grpc.RpcError) as err:  # a committed lease is gone
            w.stub.CommitDevice(w.req(pb.CommitDeviceRequest, keys=[b"p9"],
                                      leases=[leases[0].lease]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        w.close()


def test_non_finite_pages_are_refused_at_commit(daemon: Daemon) -> None:
    w = Worker(daemon)
    try:
        spec = pb.DevicePageSpec(dtype="float16", shape=list(SHAPE))
        lease = w.stub.ReserveDevice(w.req(pb.ReserveDeviceRequest, pages=[spec])).leases[0]
        w.view(lease.k_offset).fill_(float("nan"))
        w.view(lease.v_offset).fill_(0)
        with pytest.raises(grpc.RpcError) as err:
            w.stub.CommitDevice(w.req(pb.CommitDeviceRequest, keys=[b"n"], leases=[lease.lease]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        w.close()


def test_sessions_are_bound_to_their_namespace_and_end_with_their_stream(
        daemon: Daemon) -> None:
    k, v = _kv(2)
    with KVTierClient(daemon.grpc_address, NS, shared_memory=False) as c:
        c.put([b"a"], [Page(k, v)])
    w = Worker(daemon)
    store = daemon.context.store
    assert store.device_pool is not None
    other = pb.GetDeviceRequest(namespace="tenant-b", session=w.session, keys=[b"a"])
    with pytest.raises(grpc.RpcError) as err:
        w.stub.GetDevice(other)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    w.stub.GetDevice(w.req(pb.GetDeviceRequest, keys=[b"a"]))  # a lease left open
    assert store.delete(NS, [b"a"]) == 1
    gc.collect()
    used = store.device_pool.stats().used_bytes
    assert used > 0  # the lease keeps the deleted page's block
    w.close()
    deadline = time.monotonic() + 5
    while store.device_pool.stats().used_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert store.device_pool.stats().used_bytes == 0  # the session ended, its lease with it
    with pytest.raises(grpc.RpcError) as err:
        w2 = Worker(daemon)
        try:
            w2.stub.GetDevice(pb.GetDeviceRequest(namespace=NS, session=w.session, keys=[b"a"]))
        finally:
            w2.close()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_a_pool_the_service_says_so() -> None:
    d = Daemon(_settings(pool=False)).start()
    try:
        channel = grpc.insecure_channel(d.grpc_address)
        stub = pb_grpc.DeviceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(stub.AttachDevice(pb.AttachDeviceRequest(namespace=NS)))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        channel.close()
    finally:
        d.stop(grace_s=0.5)


def test_a_session_copies_a_get_out_in_one_allocation() -> None:
    """DeviceSession's copy of a get (what runs on the GPU, here on a pool in host memory):
    every found page's K and V, bit for bit, in one buffer; misses stay None."""
    from kvtier_client.device import DeviceSession

    pool = torch.zeros(4 * NBYTES, dtype=torch.uint8)
    k, v = (torch.from_numpy(a) for a in _kv(5))
    pool[ALIGN:ALIGN + NBYTES] = k.view(torch.uint8).reshape(-1)
    pool[2 * NBYTES:3 * NBYTES] = v.view(torch.uint8).reshape(-1)
    session = DeviceSession.__new__(DeviceSession)
    session._torch, session.device, session._pool = torch, torch.device("cpu"), pool
    lease = pb.DeviceLease(lease=7, k_offset=ALIGN, v_offset=2 * NBYTES, dtype="float16",
                           shape=list(SHAPE), start_position=32)
    got = session._copy_out([pb.DevicePageResult(found=False),
                             pb.DevicePageResult(found=True, lease=lease, tier="hot",
                                                 precision=16)])
    assert got[0] is None
    page = got[1]
    assert page is not None and page.start_position == 32 and page.tier == "hot"
    assert torch.equal(page.k, k) and torch.equal(page.v, v)
    assert page.k.untyped_storage().data_ptr() == page.v.untyped_storage().data_ptr()
    pool.zero_()  # the copies are the session's own
    assert torch.equal(page.k, k)
