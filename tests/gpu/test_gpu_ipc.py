"""CUDA IPC across processes: a worker maps the daemon's device pool, gets pages device to
device bit for bit, puts pages the same way, and its leases end with its session."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from kvtier.config import Settings, TierConfig
from kvtier.daemon import Daemon
from kvtier.lab.bench import ipc_worker
from kvtier.types import Codec, Medium, Page

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PAGE_BYTES = 2 * 8 * 64 * 8 * 128 * 2


def test_a_worker_gets_and_puts_pages_device_to_device() -> None:
    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                        capacity_bytes=32 * PAGE_BYTES),
             TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8,
                        capacity_bytes=32 * PAGE_BYTES)]
    daemon = Daemon(Settings(grpc_port=0, tiers=tiers, device="cuda")).start()
    try:
        store = daemon.context.store
        for i in range(4):
            k, v = ipc_worker.page(i, "cuda")
            store.put("ipc", [(ipc_worker.key(i), Page(k=k, v=v, start_position=0))])
        run = subprocess.run(
            [sys.executable, "-m", "kvtier.lab.bench.ipc_worker", daemon.grpc_address, "ipc", "4",
             "1"], capture_output=True, text=True, timeout=90, env=dict(os.environ))
        res = json.loads(run.stdout.strip().splitlines()[-1])
        assert res["ok"], (res, run.stderr[-2000:])
        got = store.get("ipc", [b"put-0"])[0]
        k, v = ipc_worker.page(0)
        assert got is not None and torch.equal(got.page.k, k) and torch.equal(got.page.v, v)
        pool = store.device_pool
        assert pool is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the worker's leases end with its session
            gc.collect()
            if pool.stats().used_bytes == 9 * PAGE_BYTES:
                break
            time.sleep(0.05)
        # 4 put by us, 5 by the worker (one to warm its put up)
        assert pool.stats().used_bytes == 9 * PAGE_BYTES
    finally:
        daemon.stop(grace_s=1.0)
