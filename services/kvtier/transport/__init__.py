"""gRPC transports of kvtier: the cache service, its same-host shared-memory path, and the
policy service with its client.

    cache/        the CacheService servicer, wire conversions, the daemon's gRPC server
    shm/          same-host shared-memory sessions: segments, lent pages, fill words, copy-out
    policy/       the PolicyService (a policy out of process) and the daemon's client of it
    interceptor   the one error interceptor (the error table) and per-call statistics
    context       what the daemon's servers share (store, buffers, health, statistics)

Thin by design: validate (kvtier.pages), convert wire messages to store calls, convert back.
Only this package imports ``kvtier_proto``.
"""
