"""kvtier: a disaggregated KV-cache tiering service for LLM inference.

Layering (imports go one way only; ``tests/test_layering.py`` enforces it):

    types, errors, config,     value objects, the error table, settings, page checks
    pages, finite
        <- codecs              pure functions: page tensors <-> self-describing blobs
        <- store               page index, tiers, mover, Redis backend, policy interface
        <- policy              baselines, the learned predictor, the policy service, replay
        <- transport, admin    gRPC servicer and REST/metrics: validate, convert, call the core
        <- eval, bench, cli    commands that compose everything above

A module may import from its own layer or any layer above it in this list, never below.
"""

__version__ = "0.1.0"
