"""Trace replay: block-access traces through the live policies, in simulation
(:mod:`~kvtier.lab.replay.sim`, with Belady's bound) or against a running daemon
(:mod:`~kvtier.lab.replay.live`).

Light to import (the command line lists the policies from here before loading any of them).
"""

SIM_POLICIES: tuple[str, ...] = ("lru", "lfu", "arc", "s3fifo", "chain-lru", "learned",
                                 "learned+hints", "belady")
"""The policies replay runs: the live ones (``chain-lru``: prefix-closed LRU;
``learned+hints``: the learned policy told the worker's queue and sessions), then Belady's
offline bound (report-only)."""
