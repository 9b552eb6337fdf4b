"""The ``kvtier.v1.DeviceService`` servicer: CUDA IPC sessions of same-host workers.

A worker on the daemon's GPU host maps the device pool once (:func:`pool_handle`, torch's
CUDA IPC export of the pool's storage) and then moves pages device to device under leases
(:mod:`kvtier.store.device_leases`): read leases for hot pages it copies out, write leases for
blocks it fills and commits as pages. The contract is in ``device.proto``. A session lives as
long as its ``AttachDevice`` stream stays open; when the worker goes away, its leases end.

Thin, like the cache servicer: validate, convert, call the store and the lease table, convert
back; errors are :mod:`kvtier.errors` classes mapped by the one interceptor. Without a device
pool every call is FAILED_PRECONDITION.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import torch

from kvtier.errors import CapacityExhausted, Conflict, InvalidArgument, PermissionDenied
from kvtier.pages import check_keys, check_namespace, make_page, torch_dtype
from kvtier.store.device_leases import DeviceLeases, Lease
from kvtier.store.device_pool import DevicePool
from kvtier.store.store import TierStore
from kvtier.store.results import PutOutcome
from kvtier.transport.context import DaemonContext
from kvtier_proto.v1 import device_pb2 as pb
from kvtier_proto.v1 import device_pb2_grpc as pb_grpc

LEASE_TTL_S = 30.0
SESSION_SHARE = 4  # a session may hold at most this fraction (1/n) of the pool under leases


def pool_handle(pool: DevicePool) -> tuple[pb.CudaIpcHandle, str]:
    """The pool's CUDA IPC handle and its GPU's UUID (an empty handle for a host pool)."""
    if pool.device.type != "cuda":
        return pb.CudaIpcHandle(), ""
    storage = pool.buffer.untyped_storage()
    (device, handle, size, offset, ref_handle, ref_offset, event_handle,
     event_sync) = storage._share_cuda_()  # type: ignore[no-untyped-call]  # noqa: SLF001
    uuid = str(torch.cuda.get_device_properties(pool.device).uuid)
    return pb.CudaIpcHandle(
        device=int(device), handle=bytes(handle), size_bytes=int(size),
        offset_bytes=int(offset) + int(pool.buffer.storage_offset()),
        ref_counter_handle=bytes(ref_handle), ref_counter_offset=int(ref_offset),
        event_handle=bytes(event_handle or b""), event_sync_required=bool(event_sync)), uuid


def _lease_msg(lease: Lease) -> pb.DeviceLease:
    return pb.DeviceLease(lease=lease.lease_id, k_offset=lease.k_offset,
                          v_offset=lease.v_offset, dtype=lease.dtype, shape=list(lease.shape),
                          start_position=lease.start_position)


class DeviceServicer(pb_grpc.DeviceServiceServicer):  # type: ignore[misc]
    """Thin adapter from the wire to the store's device pool and its leases."""

    def __init__(self, ctx: DaemonContext) -> None:
        self._store: TierStore = ctx.store
        self._settings = ctx.settings
        pool = self._store.device_pool
        self._leases = None if pool is None else DeviceLeases(
            pool, max_bytes=max(1, pool.capacity_bytes // SESSION_SHARE), ttl_s=LEASE_TTL_S)

    def _table(self) -> DeviceLeases:
        if self._leases is None:
            raise Conflict("this daemon's device tier has no device pool: use CacheService",
                           field="device")
        return self._leases

    def _session(self, namespace: str, session: str) -> DeviceLeases:
        """The lease table, once the session is known to belong to ``namespace``."""
        table = self._table()
        ns = check_namespace(namespace)
        if table.namespace(session) != ns:
            raise PermissionDenied("the device session belongs to another namespace",
                                   field="session")
        table.sweep()
        return table

    def AttachDevice(self, request: pb.AttachDeviceRequest,
                     context: grpc.ServicerContext) -> Iterator[pb.AttachDeviceReply]:
        table = self._table()
        namespace = check_namespace(request.namespace)
        handle, uuid = pool_handle(table.pool)
        session = table.open_session(namespace)
        done = threading.Event()
        context.add_callback(done.set)
        try:
            yield pb.AttachDeviceReply(session=session, pool=handle, device_uuid=uuid,
                                       lease_ttl_s=table.ttl_s, max_lease_bytes=table.max_bytes)
            while not done.wait(0.5) and context.is_active():
                table.sweep()
        finally:
            table.end_session(session)

    def GetDevice(self, request: pb.GetDeviceRequest,
                  context: grpc.ServicerContext) -> pb.GetDeviceReply:
        table = self._session(request.namespace, request.session)
        if request.release:  # an earlier get's leases, its copies done
            table.release(request.session, list(request.release))
        found = self._store.get_device(request.namespace, list(request.keys))
        out = []
        granted: list[int] = []
        try:
            for res in found:
                if res is None:
                    out.append(pb.DevicePageResult(found=False))
                    continue
                lease = table.lend(request.session, res.page)
                granted.append(lease.lease_id)
                out.append(pb.DevicePageResult(found=True, lease=_lease_msg(lease),
                                               tier=res.tier, precision=int(res.precision)))
        except BaseException:
            table.release(request.session, granted)
            raise
        return pb.GetDeviceReply(pages=out)

    def ReserveDevice(self, request: pb.ReserveDeviceRequest,
                      context: grpc.ServicerContext) -> pb.ReserveDeviceReply:
        table = self._session(request.namespace, request.session)
        if request.release:
            table.release(request.session, list(request.release))
        if len(request.pages) > self._settings.max_batch:
            raise InvalidArgument(f"at most {self._settings.max_batch} pages a call",
                                  field="pages")
        granted: list[Lease] = []
        try:
            for spec in request.pages:
                dtype = torch_dtype(spec.dtype)
                shape = tuple(int(d) for d in spec.shape)
                if len(shape) != 4 or any(d <= 0 for d in shape):
                    raise InvalidArgument(f"shape must be 4 positive sizes, got {list(shape)}",
                                          field="shape")
                shape4 = (shape[0], shape[1], shape[2], shape[3])
                nbytes = DevicePool.block_bytes(dtype, shape4)
                if nbytes > 2 * self._settings.max_page_bytes:
                    raise InvalidArgument(f"page of {list(shape)} {spec.dtype} is above the "
                                          f"maximum page size", field="shape")
                if spec.start_position < 0:
                    raise InvalidArgument("start_position must be >= 0", field="start_position")
                lease = table.reserve(request.session, dtype, shape4, spec.start_position)
                if lease is None and self._store.make_device_room(nbytes):
                    lease = table.reserve(request.session, dtype, shape4, spec.start_position)
                if lease is None:
                    raise CapacityExhausted("no room in the device pool for the page",
                                            field="pages")
                granted.append(lease)
        except BaseException:
            table.release(request.session, [g.lease_id for g in granted])
            raise
        return pb.ReserveDeviceReply(leases=[_lease_msg(g) for g in granted])

    def CommitDevice(self, request: pb.CommitDeviceRequest,
                     context: grpc.ServicerContext) -> pb.CommitDeviceReply:
        table = self._session(request.namespace, request.session)
        s = self._settings
        pids = check_keys(request.namespace, list(request.keys), s.max_key_bytes, s.max_batch)
        if len(request.leases) != len(pids) or len(set(pids)) != len(pids):
            raise InvalidArgument("one write lease per key, keys distinct", field="leases")
        chains = list(request.chain_positions) or list(range(len(pids)))
        if len(chains) != len(pids) or any(c < 0 for c in chains):
            raise InvalidArgument("one chain position >= 0 per key", field="chain_positions")
        pages = []
        for lid in request.leases:  # a lease that fails here leaves the others' blocks free
            page = table.commit(request.session, lid)
            pages.append(make_page(page.k, page.v, page.start_position,
                                   max_page_bytes=s.max_page_bytes))
        outcomes = self._store.put_checked(pids, pages, chains, owned=True)
        return pb.CommitDeviceReply(stored=[o is PutOutcome.STORED for o in outcomes])

    def ReleaseDevice(self, request: pb.ReleaseDeviceRequest,
                      context: grpc.ServicerContext) -> pb.ReleaseDeviceReply:
        table = self._session(request.namespace, request.session)
        return pb.ReleaseDeviceReply(released=table.release(request.session,
                                                            list(request.leases)))
