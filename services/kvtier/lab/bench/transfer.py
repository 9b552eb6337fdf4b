"""``kvtier bench transfer``: page transfer throughput of the client against redis-py and a socket.

In one run, for ``--page-mib`` (default 2) MiB float16 pages in the ``hot`` tier, it measures:

- ``grpc_get`` / ``grpc_put``: :class:`kvtier_client.KVTierClient` with its default transport
  (the same-host shared-memory path when the daemon is local, puts lending their pages to the
  daemon, which keeps them where they lie: ``kvtier.transport.shm.lend``; calls stay on gRPC);
- ``grpc_inline_get`` / ``grpc_inline_put``: the same client with shared memory off (page bytes
  in chunked gRPC streams), the path a remote worker gets;
- ``redis_get`` / ``redis_set``: redis-py GET / SET of the same bytes (what users compare with);
- ``socket``: a raw loopback TCP stream, as the limit;
- ``grpc_batch_get`` / ``grpc_batch_put`` against ``redis_pipeline_get`` / ``_set``: the same
  with 8 pages per call (a prompt's chunks) and 8 commands per redis-py pipeline;
- ``grpc_aio_get`` / ``grpc_aio_put``: :class:`kvtier_client.AsyncKVTierClient` with its default
  transport (shared memory when local), one page per awaited call;
- ``grpc_staged_put``: ``KVTierClient.put`` of pages the worker wrote straight into staging
  buffers in the segment (:meth:`KVTierClient.staged_page`; filled before the clock starts, as
  a worker fills them when it copies its KV cache out), so no client copy; against redis-py SET;
- ``grpc_copy_get`` / ``grpc_copy_put``: a client with ``lend_bytes=0``, whose puts are copied
  out of its segment by the daemon (what a put does while its client's lend area is full);
- ``remote_get`` / ``remote_put`` and ``remote_batch_get`` / ``remote_batch_put`` (8 pages per
  call): a client with shared memory off, as a worker on another host, whose page bytes take
  the data channel (``kvtier_client.data``) over loopback TCP.

Paths are measured in interleaved rounds (the order rotating each round) and each figure is the
best round (as ``timeit`` does: slower rounds measure other processes, not the path); the
median is reported too (``*_median_gbps``). Ratios against redis-py are the figures to read.
It starts a ``redis-server`` and a daemon process unless ``--redis-url`` / ``--target`` are given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from kvtier.lab.bench import progress
from kvtier.procs.redis import RedisProcess, free_port

PATHS = ("grpc_get", "grpc_put", "grpc_inline_get", "grpc_inline_put", "redis_get",
         "redis_set", "socket", "grpc_batch_get", "grpc_batch_put", "redis_pipeline_get",
         "redis_pipeline_set", "grpc_aio_get", "grpc_aio_put", "grpc_staged_put",
         "grpc_copy_get", "grpc_copy_put", "remote_get", "remote_put", "remote_batch_get",
         "remote_batch_put")
BATCH = 8


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("transfer", help="client page throughput vs redis-py and a socket")
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="host:port of a running daemon (default: start one)")
    p.add_argument("--redis-url", help="Redis to compare with (default: start a redis-server)")
    p.add_argument("--page-mib", type=float, default=2.0, help="page size k+v in MiB")
    p.add_argument("--pages", type=int, default=16, help="distinct pages per round")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (best is kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@dataclass(frozen=True, slots=True)
class DaemonChild:
    """A running ``kvtier serve`` child: its gRPC address and HTTP base URL."""

    grpc: str
    http: str


@contextmanager
def daemon_child(redis_url: str | None, env: dict[str, str] | None = None
                 ) -> Iterator[DaemonChild]:
    """A ``kvtier serve`` child on free ports with ``env`` over the current environment
    (``KVTIER_*`` settings); stopped on exit."""
    port, http = free_port(), free_port()
    child_env = dict(os.environ, KVTIER_GRPC_PORT=str(port), KVTIER_HTTP_PORT=str(http))
    if redis_url is not None:
        child_env["KVTIER_REDIS__URL"] = redis_url
    child_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "--log-level", "WARNING",
                             "serve", "--grace", "1"], env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("kvtier: ready"):
                break
        else:
            raise RuntimeError(f"daemon exited with {proc.wait()} before it was ready")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
        yield DaemonChild(f"127.0.0.1:{port}", f"http://127.0.0.1:{http}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def daemon_process(redis_url: str) -> Iterator[str]:
    """A ``kvtier serve`` child on free ports; yields its gRPC address."""
    with daemon_child(redis_url) as child:
        yield child.grpc


def _rate(nbytes: int, fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e9


def socket_gbps(nbytes: int, count: int) -> float:
    """One-direction loopback TCP throughput sending ``count`` messages of ``nbytes``."""
    srv = socket.create_server(("127.0.0.1", 0))
    payload = bytes(nbytes)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            for _ in range(count):
                conn.sendall(payload)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    with socket.create_connection(srv.getsockname()) as c:
        t0 = time.perf_counter()
        for _ in range(count):
            got = 0
            while got < nbytes:
                got += c.recv_into(view[got:], nbytes - got)
        dt = time.perf_counter() - t0
    t.join()
    srv.close()
    return nbytes * count / dt / 1e9


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` the way ``asyncio.run`` does: leftover tasks (gRPC's call bookkeeping)
    are cancelled and awaited first."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:  # gather() of nothing would ask for another loop
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def measure(target: str, redis_url: str, page_mib: float = 2.0, pages: int = 16,
            rounds: int = 7) -> dict[str, float]:
    """Throughput in GB/s per path (best and median of ``rounds``), ratios against redis-py."""
    import redis

    from kvtier_client import AsyncKVTierClient, KVTierClient, Page

    tokens = max(1, int(page_mib * (1 << 20) / (2 * 4 * 8 * 128 * 2)))
    shape = (4, tokens, 8, 128)  # float16: k + v = page_mib MiB
    rng = np.random.default_rng(0)
    kv = [(rng.standard_normal(shape).astype(np.float16),
           rng.standard_normal(shape).astype(np.float16)) for _ in range(pages)]
    page_bytes = 2 * kv[0][0].nbytes
    blobs = [k.tobytes() + v.tobytes() for k, v in kv]
    total = page_bytes * pages
    fast = KVTierClient(target, "bench", shared_memory="auto",
                        staging_bytes=pages * page_bytes + (1 << 20))
    copying = KVTierClient(target, "bench-copy", shared_memory="auto", lend_bytes=0)
    remote = KVTierClient(target, "bench-remote", shared_memory=False)
    inline = KVTierClient(target, "bench-inline", shared_memory=False, data_channel=False)
    r = redis.Redis.from_url(redis_url)
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    loop = asyncio.new_event_loop()

    async def aio_client() -> AsyncKVTierClient:
        return AsyncKVTierClient(target, "bench-aio", shared_memory="auto")

    aio = loop.run_until_complete(aio_client())

    async def aio_round(rnd: int) -> None:
        keys = [f"aio-{rnd}-{i}".encode() for i in range(pages)]
        objs = [Page(k, v) for k, v in kv]
        t0 = time.perf_counter()
        for key, page in zip(keys, objs):
            await aio.put([key], [page])
        samples["grpc_aio_put"].append(total / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        for key in keys:
            if (await aio.get([key]))[0] is None:
                raise RuntimeError("benchmark page missing from the daemon")
        samples["grpc_aio_get"].append(total / (time.perf_counter() - t0) / 1e9)
        await aio.delete(keys)

    def client_round(name: str, client: Any, rnd: int) -> None:
        keys = [f"{name}-{rnd}-{i}".encode() for i in range(pages)]
        objs = [Page(k, v) for k, v in kv]

        def put_all() -> None:
            for key, page in zip(keys, objs):
                client.put([key], [page])

        def get_all() -> None:
            for key in keys:
                if client.get([key])[0] is None:
                    raise RuntimeError("benchmark page missing from the daemon")

        samples[f"{name}_put"].append(_rate(total, put_all))
        samples[f"{name}_get"].append(_rate(total, get_all))
        client.delete(keys)
        if name not in ("grpc", "remote"):
            return
        bkeys = [b"batch-%d-%d" % (rnd, i) for i in range(pages)]

        def put_batches() -> None:
            for i in range(0, pages, BATCH):
                client.put(bkeys[i:i + BATCH], objs[i:i + BATCH])

        def get_batches() -> None:
            for i in range(0, pages, BATCH):
                if any(g is None for g in client.get(bkeys[i:i + BATCH])):
                    raise RuntimeError("benchmark page missing from the daemon")

        samples[f"{name}_batch_put"].append(_rate(total, put_batches))
        samples[f"{name}_batch_get"].append(_rate(total, get_batches))
        client.delete(bkeys)
        if name != "grpc":
            return
        skeys = [b"staged-%d-%d" % (rnd, i) for i in range(pages)]

        def put_staged() -> None:
            for key, page in zip(skeys, staged):
                client.put([key], [page])

        samples["grpc_staged_put"].append(_rate(total, put_staged))
        client.delete(skeys)

    def redis_round(rnd: int) -> None:
        rkeys = [f"kvtier-bench-{rnd}-{i}" for i in range(pages)]
        samples["redis_set"].append(_rate(total, lambda: [r.set(k, b) for k, b in
                                                          zip(rkeys, blobs)]))
        samples["redis_get"].append(_rate(total, lambda: [r.get(k) for k in rkeys]))
        r.delete(*rkeys)

        def pipelined(op: Callable[[Any, int], object]) -> None:
            for i in range(0, pages, BATCH):
                pipe = r.pipeline(transaction=False)
                for j in range(i, min(i + BATCH, pages)):
                    op(pipe, j)
                pipe.execute()

        samples["redis_pipeline_set"].append(
            _rate(total, lambda: pipelined(lambda p, j: p.set(rkeys[j], blobs[j]))))
        samples["redis_pipeline_get"].append(
            _rate(total, lambda: pipelined(lambda p, j: p.get(rkeys[j]))))
        r.delete(*rkeys)

    staged = [fast.staged_page(k.shape, "float16") for k, _ in kv]
    for page, (k, v) in zip(staged, kv):
        np.copyto(cast(np.ndarray, page.k), k)
        np.copyto(cast(np.ndarray, page.v), v)
    steps: list[Callable[[int], None]] = [
        lambda rnd: client_round("grpc", fast, rnd),
        redis_round,
        lambda rnd: client_round("grpc_inline", inline, rnd),
        lambda rnd: client_round("grpc_copy", copying, rnd),
        lambda rnd: client_round("remote", remote, rnd),
        lambda rnd: samples["socket"].append(socket_gbps(page_bytes, pages)),
        lambda rnd: loop.run_until_complete(aio_round(rnd)),
    ]
    bar = progress(rounds * len(steps), "bench transfer")
    try:
        for rnd in range(rounds):
            for i in range(len(steps)):
                steps[(i + rnd) % len(steps)](rnd)
                bar.update()
        shm_used = fast.uses_shared_memory and aio.uses_shared_memory
        data_used = remote.uses_data_channel and not remote.uses_shared_memory
        for page in staged:
            fast.release_page(page)
    finally:
        bar.close()
        loop.run_until_complete(aio.close())
        _close_loop(loop)
        fast.close()
        inline.close()
        copying.close()
        remote.close()
        r.close()
    out = {f"{p}_median_gbps": statistics.median(v) for p, v in samples.items()}
    out.update({f"{p}_gbps": max(v) for p, v in samples.items()})
    out["page_bytes"] = float(page_bytes)
    out["shm_used"] = float(shm_used)
    out["data_channel_used"] = float(data_used)
    for p in ("grpc_get", "grpc_inline_get", "grpc_aio_get", "grpc_copy_get", "remote_get"):
        out[f"{p}_vs_redis"] = out[f"{p}_gbps"] / out["redis_get_gbps"]
    for p in ("grpc_put", "grpc_inline_put", "grpc_aio_put", "grpc_staged_put",
              "grpc_copy_put", "remote_put"):
        out[f"{p}_vs_redis"] = out[f"{p}_gbps"] / out["redis_set_gbps"]
    for p in ("grpc_batch", "remote_batch"):
        out[f"{p}_get_vs_redis"] = out[f"{p}_get_gbps"] / out["redis_pipeline_get_gbps"]
        out[f"{p}_put_vs_redis"] = out[f"{p}_put_gbps"] / out["redis_pipeline_set_gbps"]
    return out


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(RedisProcess()).url
        target = args.target or stack.enter_context(daemon_process(redis_url))
        res = measure(target, redis_url, args.page_mib, args.pages, args.rounds)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
        return 0
    print(f"transfer of {res['page_bytes'] / (1 << 20):.1f} MiB float16 pages (hot tier), "
          f"best of {args.rounds} rounds (median in brackets); client default path "
          f"{'shared memory' if res['shm_used'] else 'inline gRPC'}; remote client "
          f"{'data channel' if res['data_channel_used'] else 'gRPC (no data channel)'}")
    for p in PATHS:
        ratio = res.get(f"{p}_vs_redis")
        extra = f"   {ratio:.2f}x redis-py" if ratio is not None else ""
        print(f"  {p:<16} {res[f'{p}_gbps']:6.2f} GB/s ({res[f'{p}_median_gbps']:.2f}){extra}")
    return 0
