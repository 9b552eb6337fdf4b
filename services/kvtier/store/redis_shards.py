"""The shared tier's connection: one Redis, or a Redis Cluster whose shards fail one by one.

:class:`Shards` runs batches of single-key commands and answers each command on its own: a
value, an error reply, or :data:`UNAVAILABLE` when the shard that holds the key could not be
asked (down, timed out, slot not served). A batch is grouped by node and sent as one pipeline
per node: every node's pipeline is written before any is read, so a batch costs one round trip
however many shards it touches, and a dead shard fails only its own keys.

Cluster mode (``cluster=True``, or detected from ``INFO cluster`` when the setting is left
unset) uses redis-py's cluster client for what it is good at: finding the nodes from the one
URL, the slot map and its refresh (``CLUSTER SLOTS``), the node connections, MOVED patching.
It does not use redis-py's cluster pipeline, which sends a batch all or nothing (one
unreachable node raises for every key) and retries with topology refreshes on the caller's
thread; here nothing on the request path waits for more than one socket timeout.

What a batch does with each reply::

    MOVED slot host:port   patch the slot map, resend to the new owner (next round)
    ASK slot host:port     resend with ASKING to that node (a slot being migrated)
    NOSCRIPT               SCRIPT LOAD on that node, resend (a node that never ran the script:
                           a new primary after a failover, a restarted or flushed node)
    CLUSTERDOWN, TRYAGAIN  UNAVAILABLE for that command (the node itself is fine)
    other error replies    handed back as the exception object (the caller decides)
    connection error,      the node is marked down; its commands are UNAVAILABLE, and the
    timeout                next commands routed to it answer UNAVAILABLE without touching
                           the network until :meth:`Shards.probe` finds it (or a new owner of
                           its slots, after a failover) answering

A command redirected more than twice answers UNAVAILABLE. Health is per node: a killed primary
makes only its slots unavailable, and once a replica has taken them over, the next probe (the
store's mover runs it every ``retry_interval_s`` while something is down) refreshes the slot
map and they are served again, without restarting anything.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError, ClusterDownError, MasterDownError, MovedError, NoScriptError, RedisError,
    ResponseError, TryAgainError,
)
from redis.retry import Retry

from kvtier.config import RedisConfig

log = logging.getLogger(__name__)

SLOTS = 16384
_ROUNDS = 3  # the first send, then at most two rounds of redirects or script loads


class Unavailable(enum.Enum):
    """The answer of a command whose shard could not be asked."""

    UNAVAILABLE = "unavailable"


UNAVAILABLE = Unavailable.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script run by EVALSHA; its body is loaded on a node that answers NOSCRIPT."""

    body: str
    sha: str

    @classmethod
    def of(cls, body: str) -> Script:
        return cls(body, hashlib.sha1(body.encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Command:
    """One command on one key (``key`` routes it: its slot picks the node)."""

    key: str
    args: tuple[Any, ...]
    script: Script | None = None  # set for EVALSHA of this script

    @classmethod
    def evalsha(cls, script: Script, key: str, *argv: Any) -> Command:
        return cls(key, ("EVALSHA", script.sha, 1, key, *argv), script)


@dataclass(frozen=True, slots=True)
class ShardHealth:
    """One primary: its address, how many slots it serves, whether it answers."""

    node: str
    slots: int
    up: bool


@dataclass(frozen=True, slots=True)
class RedisHealth:
    """The shared tier's health. ``slots_down``: slots whose keys answer as misses now (their
    primary is down, or no node serves them)."""

    cluster: bool
    up: bool
    shards: tuple[ShardHealth, ...]
    slots_down: int

    @property
    def degraded(self) -> bool:
        """Reachable, but some keys are not: part of the cluster is down."""
        return self.up and self.slots_down > 0

    @property
    def state(self) -> str:
        return "down" if not self.up else ("degraded" if self.slots_down else "up")


@dataclass(frozen=True, slots=True)
class ShardCounters:
    """What the batches met since start (read by the metrics)."""

    unavailable: int  # commands answered UNAVAILABLE
    moved: int
    ask: int
    script_loads: int  # NOSCRIPT answered by loading the script
    node_failures: int  # nodes marked down


class Shards:
    """The nodes of one Redis or one Redis Cluster, with a health state per node.

    Thread-safe: every batch takes its own connections from the per-node pools. Nothing is
    connected until :meth:`probe` (so a daemon starts while Redis is down).
    """

    def __init__(self, config: RedisConfig, url: str) -> None:
        self.config = config
        self.url = url
        parsed = urlparse(url)
        self._url_node = f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"
        self._lock = threading.Lock()
        self._cluster_mode: bool | None = config.cluster
        self._single: redis.Redis | None = None
        self._cluster: redis.RedisCluster | None = None
        self._down: dict[str, float] = {}  # node -> when it was marked down
        self._up = False
        self._down_reported = False  # the outage was logged (once per outage)
        self._last_probe = float("-inf")
        self._refresh_wanted = False
        self._noted_single_moved = False
        self._unavailable = self._moved = self._ask = self._loads = self._failures = 0

    # -- state --------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Some shard answers (in single mode: the one Redis does)."""
        return self._up

    @property
    def cluster(self) -> bool:
        return bool(self._cluster_mode)

    def counters(self) -> ShardCounters:
        with self._lock:
            return ShardCounters(self._unavailable, self._moved, self._ask, self._loads,
                                 self._failures)

    def health(self) -> RedisHealth:
        """Per-primary health (reads the slot map: for metrics and readiness, not per call)."""
        with self._lock:
            up, down = self._up, set(self._down)
        cl = self._cluster
        if not self._cluster_mode or cl is None:
            name = self._url_node
            return RedisHealth(False, up, (ShardHealth(name, SLOTS, up and name not in down),),
                               0 if up else SLOTS)
        slots: dict[str, int] = {}
        uncovered = 0
        for slot in range(SLOTS):
            nodes = cl.nodes_manager.slots_cache.get(slot)
            if not nodes:
                uncovered += 1
                continue
            slots[nodes[0].name] = slots.get(nodes[0].name, 0) + 1
        shards = tuple(ShardHealth(n, c, up and n not in down) for n, c in sorted(slots.items()))
        slots_down = uncovered + sum(s.slots for s in shards if not s.up)
        return RedisHealth(True, up, shards, SLOTS if not up else slots_down)

    def _mark_down(self, node: str, err: BaseException) -> None:
        with self._lock:
            if node in self._down:
                return
            self._down[node] = time.monotonic()
            self._failures += 1
            self._refresh_wanted = True
            if not self._cluster_mode or self._cluster is None:
                self._up = False
            else:
                self._up = self._any_primary_up()
            self._down_reported |= not self._up
        log.warning("redis node %s is down: %s", node, err)

    def _any_primary_up(self) -> bool:
        """Whether some primary is not marked down (call with the lock held)."""
        cl = self._cluster
        if cl is None:
            return False
        return any(n.name not in self._down
                   for n in cl.nodes_manager.get_nodes_by_server_type("primary"))

    def is_down(self, node: str) -> bool:
        return node in self._down

    # -- connecting and probing ---------------------------------------------------------------

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "socket_timeout": self.config.socket_timeout_s,
            "socket_connect_timeout": self.config.connect_timeout_s,
            "retry": Retry(NoBackoff(), 0),
        }
        if self.url.startswith("rediss://"):  # TLS: verify the server, maybe present a cert
            kw["ssl_cert_reqs"] = "required"
            if self.config.ssl_ca_file:
                kw["ssl_ca_certs"] = self.config.ssl_ca_file
            if self.config.ssl_cert_file:
                kw["ssl_certfile"] = self.config.ssl_cert_file
                kw["ssl_keyfile"] = self.config.ssl_key_file
        return kw

    def _connect(self) -> None:
        """Build the client (detecting cluster mode when not configured); raises RedisError."""
        if self._cluster_mode is None:
            probe = redis.Redis.from_url(self.url, health_check_interval=0, **self._kwargs())
            try:
                info = probe.info("cluster")
            finally:
                probe.close()
            self._cluster_mode = bool(int(info.get("cluster_enabled", 0)))
            log.info("redis at %s is %s", self.url,
                     "a cluster node: cluster mode" if self._cluster_mode else "a single server")
        if self._cluster_mode:
            self._cluster = redis.RedisCluster.from_url(
                self.url, require_full_coverage=False, **self._kwargs())
        else:
            single = redis.Redis.from_url(self.url, health_check_interval=0, **self._kwargs())
            try:
                single.ping()
            except RedisError:
                single.close()
                raise
            self._single = single  # kept only once it answered: a later probe connects again
        self._check_servers()

    def _check_servers(self) -> None:
        """Warn about server settings the shared tier relies on (CONFIG may be refused, as
        managed Redis services do: then nothing is said)."""
        for name, client in self.primaries():
            try:
                got: dict[str, str] = {}
                for param in ("maxmemory", "maxmemory-policy", "cluster-require-full-coverage"):
                    got.update({str(k): str(v) for k, v in client.config_get(param).items()})
            except RedisError:
                continue
            if got.get("maxmemory", "0") == "0":
                log.warning("redis %s has no maxmemory: the shared tier grows until the "
                            "machine runs out of memory (set maxmemory and allkeys-lru)", name)
            elif not got.get("maxmemory-policy", "").startswith("allkeys-") and not (
                    self.config.ttl_s and got.get("maxmemory-policy", "").startswith("volatile-")):
                log.warning("redis %s evicts by %s: when full, page writes fail; allkeys-lru "
                            "keeps the shared tier a cache", name, got.get("maxmemory-policy"))
            if self._cluster_mode and got.get("cluster-require-full-coverage") == "yes":
                log.warning("redis %s has cluster-require-full-coverage yes: one failed shard "
                            "stops every shard while it fails over", name)

    def probe(self, *, force: bool = False) -> bool:
        """Bring the tier up to date with Redis; True if it is up afterwards.

        Connects the first time; while some node is down (or a redirect asked for it),
        refreshes the slot map and pings the nodes marked down. At most once per
        ``retry_interval_s`` unless ``force``; cheap (no network) when all is well.
        """
        with self._lock:
            idle = self._up and not self._down and not self._refresh_wanted
            now = time.monotonic()
            if idle or (not force and now - self._last_probe < self.config.retry_interval_s):
                return self._up
            self._last_probe = now
            self._refresh_wanted = False
        was_up = self._up
        try:
            if self._single is None and self._cluster is None:
                self._connect()
            elif self._cluster is not None:
                self._cluster.nodes_manager.initialize()
        except RedisError as e:
            with self._lock:
                self._up = False
                report, self._down_reported = not self._down_reported, True
            if was_up:
                log.warning("redis tier at %s is down: %s", self.url, e)
            elif report:
                log.warning("redis tier at %s is unreachable (%s); its pages are misses and "
                            "demotions into it wait until it answers (retrying every %g s)",
                            self.url, e, self.config.retry_interval_s)
            return False
        self._ping_down_nodes()
        with self._lock:
            self._up = self._any_primary_up() if self._cluster is not None else (
                self._url_node not in self._down)
            up = self._up
            if up:
                self._down_reported = False
        if up and not was_up:
            log.info("redis tier at %s is up (%s)", self.url,
                     "cluster" if self._cluster is not None else "single server")
        return up

    def _ping_down_nodes(self) -> None:
        with self._lock:
            down = list(self._down)
        if not down:
            return
        serving = {name for name, _ in self.primaries(include_down=True)}
        for name in down:
            if self._cluster is not None and name not in serving:
                with self._lock:
                    self._down.pop(name, None)  # no longer serves slots (failed over)
                log.info("redis node %s serves no slots any more", name)
                continue
            client = self._client_for(name)
            try:
                if client is None or not client.ping():
                    continue
            except RedisError:
                continue
            with self._lock:
                self._down.pop(name, None)
            log.info("redis node %s is up", name)

    def _client_for(self, name: str) -> redis.Redis | None:
        if self._cluster is None:
            return self._single
        cl: Any = self._cluster
        node = cl.get_node(node_name=name)
        return None if node is None else cl.get_redis_connection(node)

    def primaries(self, *, include_down: bool = False) -> list[tuple[str, redis.Redis]]:
        """The nodes that serve slots now (every one a SCAN must cover), with their clients."""
        if self._cluster is None:
            if self._single is None or (not include_down and self._url_node in self._down):
                return []
            return [(self._url_node, self._single)]
        cl = self._cluster
        owners = {nodes[0].name for nodes in list(cl.nodes_manager.slots_cache.values())
                  if nodes}
        out = []
        for node in cl.nodes_manager.get_nodes_by_server_type("primary"):
            if node.name in owners and (include_down or node.name not in self._down):
                out.append((node.name, cl.get_redis_connection(node)))
        return out

    def close(self) -> None:
        if self._single is not None:
            self._single.close()
        if self._cluster is not None:
            self._cluster.close()

    # -- batches ------------------------------------------------------------------------------

    def _route(self, key: str, ask: str | None) -> tuple[str, redis.Redis] | None:
        if self._cluster is None:
            return None if self._single is None else (self._url_node, self._single)
        cl = self._cluster
        if ask is not None:
            client = self._client_for(ask)
            return None if client is None else (ask, client)
        try:
            node = cl.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        except RedisError:
            return None  # the slot is served by no node
        return node.name, cl.get_redis_connection(node)

    def run(self, commands: Sequence[Command], *, count: bool = True) -> list[Any]:
        """Each command's reply, in order: a value, a ResponseError, or UNAVAILABLE (counted
        in ``unavailable`` unless ``count`` is False: a retry of what was counted already)."""
        replies: list[Any] = [UNAVAILABLE] * len(commands)
        todo = list(range(len(commands)))
        ask: dict[int, str] = {}
        load: dict[str, dict[str, Script]] = {}
        for _ in range(_ROUNDS):
            if not todo:
                break
            groups: dict[str, tuple[redis.Redis, list[int]]] = {}
            for i in todo:
                target = self._route(commands[i].key, ask.get(i))
                if target is None or target[0] in self._down:
                    continue
                groups.setdefault(target[0], (target[1], []))[1].append(i)
            answers = self._exchange(groups, commands, ask, load)
            todo = []
            load = {}
            for node, (_, idx) in groups.items():
                for i in idx:
                    reply = answers.get(i, UNAVAILABLE)
                    ask.pop(i, None)
                    if isinstance(reply, MovedError):
                        self._on_moved(reply)
                        todo.append(i)
                    elif isinstance(reply, AskError):
                        with self._lock:
                            self._ask += 1
                        ask[i] = f"{reply.host}:{reply.port}"
                        todo.append(i)
                    elif isinstance(reply, NoScriptError) and commands[i].script is not None:
                        script = commands[i].script
                        assert script is not None
                        load.setdefault(node, {})[script.sha] = script
                        todo.append(i)
                    elif isinstance(reply, (ClusterDownError, TryAgainError, MasterDownError)):
                        replies[i] = UNAVAILABLE
                    else:
                        replies[i] = reply
            todo.sort()
        unavailable = sum(r is UNAVAILABLE for r in replies) if count else 0
        if unavailable:
            with self._lock:
                self._unavailable += unavailable
        return replies

    def _on_moved(self, err: MovedError) -> None:
        with self._lock:
            self._moved += 1
            self._refresh_wanted = True
        if self._cluster is not None:
            self._cluster.nodes_manager.move_slot(err)
        elif not self._noted_single_moved:
            self._noted_single_moved = True
            log.error("redis at %s answered MOVED: it is a cluster node; set "
                      "KVTIER_REDIS__CLUSTER=true (or leave it unset to detect it)", self.url)

    def _exchange(self, groups: dict[str, tuple[redis.Redis, list[int]]],
                  commands: Sequence[Command], ask: dict[int, str],
                  load: dict[str, dict[str, Script]]) -> dict[int, Any]:
        """Write every node's pipeline, then read them all; replies by command index."""
        out: dict[int, Any] = {}
        sent: list[tuple[str, Any, Any, list[int], int]] = []
        try:
            for node, (client, idx) in groups.items():
                pool = client.connection_pool
                try:
                    conn: Any = pool.get_connection()
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    self._mark_down(node, e)
                    continue
                scripts = list(load.get(node, {}).values())
                packed: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", s.body) for s in scripts]
                for i in idx:
                    if i in ask:
                        packed.append(("ASKING",))
                    packed.append(commands[i].args)
                try:
                    conn.send_packed_command(conn.pack_commands(packed))
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    conn.disconnect()
                    pool.release(conn)
                    self._mark_down(node, e)
                    continue
                if scripts:
                    with self._lock:
                        self._loads += len(scripts)
                sent.append((node, pool, conn, idx, len(scripts)))
            for node, _pool, conn, idx, preamble in sent:
                try:
                    for _ in range(preamble):
                        self._read(conn)
                    for i in idx:
                        if i in ask:
                            self._read(conn)
                        out[i] = self._read(conn)
                except (redis.ConnectionError, redis.TimeoutError) as e:
                    conn.disconnect()
                    self._mark_down(node, e)
        finally:
            for _, pool, conn, _, _ in sent:
                pool.release(conn)
        return out

    @staticmethod
    def _read(conn: Any) -> Any:
        try:
            return conn.read_response()
        except ResponseError as e:
            return e
