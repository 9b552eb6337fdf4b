"""Shared fixtures. Redis is a real ``redis-server`` on a free port, never the machine's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.procs.redis import RedisProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One redis-server for the session. Tests must use their own key prefix or flush it."""
    with RedisProcess() as proc:
        yield proc


@pytest.fixture()
def redis_url(redis_server: RedisProcess) -> Iterator[str]:
    """A clean database on the session's redis-server."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture()
def private_redis() -> Iterator[RedisProcess]:
    """A redis-server of the test's own, which the test may stop and restart."""
    proc = RedisProcess()
    proc.start()
    try:
        yield proc
    finally:
        proc.close()
