"""Same-host shared-memory sessions: page bytes cross through a segment the client owns.

A client on the daemon's host creates a file ``/dev/shm/kvtier-<32 hex>`` (mode 0600), writes a
random 16-byte token at its start and calls ``AttachShm(namespace, path, size, token)``. The
daemon opens the path (no symlinks, regular file, exact size), maps it, checks the token (proof
that both sides map the same memory, i.e. share a host) and answers a session id; the client then
unlinks the path, so no other process can open the segment afterwards and nothing is left in
/dev/shm whatever happens to either process.

A session is a lease: ``OpenShm`` attaches the segment and answers the session id and the
lease (``limits.shm_lease_s``); every call that names the session, and ``RenewShm``, extends
it; ``CloseShm`` ends it. A reaper thread ends sessions whose lease ran out, so a client that
dies or stalls holds neither a handler thread nor, for long, a session. The legacy
``AttachShm`` stream keeps a session (without a lease) as long as the call stays open. An
ended session is unmapped at once or, while pages the client lent
(:mod:`kvtier.transport.shm.lend`) are still kept, when the last of them is gone.
Sessions are bounded per daemon and per namespace (``limits.max_shm_sessions*``).

Security: a session is bound to one namespace. Gets through a session only ever copy pages of
that namespace into that client's own segment, and a request naming the session from another
namespace is refused with PERMISSION_DENIED, so a client can only read its namespace's pages.

The segment's layout is :mod:`kvtier_client.shm_layout`, one definition for both sides (offsets
chosen by the client per call; the daemon checks bounds). Its fill words number each put and
let one start before its bytes are all written (see :mod:`kvtier.transport.shm.copy`). The
daemon reads a put's bytes and copies them into its own memory, or keeps them where they lie
when the client lends them; it writes only where a get asked it to, and into the return ring
and its head word.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from kvtier.errors import Aborted, CapacityExhausted, Conflict, InvalidArgument, PermissionDenied
from kvtier.transport.shm.lend import ReturnRing
from kvtier.types import PageId
from kvtier_client.shm_layout import AREA_START, MAX_RING_SLOTS, TOKEN_BYTES

log = logging.getLogger(__name__)

BUSY_WAIT_S = 5.0  # longest a call waits for another call on the same session
_PATH = re.compile(r"^/dev/shm/kvtier-[0-9a-f]{32}$")
_MIN_SIZE = 1 << 16
_MAX_SIZE = 1 << 36


class ShmSession:
    """One attached segment. Byte access goes through :meth:`use`, which excludes closing."""

    def __init__(self, session_id: str, namespace: str, path: str, size: int,
                 token: bytes) -> None:
        if not _PATH.match(path):
            raise InvalidArgument(
                f"shm path {path!r} must look like /dev/shm/kvtier-<32 hex digits>", field="path"
            )
        if not _MIN_SIZE <= size <= _MAX_SIZE:
            raise InvalidArgument(
                f"shm size {size} must be within {_MIN_SIZE}..{_MAX_SIZE} bytes", field="size"
            )
        if len(token) != TOKEN_BYTES:
            raise InvalidArgument(f"token must be {TOKEN_BYTES} bytes", field="token")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise Conflict(
                f"cannot open shared-memory segment {path} ({e.strerror}); client and daemon "
                "must share a host", field="path"
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                raise InvalidArgument(
                    f"shm segment {path} is not a regular file of {size} bytes", field="size"
                )
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if not secrets.compare_digest(self._mm[:TOKEN_BYTES], token):
            self._mm.close()
            raise Conflict("shm token mismatch: not the client's segment", field="token")
        probe = np.frombuffer(self._mm, np.uint8, 1)
        self.base = int(probe.ctypes.data)  # where the segment lies in the daemon's memory
        del probe
        self.session_id = session_id
        self.namespace = namespace
        self.size = size
        self._lock = threading.Lock()
        self._closed = False
        self.ended = threading.Event()
        self._ring: ReturnRing | None = None
        self._ring_lock = threading.Lock()
        self.lease_s: float | None = None  # None: held by an open AttachShm call instead
        self.expires_at = float("inf")  # time.monotonic() when the lease runs out

    def renew(self) -> None:
        """Extend the lease (a no-op for a session held by its AttachShm call)."""
        if self.lease_s is not None:
            self.expires_at = time.monotonic() + self.lease_s

    @property
    def lends(self) -> bool:
        """Whether the client has lent pages (it has a return ring)."""
        return self._ring is not None

    def lent_pages(self) -> list[PageId]:
        """The pages stored from ranges the client lent (see ``ReturnRing.stored``)."""
        return self._ring.stored() if self._ring is not None else []

    def flush_ring(self) -> None:
        """Append the lent ranges that a full return ring could not take before."""
        if self._ring is not None:
            self._ring.flush()

    def ring(self, offset: int, slots: int) -> ReturnRing:
        """The session's return ring for lent pages (set by its first lending put)."""
        if not 1 <= slots <= MAX_RING_SLOTS:
            raise InvalidArgument(f"shm_ring_slots must be within 1..{MAX_RING_SLOTS}, got {slots}",
                                  field="shm_ring_slots")
        self.check_range(offset, 8 * slots, "shm_ring_offset")
        with self._ring_lock:
            if self._ring is None:
                self._ring = ReturnRing(self._mm, offset, slots, self.ended)
            ring = self._ring
        ring.matches(offset, slots)
        return ring

    def check_owner(self, namespace: str) -> None:
        """PermissionDenied unless ``namespace`` is the session's own."""
        if namespace != self.namespace:
            raise PermissionDenied(
                f"shm session belongs to namespace {self.namespace!r}, not {namespace!r}",
                field="shm_session",
            )

    @contextmanager
    def use(self, namespace: str) -> Iterator[memoryview]:
        """The segment's bytes for one call of ``namespace`` (refuses other namespaces); the
        session cannot close while they are in use."""
        self.check_owner(namespace)
        if not self._lock.acquire(timeout=BUSY_WAIT_S):
            raise Aborted(f"the shm session was busy with another call for {BUSY_WAIT_S} s",
                          field="shm_session")
        try:
            if self._closed:
                raise Conflict("shm session is closed; attach again", field="shm_session")
            view = memoryview(self._mm)
            try:
                yield view
            finally:
                try:
                    view.release()
                except BufferError:  # arrays of it live on in an error's traceback; they go
                    pass  # with it (close() copes with a mapping still referenced)
        finally:
            self._lock.release()

    def check_range(self, offset: int, length: int, field: str) -> None:
        if offset < AREA_START or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"shm range [{offset}, {offset + length}) is outside the segment's "
                f"request area [{AREA_START}, {self.size})", field=field
            )

    def close(self) -> None:
        """Unmap after in-flight calls finish; ends the session's AttachShm call."""
        self.ended.set()
        with self._lock:
            if not self._closed:
                self._closed = True
                if not self.unmap():  # lent pages (or an error's traceback) still use it
                    log.info("shm session %s: segment kept mapped while pages use it",
                             self.session_id)

    def unmap(self) -> bool:
        """Unmap the segment if nothing uses it any more; True once it is unmapped."""
        try:
            self._mm.close()
        except BufferError:
            return False
        return True


