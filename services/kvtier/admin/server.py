"""Serve the admin app with uvicorn on a thread of the daemon process, beside gRPC.

:func:`serve_http` binds the socket itself (so port 0 works and the real port is known before
the first request) and returns ``(server, port)``. :func:`start_http` is the daemon's
``start_http`` hook (:data:`kvtier.transport.context.StartHttp`): it applies the start-up rule
of :func:`kvtier.admin.auth.check_exposure` and serves on ``settings.http_host:http_port``.
:meth:`AdminHttpServer.stop` stops accepting, lets in-flight requests finish within the grace
period, then closes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from kvtier.admin.app import create_app
from kvtier.admin.auth import check_exposure
from kvtier.errors import ConfigError
from kvtier.transport.context import DaemonContext
from kvtier.transport.tls import uvicorn_ssl

log = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot listen for HTTP on {host}:{port}: {e.strerror}", field="http_port"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class AdminHttpServer:
    """A uvicorn server on its own thread and event loop. Start once, stop once."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 ssl: dict[str, Any] | None = None) -> None:
        self.host = host
        self.scheme = "https" if ssl else "http"
        self._sock = _bind(host, port)
        self._port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on",
            timeout_graceful_shutdown=5, **(ssl or {}),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, name=f"kvtier-http-{self._port}", daemon=True
        )
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self._port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as e:  # reported by start(); a thread must not die silently
            self._error = e
            log.exception("HTTP server on port %d stopped with an error", self._port)

    def start(self, timeout_s: float = 10.0) -> AdminHttpServer:
        """Start serving; return once requests are accepted (or raise)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"HTTP server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop(0.0)
                raise TimeoutError(f"HTTP server did not start within {timeout_s} s")
            time.sleep(0.01)
        log.info("HTTP admin, /metrics, /healthz, /readyz on %s", self.url)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting; in-flight requests get ``grace_s`` seconds to finish."""
        self._server.config.timeout_graceful_shutdown = max(0, int(round(grace_s)))
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=grace_s + 5.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=5.0)
        self._sock.close()


def serve_http(context: DaemonContext, host: str | None = None,
               port: int | None = None) -> tuple[AdminHttpServer, int]:
    """Serve the admin app of ``context``; defaults from its settings. Returns (server, port)."""
    settings = context.settings
    host = settings.http_host if host is None else host
    port = settings.http_port if port is None else port
    check_exposure(settings, host)
    server = AdminHttpServer(create_app(context), host, port,
                             ssl=uvicorn_ssl(settings.tls)).start()
    return server, server.port


def start_http(context: DaemonContext) -> AdminHttpServer:
    """The daemon's ``start_http`` hook: the HTTP server on ``http_host:http_port``."""
    server, _port = serve_http(context)
    return server
