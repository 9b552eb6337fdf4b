"""kvtier: a disaggregated KV-cache tiering service for LLM inference.

Layering (imports go one way only; ``tests/test_layering.py`` enforces it):

    types, errors                value objects, the error table
        <- config, pages, finite settings, page checks, the NaN/Inf check
        <- codecs                pure functions: page tensors <-> self-describing blobs
        <- store                 page index, tiers, moves, the mover, Redis, the policy interface
        <- policy                the live policies: classic cores, the learned predictor
        <- transport, admin      gRPC services and REST/metrics: validate, convert, call the core
        <- daemon                the store and its servers, composed
        <- procs, lab            child processes (redis-server, prometheus); eval, bench, replay
        <- cli                   the ``kvtier`` command

A module may import from its own layer or any layer above it in this list, never below. Only
``transport`` imports ``kvtier_proto``; only ``lab`` imports ``kvtier_client``; the daemon never
imports ``lab`` or ``procs``. No two modules import each other, directly or around a circle.
"""

__version__ = "0.1.0"
