"""Moving pages into and out of the pooled hot tier: compressed on the device, staged through
pinned host buffers, on a CUDA stream of their own.

Out of the device (a demotion to a host tier): the page is encoded where it lies
(:func:`kvtier.codecs.device.encode_on_device`, the Triton kernels) and only the blob's
payload crosses to the host, into a pinned buffer, then sealed there: 0.52x the bytes of the
fp16 page at int8, 0.28x at int4a, where copying the page out first would move all of it. Into
the device (a promotion, or a put): the blob's payload goes up and is decoded there, straight
into the page's block of the :class:`~kvtier.store.device_pool.DevicePool`; a page is copied
into its block.

Each transfer queues its work on the transfer stream (after whatever the page's producer
queued on the current stream), records an event and waits for that event only: other streams
(the engine's compute) are never synchronized, and the page is whole on the host or in the
pool when the call returns. On a CPU "device" (a pool in host memory, as the tests use) the
same calls run without streams, through the CPU codecs.

When the pool has no free extent large enough for a new page (room by the tier's byte count
is not enough: the pool can be fragmented, or a reader may still hold a block), the transfer
calls its ``room`` hook, :func:`kvtier.store.transfer.make_pool_room`, which pushes the tier's
lowest-scored pages down one at a time until the page fits, within the engine's room timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.codecs import decode as decode_blob
from kvtier.codecs.codec import device_self_test
from kvtier.codecs import device as accel
from kvtier.codecs.blob import HEADER_SIZE, read_header, verify
from kvtier.codecs.layout import layout_of
from kvtier.config import CodecConfig
from kvtier.errors import CapacityExhausted, CorruptPage
from kvtier.pages import torch_dtype
from kvtier.store.device_pool import DevicePool
from kvtier.store.stats import CodecClock
from kvtier.store.tiers import Promoted, Stored, TierSpec
from kvtier.types import Codec, Medium, Page, Precision

MiB = 1 << 20
STAGING_KEEP_BYTES = 64 * MiB  # pinned buffers kept for reuse, at most


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What the transfers moved between the device and the host, in bytes and pages."""

    d2h_bytes: int
    d2h_pages: int
    h2d_bytes: int
    h2d_pages: int
    pool_capacity_bytes: int
    pool_used_bytes: int
    pool_blocks: int

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Staging:
    """Pinned host buffers for the device <-> host copies, reused (at most ``keep_bytes``
    kept); plain host memory on a machine without CUDA."""

    def __init__(self, pinned: bool, keep_bytes: int = STAGING_KEEP_BYTES) -> None:
        self._pinned = pinned
        self._keep = keep_bytes
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._kept = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer of at least ``nbytes`` (a power of two, 64 KiB at least)."""
        size = max(64 << 10, 1 << max(0, nbytes - 1).bit_length())
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() == size:
                    self._kept -= size
                    return self._free.pop(i)
        return torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned)

    def give(self, buf: torch.Tensor) -> None:
        """Hand a buffer back once no copy into or out of it is pending."""
        with self._lock:
            if self._kept + buf.numel() <= self._keep:
                self._free.append(buf)
                self._kept += buf.numel()


class DeviceTransfer:
    """The moves into and out of the pooled tensor tier ``tier`` (see the module
    docstring)."""

    def __init__(self, tier: int, pool: DevicePool, params: CodecConfig,
                 clock: CodecClock) -> None:
        self.tier = tier
        self.pool = pool
        self.device = pool.device
        self.params = params
        self.clock = clock
        self.cuda = self.device.type == "cuda"
        self.stream: torch.cuda.Stream | None = None
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.staging = Staging(pinned=self.cuda)
        self.room: Callable[[int], bool] | None = None  # make room for n bytes (TierStore sets it)
        self._lock = threading.Lock()
        self._d2h = [0, 0]
        self._h2d = [0, 0]

    @classmethod
    def for_tiers(cls, specs: list[TierSpec], capacities: list[int], pool_bytes: int | None,
                  params: CodecConfig, clock: CodecClock) -> DeviceTransfer | None:
        """The transfers of the device tier (the first tensor tier on the ``device`` medium),
        with its pool of ``pool_bytes`` (None: the tier's capacity on CUDA, and no pool on a
        CPU device); None when there is no such tier or no pool."""
        found = [(i, s) for i, s in enumerate(specs)
                 if s.medium is Medium.DEVICE and s.device is not None]
        if not found:
            return None
        tier, spec = found[0]
        assert spec.device is not None
        if pool_bytes is None:
            pool_bytes = capacities[tier] if spec.device.type == "cuda" else 0
        if pool_bytes == 0:
            return None
        return cls(tier, DevicePool(pool_bytes, spec.device), params, clock)

    def warmup(self) -> None:
        """Compile and self-test the device kernels now (a CUDA pool), not in a request."""
        if self.cuda:
            device_self_test(self.device)

    # -- the converter's hook -------------------------------------------------------------

    def to_tier(self, data: Stored, spec: TierSpec) -> tuple[Stored, Precision] | None:
        """``data`` in ``spec``'s stored form when the move touches the pool (into the pooled
        tier, or a device page out to the host); None leaves it to the converter."""
        if spec.index == self.tier:
            if isinstance(data, Page):
                return self.admit(data), Precision.FULL
            if isinstance(data, Promoted):
                prec = Precision.of_codec(read_header(data.blob).codec)
                return Promoted(self.admit(data.page), data.blob), prec
            page, prec = self.from_blob(data)
            return (page if prec is Precision.FULL else Promoted(page, data)), prec
        if not (isinstance(data, Page) and self.cuda and data.k.device == self.device):
            return None  # a Promoted page keeps its blob: nothing crosses to the host
        if spec.device is not None:  # a host tensor tier: the page as it is
            return self.to_host_page(data), Precision.FULL
        if spec.codec is Codec.NONE:
            return None
        return self.to_blob(data, spec.codec), Precision.of_codec(spec.codec)

    # -- into the pool --------------------------------------------------------------------

    def new_kv(self, dtype: torch.dtype,
               shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V in a new block of the pool, making room when there is none;
        CapacityExhausted when room cannot be made."""
        kv = self.pool.new_kv(dtype, shape)
        if kv is None and self.room is not None:
            if self.room(self.pool.block_bytes(dtype, shape)):
                kv = self.pool.new_kv(dtype, shape)
        if kv is None:
            st = self.pool.stats()
            raise CapacityExhausted(
                f"no room in the device pool for a page of {list(shape)} {dtype} (pool "
                f"{st.capacity_bytes} bytes, {st.used_bytes} in use, largest free extent "
                f"{st.largest_free_bytes})", field="page")
        return kv

    def admit(self, page: Page) -> Page:
        """A copy of ``page`` in the pool (never an alias of the caller's tensors)."""
        if self.pool.holds(page.k) and self.pool.holds(page.v):
            return page  # already a pool page (pages are never written after their put)
        k, v = self.new_kv(page.k.dtype, tuple(page.k.shape))
        from_host = page.k.device.type == "cpu" and self.cuda
        with self._on_stream():
            k.copy_(page.k, non_blocking=from_host and page.k.is_pinned())
            v.copy_(page.v, non_blocking=from_host and page.v.is_pinned())
            self._wait()
        if from_host:
            self._count(self._h2d, page.nbytes)
        return Page(k=k, v=v, start_position=page.start_position)

    def from_blob(self, blob: bytes) -> tuple[Page, Precision]:
        """Decode a blob into a new pool page: its payload goes up, is decoded on the device.
        CorruptPage on a blob that does not verify (nothing is decoded then)."""
        t0 = time.perf_counter()
        h = verify(blob)
        lay = layout_of(h)
        if lay.payload_nbytes != h.payload_nbytes:
            raise CorruptPage(f"payload is {h.payload_nbytes} bytes, the header's geometry "
                              f"needs {lay.payload_nbytes}", field="blob.length")
        prec = Precision.of_codec(h.codec)
        k, v = self.new_kv(torch_dtype(h.dtype), h.shape)
        if not self.cuda:
            page = decode_blob(blob).page  # the CPU kernels
            k.copy_(page.k)
            v.copy_(page.v)
        else:
            accel.check_payload(blob, lay)
            n = lay.payload_nbytes
            host = self.staging.take(n)
            host[:n].numpy()[:] = np.frombuffer(blob, dtype=np.uint8, offset=HEADER_SIZE)
            try:
                with self._on_stream():
                    payload = host[:n].to(self.device, non_blocking=True)
                    accel.decode_payload(payload, lay, k, v)
                    self._wait()
            finally:
                self.staging.give(host)
            self._count(self._h2d, n + HEADER_SIZE)
        self.clock.add("decode", h.codec.value, time.perf_counter() - t0)
        return Page(k=k, v=v, start_position=h.start_position), prec

    # -- out of the device ----------------------------------------------------------------

    def to_blob(self, page: Page, codec: Codec) -> bytes:
        """The blob of a device page, encoded on the device; only its payload is copied."""
        t0 = time.perf_counter()
        with self._on_stream():
            dblob = accel.encode_on_device(page, codec, self.params)
            n = dblob.payload_nbytes
            host = self.staging.take(n)
            host[:n].copy_(dblob.payload, non_blocking=True)
            self._wait()
        try:
            blob = accel.seal(dblob, host[:n].numpy().data)
        finally:
            self.staging.give(host)
        self._count(self._d2h, n + HEADER_SIZE)
        self.clock.add("encode", codec.value, time.perf_counter() - t0)
        return blob

    def to_host_page(self, page: Page) -> Page:
        """A host copy of a device page (for a host tensor tier)."""
        with self._on_stream():
            k = page.k.to("cpu", copy=True)
            v = page.v.to("cpu", copy=True)
            self._wait()
        self._count(self._d2h, page.nbytes)
        return Page(k=k, v=v, start_position=page.start_position)

    # -- plumbing -------------------------------------------------------------------------

    def _on_stream(self) -> torch.cuda.StreamContext:
        """The transfer stream as the current one, after what the current stream queued."""
        if self.stream is None:
            return torch.cuda.stream(None)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.stream)

    def _wait(self) -> None:
        """Wait for what this thread queued on the transfer stream (and only that)."""
        if self.stream is not None:
            ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ev.record(self.stream)
            ev.synchronize()

    def _count(self, pair: list[int], nbytes: int) -> None:
        with self._lock:
            pair[0] += nbytes
            pair[1] += 1

    def stats(self) -> TransferStats:
        st = self.pool.stats()
        with self._lock:
            return TransferStats(self._d2h[0], self._d2h[1], self._h2d[0], self._h2d[1],
                                 st.capacity_bytes, st.used_bytes, st.blocks)
