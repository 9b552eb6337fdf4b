"""Prometheus metrics of the cache daemon, read from the stats objects the core keeps.

Nothing on the data path touches prometheus-client. Occupancy, hits, moves, codec time, Redis
and policy state are read from ``store.stats()`` and the RPC totals by a custom collector at
scrape time; the one thing pushed is the gRPC latency histogram, fed by an observer on
:class:`kvtier.transport.stats.RpcStats` (a histogram cannot be rebuilt from totals).

Every daemon HTTP server owns its own :class:`DaemonMetrics` (its own registry): no global
registry, so several daemons in one process (tests) never share series.

Policy figures come from :class:`kvtier.store.policy.PolicyStatus`; the optional attributes
``loss``, ``online_accuracy`` and ``events_dropped`` are exported when a policy's status carries
them (the learned and remote policies).

Names follow ``kvtier_<what>_<unit>``, ``_total`` for counters. Label values are bounded: tier
names come from the configured stack, ``reason`` from :class:`kvtier.types.EvictionReason`,
``op``/``codec`` from the codec table, ``method``/``code`` from the gRPC service definition and
gRPC status names. Namespaces and keys are never labels.

=====================================  =========  ======================================
metric                                 type       labels
=====================================  =========  ======================================
kvtier_tier_pages                      gauge      tier
kvtier_tier_bytes                      gauge      tier
kvtier_tier_capacity_bytes             gauge      tier
kvtier_tier_high_watermark_ratio       gauge      tier
kvtier_tier_low_watermark_ratio        gauge      tier
kvtier_tier_hits_total                 counter    tier
kvtier_tier_misses_total               counter    tier (gets that reached it, not served)
kvtier_tier_demotions_total            counter    tier (the tier pages left)
kvtier_tier_promotions_total           counter    tier (the tier pages entered)
kvtier_tier_evictions_total            counter    tier, reason
kvtier_get_keys_total                  counter    (keys asked for by get)
kvtier_get_hits_total                  counter    (keys found in some tier)
kvtier_get_misses_total                counter    (keys found in no tier)
kvtier_put_keys_total                  counter    outcome (stored, exists)
kvtier_codec_seconds_total             counter    op, codec
kvtier_codec_calls_total               counter    op, codec
kvtier_redis_up                        gauge      (1 up, 0 down; absent without a Redis tier)
kvtier_redis_shards                    gauge      state (up, down): primaries serving slots
kvtier_redis_unavailable_slots         gauge      (slots answering misses: shard down)
kvtier_redis_unavailable_keys_total    counter    (commands not sent: shard down)
kvtier_redis_redirects_total           counter    kind (moved, ask)
kvtier_redis_script_loads_total        counter    (NOSCRIPT answered by loading)
kvtier_redis_node_failures_total       counter    (nodes marked down)
kvtier_redis_delete_failures_total     counter    (deletes that failed; kept, retried)
kvtier_redis_pending_deletes           gauge      (deletes waiting for their shard)
kvtier_redis_dropped_deletes_total     counter    (pending deletes dropped: queue full)
kvtier_redis_shared_pages_total        counter    result (shared, present, dropped, failed)
kvtier_policy_info                     gauge      policy, active (always 1)
kvtier_policy_fallback_active          gauge
kvtier_policy_events_dropped_total     counter
kvtier_policy_loss                     gauge      (only while the policy reports one)
kvtier_policy_online_accuracy          gauge      (only while the policy reports one)
kvtier_rpc_duration_seconds            histogram  method, code
kvtier_rpc_received_bytes_total        counter    method
kvtier_rpc_sent_bytes_total            counter    method
kvtier_start_time_seconds              gauge
=====================================  =========  ======================================
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvtier.transport.stats import RpcSample, RpcStats
from kvtier.types import EvictionReason, Medium, Outcome

if TYPE_CHECKING:
    from kvtier.store.buffers import BufferPool
    from kvtier.store.store import TierStore
    from kvtier.transport.limits import StreamLimits
    from kvtier.transport.shm.relocate import Relocator

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# 100 us .. 10 s: a hot-tier get is sub-millisecond, a Redis round trip a few ms, a 64 MiB
# page over plain gRPC tens to hundreds of ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


def _number(value: Any) -> float | None:
    """A finite float from an optional status field, or None (then the series is absent)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class StoreCollector(Collector):
    """Reads ``store.stats()`` and the RPC totals at scrape time."""

    def __init__(self, store: TierStore, rpc_stats: RpcStats, started_at: float,
                 buffers: BufferPool | None = None, relocator: Relocator | None = None,
                 limits: StreamLimits | None = None) -> None:
        self._limits = limits
        self._store = store
        self._rpc_stats = rpc_stats
        self._started_at = started_at
        self._buffers = buffers
        self._relocator = relocator

    def describe(self) -> Iterable[Metric]:
        # Dynamic collector: nothing to describe up front (the registry then calls collect()
        # only at scrape time, never at registration).
        return []

    def collect(self) -> Iterable[Metric]:
        stats = self._store.stats()
        yield from self._tiers(stats)
        yield from self._totals(stats)
        yield from self._codecs(stats)
        yield from self._redis(stats)
        yield from self._policy(stats)
        yield from self._namespaces(stats)
        if self._limits is not None:
            yield from self._streams(self._limits)
        yield from self._rpc()
        if self._buffers is not None:
            yield from self._pool(self._buffers)
        if self._relocator is not None:
            moved = CounterMetricFamily(
                "kvtier_shm_lent_pages_copied_out",
                "Lent pages copied out of clients' segments (full lend area, ended session).")
            moved.add_metric([], self._relocator.pages_moved)
            yield moved
        start = GaugeMetricFamily(
            "kvtier_start_time_seconds", "Unix time the daemon started."
        )
        start.add_metric([], self._started_at)
        yield start

    @staticmethod
    def _tiers(stats: Any) -> Iterable[Metric]:
        t = ["tier"]
        pages = GaugeMetricFamily("kvtier_tier_pages", "Pages held per tier.", labels=t)
        nbytes = GaugeMetricFamily("kvtier_tier_bytes", "Stored bytes per tier.", labels=t)
        cap = GaugeMetricFamily(
            "kvtier_tier_capacity_bytes", "Byte capacity per tier.", labels=t
        )
        high = GaugeMetricFamily(
            "kvtier_tier_high_watermark_ratio",
            "Fill ratio above which the mover demotes out of the tier.", labels=t,
        )
        low = GaugeMetricFamily(
            "kvtier_tier_low_watermark_ratio",
            "Fill ratio the mover demotes down to.", labels=t,
        )
        hits = CounterMetricFamily("kvtier_tier_hits", "Keys served by each tier.", labels=t)
        misses = CounterMetricFamily(
            "kvtier_tier_misses", "Misses counted by each tier.", labels=t
        )
        dem = CounterMetricFamily(
            "kvtier_tier_demotions", "Pages demoted out of each tier.", labels=t
        )
        pro = CounterMetricFamily(
            "kvtier_tier_promotions", "Pages promoted into each tier.", labels=t
        )
        ev = CounterMetricFamily(
            "kvtier_tier_evictions",
            "Pages that left the cache from each tier, by reason.",
            labels=["tier", "reason"],
        )
        for tier in stats.tiers:
            name = [str(tier.name)]
            pages.add_metric(name, tier.pages)
            nbytes.add_metric(name, tier.bytes)
            cap.add_metric(name, tier.capacity_bytes)
            high.add_metric(name, tier.high_watermark)
            low.add_metric(name, tier.low_watermark)
            hits.add_metric(name, tier.hits)
            misses.add_metric(name, tier.misses)
            dem.add_metric(name, tier.demotions)
            pro.add_metric(name, tier.promotions)
            by_reason: Mapping[str, int] = tier.evictions
            # Every reason is always exported (0 until it happens): rate() panels and alerts
            # then see a series from the first scrape, and the label set stays bounded.
            for reason in EvictionReason:
                ev.add_metric(name + [reason.value], by_reason.get(reason.value, 0))
        yield from (pages, nbytes, cap, high, low, hits, misses, dem, pro, ev)

    @staticmethod
    def _namespaces(stats: Any) -> Iterable[Metric]:
        """Per namespace: the top ``quotas.top_namespaces`` by bytes and one ``(other)`` series
        for the rest, so the label set stays bounded however many tenants there are."""
        nbytes = GaugeMetricFamily(
            "kvtier_namespace_bytes",
            "Stored bytes per namespace and tier (the largest namespaces; the rest as '(other)').",
            labels=["namespace", "tier"])
        quota = GaugeMetricFamily(
            "kvtier_namespace_quota_bytes",
            "Quota across the memory tiers of each namespace named in kvtier_namespace_bytes.",
            labels=["namespace"])
        for row in stats.namespaces:
            for tier, n in row.tiers.items():
                nbytes.add_metric([row.name, tier], n)
            if row.quota_bytes is not None:
                quota.add_metric([row.name], row.quota_bytes)
        refused = CounterMetricFamily(
            "kvtier_quota_refusals", "Puts refused (RESOURCE_EXHAUSTED) by a namespace quota.")
        refused.add_metric([], stats.quota_refusals)
        yield from (nbytes, quota, refused)

    @staticmethod
    def _streams(limits: StreamLimits) -> Iterable[Metric]:
        open_ = GaugeMetricFamily("kvtier_streams_open",
                                  "Streaming gRPC calls open (each holds a handler thread).")
        open_.add_metric([], limits.open_streams)
        refused = CounterMetricFamily(
            "kvtier_streams_refused", "Streaming calls refused by a stream limit (limits.*).")
        refused.add_metric([], limits.refused)
        idle = CounterMetricFamily(
            "kvtier_streams_idle_cancelled",
            "Streaming calls cancelled after waiting on their client (limits.stream_idle_s).")
        idle.add_metric([], limits.idle_cancelled)
        yield from (open_, refused, idle)

    @staticmethod
    def _totals(stats: Any) -> Iterable[Metric]:
        gets = CounterMetricFamily("kvtier_get_keys", "Keys asked for by get.")
        gets.add_metric([], stats.gets)
        hits = CounterMetricFamily("kvtier_get_hits", "Keys get found in some tier.")
        hits.add_metric([], stats.get_hits)
        misses = CounterMetricFamily("kvtier_get_misses", "Keys get found in no tier.")
        misses.add_metric([], stats.get_misses)
        puts = CounterMetricFamily(
            "kvtier_put_keys", "Keys offered by put, by outcome (stored, exists).",
            labels=["outcome"],
        )
        puts.add_metric([Outcome.STORED.value], stats.puts_stored)
        puts.add_metric([Outcome.EXISTS.value], max(0, stats.puts - stats.puts_stored))
        yield from (gets, hits, misses, puts)

    @staticmethod
    def _codecs(stats: Any) -> Iterable[Metric]:
        labels = ["op", "codec"]
        secs = CounterMetricFamily(
            "kvtier_codec_seconds", "Seconds spent encoding/decoding pages.", labels=labels
        )
        calls = CounterMetricFamily(
            "kvtier_codec_calls", "Pages encoded/decoded.", labels=labels
        )
        codec_seconds: Mapping[tuple[str, str], tuple[float, int]] = stats.codec_seconds
        for (op, codec), (seconds, count) in sorted(codec_seconds.items()):
            secs.add_metric([str(op), str(codec)], seconds)
            calls.add_metric([str(op), str(codec)], count)
        yield from (secs, calls)

    def _redis(self, stats: Any) -> Iterable[Metric]:
        if self._store.settings.redis.url is None or not any(
            t.medium == Medium.REDIS for t in stats.tiers
        ):
            return  # no Redis backend: no series rather than a made-up "up"
        up = GaugeMetricFamily("kvtier_redis_up", "1 when the Redis tier answers, else 0.")
        up.add_metric([], 1.0 if stats.redis_up else 0.0)
        yield up
        status = self._store.redis_status()
        if status is None:
            return
        health, counters, deletes = status.health, status.shards, status.deletes
        shards = GaugeMetricFamily(
            "kvtier_redis_shards", "Redis primaries serving slots, by whether they answer.",
            labels=["state"])
        shards.add_metric(["up"], sum(s.up for s in health.shards))
        shards.add_metric(["down"], sum(not s.up for s in health.shards))
        slots = GaugeMetricFamily(
            "kvtier_redis_unavailable_slots",
            "Cluster slots whose keys answer as misses now (primary down or slot unserved).")
        slots.add_metric([], health.slots_down)
        redirects = CounterMetricFamily(
            "kvtier_redis_redirects", "MOVED and ASK answers followed.", labels=["kind"])
        redirects.add_metric(["moved"], counters.moved)
        redirects.add_metric(["ask"], counters.ask)
        yield from (shards, slots, redirects)
        for kind, name, text, number in (
            (CounterMetricFamily, "kvtier_redis_unavailable_keys",
             "Shared-tier commands not sent because their shard was down or timed out.",
             counters.unavailable),
            (CounterMetricFamily, "kvtier_redis_script_loads",
             "Scripts loaded on a node that answered NOSCRIPT.", counters.script_loads),
            (CounterMetricFamily, "kvtier_redis_node_failures",
             "Redis nodes marked down (connection error, timeout).", counters.node_failures),
            (CounterMetricFamily, "kvtier_redis_delete_failures",
             "Shared-tier deletes that failed (kept and sent again once their shard answers).",
             deletes.failures),
            (GaugeMetricFamily, "kvtier_redis_pending_deletes",
             "Shared-tier deletes waiting for their shard.", deletes.pending),
            (CounterMetricFamily, "kvtier_redis_dropped_deletes",
             "Pending shared-tier deletes dropped from a full queue (never sent).",
             deletes.dropped),
        ):
            family = kind(name, text)
            family.add_metric([], number)
            yield family
        if status.sharing is not None:
            shared = CounterMetricFamily(
                "kvtier_redis_shared_pages",
                "New pages offered to the shared tier (share_puts), by what became of them.",
                labels=["result"])
            for result in ("shared", "present", "dropped", "failed"):
                shared.add_metric([result], getattr(status.sharing, result))
            yield shared

    @staticmethod
    def _policy(stats: Any) -> Iterable[Metric]:
        status = stats.policy
        info = GaugeMetricFamily(
            "kvtier_policy_info", "The configured policy and the one deciding now.",
            labels=["policy", "active"],
        )
        info.add_metric([str(status.name), str(status.active)], 1.0)
        fallback = GaugeMetricFamily(
            "kvtier_policy_fallback_active",
            "1 while the simple fallback policy decides instead of the configured one.",
        )
        fallback.add_metric([], 1.0 if status.fallback_active else 0.0)
        dropped = CounterMetricFamily(
            "kvtier_policy_events_dropped",
            "Access events not handed to the policy (queue full or service down).",
        )
        # Dropped by the store's access-event queue, plus (for a remote policy) by the
        # policy client's own queue when it reports a count.
        dropped.add_metric(
            [], stats.access_events_dropped + status.events_dropped
        )
        yield from (info, fallback, dropped)
        # Same names as the policy service's own /metrics, so one dashboard query shows the
        # predictor wherever it runs (embedded in the daemon, or the kvtier-policy job).
        for attr, name, doc in (
            ("loss", "kvtier_policy_loss", "Recent training loss of the predictor."),
            ("online_accuracy", "kvtier_policy_online_accuracy",
             "Share of recent predictions the later accesses confirmed."),
        ):
            value = _number(getattr(status, attr))
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g

    @staticmethod
    def _pool(pool: BufferPool) -> Iterable[Metric]:
        free = GaugeMetricFamily("kvtier_buffer_pool_free_bytes",
                                 "Host page buffers kept for the next puts' copies.")
        free.add_metric([], pool.free_bytes)
        yield free
        takes = CounterMetricFamily("kvtier_buffer_pool_takes",
                                    "Page buffers handed to puts, reused (hit) or new (miss).",
                                    labels=["result"])
        takes.add_metric(["hit"], pool.hits)
        takes.add_metric(["miss"], pool.misses)
        yield takes
        ahead = CounterMetricFamily("kvtier_buffer_pool_prefaulted_bytes",
                                    "Page buffer bytes faulted in ahead of use by the reserve "
                                    "thread (KVTIER_HOST_BUFFER_RESERVE_BYTES).")
        ahead.add_metric([], pool.prefaulted_bytes)
        yield ahead

    def _rpc(self) -> Iterable[Metric]:
        received = CounterMetricFamily(
            "kvtier_rpc_received_bytes", "Request message bytes received, by method.",
            labels=["method"],
        )
        sent = CounterMetricFamily(
            "kvtier_rpc_sent_bytes", "Reply message bytes sent, by method.", labels=["method"]
        )
        bytes_in: dict[str, int] = defaultdict(int)
        bytes_out: dict[str, int] = defaultdict(int)
        for (method, _code), totals in self._rpc_stats.totals().items():
            bytes_in[method] += totals.bytes_in
            bytes_out[method] += totals.bytes_out
        for method in sorted(bytes_in):
            received.add_metric([method], bytes_in[method])
            sent.add_metric([method], bytes_out[method])
        yield from (received, sent)


