"""The asyncio client: :class:`AsyncKVTierClient`, same calls as the sync one, awaited.

Page bytes travel inline over gRPC (chunked streams); the shared-memory path is the sync
client's (a worker that wants it from async code can run :class:`KVTierClient` calls in a
thread). Retries and deadlines follow the same rules as :mod:`kvtier_client.client`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from kvtier_client.client import (
    BACKOFF_S,
    CHANNEL_OPTIONS,
    RETRIES,
    CacheStats,
    LookupResult,
    cache_stats,
    lookup_result,
)
from kvtier_client.errors import DeadlineExceededError, from_rpc_error
from kvtier_client.tensors import FetchedPage, Page
from kvtier_client.wire import (
    DEFAULT_CHUNK_BYTES,
    GetAssembler,
    inline_bytes,
    put_request,
    put_requests,
    wire_pages,
)
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncKVTierClient:
    """asyncio client; create it inside a running event loop."""

    def __init__(self, target: str, namespace: str = "default", *, timeout_s: float = 30.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.target = target
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CacheServiceStub(self._channel)

    async def _call(self, method: str, fn: Callable[[float], Awaitable[T]],
                    timeout_s: float | None, idempotent: bool) -> T:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError("deadline exceeded before the call could be retried",
                                            method=method)
            try:
                return await fn(left)
            except grpc.RpcError as e:
                err = from_rpc_error(e, method)
                if (idempotent and err.code == "UNAVAILABLE" and attempt < RETRIES
                        and deadline - time.monotonic() > BACKOFF_S * attempt):
                    await asyncio.sleep(BACKOFF_S * attempt)
                    continue
                raise err from None

    async def put(self, keys: Sequence[bytes], pages: Sequence[Page | tuple[Any, ...]], *,
                  namespace: str | None = None, timeout_s: float | None = None) -> list[str]:
        ns = namespace or self.namespace
        wire = wire_pages(keys, pages)

        async def send(left: float) -> pb.PutReply:
            reply: pb.PutReply
            if inline_bytes(wire) <= self.chunk_bytes:
                reply = await self._stub.Put(put_request(ns, wire), timeout=left)
            else:
                reply = await self._stub.PutStream(put_requests(ns, wire, self.chunk_bytes),
                                                   timeout=left)
            return reply

        reply = await self._call("Put", send, timeout_s, True)
        return ["stored" if o == pb.PUT_OUTCOME_STORED else "exists" for o in reply.outcomes]

    async def get(self, keys: Sequence[bytes], *, namespace: str | None = None,
                  timeout_s: float | None = None,
                  as_torch: bool | str = False) -> list[FetchedPage | None]:
        req = pb.GetRequest(namespace=namespace or self.namespace, keys=list(keys),
                            chunk_bytes=self.chunk_bytes)

        async def fetch(left: float) -> list[FetchedPage | None]:
            deadline = time.monotonic() + left
            asm = GetAssembler(len(req.keys), as_torch)
            asm.feed(await self._stub.Get(req, timeout=left))
            out = asm.result()
            deferred = asm.deferred
            if deferred:  # too big for one reply: stream them
                again = pb.GetRequest(namespace=req.namespace, chunk_bytes=req.chunk_bytes,
                                      keys=[req.keys[i] for i in deferred])
                rest = GetAssembler(len(deferred), as_torch)
                async for reply in self._stub.GetStream(again,
                                                        timeout=deadline - time.monotonic()):
                    rest.feed(reply)
                for i, page in zip(deferred, rest.result()):
                    out[i] = page
            return out

        return await self._call("Get", fetch, timeout_s, True)

    async def lookup(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None) -> LookupResult:
        req = pb.LookupRequest(namespace=namespace or self.namespace, keys=list(keys))

        async def call(left: float) -> pb.LookupReply:
            reply: pb.LookupReply = await self._stub.Lookup(req, timeout=left)
            return reply

        return lookup_result(await self._call("Lookup", call, timeout_s, True))

    async def promote(self, keys: Sequence[bytes], tier: str, *, namespace: str | None = None,
                      timeout_s: float | None = None) -> list[bool]:
        req = pb.PromoteRequest(namespace=namespace or self.namespace, keys=list(keys),
                                tier=tier)

        async def call(left: float) -> pb.PromoteReply:
            reply: pb.PromoteReply = await self._stub.Promote(req, timeout=left)
            return reply

        return list((await self._call("Promote", call, timeout_s, True)).promoted)

    async def delete(self, keys: Sequence[bytes], *, namespace: str | None = None,
                     timeout_s: float | None = None) -> int:
        req = pb.DeleteRequest(namespace=namespace or self.namespace, keys=list(keys))

        async def call(left: float) -> pb.DeleteReply:
            reply: pb.DeleteReply = await self._stub.Delete(req, timeout=left)
            return reply

        return int((await self._call("Delete", call, timeout_s, False)).deleted)

    async def stats(self, *, namespace: str | None = None,
                    timeout_s: float | None = None) -> CacheStats:
        req = pb.StatsRequest(namespace=namespace or self.namespace)

        async def call(left: float) -> pb.StatsReply:
            reply: pb.StatsReply = await self._stub.Stats(req, timeout=left)
            return reply

        return cache_stats(await self._call("Stats", call, timeout_s, True))

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncKVTierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
