"""A generated trace of another shape than the conversation trace, for tests and reports.

Three kinds of traffic share one clock, each session arriving as a Poisson process:

- **agent loops**: a tool-using agent over one of a few shared system prompts (1-40 blocks):
  many quick turns (seconds apart), each appending one or two blocks of tool output;
- **RAG**: a system prompt, one of many documents drawn by popularity (Zipf), a one-block
  question; popular documents come back, the question never does;
- **chat**: conversations of a few turns minutes apart, each turn appending a few blocks.

Block ids are prefix hashes numbered densely in order of first appearance, as in Mooncake
traces, and the last block of every prompt is partial (re-hashed by the next turn), so it is a
file of the same format (:func:`to_jsonl`) that any replay reads.
"""

from __future__ import annotations

import heapq
import json
import random

from kvtier.lab.replay.trace import Trace, TraceRequest

TOKENS_PER_BLOCK = 512


class _Ids:
    """Dense prefix-hash ids: the same path of content gets the same id."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, ...], int] = {}

    def chain(self, content: list[int]) -> tuple[int, ...]:
        out = []
        for i in range(len(content)):
            path = tuple(content[: i + 1])
            got = self._ids.get(path)
            if got is None:
                got = self._ids[path] = len(self._ids)
            out.append(got)
        return tuple(out)


def synthetic_trace(requests: int = 6000, *, seed: int = 0, rate_per_s: float = 4.0) -> Trace:
    """About ``requests`` requests of agent, RAG and chat traffic (module docstring)."""
    rng = random.Random(seed)
    ids = _Ids()
    fresh = iter(range(10**9, 2 * 10**9))
    prompts = [[next(fresh) for _ in range(rng.choice((1, 2, 4, 8, 16, 40)))]
               for _ in range(6)]
    docs = [[next(fresh) for _ in range(rng.randint(4, 20))] for _ in range(400)]
    doc_weights = [1.0 / (i + 1) ** 0.9 for i in range(len(docs))]
    events: list[tuple[float, int, str, list[int], int]] = []  # (time, tie, kind, content, left)
    tie = 0
    t = 0.0
    while tie < requests:
        t += rng.expovariate(rate_per_s / 3.0)
        kind = rng.choices(("agent", "rag", "chat"), weights=(1, 6, 3))[0]
        base = list(rng.choice(prompts))
        if kind == "agent":
            content, turns = base + [next(fresh)], rng.randint(3, 30)
        elif kind == "rag":
            doc = rng.choices(docs, weights=doc_weights)[0]
            content, turns = base + doc + [next(fresh)], 1
        else:
            content, turns = base + [next(fresh) for _ in range(rng.randint(1, 4))], \
                rng.choice((1, 1, 2, 3, 5, 8))
        heapq.heappush(events, (t, tie, kind, content, turns))
        tie += 1
    out: list[TraceRequest] = []
    while events and len(out) < requests:
        when, _, kind, content, left = heapq.heappop(events)
        blocks = ids.chain(content)
        out.append(TraceRequest(int(when * 1000), TOKENS_PER_BLOCK * len(blocks) - 100,
                                rng.randint(20, 600), blocks))
        if left > 1:
            # the next turn keeps all full blocks (the partial last one is re-hashed) and adds
            grown = content[:-1] + [next(fresh)] + [next(fresh) for _ in range(
                rng.randint(1, 2) if kind == "agent" else rng.randint(1, 4))]
            gap = rng.uniform(1.0, 8.0) if kind == "agent" else rng.lognormvariate(4.5, 1.0)
            tie += 1
            heapq.heappush(events, (when + gap, tie, kind, grown, left - 1))
    out.sort(key=lambda r: r.timestamp_ms)
    return Trace(f"synthetic-{seed}", tuple(out))


def to_jsonl(trace: Trace) -> str:
    """The trace in the Mooncake record format, one JSON object per line."""
    return "".join(json.dumps({"timestamp": r.timestamp_ms, "input_length": r.input_length,
                               "output_length": r.output_length, "hash_ids": list(r.blocks)})
                   + "\n" for r in trace.requests)
