"""Binding a gRPC server to its port, with the one clear error for a port that is taken."""

from __future__ import annotations

import socket

import grpc

from kvtier.errors import ConfigError


def bind_port(server: grpc.Server, host: str, port: int, field: str,
              credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``server`` to ``host:port`` (0: any free port); the port bound. A port in use is
    ConfigError naming ``field``, found before gRPC's core logs its own bind failure. With
    ``credentials`` the port speaks TLS only (:mod:`kvtier.transport.tls`)."""
    if port:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                probe.bind((host.strip("[]"), port))
        except OSError as e:
            raise ConfigError(f"cannot bind gRPC to {host}:{port}: {e.strerror}",
                              field=field) from None
    try:
        bound = (server.add_insecure_port(f"{host}:{port}") if credentials is None
                 else server.add_secure_port(f"{host}:{port}", credentials))
    except RuntimeError:  # grpcio raises where it used to answer 0
        bound = 0
    if bound == 0:
        raise ConfigError(f"cannot bind gRPC to {host}:{port} (in use or not permitted)",
                          field=field)
    return bound
