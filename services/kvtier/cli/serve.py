"""``kvtier serve``: run the cache daemon until SIGTERM/SIGINT.

Config comes from ``--config FILE`` (JSON) and ``KVTIER_*`` environment variables (environment
wins), validated at start (exit code 2 with every problem spelled out). On the first SIGTERM or
SIGINT the daemon shuts down gracefully (see :mod:`kvtier.daemon`); ``--drain`` first writes
memory-tier pages to the Redis tier so a restart loses nothing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.config import Settings

log = logging.getLogger(__name__)


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="JSON settings file (KVTIER_* environment variables win); "
                        "deploy/kvtier.example.json shows every setting")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds in-flight calls get to finish on shutdown (default 10)")
    p.add_argument("--drain", action="store_true",
                   help="on shutdown, write memory-tier pages to the Redis tier first")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the cache daemon (gRPC + HTTP)")
    add_daemon_options(p)
    p.set_defaults(func=run)


def run_daemon(settings: Settings, grace_s: float, drain: bool,
               on_started: Any = None) -> int:
    """Start a daemon, print its endpoints, block until SIGTERM/SIGINT, stop it gracefully."""
    from kvtier.daemon import (  # heavy (torch): only when serving
        Daemon,
        configure_allocator,
        configure_torch_threads,
        default_start_http,
    )

    log.info("torch intra-op threads: %d; page memory reuse: %s", configure_torch_threads(),
             "on" if configure_allocator() else "off")
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon = Daemon(settings, start_http=default_start_http()).start()
        if hasattr(signal, "SIGHUP"):
            previous[signal.SIGHUP] = signal.signal(
                signal.SIGHUP, lambda *_: daemon.reload_tokens())
        try:
            print(f"kvtier: gRPC  {daemon.grpc_address}"
                  f"{' (TLS)' if settings.tls.enabled else ''}", flush=True)
            if daemon.http_port is not None:
                scheme = "https" if settings.tls.enabled else "http"
                print(f"kvtier: HTTP  {scheme}://{settings.http_host}:{daemon.http_port}",
                      flush=True)
            if on_started is not None:
                on_started(daemon)
            print("kvtier: ready (Ctrl-C to stop)", flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            # A second signal during shutdown must not abort the drain half-way.
            for s in previous:
                signal.signal(s, signal.SIG_IGN)
            daemon.stop(grace_s=grace_s, drain=drain)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    print("kvtier: stopped", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from kvtier.config import load_settings

    from kvtier.transport.auth.exposure import check_grpc_exposure

    settings = load_settings(args.config)
    if not settings.auth.insecure_allow_unauthenticated:  # the daemon warns about that one
        check_grpc_exposure(settings)  # before the daemon's heavy imports: refused at once
    return run_daemon(settings, args.grace, args.drain)
