"""Leases on device-pool blocks for same-host workers that copy pages through CUDA IPC.

A worker on the daemon's GPU host maps the daemon's device pool once (a CUDA IPC handle) and
then copies pages out of it and into it device to device, with no host memory in between.
What it may touch, and for how long, is a lease:

* a **read** lease lends a hot page: it holds the page (so its block, see
  :mod:`kvtier.store.device_pool`) until the worker releases it. The page may be demoted or
  deleted meanwhile: its block is not given back, so not rewritten, while the lease is open;
* a **write** lease reserves a fresh block for a page the worker is about to put: the worker
  copies its K and V in, then commits (the store adopts the block as the page, no copy) or
  releases it (the block goes back).

States, checked on every transition (an illegal one raises :class:`~kvtier.errors.Conflict`,
an unknown lease or session :class:`~kvtier.errors.NotFound`)::

    lend / reserve          commit (write leases only)
   ────────────────▶ OPEN ────────────────────────────▶ COMMITTED
                       │ release, end of session
                       ├───────────────────────────────▶ RELEASED
                       │ sweep: open past its deadline
                       └───────────────────────────────▶ EXPIRED

Finished leases leave the table; the last 4,096 final states are kept for :meth:`state`.
Each session may hold at most
``max_bytes`` of blocks under open leases, so a worker that never releases cannot pin the pool:
past it, ``lend`` and ``reserve`` raise CapacityExhausted. A lease left open past ``ttl_s`` is
expired by :meth:`DeviceLeases.sweep`; a worker must finish its copies (and synchronize its
stream) within that time, since an expired block may be given to another page. Sessions belong
to one namespace. Pure bookkeeping over page references and pool blocks: no CUDA needed.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from kvtier.errors import CapacityExhausted, Conflict, InvalidArgument, NotFound
from kvtier.pages import dtype_name
from kvtier.store.device_pool import DevicePool
from kvtier.types import Page


class LeaseKind(str, enum.Enum):
    READ = "read"
    WRITE = "write"


class LeaseState(str, enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Lease:
    """Where a leased page lies in the pool: byte offsets of K and V from the pool's start."""

    lease_id: int
    session: str
    kind: LeaseKind
    k_offset: int
    v_offset: int
    dtype: str
    shape: tuple[int, int, int, int]
    start_position: int
    deadline: float

    @property
    def nbytes(self) -> int:
        """Bytes of K (and as many of V)."""
        n = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass(slots=True)
class _Open:
    lease: Lease
    page: Page  # holds the block
    block_bytes: int


@dataclass(slots=True)
class _Session:
    namespace: str
    held_bytes: int = 0
    leases: set[int] | None = None


