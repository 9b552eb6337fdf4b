"""The worker side of the CUDA IPC figures of ``kvtier bench gpu`` (and of the GPU tests).

Run in a process of its own, as a same-host inference worker is (CUDA IPC maps memory of
another process only)::

    python -m kvtier.lab.bench.ipc_worker ADDRESS NAMESPACE PAGES ITERS

It opens a :class:`kvtier_client.device.DeviceSession`, checks that the ``PAGES`` pages the
daemon holds under ``ipc-<i>`` are :func:`page` ``i`` bit for bit, then times, in the same
process on the same bytes: a get of all of them through the session (lease, device-to-device
copy out of the daemon's pool, release), a plain device-to-device copy of those pages into
tensors of its own, and a put of them under new keys (reserve, copy in, commit). It prints one
JSON object (``ok`` false with the reason on a failure) and exits 0 either way.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

SHAPE = (8, 64, 8, 128)  # 2 MiB of fp16 K + V


def page(i: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of test page ``i`` (the same on both sides)."""
    g = torch.Generator().manual_seed(1000 + i)
    k = torch.randn(SHAPE, generator=g).half()
    v = torch.randn(SHAPE, generator=g).half()
    return k.to(device), v.to(device)


def key(i: int) -> bytes:
    return b"ipc-%d" % i


def run(address: str, namespace: str, pages: int, iters: int) -> dict[str, Any]:
    from kvtier_client.device import DeviceSession

    with DeviceSession(address, namespace) as dev:
        want = [page(i, dev.device) for i in range(pages)]
        keys = [key(i) for i in range(pages)]
        got = dev.get(keys)
        bad = [i for i, (g, (k, v)) in enumerate(zip(got, want))
               if g is None or not (torch.equal(g.k, k) and torch.equal(g.v, v))]
        if bad:
            return {"ok": False, "error": f"pages {bad[:5]} differ or are missing"}
        nbytes = sum(2 * k.numel() * k.element_size() for k, _ in want)
        t0 = time.perf_counter()
        for _ in range(iters):
            dev.get(keys)
        t_get = (time.perf_counter() - t0) / iters
        outs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in want]
        torch.cuda.synchronize(dev.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            for (ok, ov), (k, v) in zip(outs, want):
                ok.copy_(k)
                ov.copy_(v)
            torch.cuda.current_stream(dev.device).synchronize()
        t_copy = (time.perf_counter() - t0) / iters
        t0 = time.perf_counter()
        stored = dev.put([b"put-%d" % i for i in range(pages)],
                         [(k, v, 0) for k, v in want])
        t_put = time.perf_counter() - t0
        back = dev.get([b"put-0"])[0]
        put_ok = all(stored) and back is not None and torch.equal(back.k, want[0][0])
        return {"ok": put_ok, "pages": pages, "bytes": nbytes,
                "get_seconds": t_get, "d2d_copy_seconds": t_copy, "put_seconds": t_put,
                "get_gbps": nbytes / t_get / 1e9, "d2d_copy_gbps": nbytes / t_copy / 1e9,
                "put_gbps": nbytes / t_put / 1e9, "get_vs_d2d": t_copy / t_get,
                **({} if put_ok else {"error": "pages put through IPC did not read back"})}


def main(argv: list[str]) -> int:
    address, namespace, pages, iters = argv[0], argv[1], int(argv[2]), int(argv[3])
    try:
        res = run(address, namespace, pages, iters)
    except Exception as e:  # the parent reads the reason from the JSON
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
