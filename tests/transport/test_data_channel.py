"""The data channel: page bytes over TCP frames beside gRPC, with gRPC's error table.

Raw-socket tests speak the frames of ``kvtier_client.data_frame`` themselves to send what a
well-behaved client never sends: truncated frames, a peer that stops mid-page, another
tenant's namespace, wrong lengths. Each must fail with its status and store nothing.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvtier.daemon import Daemon
from kvtier.procs.redis import free_port
from kvtier.transport.auth.tokens import TokenFile
from kvtier_client import (
    DeadlineExceededError,
    KVTierClient,
    Page,
    PermissionDeniedError,
    UnauthenticatedError,
)
from kvtier_client import data_frame as f
from kvtier_client.data import DataConn, target_host
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

from .conftest import PAGE_SHAPE, DaemonFactory, make_kv, make_page, wait_for

NBYTES = int(np.prod(PAGE_SHAPE)) * 2  # float16 k (v the same)


def calls(d: Daemon, method: str, code: str = "OK", want: int | None = None) -> int:
    """Calls of ``method`` that ended with ``code`` (the daemon counts a call just after its
    answer is sent: with ``want``, wait a moment for that count)."""
    def now() -> int:
        t = d.context.rpc_stats.totals().get((method, code))
        return 0 if t is None else t.calls

    if want is not None:
        wait_for(lambda: now() >= want, 2.0)
    return now()


def open_ticket(d: Daemon, namespace: str, writable: bool = True) -> pb.OpenDataReply:
    with grpc.insecure_channel(d.grpc_address) as ch:
        reply: pb.OpenDataReply = pb_grpc.CacheServiceStub(ch).OpenData(
            pb.OpenDataRequest(namespace=namespace, writable=writable), timeout=5)
    return reply


class Raw:
    """A data connection driven by hand."""

    def __init__(self, d: Daemon, namespace: str = "tenant-a", writable: bool = True,
                 hello: bool = True) -> None:
        self.reply = open_ticket(d, namespace, writable)
        self.sock = socket.create_connection(("127.0.0.1", self.reply.port), timeout=10)
        if hello:
            f.send_frame(self.sock, f.HELLO, self.reply.ticket)
            assert self.answer() == ("OK", b"")

    def answer(self) -> tuple[str, bytes]:
        """``("OK", meta)`` or ``(code, message)``; ``("CLOSED", b"")`` if the daemon closed."""
        try:
            hdr = f.recv_header(self.sock)
        except (f.PeerClosed, ConnectionResetError):
            return "CLOSED", b""
        meta = f.recv_bytes(self.sock, hdr.meta_len)
        if hdr.kind == f.ERROR:
            code, message = f.decode_error(meta)
            return code, message.encode()
        f.skip(self.sock, hdr.payload_len, memoryview(bytearray(1 << 16)))
        return "OK", meta

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def put_frame(self, key: bytes, namespace: str = "", payload: bytes | None = None,
                  budget: int = 0, send_payload: bool = True) -> bytes:
        k, v = make_kv(1)
        h = pb.PageHeader(key=key, dtype="float16", shape=list(PAGE_SHAPE), k_len=k.nbytes,
                          v_len=v.nbytes)
        meta = pb.PutRequest(namespace=namespace, pages=[h]).SerializeToString()
        data = k.tobytes() + v.tobytes() if payload is None else payload
        self.sock.sendall(f.pack_header(f.PUT, len(meta), len(data), budget) + meta)
        if send_payload:
            self.sock.sendall(data)
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def raw(daemon: Daemon) -> Iterator[Raw]:
    r = Raw(daemon)
    yield r
    r.close()


def present(d: Daemon, key: bytes, namespace: str = "tenant-a") -> bool:
    return d.context.store.lookup(namespace, [key]).tiers[0] is not None


# -- the client picks the channel --------------------------------------------------------------

def test_remote_client_moves_pages_over_the_data_channel(daemon: Daemon) -> None:
    pages = [make_page(i, start_position=16 * i) for i in range(3)]
    with KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False) as c:
        assert c.put([b"a", b"b", b"c"], pages) == ["stored"] * 3
        assert c.put([b"a"], [pages[0]]) == ["exists"]
        got = c.get([b"a", b"missing", b"c"])
        got_torch = c.get([b"b"], as_torch=True)[0]
        assert c.uses_data_channel
    assert got[1] is None
    for g, p in ((got[0], pages[0]), (got[2], pages[2])):
        assert g is not None
        assert np.array_equal(g.k, p.k) and np.array_equal(g.v, p.v)
        assert g.start_position == p.start_position and g.tier == "hot" and g.precision == 16
    assert got_torch is not None and np.array_equal(got_torch.k.numpy(), pages[1].k)
    assert calls(daemon, "DataPut", want=2) == 2 and calls(daemon, "DataGet", want=2) == 2
    assert calls(daemon, "PutStream") == calls(daemon, "Put") == calls(daemon, "Get") == 0


def test_a_daemon_without_the_channel_serves_the_client_over_grpc(
        make_daemon: DaemonFactory) -> None:
    d = make_daemon(data={"enabled": False})
    assert d.data_port is None
    with KVTierClient(d.grpc_address, "tenant-a", shared_memory=False) as c:
        assert c.put([b"a"], [make_page(1)]) == ["stored"]
        assert not c.uses_data_channel
        assert c.get([b"a"])[0] is not None
    assert calls(d, "OpenData") == 1 and calls(d, "DataPut") == 0
    assert calls(d, "Put") == 1 and calls(d, "Get") == 1


def test_client_errors_on_the_channel_are_grpcs(daemon: Daemon) -> None:
    """The same typed errors, from the same table, as the gRPC path answers."""
    k, v = make_kv(1)
    bad = k.copy()
    bad[0, 0, 0, 0] = np.nan
    with KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False) as data, \
            KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False,
                         data_channel=False) as rpc:
        for c in (data, rpc):
            with pytest.raises(Exception) as e1:
                c.put([b"nan"], [Page(bad, v)])
            with pytest.raises(Exception) as e2:
                c.get([b""])
            assert (type(e1.value).__name__, e1.value.code) == ("InvalidArgumentError",  # type: ignore[attr-defined]
                                                                "INVALID_ARGUMENT")
            assert e2.value.code == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
        assert data.uses_data_channel
    assert not present(daemon, b"nan")
    assert calls(daemon, "DataPut", "INVALID_ARGUMENT", want=1) == 1


def test_the_client_reconnects_after_the_daemon_restarts(make_daemon: DaemonFactory) -> None:
    port = free_port()
    d1 = make_daemon(grpc_port=port)
    with KVTierClient(f"127.0.0.1:{port}", "tenant-a", shared_memory=False,
                      timeout_s=10) as c:
        assert c.put([b"a"], [make_page(1)]) == ["stored"]
        d1.stop(grace_s=0.2)
        d2 = make_daemon(grpc_port=port)
        assert c.put([b"b"], [make_page(2)]) == ["stored"]  # a new ticket, a new port
        assert c.get([b"b"])[0] is not None and c.uses_data_channel
    assert calls(d2, "DataPut", want=1) == 1 and calls(d2, "OpenData") == 1


def test_the_client_deadline_holds_against_a_silent_daemon() -> None:
    a, b = socket.socketpair()
    try:
        conn = DataConn(a, "tenant-a", True, 1 << 30)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            conn.get([b"k"], 0.3, False)
        assert time.monotonic() - t0 < 2.0 and conn.broken
    finally:
        a.close()
        b.close()


def test_target_hosts() -> None:
    assert target_host("10.0.0.2:50051") == "10.0.0.2"
    assert target_host("[::1]:50051") == "::1"
    assert target_host("dns:///cache.internal:50051") == "cache.internal"
    assert target_host("unix:/run/kvtier.sock") is None


# -- the protocol's edges, by hand ------------------------------------------------------------

def test_tickets_are_one_time_and_checked(daemon: Daemon) -> None:
    r = Raw(daemon, hello=False)
    f.send_frame(r.sock, f.HELLO, b"\0" * f.TICKET_BYTES)
    assert r.answer()[0] == "UNAUTHENTICATED" and r.closed()
    ticket = r.reply.ticket
    r.close()
    kinds = []
    for _ in range(2):  # a ticket refused once is gone; a fresh one works once
        fresh = open_ticket(daemon, "tenant-a")
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", fresh.port), timeout=5)
            f.send_frame(s, f.HELLO, fresh.ticket)
            hdr = f.recv_header(s)
            kinds.append(hdr.kind)
            f.recv_bytes(s, hdr.meta_len)
            s.close()
    assert kinds == [f.OK, f.ERROR] * 2
    s = socket.create_connection(("127.0.0.1", r.reply.port), timeout=5)
    f.send_frame(s, f.HELLO, ticket)  # the ticket of the refused hello was not consumed...
    assert f.recv_header(s).kind == f.OK  # ... since a wrong ticket was presented instead
    s.close()
    s = socket.create_connection(("127.0.0.1", r.reply.port), timeout=5)
    f.send_frame(s, f.GET, pb.GetRequest(keys=[b"a"]).SerializeToString())
    hdr = f.recv_header(s)
    assert hdr.kind == f.ERROR
    assert f.decode_error(f.recv_bytes(s, hdr.meta_len))[0] == "INVALID_ARGUMENT"
    s.close()


def test_wrong_tenant_is_permission_denied(daemon: Daemon, raw: Raw) -> None:
    raw.put_frame(b"x", namespace="tenant-b")
    code, msg = raw.answer()
    assert code == "PERMISSION_DENIED" and b"tenant-a" in msg
    f.send_frame(raw.sock, f.GET, pb.GetRequest(namespace="tenant-b",
                                                keys=[b"x"]).SerializeToString())
    assert raw.answer()[0] == "PERMISSION_DENIED"
    assert not present(daemon, b"x", "tenant-b") and not present(daemon, b"x")
    raw.put_frame(b"x")  # the connection stays usable for its own tenant
    assert raw.answer()[0] == "OK" and present(daemon, b"x")


def test_read_only_tickets_refuse_puts(daemon: Daemon) -> None:
    r = Raw(daemon, writable=False)
    r.put_frame(b"ro")
    assert r.answer()[0] == "PERMISSION_DENIED"
    f.send_frame(r.sock, f.GET, pb.GetRequest(keys=[b"ro"]).SerializeToString())
    assert r.answer()[0] == "OK"
    r.close()
    assert not present(daemon, b"ro")


def test_wrong_length_is_refused_and_stores_nothing(daemon: Daemon, raw: Raw) -> None:
    raw.put_frame(b"short", payload=bytes(2 * NBYTES - 2))
    code, msg = raw.answer()
    assert code == "INVALID_ARGUMENT" and b"announce" in msg
    assert not present(daemon, b"short")
    f.send_frame(raw.sock, f.GET, pb.GetRequest(keys=[b"short"]).SerializeToString())
    code, meta = raw.answer()
    assert code == "OK" and not pb.GetReply.FromString(meta).pages[0].found


def test_truncated_frames_store_nothing(daemon: Daemon) -> None:
    for cut in (10, f.HEADER_BYTES + 5, NBYTES + 100):  # header, meta, mid-page
        r = Raw(daemon)
        k, v = make_kv(1)
        h = pb.PageHeader(key=b"cut", dtype="float16", shape=list(PAGE_SHAPE),
                          k_len=k.nbytes, v_len=v.nbytes)
        meta = pb.PutRequest(pages=[h]).SerializeToString()
        frame = f.pack_header(f.PUT, len(meta), 2 * NBYTES) + meta + k.tobytes() + v.tobytes()
        r.sock.sendall(frame[:cut])
        r.sock.shutdown(socket.SHUT_WR)
        assert r.answer()[0] == "CLOSED"
        r.close()
    assert not present(daemon, b"cut")
    assert daemon.data_port is not None
    with KVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False) as c:
        assert c.put([b"cut"], [make_page(1)]) == ["stored"]


def test_a_peer_that_stops_mid_page_runs_out_of_its_budget(daemon: Daemon, raw: Raw) -> None:
    raw.put_frame(b"stall", budget=300, send_payload=False)
    raw.sock.sendall(bytes(NBYTES))  # k, then nothing
    t0 = time.monotonic()
    assert raw.answer()[0] == "DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 3.0 and raw.closed()
    assert not present(daemon, b"stall")
    assert calls(daemon, "DataPut", "DEADLINE_EXCEEDED", want=1) == 1


def test_idle_and_stalled_connections_are_closed(make_daemon: DaemonFactory) -> None:
    d = make_daemon(data={"idle_timeout_s": 0.3})
    r = Raw(d)
    r.put_frame(b"stall", send_payload=False)  # no budget: the idle timeout ends it
    assert r.answer()[0] == "DEADLINE_EXCEEDED"
    r.close()
    r = Raw(d)
    assert r.closed()  # idle between frames
    r.close()
    assert not present(d, b"stall")


def test_oversized_and_malformed_frames(make_daemon: DaemonFactory) -> None:
    d = make_daemon(data={"max_frame_bytes": 1 << 20})
    r = Raw(d)
    r.sock.sendall(f.pack_header(f.PUT, 0, 2 << 20))
    code, msg = r.answer()
    assert code == "INVALID_ARGUMENT" and b"max_frame_bytes" in msg and r.closed()
    r.close()
    r = Raw(d)
    r.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.answer()[0] == "INVALID_ARGUMENT" and r.closed()
    r.close()
    r = Raw(d)
    r.sock.sendall(f.pack_header(f.PUT, 3, 0) + b"\xff\xff\xff")
    assert r.answer()[0] == "INVALID_ARGUMENT"
    f.send_frame(r.sock, f.GET, pb.GetRequest(keys=[b"a"]).SerializeToString())
    assert r.answer()[0] == "OK"  # skipped: the connection goes on
    r.close()


def test_connections_beyond_the_limit_are_refused(make_daemon: DaemonFactory) -> None:
    d = make_daemon(data={"max_connections": 1})
    first = Raw(d)
    second = Raw(d, hello=False)
    assert second.answer()[0] == "RESOURCE_EXHAUSTED"
    second.close()
    first.close()
    assert wait_closed(d)
    third = Raw(d)
    third.close()


def wait_closed(d: Daemon) -> bool:
    deadline = time.monotonic() + 5
    server = d._data  # noqa: SLF001 - the connection count is not part of any API
    while time.monotonic() < deadline:
        if server is not None and server.connections == 0:
            return True
        time.sleep(0.02)
    return False


def test_concurrent_clients_share_the_channel(daemon: Daemon) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with KVTierClient(daemon.grpc_address, f"t{i}", shared_memory=False) as c:
                for j in range(5):
                    key = b"%d-%d" % (i, j)
                    page = make_page(10 * i + j)
                    c.put([key], [page])
                    got = c.get([key])[0]
                    assert got is not None and np.array_equal(got.k, page.k)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert calls(daemon, "DataPut", want=20) == 20


async def test_the_asyncio_client_takes_the_channel_too(daemon: Daemon) -> None:
    import asyncio

    from kvtier_client import AsyncKVTierClient

    c = AsyncKVTierClient(daemon.grpc_address, "tenant-a", shared_memory=False)
    pages = [make_page(i) for i in range(4)]
    assert await c.put([b"a", b"b"], pages[:2]) == ["stored"] * 2
    outs = await asyncio.gather(*(c.put([b"c%d" % i], [pages[i]]) for i in range(4)))
    assert outs == [["stored"]] * 4
    got = await c.get([b"a", b"x", b"c3"])
    assert c.uses_data_channel
    await c.close()
    assert got[1] is None and got[0] is not None and got[2] is not None
    assert np.array_equal(got[0].k, pages[0].k) and np.array_equal(got[2].v, pages[3].v)
    assert calls(daemon, "DataPut", want=5) == 5 and calls(daemon, "PutStream") == 0


# -- tokens ------------------------------------------------------------------------------------

def test_tickets_carry_the_tokens_grants(make_daemon: DaemonFactory, tmp_path: Path) -> None:
    """A ticket gets the rights of the token that opened it, and loses them with the token."""
    tokens = TokenFile(tmp_path / "tokens.json")
    rw, rw_entry = tokens.create(["tenant-a"])
    ro, _ = tokens.create(["tenant-a"], read_only=True)
    d = make_daemon(auth={"tokens_file": str(tmp_path / "tokens.json"),
                          "reload_interval_s": 0.05})
    with KVTierClient(d.grpc_address, "tenant-a", token=rw, shared_memory=False) as a, \
            KVTierClient(d.grpc_address, "tenant-a", token=ro, shared_memory=False) as r:
        assert a.put([b"k"], [make_page(1)]) == ["stored"]
        assert r.get([b"k"])[0] is not None and r.uses_data_channel
        with pytest.raises(PermissionDeniedError):
            r.put([b"k2"], [make_page(2)])
        assert calls(d, "DataPut", want=1) == 1 and calls(d, "DataGet", want=1) == 1
        assert calls(d, "Put", "PERMISSION_DENIED") == 1  # the read-only ticket sent it to gRPC
        with pytest.raises(UnauthenticatedError):  # OpenData is guarded like any call
            with KVTierClient(d.grpc_address, "tenant-a", token="kvt_bogus",
                              shared_memory=False) as bogus:
                bogus.get([b"k"])
        tokens.revoke(rw_entry.id)
        time.sleep(0.1)  # past the reload interval: the open connection is refused too
        with pytest.raises(UnauthenticatedError):
            a.get([b"k"])
    assert not present(d, b"k2")


def test_a_read_only_ticket_refuses_puts_even_when_asked_writable(
        make_daemon: DaemonFactory, tmp_path: Path) -> None:
    tokens = TokenFile(tmp_path / "tokens.json")
    ro, _ = tokens.create(["tenant-a"], read_only=True)
    d = make_daemon(auth={"tokens_file": str(tmp_path / "tokens.json")})
    with grpc.insecure_channel(d.grpc_address) as ch:
        reply = pb_grpc.CacheServiceStub(ch).OpenData(
            pb.OpenDataRequest(namespace="tenant-a", writable=True),
            metadata=(("authorization", f"Bearer {ro}"),), timeout=5)
    assert not reply.writable
    s = socket.create_connection(("127.0.0.1", reply.port), timeout=5)
    f.send_frame(s, f.HELLO, reply.ticket)
    assert f.recv_header(s).kind == f.OK
    k, v = make_kv(1)
    h = pb.PageHeader(key=b"w", dtype="float16", shape=list(PAGE_SHAPE), k_len=k.nbytes,
                      v_len=v.nbytes)
    f.send_frame(s, f.PUT, pb.PutRequest(pages=[h]).SerializeToString(),
                 [memoryview(k).cast("B"), memoryview(v).cast("B")])
    hdr = f.recv_header(s)
    assert f.decode_error(f.recv_bytes(s, hdr.meta_len))[0] == "PERMISSION_DENIED"
    s.close()
    assert not present(d, b"w")
