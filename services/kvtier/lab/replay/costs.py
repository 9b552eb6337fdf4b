"""What the learned policy costs: decision latency and online-learning CPU share.

``kvtier replay TRACE --costs`` feeds the trace to a
:class:`~kvtier.policy.learned.policy.LearnedPolicy` as the store would (one GET event per
block, chain positions set), measuring the process CPU time of everything it does to learn
(features, labels, inference, AdamW steps), and compares it with the trace's own duration: the
share of one core it needs at the real-time rate. Then it times ``victims()`` over
``candidates`` pages drawn from recently seen blocks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from kvtier.lab.replay.trace import Trace
from kvtier.policy.learned.policy import LearnedPolicy
from kvtier.store.policy import AccessEvent, AccessKind, PageMeta
from kvtier.types import Namespace, PageId, PageKey


@dataclass(frozen=True, slots=True)
class Costs:
    candidates: int
    decision_us_min: float
    decision_us_p50: float
    decision_us_p99: float
    baseline_us_min: float  # 64 plain dict lookups, same run: how fast this machine is now
    learn_cpu_s: float
    train_cpu_s: float
    trace_s: float
    accesses: int
    ready: bool

    @property
    def core_share(self) -> float:
        """CPU seconds of learning per second of trace time (1.0 = one full core)."""
        return self.learn_cpu_s / self.trace_s if self.trace_s > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates, "decision_us_min": round(self.decision_us_min, 2),
            "decision_us_p50": round(self.decision_us_p50, 2),
            "baseline_us_min": round(self.baseline_us_min, 2),
            "decision_us_p99": round(self.decision_us_p99, 2),
            "learn_cpu_s": round(self.learn_cpu_s, 3), "train_cpu_s": round(self.train_cpu_s, 3),
            "trace_s": round(self.trace_s, 1), "core_share": round(self.core_share, 5),
            "accesses": self.accesses, "ready": self.ready,
        }


def measure_costs(trace: Trace, *, candidates: int = 64, decisions: int = 2000, seed: int = 0,
                  device: str = "cpu") -> Costs:
    policy = LearnedPolicy(seed=seed, device=device)
    ns = Namespace("costs")
    pages: dict[int, PageId] = {}
    seq = 0
    cpu0 = time.process_time()
    for req in trace.requests:
        events = []
        for j, b in enumerate(req.blocks):
            seq += 1
            p = pages.get(b)
            if p is None:
                p = pages[b] = PageId(ns, PageKey(b.to_bytes(8, "little")))
            events.append(AccessEvent(p, seq, req.timestamp_ms / 1000.0, AccessKind.GET,
                                      "hot", 1 << 16, j))
        policy.record(events)
    learn = time.process_time() - cpu0
    stats = policy.model.predictor.stats()
    rng = random.Random(seed)
    by_page = {p: p for p in pages.values()}
    recent = [(by_page[k], s) for k, s in list(policy.model.history.last.items())[-20 * candidates:]
              if k in by_page]
    times = []
    for _ in range(decisions):
        sample = rng.sample(recent, min(candidates, len(recent)))
        metas = [PageMeta(p, "hot", 0, 1 << 16, 0, s, 0.0, policy.model.history.count[p], 0)
                 for p, s in sample]
        t0 = time.perf_counter()
        policy.victims(metas, 8)
        times.append(time.perf_counter() - t0)
    times.sort()
    return Costs(candidates, times[0] * 1e6, times[len(times) // 2] * 1e6,
                 times[int(len(times) * 0.99)] * 1e6, _baseline_us(candidates), learn,
                 stats.train_seconds, trace.duration_s, seq, stats.ready)


def _baseline_us(n: int) -> float:
    """Best time of ``n`` dict lookups: the floor any per-candidate Python decision pays."""
    table = {i: (float(i), float(i), i) for i in range(100_000)}
    keys = list(range(0, 1000 * n, 1000))
    best = float("inf")
    for _ in range(2000):
        t0 = time.perf_counter()
        for k in keys:
            table.get(k)
        best = min(best, time.perf_counter() - t0)
    return best * 1e6
