"""``kvtier bench transfer`` runs every path end to end (figures are printed, never asserted)."""

from __future__ import annotations

from kvtier.lab.bench.transfer import PATHS, measure
from kvtier.daemon import Daemon

from .conftest import wait_for


def test_measure_reports_every_path_with_shm_used(daemon: Daemon, redis_url: str) -> None:
    res = measure(daemon.grpc_address, redis_url, page_mib=0.0625, pages=8, rounds=1)
    for path in PATHS:
        assert res[f"{path}_gbps"] > 0 and res[f"{path}_median_gbps"] > 0, path
    for path in ("grpc_get", "grpc_put", "grpc_aio_get", "grpc_aio_put", "grpc_batch_put",
                 "remote_get", "remote_put", "remote_batch_get", "remote_batch_put"):
        assert res[f"{path}_vs_redis"] > 0, path
    assert res["shm_used"] == 1.0  # sync and asyncio clients both took the shm path
    assert res["data_channel_used"] == 1.0  # the remote client took the data channel
    assert res["page_bytes"] == 64 * 1024
    # the benchmark's clients closed their sessions (the daemon ends one when its call ends)
    assert wait_for(lambda: len(daemon._shm) == 0)
