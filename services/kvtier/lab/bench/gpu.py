"""``kvtier bench gpu``: the device codecs and the device <-> host moves, against device memcpy.

On one CUDA device, for fp16 pages of 64 KiB and 2 MiB (the shapes of ``kvtier bench
codecs``), all in one run so the ratios compare like with like:

* memcpy: each page's K and V copied into preallocated device tensors (``copy_``), one page
  per call ("page") and a batch of pages as one tensor per call ("batch");
* encode and decode of int8, int4 and int4a by the Triton kernels, in GB/s of fp16 page data
  (the payload stays on the device: the kernels' throughput), per page and per batch, and
  their ratio to memcpy of the same mode; per page, also the torch reference the kernels
  replace;
* device -> host moves of a page: raw (the fp16 page into pinned host memory) against
  compressed (encode on the device, then the blob's payload into pinned memory), bytes and
  time;
* a demotion through a :class:`~kvtier.store.store.TierStore` whose hot tier is the device:
  the bytes its device transfers moved to the host against the pages' fp16 bytes;
* CUDA IPC (a worker process against a daemon in this one, :mod:`kvtier.lab.bench.ipc_worker`):
  a get through a device session and a put, against a plain device-to-device copy of the same
  pages in the worker (page by page, and as one memcpy), for 32 pages of 2 MiB and for a
  realistic restore, a 2,048-token prefix of a 7B model (1 GiB); wall clock, the get waited
  for: the round trip is the cost at 64 MiB, the copy at 1 GiB.

Times are GPU times between CUDA events around a loop of calls, over a working set larger
than the device's L2 cache. Figures are GB/s of page bytes (K + V as put), 1e9 bytes a
second; a device memcpy moves each byte twice (read and write), so memcpy's figure here is
half the bandwidth a copy benchmark counting both would print. Without a CUDA device the
command says so and exits with status 0 (``--json``: ``{"cuda": false, ...}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from kvtier.lab.bench import ipc_worker
from kvtier.lab.bench.codecs import SHAPES
from kvtier.codecs import device as accel
from kvtier.codecs.layout import Layout, layout_for_encode
from kvtier.config import CodecConfig
from kvtier.types import Codec, Page

MiB = 1 << 20
CODECS = (Codec.INT8, Codec.INT4, Codec.INT4A)
TARGETS: tuple[tuple[str, tuple[str, ...], float], ...] = (  # (what, figure, at least)
    ("int8 decode vs memcpy (batch)", ("codecs", "2MiB", "int8", "decode", "batch_vs_memcpy"),
     0.5),
    ("int4a decode vs memcpy (batch)", ("codecs", "2MiB", "int4a", "decode", "batch_vs_memcpy"),
     0.5),
    ("int8 encode vs memcpy (batch)", ("codecs", "2MiB", "int8", "encode", "batch_vs_memcpy"),
     0.3),
    ("int4a encode vs memcpy (batch)", ("codecs", "2MiB", "int4a", "encode", "batch_vs_memcpy"),
     0.3),
)
# the store's demotion of the 64 pages of one sequence (start positions 0, 64, ...): only the
# first page holds the attention sinks, as put (a first page alone: 0.32x; the format's floor
# for any other page at the bench's shape: 0.274x; see d2h_figures' int4a sections)
BYTES_TARGET: tuple[str, tuple[str, ...], float] = (
    "int4a demotion bytes vs fp16 (a 64-page sequence)", ("store", "d2h_vs_fp16"), 0.3)


def gpu_time(fn: Callable[[int], object], iters: int, warmup: int = 2) -> float:
    """Seconds of GPU time per call of ``fn(i)`` for i in range(iters), after ``warmup``
    calls, between two CUDA events on the current stream."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3 / iters


