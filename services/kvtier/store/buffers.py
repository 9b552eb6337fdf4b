"""Host buffers for incoming pages, reused rather than handed back to the kernel.

A put's pages are copied into memory the daemon owns (``kvtier.transport.shm.copy``,
``kvtier.transport.cache.convert.build_page``), and the hot tier adopts that memory as the page.
Fresh memory costs a page fault per 4 KiB page the first time it is written, and memory glibc
got back from a page that died, typically in another thread than the next put's (the mover, a
delete), is often handed back to the kernel or not reused by that thread, even with the daemon's
``mallopt`` settings (``kvtier.daemon.configure_allocator``). Measured on the 2-core development
machine: allocating and filling a 2 MiB buffer in a thread took 270-330 us (95 faults on
average), against 61-76 us for the same copy into a buffer written before; a daemon under
``bench transfer`` counted 0-64 faults per 2 MiB put in steady state and 500-1000 in its first
rounds. Redis keeps its freed memory (jemalloc), so it hardly pays this on SET.

:class:`BufferPool` keeps the buffers of pages that died, by exact size, up to a byte bound, and
hands them out again. A buffer goes back when the last view of it is gone: :meth:`BufferPool.take`
returns ``torch.from_numpy`` of a fresh ndarray view of the buffer. torch keeps that ndarray
alive as long as any tensor shares the storage (the page's k and v are such views, and so is
``tensor.numpy()`` of them), and a finalizer on the ndarray returns the buffer.

A cache that grows has no dead pages to reuse: every page kept needs fresh memory, and on the
development VM touching fresh memory runs at 1.2-1.3 GiB/s (about 1.6 ms per 2 MiB, huge
pages or not), in the put's own copy. With ``reserve_bytes``, while the cache grows (a take
found no buffer of its size, and none came back since, nor in the 0.25 s before), a
background thread keeps that many bytes of buffers of the size missed last faulted in ahead
of use, so the faults happen beside the puts rather than in them: 256 puts of distinct 2 MiB
pages went from 0.59-0.72 to 0.76-1.17 GB/s with a 32 MiB reserve. It stops as soon as a
buffer comes back, so a cache whose pages die as fast as they come (or in batches, as the
mover demotes) reuses those and faults nothing in for nothing. The reserve counts against
``max_free_bytes``, and is at most half of it, so buffers coming back find room beside it.
"""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import torch

_OS_PAGE = 4096
_QUIET_S = 0.25  # a miss means "growing" only this long after the last buffer came back


