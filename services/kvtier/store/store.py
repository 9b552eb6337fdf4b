"""TierStore: the public face of the tiered page store (what transport, admin and daemon call).

Thread-safe; async callers use ``asyncio.to_thread``. Every call names its namespace; keys are
validated with :mod:`kvtier.pages` and bad input raises :class:`~kvtier.errors.InvalidArgument`
(or a subclass) naming the field. A miss is a normal answer (``None``), not an error. Every
access is queued for the policy and delivered by the mover thread, off the data path.

Semantics worth knowing:

- ``put`` places into the first tier the policy admits (default: the hot tier), making room
  synchronously if that tier is at its hard capacity; a page larger than that whole tier is
  CapacityExhausted. Puts are idempotent per key: an existing key answers EXISTS, unchanged.
- ``get`` returns a private host copy: bit-exact from a ``none`` tier, decoded elsewhere, with
  the lowest precision the page has passed through. It does not move the page.
- ``get``/``put`` stamp recency and count; ``promote`` stamps recency only (it announces a use,
  it is not one); ``lookup`` stamps nothing.
- Without a Redis url the Redis tier is left out of the stack (``tier_names`` shows it).
- ``put`` re-checks each page's structure (dtype, shape, size limits) but not its values:
  NaN/Inf are rejected where pages are built (:func:`kvtier.pages.make_page`, which the
  transports use), so the store does not pay a second pass over every page.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from kvtier import finite
from kvtier.codecs import warmup
from kvtier.config import Settings
from kvtier.errors import CorruptPage, InvalidArgument, UnknownTier
from kvtier.pages import check_key, check_keys, check_namespace, dtype_name, make_page
from kvtier.store.access_log import AccessLog
from kvtier.store.device_pool import DevicePool
from kvtier.store.engine import TierEngine
from kvtier.store.moves import MoveResult
from kvtier.store.mover import Mover, prefetch_pass, rebalance_tier, relocate
from kvtier.store.placement import check_fits, choose_tier, place
from kvtier.store.policy import AccessEvent, AccessKind, LRUPolicy, Policy
from kvtier.store.remote_index import discover, resync_remote
from kvtier.store.results import GetResult, LookupResult, PageInfo, PutOutcome, RawResult
from kvtier.store.stats import StoreStats, TierStats
from kvtier.store.tiers import Promoted, Stored
from kvtier.types import EvictionReason, Page, PageId, Precision

log = logging.getLogger(__name__)

PREFETCH_PER_PASS = 64


class TierStore:
    """The tiered page store. See the module docstring for the contract."""

    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.settings = settings
        self._engine = TierEngine(settings, policy or LRUPolicy())
        self._events = AccessLog(settings.policy.queue_size)
        self._mover: Mover | None = None
        self._gets = self._get_hits = self._puts = self._puts_stored = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, mover: bool = True) -> None:
        """Compile the codec kernels, connect Redis (rebuilding the remote tier's index) and
        start the mover thread. The first start in a process can take seconds (JIT), so that
        compilation never lands inside a put or a demotion."""
        warmup()
        finite.warmup()
        if self._engine.transfer is not None:
            self._engine.transfer.warmup()  # the device kernels, compiled and self-tested
        redis = self._engine.redis
        if redis is not None and redis.probe(force=True):
            added = resync_remote(self._engine)
            log.info("attached to redis tier: %d pages indexed", added)
        if mover and self._mover is None:
            self._mover = Mover(self.rebalance, self.settings.mover_interval_s)
            self._mover.start()

    def close(self, drain: bool = False) -> None:
        """Stop the mover; with ``drain`` first write memory-tier pages to the Redis tier."""
        if self._mover is not None:
            self._mover.stop()
            self._mover = None
        if drain:
            self.drain()
        if self._engine.redis is not None:
            self._engine.redis.close()

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self._engine.names

    @property
    def policy(self) -> Policy:
        return self._engine.policy

    def set_policy(self, policy: Policy) -> None:
        self._engine.policy = policy

    @property
    def redis_up(self) -> bool:
        redis = self._engine.redis
        return redis is None or redis.up

    # -- data path ----------------------------------------------------------------------------

    def put(self, namespace: str, items: Sequence[tuple[bytes, Page]],
            chain_positions: Sequence[int] | None = None) -> list[PutOutcome]:
        """Store pages; per key STORED or EXISTS. ``chain_positions`` default to 0, 1, 2, ..."""
        s = self.settings
        pids = check_keys(namespace, [k for k, _ in items], s.max_key_bytes, s.max_batch)
        if chain_positions is not None and len(chain_positions) != len(items):
            raise InvalidArgument(
                f"{len(chain_positions)} chain positions for {len(items)} pages",
                field="chain_positions")
        chains = list(chain_positions) if chain_positions is not None else list(range(len(items)))
        if any(c < 0 for c in chains):
            raise InvalidArgument("chain positions must be >= 0", field="chain_positions")
        pages = []
        for _, page in items:
            if not isinstance(page, Page):
                raise InvalidArgument(f"expected a Page, got {type(page).__name__}", field="page")
            pages.append(make_page(page.k, page.v, page.start_position,
                                   max_page_bytes=s.max_page_bytes, allow_nonfinite=True))
        return self.put_checked(pids, pages, chains)

    def put_checked(self, pids: Sequence[PageId], pages: Sequence[Page],
                    chains: Sequence[int], *, owned: bool = False) -> list[PutOutcome]:
        """:meth:`put` for a caller that has checked everything :meth:`put` checks: ``pids``
        as :func:`~kvtier.pages.check_keys` returns them (one namespace, at most
        ``max_batch``), ``pages`` as :func:`~kvtier.pages.make_page` builds them (dtype, 4-D
        shapes alike, at most ``max_page_bytes``), ``chains`` >= 0, one per page. The gRPC
        servicer checks each header once and comes here, so a put is not validated twice.
        ``owned``: the pages' memory is the store's from now on (nobody else holds or writes
        it), so a tier on the same device keeps it as it is instead of copying it."""
        e = self._engine
        targets = [choose_tier(e, pid, page, chain)
                   for pid, page, chain in zip(pids, pages, chains, strict=True)]
        for page, t in zip(pages, targets, strict=True):  # fail the batch before storing any
            check_fits(e, page, t)
        out = []
        now = time.time()
        for pid, page, chain, t in zip(pids, pages, chains, targets, strict=True):
            stored = place(e, pid, page, t, chain, time.time(), owned)
            out.append(PutOutcome.STORED if stored else PutOutcome.EXISTS)
        with e.cond:
            self._puts += len(out)
            self._puts_stored += sum(o is PutOutcome.STORED for o in out)
            events = [
                AccessEvent(pid, e.index.next_seq(), now, AccessKind.PUT,
                            e.names[vt] if (vt := e.index.visible_tier(pid)) is not None else None,
                            page.nbytes, chain)
                for pid, page, chain in zip(pids, pages, chains, strict=True)
            ]
            past_high = any(e.index.used(t) + e.index.reserved(t) > e.limits[t].high_bytes
                            for t in set(targets))
        self._events.extend(events)
        if past_high and self._mover is not None:
            self._mover.wake()
        return out

    def copy_out_lent(self, pids: Iterable[PageId], lo: int, hi: int,
                      copy: Callable[[Page], Page | None]) -> int:
        """Give each page of ``pids`` whose bytes lie at addresses [lo, hi) (lent from a
        client's segment) memory of its own: ``copy(page)``, or None for a page found corrupt,
        which is dropped. Returns how many pages moved; pages gone, moved elsewhere or mid-move
        meanwhile are left alone (their lent memory goes back when their last reader lets go)."""
        e = self._engine
        moved = 0
        for pid in pids:
            held = e.held_at(pid, lo, hi)
            if held is None:
                continue
            tier, page = held
            new = copy(page)
            if new is None:
                e.evict(pid, tier, EvictionReason.CORRUPT, only=page)
            elif e.swap_memory(pid, tier, page, new):
                moved += 1
        return moved

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[GetResult | None]:
        """Each page on the host from whatever tier holds it, or None for a miss."""
        found = self._read(namespace, keys, AccessKind.GET)
        out: list[GetResult | None] = []
        for item in found:
            if item is None:
                out.append(None)
                continue
            page, tier, precision = item
            out.append(GetResult(page, self._engine.names[tier], precision))
        return out

    def get_raw(self, namespace: str, keys: Sequence[bytes]) -> list[RawResult | None]:
        """Like :meth:`get` as raw bytes; host-memory hot pages are served without a copy."""
        found = self._read(namespace, keys, AccessKind.GET, copy_tensors=False)
        out: list[RawResult | None] = []
        for item in found:
            if item is None:
                out.append(None)
                continue
            page, tier, precision = item
            out.append(RawResult(
                dtype=dtype_name(page.k.dtype), shape=page.shape,
                start_position=page.start_position, k=_bytes_view(page.k),
                v=_bytes_view(page.v), tier=self._engine.names[tier], precision=precision))
        return out

    def get_device(self, namespace: str, keys: Sequence[bytes]) -> list[GetResult | None]:
        """Like :meth:`get` for a worker that copies pages device to device (CUDA IPC): a page
        in the device pool comes back as the tier holds it (no copy; never write it); any other
        page is None here, a miss of this path, to be read with :meth:`get`."""
        found = self._read(namespace, keys, AccessKind.GET, device=True)
        names = self._engine.names
        return [None if f is None else GetResult(f[0], names[f[1]], f[2]) for f in found]

    def _read(self, namespace: str, keys: Sequence[bytes], kind: AccessKind,
              copy_tensors: bool = True,
              device: bool = False) -> list[tuple[Page, int, Precision] | None]:
        s, e = self.settings, self._engine
        pids = check_keys(namespace, keys, s.max_key_bytes, s.max_batch)
        self._discover(pids)
        out: list[tuple[Page, int, Precision] | None] = []
        for pid in pids:
            got = e.read(pid)
            if got is None:
                out.append(None)
                continue
            data, tier, precision = got
            try:
                page = self._device_page(data) if device else self._to_page(data, copy_tensors)
            except CorruptPage:
                e.drop_corrupt(pid, tier)
                out.append(None)
                continue
            out.append(None if page is None else (page, tier, precision))
        now = time.time()
        events = []
        with e.cond:
            self._gets += len(pids)
            for i, (pid, item) in enumerate(zip(pids, out, strict=True)):
                hit = None if item is None else item[1]
                for t in range(len(e.specs) if hit is None else hit):
                    e.counters[t].misses += 1
                seq = None
                if hit is not None:
                    e.counters[hit].hits += 1
                    self._get_hits += 1
                    seq = e.index.touch(pid, now, count=True)
                nbytes = 0 if item is None else item[0].nbytes
                events.append(AccessEvent(pid, seq or e.index.next_seq(), now, kind,
                                          None if hit is None else e.names[hit], nbytes, i))
        self._events.extend(events)
        return out

    def _to_page(self, data: Stored, copy_tensors: bool) -> Page:
        if isinstance(data, Promoted):
            data = data.page
        if isinstance(data, Page) and not copy_tensors and data.k.device.type == "cpu" and \
                not self._pooled(data):
            return data
        return self._engine.converter.to_host(data)

    def _device_page(self, data: Stored) -> Page | None:
        if isinstance(data, Promoted):
            data = data.page
        return data if isinstance(data, Page) and self._pooled(data) else None

    @property
    def device_pool(self) -> DevicePool | None:
        """The device tier's pool (None without one)."""
        transfer = self._engine.transfer
        return None if transfer is None else transfer.pool

    def make_device_room(self, nbytes: int) -> bool:
        """Push pages out of the device tier until its pool has a free extent of ``nbytes``;
        False when that cannot be done (no pool, or nothing left to push within the room
        timeout)."""
        transfer = self._engine.transfer
        return transfer is not None and transfer.room is not None and transfer.room(nbytes)

    def _pooled(self, page: Page) -> bool:
        """Whether ``page`` lives in the device pool: a view of it handed out would not keep
        its block (a pool in host memory, as tests configure it, is the case that matters)."""
        transfer = self._engine.transfer
        return transfer is not None and transfer.pool.holds(page.k)

    def device_transfer_stats(self) -> dict[str, int]:
        """Bytes and pages the device tier's transfers moved, and its pool's use ({} without
        a device pool)."""
        transfer = self._engine.transfer
        return {} if transfer is None else transfer.stats().as_dict()

    def _discover(self, pids: list[PageId]) -> None:
        e = self._engine
        if e.redis is None or not e.redis.up:
            return
        with e.cond:
            unknown = [p for p in pids if e.index.get(p) is None]
        discover(e, unknown, time.time())

    def lookup(self, namespace: str, keys: Sequence[bytes]) -> LookupResult:
        """Which tier holds each key (None = absent or unreachable) and the present prefix."""
        s, e = self.settings, self._engine
        pids = check_keys(namespace, keys, s.max_key_bytes, s.max_batch)
        self._discover(pids)
        now = time.time()
        with e.cond:
            idx = [e.index.visible_tier(p) for p in pids]
            tiers = [None if t is None or not e.tier_up(t) else e.names[t] for t in idx]
            events = [AccessEvent(p, e.index.next_seq(), now, AccessKind.LOOKUP, t, 0, i)
                      for i, (p, t) in enumerate(zip(pids, tiers, strict=True))]
        self._events.extend(events)
        prefix = 0
        while prefix < len(tiers) and tiers[prefix] is not None:
            prefix += 1
        return LookupResult(prefix_length=prefix, tiers=tiers)

    def promote(self, namespace: str, keys: Sequence[bytes], tier: str) -> list[bool]:
        """Move pages up to ``tier`` (decoding; precision stays). True if now at/above it."""
        return self._relocate(namespace, keys, tier, upward=True)

    def demote(self, namespace: str, keys: Sequence[bytes], tier: str) -> list[bool]:
        """Admin: move pages down to ``tier``. True if now there; False if absent or below."""
        return self._relocate(namespace, keys, tier, upward=False)

    def _relocate(self, namespace: str, keys: Sequence[bytes], tier: str,
                  *, upward: bool) -> list[bool]:
        s, e = self.settings, self._engine
        target = self._tier_index(tier)
        pids = check_keys(namespace, keys, s.max_key_bytes, s.max_batch)
        self._discover(pids)
        out = [relocate(e, pid, target, upward=upward) for pid in pids]
        if upward:
            now = time.time()
            with e.cond:
                events = []
                for i, (pid, ok) in enumerate(zip(pids, out, strict=True)):
                    seq = e.index.touch(pid, now, count=False) if ok else None
                    if seq is not None:
                        events.append(AccessEvent(pid, seq, now, AccessKind.PROMOTE,
                                                  e.names[target], 0, i))
            self._events.extend(events)
        return out

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove pages from every tier; the number removed."""
        s = self.settings
        return self._engine.delete(check_keys(namespace, keys, s.max_key_bytes, s.max_batch))

    # -- admin --------------------------------------------------------------------------------

    def page_info(self, namespace: str, key: bytes) -> PageInfo | None:
        e = self._engine
        pid = PageId(check_namespace(namespace), check_key(key, self.settings.max_key_bytes))
        with e.cond:
            rec = e.index.get(pid)
            meta = e.index.meta(pid, e.names)
            if rec is None or meta is None:
                return None
            info = (rec.state.value, rec.precision, rec.nbytes, rec.stored_bytes)
        try:
            score = float(e.policy.score([meta])[0])
        except Exception:
            score = float("nan")
        return PageInfo(page=pid, tier=meta.tier, state=info[0], precision=info[1],
                        nbytes=info[2], stored_bytes=info[3], last_access_time=meta.last_time,
                        access_count=meta.access_count, chain_position=meta.chain_position,
                        score=score)

    def stats(self) -> StoreStats:
        e = self._engine
        with e.cond:
            tiers = tuple(e.tier_stats(t) for t in range(len(e.specs)))
            totals = (self._gets, self._get_hits, self._puts, self._puts_stored)
        try:
            policy_status = e.policy.status()
        except Exception:
            policy_status = LRUPolicy().status()
        return StoreStats(
            tiers=tiers, redis_up=self.redis_up, codec_seconds=e.clock.snapshot(),
            policy=policy_status, gets=totals[0], get_hits=totals[1],
            get_misses=totals[0] - totals[1], puts=totals[2], puts_stored=totals[3],
            access_events_dropped=self._events.dropped)

    def set_tier_limits(self, name: str, capacity_bytes: int | None = None,
                        high_watermark: float | None = None,
                        low_watermark: float | None = None) -> TierStats:
        """Change a tier's capacity or watermarks; a shrink pushes pages down right away."""
        e = self._engine
        t = self._tier_index(name)
        with e.cond:
            e.limits[t] = e.limits[t].replace(capacity_bytes, high_watermark, low_watermark)
        e.make_room(t, 0)
        rebalance_tier(e, t)
        with e.cond:
            return e.tier_stats(t)

    def drain(self) -> int:
        """Write every memory-tier page to the Redis tier; the number written."""
        e = self._engine
        if e.redis_tier is None or not self.redis_up:
            return 0
        moved = 0
        for t in range(e.redis_tier):
            with e.cond:
                pids = e.index.pages_in(t)
            for pid in pids:
                moved += e.move(pid, e.redis_tier) is MoveResult.MOVED
        return moved

    def rebalance(self) -> None:
        """One mover pass: deliver access events, probe Redis, demote past high watermarks,
        then promote the policy's prefetch picks into spare room of the top tier."""
        e = self._engine
        events = self._events.drain()
        if events:
            try:
                e.policy.record(events)
            except Exception:
                log.exception("policy %s failed in record()", e.policy.name)
        if e.redis is not None and not e.redis.up and e.redis.probe():
            resync_remote(e)
        for t in range(len(e.specs)):
            rebalance_tier(e, t)
        prefetch_pass(e, PREFETCH_PER_PASS)

    def _tier_index(self, name: str) -> int:
        try:
            return self._engine.names.index(name)
        except ValueError:
            raise UnknownTier(
                f"unknown tier {name!r}; tiers are {', '.join(self._engine.names)}",
                field="tier") from None


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous host tensor, sharing its storage."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data.toreadonly()
