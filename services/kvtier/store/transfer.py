"""Moving bytes between tiers: the copies, encodes, decodes and Redis round trips of the store,
each between two transactions of the engine (:mod:`kvtier.store.engine`), never under its lock.

- :func:`place` puts a new page into the first memory tier the policy admits it into (default:
  the hot tier; never straight to Redis): copied or encoded outside the lock, made visible with
  one commit. If the tier is at its hard capacity, :func:`reserve` makes room synchronously by
  pushing the tier's own victims down (:func:`push_down`), so a put does not fail while lower
  tiers have room. A page larger than the whole tier is CapacityExhausted. A namespace with a
  quota (``KVTIER_QUOTAS``) that would pass it makes that room among its own pages only
  (:func:`make_quota_room`); a page larger than its quota is CapacityExhausted.
- :func:`move` moves one page to another tier, up or down: begin, convert, reserve, (write to
  Redis), commit. It never fails half-way: it either commits (the page is in the target tier,
  the source's memory is released; a Redis copy stays, as the shared tier keeps what it has)
  or leaves the page where it was, unless the source's bytes turned out to be gone or corrupt,
  when the page leaves the cache and is never served.
- :func:`read_page` hands a reader a private host copy (decoded if need be), fetching Redis
  pages outside the lock; :func:`delete` removes pages from the shared Redis tier too, and
  :func:`evict` a corrupt copy there, after their transaction (the shared tier is a cache of
  its own: see :mod:`kvtier.store.remote_index`); :func:`copy_out_lent` gives pages lent from
  a client's segment memory of their own; :func:`drain` writes the memory tiers to Redis.
- The device tier's pool (:mod:`kvtier.store.device_transfer`): a put into it is copied into a
  block of the pool; :func:`read_device` hands a pool page out as it lies (CUDA IPC);
  :func:`make_pool_room` pushes pages down until a block of a given size is free.

When to move (watermarks, prefetch) is :mod:`kvtier.store.mover`'s decision, not this module's.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from kvtier.errors import BackendUnavailable, CapacityExhausted, CorruptPage, InternalError
from kvtier.store.engine import PreparedMove, Room, TierEngine
from kvtier.store.policy import PageMeta
from kvtier.store.redis_tier import RedisTier, RemoteMeta
from kvtier.store.tiers import Promoted, Stored, adoptable, blob_of, own_copy, stored_size
from kvtier.types import EvictionReason, Medium, Page, PageId, Precision

log = logging.getLogger(__name__)


class MoveResult(enum.Enum):
    MOVED = "moved"
    BUSY = "busy"  # absent from the index, mid-move, or already in the target tier
    GONE = "gone"  # vanished from its backend (deleted elsewhere, corrupt): dropped
    NO_ROOM = "no_room"
    TOO_BIG = "too_big"  # larger than the whole target tier
    DOWN = "down"  # Redis was needed and is down


# -- placing a new page -------------------------------------------------------------------------

def choose_tier(e: TierEngine, pid: PageId, page: Page, chain: int) -> int:
    """The first memory tier the policy admits a new page into (the last one otherwise)."""
    memory_tiers = [i for i, spec in enumerate(e.specs) if spec.medium is not Medium.REDIS]
    for i in memory_tiers[:-1]:
        meta = PageMeta(pid, e.names[i], i, page.nbytes, 0, 0, time.time(), 0, chain)
        try:
            if e.policy.admit(meta, e.names[i]):
                return i
        except Exception:
            log.exception("policy %s failed in admit(); admitting", e.policy.name)
            return i
    return memory_tiers[-1]


def check_fits(e: TierEngine, page: Page, tier: int) -> None:
    """CapacityExhausted if ``page`` is larger than the whole tensor tier ``tier``."""
    spec, cap = e.specs[tier], e.limits(tier).capacity_bytes
    if spec.holds_tensors and page.nbytes > cap:
        raise CapacityExhausted(
            f"page is {page.nbytes} bytes, larger than the whole {spec.name!r} tier "
            f"({cap} bytes)", field="page")


def place(e: TierEngine, pid: PageId, page: Page, tier: int, chain_position: int,
          now: float, owned: bool = False) -> bool:
    """Store a new page in ``tier``; False if the key exists. Makes room synchronously.
    ``owned``: nobody else holds the page's memory, so a tier on its device adopts it.

    Raises CapacityExhausted if the page can never fit the tier, or room could not be made
    within ``room_timeout_s``.
    """
    spec = e.specs[tier]
    if spec.medium is Medium.REDIS:
        raise InternalError(f"pages are placed in memory tiers, not in {spec.name!r}",
                            field="tier")
    check_fits(e, page, tier)
    version = e.begin_place(pid, tier, page.nbytes, chain_position, now)
    if version is None:
        return False
    size = 0
    reserved = False
    try:
        data: Stored
        dev = e.device_transfer
        if dev is not None and dev.tier == tier:
            data, prec = dev.admit(page), Precision.FULL  # into the device pool
        elif spec.device is not None:
            data = page if owned and adoptable(page, spec.device) else own_copy(page, spec.device)
            prec = Precision.FULL
        else:
            data, prec = e.converter.to_tier(page, spec)
        size = stored_size(data)
        cap = e.limits(tier).capacity_bytes
        if size > cap:
            raise CapacityExhausted(
                f"page is {size} bytes stored, larger than the whole {spec.name!r} tier "
                f"({cap} bytes)", field="page")
        room = reserve(e, tier, size, pid)
        if room is Room.OVER_QUOTA:
            e.count_quota_refusal()
            raise CapacityExhausted(
                f"page is {size} bytes stored in tier {spec.name!r}, more than the quota of "
                f"namespace {pid.namespace!r} allows there", field="page")
        if room is Room.QUOTA:
            e.count_quota_refusal()
            raise CapacityExhausted(
                f"namespace {pid.namespace!r} is at its quota and could not make {size} bytes "
                f"of room among its own pages in tier {spec.name!r} within "
                f"{e.room_timeout_s} s", field="page")
        if room is not Room.RESERVED:
            raise CapacityExhausted(
                f"could not make {size} bytes of room in tier {spec.name!r} within "
                f"{e.room_timeout_s} s", field="page")
        reserved = True
        committed = e.commit_place(pid, version, tier, data, size, prec)
    except BaseException:
        e.abort_place(pid, version, tier, size if reserved else 0)
        raise
    if committed:
        drop_if_orphan(e, pid, tier)
    return True


# -- making room --------------------------------------------------------------------------------

def reserve(e: TierEngine, tier: int, size: int, pid: PageId | None = None,
            credit: int | None = 0) -> Room:
    """Reserve ``size`` bytes in ``tier`` for ``pid``, pushing victims down until they fit:
    the tier's (any namespace's) while the tier is full, ``pid``'s namespace's own while its
    quota is in the way (``credit``: what the caller's move frees of that quota; None for a
    demotion, see :meth:`TierEngine.reserve`).

    RESERVED, or why not: TOO_BIG / OVER_QUOTA (never fits), FULL / QUOTA when
    ``room_timeout_s`` passed without this caller managing to move anything (every candidate
    busy in other moves, none settling).
    """
    deadline = time.monotonic() + e.room_timeout_s
    while True:
        room = e.reserve(tier, size, pid, credit)
        if room in (Room.RESERVED, Room.TOO_BIG, Room.OVER_QUOTA):
            return room
        if room is Room.QUOTA and pid is not None:
            progressed = make_quota_room(e, pid.namespace, tier, size, credit)
        else:
            progressed = make_room(e, tier, size)
        if progressed:
            deadline = time.monotonic() + e.room_timeout_s  # progress: keep going
        elif time.monotonic() >= deadline:
            return room
        if room is Room.FULL:
            e.wait_for_room(tier, size)
        else:
            e.wait_for_change()


def make_room(e: TierEngine, tier: int, size: int) -> bool:
    """Push ``tier``'s lowest-scored pages down (or out) until ``size`` more bytes fit."""
    progressed = False
    for pid in e.victims(e.candidates(tier)):
        if e.fits(tier, size):
            return True
        progressed |= push_down(e, pid, tier)
    return progressed