class BufferPool:
    """Page buffers (uint8, one per page: k's bytes then v's) kept for reuse.

    At most ``max_free_bytes`` are kept unused; 0 turns the pool off. A miss while the pool is
    full frees one kept buffer of another size, so a pool filled with a size that went out of
    use drains as the new size is asked for. Thread-safe; the return path is a finalizer, which
    may run in any thread at any allocation, so it never waits for the lock: when the lock is
    taken it lets the buffer go instead of keeping it.
    """

    def __init__(self, max_free_bytes: int = 64 << 20, reserve_bytes: int = 0) -> None:
        if max_free_bytes < 0:
            raise ValueError(f"max_free_bytes must be >= 0, got {max_free_bytes}")
        if not 0 <= reserve_bytes <= max_free_bytes // 2:  # room for returns beside it
            raise ValueError(f"reserve_bytes must be within 0..{max_free_bytes // 2} (half "
                             f"the pool), got {reserve_bytes}")
        self.max_free_bytes = max_free_bytes
        self.reserve_bytes = reserve_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self.hits = 0
        self.misses = 0
        self.prefaulted_bytes = 0  # made ahead of use by the reserve thread
        # The reserve: while the cache grows (a miss, and no buffer came back lately), keep
        # reserve_bytes of buffers of the size missed last faulted in. The thread holds only
        # a weak reference to the pool, so a pool nobody closed still goes, and its thread.
        self._wanted = 0
        self._growing = False
        self._back_at = -_QUIET_S  # when a buffer last came back (time.monotonic)
        self._closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        weakref.finalize(self, self._wake.set)

    @property
    def free_bytes(self) -> int:
        """Bytes of buffers kept and not in use."""
        return self._free_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes`` (contents undefined) that returns to the pool when it
        and every view of its storage are gone."""
        base = None
        if not 0 < nbytes <= self.max_free_bytes:  # never kept: not pooled
            with self._lock:
                self.misses += 1
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            stack = self._free.get(nbytes)
            if stack:
                base = stack.pop()
                self._free_bytes -= nbytes
                self.hits += 1
            else:
                self.misses += 1
                if self._free_bytes + nbytes > self.max_free_bytes:
                    self._drop_other(nbytes)
                if self.reserve_bytes and time.monotonic() - self._back_at > _QUIET_S:
                    self._growing, self._wanted = True, nbytes
            if self._growing and not self._closed:
                self._refill()
        if base is None:
            base = np.empty(nbytes, np.uint8)
        arr = base.view()  # a new array object whose lifetime tracks every view made from it
        weakref.finalize(arr, self._give, base)
        return torch.from_numpy(arr)

    def close(self) -> None:
        """End the reserve thread; buffers already kept stay usable."""
        self._closed = True
        self._wake.set()

    def _refill(self) -> None:
        """Under the lock: have the reserve thread top the reserve up (started on first need)."""
        if self._thread is None:
            thread = threading.Thread(target=_keep_reserve, args=(weakref.ref(self), self._wake),
                                      name="kvtier-buffer-reserve", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # no thread to be had: puts fault their own memory in
                self.reserve_bytes, self._growing = 0, False
                return
            self._thread = thread
        self._wake.set()

    def _reserve_one(self) -> bool:
        """Fault one buffer of the wanted size in and keep it, if the reserve wants one; False
        when it is full, the cache stopped growing or the pool is closed."""
        with self._lock:
            n = self._wanted
            have = len(self._free.get(n, ())) * n
            if self._closed or not self._growing or have + n > self.reserve_bytes:
                return False
        base = np.empty(n, np.uint8)
        base[::_OS_PAGE] = 0  # one write per page faults it in
        with self._lock:
            if self._free_bytes + n > self.max_free_bytes:
                self._drop_other(n)
            if self._free_bytes + n > self.max_free_bytes or not self._growing:
                return False
            self._free.setdefault(n, []).append(base)
            self._free_bytes += n
            self.prefaulted_bytes += n
        return True

    def _drop_other(self, nbytes: int) -> None:
        """Under the lock: let go one kept buffer of the size holding the most bytes."""
        sizes = [n for n, stack in self._free.items() if stack and n != nbytes]
        if not sizes:
            return
        size = max(sizes, key=lambda n: n * len(self._free[n]))
        self._free[size].pop()
        self._free_bytes -= size
        if not self._free[size]:
            del self._free[size]

    def _give(self, base: np.ndarray) -> None:
        self._back_at = time.monotonic()  # buffers come back: the cache is not (only) growing
        self._growing = False
        if not self._lock.acquire(blocking=False):
            return  # see the class docs: a finalizer never waits
        try:
            n = base.size
            if self._free_bytes + n <= self.max_free_bytes:
                self._free.setdefault(n, []).append(base)
                self._free_bytes += n
        finally:
            self._lock.release()


def _keep_reserve(ref: weakref.ReferenceType[BufferPool], wake: threading.Event) -> None:
    """The reserve thread: tops the reserve up whenever woken, until its pool is closed or
    gone. A buffer it cannot allocate (MemoryError) ends the top-up until the next miss."""
    while True:
        wake.wait()
        wake.clear()
        pool = ref()
        if pool is None or pool._closed:
            return
        try:
            while pool._reserve_one():
                pass
        except MemoryError:
            pool._growing = False
        del pool
