"""TierStore: the public face of the tiered page store (what transport, admin and daemon call).

Thread-safe; async callers use ``asyncio.to_thread``. Every call names its namespace; keys are
validated with :mod:`kvtier.pages` and bad input raises :class:`~kvtier.errors.InvalidArgument`
(or a subclass) naming the field. A transport that validated a call's keys itself (it has to,
before it touches a shared-memory segment) calls the ``*_checked`` forms with the
:class:`~kvtier.types.PageId` list it got, so no key is checked twice. A miss is a normal answer
(``None``), not an error. Every access is queued for the policy and delivered by the mover
thread, off the data path.

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
from functools import partial

import torch

from kvtier import finite
from kvtier.codecs import warmup
from kvtier.config import Settings
from kvtier.errors import InvalidArgument, UnknownTier
from kvtier.pages import (
    check_expected_reuse, check_key, check_keys, check_namespace, check_session, dtype_name,
    make_page,
)
from kvtier.store import transfer
from kvtier.store.access_log import AccessLog
from kvtier.store.device_pool import DevicePool
from kvtier.store.engine import TierEngine
from kvtier.store.mover import Mover, Prefetcher, prefetch_pass, rebalance_tier, relocate
from kvtier.store.policy import AccessEvent, AccessKind, LRUPolicy, Policy
from kvtier.store.remote_index import discover, fetch, refresh, resync_remote
from kvtier.store.results import GetResult, LookupResult, PageInfo, PutOutcome, RawResult
from kvtier.store.sharing import Sharer
from kvtier.store.stats import (
    OTHER_NAMESPACES, NamespaceUsage, RedisStatus, StoreStats, TierStats,
)
from kvtier.types import Medium, Page, PageId, Precision

log = logging.getLogger(__name__)

PREFETCH_PER_PASS = 64


class TierStore:
    """The tiered page store. See the module docstring for the contract."""

    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.settings = settings
        self._engine = TierEngine(settings, policy or LRUPolicy())
        if self._engine.device_transfer is not None:
            self._engine.device_transfer.room = partial(transfer.make_pool_room, self._engine)
        self._events = AccessLog(settings.policy.queue_size)
        self._mover: Mover | None = None
        self._prefetch = Prefetcher(self._engine)
        self._sharer = Sharer() if (settings.redis.share_puts
                                    and self._engine.redis is not None) else None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, *, mover: bool = True) -> None:
        """Compile the codec kernels, connect Redis (rebuilding the remote tier's index) and
        start the mover thread. The first start in a process can take seconds (JIT), so that
        compilation never lands inside a put or a demotion."""
        warmup()
        finite.warmup()
        if self._engine.device_transfer is not None:
            self._engine.device_transfer.warmup()  # the device kernels, compiled, self-tested
        redis = self._engine.redis
        if redis is not None and redis.probe(force=True):
            added = resync_remote(self._engine)
            log.info("attached to redis tier: %d pages indexed", added)
        if mover and self._mover is None:
            self._mover = Mover(self.rebalance, self.settings.mover_interval_s)
            self._mover.start()
            self._prefetch.start(self.settings.mover_interval_s)

    def close(self, drain: bool = False) -> None:
        """Stop the mover; with ``drain`` first write memory-tier pages to the Redis tier."""
        if self._mover is not None:
            self._mover.stop()
            self._mover = None
        self._prefetch.stop()
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

    def redis_status(self) -> RedisStatus | None:
        """The shared tier's health per shard and its counters; None without a Redis tier."""
        redis = self._engine.redis
        if redis is None or self._engine.redis_tier is None:
            return None
        sharing = self._sharer.counters() if self._sharer is not None else None
        return RedisStatus(redis.health(), redis.shards.counters(), redis.delete_counters(),
                           sharing)

    # -- data path ----------------------------------------------------------------------------

    def check_keys(self, namespace: str, keys: Sequence[bytes]) -> list[PageId]:
        """The page ids of a call's keys: InvalidArgument for a bad namespace, key or batch."""
        s = self.settings
        return check_keys(namespace, keys, s.max_key_bytes, s.max_batch)

    def tier_index(self, name: str) -> int:
        """The position of tier ``name`` in the stack; :class:`~kvtier.errors.UnknownTier`
        naming the tiers there are otherwise (the one unknown-tier error)."""
        try:
            return self._engine.names.index(name)
        except ValueError:
            raise UnknownTier(
                f"unknown tier {name!r}; tiers are {', '.join(self._engine.names)}",
                field="tier") from None

    def put(self, namespace: str, items: Sequence[tuple[bytes, Page]],
            chain_positions: Sequence[int] | None = None, *, session: str = "",
            expected_reuse_s: Sequence[float | None] | None = None) -> list[PutOutcome]:
        """Store pages; per key STORED or EXISTS. ``chain_positions`` default to 0, 1, 2, ...
        (consecutive positions are a chain: page i follows page i-1). ``session`` and
        ``expected_reuse_s`` (per page, seconds) are hints (:mod:`kvtier.store.hints`)."""
        s = self.settings
        pids = self.check_keys(namespace, [k for k, _ in items])
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
        reuse = _check_reuse(expected_reuse_s, len(items))
        return self.put_checked(pids, pages, chains, session=check_session(session),
                                expected_reuse_s=reuse)

    def put_checked(self, pids: Sequence[PageId], pages: Sequence[Page],
                    chains: Sequence[int], *, owned: bool = False, session: str = "",
                    expected_reuse_s: Sequence[float | None] | None = None
                    ) -> list[PutOutcome]:
        """:meth:`put` for a caller that has checked everything :meth:`put` checks: ``pids``
        as :func:`~kvtier.pages.check_keys` returns them (one namespace, at most
        ``max_batch``), ``pages`` as :func:`~kvtier.pages.make_page` builds them (dtype, 4-D
        shapes alike, at most ``max_page_bytes``), ``chains`` >= 0, one per page. The gRPC
        servicer checks each header once and comes here, so a put is not validated twice.
        ``owned``: the pages' memory is the store's from now on (nobody else holds or writes
        it), so a tier on the same device keeps it as it is instead of copying it.
        ``session`` and ``expected_reuse_s`` as :meth:`put` checks them."""
        e = self._engine
        e.chains.note_put(pids, chains)
        e.hints.used(pids, session)
        if expected_reuse_s is not None:
            e.hints.expect_reuse(pids, expected_reuse_s)
        targets = [transfer.choose_tier(e, pid, page, chain)
                   for pid, page, chain in zip(pids, pages, chains, strict=True)]
        for page, t in zip(pages, targets, strict=True):  # fail the batch before storing any
            transfer.check_fits(e, page, t)
        out = []
        now = time.time()
        for pid, page, chain, t in zip(pids, pages, chains, targets, strict=True):
            stored = transfer.place(e, pid, page, t, chain, time.time(), owned)
            out.append(PutOutcome.STORED if stored else PutOutcome.EXISTS)
        if self._sharer is not None:
            self._sharer.offer([p for p, o in zip(pids, out, strict=True)
                                if o is PutOutcome.STORED])
        seen = e.count_puts(pids, sum(o is PutOutcome.STORED for o in out))
        self._events.extend(
            AccessEvent(pid, seq, now, AccessKind.PUT, tier, page.nbytes, chain)
            for (seq, tier), pid, page, chain in zip(seen, pids, pages, chains, strict=True))
        if self._mover is not None and e.past_high(set(targets)):
            self._mover.wake()
        return out

    def copy_out_lent(self, pids: Iterable[PageId], lo: int, hi: int,
                      copy: Callable[[Page], Page | None]) -> int:
        """Give each page of ``pids`` whose bytes lie at addresses [lo, hi) (lent from a
        client's segment) memory of its own: ``copy(page)``, or None for a page found corrupt,
        which is dropped. Returns how many pages moved; pages gone, moved elsewhere or mid-move
        meanwhile are left alone (their lent memory goes back when their last reader lets go)."""
        return transfer.copy_out_lent(self._engine, pids, lo, hi, copy)

    def get(self, namespace: str, keys: Sequence[bytes]) -> list[GetResult | None]:
        """Each page on the host from whatever tier holds it, or None for a miss."""
        found = self._read(self.check_keys(namespace, keys), AccessKind.GET)
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
        return self.get_raw_checked(self.check_keys(namespace, keys))

    def get_raw_checked(self, pids: Sequence[PageId]) -> list[RawResult | None]:
        """:meth:`get_raw` of ids from :meth:`check_keys`."""
        found = self._read(pids, AccessKind.GET, copy_tensors=False)
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
        found = self._read(self.check_keys(namespace, keys), AccessKind.GET, device=True)
        names = self._engine.names
        return [None if f is None else GetResult(f[0], names[f[1]], f[2]) for f in found]

    def _read(self, pids: Sequence[PageId], kind: AccessKind, copy_tensors: bool = True,
              device: bool = False) -> list[tuple[Page, int, Precision] | None]:
        e = self._engine
        if device:  # only the device pool serves this path: no Redis round trip
            out = [transfer.read_device(e, pid) for pid in pids]
        else:
            shared = fetch(e, pids, time.time())  # every key not in memory: one round trip
            out = [transfer.read_page(e, pid, copy_tensors, shared.get(pid)) for pid in pids]
        now = time.time()
        hits = [None if item is None else item[1] for item in out]
        self._prefetch.note_reads(pids, hits)
        seqs = e.count_gets(pids, hits, now)
        self._events.extend(
            AccessEvent(pid, seq, now, kind, None if hit is None else e.names[hit],
                        0 if item is None else item[0].nbytes, i)
            for i, (pid, seq, hit, item) in enumerate(zip(pids, seqs, hits, out, strict=True)))
        return out

    @property
    def device_pool(self) -> DevicePool | None:
        """The device tier's pool (None without one)."""
        dev = self._engine.device_transfer
        return None if dev is None else dev.pool

    def make_device_room(self, nbytes: int) -> bool:
        """Push pages out of the device tier until its pool has a free extent of ``nbytes``;
        False when that cannot be done (no pool, or nothing left to push within the room
        timeout)."""
        return transfer.make_pool_room(self._engine, nbytes)

    def device_transfer_stats(self) -> dict[str, int]:
        """Bytes and pages the device tier's transfers moved, and its pool's use ({} without
        a device pool)."""
        dev = self._engine.device_transfer
        return {} if dev is None else dev.stats().as_dict()

    def _discover(self, pids: Sequence[PageId]) -> None:
        """Adopt pages other daemons put in the shared Redis tier under keys this index does
        not know yet."""
        e = self._engine
        if e.redis is None or not e.redis.up:
            return
        unknown = e.unknown(pids)
        if unknown:
            discover(e, unknown, time.time())

    def lookup(self, namespace: str, keys: Sequence[bytes], *, session: str = "",
               prefetch: bool = False) -> LookupResult:
        """Which tier holds each key (None = absent or unreachable) and the present prefix.
        ``keys`` are one chain (block 0 first). ``session`` is a hint; with ``prefetch`` the
        present prefix's pages below the top tier start moving up (in the background)."""
        return self.lookup_checked(self.check_keys(namespace, keys),
                                   session=check_session(session), prefetch=prefetch)

    def lookup_checked(self, pids: Sequence[PageId], *, session: str = "",
                       prefetch: bool = False) -> LookupResult:
        """:meth:`lookup` of ids from :meth:`check_keys`."""
        e = self._engine
        now = time.time()
        shared = refresh(e, pids, now)  # every key not in memory: one round trip
        remote = None if e.redis_tier is None else e.names[e.redis_tier]
        seen = [(seq, None if t == remote and not shared.get(p, True) else t)
                for p, (seq, t) in zip(pids, e.lookup(pids), strict=True)]
        tiers = [t for _, t in seen]
        self._events.extend(AccessEvent(p, seq, now, AccessKind.LOOKUP, t, 0, i)
                            for i, (p, (seq, t)) in enumerate(zip(pids, seen, strict=True)))
        prefix = 0
        while prefix < len(tiers) and tiers[prefix] is not None:
            prefix += 1
        e.chains.note_lookup(pids, prefix)
        e.hints.used(pids[:prefix], session)
        if prefetch and prefix:
            self._prefetch.submit(pids[:prefix])
        return LookupResult(prefix_length=prefix, tiers=tiers)

    def hint(self, namespace: str, queued: Sequence[Sequence[bytes]] = (),
             ended_sessions: Sequence[str] = ()) -> int:
        """A worker's hints (:mod:`kvtier.store.hints`): ``queued``, the key chains of its
        requests waiting to be scheduled (replacing the namespace's previous queue), and
        sessions that ended. The queued chains' present prefixes are promoted ahead of use;
        returns how many pages that scheduled. At most ``max_batch`` keys in all."""
        s = self.settings
        total = sum(len(c) for c in queued)
        if total > s.max_batch:
            raise InvalidArgument(f"{total} queued keys in one hint, more than the maximum "
                                  f"batch of {s.max_batch}", field="queued")
        if len(ended_sessions) > s.max_batch:
            raise InvalidArgument(f"{len(ended_sessions)} ended sessions in one hint, more "
                                  f"than the maximum batch of {s.max_batch}",
                                  field="ended_sessions")
        ns = check_namespace(namespace)
        chains = [check_keys(ns, list(c), s.max_key_bytes, s.max_batch) if c else []
                  for c in queued]
        return self.hint_checked(ns, chains, [check_session(x, "ended_sessions")
                                              for x in ended_sessions])

    def hint_checked(self, namespace: str, chains: Sequence[Sequence[PageId]],
                     ended_sessions: Sequence[str]) -> int:
        """:meth:`hint` of chains from :meth:`check_keys` and checked session names."""
        e = self._engine
        e.hints.set_queue(namespace, chains)
        e.hints.end_sessions(namespace, ended_sessions)
        scheduled = 0
        for chain in chains:
            present = e.lookup(chain)
            n = 0
            while n < len(present) and present[n][1] is not None:
                n += 1
            e.chains.note_lookup(chain, n)
            scheduled += self._prefetch.submit(chain[:n])
        return scheduled

    def promote(self, namespace: str, keys: Sequence[bytes], tier: str) -> list[bool]:
        """Move pages up to ``tier`` (decoding; precision stays). True if now at/above it."""
        target = self.tier_index(tier)
        return self._relocate(self.check_keys(namespace, keys), target, upward=True)

    def promote_checked(self, pids: Sequence[PageId], tier: str) -> list[bool]:
        """:meth:`promote` of ids from :meth:`check_keys`."""
        return self._relocate(pids, self.tier_index(tier), upward=True)

    def demote(self, namespace: str, keys: Sequence[bytes], tier: str) -> list[bool]:
        """Admin: move pages down to ``tier``. True if now there; False if absent or below."""
        target = self.tier_index(tier)
        return self._relocate(self.check_keys(namespace, keys), target, upward=False)

    def _relocate(self, pids: Sequence[PageId], target: int, *, upward: bool) -> list[bool]:
        e = self._engine
        self._discover(pids)
        out = [relocate(e, pid, target, upward=upward) for pid in pids]
        if upward:
            now = time.time()
            moved = [(i, pid) for i, (pid, ok) in enumerate(zip(pids, out, strict=True)) if ok]
            seqs = e.touch([pid for _, pid in moved], now)
            self._events.extend(
                AccessEvent(pid, seq, now, AccessKind.PROMOTE, e.names[target], 0, i)
                for (i, pid), seq in zip(moved, seqs, strict=True) if seq is not None)
        return out

    def delete(self, namespace: str, keys: Sequence[bytes]) -> int:
        """Remove pages from every tier; the number removed."""
        return self.delete_checked(self.check_keys(namespace, keys))

    def delete_checked(self, pids: Sequence[PageId]) -> int:
        """:meth:`delete` of ids from :meth:`check_keys`."""
        return transfer.delete(self._engine, pids)

    # -- admin --------------------------------------------------------------------------------

    def page_info(self, namespace: str, key: bytes) -> PageInfo | None:
        e = self._engine
        pid = PageId(check_namespace(namespace), check_key(key, self.settings.max_key_bytes))
        view = e.page_view(pid)
        if view is None:
            return None
        meta = view.meta
        try:
            score = float(e.policy.score([meta])[0])
        except Exception:
            score = float("nan")
        return PageInfo(page=pid, tier=meta.tier, state=view.state.value,
                        precision=view.precision, nbytes=view.nbytes,
                        stored_bytes=view.stored_bytes, last_access_time=meta.last_time,
                        access_count=meta.access_count, chain_position=meta.chain_position,
                        score=score)

    def stats(self) -> StoreStats:
        e = self._engine
        tiers, totals = e.stats()
        namespaces, refusals = self._namespace_rows()
        try:
            policy_status = e.policy.status()
        except Exception:
            policy_status = LRUPolicy().status()
        return StoreStats(
            tiers=tiers, redis_up=self.redis_up, codec_seconds=e.clock.snapshot(),
            policy=policy_status, gets=totals.gets, get_hits=totals.get_hits,
            get_misses=totals.gets - totals.get_hits, puts=totals.puts,
            puts_stored=totals.puts_stored, access_events_dropped=self._events.dropped,
            prefetched=self._prefetch.promoted, prefetch_hits=self._prefetch.hits,
            namespaces=namespaces, quota_refusals=refusals)

    def _namespace_rows(self) -> tuple[tuple[NamespaceUsage, ...], int]:
        """The top ``quotas.top_namespaces`` namespaces by memory-tier bytes, the rest summed
        as one ``(other)`` row (bounded however many tenants there are)."""
        e = self._engine
        usage, refusals = e.namespace_usage()
        memory = [i for i, s in enumerate(e.specs) if s.medium is not Medium.REDIS]

        def held(row: tuple[int, ...]) -> int:
            return sum(row[i] for i in memory)

        ranked = sorted(usage.items(), key=lambda kv: (-held(kv[1]), kv[0]))
        top_n = e.quotas.top_namespaces
        rows = []
        for ns, row in ranked[:top_n]:
            q = e.quotas.of(ns)
            rows.append(NamespaceUsage(ns, held(row), dict(zip(e.names, row, strict=True)),
                                       q.bytes if q is not None else None))
        rest = ranked[top_n:]
        if rest:
            sums = [sum(r[i] for _, r in rest) for i in range(len(e.names))]
            rows.append(NamespaceUsage(OTHER_NAMESPACES, held(tuple(sums)),
                                       dict(zip(e.names, sums, strict=True)), None, len(rest)))
        return tuple(rows), refusals

    def set_tier_limits(self, name: str, capacity_bytes: int | None = None,
                        high_watermark: float | None = None,
                        low_watermark: float | None = None) -> TierStats:
        """Change a tier's capacity or watermarks; a shrink pushes pages down right away."""
        e = self._engine
        t = self.tier_index(name)
        e.set_limits(t, capacity_bytes, high_watermark, low_watermark)
        transfer.make_room(e, t, 0)
        rebalance_tier(e, t)
        return e.tier_stats(t)

    def drain(self) -> int:
        """Write every memory-tier page to the Redis tier; the number written."""
        return transfer.drain(self._engine)

    def rebalance(self) -> None:
        """One mover pass: deliver access events, probe Redis, share new pages (with
        ``share_puts``), demote past high watermarks, then promote the policy's prefetch picks
        into spare room of the top tier."""
        e = self._engine
        events = self._events.drain()
        if events:
            try:
                e.policy.record(events)
            except Exception:
                log.exception("policy %s failed in record()", e.policy.name)
        if e.redis is not None:
            was_up = e.redis.up
            if e.redis.probe() and not was_up:  # no network unless something is down
                resync_remote(e)
            if self._sharer is not None:
                self._sharer.run(e)
        for t in range(len(e.specs)):
            rebalance_tier(e, t)
        self._prefetch.run()
        prefetch_pass(e, PREFETCH_PER_PASS)


def _check_reuse(values: Sequence[float | None] | None, n: int) -> list[float | None] | None:
    if values is None:
        return None
    if len(values) != n:
        raise InvalidArgument(f"{len(values)} expected reuse times for {n} pages",
                              field="expected_reuse_s")
    return [check_expected_reuse(v) for v in values]


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous host tensor, sharing its storage."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data.toreadonly()