def _pages(shape: tuple[int, int, int, int], n: int, device: torch.device,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``n`` fp16 pages ``[n, L, T, H, D]`` (K with per-channel bias, as keys have)."""
    g = torch.Generator(device=device).manual_seed(seed)
    L, T, H, D = shape
    bias = torch.randn(n, L, 1, H, D, generator=g, device=device) * 2
    k = (bias + torch.randn(n, L, T, H, D, generator=g, device=device)).half()
    v = (0.5 * torch.randn(n, L, T, H, D, generator=g, device=device)).half()
    return k, v


def _gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2) if seconds > 0 else 0.0


def _encode_fn(codec: Codec, lay: Layout, params: CodecConfig,
               k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A call that encodes ``k``/``v`` (a page or a batch) with the kernels, on the device."""
    from kvtier.codecs.cuda import launch

    if codec is Codec.INT4A:
        from kvtier.codecs.int4a import int4a_layout

        lay4a = int4a_layout(lay, params.key_bits)
        return lambda: launch.int4a_from_int8(launch.encode(k, v, lay), lay, lay4a)
    return lambda: launch.encode(k, v, lay)


def codec_figures(shape: tuple[int, int, int, int], working_set: int, batch_bytes: int,
                  params: CodecConfig, device: torch.device) -> dict[str, Any]:
    """memcpy and every codec's encode/decode, per page and per batch, for one page shape."""
    from kvtier.codecs.cuda import launch

    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    n_ws = max(2, working_set // page_bytes)
    n_batch = max(1, min(n_ws, batch_bytes // page_bytes))
    n_batches = max(1, n_ws // n_batch)
    k, v = _pages(shape, n_batch * n_batches, device)
    kb, vb = k.view(n_batches, n_batch, L, T, H, D), v.view(n_batches, n_batch, L, T, H, D)
    page_iters = min(n_ws, 1000)
    dk, dv = torch.empty_like(k[0]), torch.empty_like(v[0])
    dkb, dvb = torch.empty_like(kb[0]), torch.empty_like(vb[0])

    def copy_page(i: int) -> None:
        dk.copy_(k[i % len(k)])
        dv.copy_(v[i % len(v)])

    def copy_batch(i: int) -> None:
        dkb.copy_(kb[i % n_batches])
        dvb.copy_(vb[i % n_batches])

    mem_page = gpu_time(copy_page, page_iters)
    mem_batch = gpu_time(copy_batch, max(4, n_batches))
    out: dict[str, Any] = {
        "page_bytes": page_bytes, "batch_pages": n_batch,
        "memcpy": {"page_gbps": _gbps(page_bytes, mem_page),
                   "batch_gbps": _gbps(page_bytes * n_batch, mem_batch)},
    }
    for codec in CODECS:
        lay8 = layout_for_encode(Codec.INT8 if codec is Codec.INT4A else codec, "float16",
                                 shape, 0, params)
        payloads = [_encode_fn(codec, lay8, params, kb[b], vb[b])() for b in range(n_batches)]
        lay = lay8
        if codec is Codec.INT4A:
            from kvtier.codecs.int4a import int4a_layout

            lay = int4a_layout(lay8, params.key_bits)
        enc_page = gpu_time(lambda i: _encode_fn(codec, lay8, params, k[i % len(k)],
                                                 v[i % len(v)])(), page_iters)
        enc_batch = gpu_time(lambda i: _encode_fn(codec, lay8, params, kb[i % n_batches],
                                                  vb[i % n_batches])(), max(4, n_batches))
        dec_page = gpu_time(lambda i: launch.decode(
            payloads[(i // n_batch) % n_batches][i % n_batch], lay, dk, dv), page_iters)
        dec_batch = gpu_time(lambda i: launch.decode(payloads[i % n_batches], lay, dkb, dvb),
                             max(4, n_batches))
        fig: dict[str, Any] = {"payload_bytes": lay.payload_nbytes + 64}
        for name, tp, tb in (("encode", enc_page, enc_batch), ("decode", dec_page, dec_batch)):
            fig[name] = {
                "page_gbps": _gbps(page_bytes, tp), "batch_gbps": _gbps(page_bytes * n_batch, tb),
                "page_vs_memcpy": round(mem_page / tp, 3),
                "batch_vs_memcpy": round(mem_batch / tb, 3),
            }
        out[codec.value] = fig
    return out


def reference_figures(shape: tuple[int, int, int, int], params: CodecConfig,
                      device: torch.device, iters: int = 20) -> dict[str, Any]:
    """Per-page encode/decode of the torch reference on the device (what the kernels replace)."""
    from kvtier.codecs import int4a, torch_reference

    k, v = _pages(shape, 4, device, seed=1)
    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    out: dict[str, Any] = {}
    for codec in (Codec.INT8, Codec.INT4A):
        lay8 = layout_for_encode(Codec.INT8, "float16", shape, 0, params)

        def enc(i: int) -> torch.Tensor:
            p = torch_reference.encode_payload(Page(k=k[i % 4], v=v[i % 4], start_position=0),
                                               lay8)
            if codec is Codec.INT4A:
                p = int4a.from_int8(p, lay8, params.key_bits, kernels=False)[0]
            return p

        payload = enc(0)
        lay = int4a.int4a_layout(lay8, params.key_bits) if codec is Codec.INT4A else lay8

        def dec(i: int) -> object:
            p, ly = (int4a.to_int8(payload, lay, kernels=False) if codec is Codec.INT4A
                     else (payload, lay))
            return torch_reference.decode_payload(p, ly)

        out[codec.value] = {"encode_page_gbps": _gbps(page_bytes, gpu_time(enc, iters)),
                            "decode_page_gbps": _gbps(page_bytes, gpu_time(dec, iters))}
    return out


def d2h_figures(shape: tuple[int, int, int, int], params: CodecConfig, device: torch.device,
                iters: int = 200) -> dict[str, Any]:
    """A page to pinned host memory: raw fp16 against encoded on the device first."""
    L, T, H, D = shape
    k, v = _pages(shape, 16, device, seed=2)
    page_bytes = 2 * L * T * H * D * 2
    host = torch.empty(page_bytes, dtype=torch.uint8, pin_memory=True)
    half = page_bytes // 2

    def raw(i: int) -> None:
        host[:half].copy_(k[i % 16].view(-1).view(torch.uint8), non_blocking=True)
        host[half:].copy_(v[i % 16].view(-1).view(torch.uint8), non_blocking=True)

    t_raw = gpu_time(raw, iters)
    out: dict[str, Any] = {"raw": {"bytes": page_bytes, "seconds": t_raw,
                                   "gbps": _gbps(page_bytes, t_raw)}}
    later_start = shape[1]  # the sequence's second page: no sink tokens in it
    for codec in CODECS:
        sizes: list[int] = []

        def moved(i: int) -> None:
            d = accel.encode_on_device(Page(k=k[i % 16], v=v[i % 16], start_position=0),
                                       codec, params)
            host[:d.payload_nbytes].copy_(d.payload, non_blocking=True)
            if not sizes:
                sizes.append(d.payload_nbytes + len(d.header))

        t = gpu_time(moved, iters)
        later = accel.encode_on_device(Page(k=k[0], v=v[0], start_position=later_start),
                                       codec, params)
        out[codec.value] = {"bytes": sizes[0], "seconds": t, "gbps_of_page": _gbps(page_bytes, t),
                            "bytes_vs_raw": round(sizes[0] / page_bytes, 4),
                            "bytes_vs_raw_later_page": round(
                                (later.payload_nbytes + len(later.header)) / page_bytes, 4),
                            "time_vs_raw": round(t / t_raw, 3)}
    out["int4a_sections"] = int4a_sections(shape, params)
    return out


def int4a_sections(shape: tuple[int, int, int, int], params: CodecConfig) -> dict[str, Any]:
    """Where an int4a page's bytes go, as fractions of the fp16 page: a sequence's first page
    (start position 0: ``sink_tokens`` tokens kept as put) and any later one. The codes are
    0.25 (4 bits a value); the rest is the grid (a scale byte and a 12-bit minimum per group of
    ``group_size`` values), the outlier channels, the key bit map and, on a first page only,
    the sinks."""
    from kvtier.codecs.int4a import int4a_layout

    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    out: dict[str, Any] = {}
    for name, start in (("first_page", 0), ("later_page", T)):
        lay = int4a_layout(layout_for_encode(Codec.INT8, "float16", shape, start, params),
                           params.key_bits)
        secs = {sec: round(n / page_bytes, 4) for sec, _, n in lay.sections if n}
        out[name] = {"total": round((lay.payload_nbytes + 64) / page_bytes, 4), **secs}
    return out


def store_figures(device: torch.device, pages: int = 64) -> dict[str, Any]:
    """Demote 2 MiB pages from a device hot tier into an int4a host tier through a real
    TierStore: the bytes the store's device transfers moved, against the pages' bytes. The
    pages are one sequence's (start positions 0, 64, 128, ...), as a prefix cache holds them:
    only the first holds the sequence's attention sinks."""
    from kvtier.config import Settings, TierConfig
    from kvtier.store.store import TierStore
    from kvtier.types import Medium

    shape = SHAPES["2MiB"]
    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    settings = Settings(tiers=[
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                   capacity_bytes=2 * pages * page_bytes),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4A,
                   capacity_bytes=2 * pages * page_bytes),
    ], device=str(device))
    store = TierStore(settings)
    store.start(mover=False)
    try:
        k, v = _pages(shape, pages, device, seed=3)
        keys = [i.to_bytes(8, "little") for i in range(pages)]
        store.put("bench", [(key, Page(k=k[i], v=v[i], start_position=T * i))
                            for i, key in enumerate(keys)])
        before = store.device_transfer_stats()
        t0 = time.perf_counter()
        ok = store.demote("bench", keys, "cold")
        took = time.perf_counter() - t0
        after = store.device_transfer_stats()
        t0 = time.perf_counter()
        up = store.promote("bench", keys, "hot")
        took_up = time.perf_counter() - t0
        up_stats = store.device_transfer_stats()
    finally:
        store.close()
    d2h = after.get("d2h_bytes", 0) - before.get("d2h_bytes", 0)
    return {"pages": pages, "demoted": sum(ok), "page_bytes": pages * page_bytes,
            "d2h_bytes": d2h, "d2h_vs_fp16": round(d2h / (pages * page_bytes), 4),
            "demote_seconds": round(took, 4), "promoted": sum(up),
            "h2d_bytes": up_stats.get("h2d_bytes", 0) - after.get("h2d_bytes", 0),
            "promote_seconds": round(took_up, 4)}


IPC_CASES: dict[str, tuple[int, tuple[int, int, int, int]]] = {  # name: (pages, shape)
    "32x2MiB": (32, ipc_worker.SHAPE),
    # a 2,048-token prefix of a 7B model with full attention heads (32 layers, 32 KV heads of
    # 128): 32 pages of 64 tokens, 32 MiB each, 1 GiB in all
    "7B-2048tok": (32, (32, 64, 32, 128)),
}


def ipc_figures(pages: int = 32, shape: tuple[int, int, int, int] = ipc_worker.SHAPE,
                iters: int = 5, timeout_s: float = 120.0) -> dict[str, Any]:
    """CUDA IPC get and put against a device-to-device copy of the same bytes, measured by a
    worker process of its own (:mod:`kvtier.lab.bench.ipc_worker`) against a daemon in this
    one."""
    import os
    import subprocess

    from kvtier.config import Settings, TierConfig
    from kvtier.daemon import Daemon
    from kvtier.types import Medium

    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    # a session may hold a quarter of the pool under leases: the pool holds 4x the get
    tiers = [TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                        capacity_bytes=4 * pages * page_bytes),
             TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8,
                        capacity_bytes=4 * pages * page_bytes)]
    daemon = Daemon(Settings(grpc_port=0, grpc_host="127.0.0.1", tiers=tiers, device="cuda",
                             max_page_bytes=max(page_bytes, 256 * MiB))).start()
    try:
        store = daemon.context.store
        for i in range(pages):
            k, v = ipc_worker.page(i, "cuda", shape)
            store.put("bench", [(ipc_worker.key(i), Page(k=k, v=v, start_position=0))])
        run = subprocess.run(
            [sys.executable, "-m", "kvtier.lab.bench.ipc_worker", daemon.grpc_address, "bench",
             str(pages), str(iters), *map(str, shape)], capture_output=True, text=True,
            timeout=timeout_s, env=dict(os.environ))
        lines = run.stdout.strip().splitlines()
        res: dict[str, Any] = json.loads(lines[-1]) if lines else {
            "ok": False, "error": f"worker printed nothing: {run.stderr[-500:]}"}
    finally:
        daemon.stop(grace_s=1.0)
    res["built"] = True
    return res


def _get(res: dict[str, Any], path: tuple[str, ...]) -> float | None:
    cur: Any = res
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return None
        cur = cur[p]
    return float(cur) if isinstance(cur, (int, float)) else None


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU targets against this run's figures."""
    rows = []
    for what, path, least in TARGETS:
        val = _get(res, path)
        rows.append({"target": what, "value": val, "at_least": least,
                     "met": val is not None and val >= least})
    what, path, most = BYTES_TARGET
    val = _get(res, path)
    rows.append({"target": what, "value": val, "at_most": most,
                 "met": val is not None and val <= most})
    for name in IPC_CASES:
        for fig, what in (("get_vs_d2d", "the same pages copied one by one"),
                          ("get_vs_memcpy", "one memcpy of the same bytes")):
            val = _get(res, ("ipc", name, fig))
            rows.append({"target": f"CUDA IPC get vs D2D ({name}, {what})", "value": val,
                         "at_least": 0.5, "met": val is not None and val >= 0.5,
                         "note": "one round trip: lease and copy (the release rides on the "
                                 "next call), waited for"})
    return rows


def run(sizes: list[str], working_set_mib: int, batch_mib: int, params: CodecConfig,
        partial_path: str | None = None) -> dict[str, Any]:
    """Every figure, most wanted first; with ``partial_path``, the figures so far are written
    there as JSON after each part (a run cut short by a timeout keeps what it measured)."""
    device = torch.device("cuda", torch.cuda.current_device())
    res: dict[str, Any] = {
        "cuda": True, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "kernels": accel.available(device), "codecs": {}, "reference": {}, "d2h": {},
        "ipc": {},
    }
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    parts: list[tuple[str, str, Callable[[], dict[str, Any]]]] = []
    for name in sizes:
        parts += [("codecs", name, partial(codec_figures, SHAPES[name], working_set_mib * MiB,
                                           batch_mib * MiB, params, device)),
                  ("d2h", name, partial(d2h_figures, SHAPES[name], params, device))]
    parts += [("store", "", partial(store_figures, device))]
    parts += [("ipc", name, partial(ipc_figures, pages, shape))
              for name, (pages, shape) in IPC_CASES.items()]
    parts += [("reference", name, partial(reference_figures, SHAPES[name], params, device))
              for name in sizes]
    for part, name, fn in parts:  # the most wanted figures first; one failure loses no other
        try:
            with torch.cuda.stream(stream):  # away from the default stream's implicit syncs
                fig = fn()
        except Exception as e:
            fig = {"error": f"{type(e).__name__}: {e}"}
        if name:
            res[part][name] = fig
        else:
            res[part] = fig
        if partial_path is not None:
            with open(partial_path, "w") as f:
                json.dump({**res, "targets": targets(res), "partial": True}, f)
    res["targets"] = targets(res)
    return res


def _print_table(res: dict[str, Any]) -> None:
    print(f"{res['device']}  torch {res['torch']}  triton {res['triton']}  "
          f"kernels {'on' if res['kernels'] else 'off (torch reference)'}")
    for name, fig in res["codecs"].items():
        if "error" in fig:
            print(f"{name}: {fig['error']}")
            continue
        m = fig["memcpy"]
        print(f"{name} pages (batch of {fig['batch_pages']}): memcpy {m['page_gbps']} GB/s a page, "
              f"{m['batch_gbps']} GB/s a batch")
        for c in CODECS:
            for op in ("encode", "decode"):
                x = fig[c.value][op]
                print(f"  {c.value:<5} {op}  page {x['page_gbps']:8.2f} GB/s "
                      f"({100 * x['page_vs_memcpy']:5.1f}%)  batch {x['batch_gbps']:8.2f} GB/s "
                      f"({100 * x['batch_vs_memcpy']:5.1f}% of memcpy)")
    for name, fig in res["d2h"].items():
        if "error" in fig:
            print(f"d2h {name}: {fig['error']}")
            continue
        print(f"d2h {name}: raw {fig['raw']['bytes']} B in {1e6 * fig['raw']['seconds']:.1f} us")
        for c in CODECS:
            x = fig[c.value]
            print(f"  {c.value:<5} {x['bytes']} B ({x['bytes_vs_raw']:.3f}x; a later page "
                  f"{x['bytes_vs_raw_later_page']:.3f}x) in "
                  f"{1e6 * x['seconds']:.1f} us ({x['time_vs_raw']:.2f}x)")
    print(f"store: {res['store']}")
    for name, fig in res["ipc"].items():
        print(f"ipc {name}: {fig}")
    for t in res["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")


def main(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        msg = "no CUDA device here (torch.cuda.is_available() is False): nothing to measure"
        if args.json:
            print(json.dumps({"cuda": False, "error": msg}))
        print(f"kvtier bench gpu: {msg}", file=sys.stderr)
        return 0
    sizes = [s for s in SHAPES if s in args.sizes]
    res = run(sizes, args.working_set_mib, args.batch_mib,
              CodecConfig(group_size=args.group_size), args.partial)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gpu", help="device codecs and device<->host moves vs device memcpy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--working-set-mib", type=int, default=256,
                   help="bytes of distinct pages per size (well past the L2 cache)")
    p.add_argument("--batch-mib", type=int, default=64, help="bytes of pages per batched call")
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                   help="page sizes to measure (default: all)")
    p.add_argument("--group-size", type=int, default=CodecConfig().group_size,
                   help="quantization group size of the codecs measured")
    p.add_argument("--partial", metavar="PATH",
                   help="write the figures so far to PATH (JSON) after each part")
    p.set_defaults(func=main)
