"""Authentication of the gRPC ports.

    tokens.py     tenant tokens: the tokens file (hashes only) and the daemon's registry of it
    guard.py      the per-method table and the checks the error interceptor runs on each call
    exposure.py   the start-up rule: no unauthenticated port beyond loopback
"""
