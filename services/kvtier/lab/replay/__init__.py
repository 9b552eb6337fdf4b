"""Trace replay: block-access traces through the live policies, in simulation
(:mod:`~kvtier.lab.replay.sim`, with Belady's bound) or against a running daemon
(:mod:`~kvtier.lab.replay.live`)."""
