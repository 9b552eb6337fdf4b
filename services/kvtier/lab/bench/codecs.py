"""``kvtier bench codecs``: encode/decode throughput of int8 and int4 against memcpy.

For fp16 pages of 64 KiB and of 2 MiB, drawn from a working set of at least 256 MiB so that
data comes from memory rather than cache (as it does in a real tier), it measures in one run:

* memcpy of the same pages: each page's K and V copied by ``numpy.copyto`` into one
  preallocated page-sized buffer, on one thread as the codecs run (the baseline of the
  ratios); and, for reference only, ``torch.Tensor.copy_`` into preallocated tensors with
  torch's intra-op threads (all cores: on the 2-core box about twice the one-thread figure
  for 2 MiB pages: the figure a multi-threaded memcpy reports),
* encode and decode throughput of int8 and int4 (and int4a, the cold and remote tiers'
  default, and int3, the optional deep tier) in GB/s of fp16 page data (checksums, headers and
  allocation of the results included: what a tier pays per page),
* the compression ratio with every byte of the blob counted (header, scales, minima, sinks,
  outlier channels, padding).

Each figure is the best of ``--repeat`` passes over the whole working set; the spread
(worst/best) is printed too, because the machine is shared and timings are noisy. Ratios to
memcpy are of figures from the same run. ``--clock thread`` times with the calling thread's
CPU clock instead of the wall clock: on a shared, loaded box that leaves out the time the
thread waited for a core (stalls on memory still count), for memcpy and codecs alike; the
torch copy, which runs on other threads too, is always timed by the wall clock.

``--threads N`` (default 1) runs memcpy and every codec and direction alike on N Python
threads at once, each working through its own disjoint, contiguous share of the working
set's pages (memcpy into a buffer of its own); a barrier starts them together, and a pass's
throughput is all its bytes over the wall-clock time of the slowest thread. The numba kernels
and ``numpy.copyto`` release the GIL, so the threads truly overlap, except for the Python
around each codec call. N = 2 on the 2-core
box is the like-for-like comparison with torch's two-core ``copy_``; N = 1 with the
one-thread copy. N > 1 takes the wall clock only: a thread's CPU clock does not run while
it waits for the GIL, which at 64 KiB pages is much of the time (there, two threads' memcpy
read 14 GB/s by their CPU clocks and 3.5-8 GB/s by the wall clock, mostly less than one).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvtier.codecs import decode, encode, warmup
from kvtier.config import CodecConfig
from kvtier.lab.bench import progress
from kvtier.types import Codec, Page

MiB = 1 << 20
# the two codecs, then int4a: not one the targets name, but the default codec
# of the cold and remote tiers, so what those tiers pay per page
CODECS = (Codec.INT8, Codec.INT4, Codec.INT4A, Codec.INT3)  # int3: the optional deep tier
# Page shapes [layers, tokens, kv_heads, head_dim] of 64 KiB and 2 MiB (K+V, fp16): a 64-token
# chunk of one layer of a 2-KV-head model, and of eight layers of an 8-KV-head model.
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "64KiB": (1, 64, 2, 128),
    "2MiB": (8, 64, 8, 128),
}


@dataclass(frozen=True, slots=True)
class Timing:
    best_gbps: float
    worst_gbps: float

    def as_dict(self) -> dict[str, float]:
        return {"best": round(self.best_gbps, 3), "worst": round(self.worst_gbps, 3)}


def working_set(shape: tuple[int, int, int, int], total_bytes: int, seed: int = 0) -> list[Page]:
    """fp16 pages covering ``total_bytes``; K has per-channel bias as real key caches do."""
    L, T, H, D = shape
    page_bytes = 2 * L * T * H * D * 2
    n = max(1, -(-total_bytes // page_bytes))
    g = torch.Generator().manual_seed(seed)
    k = torch.empty(n, L, T, H, D, dtype=torch.float16)
    v = torch.empty_like(k)
    bias = torch.randn(1, L, 1, H, D, generator=g) * 2
    for i in range(0, n, 16):  # in slabs, to keep float32 temporaries small
        j = min(n, i + 16)
        k[i:j] = (bias + torch.randn(j - i, L, T, H, D, generator=g)).half()
        v[i:j] = (0.5 * torch.randn(j - i, L, T, H, D, generator=g)).half()
    return [Page(k=k[i], v=v[i], start_position=64 + T * i) for i in range(n)]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def _shares(n: int, threads: int) -> list[range]:
    """Disjoint, contiguous shares of the page indices ``0..n-1``, as even as they can be."""
    return [range(n * t // threads, n * (t + 1) // threads) for t in range(threads)]


def _pass(fns: Sequence[Callable[[int], object]], shares: Sequence[range],
          clock: Callable[[], float]) -> float:
    """Seconds taken by the slowest of ``len(fns)`` threads; thread ``t`` calls ``fns[t]`` on
    each index of ``shares[t]``, all starting together at a barrier. An exception in any
    thread is raised here once all have finished."""
    barrier = threading.Barrier(len(fns))
    took = [0.0] * len(fns)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        fn, share = fns[t], shares[t]
        barrier.wait()
        try:
            t0 = clock()
            for i in share:
                fn(i)
            took[t] = clock() - t0
        except BaseException as e:  # re-raised in the calling thread below
            errors.append(e)

    workers = [threading.Thread(target=work, args=(t,), name=f"bench-{t}")
               for t in range(len(fns))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return max(took)


def _time(fns: Sequence[Callable[[int], object]], n: int, nbytes: int, repeat: int,
          clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Best and worst of ``repeat`` passes over pages ``0..n-1``, split among ``len(fns)``
    threads (one function each), in GB/s of ``nbytes`` per pass."""
    shares = _shares(n, len(fns))
    rates = [nbytes / _pass(fns, shares, clock) / 1e9 for _ in range(repeat)]
    return Timing(max(rates), min(rates))


