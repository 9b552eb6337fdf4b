"""The tier engine: the one owner of the store's state and of the lock that guards it.

The state is the page index, the bytes of the memory tiers, the per-tier counters and limits,
and the store's call totals. Every other module of the store reaches it through the
transactions here, each of which takes the lock for a few dict operations and returns; no other
module names the lock (``tests/test_layering.py`` checks it). The work that costs time -
copying to the device, encoding, decoding, transcoding, Redis round trips, asking the policy -
runs between transactions, in :mod:`kvtier.store.transfer`. A move is two-phase::

    begin_move   (lock)     RESIDENT -> MOVING; hand out the source's stored form and metadata
    (transfer)   (no lock)  convert to the target tier's form; reserve room there (making room
                            by pushing the target's own victims further down if needed); write
                            it when the target is Redis
    commit_move  (lock)     switch tier, swap the bytes between the backends, count; a page
                            deleted meanwhile fails the commit and its copy is dropped
    abort_move   (lock)     the page stays where it was; the reservation goes back

A put is the same with :meth:`TierEngine.begin_place`, :meth:`~TierEngine.commit_place` and
:meth:`~TierEngine.abort_place`. Readers take the stored reference under the lock
(:meth:`TierEngine.read_ref`), so until a commit they read the source and after it the target:
never a torn page. Stored tensors and blobs are never mutated in place. Nothing here logs per
page.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from kvtier.config import Settings
from kvtier.store.chains import ChainLinks, chain_order
from kvtier.store.device_transfer import DeviceTransfer
from kvtier.store.hints import HintBook
from kvtier.store.index import MoveTicket, PageIndex, PageState
from kvtier.store.policy import LRUPolicy, PageMeta, Policy
from kvtier.store.redis_tier import RedisTier, RemoteMeta
from kvtier.store.stats import CodecClock, TierCounters, TierStats
from kvtier.store.tiers import (
    Converter, MemoryBackend, Stored, TierLimits, TierSpec, build_specs, resolve_device,
)
from kvtier.types import EvictionReason, Medium, Page, PageId, Precision

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.02


class Room(enum.Enum):
    """What :meth:`TierEngine.reserve` found."""

    RESERVED = "reserved"
    FULL = "full"  # not now: other pages are in the way
    TOO_BIG = "too_big"  # larger than the whole tier: never
    QUOTA = "quota"  # not now: the namespace's own pages fill its quota
    OVER_QUOTA = "over_quota"  # larger than the namespace's quota: never


@dataclass(frozen=True, slots=True)
class PreparedMove:
    """A move begun by :meth:`TierEngine.begin_move`: the ticket, the source's stored form
    (None: the source is the Redis tier, read outside the lock) and the page's metadata."""

    ticket: MoveTicket
    data: Stored | None
    nbytes: int
    chain_position: int
    precision: Precision
    src_token: str | None  # the source's Redis write token, when it is the Redis tier


@dataclass(frozen=True, slots=True)
class ReadRef:
    """Where a page is for a reader: its stored form (None: in the Redis tier, fetch it), its
    tier and precision, and the version that a fetch which finds nothing checks against."""

    data: Stored | None
    tier: int
    precision: Precision
    version: int


@dataclass(frozen=True, slots=True)
class HeldPage:
    """A page whose bytes a memory tier holds: its stored form and what a copy of it in the
    Redis tier records (for sharing it, :mod:`kvtier.store.sharing`)."""

    page: PageId
    data: Stored
    precision: Precision
    nbytes: int
    chain_position: int


@dataclass(frozen=True, slots=True)
class PageView:
    """One page's record as a reader may see it (admin page info)."""

    state: PageState
    precision: Precision
    nbytes: int
    stored_bytes: int
    meta: PageMeta


@dataclass(frozen=True, slots=True)
class Totals:
    """The store's call counters."""

    gets: int
    get_hits: int
    puts: int
    puts_stored: int