def make_quota_room(e: TierEngine, ns: str, tier: int, size: int,
                    credit: int | None = 0) -> bool:
    """Push ``ns``'s own lowest-scored pages down (or out) until ``size`` more bytes of it fit
    ``tier`` within its quota; another namespace's pages are never touched."""
    progressed = False
    for t in e.quota_victim_tiers(ns, tier, size):
        for pid in e.victims(e.candidates(t, ns)):
            if e.quota_fits(ns, tier, size, credit):
                return True
            progressed |= push_down(e, pid, t)
    return progressed


def push_down(e: TierEngine, pid: PageId, tier: int, *, evict_if_down: bool = True) -> bool:
    """Move a page down from ``tier`` (evicting it from the last tier); True on progress.

    It goes to the next tier, or further down if it can never fit there. With the Redis
    tier down it is evicted (reason ``remote_down``) only under hard-limit pressure
    (``evict_if_down``); the watermark mover leaves it waiting instead.
    """
    if tier == e.last:
        return evict(e, pid, tier, EvictionReason.CAPACITY)
    for dst in range(tier + 1, e.last + 1):
        result = move(e, pid, dst) if e.tier_up(dst) else MoveResult.DOWN
        if result is MoveResult.TOO_BIG:
            continue
        if result is MoveResult.DOWN:
            return evict_if_down and evict(e, pid, tier, EvictionReason.REMOTE_DOWN)
        return result in (MoveResult.MOVED, MoveResult.GONE)
    return evict(e, pid, tier, EvictionReason.CAPACITY)  # fits in no tier below