def bench_size(shape: tuple[int, int, int, int], total_bytes: int, repeat: int,
               params: CodecConfig, clock: str = "wall", threads: int = 1,
               step: Callable[[], object] = lambda: None) -> dict[str, Any]:
    """The figures of one page size; ``step()`` after memcpy and after each codec."""
    pages = working_set(shape, total_bytes)
    n = len(pages)
    page_bytes = pages[0].nbytes
    nbytes = n * page_bytes
    half = page_bytes // 4

    dk, dv = torch.empty_like(pages[0].k), torch.empty_like(pages[0].v)

    def copier() -> Callable[[int], None]:
        """memcpy of a page's K and V into a page-sized buffer of the calling thread's own."""
        dst = np.empty(page_bytes // 2, dtype=np.float16)

        def copy(i: int) -> None:
            np.copyto(dst[:half], pages[i].k.numpy().reshape(-1))
            np.copyto(dst[half:], pages[i].v.numpy().reshape(-1))
        return copy

    def torch_copy(i: int) -> None:
        dk.copy_(pages[i].k)
        dv.copy_(pages[i].v)

    out: dict[str, Any] = {"page_bytes": page_bytes, "pages": n, "working_set_bytes": nbytes,
                           "shape": list(shape)}
    tick = CLOCKS[clock]
    memcpy = _time([copier() for _ in range(threads)], n, nbytes, repeat, tick)
    out["memcpy_gbps"] = round(memcpy.best_gbps, 3)
    out["memcpy_spread"] = memcpy.as_dict()
    out["memcpy_torch_gbps"] = round(_time([torch_copy], n, nbytes, repeat).best_gbps, 3)
    step()
    for codec in CODECS:
        blobs = [encode(p, codec, params) for p in pages]

        def encode_one(i: int, c: Codec = codec) -> object:
            return encode(pages[i], c, params)

        def decode_one(i: int, b: list[bytes] = blobs) -> object:
            return decode(b[i])

        enc = _time([encode_one] * threads, n, nbytes, repeat, tick)
        dec = _time([decode_one] * threads, n, nbytes, repeat, tick)
        ratio = nbytes / sum(len(b) for b in blobs)
        del blobs
        out[codec.value] = {
            "encode_gbps": round(enc.best_gbps, 3),
            "decode_gbps": round(dec.best_gbps, 3),
            "ratio": round(ratio, 4),
            "encode_vs_memcpy": round(enc.best_gbps / memcpy.best_gbps, 3),
            "decode_vs_memcpy": round(dec.best_gbps / memcpy.best_gbps, 3),
            "encode_spread": enc.as_dict(),
            "decode_spread": dec.as_dict(),
        }
        step()
    return out


def _refusal(clock: str, threads: int) -> str | None:
    """Why ``clock`` and ``threads`` cannot be measured together, or None if they can."""
    if threads < 1:
        return f"threads must be >= 1, got {threads}"
    if threads > 1 and clock != "wall":
        return ("more than one thread is timed by the wall clock only: a thread's CPU clock "
                "leaves out its waits for the GIL")
    return None


def run(sizes: list[str], total_mib: int, repeat: int, params: CodecConfig,
        clock: str = "wall", threads: int = 1) -> dict[str, Any]:
    """All figures as one JSON-able dict; the top-level keys are those of the largest size."""
    if (problem := _refusal(clock, threads)) is not None:
        raise ValueError(problem)
    warmup()
    with progress(len(sizes) * (1 + len(CODECS)), "bench codecs") as bar:
        per = {s: bench_size(SHAPES[s], total_mib * MiB, repeat, params, clock, threads,
                             bar.update)
               for s in sizes}
    head = per[sizes[-1]]
    return {
        "memcpy_gbps": head["memcpy_gbps"],
        "memcpy_torch_gbps": head["memcpy_torch_gbps"],
        "int8": {k: head["int8"][k] for k in ("encode_gbps", "decode_gbps", "ratio")},
        "int4": {k: head["int4"][k] for k in ("encode_gbps", "decode_gbps", "ratio")},
        "int4a": {k: head["int4a"][k] for k in ("encode_gbps", "decode_gbps", "ratio")},
        "int3": {k: head["int3"][k] for k in ("encode_gbps", "decode_gbps", "ratio")},
        "headline_size": sizes[-1],
        "sizes": per,
        "repeat": repeat,
        "clock": clock,
        "threads": threads,
        "group_size": params.group_size,
        "torch_threads": torch.get_num_threads(),
    }


def _print_table(res: dict[str, Any]) -> None:
    threads = res["threads"]
    on = "one thread" if threads == 1 else f"{threads} threads at once"
    print(f"codec benchmark: fp16 pages, group {res['group_size']}, best of {res['repeat']} "
          f"passes (worst in brackets), GB/s of fp16 page data, {res['clock']} clock, "
          f"memcpy and codecs on {on}")
    for size, r in res["sizes"].items():
        print(f"\n{size} pages {r['shape']} x {r['pages']} "
              f"({r['working_set_bytes'] / MiB:.0f} MiB working set)")
        print(f"  memcpy        {r['memcpy_gbps']:7.2f}  [{r['memcpy_spread']['worst']:.2f}]"
              f"  {on}, the baseline")
        print(f"  torch copy_   {r['memcpy_torch_gbps']:7.2f}           "
              f"{res['torch_threads']} threads, for reference")
        for c in (codec.value for codec in CODECS):
            x = r[c]
            print(f"  {c:<5} encode  {x['encode_gbps']:7.2f}  [{x['encode_spread']['worst']:.2f}]"
                  f"  {100 * x['encode_vs_memcpy']:5.1f}% of memcpy")
            print(f"  {c:<5} decode  {x['decode_gbps']:7.2f}  [{x['decode_spread']['worst']:.2f}]"
                  f"  {100 * x['decode_vs_memcpy']:5.1f}% of memcpy")
            print(f"  {c:<5} ratio   {x['ratio']:7.3f}x (all metadata counted)")


def main(args: argparse.Namespace) -> int:
    params = CodecConfig(group_size=args.group_size)
    sizes = [s for s in SHAPES if s in args.sizes]
    if (problem := _refusal(args.clock, args.threads)) is not None:
        print(f"kvtier bench codecs: {problem}", file=sys.stderr)
        return 2
    res = run(sizes, args.working_set_mib, args.repeat, params, args.clock, args.threads)
    if args.json:
        print(json.dumps(res))
    else:
        _print_table(res)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("codecs",
                              help="encode/decode throughput of int8/int4/int4a/int3 vs memcpy")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--repeat", type=int, default=3, help="passes per figure (best is kept)")
    p.add_argument("--working-set-mib", type=int, default=256,
                   help="bytes of distinct pages per size (>= 256 to defeat caches)")
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                   help="page sizes to measure (default: all)")
    p.add_argument("--group-size", type=int, default=CodecConfig().group_size,
                   help="quantization group size (default: the codec setting's)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall clock, or the thread's CPU clock (steadier on a loaded box)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads running memcpy and each codec at once, each on its own share "
                        "of the pages (2: compare with torch's two-core copy_; wall clock)")
    p.set_defaults(func=main)
