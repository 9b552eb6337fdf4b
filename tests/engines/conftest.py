"""A real daemon with hot, warm (int8) and cold (int4a) tiers, and the tiny random Llama."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tiny_llama import VOCAB, make_tiny_model

from kvtier.config import MiB, Settings, TierConfig
from kvtier.daemon import Daemon
from kvtier.types import Codec, Medium
from kvtier_client import KVTierClient

NS = "engine"
PAGE = 16  # tokens per page in these tests


@pytest.fixture(scope="module")
def model() -> Any:
    torch.set_num_threads(1)
    return make_tiny_model()


@pytest.fixture()
def daemon() -> Iterator[Daemon]:
    tiers = [
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=64 * MiB),
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8, capacity_bytes=64 * MiB),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A, capacity_bytes=64 * MiB),
    ]
    d = Daemon(Settings(grpc_port=0, tiers=tiers)).start()
    yield d
    d.stop(grace_s=0.5)


@pytest.fixture(params=["shm", "tcp"])
def client(request: pytest.FixtureRequest, daemon: Daemon) -> Iterator[KVTierClient]:
    """A client over each transport: shared memory (same host) and page bytes over TCP."""
    c = KVTierClient(daemon.grpc_address, NS, timeout_s=20,
                     shared_memory=request.param == "shm", shm_bytes=16 * MiB)
    yield c
    c.close()


def prompt(seed: int, tokens: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, tokens), generator=g)
