"""The page index: pure-Python metadata of every page the store holds, apart from its bytes.

The index knows, per :class:`~kvtier.types.PageId`, which tier holds the page, in which state,
at which precision, how big it is, and its access history; per tier, how many bytes are
committed and how many are reserved by moves and puts still in flight, and the same per
namespace (what quotas are checked against; reservations made without a namespace count for
the tier only). It holds no tensors and
no blobs, so it is testable on its own; the store pairs it with tier backends that hold bytes.

It is **not** thread-safe by itself: the store calls it under its one index lock, and never
holds that lock while encoding, decoding or talking to Redis.

Page states (checked on every transition, never with ``assert``)::

    begin_place           commit_place              begin_move
   ───────────▶ PLACING ───────────────▶ RESIDENT ─────────────▶ MOVING
                   │ abort_place            ▲   ◀── commit_move ───┘ │
                   ▼                        └───── abort_move ───────┘
                (gone)

A ``PLACING`` page is not visible to readers yet (a put returns only after its commit). A
``MOVING`` page is still read from its source tier until the commit switches it over in one
step, so readers never see a half-moved page. :meth:`PageIndex.remove` works in any state; a
move or placement whose page was removed meanwhile fails its commit and its bytes are dropped.
Each residence change bumps a version number, so a stale ticket can never commit. A transition
the index does not allow otherwise (releasing bytes never reserved, committing a move that is not
under way) is a bug in its caller and raises :class:`~kvtier.errors.InternalError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvtier.errors import InternalError
from kvtier.store.policy import PageMeta
from kvtier.types import PageId, Precision


class PageState(str, enum.Enum):
    PLACING = "placing"
    RESIDENT = "resident"
    MOVING = "moving"


@dataclass(slots=True)
class PageRecord:
    """Mutable metadata of one page; owned by :class:`PageIndex`, read-only to everyone else."""

    page: PageId
    tier: int
    state: PageState
    precision: Precision
    nbytes: int  # k + v as put (full precision)
    stored_bytes: int  # what its tier holds (tensor bytes or blob length)
    created_seq: int
    last_seq: int
    last_time: float
    access_count: int
    chain_position: int
    version: int
    move_to: int | None = None
    remote_token: str | None = None  # Redis write token while the page is in the Redis tier


@dataclass(frozen=True, slots=True)
class MoveTicket:
    """A prepared move of one page from tier ``src`` to tier ``dst`` (tier indexes)."""

    page: PageId
    src: int
    dst: int
    version: int


class PageIndex:
    """Metadata of all pages and the byte accounting of every tier (see module docstring)."""

    def __init__(self, n_tiers: int) -> None:
        if n_tiers < 1:
            raise InternalError("an index needs at least one tier", field="tiers")
        self._records: dict[PageId, PageRecord] = {}
        self._members: list[dict[PageId, None]] = [{} for _ in range(n_tiers)]
        self._used = [0] * n_tiers
        self._reserved = [0] * n_tiers
        # per namespace: committed and reserved bytes per tier (rows dropped when all zero)
        self._ns_used: dict[str, list[int]] = {}
        self._ns_reserved: dict[str, list[int]] = {}
        self._seq = 0
        self._version = 0

    # -- clocks -------------------------------------------------------------------------------

    def next_seq(self) -> int:
        """A strictly increasing logical time for access ordering."""
        self._seq += 1
        return self._seq

    @property
    def version(self) -> int:
        """The version the next residence change gets; lets callers order against commits."""
        return self._version + 1

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    # -- reading ------------------------------------------------------------------------------

    def get(self, page: PageId) -> PageRecord | None:
        return self._records.get(page)

    def visible_tier(self, page: PageId) -> int | None:
        """The tier a reader should read ``page`` from, or None if absent or still placing."""
        rec = self._records.get(page)
        if rec is None or rec.state is PageState.PLACING:
            return None
        return rec.tier

    def __len__(self) -> int:
        return len(self._records)

    def used(self, tier: int) -> int:
        return self._used[tier]

    def reserved(self, tier: int) -> int:
        return self._reserved[tier]

    def ns_bytes(self, namespace: str, tier: int) -> int:
        """Bytes of ``namespace`` in ``tier``, committed and reserved."""
        used, res = self._ns_used.get(namespace), self._ns_reserved.get(namespace)
        return (used[tier] if used else 0) + (res[tier] if res else 0)

    def ns_used(self) -> dict[str, tuple[int, ...]]:
        """Committed bytes per tier of every namespace that has any (a copy)."""
        return {ns: tuple(row) for ns, row in self._ns_used.items()}

    def _ns_add(self, table: dict[str, list[int]], namespace: str, tier: int,
                delta: int) -> None:
        row = table.get(namespace)
        if row is None:
            row = table[namespace] = [0] * len(self._used)
        row[tier] = max(0, row[tier] + delta)
        if not any(row):
            del table[namespace]

    def page_count(self, tier: int) -> int:
        return len(self._members[tier])

    def pages_in(self, tier: int) -> list[PageId]:
        """Pages committed to ``tier`` (resident or moving away), oldest arrival first."""
        return list(self._members[tier])

    def meta(self, page: PageId, tier_names: tuple[str, ...]) -> PageMeta | None:
        rec = self._records.get(page)
        if rec is None or rec.state is PageState.PLACING:
            return None
        return self._meta(rec, tier_names)

    def resident_metas(self, tier: int, tier_names: tuple[str, ...]) -> list[PageMeta]:
        """What a policy may see of the pages of ``tier`` that may be moved now."""
        out = []
        for pid in self._members[tier]:
            rec = self._records[pid]
            if rec.state is PageState.RESIDENT:
                out.append(self._meta(rec, tier_names))
        return out

    @staticmethod
    def _meta(rec: PageRecord, tier_names: tuple[str, ...]) -> PageMeta:
        return PageMeta(
            page=rec.page,
            tier=tier_names[rec.tier],
            tier_index=rec.tier,
            nbytes=rec.nbytes,
            created_seq=rec.created_seq,
            last_seq=rec.last_seq,
            last_time=rec.last_time,
            access_count=rec.access_count,
            chain_position=rec.chain_position,
        )

    # -- byte accounting ----------------------------------------------------------------------

    def fits(self, tier: int, size: int, capacity: int) -> bool:
        return self._used[tier] + self._reserved[tier] + size <= capacity

    def reserve(self, tier: int, size: int, capacity: int,
                namespace: str | None = None) -> bool:
        """Reserve ``size`` bytes of ``tier`` for a put or move in flight (of a page of
        ``namespace``), if they fit."""
        if size < 0:
            raise InternalError(f"cannot reserve {size} bytes", field="size")
        if not self.fits(tier, size, capacity):
            return False
        self._reserved[tier] += size
        if namespace is not None:
            self._ns_add(self._ns_reserved, namespace, tier, size)
        return True

    def release(self, tier: int, size: int, namespace: str | None = None) -> None:
        """Give back a reservation whose put or move did not commit."""
        if size > self._reserved[tier]:
            raise InternalError(
                f"releasing {size} bytes of tier {tier} but only {self._reserved[tier]} reserved",
                field="size",
            )
        self._reserved[tier] -= size
        if namespace is not None:
            self._ns_add(self._ns_reserved, namespace, tier, -size)

    # -- transitions --------------------------------------------------------------------------

    def begin_place(
        self, page: PageId, tier: int, nbytes: int, chain_position: int, now: float
    ) -> int | None:
        """Claim ``page`` for a put into ``tier``; its version, or None if the key exists."""
        if page in self._records:
            return None
        seq = self.next_seq()
        version = self._next_version()
        self._records[page] = PageRecord(
            page=page, tier=tier, state=PageState.PLACING, precision=Precision.FULL,
            nbytes=nbytes, stored_bytes=0, created_seq=seq, last_seq=seq, last_time=now,
            access_count=1, chain_position=chain_position, version=version,
        )
        return version

    def commit_place(
        self, page: PageId, version: int, stored_bytes: int, precision: Precision,
        remote_token: str | None = None,
    ) -> bool:
        """Make a placed page visible; turns its reservation into committed bytes.

        False (and nothing changed) if the page was removed or replaced meanwhile; the caller
        then releases its reservation.
        """
        rec = self._records.get(page)
        if rec is None or rec.version != version or rec.state is not PageState.PLACING:
            return False
        self._take_reservation(rec.tier, stored_bytes, page.namespace)
        rec.state = PageState.RESIDENT
        rec.stored_bytes = stored_bytes
        rec.precision = min(rec.precision, precision)
        rec.remote_token = remote_token
        self._members[rec.tier][page] = None
        return True

    def abort_place(self, page: PageId, version: int) -> None:
        rec = self._records.get(page)
        if rec is not None and rec.version == version and rec.state is PageState.PLACING:
            del self._records[page]

    def add_resident(
        self, page: PageId, tier: int, nbytes: int, stored_bytes: int, precision: Precision,
        chain_position: int, now: float, remote_token: str | None = None,
    ) -> bool:
        """Record a page found already stored (e.g. in Redis at attach). False if known."""
        if page in self._records:
            return False
        seq = self.next_seq()
        self._records[page] = PageRecord(
            page=page, tier=tier, state=PageState.RESIDENT, precision=precision,
            nbytes=nbytes, stored_bytes=stored_bytes, created_seq=seq, last_seq=seq,
            last_time=now, access_count=0, chain_position=chain_position,
            version=self._next_version(), remote_token=remote_token,
        )
        self._members[tier][page] = None
        self._used[tier] += stored_bytes
        self._ns_add(self._ns_used, page.namespace, tier, stored_bytes)
        return True

    def begin_move(self, page: PageId, dst: int) -> MoveTicket | None:
        """Prepare moving a resident page to ``dst``; None if absent, busy or already there."""
        rec = self._records.get(page)
        if rec is None or rec.state is not PageState.RESIDENT or rec.tier == dst:
            return None
        if not 0 <= dst < len(self._members):
            raise InternalError(f"no tier with index {dst}", field="tier")
        rec.state = PageState.MOVING
        rec.move_to = dst
        return MoveTicket(page=page, src=rec.tier, dst=dst, version=rec.version)

    def commit_move(
        self, ticket: MoveTicket, stored_bytes: int, precision: Precision,
        remote_token: str | None = None,
    ) -> bool:
        """Switch the page to its destination in one step; its reservation becomes committed.

        False if the page was removed meanwhile (the caller releases the reservation and drops
        the bytes it wrote). A ticket that does not match the page's move raises InternalError.
        """
        rec = self._records.get(ticket.page)
        if rec is None or rec.version != ticket.version:
            return False
        if rec.state is not PageState.MOVING or rec.move_to != ticket.dst:
            raise InternalError(
                f"page {ticket.page} is {rec.state.value}, not moving to tier {ticket.dst}",
                field="state",
            )
        self._take_reservation(ticket.dst, stored_bytes, ticket.page.namespace)
        del self._members[ticket.src][ticket.page]
        self._used[ticket.src] -= rec.stored_bytes
        self._ns_add(self._ns_used, ticket.page.namespace, ticket.src, -rec.stored_bytes)
        self._members[ticket.dst][ticket.page] = None
        rec.tier = ticket.dst
        rec.stored_bytes = stored_bytes
        rec.precision = min(rec.precision, precision)
        rec.state = PageState.RESIDENT
        rec.move_to = None
        rec.remote_token = remote_token
        rec.version = self._next_version()
        return True

    def abort_move(self, ticket: MoveTicket) -> None:
        """Cancel a prepared move; the page stays resident where it was."""
        rec = self._records.get(ticket.page)
        if rec is None or rec.version != ticket.version or rec.state is not PageState.MOVING:
            return
        rec.state = PageState.RESIDENT
        rec.move_to = None

    def remove(self, page: PageId) -> PageRecord | None:
        """Drop a page in any state; its committed bytes are freed at once."""
        rec = self._records.pop(page, None)
        if rec is None:
            return None
        if rec.state is not PageState.PLACING:
            del self._members[rec.tier][page]
            self._used[rec.tier] -= rec.stored_bytes
            self._ns_add(self._ns_used, page.namespace, rec.tier, -rec.stored_bytes)
        return rec

    def touch(self, page: PageId, now: float, *, count: bool) -> int | None:
        """Stamp an access; ``count`` also bumps the access count. The seq, or None if absent."""
        rec = self._records.get(page)
        if rec is None or rec.state is PageState.PLACING:
            return None
        rec.last_seq = self.next_seq()
        rec.last_time = now
        if count:
            rec.access_count += 1
        return rec.last_seq

    def _take_reservation(self, tier: int, size: int, namespace: str) -> None:
        if size > self._reserved[tier]:
            raise InternalError(
                f"committing {size} bytes to tier {tier} without a reservation for them",
                field="size",
            )
        self._reserved[tier] -= size
        self._used[tier] += size
        self._ns_add(self._ns_reserved, namespace, tier, -size)  # none made: stays at 0
        self._ns_add(self._ns_used, namespace, tier, size)
