"""The page buffer pool: reuse only after every view is gone, bounds, and a finalizer that
never waits."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from kvtier.store.buffers import BufferPool

N = 1 << 16


def _page_views(buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v the way the daemon makes them (kvtier.pages.page_of_buffer)."""
    k, v = buf.view(torch.float16).view(2, -1).unbind(0)
    return k, v


def test_a_buffer_comes_back_only_when_its_last_view_is_gone() -> None:
    pool = BufferPool(4 * N)
    buf = pool.take(N)
    ptr = buf.data_ptr()
    k, v = _page_views(buf)
    as_numpy = k.numpy()  # numpy views of the page count too
    del buf, k, v
    gc.collect()
    assert pool.free_bytes == 0
    other = pool.take(N)  # the first buffer is still in use: new memory
    assert other.data_ptr() != ptr
    del as_numpy
    gc.collect()
    assert pool.free_bytes == N
    again = pool.take(N)
    assert again.data_ptr() == ptr
    assert (pool.hits, pool.misses) == (1, 2)


def test_kept_bytes_stay_within_the_bound() -> None:
    pool = BufferPool(3 * N)
    bufs = [pool.take(N) for _ in range(5)]
    del bufs
    gc.collect()
    assert pool.free_bytes == 3 * N
    again = [pool.take(N) for _ in range(4)]
    assert (pool.hits, pool.misses, pool.free_bytes) == (3, 6, 0)
    assert len({b.data_ptr() for b in again}) == 4


def test_a_pool_of_zero_bytes_keeps_nothing() -> None:
    pool = BufferPool(0)
    buf = pool.take(N)
    assert buf.numel() == N and buf.dtype == torch.uint8
    del buf
    gc.collect()
    again = pool.take(N)
    assert (pool.free_bytes, pool.hits, pool.misses) == (0, 0, 2)
    del again
    assert pool.take(0).numel() == 0 and BufferPool(N).take(0).numel() == 0
    with pytest.raises(ValueError, match="max_free_bytes"):
        BufferPool(-1)


def test_misses_of_a_new_size_drain_an_old_size() -> None:
    pool = BufferPool(4 * N)
    old = [pool.take(N) for _ in range(4)]
    del old
    gc.collect()
    assert pool.free_bytes == 4 * N
    new = [pool.take(2 * N) for _ in range(2)]  # each miss lets one old buffer go
    assert pool.free_bytes == 2 * N
    del new
    gc.collect()
    assert pool.free_bytes == 4 * N
    assert pool.take(2 * N) is not None and pool.hits == 1


def test_a_finalizer_that_finds_the_lock_taken_lets_the_buffer_go() -> None:
    pool = BufferPool(4 * N)
    buf = pool.take(N)
    with pool._lock:  # as if the cyclic GC ran the finalizer inside take()
        del buf
        gc.collect()
    assert pool.free_bytes == 0


def test_threads_never_hold_the_same_memory() -> None:
    pool = BufferPool(8 * N)
    errors: list[str] = []

    def work(tag: int) -> None:
        for i in range(300):
            buf = pool.take(N)
            arr = buf.numpy()
            arr[:] = tag
            k, _ = _page_views(buf)
            del buf
            if i % 30 == 0:  # a collection now and then runs finalizers mid-take
                gc.collect()
            if not np.all(arr == tag):
                errors.append(f"thread {tag} saw its buffer change")
            del k, arr

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert pool.hits > 0
    assert pool.free_bytes <= 8 * N


def _wait_for(cond: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_a_reserve_is_faulted_in_ahead_and_refilled_as_puts_take_it() -> None:
    """A growing cache has no dead pages to reuse: the reserve thread keeps buffers of the
    size puts ask for ready, so the next takes are hits, and tops the reserve up again."""
    pool = BufferPool(8 * N, reserve_bytes=4 * N)
    first = pool.take(N)  # a miss: the thread starts and fills the reserve
    assert _wait_for(lambda: pool.free_bytes == 4 * N)
    assert pool.prefaulted_bytes == 4 * N and (pool.hits, pool.misses) == (0, 1)
    kept = [pool.take(N) for _ in range(2)]
    assert (pool.hits, pool.misses) == (2, 1)
    assert _wait_for(lambda: pool.free_bytes == 4 * N)  # topped up again
    assert pool.prefaulted_bytes == 6 * N
    assert len({t.data_ptr() for t in (first, *kept)}) == 3
    threads = [t for t in threading.enumerate() if t.name == "kvtier-buffer-reserve"]
    assert threads
    pool.close()
    assert _wait_for(lambda: not any(t.is_alive() for t in threads))
    del first, kept
    gc.collect()
    assert pool.free_bytes <= 8 * N  # returns still respect the bound


def test_no_reserve_no_thread_and_the_reserve_fits_the_pool() -> None:
    pool = BufferPool(8 * N)
    buf = pool.take(N)
    assert pool.free_bytes == 0 and pool.prefaulted_bytes == 0 and pool._thread is None
    del buf
    with pytest.raises(ValueError, match=r"reserve_bytes must be within 0..32768 \(half"):
        BufferPool(N, reserve_bytes=N)


def test_the_settings_refuse_a_reserve_over_half_the_pool_and_default_to_half() -> None:
    from pydantic import ValidationError

    from kvtier.config import Settings

    with pytest.raises(ValidationError, match="host_buffer_reserve_bytes .* must not exceed half"):
        Settings(host_buffer_pool_bytes=1 << 20, host_buffer_reserve_bytes=1 << 20)
    assert Settings(host_buffer_pool_bytes=0).buffer_reserve_bytes == 0
    assert Settings(host_buffer_pool_bytes=16 << 20).buffer_reserve_bytes == 8 << 20
    assert Settings().buffer_reserve_bytes == 32 << 20


def test_buffers_coming_back_stop_the_reserve_so_nothing_is_faulted_in_for_nothing() -> None:
    """Pages that die in batches (the mover demotes every pass) come back to the pool: the
    reserve thread must not top up with fresh memory that the returning batch then finds no
    room for."""
    pool = BufferPool(32 * N, reserve_bytes=16 * N)
    for cycle in range(4):
        held = [pool.take(N) for _ in range(24)]
        time.sleep(0.05)  # the reserve thread's chance to run
        if cycle == 0:
            assert _wait_for(lambda: pool.prefaulted_bytes > 0)  # growing: it did
            first = pool.prefaulted_bytes
        del held
        gc.collect()
    assert pool.prefaulted_bytes == first  # after the first batch came back: never again
    pool.close()


def test_a_pool_dropped_without_close_takes_its_reserve_thread_along() -> None:
    pool = BufferPool(8 * N, reserve_bytes=4 * N)
    buf = pool.take(N)
    assert _wait_for(lambda: pool.free_bytes == 4 * N)
    thread = pool._thread
    assert thread is not None and thread.is_alive()
    del pool, buf
    gc.collect()
    assert _wait_for(lambda: not thread.is_alive())
