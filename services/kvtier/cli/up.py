"""``kvtier up``: the embedded default - Redis (if none is configured) and the daemon, one command.

When no Redis URL is configured (``KVTIER_REDIS__URL`` or the config file), a private
``redis-server`` from PATH is started on a free port (a clear message if there is none) and
stopped with the daemon. Endpoints are printed; Ctrl-C / SIGTERM stops everything.

``--redis-cluster N`` starts a local Redis Cluster of N primaries (``--redis-replicas`` each)
instead, runs the daemon on it with new pages shared as they are put, and prints the command
that starts a second daemon on the same cluster (``docs/cluster.md``).

Unless a policy is configured, the daemon runs the learned predictor embedded in its own
process (:func:`embedded_defaults`); it decides by LRU until trained and says so in its stats.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import TYPE_CHECKING, Any

from kvtier.cli.serve import add_daemon_options, run_daemon
from kvtier.errors import ConfigError
from kvtier.procs.redis import RedisProcess

if TYPE_CHECKING:
    from kvtier.config import Settings

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser("up", help="start redis-server (if none configured) and the daemon")
    add_daemon_options(p)
    p.add_argument("--monitoring", action="store_true",
                   help="also start a local Prometheus (Debian's prometheus, when installed) "
                   "scraping the daemon, and print where to look")
    p.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                   help="start a local Redis Cluster of N primaries (with --redis-replicas "
                   "replicas each) instead of one redis-server, and print how to start a "
                   "second daemon on it (see docs/cluster.md)")
    p.add_argument("--redis-replicas", type=int, default=1, metavar="R",
                   help="replicas per primary with --redis-cluster (default 1)")
    p.add_argument("--tls", action="store_true",
                   help="serve gRPC and HTTP over TLS with a new self-signed certificate "
                   "(made by openssl, kept for this run only; for trying TLS - give your own "
                   "with KVTIER_TLS__CERT_FILE / KVTIER_TLS__KEY_FILE)")
    p.add_argument("--redis-maxmemory", default=None, metavar="BYTES",
                   help="maxmemory of each local Redis node (allkeys-lru eviction), e.g. 256mb")
    p.set_defaults(func=run)


def embedded_defaults(settings: Settings) -> Settings:
    """``kvtier up``'s defaults over what the operator left unset: the embedded learned policy."""
    if "policy" in settings.model_fields_set:
        return settings
    policy = settings.policy.model_copy(update={"name": "learned"})
    return settings.model_copy(update={"policy": policy})


def run(args: argparse.Namespace) -> int:
    from kvtier.config import load_settings

    settings = embedded_defaults(load_settings(args.config))
    if getattr(args, "tls", False) and not settings.tls.enabled:
        with tempfile.TemporaryDirectory(prefix="kvtier-tls-") as d:
            return _run_with(with_self_signed_tls(settings, d), args)
    return _run_with(settings, args)


def with_self_signed_tls(settings: Settings, directory: str) -> Settings:
    """``settings`` with TLS on, from a new self-signed pair in ``directory``; prints how
    clients trust it."""
    from kvtier.procs.certs import self_signed

    hosts = tuple(h for h in (settings.grpc_host, settings.http_host)
                  if h not in ("0.0.0.0", "::", ""))
    pair = self_signed(directory, "kvtier", hosts)
    tls = settings.tls.model_copy(update={"cert_file": pair.cert_file,
                                          "key_file": pair.key_file})
    print(f"kvtier: TLS with a self-signed certificate {pair.cert_file} (this run only); "
          f"clients: KVTierClient(..., tls_ca_file={pair.cert_file!r}), "
          f"curl --cacert {pair.cert_file}", flush=True)
    return settings.model_copy(update={"tls": tls})


def _run_with(settings: Settings, args: argparse.Namespace) -> int:
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
    if getattr(args, "redis_cluster", 0):
        return _run_cluster(settings, args, on_started)
    try:
        redis = RedisProcess(maxmemory=getattr(args, "redis_maxmemory", None))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    with redis:
        print(f"kvtier: Redis {redis.url} (private redis-server, pid "
              f"{redis.proc.pid if redis.proc else '?'})", flush=True)
        redis_cfg = settings.redis.model_copy(update={"url": redis.url})
        settings = settings.model_copy(update={"redis": redis_cfg})
        return run_daemon(settings, args.grace, args.drain, on_started)


def cluster_settings(settings: Settings, url: str) -> Settings:
    """Settings of a daemon on a local cluster: cluster mode, and new pages shared as they are
    put unless the operator said otherwise (a page put on one daemon is read on the next)."""
    update: dict[str, Any] = {"url": url, "cluster": True}
    if "share_puts" not in settings.redis.model_fields_set:
        update["share_puts"] = True
    return settings.model_copy(update={"redis": settings.redis.model_copy(update=update)})


def second_daemon_command(settings: Settings) -> str:
    """The command that starts another daemon on the same cluster, ports beside this one's."""
    r = settings.redis
    env = [f"KVTIER_REDIS__URL={r.url}", "KVTIER_REDIS__CLUSTER=true",
           f"KVTIER_REDIS__SHARE_PUTS={'true' if r.share_puts else 'false'}",
           f"KVTIER_GRPC_PORT={settings.grpc_port + 10}",
           f"KVTIER_HTTP_PORT={settings.http_port + 10}"]
    return " ".join(env) + " kvtier serve"


def _run_cluster(settings: Settings, args: argparse.Namespace, on_started: Any) -> int:
    from kvtier.procs.redis_cluster import RedisCluster

    if args.redis_cluster < 1 or args.redis_replicas < 0:
        raise ConfigError("--redis-cluster needs N >= 1 primaries, --redis-replicas R >= 0")
    try:
        cluster = RedisCluster(args.redis_cluster, args.redis_replicas,
                               maxmemory=args.redis_maxmemory)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    with cluster:
        settings = cluster_settings(settings, cluster.url)
        print(f"kvtier: Redis Cluster {cluster.url} ({args.redis_cluster} primaries, "
              f"{args.redis_replicas} replica(s) each: "
              f"{', '.join(n.name for n in cluster.nodes)})", flush=True)
        print(f"kvtier: a second daemon on this cluster: {second_daemon_command(settings)}",
              flush=True)
        return run_daemon(settings, args.grace, args.drain, on_started)
