"""``replay --compare``: every policy on the same trace and capacities, with uncertainty.

Prefix-hit ratios (the leading run of each request, what a paged cache can use) get 95%
bootstrap confidence intervals resampled by request (a request's blocks hit or miss together,
so blocks are not independent samples), and each policy's share of the LRU->Belady gap it
closes on prefix hits. Plain hit ratios follow as a secondary column. The bootstrap is seeded:
the same seed gives the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.lab.replay.sim import SimResult


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    capacity_blocks: int
    prefix_hit_ratio: float
    ci_low: float  # of the prefix-hit ratio
    ci_high: float
    gap_closed: float | None  # share of the LRU->Belady prefix-hit gap; None: no gap
    hit_ratio: float  # plain hits, secondary
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "capacity_blocks": self.capacity_blocks,
            "prefix_hit_ratio": round(self.prefix_hit_ratio, 6),
            "ci95": [round(self.ci_low, 6), round(self.ci_high, 6)],
            "gap_closed": None if self.gap_closed is None else round(self.gap_closed, 4),
            "hit_ratio": round(self.hit_ratio, 6),
            "seconds": round(self.seconds, 3),
        }


def bootstrap_ci(result: SimResult, *, seed: int, resamples: int = 1000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the prefix-hit ratio over requests drawn with replacement."""
    hits = np.asarray(result.request_prefix_hits, dtype=np.float64)
    acc = np.asarray(result.request_accesses, dtype=np.float64)
    n = len(hits)
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    ratios = np.empty(resamples)
    chunk = max(1, 2_000_000 // n)
    for lo in range(0, resamples, chunk):
        hi = min(resamples, lo + chunk)
        idx = rng.integers(0, n, size=(hi - lo, n))
        ratios[lo:hi] = hits[idx].sum(axis=1) / np.maximum(acc[idx].sum(axis=1), 1.0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def gap_closed(hit_ratio: float, lru: float, belady: float) -> float | None:
    if belady - lru <= 1e-12:
        return None
    return (hit_ratio - lru) / (belady - lru)


def rows_for(results: Sequence[SimResult], *, seed: int, resamples: int = 1000) -> list[Row]:
    """One row per result (all at one capacity); needs the ``lru`` and ``belady`` results."""
    by_name = {r.policy: r for r in results}
    lru = by_name["lru"].prefix_hit_ratio if "lru" in by_name else None
    opt = by_name["belady"].prefix_hit_ratio if "belady" in by_name else None
    rows = []
    for r in results:
        low, high = bootstrap_ci(r, seed=seed, resamples=resamples)
        gap = (gap_closed(r.prefix_hit_ratio, lru, opt)
               if lru is not None and opt is not None else None)
        rows.append(Row(r.policy, r.capacity_blocks, r.prefix_hit_ratio, low, high, gap,
                        r.hit_ratio, r.seconds))
    return rows


def format_table(rows: Sequence[Row], label: str) -> str:
    """A plain-text table for the terminal (and for pasting into a report)."""
    head = (f"{'capacity':>14} {'policy':>13} {'prefix hits':>11} {'95% CI':>17} "
            f"{'gap closed':>10} {'hits':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        gap = "-" if r.gap_closed is None else f"{100 * r.gap_closed:.1f}%"
        lines.append(f"{label:>14} {r.policy:>13} {100 * r.prefix_hit_ratio:10.2f}% "
                     f"[{100 * r.ci_low:6.2f}, {100 * r.ci_high:6.2f}]% {gap:>10} "
                     f"{100 * r.hit_ratio:6.2f}%")
    return "\n".join(lines)
