"""The tier engine: the tier stack's state (page index, memory backends, counters) under one
lock, and what works on it: making room, evicting, reading, deleting. New pages are placed by
:mod:`kvtier.store.placement`, moved between tiers by :mod:`kvtier.store.moves`.

Locking: one condition variable (``cond``) guards the page index, the memory backends and the
counters. Every step that costs time — copying to the device, encoding, decoding, transcoding,
Redis round trips, asking the policy — runs outside it. A move is::

    prepare  (lock)     index.begin_move: RESIDENT -> MOVING; take a reference to the source
    copy     (no lock)  convert to the target tier's form; reserve room there (making room
                        by pushing the target's own victims further down if needed); write
                        it when the target is Redis
    commit   (lock)     index.commit_move: switch tier, swap the bytes between the backends,
                        counters; a page deleted meanwhile fails the commit and its copy is
                        dropped

Readers take the stored reference under the lock, so until the commit they read the source and
after it the target — never a torn page. Stored tensors and blobs are never mutated in place.
Nothing here logs per page.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from kvtier.config import Settings
from kvtier.errors import BackendUnavailable
from kvtier.store import device_transfer, moves
from kvtier.store.index import PageIndex, PageState
from kvtier.store.moves import MoveResult
from kvtier.store.policy import LRUPolicy, PageMeta, Policy
from kvtier.store.redis_tier import RedisTier
from kvtier.store.stats import CodecClock, TierCounters, TierStats
from kvtier.store.tiers import (
    Converter, MemoryBackend, Stored, TierLimits, TierSpec, build_specs, resolve_device,
)
from kvtier.types import EvictionReason, Medium, Page, PageId, Precision

log = logging.getLogger(__name__)

WAIT_SLICE_S = 0.02


class TierEngine:
    """Pages, tiers and moves. Thread-safe; see the module docstring for the lock design."""

    def __init__(self, settings: Settings, policy: Policy, room_timeout_s: float = 5.0) -> None:
        tiers = list(settings.tiers)
        if tiers[-1].medium is Medium.REDIS and settings.redis.url is None:
            log.info("no redis url configured: running without the %r tier", tiers[-1].name)
            tiers = tiers[:-1]
        self.specs: list[TierSpec] = build_specs(tiers, resolve_device(settings.device))
        self.names: tuple[str, ...] = tuple(s.name for s in self.specs)
        self.limits: list[TierLimits] = [TierLimits.of(c) for c in tiers]
        self.cond = threading.Condition(threading.Lock())
        self.index = PageIndex(len(self.specs))
        self.memory: list[MemoryBackend | None] = [
            None if s.medium is Medium.REDIS else MemoryBackend(s) for s in self.specs
        ]
        self.redis: RedisTier | None = None
        self.redis_tier: int | None = None
        if self.specs[-1].medium is Medium.REDIS and settings.redis.url is not None:
            self.redis = RedisTier(settings.redis, settings.redis.url)
            self.redis_tier = len(self.specs) - 1
        self.counters = [TierCounters() for _ in self.specs]
        self.clock = CodecClock()
        self.converter = Converter(settings.codec, self.clock)
        self.transfer = device_transfer.for_engine(self, settings.device_pool_bytes)
        if self.transfer is not None:
            self.converter.device_moves = self.transfer.to_tier
        self.policy: Policy = policy
        self.room_timeout_s = room_timeout_s
        self._fallback = LRUPolicy()
        self._policy_failed = False

    # -- small helpers ------------------------------------------------------------------------

    @property
    def last(self) -> int:
        return len(self.specs) - 1

    def tier_up(self, tier: int) -> bool:
        return tier != self.redis_tier or (self.redis is not None and self.redis.up)

    def victims(self, candidates: Sequence[PageMeta]) -> list[PageId]:
        """All candidates in the policy's demotion order; LRU if the policy fails."""
        try:
            order = self.policy.victims(candidates, len(candidates))
            self._policy_failed = False
            return order
        except Exception:
            if not self._policy_failed:
                log.exception("policy %s failed to rank victims; using LRU", self.policy.name)
            self._policy_failed = True
            return self._fallback.victims(candidates, len(candidates))

    def forget(self, pages: Sequence[PageId]) -> None:
        if not pages:
            return
        try:
            self.policy.forget(pages)
        except Exception:
            log.exception("policy %s failed in forget()", self.policy.name)

    # -- making room ----------------------------------------------------------------------------

    def reserve(self, tier: int, size: int) -> bool:
        """Reserve ``size`` bytes in ``tier``, pushing its victims down until they fit.

        False when the size exceeds the tier, or when ``room_timeout_s`` passes without this
        caller managing to move anything (every candidate busy in other moves, none settling).
        """
        deadline = time.monotonic() + self.room_timeout_s
        while True:
            with self.cond:
                cap = self.limits[tier].capacity_bytes
                if size > cap:
                    return False
                if self.index.reserve(tier, size, cap):
                    return True
            if self.make_room(tier, size):
                deadline = time.monotonic() + self.room_timeout_s  # progress: keep going
            elif time.monotonic() >= deadline:
                return False
            with self.cond:
                if not self.index.fits(tier, size, self.limits[tier].capacity_bytes):
                    self.cond.wait(WAIT_SLICE_S)

    def make_room(self, tier: int, size: int) -> bool:
        """Push ``tier``'s lowest-scored pages down (or out) until ``size`` more bytes fit."""
        with self.cond:
            candidates = self.index.resident_metas(tier, self.names)
        progressed = False
        for pid in self.victims(candidates):
            with self.cond:
                if self.index.fits(tier, size, self.limits[tier].capacity_bytes):
                    return True
            progressed |= self.push_down(pid, tier)
        return progressed

    def push_down(self, pid: PageId, tier: int, *, evict_if_down: bool = True) -> bool:
        """Move a page down from ``tier`` (evicting it from the last tier); True on progress.

        It goes to the next tier, or further down if it can never fit there. With the Redis
        tier down it is evicted (reason ``remote_down``) only under hard-limit pressure
        (``evict_if_down``); the watermark mover leaves it waiting instead.
        """
        if tier == self.last:
            return self.evict(pid, tier, EvictionReason.CAPACITY)
        for dst in range(tier + 1, self.last + 1):
            result = self.move(pid, dst) if self.tier_up(dst) else MoveResult.DOWN
            if result is MoveResult.TOO_BIG:
                continue
            if result is MoveResult.DOWN:
                return evict_if_down and self.evict(pid, tier, EvictionReason.REMOTE_DOWN)
            return result in (MoveResult.MOVED, MoveResult.GONE)
        return self.evict(pid, tier, EvictionReason.CAPACITY)  # fits in no tier below

    # -- moving -------------------------------------------------------------------------------

    def move(self, pid: PageId, dst: int) -> MoveResult:
        """Move one page to tier ``dst`` (up or down): prepare, copy, commit
        (:func:`kvtier.store.moves.move`)."""
        return moves.move(self, pid, dst)

    def evict(self, pid: PageId, tier: int, reason: EvictionReason,
              only: Stored | None = None) -> bool:
        """Drop a resident page of ``tier`` from the cache, counted by ``reason``; with
        ``only``, just if that is what the tier holds for ``pid``."""
        with self.cond:
            rec = self.index.get(pid)
            if rec is None or rec.state is not PageState.RESIDENT or rec.tier != tier:
                return False
            backend = self.memory[tier]
            if only is not None and (backend is None or backend.get(pid) is not only):
                return False
            self.index.remove(pid)
            if backend is not None:
                backend.pop(pid)
            self.counters[tier].evictions[reason.value] += 1
            self.cond.notify_all()
        if rec.remote_token is not None:
            self.redis_delete_quietly([(pid, rec.remote_token)])
        self.forget([pid])
        return True

    def drop_corrupt(self, pid: PageId, tier: int) -> None:
        """A read found the stored blob corrupt: evict it so it is never served."""
        if not self.evict(pid, tier, EvictionReason.CORRUPT):
            log.warning("corrupt page seen mid-move in tier %s", self.names[tier])

    # -- reading ------------------------------------------------------------------------------

    def read(self, pid: PageId) -> tuple[Stored, int, Precision] | None:
        """The stored form of a page, its tier and precision; None for a miss.

        Memory tiers hand out their reference under the lock. A Redis page is fetched outside
        it; if the key is gone because a move committed meanwhile, the read retries against
        the index; if it is gone for good (deleted by another daemon), the page is forgotten.
        """
        for _ in range(4):
            with self.cond:
                rec = self.index.get(pid)
                if rec is None or rec.state is PageState.PLACING:
                    return None
                tier, prec, version = rec.tier, rec.precision, rec.version
                backend = self.memory[tier]
                if backend is not None:
                    data = backend.get(pid)
                    return (data, tier, prec) if data is not None else None
            if self.redis is None or not self.redis.up:
                return None
            try:
                got = self.redis.read(pid)
            except BackendUnavailable:
                return None
            if got is not None:
                return got[0], tier, min(prec, got[1].precision)
            with self.cond:
                rec = self.index.get(pid)
                if rec is not None and rec.version == version and rec.tier == tier:
                    if rec.state is PageState.RESIDENT:
                        self.index.remove(pid)
                        self.cond.notify_all()
                        return None
        return None

    # -- relocating ---------------------------------------------------------------------------

    def held_at(self, pid: PageId, lo: int, hi: int) -> tuple[int, Page] | None:
        """The tier and page of ``pid`` if it is resident in host memory with its bytes at
        addresses [lo, hi) (lent from a client's segment), else None."""
        with self.cond:
            rec = self.index.get(pid)
            if rec is None or rec.state is not PageState.RESIDENT:
                return None
            backend = self.memory[rec.tier]
            d = backend.get(pid) if backend is not None else None
        if isinstance(d, Page) and d.k.is_cpu and lo <= d.k.data_ptr() < hi:
            return rec.tier, d
        return None

    def swap_memory(self, pid: PageId, tier: int, old: Page, new: Page) -> bool:
        """Keep ``new``, a copy of ``old``, if ``old`` is still what ``tier`` holds and the
        page is not mid-move (a move would commit its own reference to ``old``)."""
        with self.cond:
            rec, backend = self.index.get(pid), self.memory[tier]
            if rec is None or rec.state is not PageState.RESIDENT or rec.tier != tier or \
                    backend is None or backend.get(pid) is not old:
                return False
            backend.put(pid, new)
            return True

    # -- deleting -----------------------------------------------------------------------------

    def delete(self, pids: Sequence[PageId]) -> int:
        """Remove pages from every tier (Redis too, even if this index did not know them)."""
        removed: list[PageId] = []
        tokens: list[tuple[PageId, str]] = []
        with self.cond:
            for pid in pids:
                rec = self.index.remove(pid)
                if rec is None:
                    continue
                if rec.state is not PageState.PLACING:
                    backend = self.memory[rec.tier]
                    if backend is not None:
                        backend.pop(pid)
                    self.counters[rec.tier].evictions[EvictionReason.DELETED.value] += 1
                if rec.remote_token is not None:
                    tokens.append((pid, rec.remote_token))
                removed.append(pid)
            self.cond.notify_all()
        known = set(removed)
        extra = 0
        if self.redis is not None and self.redis.up:
            unknown = [p for p in dict.fromkeys(pids) if p not in known]
            try:
                self.redis.delete_if(tokens)
                extra = self.redis.delete(unknown)
            except BackendUnavailable:
                pass
        self.forget(removed)
        return len(removed) + extra

    # -- stats --------------------------------------------------------------------------------

    def tier_stats(self, tier: int) -> TierStats:
        """Snapshot of one tier; call with ``cond`` held."""
        spec, lim, c = self.specs[tier], self.limits[tier], self.counters[tier]
        return TierStats(
            name=spec.name, medium=spec.medium.value, codec=spec.codec.value,
            capacity_bytes=lim.capacity_bytes, high_watermark=lim.high_watermark,
            low_watermark=lim.low_watermark, pages=self.index.page_count(tier),
            bytes=self.index.used(tier), hits=c.hits, misses=c.misses, demotions=c.demotions,
            promotions=c.promotions, evictions=dict(c.evictions), up=self.tier_up(tier),
        )

    # -- redis plumbing -----------------------------------------------------------------------

    def redis_or_raise(self) -> RedisTier:
        if self.redis is None:
            raise BackendUnavailable("no redis tier is configured", field="redis")
        return self.redis

    def redis_delete_quietly(self, items: list[tuple[PageId, str]]) -> None:
        """Delete Redis copies whose write token is unchanged; an outage just skips it."""
        if self.redis is None or not self.redis.up:
            return
        try:
            self.redis.delete_if(items)
        except BackendUnavailable:
            pass
