"""CUDA IPC for a worker on the daemon's GPU host: hot pages copied device to device.

::

    from kvtier_client.device import DeviceSession
    with DeviceSession("127.0.0.1:50051", namespace="tenant-a") as dev:
        pages = dev.get(keys)       # DevicePage (torch tensors on the GPU) or None per key
        stored = dev.put(keys, [(k, v, start_position), ...])   # k, v CUDA tensors

The session maps the daemon's device pool once (a CUDA IPC handle, see ``device.proto``);
each ``get`` then leases the pages and copies them out of the pool on the current CUDA stream
in one round trip: the leases go back with the session's next call (or ``release()``), once
the copies are done; each ``put`` leases fresh blocks, copies the
pages in, waits, and commits them (the daemon keeps the blocks as the pages: no copy on its
side). A page that is not in the daemon's device tier is None here: get it with
:class:`~kvtier_client.KVTierClient`, which serves every tier. Copies finish before a lease is
let go (the session waits for a CUDA event recorded after them), so the daemon never reuses a
block under a copy; a session holding leases of a get it never follows up with releases
them when it closes, or the daemon when they expire.

torch is imported when a session is made, not when ``kvtier_client`` is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from kvtier_client.credentials import with_token
from kvtier_client.errors import FailedPreconditionError, from_rpc_error
from kvtier_proto.v1 import device_pb2 as pb
from kvtier_proto.v1 import device_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

_DTYPE_NAMES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class DevicePage:
    """A page copied out of the daemon's device pool: ``k``/``v`` CUDA tensors of the worker's
    own. ``precision``: 16 = as put, 8/4 = the lowest quantization it passed through."""

    k: Any
    v: Any
    start_position: int
    tier: str
    precision: int


def _local_device(uuid: str) -> torch.device:
    """The worker's CUDA device with this UUID (device numbering differs between processes)."""
    import torch

    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return torch.device("cuda", i)
    raise FailedPreconditionError(
        f"the daemon's GPU {uuid or '(none: its device tier is in host memory)'} is not "
        f"visible here: CUDA IPC needs the same GPU", method="AttachDevice")


def open_pool(handle: pb.CudaIpcHandle, device: torch.device) -> torch.Tensor:
    """The daemon's device pool mapped into this process: a uint8 tensor over its memory."""
    import torch

    torch.cuda._lazy_init()  # type: ignore[no-untyped-call]  # noqa: SLF001
    storage = torch.UntypedStorage._new_shared_cuda(  # noqa: SLF001
        device.index, handle.handle, handle.size_bytes, handle.offset_bytes,
        handle.ref_counter_handle, handle.ref_counter_offset, handle.event_handle or None,
        handle.event_sync_required)
    typed = torch.storage.TypedStorage(  # type: ignore[no-untyped-call]
        wrap_storage=storage, dtype=torch.uint8, _internal=True)
    rebuild = torch._utils._rebuild_tensor  # noqa: SLF001  (as torch.multiprocessing does)
    pool: torch.Tensor = rebuild(  # type: ignore[no-untyped-call]
        typed, 0, (handle.size_bytes,), (1,))
    return pool


