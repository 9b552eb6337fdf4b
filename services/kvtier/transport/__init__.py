"""gRPC transport of the cache daemon: servicer, interceptor, shared-memory sessions, server.

Thin by design: validate (kvtier.pages), convert wire messages to store calls, convert back.
"""