# -- moving -------------------------------------------------------------------------------------

def move(e: TierEngine, pid: PageId, dst: int) -> MoveResult:
    """Move one page to tier ``dst`` (up or down): begin, convert, reserve, commit."""
    m = e.begin_move(pid, dst)
    if m is None:
        return MoveResult.BUSY
    data = m.data
    size = 0
    reserved = False
    token: str | None = None
    try:
        if not e.tier_up(dst):
            raise BackendUnavailable("redis tier is down", field="redis")
        if data is None:
            got = redis_or_raise(e).read(pid)
            if got is None:
                _drop(e, m, None)
                return MoveResult.GONE
            data = got[0]
        try:
            new, prec = e.converter.to_tier(data, e.specs[dst])
        except CorruptPage:  # includes NonFinitePage: a lent page its client changed
            if _drop(e, m, EvictionReason.CORRUPT) and m.src_token is not None:
                redis_delete_quietly(e, [(pid, m.src_token)])
            return MoveResult.GONE
        size = stored_size(new)
        if size > e.limits(dst).capacity_bytes:
            e.abort_move(m, 0)
            return MoveResult.TOO_BIG
        # a promotion: the source's bytes leave the namespace's memory quota when it commits
        credit = (stored_size(m.data) if m.data is not None else 0) if dst < m.ticket.src \
            else None
        room = reserve(e, dst, size, pid, credit)
        if room is not Room.RESERVED:
            e.abort_move(m, 0)
            return (MoveResult.TOO_BIG if room in (Room.TOO_BIG, Room.OVER_QUOTA)
                    else MoveResult.NO_ROOM)
        reserved = True
        if dst == e.redis_tier:
            token = redis_or_raise(e).write(
                pid, blob_of(new), RemoteMeta(min(m.precision, prec), m.nbytes, size,
                                              m.chain_position))
    except BackendUnavailable:
        e.abort_move(m, size if reserved else 0)
        return MoveResult.DOWN
    except BaseException:
        e.abort_move(m, size if reserved else 0)
        raise
    ok = e.commit_move(m, new, size, prec, token)
    # a page promoted out of the Redis tier leaves its copy there: the shared tier is a cache
    # of its own, and other daemons read it (kvtier.store.remote_index)
    if not ok and token is not None:
        redis_delete_quietly(e, [(pid, token)])  # the page was deleted meanwhile
    if ok:
        drop_if_orphan(e, pid, dst)
    return MoveResult.MOVED if ok else MoveResult.GONE


def drop_if_orphan(e: TierEngine, pid: PageId, tier: int) -> bool:
    """Evict ``pid`` (reason ``orphan``) if its predecessor in the chain has left the cache
    while it was being placed or moved (an eviction's sweep skips pages in flight). Only
    without a shared Redis tier: there a page this daemon no longer holds may still be read
    from Redis, so nothing is an orphan for sure."""
    if e.redis is not None:
        return False
    parent = e.chains.parent(pid)
    if parent is None or e.residence(parent) is not None:
        return False
    return evict(e, pid, tier, EvictionReason.ORPHAN)


