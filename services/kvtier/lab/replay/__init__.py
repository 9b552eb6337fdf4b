"""Trace replay: block-access traces through the live policies, in simulation
(:mod:`~kvtier.lab.replay.sim`, with Belady's bound) or against a running daemon
(:mod:`~kvtier.lab.replay.live`).

Light to import (the command line lists the policies from here before loading any of them).
"""

SIM_POLICIES: tuple[str, ...] = ("lru", "lfu", "arc", "s3fifo", "learned", "belady")
"""The policies replay runs: the live ones, then Belady's offline bound (report-only)."""