@dataclass(frozen=True, slots=True)
class TierContents:
    """A consistent picture of one tier (for checks and debugging, never on the data path):
    its pages and their states, its bytes committed and in flight, and for a memory tier what
    it holds."""

    pages: tuple[PageId, ...]
    states: Mapping[PageId, PageState]
    used: int
    reserved: int
    held: Mapping[PageId, Stored] | None  # None for the Redis tier


class TierEngine:
    """Pages, tiers and the one lock; see the module docstring. Thread-safe."""

    def __init__(self, settings: Settings, policy: Policy, room_timeout_s: float = 5.0) -> None:
        tiers = list(settings.tiers)
        if tiers[-1].medium is Medium.REDIS and settings.redis.url is None:
            log.info("no redis url configured: running without the %r tier", tiers[-1].name)
            tiers = tiers[:-1]
        self.specs: list[TierSpec] = build_specs(tiers, resolve_device(settings.device))
        self.names: tuple[str, ...] = tuple(s.name for s in self.specs)
        self.redis: RedisTier | None = None
        self.redis_tier: int | None = None
        if self.specs[-1].medium is Medium.REDIS and settings.redis.url is not None:
            self.redis = RedisTier(settings.redis, settings.redis.url)
            self.redis_tier = len(self.specs) - 1
        self.clock = CodecClock()
        self.converter = Converter(settings.codec, self.clock)
        # the device tier's pool and the moves into and out of it (None without a pool);
        # TierStore hands it the way to make room in the pool (kvtier.store.transfer)
        self.device_transfer: DeviceTransfer | None = DeviceTransfer.for_tiers(
            self.specs, [c.capacity_bytes for c in tiers], settings.device_pool_bytes,
            settings.codec, self.clock)
        if self.device_transfer is not None:
            self.converter.device_moves = self.device_transfer.to_tier
        self.policy: Policy = policy
        self.chains = ChainLinks()  # predecessor links: rankings stay prefix-closed
        self.hints = HintBook()  # the workers' queue, session and expected-reuse hints
        self.room_timeout_s = room_timeout_s
        self._fallback = LRUPolicy()
        self._policy_failed = False
        # the state, guarded by _state_lock
        self._state_lock = threading.Condition(threading.Lock())
        self._limits: list[TierLimits] = [TierLimits.of(c) for c in tiers]
        self._index = PageIndex(len(self.specs))
        self._memory: list[MemoryBackend | None] = [
            None if s.medium is Medium.REDIS else MemoryBackend(s) for s in self.specs
        ]
        self._counters = [TierCounters() for _ in self.specs]
        self._gets = self._get_hits = self._puts = self._puts_stored = 0
        self.quotas = settings.quotas
        self._memory_tiers = tuple(i for i, s in enumerate(self.specs)
                                   if s.medium is not Medium.REDIS)
        self._quota_refused = 0

    # -- what does not change, and the policy (no lock) ---------------------------------------

    @property
    def last(self) -> int:
        return len(self.specs) - 1

    def tier_up(self, tier: int) -> bool:
        return tier != self.redis_tier or (self.redis is not None and self.redis.up)

    def victims(self, candidates: Sequence[PageMeta]) -> list[PageId]:
        """All candidates in demotion order: the policy's (LRU if the policy fails), with the
        workers' hints applied and kept prefix-closed (:meth:`prefix_closed`)."""
        try:
            order = self.policy.victims(candidates, len(candidates))
            self._policy_failed = False
        except Exception:
            if not self._policy_failed:
                log.exception("policy %s failed to rank victims; using LRU", self.policy.name)
            self._policy_failed = True
            order = self._fallback.victims(candidates, len(candidates))
        return self.prefix_closed(order, {m.page: m.tier_index for m in candidates})

    def prefix_closed(self, order: Sequence[PageId], tiers: Mapping[PageId, int]
                      ) -> list[PageId]:
        """``order`` (pages of the tiers in ``tiers``) re-ranked so that hints count and no page
        leaves before its successors.

        Per page, in this precedence: a page with a successor resident in a higher tier goes
        last (moving it would cut the chain above it); then hint classes (an ended session's
        pages first, then unhinted ones, then pages expected back soon, then queued ones);
        then the given order. :func:`~kvtier.store.chains.chain_order` then ranks each chain
        by its best page and cuts it from the tail.
        """
        if len(order) <= 1:
            return list(order)
        pos = {p: i for i, p in enumerate(order)}
        hint = dict(zip(order, self.hints.classes(order), strict=True))
        parents = self.chains.parents(order)
        kids = self.chains.children(order)
        above: set[PageId] = set()
        if kids:
            with self._state_lock:
                for p, cs in kids.items():
                    t = tiers.get(p)
                    for c in cs:
                        vt = self._index.visible_tier(c)
                        if t is not None and vt is not None and vt < t:
                            above.add(p)
                            break
        return chain_order(list(order), parents.get,
                           lambda p: (float(p in above), float(hint[p]), float(pos[p])))

    def forget(self, pages: Sequence[PageId]) -> None:
        """Tell the policy (and the chain links and hints) these pages left the cache."""
        if not pages:
            return
        self.chains.forget(pages)
        self.hints.forget(pages)
        try:
            self.policy.forget(pages)
        except Exception:
            log.exception("policy %s failed in forget()", self.policy.name)

    # -- limits and room ----------------------------------------------------------------------

    def limits(self, tier: int) -> TierLimits:
        with self._state_lock:
            return self._limits[tier]

    def set_limits(self, tier: int, capacity_bytes: int | None, high_watermark: float | None,
                   low_watermark: float | None) -> None:
        """Change a tier's limits (validated: InvalidArgument names the bad one)."""
        with self._state_lock:
            self._limits[tier] = self._limits[tier].replace(capacity_bytes, high_watermark,
                                                            low_watermark)

    def reserve(self, tier: int, size: int, page: PageId | None = None,
                credit: int | None = 0) -> Room:
        """Reserve ``size`` bytes of ``tier`` for a put or move in flight, if they fit now:
        the tier's capacity, and the quota of ``page``'s namespace (``credit``: bytes of the
        namespace's memory tiers that the move frees when it commits, its source's; None: a
        demotion, which the quota across the memory tiers never stops - it is how a namespace
        makes room - only a quota of the target tier)."""
        with self._state_lock:
            cap = self._limits[tier].capacity_bytes
            if size > cap:
                return Room.TOO_BIG
            ns = page.namespace if page is not None else None
            if ns is not None:
                quota = self._quota_room(ns, tier, size, credit)
                if quota is not Room.RESERVED:
                    return quota
            return Room.RESERVED if self._index.reserve(tier, size, cap, ns) else Room.FULL

    # -- quotas (kvtier.config.QuotasConfig) --------------------------------------------------

    def _quota_room(self, ns: str, tier: int, size: int, credit: int | None) -> Room:
        """Under the lock: whether ``size`` more bytes of ``ns`` in ``tier`` fit its quota."""
        q = self.quotas.of(ns)
        if q is None or tier not in self._memory_tiers:
            return Room.RESERVED
        tier_quota = q.tiers.get(self.names[tier])
        if tier_quota is not None:
            if size > tier_quota:
                return Room.OVER_QUOTA
            if self._index.ns_bytes(ns, tier) + size > tier_quota:
                return Room.QUOTA
        if q.bytes is not None and credit is not None:
            if size > q.bytes:
                return Room.OVER_QUOTA
            held = sum(self._index.ns_bytes(ns, t) for t in self._memory_tiers)
            if held - credit + size > q.bytes:
                return Room.QUOTA
        return Room.RESERVED

    def quota_fits(self, ns: str, tier: int, size: int, credit: int | None = 0) -> bool:
        with self._state_lock:
            return self._quota_room(ns, tier, size, credit) is Room.RESERVED

    def quota_victim_tiers(self, ns: str, tier: int, size: int) -> list[int]:
        """Where ``ns``'s own pages should leave to make its quota room for ``size`` bytes
        in ``tier``: that tier when its own quota is in the way, else (the quota across the
        memory tiers) every memory tier from the bottom up, so that the namespace's coldest
        pages leave memory first."""
        with self._state_lock:
            q = self.quotas.of(ns)
            tier_quota = q.tiers.get(self.names[tier]) if q is not None else None
            if tier_quota is not None and self._index.ns_bytes(ns, tier) + size > tier_quota:
                return [tier]
            return list(reversed(self._memory_tiers))

    def count_quota_refusal(self) -> None:
        with self._state_lock:
            self._quota_refused += 1

    def namespace_usage(self) -> tuple[dict[str, tuple[int, ...]], int]:
        """Committed bytes per tier of every namespace, and the puts refused for a quota."""
        with self._state_lock:
            return self._index.ns_used(), self._quota_refused

    def fits(self, tier: int, size: int) -> bool:
        with self._state_lock:
            return self._index.fits(tier, size, self._limits[tier].capacity_bytes)

    def wait_for_room(self, tier: int, size: int) -> None:
        """Wait a moment (``WAIT_SLICE_S``) for a commit or removal, unless ``size`` fits."""
        with self._state_lock:
            if not self._index.fits(tier, size, self._limits[tier].capacity_bytes):
                self._state_lock.wait(WAIT_SLICE_S)

    def wait_for_change(self) -> None:
        """Wait a moment (``WAIT_SLICE_S``) for some page to settle (a commit, an abort)."""
        with self._state_lock:
            self._state_lock.wait(WAIT_SLICE_S)

    def candidates(self, tier: int, namespace: str | None = None) -> list[PageMeta]:
        """What the policy may see of the pages of ``tier`` that may be moved now (only
        ``namespace``'s, when given)."""
        with self._state_lock:
            metas = self._index.resident_metas(tier, self.names)
        if namespace is None:
            return metas
        return [m for m in metas if m.page.namespace == namespace]

    def over_high(self, tier: int) -> list[PageMeta] | None:
        """:meth:`candidates` if ``tier`` (bytes held and in flight) is past its high
        watermark, else None."""
        with self._state_lock:
            used = self._index.used(tier) + self._index.reserved(tier)
            if used <= self._limits[tier].high_bytes:
                return None
            return self._index.resident_metas(tier, self.names)

    def past_high(self, tiers: Iterable[int]) -> bool:
        with self._state_lock:
            return any(self._index.used(t) + self._index.reserved(t) > self._limits[t].high_bytes
                       for t in tiers)

    def at_or_below_low(self, tier: int) -> bool:
        with self._state_lock:
            used = self._index.used(tier) + self._index.reserved(tier)
            return used <= self._limits[tier].low_bytes

    def prefetch_fits(self, pid: PageId) -> bool | None:
        """Whether promoting ``pid`` into the top tier keeps it at or below its low watermark;
        None if the page is absent, busy or already there (skip it)."""
        with self._state_lock:
            rec = self._index.get(pid)
            if rec is None or rec.tier == 0 or rec.state is not PageState.RESIDENT:
                return None
            room = self._limits[0].low_bytes - self._index.used(0) - self._index.reserved(0)
            return rec.nbytes + rec.stored_bytes <= room

    # -- placing a new page -------------------------------------------------------------------

    def begin_place(self, pid: PageId, tier: int, nbytes: int, chain_position: int,
                    now: float) -> int | None:
        """Claim ``pid`` for a put into ``tier``; its version, or None if the key exists."""
        with self._state_lock:
            return self._index.begin_place(pid, tier, nbytes, chain_position, now)

    def commit_place(self, pid: PageId, version: int, tier: int, data: Stored, size: int,
                     precision: Precision) -> bool:
        """Make a placed page visible with its bytes (``size`` reserved in ``tier``); False,
        and the reservation released, if it was deleted meanwhile."""
        backend = self._memory[tier]
        with self._state_lock:
            ok = self._index.commit_place(pid, version, size, precision)
            if ok and backend is not None:
                backend.put(pid, data)
            elif not ok:
                self._index.release(tier, size, pid.namespace)
            self._state_lock.notify_all()
        return ok

    def abort_place(self, pid: PageId, version: int, tier: int, reserved: int) -> None:
        """Forget a placement that failed, with the ``reserved`` bytes it held in ``tier``."""
        with self._state_lock:
            if reserved:
                self._index.release(tier, reserved, pid.namespace)
            self._index.abort_place(pid, version)
            self._state_lock.notify_all()

    # -- moving a page ------------------------------------------------------------------------

    def begin_move(self, pid: PageId, dst: int) -> PreparedMove | None:
        """Prepare moving ``pid`` to tier ``dst``; None if it is absent, busy or there already."""
        with self._state_lock:
            ticket = self._index.begin_move(pid, dst)
            if ticket is None:
                return None
            backend = self._memory[ticket.src]
            data = backend.get(pid) if backend is not None else None
            rec = self._index.get(pid)
            if rec is None:
                return PreparedMove(ticket, data, 0, 0, Precision.FULL, None)
            return PreparedMove(ticket, data, rec.nbytes, rec.chain_position, rec.precision,
                                rec.remote_token)

    def commit_move(self, move: PreparedMove, new: Stored, size: int, precision: Precision,
                    token: str | None) -> bool:
        """Switch the page to its target in one step (``size`` reserved there, ``token`` its
        Redis write token when the target is Redis); False, and the reservation released, if
        the page was deleted meanwhile."""
        t = move.ticket
        with self._state_lock:
            ok = self._index.commit_move(t, size, precision, token)
            if ok:
                dst_backend, src_backend = self._memory[t.dst], self._memory[t.src]
                if dst_backend is not None:
                    dst_backend.put(t.page, new)
                if src_backend is not None:
                    src_backend.pop(t.page)
                if t.dst > t.src:
                    self._counters[t.src].demotions += 1
                else:
                    self._counters[t.dst].promotions += 1
                    # a promotion announces a use: stamp it now, or the page would be the
                    # freshest victim of the very make-room that follows
                    self._index.touch(t.page, time.time(), count=False)
            else:
                self._index.release(t.dst, size, t.page.namespace)
            self._state_lock.notify_all()
        return ok

    def abort_move(self, move: PreparedMove, reserved: int) -> None:
        """Cancel a move; the page stays resident where it was, ``reserved`` bytes go back."""
        with self._state_lock:
            if reserved:
                self._index.release(move.ticket.dst, reserved, move.ticket.page.namespace)
            self._index.abort_move(move.ticket)
            self._state_lock.notify_all()

    def drop_moving(self, move: PreparedMove, reason: EvictionReason | None) -> bool:
        """The source bytes of a move turned out gone or corrupt: the page leaves the cache
        (counted by ``reason``). False if it changed meanwhile (nothing dropped)."""
        t = move.ticket
        with self._state_lock:
            rec = self._index.get(t.page)
            if rec is None or rec.version != t.version:
                return False
            self._index.remove(t.page)
            backend = self._memory[t.src]
            if backend is not None:
                backend.pop(t.page)
            if reason is not None:
                self._counters[t.src].evictions[reason.value] += 1
            self._state_lock.notify_all()
        return True

    # -- removing pages -----------------------------------------------------------------------

    def evict(self, pid: PageId, tier: int, reason: EvictionReason,
              only: Stored | None = None) -> tuple[bool, str | None]:
        """Drop a resident page of ``tier``, counted by ``reason``; with ``only``, just if that
        is what the tier holds for ``pid``. (evicted, its Redis write token to delete)."""
        with self._state_lock:
            rec = self._index.get(pid)
            if rec is None or rec.state is not PageState.RESIDENT or rec.tier != tier:
                return False, None
            backend = self._memory[tier]
            if only is not None and (backend is None or backend.get(pid) is not only):
                return False, None
            self._index.remove(pid)
            if backend is not None:
                backend.pop(pid)
            self._counters[tier].evictions[reason.value] += 1
            self._state_lock.notify_all()
        return True, rec.remote_token

    def delete(self, pids: Sequence[PageId]) -> list[PageId]:
        """Remove pages in any state from every tier of this index; the ones removed (their
        shared Redis copies are deleted by key, whoever wrote them: see transfer)."""
        removed: list[PageId] = []
        with self._state_lock:
            for pid in pids:
                rec = self._index.remove(pid)
                if rec is None:
                    continue
                if rec.state is not PageState.PLACING:
                    backend = self._memory[rec.tier]
                    if backend is not None:
                        backend.pop(pid)
                    self._counters[rec.tier].evictions[EvictionReason.DELETED.value] += 1
                removed.append(pid)
            self._state_lock.notify_all()
        return removed

    # -- reading ------------------------------------------------------------------------------

    def read_ref(self, pid: PageId) -> ReadRef | None:
        """A reader's reference to ``pid``; None if absent or still being placed."""
        with self._state_lock:
            rec = self._index.get(pid)
            if rec is None or rec.state is PageState.PLACING:
                return None
            backend = self._memory[rec.tier]
            data = backend.get(pid) if backend is not None else None
            return ReadRef(data, rec.tier, rec.precision, rec.version)

    def drop_if_unchanged(self, pid: PageId, ref: ReadRef) -> bool:
        """A Redis page that ``ref`` pointed at is gone from Redis: forget it, if it is still
        resident there at that version (deleted by another daemon). False if it moved or
        changed meanwhile (read again)."""
        with self._state_lock:
            rec = self._index.get(pid)
            if (rec is not None and rec.version == ref.version and rec.tier == ref.tier
                    and rec.state is PageState.RESIDENT):
                self._index.remove(pid)
                self._state_lock.notify_all()
                return True
        return False

    def in_memory(self, pids: Iterable[PageId]) -> list[HeldPage]:
        """The pages of ``pids`` whose bytes a memory tier holds (resident or mid-move; not
        absent, being placed, or only in the Redis tier): their stored form and metadata."""
        out = []
        with self._state_lock:
            for pid in dict.fromkeys(pids):
                rec = self._index.get(pid)
                if rec is None or rec.state is PageState.PLACING:
                    continue
                backend = self._memory[rec.tier]
                data = backend.get(pid) if backend is not None else None
                if data is not None:
                    out.append(HeldPage(pid, data, rec.precision, rec.nbytes,
                                        rec.chain_position))
        return out

    def residence(self, pid: PageId) -> tuple[int, bool] | None:
        """The tier of ``pid`` and whether it is resident (not placing or moving); None if
        absent."""
        with self._state_lock:
            rec = self._index.get(pid)
            return None if rec is None else (rec.tier, rec.state is PageState.RESIDENT)

    def unknown(self, pids: Iterable[PageId]) -> list[PageId]:
        """The pages of ``pids`` this index does not know."""
        with self._state_lock:
            return [p for p in pids if self._index.get(p) is None]

    def pages_in(self, tier: int) -> list[PageId]:
        with self._state_lock:
            return self._index.pages_in(tier)

    def page_view(self, pid: PageId) -> PageView | None:
        with self._state_lock:
            rec = self._index.get(pid)
            meta = self._index.meta(pid, self.names)
            if rec is None or meta is None:
                return None
            return PageView(rec.state, rec.precision, rec.nbytes, rec.stored_bytes, meta)

    # -- lent memory --------------------------------------------------------------------------

    def held_at(self, pid: PageId, lo: int, hi: int) -> tuple[int, Page] | None:
        """The tier and page of ``pid`` if it is resident in host memory with its bytes at
        addresses [lo, hi) (lent from a client's segment), else None."""
        with self._state_lock:
            rec = self._index.get(pid)
            if rec is None or rec.state is not PageState.RESIDENT:
                return None
            backend = self._memory[rec.tier]
            d = backend.get(pid) if backend is not None else None
        if isinstance(d, Page) and d.k.is_cpu and lo <= d.k.data_ptr() < hi:
            return rec.tier, d
        return None

    def swap_memory(self, pid: PageId, tier: int, old: Page, new: Page) -> bool:
        """Keep ``new``, a copy of ``old``, if ``old`` is still what ``tier`` holds and the
        page is not mid-move (a move would commit its own reference to ``old``)."""
        with self._state_lock:
            rec, backend = self._index.get(pid), self._memory[tier]
            if rec is None or rec.state is not PageState.RESIDENT or rec.tier != tier or \
                    backend is None or backend.get(pid) is not old:
                return False
            backend.put(pid, new)
            return True

    # -- the shared Redis tier's index --------------------------------------------------------

    def version(self) -> int:
        """The version the next residence change gets (orders a scan against commits)."""
        with self._state_lock:
            return self._index.version

    def ask_redis(self, pids: Iterable[PageId]) -> tuple[list[PageId], dict[PageId, int]]:
        """The keys of ``pids`` to ask Redis about: those this index does not know, and those
        resident in the Redis tier (also in the map, with the version of their entry, for
        :meth:`drop_remote_unchanged`). Pages in memory, or mid-move, are not asked about."""
        ask: list[PageId] = []
        known: dict[PageId, int] = {}
        with self._state_lock:
            for pid in dict.fromkeys(pids):
                rec = self._index.get(pid)
                if rec is None:
                    ask.append(pid)
                elif rec.tier == self.redis_tier and rec.state is PageState.RESIDENT:
                    ask.append(pid)
                    known[pid] = rec.version
        return ask, known

    def adopt_remote(self, found: Iterable[tuple[PageId, RemoteMeta]], now: float) -> int:
        """Index pages found in the Redis tier that this index does not know; how many."""
        assert self.redis_tier is not None
        added = 0
        with self._state_lock:
            for pid, meta in found:
                added += self._index.add_resident(pid, self.redis_tier, meta.nbytes,
                                                  meta.stored_bytes, meta.precision,
                                                  meta.chain_position, now, meta.token)
        return added

    def adopt_if_room(self, pid: PageId, meta: RemoteMeta, now: float) -> bool | None:
        """Index one page a scan found in the Redis tier, unless the tier's view would pass
        its high watermark (None: full, stop adopting); whether it was added (False: known)."""
        t = self.redis_tier
        assert t is not None
        with self._state_lock:
            if self._index.used(t) + meta.stored_bytes > self._limits[t].high_bytes:
                return None
            return self._index.add_resident(pid, t, meta.nbytes, meta.stored_bytes,
                                            meta.precision, meta.chain_position, now,
                                            meta.token)

    def drop_remote_unchanged(self, gone: Iterable[tuple[PageId, int]]) -> list[PageId]:
        """Forget pages whose Redis key turned out gone, each if it is still resident in the
        Redis tier at the version given (an entry adopted or moved meanwhile stays); the pages
        forgotten."""
        t = self.redis_tier
        lost = []
        with self._state_lock:
            for pid, version in gone:
                rec = self._index.get(pid)
                if (rec is not None and rec.version == version and rec.tier == t
                        and rec.state is PageState.RESIDENT):
                    self._index.remove(pid)
                    lost.append(pid)
            if lost:
                self._state_lock.notify_all()
        return lost

    def drop_vanished_remote(self, seen: set[PageId], since: int) -> list[PageId]:
        """Forget the Redis tier's resident pages, indexed before version ``since``, that a
        scan did not see (counted as evictions, ``remote_down``); the pages forgotten."""
        t = self.redis_tier
        assert t is not None
        lost = []
        with self._state_lock:
            for pid in self._index.pages_in(t):
                rec = self._index.get(pid)
                if (rec is not None and pid not in seen and rec.version < since
                        and rec.state is PageState.RESIDENT):
                    self._index.remove(pid)
                    self._counters[t].evictions[EvictionReason.REMOTE_DOWN.value] += 1
                    lost.append(pid)
        return lost

    # -- accesses and figures -----------------------------------------------------------------

    def count_puts(self, pids: Sequence[PageId], stored: int) -> list[tuple[int, str | None]]:
        """Count a put call; per page its access sequence number and the tier it is seen in."""
        with self._state_lock:
            self._puts += len(pids)
            self._puts_stored += stored
            out = []
            for pid in pids:
                vt = self._index.visible_tier(pid)
                out.append((self._index.next_seq(), self.names[vt] if vt is not None else None))
            return out

    def count_gets(self, pids: Sequence[PageId], hits: Sequence[int | None],
                   now: float) -> list[int]:
        """Count a get call: each page a hit of tier ``hits[i]`` (stamped: recency and count)
        and a miss of every tier above it, or (None) a miss of every tier. Per page its access
        sequence number."""
        n = len(self.specs)
        with self._state_lock:
            self._gets += len(pids)
            seqs = []
            for pid, hit in zip(pids, hits, strict=True):
                for t in range(n if hit is None else hit):
                    self._counters[t].misses += 1
                seq = None
                if hit is not None:
                    self._counters[hit].hits += 1
                    self._get_hits += 1
                    seq = self._index.touch(pid, now, count=True)
                seqs.append(seq or self._index.next_seq())
            return seqs

    def lookup(self, pids: Sequence[PageId]) -> list[tuple[int, str | None]]:
        """Per page its access sequence number and the tier that answers for it (None:
        absent, being placed, or in a tier that is down)."""
        with self._state_lock:
            out = []
            for pid in pids:
                t = self._index.visible_tier(pid)
                name = None if t is None or not self.tier_up(t) else self.names[t]
                out.append((self._index.next_seq(), name))
            return out

    def touch(self, pids: Sequence[PageId], now: float) -> list[int | None]:
        """Stamp recency (not the count) of pages announced for use; their sequence numbers
        (None for a page gone meanwhile)."""
        with self._state_lock:
            return [self._index.touch(pid, now, count=False) for pid in pids]

    def tier_stats(self, tier: int) -> TierStats:
        with self._state_lock:
            return self._tier_stats(tier)

    def stats(self) -> tuple[tuple[TierStats, ...], Totals]:
        """Every tier's figures and the call totals, in one consistent snapshot."""
        with self._state_lock:
            tiers = tuple(self._tier_stats(t) for t in range(len(self.specs)))
            return tiers, Totals(self._gets, self._get_hits, self._puts, self._puts_stored)

    def _tier_stats(self, tier: int) -> TierStats:
        spec, lim, c = self.specs[tier], self._limits[tier], self._counters[tier]
        return TierStats(
            name=spec.name, medium=spec.medium.value, codec=spec.codec.value,
            capacity_bytes=lim.capacity_bytes, high_watermark=lim.high_watermark,
            low_watermark=lim.low_watermark, pages=self._index.page_count(tier),
            bytes=self._index.used(tier), hits=c.hits, misses=c.misses, demotions=c.demotions,
            promotions=c.promotions, evictions=dict(c.evictions), up=self.tier_up(tier),
        )

    def snapshot(self) -> list[TierContents]:
        """Every tier's contents at one instant (a copy: checks and debugging only)."""
        with self._state_lock:
            out = []
            for t, backend in enumerate(self._memory):
                pages = tuple(self._index.pages_in(t))
                states = {p: rec.state for p in pages if (rec := self._index.get(p)) is not None}
                held = None if backend is None else MappingProxyType(backend.copy())
                out.append(TierContents(pages, MappingProxyType(states), self._index.used(t),
                                        self._index.reserved(t), held))
            return out
