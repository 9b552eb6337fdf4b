"""Shared fixtures. Redis is a real ``redis-server`` on a free port, never the machine's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from kvtier.procs.redis import RedisProcess


def _triton_on_cpu() -> None:
    """Without a CUDA device, Triton kernels run in Triton's interpreter on CPU tensors, so
    the device codec kernels are tested here as well (``tests/codecs/test_device_kernels.py``).
    Set before any kernel module is imported: ``triton.jit`` reads it when it decorates."""
    if torch.cuda.is_available():
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = interpreter._patch_lang_tensor  # noqa: SLF001

    def index_of_one_element(tensor: object, scope: object) -> None:
        # a scalar argument is a 1-element array there, and int() of one is an error on
        # NumPy 2 ("only 0-dimensional arrays"): loops over a kernel argument need this
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__",  # type: ignore[attr-defined]
                       lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = index_of_one_element  # noqa: SLF001


_triton_on_cpu()


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
