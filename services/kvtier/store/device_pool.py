"""The hot tier's device memory: one preallocated buffer, pages are views into it.

A daemon on a GPU shares the device with an inference engine, so the hot tier takes its
memory once, at start, as one ``uint8`` tensor of ``device_pool_bytes`` (by default the hot
tier's capacity), and never more: no allocation per page, no growth of the caching allocator
while the engine runs. Pages live in blocks of that buffer (K and V of a page in one block).

:class:`BlockAllocator` is the bookkeeping, pure Python over byte offsets (testable without
a device): best fit among free extents kept by size, neighbours merged on free, offsets and
sizes aligned to :data:`ALIGN` bytes. ``alloc`` answers ``None`` when no free extent is large
enough ("no room" is not an error: the caller makes room and retries).

:class:`DevicePool` hands out pages whose tensors view a block. A block goes back to the
allocator when the last of the page's two tensors is garbage (a finalizer on a holder both
tensors carry), not when the tier lets go of the page: a reader that took the page's
reference under the store's lock (a get copying it out, a move encoding it) keeps its bytes
until it is done, so no page is ever overwritten under a reader. Every user of a page's memory
finishes its device work before it drops the reference (the transfers synchronize their
stream), so a freed block has no work pending on it. A view derived from a page's tensor
(``k.view(...)``) does not keep the block: hold the page while such a view is in use.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from dataclasses import dataclass

import torch

ALIGN = 256  # the CUDA allocator's alignment: every page's K starts on it


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True, slots=True)
class PoolStats:
    capacity_bytes: int
    used_bytes: int
    blocks: int
    free_extents: int
    largest_free_bytes: int


class BlockAllocator:
    """Best-fit allocation of aligned byte ranges in ``[0, capacity)``. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        self._lock = threading.Lock()
        self._free_at: dict[int, int] = {}  # start -> size of each free extent
        self._free_end: dict[int, int] = {}  # end -> start
        self._by_size: list[tuple[int, int]] = []  # (size, start), sorted
        self._used: dict[int, int] = {}  # start -> size of each allocated block
        if self.capacity:
            self._add_free(0, self.capacity)

    def _add_free(self, start: int, size: int) -> None:
        self._free_at[start] = size
        self._free_end[start + size] = start
        bisect.insort(self._by_size, (size, start))

    def _remove_free(self, start: int) -> int:
        size = self._free_at.pop(start)
        del self._free_end[start + size]
        i = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[i]
        return size

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a new block of at least ``nbytes`` (aligned), or None: no free
        extent is that large."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be > 0, got {nbytes}")
        size = _aligned(nbytes)
        with self._lock:
            i = bisect.bisect_left(self._by_size, (size, -1))
            if i == len(self._by_size):
                return None
            have, start = self._by_size[i]
            self._remove_free(start)
            if have > size:
                self._add_free(start + size, have - size)
            self._used[start] = size
            return start

    def free(self, start: int) -> None:
        """Give a block back, merging it with free neighbours. Freeing an offset that is not
        an allocated block raises ValueError (a double free is a bug, never ignored)."""
        with self._lock:
            size = self._used.pop(start, None)
            if size is None:
                raise ValueError(f"offset {start} is not an allocated block")
            end = start + size
            if end in self._free_at:
                size += self._remove_free(end)
            prev = self._free_end.get(start)
            if prev is not None:
                size += self._remove_free(prev)
                start = prev
            self._add_free(start, size)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self.capacity, sum(self._used.values()), len(self._used),
                             len(self._by_size),
                             self._by_size[-1][0] if self._by_size else 0)


class _Block:
    """A block's claim on the pool; both tensors of a page hold it, and when the last of
    them is collected the finalizer gives the block back."""

    __slots__ = ("__weakref__", "start")

    def __init__(self, start: int) -> None:
        self.start = start


class DevicePool:
    """One preallocated buffer of ``nbytes`` on ``device``; pages are views into it."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.allocator = BlockAllocator(nbytes)
        self._buf = torch.empty(self.allocator.capacity, dtype=torch.uint8, device=device)
        # as tensors name it: "cuda:0", never "cuda" (torch.device("cuda") != "cuda:0")
        self.device = self._buf.device
        self._lo = self._buf.data_ptr()
        self._hi = self._lo + self.allocator.capacity

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity

    @staticmethod
    def block_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Bytes of the block a page of ``shape`` takes (K and V, each aligned)."""
        return 2 * _aligned(_nbytes(dtype, shape))

    def new_kv(self, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                           torch.Tensor] | None:
        """Uninitialised K and V tensors of ``shape`` in one block of the pool, or None when
        no free extent is large enough."""
        n = _nbytes(dtype, shape)
        half = _aligned(n)
        start = self.allocator.alloc(2 * half)
        if start is None:
            return None
        block = _Block(start)
        weakref.finalize(block, self.allocator.free, start)
        k = self._buf[start:start + n].view(dtype).view(shape)
        v = self._buf[start + half:start + half + n].view(dtype).view(shape)
        k._kvtier_block = block  # type: ignore[attr-defined]  # noqa: SLF001
        v._kvtier_block = block  # type: ignore[attr-defined]  # noqa: SLF001
        return k, v

    def offset_of(self, t: torch.Tensor) -> int:
        """Byte offset of ``t``'s first element from the pool's start (``t`` in the pool)."""
        if not self.holds(t):
            raise ValueError("tensor is not in the pool")
        return t.data_ptr() - self._lo

    @property
    def buffer(self) -> torch.Tensor:
        """The pool's whole buffer (uint8): what a CUDA IPC handle exports."""
        return self._buf

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s memory lies in this pool."""
        return t.device == self.device and self._lo <= t.data_ptr() < self._hi

    def stats(self) -> PoolStats:
        return self.allocator.stats()
