"""The client side of the same-host shared-memory path (the segment's layout is
:mod:`kvtier_client.shm_layout`; the daemon's side is ``kvtier.transport.shm``).

:class:`Segment` creates ``/dev/shm/kvtier-<32 hex>`` with mode 0600, writes a random token at
its start and maps it. After the daemon attached it (``AttachShm``) the client unlinks the path:
from then on only the two mappings exist, and the memory is freed when both unmap, whatever
happens to either process.

:class:`Session` is an attached segment as both clients (sync and asyncio) keep it: the segment,
the lease that keeps the daemon's mapping alive (``OpenShm``, renewed in the background; no
call stays open), the session id and the one namespace it serves.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from kvtier_client.shm_layout import (
    ALIGN, DATA_OFFSET, FILL_OFFSET, RANGES_BACK, RING_HEAD_OFFSET, TOKEN_BYTES,
)
from kvtier_client.staging import StagingArea
from kvtier_proto.v1 import cache_pb2 as pb

log = logging.getLogger(__name__)

RING_SLOTS = 1 << 16
DEFAULT_LEND_BYTES = 64 << 20
FILL_CHUNK = 256 << 10
OVERLAP_MIN_BYTES = 256 << 10
OVERLAP_SAFE = platform.machine().lower() in ("x86_64", "amd64")
"""Whether this host may start a put's call before its copy (``overlap_copy``): only where
stores become visible to the daemon in program order (x86-64)."""
SHM_DIR = Path("/dev/shm")
_FENCE = threading.Lock()


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Segment:
    """A client-owned shared-memory segment of ``size`` bytes; the top ``staging_bytes`` hold
    staging slots (see :mod:`kvtier_client.staging`); below them, with ``lend_bytes``, the
    return ring and the lend area (see ``kvtier.transport.shm.lend``); the rest is the request
    area."""

    def __init__(self, size: int, staging_bytes: int = 0, lend_bytes: int = 0) -> None:
        ring_bytes = 8 * RING_SLOTS if lend_bytes else 0
        if min(staging_bytes, lend_bytes) < 0 or \
                staging_bytes + lend_bytes + ring_bytes > size - DATA_OFFSET:
            raise ValueError(f"staging_bytes + lend_bytes (+ {ring_bytes} for the return ring) "
                             f"must be within 0..{size - DATA_OFFSET}")
        self.size = size
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.path = str(SHM_DIR / f"kvtier-{secrets.token_hex(16)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._mm[:TOKEN_BYTES] = self.token
        self.view = memoryview(self._mm)
        self._linked = True
        staging_start = (size - staging_bytes) & ~(ALIGN - 1) if staging_bytes else size
        self.staging_start = staging_start
        self.staging = StagingArea(staging_start, size, ALIGN)
        self.ring_offset = staging_start - ring_bytes
        self.ring_slots = RING_SLOTS if lend_bytes else 0
        self.request_end = (self.ring_offset - lend_bytes) & ~(ALIGN - 1)
        if self.request_end < DATA_OFFSET + ALIGN:
            raise ValueError(f"staging_bytes {staging_bytes} and lend_bytes {lend_bytes} leave "
                             f"no request area in a segment of {size} bytes")
        self.lend = StagingArea(self.request_end, self.ring_offset, ALIGN) if lend_bytes else None
        self._taken_back = 0
        self.lend_full = False  # the last put found no room to lend
        self._reclaim_asked = False  # the daemon was asked to copy lent pages out
        probe = np.frombuffer(self._mm, np.uint8, 1)
        self.base = int(probe.ctypes.data)
        del probe

    @property
    def capacity(self) -> int:
        """Bytes of the request area (what get replies may fill)."""
        return self.request_end - DATA_OFFSET

    def array(self, offset: int, n: int) -> np.ndarray:
        """``n`` bytes of the segment from ``offset`` as a uint8 array (keeps the mapping)."""
        return np.frombuffer(self._mm, np.uint8, n, offset)

    def take_back(self) -> None:
        """Free the lent ranges the daemon handed back through the return ring."""
        if self.lend is None:
            return
        words = np.frombuffer(self._mm, np.uint64, 2, RING_HEAD_OFFSET)
        head = int(words[0])
        if head != self._taken_back:
            ring = np.frombuffer(self._mm, np.uint64, self.ring_slots, self.ring_offset)
            for i in range(self._taken_back, head):
                try:
                    self.lend.free(int(ring[i % self.ring_slots]))
                except ValueError:  # not a range this client lent: ignore
                    pass
            self._taken_back = head
            words[1] = head
            self._reclaim_asked = False
            del ring
        del words

    def wants_reclaim(self) -> bool:
        """Whether the next put should ask the daemon to copy out the pages lent from the full
        lend area (``shm_reclaim``): once, until ranges come back again."""
        if self.lend_full and not self._reclaim_asked:
            self._reclaim_asked = True
            return True
        return False

    def fill_words(self) -> np.ndarray:
        """The two fill words (drop the array before :meth:`close`)."""
        return np.frombuffer(self._mm, np.uint64, 2, FILL_OFFSET)

    def start_fill(self, fill: int) -> None:
        """Announce the put ``fill`` with nothing written yet (before its call starts), and
        fence: what this thread writes next (a page copy, a refilled staged page, which may
        use non-temporal stores that x86-64 does not keep in order with earlier stores)
        becomes visible only after the new number."""
        words = self.fill_words()
        words[1] = 0
        words[0] = fill
        del words
        with _FENCE:  # a locked instruction: a full barrier on x86-64
            pass

    def staged_offset(self, data: memoryview) -> int | None:
        """Where ``data`` starts in the staging area, or None if it lies elsewhere."""
        if self.staging_start == self.size or data.nbytes == 0:
            return None
        off = int(np.frombuffer(data, np.uint8).ctypes.data) - self.base
        return off if self.staging_start <= off and off + data.nbytes <= self.size else None

    def unlink(self) -> None:
        if self._linked:
            self._linked = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self.unlink()
        self.view.release()
        try:
            self._mm.close()
        except BufferError:  # staged pages still use it: unmapped when the last one goes
            pass


class Lease:
    """What keeps a sync client's session alive on the daemon (``OpenShm``): a thread renews
    the lease every third of it while the client is idle (every call naming the session
    renews it too). A session the daemon no longer knows is marked :attr:`lost`, and the
    client attaches a new segment on its next call. :meth:`cancel` stops renewing and ends
    the session on the daemon (``CloseShm``)."""

    def __init__(self, stub: Any, namespace: str, session_id: str, lease_s: float) -> None:
        self._stub = stub
        self._request = pb.ShmLeaseRequest(namespace=namespace, session=session_id)
        self._period = max(0.05, lease_s / 3)
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._renew, name="kvtier-shm-lease",
                                        daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self._stub.RenewShm(self._request, timeout=self._period)
            except grpc.RpcError as e:
                if session_lost(e):
                    self.lost = True
                    return
                # unreachable for now: the next call finds out; renewals go on
            except ValueError:  # the channel was closed
                return

    def cancel(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if not self.lost:
            try:
                self._stub.CloseShm(self._request, timeout=1.0)
            except (grpc.RpcError, ValueError):  # gone already, or the channel is closed:
                pass  # the lease runs out on the daemon


class Session:
    """A segment attached to the daemon for one namespace; ``call`` keeps the session open.

    ``call`` is what holds the session on the daemon: a :class:`Lease` (or the asyncio
    client's), or a legacy ``AttachShm`` call. ``call.cancel()`` ends the session on the
    daemon, which unmaps its side.
    """

    @property
    def lost(self) -> bool:
        """Whether the daemon no longer knows the session (its lease could not be renewed)."""
        return bool(getattr(self.call, "lost", False))

    def __init__(self, segment: Segment, call: Any, session_id: str, namespace: str) -> None:
        self.segment, self.call, self.id, self.namespace = segment, call, session_id, namespace
        self._fills = 0

    def next_fill(self) -> int:
        """A fresh nonzero fill number for the next overlapped put of this session."""
        self._fills += 1
        return self._fills

    def void_fill(self) -> None:
        """End the segment's last put for any handler still reading it: the daemon checks the
        fill number after reading a put's bytes, finds another one and answers ABORTED, so
        bytes written from now on (a staged page refilled after its put failed on a deadline)
        are never stored under that put's keys."""
        try:
            self.segment.start_fill(self.next_fill())
        except ValueError:  # unmapped already: nothing of it can be written again
            pass

    @contextmanager
    def put_guard(self) -> Iterator[None]:
        """Around a put through this session: if it raises, :meth:`void_fill`."""
        try:
            yield
        except BaseException:
            self.void_fill()
            raise

    def close(self) -> None:
        self.void_fill()
        self.call.cancel()
        self.segment.close()


def default_lend_bytes(size: int, staging_bytes: int) -> int:
    """The lend area a client gets unless it says otherwise: a quarter of what the staging
    slots leave of the segment, at most ``DEFAULT_LEND_BYTES``; none where lending cannot work
    (not x86-64) or where the return ring would take a large share of a small segment."""
    n = min(DEFAULT_LEND_BYTES, (size - staging_bytes) // 4) & ~(ALIGN - 1)
    return n if OVERLAP_SAFE and n >= 32 * RING_SLOTS else 0


class SessionSlot:
    """A client's one session and whether to try for one; the attach call itself (sync or
    awaited) is the client's. Not locked: the client serializes its use."""

    def __init__(self, wanted: bool, size: int, target: str, staging_bytes: int = 0,
                 lend_bytes: int | None = None) -> None:
        if not 0 <= staging_bytes <= size - DATA_OFFSET:
            raise ValueError(f"staging_bytes must be within 0..shm_bytes - {DATA_OFFSET} "
                             f"(shm_bytes is {size}), got {staging_bytes}")
        if lend_bytes is None:
            lend_bytes = default_lend_bytes(size, staging_bytes)
        ring_bytes = 8 * RING_SLOTS if lend_bytes else 0
        if lend_bytes < 0 or staging_bytes + lend_bytes + ring_bytes > size - 2 * DATA_OFFSET:
            raise ValueError(f"lend_bytes must be within 0..shm_bytes - staging_bytes - "
                             f"{ring_bytes + 2 * DATA_OFFSET}, got {lend_bytes}")
        self.wanted = wanted and available()
        self.size = size
        self.staging_bytes = staging_bytes
        self.lend_bytes = lend_bytes
        self.target = target
        self.session: Session | None = None

    def current(self, namespace: str) -> tuple[Session | None, Segment | None]:
        """``(session, None)`` when attached for ``namespace``; ``(None, segment)``: attach this
        new segment; ``(None, None)``: transfer inline (shm off, failed before, or a namespace
        other than the session's)."""
        if self.session is not None and self.session.lost:
            self.drop()  # its lease ran out on the daemon: attach a new segment
        if self.session is not None:
            return (self.session if self.session.namespace == namespace else None), None
        if not self.wanted:
            return None, None
        try:
            return None, Segment(self.size, self.staging_bytes, self.lend_bytes)
        except OSError as e:  # /dev/shm full or not ours: inline transfers still work
            self.wanted = False
            log.info("cannot create a shared-memory segment (%s); using inline transfers", e)
            return None, None

    def attached(self, segment: Segment, call: Any, session_id: str,
                 namespace: str) -> Session:
        segment.unlink()
        self.session = Session(segment, call, session_id, namespace)
        return self.session

    def failed(self, segment: Segment, call: Any, detail: object) -> None:
        """The daemon did not attach ``segment`` (another host, or shm refused): stay inline."""
        if call is not None:
            call.cancel()
        segment.close()
        self.wanted = False
        log.info("shared memory with %s not available (%s); using inline transfers",
                 self.target, detail)

    def drop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


# -- what a failed call means for the session -------------------------------------------

_ABANDONED = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def abandoned(e: grpc.RpcError) -> bool:
    """True if the call ended on the client's side while the daemon may still be serving it
    (not UNAVAILABLE: then the call did not reach a handler, or the daemon is stopping)."""
    return e.code() in _ABANDONED


def ranges_back(e: BaseException) -> bool:
    """True if the daemon says every range a failed lending put named comes back through the
    return ring (:data:`kvtier_client.shm_layout.RANGES_BACK`), so the segment can be kept. Any
    other end (a cancel, an interrupt, no such promise) leaves that unknown."""
    try:
        trailing: Any = e.trailing_metadata()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not a call's error: nothing is known
        return False
    return any(item[0] == RANGES_BACK for item in (trailing or ()))


def session_lost(e: grpc.RpcError) -> bool:
    """True if the daemon no longer knows the client's shm session (transfers go inline)."""
    return bool(e.code() == grpc.StatusCode.FAILED_PRECONDITION)
