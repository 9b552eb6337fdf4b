"""/metrics moves as traffic flows: exact values after known puts, gets, moves and deletes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.procs.redis import RedisProcess
from kvtier.store.policy import LRUPolicy, PageMeta, PolicyStatus
from kvtier.transport.stats import RpcSample
from kvtier.types import EvictionReason

from .conftest import PAGE_BYTES, Admin, make_settings, make_test_page

NS = "metrics-ns"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(admin: Admin) -> Samples:
    r = admin.http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def keys_of(n: int) -> list[bytes]:
    return [bytes([0xB0, i]) for i in range(n)]


@pytest.fixture()
def quiet(start_admin: Callable[..., Admin], redis_url: str) -> Admin:
    """No mover thread: every move in these tests is one the test made."""
    return start_admin(make_settings(redis_url), mover=False)


def test_occupancy_and_put_outcomes(quiet: Admin) -> None:
    before = scrape(quiet)
    assert value(before, "kvtier_tier_pages", tier="hot") == 0
    assert value(before, "kvtier_tier_capacity_bytes", tier="hot") == 8 * PAGE_BYTES
    assert value(before, "kvtier_tier_capacity_bytes", tier="remote") == 64 * PAGE_BYTES
    assert value(before, "kvtier_tier_high_watermark_ratio", tier="warm") == 0.9
    assert value(before, "kvtier_tier_low_watermark_ratio", tier="warm") == 0.75
    keys = keys_of(4)
    quiet.store.put(NS, [(k, make_test_page(i)) for i, k in enumerate(keys)])
    quiet.store.put(NS, [(keys[0], make_test_page(0))])  # idempotent: EXISTS
    m = scrape(quiet)
    assert value(m, "kvtier_tier_pages", tier="hot") == 4
    assert value(m, "kvtier_tier_bytes", tier="hot") == 4 * PAGE_BYTES
    assert value(m, "kvtier_tier_pages", tier="warm") == 0
    assert value(m, "kvtier_put_keys_total", outcome="stored") == 4
    assert value(m, "kvtier_put_keys_total", outcome="exists") == 1


def test_hits_and_misses_per_tier(quiet: Admin) -> None:
    keys = keys_of(4)
    quiet.store.put(NS, [(k, make_test_page(i)) for i, k in enumerate(keys)])
    quiet.store.demote(NS, [keys[3]], "warm")
    quiet.store.get(NS, keys[:3] + [b"\xff\xffnope"])  # 3 hot hits, 1 full miss
    quiet.store.get(NS, [keys[3]])  # a warm hit: a miss of hot
    m = scrape(quiet)
    assert value(m, "kvtier_get_keys_total") == 5
    assert value(m, "kvtier_get_hits_total") == 4
    assert value(m, "kvtier_get_misses_total") == 1
    assert value(m, "kvtier_tier_hits_total", tier="hot") == 3
    assert value(m, "kvtier_tier_hits_total", tier="warm") == 1
    assert value(m, "kvtier_tier_hits_total", tier="cold") == 0
    assert value(m, "kvtier_tier_misses_total", tier="hot") == 2
    assert value(m, "kvtier_tier_misses_total", tier="warm") == 1
    assert value(m, "kvtier_tier_misses_total", tier="remote") == 1


def test_demotions_promotions_evictions_and_codec_time(quiet: Admin) -> None:
    keys = keys_of(3)
    quiet.store.put(NS, [(k, make_test_page(i)) for i, k in enumerate(keys)])
    quiet.store.demote(NS, keys[:2], "warm")
    m = scrape(quiet)
    assert value(m, "kvtier_tier_demotions_total", tier="hot") == 2
    assert value(m, "kvtier_tier_pages", tier="hot") == 1
    assert value(m, "kvtier_tier_pages", tier="warm") == 2
    assert value(m, "kvtier_codec_calls_total", op="encode", codec="int8") >= 2
    assert value(m, "kvtier_codec_seconds_total", op="encode", codec="int8") > 0
    quiet.store.promote(NS, keys[:1], "hot")
    quiet.store.demote(NS, keys[1:2], "cold")
    quiet.store.delete(NS, keys[2:3])
    m = scrape(quiet)
    assert value(m, "kvtier_tier_promotions_total", tier="hot") == 1
    assert value(m, "kvtier_tier_demotions_total", tier="warm") == 1
    assert value(m, "kvtier_tier_pages", tier="cold") == 1
    assert value(m, "kvtier_tier_evictions_total", tier="hot", reason="deleted") == 1
    # Every reason of every tier is exported from the first scrape (bounded label set).
    for tier in ("hot", "warm", "cold", "remote"):
        for reason in EvictionReason:
            value(m, "kvtier_tier_evictions_total", tier=tier, reason=reason.value)
    assert value(m, "kvtier_tier_evictions_total", tier="hot", reason="capacity") == 0


def test_rpc_latency_histogram_and_bytes(quiet: Admin) -> None:
    stats = quiet.context.rpc_stats
    for _ in range(3):
        stats.record(RpcSample("Get", "OK", 0.003, 100, 5000))
    stats.record(RpcSample("Put", "INVALID_ARGUMENT", 0.0002, 70, 10))
    stats.record(RpcSample("Put", "OK", 0.7, 9000, 20))
    m = scrape(quiet)
    h = "kvtier_rpc_duration_seconds"
    assert value(m, f"{h}_count", method="Get", code="OK") == 3
    assert value(m, f"{h}_sum", method="Get", code="OK") == pytest.approx(0.009)
    assert value(m, f"{h}_bucket", method="Get", code="OK", le="0.0025") == 0
    assert value(m, f"{h}_bucket", method="Get", code="OK", le="0.005") == 3
    assert value(m, f"{h}_bucket", method="Put", code="INVALID_ARGUMENT", le="0.00025") == 1
    assert value(m, f"{h}_bucket", method="Put", code="OK", le="0.5") == 0
    assert value(m, f"{h}_bucket", method="Put", code="OK", le="1.0") == 1
    assert value(m, "kvtier_rpc_received_bytes_total", method="Get") == 300
    assert value(m, "kvtier_rpc_sent_bytes_total", method="Get") == 15000
    assert value(m, "kvtier_rpc_received_bytes_total", method="Put") == 9070
    assert value(m, "kvtier_rpc_sent_bytes_total", method="Put") == 30


def test_buffer_pool_metrics_follow_the_pool(quiet: Admin) -> None:
    pool = quiet.context.buffers
    m = scrape(quiet)
    assert value(m, "kvtier_buffer_pool_free_bytes") == 0
    assert value(m, "kvtier_buffer_pool_takes_total", result="miss") == 0
    buf = pool.take(4096)
    del buf  # back in the pool
    again = pool.take(4096)
    m = scrape(quiet)
    assert value(m, "kvtier_buffer_pool_takes_total", result="miss") == 1
    assert value(m, "kvtier_buffer_pool_takes_total", result="hit") == 1
    assert value(m, "kvtier_buffer_pool_free_bytes") == 0
    del again
    assert value(scrape(quiet), "kvtier_buffer_pool_free_bytes") == 4096


def test_buffers_faulted_in_ahead_are_counted(quiet: Admin) -> None:
    from kvtier.admin.metrics import DaemonMetrics
    from kvtier.store.buffers import BufferPool

    ctx = quiet.context
    pool = BufferPool(1 << 20, reserve_bytes=1 << 18)
    metrics = DaemonMetrics(ctx.store, ctx.rpc_stats, ctx.started_at, pool)
    assert "kvtier_buffer_pool_prefaulted_bytes_total 0.0" in metrics.render().decode()
    buf = pool.take(1 << 16)
    deadline = time.monotonic() + 5
    while pool.prefaulted_bytes < 1 << 18 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f"kvtier_buffer_pool_prefaulted_bytes_total {float(1 << 18)}" in \
        metrics.render().decode()
    pool.close()
    del buf


def test_lent_pages_copied_out_are_counted(quiet: Admin) -> None:
    from kvtier.admin.metrics import DaemonMetrics
    from kvtier.transport.shm.relocate import Relocator

    ctx = quiet.context
    assert not [k for k in scrape(quiet) if k[0].startswith("kvtier_shm_")]  # no relocator
    relocator = Relocator(ctx.store, ctx.buffers)
    metrics = DaemonMetrics(ctx.store, ctx.rpc_stats, ctx.started_at, ctx.buffers, relocator)
    relocator.pages_moved = 3  # as after copying out three pages
    text = metrics.render().decode()
    assert "kvtier_shm_lent_pages_copied_out_total 3.0" in text


def test_redis_up_follows_the_backend(
    start_admin: Callable[..., Admin], private_redis: RedisProcess
) -> None:
    admin = start_admin(make_settings(private_redis.url), mover=False)
    assert value(scrape(admin), "kvtier_redis_up") == 1
    keys = keys_of(1)
    admin.store.put(NS, [(keys[0], make_test_page(0))])
    admin.store.demote(NS, keys, "remote")
    private_redis.stop()
    assert admin.store.get(NS, keys) == [None]
    assert value(scrape(admin), "kvtier_redis_up") == 0


def test_no_redis_series_without_a_redis_backend(start_admin: Callable[..., Admin]) -> None:
    m = scrape(start_admin(make_settings(None), mover=False))
    assert not [k for k in m if k[0] == "kvtier_redis_up"]
    assert value(m, "kvtier_tier_pages", tier="cold") == 0


class ReportingPolicy(LRUPolicy):
    """LRU that reports predictor figures and a fallback, to check their export."""

    name = "reporting"

    def __init__(self, loss: float | None) -> None:
        self.loss = loss

    def score(self, pages: Sequence[PageMeta]) -> list[float]:
        return super().score(pages)

    def status(self) -> PolicyStatus:
        return PolicyStatus(name="learned", active="lru", fallback_active=True,
                               detail="untrained", events_dropped=7, loss=self.loss,
                               online_accuracy=0.625)


def test_policy_metrics(quiet: Admin) -> None:
    m = scrape(quiet)
    assert value(m, "kvtier_policy_info", policy="lru", active="lru") == 1
    assert value(m, "kvtier_policy_fallback_active") == 0
    assert value(m, "kvtier_policy_events_dropped_total") == 0
    assert not [k for k in m if k[0] == "kvtier_policy_loss"]
    quiet.store.set_policy(ReportingPolicy(loss=0.25))
    m = scrape(quiet)
    assert value(m, "kvtier_policy_info", policy="learned", active="lru") == 1
    assert value(m, "kvtier_policy_fallback_active") == 1
    assert value(m, "kvtier_policy_events_dropped_total") == 7
    assert value(m, "kvtier_policy_loss") == 0.25
    assert value(m, "kvtier_policy_online_accuracy") == 0.625
    quiet.store.set_policy(ReportingPolicy(loss=float("nan")))  # no loss yet: no sample
    assert not [k for k in scrape(quiet) if k[0] == "kvtier_policy_loss"]


def test_every_label_is_bounded(quiet: Admin) -> None:
    keys = keys_of(2)
    quiet.store.put(NS, [(k, make_test_page(i)) for i, k in enumerate(keys)])
    quiet.store.get(NS, keys)
    quiet.context.rpc_stats.record(RpcSample("Get", "OK", 0.001, 1, 1))
    allowed = {"tier", "reason", "op", "codec", "method", "code", "outcome", "policy",
               "active", "result", "le", "state", "kind"}
    named: set[str] = set()
    for name, labels in scrape(quiet):
        if name.startswith("kvtier_namespace_"):  # the top N namespaces and "(other)" only
            assert {k for k, _ in labels} <= allowed | {"namespace"}, name
            named |= {v for k, v in labels if k == "namespace"}
        elif name.startswith("kvtier_"):
            assert {k for k, _ in labels} <= allowed, name
            assert NS not in {v for _, v in labels}, f"{name} has a namespace label value"
    assert len(named) <= quiet.context.settings.quotas.top_namespaces + 1