def _drop(e: TierEngine, m: PreparedMove, reason: EvictionReason | None) -> bool:
    """The source bytes are gone or corrupt: the page leaves the cache (never served)."""
    if not e.drop_moving(m, reason):
        return False
    e.forget([m.ticket.page])
    return True


# -- removing pages -----------------------------------------------------------------------------

def evict(e: TierEngine, pid: PageId, tier: int, reason: EvictionReason,
          only: Stored | None = None, *, sweep: bool = True) -> bool:
    """Drop a resident page of ``tier`` from the cache, counted by ``reason``; with
    ``only``, just if that is what the tier holds for ``pid``. With ``sweep``, a page that
    leaves a memory tier takes its resident successors in the chain with it (reason
    ``orphan``): no prefix can reach them now."""
    evicted, token = e.evict(pid, tier, reason, only)
    if not evicted:
        return False
    if token is not None and reason is EvictionReason.CORRUPT:
        # the shared tier is a cache of its own (kvtier.store.remote_index): leaving this
        # daemon's view, a page stays there for the others; only a corrupt copy goes
        redis_delete_quietly(e, [(pid, token)])
    # Leaving the Redis tier's view, a page stays in Redis (see above), reachable: no orphans.
    orphans = e.chains.descendants(pid) if sweep and tier != e.redis_tier else []
    e.forget([pid])
    for child in orphans:  # prefix-closed: nothing is kept without its predecessor
        where = e.residence(child)
        if where is not None and where[1]:
            evict(e, child, where[0], EvictionReason.ORPHAN, sweep=False)
    return True


def delete(e: TierEngine, pids: Sequence[PageId]) -> int:
    """Remove pages from every tier, and from the shared Redis tier whoever wrote them
    (a delete that cannot reach its shard now is sent later: see redis_tier)."""
    removed = e.delete(pids)
    known = set(removed)
    extra = 0
    if e.redis is not None:
        # the shared copy goes whatever its token: a page this daemon promoted left it
        # there, and another daemon may have written the key since
        extra = len(e.redis.delete(list(dict.fromkeys(pids))) - known)
    e.forget(removed)
    return len(removed) + extra


# -- reading ------------------------------------------------------------------------------------

def read(e: TierEngine, pid: PageId) -> tuple[Stored, int, Precision] | None:
    """The stored form of a page, its tier and precision; None for a miss.

    Memory tiers hand out their reference under the lock. A Redis page is fetched outside
    it; if the key is gone because a move committed meanwhile, the read retries against
    the index; if it is gone for good (deleted by another daemon), the page is forgotten.
    """
    for _ in range(4):
        ref = e.read_ref(pid)
        if ref is None:
            return None
        if e.specs[ref.tier].medium is not Medium.REDIS:
            return (ref.data, ref.tier, ref.precision) if ref.data is not None else None
        if e.redis is None or not e.redis.up:
            return None
        try:
            got = e.redis.read(pid)
        except BackendUnavailable:
            return None
        if got is not None:
            return got[0], ref.tier, min(ref.precision, got[1].precision)
        if e.drop_if_unchanged(pid, ref):
            return None
    return None


def read_page(e: TierEngine, pid: PageId, copy_tensors: bool = True,
              fetched: tuple[bytes, Precision] | None = None,
              ) -> tuple[Page, int, Precision] | None:
    """The page itself on the host, its tier and precision; None for a miss (a corrupt blob
    is evicted and answers as a miss). Decoded pages are fresh memory; an uncompressed host
    page is a private copy unless ``copy_tensors`` is False (then the stored tensors, which
    are never written in place). ``fetched``: its blob and precision, fetched from the Redis
    tier already (:func:`kvtier.store.remote_index.fetch`), served as the Redis tier's."""
    got = read(e, pid) if fetched is None or e.redis_tier is None else (
        fetched[0], e.redis_tier, fetched[1])
    if got is None:
        return None
    data, tier, precision = got
    try:
        return to_page(e, data, copy_tensors), tier, precision
    except CorruptPage:
        if not evict(e, pid, tier, EvictionReason.CORRUPT):
            log.warning("corrupt page seen mid-move in tier %s", e.names[tier])
        return None