class DeviceSession:
    """One CUDA IPC session with a daemon on this GPU host (see the module docstring)."""

    def __init__(self, target: str | None, namespace: str = "default", *,
                 channel: grpc.Channel | None = None, timeout_s: float = 30.0,
                 token: str | None = None) -> None:
        import torch

        if channel is None and target is None:
            raise ValueError("give a target address or a channel")
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        self._channel = channel or grpc.insecure_channel(str(target))
        self._stub = with_token(pb_grpc.DeviceServiceStub(self._channel), token)
        self._attach = self._stub.AttachDevice(pb.AttachDeviceRequest(namespace=namespace),
                                               timeout=None)
        try:
            reply: pb.AttachDeviceReply = next(self._attach)
        except grpc.RpcError as e:
            self.close()
            raise from_rpc_error(e, "AttachDevice") from None
        self.session = reply.session
        self.lease_ttl_s = reply.lease_ttl_s
        self.max_lease_bytes = reply.max_lease_bytes
        self.device = _local_device(reply.device_uuid)
        self._pool = open_pool(reply.pool, self.device)
        self._torch = torch
        self._held: list[int] = []  # the last get's read leases, released with the next call
        self._copied: Any = None  # a CUDA event: that get's copies are done

    def __enter__(self) -> DeviceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the session (the daemon ends its leases) and close an owned channel."""
        self._attach.cancel()
        if self._owns_channel:
            self._channel.close()

    def _rpc(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise from_rpc_error(e, method) from None

    def _view(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        n = torch_elem(dtype) * math.prod(shape)
        return self._pool[offset:offset + n].view(dtype).view(tuple(shape))

    def get(self, keys: Sequence[bytes]) -> list[DevicePage | None]:
        """The pages of ``keys`` in the daemon's device tier, copied into new tensors on this
        GPU (None for a miss or a page in another tier).

        One round trip: the copies are queued on the current CUDA stream and not waited for
        (use the tensors on that stream, or synchronize, as after any torch operation); their
        leases go back with the next call of this session (or :meth:`release`), once the copies
        are done. The pages of one get share one allocation."""
        torch = self._torch
        reply: pb.GetDeviceReply = self._rpc("GetDevice", pb.GetDeviceRequest(
            namespace=self.namespace, session=self.session, keys=list(keys),
            release=self._releasable()))
        leases = [r.lease.lease for r in reply.pages if r.found]
        try:
            out = self._copy_out(reply.pages)
        except BaseException:
            self._rpc("ReleaseDevice", pb.ReleaseDeviceRequest(
                namespace=self.namespace, session=self.session, leases=leases))
            raise
        if leases:
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            self._held, self._copied = leases, copied
        return out

    def _copy_out(self, results: Sequence[pb.DevicePageResult]) -> list[DevicePage | None]:
        """New tensors holding the leased pages, in one allocation, filled by one batched
        copy (``torch._foreach_copy_``: a launch or two, not two per page)."""
        th = self._torch
        spans: list[tuple[int, int, torch.dtype, tuple[int, ...]]] = []
        total = 0
        for r in results:
            if not r.found:
                continue
            dtype = getattr(th, r.lease.dtype)
            n = torch_elem(dtype) * math.prod(r.lease.shape)
            spans.append((total, n, dtype, tuple(r.lease.shape)))
            total += 2 * _aligned(n)
        buf = th.empty(total, dtype=th.uint8, device=self.device)
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        out: list[DevicePage | None] = []
        it = iter(spans)
        for r in results:
            if not r.found:
                out.append(None)
                continue
            at, n, dtype, shape = next(it)
            k, v = buf[at:at + n], buf[at + _aligned(n):at + _aligned(n) + n]
            dsts += (k, v)
            srcs += (self._pool[r.lease.k_offset:r.lease.k_offset + n],
                     self._pool[r.lease.v_offset:r.lease.v_offset + n])
            out.append(DevicePage(k.view(dtype).view(shape), v.view(dtype).view(shape),
                                  r.lease.start_position, r.tier, r.precision))
        batched = getattr(th, "_foreach_copy_", None)
        if dsts and batched is not None:
            batched(dsts, srcs)
        else:  # a torch without it: a copy a tensor
            for d, s in zip(dsts, srcs, strict=True):
                d.copy_(s)
        return out

    def _releasable(self) -> list[int]:
        """The last get's leases, handed over for release once its copies are done (waited
        for here: by the next call they normally are)."""
        held, copied = self._held, self._copied
        self._held, self._copied = [], None
        if held and copied is not None:
            copied.synchronize()
        return held

    def release(self) -> int:
        """Release the last get's leases now instead of with the next call; how many the
        daemon still held."""
        held = self._releasable()
        if not held:
            return 0
        reply: pb.ReleaseDeviceReply = self._rpc("ReleaseDevice", pb.ReleaseDeviceRequest(
            namespace=self.namespace, session=self.session, leases=held))
        return int(reply.released)

    def put(self, keys: Sequence[bytes], pages: Sequence[tuple[Any, Any, int]],
            chain_positions: Sequence[int] | None = None) -> list[bool]:
        """Store pages (``(k, v, start_position)``, CUDA tensors on the daemon's GPU, or any
        tensor torch can copy there) copied device to device into the daemon's pool; per key
        True if stored, False if the key existed."""
        torch = self._torch
        if len(keys) != len(pages):
            raise ValueError(f"{len(keys)} keys for {len(pages)} pages")
        specs = []
        for k, v, start in pages:
            name = str(k.dtype).removeprefix("torch.")
            if name not in _DTYPE_NAMES or k.shape != v.shape or k.dtype != v.dtype:
                raise ValueError("k and v must share a shape and a float16, bfloat16 or "
                                 "float32 dtype")
            specs.append(pb.DevicePageSpec(dtype=name, shape=list(k.shape),
                                           start_position=int(start)))
        reserved: pb.ReserveDeviceReply = self._rpc("ReserveDevice", pb.ReserveDeviceRequest(
            namespace=self.namespace, session=self.session, pages=specs,
            release=self._releasable()))
        leases = [lease.lease for lease in reserved.leases]
        committed = False
        try:
            for lease, (k, v, _) in zip(reserved.leases, pages, strict=True):
                self._view(lease.k_offset, k.dtype, lease.shape).copy_(k)
                self._view(lease.v_offset, v.dtype, lease.shape).copy_(v)
            torch.cuda.current_stream(self.device).synchronize()  # written before committed
            reply: pb.CommitDeviceReply = self._rpc("CommitDevice", pb.CommitDeviceRequest(
                namespace=self.namespace, session=self.session, keys=list(keys), leases=leases,
                chain_positions=list(chain_positions or ())))
            committed = True
        finally:
            if not committed and leases:
                self._rpc("ReleaseDevice", pb.ReleaseDeviceRequest(
                    namespace=self.namespace, session=self.session, leases=leases))
        return list(reply.stored)


def _aligned(n: int) -> int:
    """``n`` bytes rounded up to 256 (where each tensor of a get's allocation starts)."""
    return (n + 255) & ~255


def torch_elem(dtype: torch.dtype) -> int:
    """Bytes of one element of ``dtype``."""
    return int(dtype.itemsize)
