"""``kvtier up``: the embedded default - Redis (if none is configured) and the daemon, one command.

When no Redis URL is configured (``KVTIER_REDIS__URL`` or the config file), a private
``redis-server`` from PATH is started on a free port (a clear message if there is none) and
stopped with the daemon. Endpoints are printed; Ctrl-C / SIGTERM stops everything.

Unless a policy is configured, the daemon runs the learned predictor embedded in its own
process (:func:`embedded_defaults`); it decides by LRU until trained and says so in its stats.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kvtier.procs.redis import RedisProcess
from kvtier.cli.serve import add_daemon_options, run_daemon
from kvtier.config import Settings, load_settings
from kvtier.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start redis-server (if none configured) and the daemon")
    add_daemon_options(p)
    p.add_argument("--monitoring", action="store_true",
                   help="also start a local Prometheus (Debian's prometheus, when installed) "
                   "scraping the daemon, and print where to look")
    p.set_defaults(func=run)


def embedded_defaults(settings: Settings) -> Settings:
    """``kvtier up``'s defaults over what the operator left unset: the embedded learned policy."""
    if "policy" in settings.model_fields_set:
        return settings
    policy = settings.policy.model_copy(update={"name": "learned"})
    return settings.model_copy(update={"policy": policy})


def run(args: argparse.Namespace) -> int:
    settings = embedded_defaults(load_settings(args.config))
    if not getattr(args, "monitoring", False):
        return _run(settings, args, None)
    from kvtier.procs.prometheus import LocalMonitoring

    monitoring = LocalMonitoring(settings)
    try:
        return _run(settings, args, lambda daemon: monitoring.start(daemon.http_port))
    finally:
        monitoring.close()


def _run(settings: Settings, args: argparse.Namespace, on_started: Any) -> int:
    if settings.redis.url is not None:
        print(f"kvtier: Redis {settings.redis.url} (configured)", flush=True)
        return run_daemon(settings, args.grace, args.drain, on_started)
    try:
        redis = RedisProcess()
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    with redis:
        print(f"kvtier: Redis {redis.url} (private redis-server, pid "
              f"{redis.proc.pid if redis.proc else '?'})", flush=True)
        redis_cfg = settings.redis.model_copy(update={"url": redis.url})
        settings = settings.model_copy(update={"redis": redis_cfg})
        return run_daemon(settings, args.grace, args.drain, on_started)
