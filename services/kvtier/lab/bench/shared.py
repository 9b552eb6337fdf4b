"""``kvtier bench shared``: the shared Redis tier through a daemon, Redis Cluster vs one Redis.

In one run it starts a ``redis-server`` and a local Redis Cluster (``--primaries`` primaries,
``--replicas`` replicas each), one ``kvtier serve`` process on each, and measures through each
daemon's client, in interleaved rounds (the backend order alternating):

- ``put``: ``KVTierClient.put`` of one page. The daemon's stack is a one-page ``hot`` tier over
  the Redis tier, so every put pushes the page before it down to Redis inside the call (make
  room, encode with ``--codec``, one Redis write): the figure is a write to the shared tier as a
  worker waits for it;
- ``get``: ``KVTierClient.get`` of ``--batch`` pages that only Redis holds (one round trip per
  batch: one pipeline per shard, all shards at once), decoded by the daemon;

each with ``--clients`` client threads at once. It reports pages/s, MB/s of page data and
latency percentiles per call, per backend and round, and the cluster/single ratios of the same
round (the machine is shared and noisy: read the ratios and the spread over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import redis

from kvtier.procs.daemon import DaemonProcess
from kvtier.procs.redis import RedisProcess
from kvtier.procs.redis_cluster import RedisCluster

HEAD_DIM = 128
OPS = ("put", "get")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "shared", help="shared Redis tier through a daemon: Redis Cluster vs one Redis")
    p.add_argument("--page-kib", type=int, default=256, help="page size k+v in KiB")
    p.add_argument("--pages", type=int, default=256, help="pages put (and got) per round")
    p.add_argument("--batch", type=int, default=8, help="pages per get call")
    p.add_argument("--clients", type=int, default=2, help="client threads at once")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--primaries", type=int, default=3,
                   help="primaries of the local Redis Cluster")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each primary")
    p.add_argument("--codec", default="none", choices=["none", "int8", "int4", "int4a"],
                   help="the Redis tier's codec (none: the tier's own cost, no encoding)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def daemon_settings(url: str, cluster: bool, page_bytes: int, codec: str) -> dict[str, Any]:
    """One page of ``hot`` over the Redis tier: a put writes the page before it to Redis."""
    tiers = [
        {"name": "hot", "medium": "host", "codec": "none", "capacity_bytes": page_bytes,
         "high_watermark": 1.0, "low_watermark": 0.5},
        {"name": "remote", "medium": "redis", "codec": codec, "capacity_bytes": 64 << 30},
    ]
    return {"tiers": tiers, "device": "cpu", "policy": {"name": "lru"},
            "redis": {"url": url, "cluster": cluster, "prefix": "bench"}}


def _pages(page_bytes: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = max(1, page_bytes // (2 * 2 * HEAD_DIM))
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((1, tokens, 1, HEAD_DIM)).astype(np.float16),
             rng.standard_normal((1, tokens, 1, HEAD_DIM)).astype(np.float16))
            for _ in range(n)]


def _timed(clients: Sequence[Any], work: Sequence[Callable[[Any], object]]
           ) -> tuple[float, list[float]]:
    """Run ``work`` items over one thread per client (each item is given the thread's
    client); wall seconds and per-call latencies."""
    lat: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    items = iter(work)

    def loop(client: Any) -> None:
        while True:
            with lock:
                job = next(items, None)
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                job(client)
            except BaseException as e:  # raised below, in the caller's thread
                errors.append(e)
                return
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)

    threads = [threading.Thread(target=loop, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, lat


def _round(daemon: DaemonProcess, rnd: int, pages: list[tuple[np.ndarray, np.ndarray]],
           batch: int, clients: int, page_bytes: int) -> dict[str, dict[str, float]]:
    from kvtier_client import KVTierClient, Page

    keys = [b"r%d-p%d" % (rnd, i) for i in range(len(pages))]
    pool = [KVTierClient(daemon.address, "bench", timeout_s=60) for _ in range(clients)]
    try:
        put_work = [(lambda c, k=k, p=p: c.put([k], [Page(p[0], p[1], 64)]))
                    for k, p in zip(keys, pages, strict=True)]
        put_s, put_lat = _timed(pool, put_work)
        stored = keys[:-1]  # the last page is still in hot
        rng = np.random.default_rng(rnd)
        batches = [[stored[int(i)] for i in rng.choice(len(stored), batch, replace=False)]
                   for _ in range(max(1, len(stored) // batch))]
        missing: list[int] = []
        get_work = [(lambda c, b=b: missing.append(sum(g is None for g in c.get(b))))
                    for b in batches]
        get_s, get_lat = _timed(pool, get_work)
        if sum(missing):
            raise RuntimeError(f"{sum(missing)} pages missing from the shared tier")
    finally:
        for c in pool:
            c.close()
    return {"put": _figures(len(keys), put_s, put_lat, page_bytes),
            "get": _figures(len(batches) * batch, get_s, get_lat, page_bytes)}


def _figures(pages: int, seconds: float, lat: list[float], page_bytes: int) -> dict[str, float]:
    ms = np.asarray(lat) * 1000.0
    return {"pages_per_s": round(pages / seconds, 1),
            "mb_per_s": round(pages * page_bytes / seconds / 1e6, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def run(args: argparse.Namespace) -> int:
    page_bytes = args.page_kib * 1024
    pages = _pages(page_bytes, args.pages)
    page_bytes = int(pages[0][0].nbytes + pages[0][1].nbytes)
    with ExitStack() as stack:
        single = stack.enter_context(RedisProcess())
        cluster = stack.enter_context(RedisCluster(args.primaries, args.replicas))
        backends = {
            "single": DaemonProcess(daemon_settings(single.url, False, page_bytes, args.codec)),
            "cluster": DaemonProcess(daemon_settings(cluster.url, True, page_bytes,
                                                     args.codec)),
        }
        for d in backends.values():
            stack.callback(d.close)
            d.start()
        flush: dict[str, Callable[[], None]] = {
            "single": lambda: _flush([single.url]),
            "cluster": lambda: _flush([f"redis://{n.name}" for n in cluster.primary_nodes()]),
        }
        rounds: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            order = ("single", "cluster") if rnd % 2 == 0 else ("cluster", "single")
            result: dict[str, Any] = {}
            for name in order:
                flush[name]()
                result[name] = _round(backends[name], rnd, pages, args.batch, args.clients,
                                      page_bytes)
            result["ratio"] = {op: round(result["cluster"][op]["pages_per_s"]
                                         / result["single"][op]["pages_per_s"], 2)
                               for op in OPS}
            rounds.append(result)
            if not args.json:
                _print_round(rnd, result)
    summary = {op: {"cluster_over_single": [r["ratio"][op] for r in rounds],
                    "median": statistics.median(r["ratio"][op] for r in rounds)} for op in OPS}
    out = {"page_bytes": page_bytes, "pages": args.pages, "batch": args.batch,
           "clients": args.clients, "codec": args.codec, "primaries": args.primaries,
           "replicas": args.replicas, "rounds": rounds, "summary": summary}
    if args.json:
        print(json.dumps(out))
    else:
        for op in OPS:
            print(f"{op}: cluster/single throughput {summary[op]['cluster_over_single']} "
                  f"(median {summary[op]['median']})")
    return 0


def _flush(urls: list[str]) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        client.flushall()
        client.close()


def _print_round(rnd: int, result: dict[str, Any]) -> None:
    for name in ("single", "cluster"):
        for op in OPS:
            f = result[name][op]
            print(f"round {rnd} {name:>7} {op}: {f['pages_per_s']:8.1f} pages/s "
                  f"{f['mb_per_s']:7.1f} MB/s  p50 {f['p50_ms']:.2f} p90 {f['p90_ms']:.2f} "
                  f"p99 {f['p99_ms']:.2f} ms", flush=True)
    print(f"round {rnd} ratio cluster/single: put {result['ratio']['put']} "
          f"get {result['ratio']['get']}", flush=True)