class DeviceLeases:
    """The leases of every IPC session on one pool (see the module docstring). Thread-safe:
    the one lock here guards the table; the pool's allocator has its own."""

    def __init__(self, pool: DevicePool, *, max_bytes: int, ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes <= 0 or ttl_s <= 0:
            raise InvalidArgument("max_bytes and ttl_s must be > 0", field="leases")
        self.pool = pool
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._open: dict[int, _Open] = {}
        self._done: OrderedDict[int, LeaseState] = OrderedDict()
        self._sessions: dict[str, _Session] = {}

    # -- sessions -------------------------------------------------------------------------

    def open_session(self, namespace: str) -> str:
        sid = secrets.token_hex(16)
        with self._lock:
            self._sessions[sid] = _Session(namespace, 0, set())
        return sid

    def end_session(self, session: str) -> int:
        """Release every lease the session still holds and forget it; how many were open."""
        with self._lock:
            s = self._sessions.get(session)
            if s is None:
                return 0
            held = list(s.leases or ())
            for lid in held:
                self._close(self._open[lid], LeaseState.RELEASED)
            del self._sessions[session]
            return len(held)

    def namespace(self, session: str) -> str:
        """The session's namespace; NotFound for an unknown (or ended) session."""
        with self._lock:
            return self._session(session).namespace

    def _session(self, session: str) -> _Session:
        s = self._sessions.get(session)
        if s is None:
            raise NotFound(f"no device session {session!r} (ended, or never opened)",
                           field="session")
        return s

    # -- opening leases -------------------------------------------------------------------

    def lend(self, session: str, page: Page) -> Lease:
        """A read lease on ``page``, a page of this pool (its K and V in one block)."""
        if not (self.pool.holds(page.k) and self.pool.holds(page.v)):
            raise Conflict("only pages in the device pool can be lent", field="page")
        return self._add(session, LeaseKind.READ, page)

    def reserve(self, session: str, dtype: torch.dtype,
                shape: tuple[int, int, int, int], start_position: int) -> Lease | None:
        """A write lease on a new block for a page of ``dtype`` and ``shape``; None when the
        pool has no free extent that large (make room and retry, or put another way)."""
        dtype_name(dtype)
        if len(shape) != 4 or any(d <= 0 for d in shape):
            raise InvalidArgument(f"shape must be 4 positive sizes, got {list(shape)}",
                                  field="shape")
        self._check_room(session, self.pool.block_bytes(dtype, shape))
        kv = self.pool.new_kv(dtype, shape)
        if kv is None:
            return None
        return self._add(session, LeaseKind.WRITE,
                         Page(k=kv[0], v=kv[1], start_position=start_position))

    def _check_room(self, session: str, nbytes: int) -> None:
        with self._lock:
            self._room(self._session(session), nbytes)

    def _room(self, s: _Session, nbytes: int) -> None:
        if s.held_bytes + nbytes > self.max_bytes:
            raise CapacityExhausted(
                f"device session holds {s.held_bytes} bytes under open leases; {nbytes} "
                f"more would pass its limit of {self.max_bytes}: release some", field="leases")

    def _add(self, session: str, kind: LeaseKind, page: Page) -> Lease:
        nbytes = self.pool.block_bytes(page.k.dtype, tuple(page.k.shape))
        with self._lock:
            s = self._session(session)
            self._room(s, nbytes)
            lid = next(self._ids)
            shape = tuple(page.k.shape)
            lease = Lease(lid, session, kind, self.pool.offset_of(page.k),
                          self.pool.offset_of(page.v), dtype_name(page.k.dtype),
                          (shape[0], shape[1], shape[2], shape[3]), page.start_position,
                          self._clock() + self.ttl_s)
            self._open[lid] = _Open(lease, page, nbytes)
            s.held_bytes += nbytes
            assert s.leases is not None
            s.leases.add(lid)
            return lease

    # -- closing leases -------------------------------------------------------------------

    def commit(self, session: str, lease_id: int) -> Page:
        """Close a write lease as COMMITTED and hand over its page (tensors over the block,
        now written by the worker): the caller stores it, or drops it to free the block."""
        with self._lock:
            entry = self._owned(session, lease_id)
            if entry.lease.kind is not LeaseKind.WRITE:
                raise Conflict(f"lease {lease_id} is a read lease: only write leases commit",
                               field="lease")
            self._close(entry, LeaseState.COMMITTED)
            return entry.page

    def release(self, session: str, lease_ids: Iterable[int]) -> int:
        """Close open leases of the session as RELEASED; how many were open. Unknown or
        already finished ids are skipped (a release may race an expiry)."""
        n = 0
        with self._lock:
            self._session(session)
            for lid in lease_ids:
                entry = self._open.get(lid)
                if entry is None:
                    continue
                if entry.lease.session != session:
                    raise NotFound(f"no lease {lid} in this session", field="lease")
                self._close(entry, LeaseState.RELEASED)
                n += 1
        return n

    def sweep(self) -> int:
        """Expire open leases past their deadline; how many."""
        now = self._clock()
        with self._lock:
            late = [e for e in self._open.values() if e.lease.deadline <= now]
            for entry in late:
                self._close(entry, LeaseState.EXPIRED)
        return len(late)

    def _owned(self, session: str, lease_id: int) -> _Open:
        self._session(session)
        entry = self._open.get(lease_id)
        if entry is None or entry.lease.session != session:
            raise NotFound(f"no open lease {lease_id} in this session (released, committed "
                           f"or expired)", field="lease")
        return entry

    def _close(self, entry: _Open, state: LeaseState) -> None:
        """OPEN -> ``state``: the table lets go of the page (and so, once no one else holds
        it, of its block)."""
        if entry.lease.lease_id not in self._open:
            raise Conflict(f"lease {entry.lease.lease_id} is not open", field="lease")
        del self._open[entry.lease.lease_id]
        self._done[entry.lease.lease_id] = state
        if len(self._done) > 4096:
            self._done.popitem(last=False)
        s = self._sessions.get(entry.lease.session)
        if s is not None and s.leases is not None:
            s.leases.discard(entry.lease.lease_id)
            s.held_bytes -= entry.block_bytes

    # -- reading --------------------------------------------------------------------------

    def state(self, lease_id: int) -> LeaseState | None:
        """The lease's state (None: unknown, or finished long ago)."""
        with self._lock:
            if lease_id in self._open:
                return LeaseState.OPEN
            return self._done.get(lease_id)

    def held_bytes(self, session: str) -> int:
        with self._lock:
            return self._session(session).held_bytes
