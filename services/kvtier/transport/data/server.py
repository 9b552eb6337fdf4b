"""The data port: accepts data-channel connections and serves each on a thread of its own.

:class:`DataServer` binds at construction (port 0: any free port, which ``OpenData``
announces), starts accepting in :meth:`DataServer.start` and, in :meth:`DataServer.stop`, closes
the port and every connection. At most ``max_connections`` connections are served at once; one
more is answered RESOURCE_EXHAUSTED and closed, so no client can take the threads others need.
A connection idle for ``idle_timeout_s`` between frames is closed. With an ``ssl_context``
(the daemon's TLS), every connection is TLS (``OpenDataReply.tls``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from kvtier.errors import CapacityExhausted, ConfigError, status_for
from kvtier.transport.context import DaemonContext
from kvtier.transport.data.connection import HELLO_TIMEOUT_S, DataConnection
from kvtier.transport.data.tickets import TicketBook
from kvtier.types import Namespace
import kvtier_client.data_frame as f

log = logging.getLogger(__name__)


class DataServer:
    """The data channel's listening socket and its connections."""

    def __init__(self, ctx: DaemonContext, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._ctx = ctx
        self._cfg = ctx.settings.data
        self._ssl = ssl_context
        self.tickets = TicketBook(self._cfg.ticket_ttl_s)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._listener = socket.create_server((host.strip("[]"), port), family=family,
                                                  backlog=128)
        except OSError as e:
            raise ConfigError(f"cannot bind the data channel to {host}:{port}: {e.strerror}",
                              field="data.port") from None
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def open(self, namespace: Namespace, writable: bool, token: str | None = None) -> bytes:
        """A ticket for one connection of ``namespace`` (the ``OpenData`` call's work),
        checked again against ``token`` on every frame when the daemon takes tokens."""
        return self.tickets.issue(namespace, writable, token)

    def start(self) -> DataServer:
        self._thread = threading.Thread(target=self._accept, name="kvtier-data-accept",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for c in conns:  # wakes their threads, which close them
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5.0)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                full = len(self._conns) >= self._cfg.max_connections
                if not full:
                    self._conns.add(sock)
            if full:
                threading.Thread(target=self._refuse, args=(sock,), daemon=True,
                                 name="kvtier-data-refuse").start()
                continue
            threading.Thread(target=self._serve, args=(sock,), daemon=True,
                             name="kvtier-data-conn").start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = raw
            if self._ssl is not None:
                raw.settimeout(HELLO_TIMEOUT_S)
                sock = self._ssl.wrap_socket(raw, server_side=True)
            DataConnection(sock, self._ctx, self.tickets).serve()
        except (OSError, ssl.SSLError) as e:
            log.debug("data connection ended: %s", e)
        except Exception:
            log.exception("data connection failed")
        finally:
            with self._lock:
                self._conns.discard(raw)
            raw.close()

    def _refuse(self, sock: socket.socket) -> None:
        code, _http, message = status_for(CapacityExhausted(
            f"the daemon serves {self._cfg.max_connections} data connections already",
            field="data.max_connections"))
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_side=True)
            f.send_frame(sock, f.ERROR, f.encode_error(code, message))
        except (OSError, ssl.SSLError):
            pass
        finally:
            sock.close()
