"""Worker hints over gRPC with both clients: Hint, lookup(session, prefetch), put(session,
expected_reuse_s), and the prefetch figures in Stats."""

from __future__ import annotations

import pytest

from kvtier.config import MiB, TierConfig
from kvtier.daemon import Daemon
from kvtier.types import Codec, Medium
from kvtier_client import AsyncKVTierClient, InvalidArgumentError, KVTierClient, Page

from .conftest import DaemonFactory, make_kv, make_page, wait_for


def roomy(make_daemon: DaemonFactory) -> Daemon:
    page = 2 * 8 * 1024
    return make_daemon(tiers=[
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE, capacity_bytes=4 * page),
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.NONE, capacity_bytes=1 * MiB),
    ])


def test_hints_prefetch_and_keep_a_queued_prefix(make_daemon: DaemonFactory) -> None:
    daemon = roomy(make_daemon)
    with KVTierClient(daemon.grpc_address, "w") as c:
        chain = [b"c0", b"c1", b"c2"]
        k, v = make_kv(0)
        assert c.put(chain, [Page(k, v, 0, i, expected_reuse_s=None) for i in range(3)],
                     session="conv-1") == ["stored"] * 3
        c.put([b"x0", b"x1", b"x2", b"x3"], [make_page(i) for i in range(4)])
        assert wait_for(lambda: c.lookup(chain).tiers == ("warm",) * 3)
        assert c.hint([chain + [b"c3"]]) == 3  # the present prefix: 3 pages to promote
        assert wait_for(lambda: c.lookup(chain).tiers == ("hot",) * 3)
        got = c.get(chain)
        assert [g.tier for g in got if g] == ["hot"] * 3
        st = c.stats()
        assert st.prefetched >= 3 and st.prefetch_hits == 3
        assert c.hint(ended_sessions=["conv-1"]) == 0 and c.hint() == 0


def test_lookup_prefetch_and_put_hints_reach_the_store(make_daemon: DaemonFactory) -> None:
    daemon = roomy(make_daemon)
    store = daemon.context.store
    with KVTierClient(daemon.grpc_address, "w") as c:
        k, v = make_kv(1)
        c.put([b"a", b"b"], [Page(k, v, 0, 0, expected_reuse_s=30.0), Page(k, v, 16, 1)],
              session="s")
        store.demote("w", [b"a", b"b"], "warm")
        found = c.lookup([b"a", b"b", b"zz"], session="s", prefetch=True)
        assert found.prefix_length == 2
        assert wait_for(lambda: c.lookup([b"a", b"b"]).tiers == ("hot", "hot"))
    engine = store._engine  # noqa: SLF001
    from kvtier.types import Namespace, PageId, PageKey

    a, b = (PageId(Namespace("w"), PageKey(x)) for x in (b"a", b"b"))
    assert engine.chains.parent(b) == a
    assert engine.hints.classes([a, b]) == [2, 1]  # a is expected back within 30 s


def test_bad_hints_are_invalid_argument(make_daemon: DaemonFactory) -> None:
    daemon = roomy(make_daemon)
    with KVTierClient(daemon.grpc_address, "w") as c:
        with pytest.raises(InvalidArgumentError, match="maximum batch"):
            c.hint([[b"k%d" % i for i in range(5000)]])
        with pytest.raises(InvalidArgumentError):
            c.lookup([b"a"], session="s" * 1000)
        k, v = make_kv(2)
        with pytest.raises(ValueError, match="expected_reuse_s"):  # checked before sending
            c.put([b"a"], [Page(k, v, 0, 0, expected_reuse_s=-2.0)])
    # the daemon checks it too, for any other client
    import grpc

    from kvtier_proto.v1 import cache_pb2 as pb
    from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

    with grpc.insecure_channel(daemon.grpc_address) as channel:
        stub = pb_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
        n = k.nbytes
        header = pb.PageHeader(key=b"a", dtype="float16", shape=list(k.shape), k_len=n,
                               v_len=n, expected_reuse_s=float("inf"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Put(pb.PutRequest(namespace="w", pages=[header],
                                   data=k.tobytes() + v.tobytes()))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "expected_reuse_s" in (e.value.details() or "")
        with pytest.raises(ValueError, match="queued"):
            c.hint([b"not-a-chain"])  # type: ignore[list-item]


async def test_the_async_client_hints_too(make_daemon: DaemonFactory) -> None:
    daemon = roomy(make_daemon)
    async with AsyncKVTierClient(daemon.grpc_address, "aio") as a:
        k, v = make_kv(3)
        assert await a.put([b"p0", b"p1"], [Page(k, v, 0, 0), Page(k, v, 16, 1)],
                           session="s1") == ["stored"] * 2
        daemon.context.store.demote("aio", [b"p0", b"p1"], "warm")
        assert await a.hint([[b"p0", b"p1"]], ended_sessions=["old"]) == 2
        found = await a.lookup([b"p0", b"p1"], session="s1", prefetch=True)
        assert found.prefix_length == 2
        st = await a.stats()
        assert st.prefetched <= 2
