"""The worker side of the CUDA IPC figures of ``kvtier bench gpu`` (and of the GPU tests).

Run in a process of its own, as a same-host inference worker is (CUDA IPC maps memory of
another process only)::

    python -m kvtier.lab.bench.ipc_worker ADDRESS NAMESPACE PAGES ITERS [L T H D]

It opens a :class:`kvtier_client.device.DeviceSession`, checks that the ``PAGES`` pages (of
shape ``[L, T, H, D]``, :data:`SHAPE` by default) the daemon holds under ``ipc-<i>`` are
:func:`page` ``i`` bit for bit, then times, in the same process on the same bytes: a get of
all of them through the session (one round trip: lease and device-to-device copy out of the
daemon's pool; the release rides on the next get), waited for; a plain device-to-device copy
of those pages into tensors of its own, page by page, and the same bytes as one memcpy; and,
after a put of one page that warms both sides up, a put of them under new keys (reserve, copy
in, commit). It prints one JSON object (``ok`` false
with the reason on a failure) and exits 0 either way.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

SHAPE = (8, 64, 8, 128)  # 2 MiB of fp16 K + V


def page(i: int, device: torch.device | str = "cpu",
         shape: tuple[int, int, int, int] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of test page ``i`` (the same in both processes: drawn on the CUDA device when
    there is one, so that a 1 GiB restore's pages take milliseconds, not seconds)."""
    at = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=at).manual_seed(1000 + i)
    k = torch.randn(shape, generator=g, device=at).half()
    v = torch.randn(shape, generator=g, device=at).half()
    return k.to(device), v.to(device)


def key(i: int) -> bytes:
    return b"ipc-%d" % i


def run(address: str, namespace: str, pages: int, iters: int,
        shape: tuple[int, int, int, int] = SHAPE) -> dict[str, Any]:
    from kvtier_client.device import DeviceSession

    with DeviceSession(address, namespace) as dev:
        stream = torch.cuda.current_stream(dev.device)
        want = [page(i, dev.device, shape) for i in range(pages)]
        keys = [key(i) for i in range(pages)]
        got = dev.get(keys)
        bad = [i for i, (g, (k, v)) in enumerate(zip(got, want))
               if g is None or not (torch.equal(g.k, k) and torch.equal(g.v, v))]
        if bad:
            return {"ok": False, "error": f"pages {bad[:5]} differ or are missing"}
        del got
        nbytes = sum(2 * k.numel() * k.element_size() for k, _ in want)
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            got = dev.get(keys)
            stream.synchronize()  # the copies done, as the plain copies below
            del got
        t_get = (time.perf_counter() - t0) / iters
        outs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in want]
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            for (ok, ov), (k, v) in zip(outs, want):
                ok.copy_(k)
                ov.copy_(v)
            stream.synchronize()
        t_copy = (time.perf_counter() - t0) / iters
        del outs
        flat = torch.empty(nbytes, dtype=torch.uint8, device=dev.device)
        flat_out = torch.empty_like(flat)
        stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            flat_out.copy_(flat)
            stream.synchronize()
        t_memcpy = (time.perf_counter() - t0) / iters
        del flat, flat_out
        dev.release()
        # a put of one page first: the first use of the daemon's and this process's kernels
        # (validation, copies) and of the handler threads stays out of the timed put
        dev.put([b"warm-put"], [(want[0][0], want[0][1], 0)])
        stream.synchronize()
        t0 = time.perf_counter()
        stored = dev.put([b"put-%d" % i for i in range(pages)],
                         [(k, v, 0) for k, v in want])
        t_put = time.perf_counter() - t0
        back = dev.get([b"put-0"])[0]
        put_ok = all(stored) and back is not None and torch.equal(back.k, want[0][0])
        return {"ok": put_ok, "pages": pages, "shape": list(shape), "bytes": nbytes,
                "get_seconds": t_get, "d2d_copy_seconds": t_copy, "memcpy_seconds": t_memcpy,
                "put_seconds": t_put, "get_gbps": nbytes / t_get / 1e9,
                "d2d_copy_gbps": nbytes / t_copy / 1e9, "memcpy_gbps": nbytes / t_memcpy / 1e9,
                "put_gbps": nbytes / t_put / 1e9, "get_vs_d2d": t_copy / t_get,
                "get_vs_memcpy": t_memcpy / t_get,
                **({} if put_ok else {"error": "pages put through IPC did not read back"})}


def main(argv: list[str]) -> int:
    address, namespace, pages, iters = argv[0], argv[1], int(argv[2]), int(argv[3])
    dims = [int(a) for a in argv[4:8]]
    shape = (dims[0], dims[1], dims[2], dims[3]) if len(dims) == 4 else SHAPE
    try:
        res = run(address, namespace, pages, iters, shape)
    except Exception as e:  # the parent reads the reason from the JSON
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