def to_page(e: TierEngine, data: Stored, copy_tensors: bool) -> Page:
    """``data`` as a page on the host: the stored tensors themselves when ``copy_tensors`` is
    False and they are host tensors outside the device pool (a view of a pool page handed out
    would not keep its block: a pool in host memory, as tests configure it, is the case),
    else a copy or a decode."""
    if isinstance(data, Promoted):
        data = data.page
    if isinstance(data, Page) and not copy_tensors and data.k.device.type == "cpu" and \
            not pooled(e, data):
        return data
    return e.converter.to_host(data)


# -- the device pool ----------------------------------------------------------------------------

def pooled(e: TierEngine, page: Page) -> bool:
    """Whether ``page`` lives in the device tier's pool."""
    dev = e.device_transfer
    return dev is not None and dev.pool.holds(page.k)


def read_device(e: TierEngine, pid: PageId) -> tuple[Page, int, Precision] | None:
    """A page of the device pool as the tier holds it (no copy: never write it), its tier and
    precision; None for a miss or a page that is not in the pool (a miss of the device path,
    to be read with :func:`read_page`)."""
    ref = e.read_ref(pid)
    if ref is None or ref.data is None:
        return None
    data = ref.data.page if isinstance(ref.data, Promoted) else ref.data
    if not isinstance(data, Page) or not pooled(e, data):
        return None
    return data, ref.tier, ref.precision


def make_pool_room(e: TierEngine, nbytes: int) -> bool:
    """Push the device tier's lowest-scored pages down until its pool has a free extent of
    ``nbytes``; False when there is no pool, the tier runs out of pages to push, or the room
    timeout passes. Room by the tier's byte count is not enough: the pool can be fragmented,
    or a reader may still hold a block."""
    dev = e.device_transfer
    if dev is None:
        return False

    def fits() -> bool:
        return dev.pool.stats().largest_free_bytes >= nbytes

    deadline = time.monotonic() + e.room_timeout_s
    while time.monotonic() < deadline:
        if fits():
            return True
        candidates = e.candidates(dev.tier)
        if not candidates:
            return False
        progressed = False
        for pid in e.victims(candidates):
            progressed |= push_down(e, pid, dev.tier)
            if fits():
                return True
        if not progressed:
            e.wait_for_change()  # every candidate busy in other moves: let them settle
    return fits()


# -- lent pages, draining -----------------------------------------------------------------------

def copy_out_lent(e: TierEngine, pids: Iterable[PageId], lo: int, hi: int,
                  copy: Callable[[Page], Page | None]) -> int:
    """Give each page of ``pids`` whose bytes lie at addresses [lo, hi) (lent from a
    client's segment) memory of its own: ``copy(page)``, or None for a page found corrupt,
    which is dropped. Returns how many pages moved; pages gone, moved elsewhere or mid-move
    meanwhile are left alone (their lent memory goes back when their last reader lets go)."""
    moved = 0
    for pid in pids:
        held = e.held_at(pid, lo, hi)
        if held is None:
            continue
        tier, page = held
        new = copy(page)
        if new is None:
            evict(e, pid, tier, EvictionReason.CORRUPT, only=page)
        elif e.swap_memory(pid, tier, page, new):
            moved += 1
    return moved


def drain(e: TierEngine) -> int:
    """Write every memory-tier page to the Redis tier; the number written."""
    if e.redis_tier is None or e.redis is None or not e.redis.up:
        return 0
    moved = 0
    for t in range(e.redis_tier):
        for pid in e.pages_in(t):
            moved += move(e, pid, e.redis_tier) is MoveResult.MOVED
    return moved


# -- Redis plumbing -----------------------------------------------------------------------------

def redis_or_raise(e: TierEngine) -> RedisTier:
    if e.redis is None:
        raise BackendUnavailable("no redis tier is configured", field="redis")
    return e.redis


def redis_delete_quietly(e: TierEngine, items: list[tuple[PageId, str]]) -> None:
    """Delete Redis copies whose write token is unchanged; an outage just skips it."""
    if e.redis is None or not e.redis.up:
        return
    try:
        e.redis.delete_if(items)
    except BackendUnavailable:
        pass
