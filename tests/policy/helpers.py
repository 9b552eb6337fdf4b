"""Small builders for policy tests: hand-made traces and access events."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvtier.lab.replay.trace import Trace, TraceRequest
from kvtier.store.policy import AccessEvent, AccessKind, PageMeta
from kvtier.types import Namespace, PageId, PageKey


def make_trace(*chains: Sequence[int], gap_ms: int = 1000) -> Trace:
    """One request per chain, ``gap_ms`` apart."""
    return Trace("hand", tuple(TraceRequest(i * gap_ms, 512 * len(c), 1, tuple(c))
                               for i, c in enumerate(chains)))


def singles(seq: str) -> Trace:
    """Each character is a one-block request (a=0, b=1, ...)."""
    return make_trace(*[[ord(ch) - ord("a")] for ch in seq])


def write_trace(path: Path, trace: Trace) -> Path:
    path.write_text("".join(
        json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                    "output_length": r.output_length, "hash_ids": list(r.blocks)}) + "\n"
        for r in trace.requests))
    return path


def pid(name: str, ns: str = "t") -> PageId:
    return PageId(Namespace(ns), PageKey(name.encode()))


def event(name: str, seq: int, kind: AccessKind = AccessKind.GET, tier: str | None = "hot",
          chain: int = 0) -> AccessEvent:
    return AccessEvent(pid(name), seq, float(seq), kind, tier, 100, chain)


def meta(name: str, last_seq: int, count: int = 1, tier: str = "hot") -> PageMeta:
    return PageMeta(pid(name), tier, 0, 100, 0, last_seq, float(last_seq), count, 0)
