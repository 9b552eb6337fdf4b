"""A real Redis Cluster (3 primaries, 3 replicas, private redis-server processes on free ports)
shared by the cluster tests, brought back to health and flushed before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from kvtier.procs.redis_cluster import RedisCluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(primaries=3, replicas=1, node_timeout_ms=1000) as c:
        yield c


def flush(c: RedisCluster) -> None:
    for node in c.primary_nodes():
        client = redis.Redis(host=node.host, port=node.port)
        client.flushall()
        client.close()


@pytest.fixture()
def cluster_url(cluster: RedisCluster) -> Iterator[str]:
    """The cluster, every node running and healthy, no keys."""
    for node in cluster.nodes:
        node.resume()
        if not node.alive:
            node.start()
    cluster.wait_healthy()
    flush(cluster)
    yield cluster.url
