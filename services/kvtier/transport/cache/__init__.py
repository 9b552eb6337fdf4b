"""The ``kvtier.v1.CacheService``: servicer, wire conversions and the daemon's gRPC server."""
