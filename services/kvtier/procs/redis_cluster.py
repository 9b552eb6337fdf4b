"""A local Redis Cluster of private ``redis-server`` processes (``kvtier up --redis-cluster``,
the benchmarks and the tests).

:class:`RedisCluster` starts ``primaries * (1 + replicas)`` cluster-enabled servers on free
loopback ports, each with its files in its own temporary directory, and forms the cluster with
plain cluster commands (no ``redis-cli`` needed)::

    every node        CLUSTER ADDSLOTSRANGE  on the primaries (16384 slots split evenly)
                      CLUSTER MEET           every node meets node 0
    replicas          CLUSTER REPLICATE      once they know their primary
    wait              cluster_state:ok on every node, every replica's link up

A node can be killed (``kill``: SIGKILL, as a crash) and started again on the
same port with the same ``nodes.conf``: it rejoins, as a replica of whoever took its slots over.
``cluster-node-timeout`` (``node_timeout_ms``) is how long the cluster waits before a replica
takes a silent primary's slots over; the default here is short (local processes, tests).

The servers evict by ``allkeys-lru`` under ``maxmemory`` when one is given: that is how the
shared tier's capacity is enforced once for the cluster (see ``docs/cluster.md``).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from kvtier.procs.redis import RedisProcess, free_port

SLOTS = 16384


class ClusterNode(RedisProcess):
    """One cluster-enabled ``redis-server``; its ``nodes.conf`` lives in its own directory."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1",
                 binary: str | None = None, node_timeout_ms: int = 1000,
                 maxmemory: int | str | None = None) -> None:
        super().__init__(port, host, binary, maxmemory=maxmemory)
        self.node_timeout_ms = node_timeout_ms
        self.bus_port = free_port(host)  # not port + 10000, which may not exist or be free

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        args = super().argv() + [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica whose primary went quiet may always take over (no data-age limit):
            # the shared tier is a cache, a few lost writes are misses
            "--cluster-replica-validity-factor", "0",
            "--cluster-allow-reads-when-down", "no",
            # a dead shard fails its own slots only, not the whole cluster (kvtier answers
            # misses for those and serves the rest)
            "--cluster-require-full-coverage", "no",
            "--repl-diskless-sync-delay", "0",  # a new replica syncs at once
        ]
        return args

    def pause(self) -> None:
        """SIGSTOP: the node hangs (accepts connections, answers nothing)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)


@dataclass(frozen=True, slots=True)
class NodeState:
    """One node as ``CLUSTER NODES`` describes it."""

    node_id: str
    address: str  # host:port
    primary: bool
    failed: bool
    primary_id: str | None  # for a replica
    slots: int  # slots it serves (primaries)


class RedisCluster:
    """A local Redis Cluster: ``primaries`` primaries with ``replicas`` replicas each."""

    def __init__(self, primaries: int = 3, replicas: int = 1, host: str = "127.0.0.1",
                 node_timeout_ms: int = 1000, maxmemory: int | str | None = None,
                 binary: str | None = None) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError(f"need >= 1 primary and >= 0 replicas, got {primaries}, {replicas}")
        self.primaries = primaries
        self.replicas = replicas
        self.host = host
        self.nodes: list[ClusterNode] = []
        try:
            for _ in range(primaries * (1 + replicas)):
                self.nodes.append(ClusterNode(host=host, binary=binary,
                                              node_timeout_ms=node_timeout_ms,
                                              maxmemory=maxmemory))
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """A ``redis://`` URL naming one node (any node will do for a cluster client)."""
        return f"redis://{self.nodes[0].host}:{self.nodes[0].port}/0"

    @property
    def urls(self) -> list[str]:
        return [f"redis://{n.host}:{n.port}/0" for n in self.nodes]

    def start(self, timeout_s: float = 30.0) -> RedisCluster:
        """Start every node and form the cluster; returns once it is healthy."""
        import redis

        for node in self.nodes:
            node.start()
        deadline = time.monotonic() + timeout_s
        clients = [redis.Redis(host=n.host, port=n.port, socket_timeout=2) for n in self.nodes]
        try:
            first = clients[0]
            if int(first.cluster("info").get("cluster_known_nodes", 1)) > 1:  # restarted
                self.wait_healthy(timeout_s)
                return self
            per = SLOTS // self.primaries
            for i, c in enumerate(clients[: self.primaries]):
                lo = i * per
                hi = SLOTS - 1 if i == self.primaries - 1 else lo + per - 1
                _command(c, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            n0 = self.nodes[0]
            for c in clients[1:]:
                _command(c, "CLUSTER", "MEET", n0.host, n0.port, n0.bus_port)
            ids = [_command(c, "CLUSTER", "MYID").decode() for c in clients]
            for i, c in enumerate(clients[self.primaries:]):
                primary = ids[i % self.primaries]
                while True:  # the replica must know its primary before it can follow it
                    try:
                        _command(c, "CLUSTER", "REPLICATE", primary)
                        break
                    except redis.ResponseError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
        finally:
            for c in clients:
                c.close()
        self.wait_healthy(max(1.0, deadline - time.monotonic()))
        return self

    def states(self) -> list[NodeState]:
        """The cluster as the first live node sees it (empty if none answers)."""
        import redis

        for n in self.nodes:
            if not n.alive:
                continue
            c = redis.Redis(host=n.host, port=n.port, socket_timeout=1)
            try:
                text = _command(c, "CLUSTER", "NODES")
            except redis.RedisError:
                continue
            finally:
                c.close()
            return _parse_nodes(text.decode() if isinstance(text, bytes) else str(text))
        return []

    def healthy(self) -> bool:
        """Every live node reports ``cluster_state:ok``, every slot has a primary that is not
        failed, and every live replica's link to its primary is up."""
        import redis

        live = [n for n in self.nodes if n.alive]
        for n in live:
            c = redis.Redis(host=n.host, port=n.port, socket_timeout=1)
            try:
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
                info = c.info("replication")
                if info.get("role") == "slave" and info.get("master_link_status") != "up":
                    return False
            except redis.RedisError:
                return False
            finally:
                c.close()
        states = self.states()
        served = sum(s.slots for s in states if s.primary and not s.failed)
        alive = {n.name for n in live}
        return served == SLOTS and not any(s.failed for s in states if s.address in alive)

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() > deadline:
                tails = "\n".join(f"{n.name}: {n.log_tail()[-400:]}" for n in self.nodes)
                raise TimeoutError(f"redis cluster not healthy after {timeout_s} s\n{tails}")
            time.sleep(0.05)

    def wait_failover(self, dead: ClusterNode, timeout_s: float = 30.0) -> None:
        """Wait until ``dead`` serves no slot any more and every slot is served again (a
        replica took its slots over)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = self.states()
            old = next((s for s in states if s.address == dead.name), None)
            served = sum(s.slots for s in states if s.primary and not s.failed)
            if old is not None and old.slots == 0 and served == SLOTS:
                return
            time.sleep(0.05)
        raise TimeoutError(f"no failover of {dead.name} within {timeout_s} s")

    def node(self, address: str) -> ClusterNode:
        for n in self.nodes:
            if n.name == address:
                return n
        raise KeyError(address)

    def primary_nodes(self) -> list[ClusterNode]:
        """The live nodes that serve slots now."""
        addrs = {s.address for s in self.states() if s.primary and not s.failed and s.slots}
        return [n for n in self.nodes if n.name in addrs and n.alive]

    def primary_of(self, key: bytes | str) -> ClusterNode:
        """The node that serves ``key``'s slot now."""
        return self.node(self._owner(key_slot(key)))

    def _owner(self, slot: int) -> str:
        import redis

        for n in self.nodes:
            if not n.alive:
                continue
            c = redis.Redis(host=n.host, port=n.port, socket_timeout=1)
            try:
                for entry in _command(c, "CLUSTER", "SLOTS"):
                    lo, hi, primary = int(entry[0]), int(entry[1]), entry[2]
                    if lo <= slot <= hi:
                        host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                        return f"{host}:{int(primary[1])}"
            except redis.RedisError:
                continue
            finally:
                c.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def close(self) -> None:
        for n in self.nodes:
            n.resume()
            n.close()
        self.nodes = []

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _command(client: Any, *args: Any) -> Any:
    return client.execute_command(*args)


def key_slot(key: bytes | str) -> int:
    """The cluster slot of ``key`` (CRC16 of its hash tag, as Redis computes it)."""
    from redis.crc import key_slot as slot

    return int(slot(key.encode() if isinstance(key, str) else key))


def _parse_nodes(text: str) -> list[NodeState]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = parts[2].split(",")
        slots = 0
        for spec in parts[8:]:
            if spec.startswith("["):
                continue  # a slot being migrated
            lo, _, hi = spec.partition("-")
            slots += (int(hi) if hi else int(lo)) - int(lo) + 1
        out.append(NodeState(
            node_id=parts[0], address=parts[1].split("@")[0], primary="master" in flags,
            failed="fail" in flags or "fail?" in flags,
            primary_id=None if parts[3] == "-" else parts[3], slots=slots))
    return out
