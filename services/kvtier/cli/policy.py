"""``kvtier policy``: run the policy service (gRPC PolicyService + HTTP /metrics).

Daemons use it by setting ``KVTIER_POLICY__ADDRESS=host:port``; without that they embed the
policy. With ``KVTIER_POLICY__TOKEN`` every call needs that token (daemons send the same
setting); beyond loopback the service refuses to start without one. Ports come from
``policy_grpc_port`` / ``policy_http_port`` (0 = any free port, printed at start).
SIGINT/SIGTERM stop it with a grace period.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any


log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="run the policy service", description=__doc__)
    p.add_argument("--config", default=None, help="settings JSON file")
    p.add_argument("--policy", default=None, help="policy to host (default: settings, or "
                                                   "learned when settings say lru)")
    p.add_argument("--host", default=None, help="bind address (default: settings.grpc_host)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="gRPC port (default: settings.policy_grpc_port; 0: any free port)")
    p.add_argument("--http-port", type=int, default=None,
                   help="HTTP /metrics port (default: settings.policy_http_port; 0: any free)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.config import PolicyConfig, load_settings
    from kvtier.policy.registry import make_local_policy
    from kvtier.transport.auth.exposure import check_policy_exposure
    from kvtier.transport.policy.service import make_metrics_server, make_policy_server

    settings = load_settings(args.config)
    name = args.policy or (settings.policy.name if settings.policy.name != "lru" else "learned")
    policy = make_local_policy(PolicyConfig(name=name))
    host = args.host or settings.grpc_host
    gport = settings.policy_grpc_port if args.grpc_port is None else args.grpc_port
    hport = settings.policy_http_port if args.http_port is None else args.http_port
    check_policy_exposure(settings, host)
    server, port, servicer = make_policy_server(policy, host, gport,
                                                token=settings.policy.token or None,
                                                tls=settings.tls)
    httpd, http_port = make_metrics_server(servicer, settings.http_host, hport, settings.tls)
    server.start()
    web = threading.Thread(target=httpd.serve_forever, name="kvtier-policy-metrics", daemon=True)
    web.start()
    scheme = "https" if settings.tls.enabled else "http"
    print(f"kvtier policy ({name}) serving gRPC{' (TLS)' if settings.tls.enabled else ''} on "
          f"{host}:{port}, metrics on {scheme}://{settings.http_host}:{http_port}/metrics",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("policy service stopping")
    server.stop(grace=2.0).wait()
    httpd.shutdown()
    return 0