class ShmRegistry:
    """Live sessions of one daemon, by id, and the reaper of expired leases. Closing it ends
    every session."""

    def __init__(self, max_sessions: int = 32, max_per_namespace: int | None = None) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, ShmSession] = {}
        self._retired: list[ShmSession] = []  # ended, but lent pages keep them mapped
        self._max = max_sessions
        self._max_ns = max_per_namespace if max_per_namespace is not None else max_sessions
        self._closed = False
        self._on_end: Callable[[ShmSession], None] | None = None
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        self.expired = 0  # leases that ran out

    def on_end(self, callback: Callable[[ShmSession], None]) -> None:
        """Call ``callback(session)`` after the reaper ended a session (lent pages to copy)."""
        self._on_end = callback

    def attach(self, namespace: str, path: str, size: int, token: bytes,
               lease_s: float | None = None) -> ShmSession:
        """Map a client's segment for ``namespace``; with ``lease_s`` the session is a lease
        that the reaper ends once it runs out."""
        with self._lock:
            if self._closed:
                raise Conflict("daemon is shutting down", field="shm_session")
            self._retired = [s for s in self._retired if not s.unmap()]
            if len(self._sessions) + len(self._retired) >= self._max:
                raise CapacityExhausted(
                    f"{len(self._sessions)} shared-memory sessions attached and "
                    f"{len(self._retired)} ended ones still holding lent pages, of "
                    f"{self._max}; use inline transfer", field="shm_session",
                )
            mine = Counter(s.namespace for s in self._sessions.values())[namespace]
            if mine >= self._max_ns:
                raise CapacityExhausted(
                    f"{mine} shared-memory sessions attached for namespace {namespace!r}, its "
                    f"limit (limits.max_shm_sessions_per_tenant); use inline transfer",
                    field="shm_session")
            sid = secrets.token_hex(16)
            session = ShmSession(sid, namespace, path, size, token)
            session.lease_s = lease_s
            session.renew()
            self._sessions[sid] = session
            if lease_s is not None and self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, args=(lease_s,),
                                                name="kvtier-shm-reaper", daemon=True)
                self._reaper.start()
        log.debug("shm session %s attached for namespace %s (%d bytes)", sid, namespace, size)
        return session

    def _reap(self, lease_s: float) -> None:
        while not self._stop.wait(min(1.0, lease_s / 4)):
            now = time.monotonic()
            with self._lock:
                expired = [s.session_id for s in self._sessions.values() if s.expires_at < now]
            for sid in expired:
                session = self.detach(sid)
                if session is None:
                    continue
                self.expired += 1
                log.info("shm session %s of namespace %s: lease ran out; ended", sid,
                         session.namespace)
                if self._on_end is not None:
                    try:
                        self._on_end(session)
                    except Exception:
                        log.exception("ending shm session %s", sid)

    def renew(self, session_id: str, namespace: str) -> ShmSession:
        """Extend a lease; FAILED_PRECONDITION for a session that is gone."""
        session = self.get(session_id)
        session.check_owner(namespace)
        return session

    def get(self, session_id: str) -> ShmSession:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise Conflict(f"unknown shm session {session_id!r}; attach again",
                           field="shm_session")
        session.renew()  # any use of a session extends its lease
        session.flush_ring()  # every call naming the session lets held-back ranges out
        return session

    def detach(self, session_id: str) -> ShmSession | None:
        """End a session; the session, or None if it was not live."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.close()
            log.debug("shm session %s detached", session_id)
            if not session.unmap():  # counts against the limit until its pages are gone
                with self._lock:
                    self._retired.append(session)
        return session

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            self._closed = True
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
