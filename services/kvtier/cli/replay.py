"""``kvtier replay TRACE``: replay a block-access trace in simulation or against a daemon.

Simulation (default): a single cache of ``--capacity`` slots (a fraction of the trace's
distinct blocks when below 1, else a block count), or with ``--tiers`` the configured tier
stack with the same total split in proportion to the tiers' byte capacities. ``--compare`` runs
every policy (and Belady's bound) at each capacity and prints hit ratios with 95% bootstrap
intervals and the share of the LRU->Belady gap closed, all on prefix hits (the leading run of
each request, what a paged cache can use; plain hits follow). ``--live`` drives a daemon
(``--target``, or one started here with in-memory tiers sized from the capacity) the way a
worker would.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kvtier.errors import InvalidArgument
from kvtier.lab.replay import SIM_POLICIES

if TYPE_CHECKING:
    from kvtier.lab.replay.sim import Progress
    from kvtier.lab.replay.trace import Trace, TraceRequest


def register(sub: Any) -> None:
    p = sub.add_parser("replay", help="replay a block-access trace (simulation or live)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="JSONL trace in the Mooncake format (plain, .xz or .gz), or "
                                 "'synthetic[:SEED]' for the generated agent/RAG/chat trace")
    p.add_argument("--capacity", default="0.05",
                   help="cache size: fraction of distinct blocks (<1) or block count; a "
                        "comma-separated list with --compare (default 0.05)")
    p.add_argument("--policy", default="learned", choices=SIM_POLICIES,
                   help="the policy to replay (default learned; belady: the offline bound)")
    p.add_argument("--tiers", action="store_true", help="simulate the tier stack")
    p.add_argument("--compare", action="store_true", help="all policies, with 95%% CIs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the learned policy, the bootstrap and live page contents")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--device", default="cpu", help="torch device for the predictor")
    p.add_argument("--config", default=None, help="settings JSON (tier stack for --tiers)")
    p.add_argument("--costs", action="store_true",
                   help="measure the learned policy's decision latency and learning CPU share")
    p.add_argument("--live", action="store_true", help="replay against a daemon")
    p.add_argument("--target", default=None,
                   help="daemon host:port (live; default: start one); several, comma-separated, "
                        "split the requests among daemons that share a Redis tier")
    p.add_argument("--queue", type=int, default=32,
                   help="learned+hints: look-ahead of the worker's queue, in requests "
                        "(default 32); only requests that have arrived are in it")
    p.add_argument("--page-bytes", type=int, default=16384, help="live page payload size")
    p.add_argument("--namespace", default="replay",
                   help="namespace of the live replay's keys (default replay)")
    p.set_defaults(func=run)


def _progress(label: str, total: int) -> Progress | None:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    def wrap(it: Iterator[TraceRequest]) -> Iterator[TraceRequest]:
        return iter(tqdm(it, total=total, desc=label, unit="req", leave=False))

    return wrap


def _capacities(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgument(f"must be numbers, got {text!r}", field="capacity") from None
    if not values:
        raise InvalidArgument("is empty", field="capacity")
    return values


def _load(text: str) -> Trace:
    from kvtier.lab.replay.trace import load_trace

    name, _, seed = text.partition(":")
    if name == "synthetic":
        from kvtier.lab.replay.synth import synthetic_trace

        try:
            return synthetic_trace(seed=int(seed or 0))
        except ValueError:
            raise InvalidArgument(f"synthetic:SEED needs an integer seed, got {seed!r}",
                                  field="trace") from None
    return load_trace(text)


def _tier_weights(args: argparse.Namespace) -> list[tuple[str, int]]:
    from kvtier.config import load_settings

    settings = load_settings(args.config)
    return [(t.name, t.capacity_bytes) for t in settings.tiers]


def run(args: argparse.Namespace) -> int:
    import torch

    from kvtier.lab.replay.sim import capacity_blocks
    from kvtier.lab.replay.trace import Trace

    torch.set_num_threads(1)  # a tiny MLP: one thread is fastest and deterministic
    try:
        trace = _load(args.trace)
        if args.limit is not None:
            if args.limit < 1:
                raise InvalidArgument("must be at least 1", field="limit")
            trace = Trace(trace.name, trace.requests[: args.limit])
        caps = [capacity_blocks(trace, c) for c in _capacities(args.capacity)]
        if args.costs:
            out = _costs(args, trace)
        elif args.live:
            out = _live(args, trace, caps[0])
        elif args.compare:
            out = _compare(args, trace, caps)
        else:
            out = _single(args, trace, caps[0])
    except InvalidArgument as e:
        print(f"kvtier replay: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    return 0


def _single(args: argparse.Namespace, trace: Trace, cap: int) -> dict[str, Any]:
    from kvtier.lab.replay.runner import run_policy
    from kvtier.lab.replay.sim import split_capacity

    tiers = split_capacity(cap, _tier_weights(args)) if args.tiers else None
    r = run_policy(trace, args.policy, cap, tiers=tiers, seed=args.seed, device=args.device,
                   progress=_progress(args.policy, len(trace.requests)), queue=args.queue)
    out = {"trace": trace.name, "seed": args.seed, **r.to_json()}
    if not args.json:
        print(f"{r.policy}: {r.prefix_hits}/{r.accesses} prefix hits = "
              f"{100 * r.prefix_hit_ratio:.2f}% at {r.capacity_blocks} blocks (all hits "
              f"{100 * r.hit_ratio:.2f}%) in {r.seconds:.1f}s")
        for name, h in r.tiers.items():
            print(f"  {name:>8}: {h} hits ({r.tier_capacities[name]} slots)")
        if r.detail:
            print(f"  {r.detail}")
    return out


def _compare(args: argparse.Namespace, trace: Trace, caps: list[int]) -> dict[str, Any]:
    from kvtier.lab.replay.compare import format_table, rows_for
    from kvtier.lab.replay.runner import run_policy
    from kvtier.lab.replay.sim import split_capacity

    tables = []
    distinct = trace.distinct_blocks()
    for cap in caps:
        tiers = split_capacity(cap, _tier_weights(args)) if args.tiers else None
        results = [run_policy(trace, name, cap, tiers=tiers if name != "belady" else None,
                              seed=args.seed, device=args.device,
                              progress=_progress(f"{name}@{cap}", len(trace.requests)),
                              queue=args.queue)
                   for name in SIM_POLICIES]
        rows = rows_for(results, seed=args.seed, resamples=args.resamples)
        label = f"{cap} ({100 * cap / distinct:.1f}%)"
        if not args.json:
            print(format_table(rows, label))
            print()
        tables.append({"capacity_blocks": cap, "rows": [r.to_json() for r in rows],
                       "results": [r.to_json() for r in results]})
    return {"trace": trace.name, "seed": args.seed, "accesses": trace.accesses,
            "distinct_blocks": distinct, "compare": tables}


def _live(args: argparse.Namespace, trace: Trace, cap: int) -> dict[str, Any]:
    from kvtier.config import MiB, TierConfig, load_settings
    from kvtier.lab.replay.live import replay_live
    from kvtier.lab.replay.sim import split_capacity
    from kvtier.types import Medium

    progress = _progress("live", len(trace.requests))
    if args.target:
        r = replay_live(trace, [t for t in args.target.split(",") if t],
                        namespace=args.namespace, page_bytes=args.page_bytes, seed=args.seed,
                        progress=progress)
    else:
        from kvtier.daemon import Daemon

        base = load_settings(args.config)
        memory = [t for t in base.tiers if t.medium is not Medium.REDIS]
        total = cap * args.page_bytes
        split = split_capacity(total, [(t.name, t.capacity_bytes) for t in memory])
        tiers = [TierConfig(name=t.name, medium=t.medium, codec=t.codec,
                            capacity_bytes=max(size, MiB // 16))
                 for t, (_, size) in zip(memory, split, strict=True)]
        policy = "lru" if args.policy == "belady" else args.policy
        settings = load_settings(args.config, grpc_port=0, tiers=[t.model_dump() for t in tiers],
                                 policy={"name": policy}, redis={"url": None})
        with Daemon(settings) as daemon:
            r = replay_live(trace, daemon.grpc_address, namespace=args.namespace,
                            page_bytes=args.page_bytes, seed=args.seed, progress=progress)
    if not args.json:
        print(f"live ({r.policy}): {r.hits}/{r.accesses} prefix hits = "
              f"{100 * r.hit_ratio:.2f}%, present {r.present}, tiers {r.tiers}")
        print(f"  bytes put {r.bytes_put}, got {r.bytes_got}; get latency ms {r.get_ms}; "
              f"{r.seconds:.1f}s")
        if r.daemons > 1:
            print(f"  {r.daemons} daemons: {r.cross_hits} hits on a daemon that never put "
                  f"the block = {100 * r.cross_hits / max(1, r.accesses):.2f}% of accesses, "
                  f"{100 * r.cross_hits / max(1, r.hits):.1f}% of hits")
    return {"trace": trace.name, "seed": args.seed, "capacity_blocks": cap, **r.to_json()}


def _costs(args: argparse.Namespace, trace: Trace) -> dict[str, Any]:
    from kvtier.lab.replay.costs import measure_costs

    c = measure_costs(trace, seed=args.seed, device=args.device)
    if not args.json:
        print(f"decision: victims() among {c.candidates} candidates: best {c.decision_us_min:.1f}"
              f" us, p50 {c.decision_us_p50:.1f} us, p99 {c.decision_us_p99:.1f} us (trained: "
              f"{c.ready}); {c.candidates} plain dict lookups take {c.baseline_us_min:.1f} us "
              f"here now (ratio {c.decision_us_min / c.baseline_us_min:.1f}x)")
        print(f"learning: {c.learn_cpu_s:.2f} CPU s (AdamW {c.train_cpu_s:.2f} s) for "
              f"{c.accesses} accesses over {c.trace_s:.0f} s of trace = "
              f"{100 * c.core_share:.3f}% of one core at the real-time rate")
    return {"trace": trace.name, "seed": args.seed, **c.to_json()}