class DaemonMetrics:
    """The daemon's registry: the store collector, the RPC latency histogram, process metrics.

    :meth:`attach` subscribes the histogram to the RPC stats; :meth:`detach` undoes it (the
    HTTP server does both around its lifetime so a stopped server leaves no observer behind).
    """

    def __init__(self, store: TierStore, rpc_stats: RpcStats, started_at: float,
                 buffers: BufferPool | None = None, relocator: Relocator | None = None,
                 limits: StreamLimits | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._rpc_stats = rpc_stats
        self._latency = Histogram(
            "kvtier_rpc_duration_seconds",
            "gRPC server-side call latency, by method and status code.",
            labelnames=["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StoreCollector(store, rpc_stats, started_at, buffers, relocator,
                                              limits))
        ProcessCollector(registry=self.registry)
        self._attached = False

    def observe(self, sample: RpcSample) -> None:
        self._latency.labels(sample.method, sample.code).observe(sample.seconds)

    def attach(self) -> None:
        if not self._attached:
            self._rpc_stats.add_observer(self.observe)
            self._attached = True

    def detach(self) -> None:
        if self._attached:
            self._rpc_stats.remove_observer(self.observe)
            self._attached = False

    def render(self) -> bytes:
        """The text exposition format of everything in the registry."""
        return generate_latest(self.registry)
