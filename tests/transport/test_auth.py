"""Tenant tokens on the data plane: every call checked, no data to the wrong party.

A daemon with a tokens file; tenant A (read-write on ``tenant-a``), tenant B (read-write on
``tenant-b``) and a read-only token on ``tenant-a``. Every method of CacheService and
DeviceService is tried without a token, with a bogus one, with the other tenant's and (for the
writing ones) with the read-only one.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.config import Settings
from kvtier.daemon import Daemon
from kvtier.errors import ConfigError
from kvtier.transport.auth.exposure import check_grpc_exposure
from kvtier.transport.auth.guard import METHODS, bearer_token
from kvtier.transport.auth.tokens import TokenFile, TokenRegistry, hash_token
from kvtier_client import AsyncKVTierClient, KVTierClient
from kvtier_client.errors import PermissionDeniedError, UnauthenticatedError
from kvtier_client.shm import Segment
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc
from kvtier_proto.v1 import device_pb2 as dpb
from kvtier_proto.v1 import device_pb2_grpc as dpb_grpc

from .conftest import DaemonFactory, make_page, wait_for

UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


class Tenants:
    def __init__(self, path: Path) -> None:
        self.file = TokenFile(path)
        self.path = path
        self.a, self.a_entry = self.file.create(["tenant-a"])
        self.b, _ = self.file.create(["tenant-b"])
        self.a_ro, _ = self.file.create(["tenant-a"], read_only=True)
        self.both, _ = self.file.create(["tenant-a", "tenant-b"])


@pytest.fixture()
def tenants(tmp_path: Path) -> Tenants:
    return Tenants(tmp_path / "tokens.json")


@pytest.fixture()
def secure(make_daemon: DaemonFactory, tenants: Tenants) -> Daemon:
    return make_daemon(auth={"tokens_file": str(tenants.path), "reload_interval_s": 0.05})


@pytest.fixture()
def channel(secure: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(secure.grpc_address) as ch:
        yield ch


def md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


def _put_request(ns: str, key: bytes = b"k") -> pb.PutRequest:
    page = make_page(1)
    data = page.k.tobytes() + page.v.tobytes()
    header = pb.PageHeader(key=key, dtype="float16", shape=list(page.k.shape),
                           k_len=page.k.nbytes, v_len=page.v.nbytes)
    return pb.PutRequest(namespace=ns, pages=[header], data=data)


def _call(ch: grpc.Channel, method: str, ns: str, token: str | None) -> Any:
    """Make ``method`` for namespace ``ns`` with ``token``; the reply (streams: as a list)."""
    cache = pb_grpc.CacheServiceStub(ch)
    device = dpb_grpc.DeviceServiceStub(ch)
    kw: dict[str, Any] = {"metadata": md(token), "timeout": 10}
    if method == "Put":
        return cache.Put(_put_request(ns), **kw)
    if method == "PutStream":
        return cache.PutStream(iter([_put_request(ns)]), **kw)
    if method == "Get":
        return cache.Get(pb.GetRequest(namespace=ns, keys=[b"k"]), **kw)
    if method == "GetStream":
        return list(cache.GetStream(pb.GetRequest(namespace=ns, keys=[b"k"]), **kw))
    if method == "Lookup":
        return cache.Lookup(pb.LookupRequest(namespace=ns, keys=[b"k"]), **kw)
    if method == "Promote":
        return cache.Promote(pb.PromoteRequest(namespace=ns, keys=[b"k"], tier="hot"), **kw)
    if method == "Delete":
        return cache.Delete(pb.DeleteRequest(namespace=ns, keys=[b"k"]), **kw)
    if method == "Stats":
        return cache.Stats(pb.StatsRequest(namespace=ns), **kw)
    if method == "AttachShm":
        seg = Segment(1 << 20)
        try:
            call = cache.AttachShm(pb.AttachShmRequest(namespace=ns, path=seg.path,
                                                       size=seg.size, token=seg.token), **kw)
            reply = next(call)
            call.cancel()
            return reply
        finally:
            seg.close()
    if method == "Hint":
        return cache.Hint(pb.HintRequest(namespace=ns, queued=[pb.KeyChain(keys=[b"k"])]), **kw)
    if method == "OpenData":
        return cache.OpenData(pb.OpenDataRequest(namespace=ns, writable=True), **kw)
    if method == "OpenShm":
        seg = Segment(1 << 20)
        try:
            reply = cache.OpenShm(pb.AttachShmRequest(namespace=ns, path=seg.path,
                                                      size=seg.size, token=seg.token), **kw)
            cache.CloseShm(pb.ShmLeaseRequest(namespace=ns, session=reply.session),
                           metadata=md(token), timeout=10)
            return reply
        finally:
            seg.close()
    if method in ("RenewShm", "CloseShm"):  # a session this namespace does not have
        return getattr(cache, method)(pb.ShmLeaseRequest(namespace=ns, session="s"), **kw)
    if method == "AttachDevice":
        call = device.AttachDevice(dpb.AttachDeviceRequest(namespace=ns), **kw)
        reply = next(call)
        call.cancel()
        return reply
    request = {"GetDevice": dpb.GetDeviceRequest, "ReserveDevice": dpb.ReserveDeviceRequest,
               "CommitDevice": dpb.CommitDeviceRequest,
               "ReleaseDevice": dpb.ReleaseDeviceRequest}[method](namespace=ns, session="s")
    return getattr(device, method)(request, **kw)


def _code(ch: grpc.Channel, method: str, ns: str, token: str | None) -> grpc.StatusCode:
    try:
        _call(ch, method, ns, token)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


WRITES = sorted(m for m, w in METHODS.items() if w)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_refuses_missing_bogus_and_foreign_tokens(
        channel: grpc.Channel, tenants: Tenants, method: str) -> None:
    assert _code(channel, method, "tenant-a", None) == UNAUTH
    assert _code(channel, method, "tenant-a", "kvt_bogus") == UNAUTH
    assert _code(channel, method, "tenant-a", tenants.a + "x") == UNAUTH
    if method != "Stats":  # daemon-wide; a named namespace must still be granted
        assert _code(channel, method, "tenant-a", tenants.b) == DENIED
    assert _code(channel, "Stats", "tenant-a", tenants.b) == DENIED
    if method in WRITES:
        assert _code(channel, method, "tenant-a", tenants.a_ro) == DENIED


@pytest.mark.parametrize("header", ["Basic x", "Bearer", "bearer ", "", "Token abc"])
def test_malformed_authorization_is_unauthenticated(channel: grpc.Channel, tenants: Tenants,
                                                    header: str) -> None:
    lookup = pb_grpc.CacheServiceStub(channel).Lookup
    with pytest.raises(grpc.RpcError) as info:
        lookup(pb.LookupRequest(namespace="tenant-a", keys=[b"k"]),
               metadata=(("authorization", header),), timeout=5)
    assert info.value.code() == UNAUTH


def test_scheme_is_case_insensitive_and_valid_tokens_work(channel: grpc.Channel,
                                                         tenants: Tenants) -> None:
    stub = pb_grpc.CacheServiceStub(channel)
    req = pb.LookupRequest(namespace="tenant-a", keys=[b"k"])
    stub.Lookup(req, metadata=(("authorization", f"bearer {tenants.a}"),), timeout=5)
    assert _code(channel, "Put", "tenant-a", tenants.a) == grpc.StatusCode.OK
    assert _code(channel, "Stats", "", tenants.a_ro) == grpc.StatusCode.OK
    for method in ("Get", "GetStream", "Lookup", "AttachShm", "OpenShm"):
        assert _code(channel, method, "tenant-a", tenants.a_ro) == grpc.StatusCode.OK
    # past auth, an unknown session is the servicer's answer, not a refusal
    assert _code(channel, "RenewShm", "tenant-a", tenants.a_ro) not in (UNAUTH, DENIED)
    assert _code(channel, "Hint", "tenant-a", tenants.a) == grpc.StatusCode.OK
    # without a device pool the device calls get past auth and fail for that reason
    assert _code(channel, "ReserveDevice", "tenant-a", tenants.a) == \
        grpc.StatusCode.FAILED_PRECONDITION


def test_no_data_reaches_another_tenant(secure: Daemon, tenants: Tenants) -> None:
    page = make_page(3)
    with KVTierClient(secure.grpc_address, "tenant-a", token=tenants.a) as a:
        a.put([b"secret"], [page])
    for shm in (False, True):
        with KVTierClient(secure.grpc_address, "tenant-b", token=tenants.b,
                          shared_memory=shm) as b:
            assert b.get([b"secret"]) == [None]  # its own namespace: a miss
            for call in (lambda: b.get([b"secret"], namespace="tenant-a"),
                         lambda: b.lookup([b"secret"], namespace="tenant-a"),
                         lambda: b.promote([b"secret"], "hot", namespace="tenant-a"),
                         lambda: b.delete([b"secret"], namespace="tenant-a"),
                         lambda: b.put([b"secret"], [make_page(4)], namespace="tenant-a")):
                with pytest.raises(PermissionDeniedError):
                    call()
    with KVTierClient(secure.grpc_address, "tenant-a", token=tenants.a_ro) as ro:
        got = ro.get([b"secret"])[0]
        assert got is not None and np.array_equal(got.k, page.k)  # untouched
        assert ro.uses_shared_memory  # a read-only token opens a session for its gets
        for call in (lambda: ro.put([b"x"], [make_page(5)]), lambda: ro.delete([b"secret"]),
                     lambda: ro.promote([b"secret"], "hot")):
            with pytest.raises(PermissionDeniedError):
                call()
    with KVTierClient(secure.grpc_address, "tenant-a") as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.get([b"secret"])


def test_a_stream_cannot_switch_to_a_namespace_not_granted(channel: grpc.Channel,
                                                          tenants: Tenants) -> None:
    stub = pb_grpc.CacheServiceStub(channel)
    second = _put_request("tenant-b", b"other")
    with pytest.raises(grpc.RpcError) as info:
        stub.PutStream(iter([_put_request("tenant-a"), second]), metadata=md(tenants.a),
                       timeout=10)
    assert info.value.code() == DENIED
    reply = stub.Lookup(pb.LookupRequest(namespace="tenant-b", keys=[b"other"]),
                        metadata=md(tenants.b), timeout=5)
    assert reply.prefix_length == 0


def test_shm_session_is_bound_to_its_tenant(channel: grpc.Channel, tenants: Tenants) -> None:
    stub = pb_grpc.CacheServiceStub(channel)
    stub.Put(_put_request("tenant-b", b"bsecret"), metadata=md(tenants.b), timeout=5)
    seg = Segment(1 << 20)
    call = stub.AttachShm(pb.AttachShmRequest(namespace="tenant-a", path=seg.path,
                                              size=seg.size, token=seg.token),
                          metadata=md(tenants.a))
    session = next(call).session
    seg.unlink()
    try:
        get = pb.GetRequest(namespace="tenant-b", keys=[b"bsecret"], shm_session=session,
                            shm_offset=64, shm_capacity=1 << 19)
        for token in (tenants.a, tenants.b, tenants.both):  # no token can pull b's pages in
            with pytest.raises(grpc.RpcError) as info:
                stub.Get(get, metadata=md(token), timeout=5)
            assert info.value.code() == DENIED
        assert bytes(seg.view[64:64 + 64]) == bytes(64)
    finally:
        call.cancel()
        seg.close()


def test_revoked_token_stops_working_without_restart(secure: Daemon, tenants: Tenants) -> None:
    with KVTierClient(secure.grpc_address, "tenant-a", token=tenants.a,
                      shared_memory=True) as a:
        a.put([b"k"], [make_page(1)])
        assert a.lookup([b"k"]).prefix_length == 1
        tenants.file.revoke(tenants.a_entry.id)

        def refused() -> bool:
            try:
                a.lookup([b"k"])
            except UnauthenticatedError:
                return True
            return False

        assert wait_for(refused, 5.0)
        with pytest.raises(UnauthenticatedError):
            a.get([b"k"])  # the shared-memory session is no way around it
    with KVTierClient(secure.grpc_address, "tenant-a", token=tenants.both) as other:
        assert other.lookup([b"k"]).prefix_length == 1  # other tokens keep working


def test_reload_on_demand_and_a_broken_file_fails_closed(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.json"
    f = TokenFile(path)
    tok, entry = f.create(["ns"])
    reg = TokenRegistry(path, check_interval_s=3600)
    assert reg.grant(tok) is not None
    f.revoke(entry.id)
    assert reg.grant(tok) is not None  # not looked at yet (interval)
    assert reg.reload() and reg.grant(tok) is None
    tok2, _ = f.create(["ns"])
    path.write_text("{not json")
    assert not reg.reload()
    assert reg.grant(tok2) is None and "unusable" in caplog.text
    with pytest.raises(ConfigError):
        TokenRegistry(path)
    with pytest.raises(ConfigError):
        TokenRegistry(tmp_path / "missing.json")


def test_sighup_reloads_tokens(secure: Daemon, tenants: Tenants) -> None:
    """What ``kvtier serve`` installs for SIGHUP: ``Daemon.reload_tokens``."""
    tokens = secure.context.tokens
    assert tokens is not None
    tokens.check_interval_s = 3600.0
    previous = signal.signal(signal.SIGHUP, lambda *_: secure.reload_tokens())
    try:
        tenants.file.revoke(tenants.b)  # by the token itself
        os.kill(os.getpid(), signal.SIGHUP)
        assert wait_for(lambda: tokens.grant(tenants.b) is None, 2.0)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_tokens_file_keeps_hashes_only_with_mode_0600(tenants: Tenants) -> None:
    text = tenants.path.read_text()
    for token in (tenants.a, tenants.b, tenants.a_ro):
        assert token not in text and hash_token(token) in text
    assert stat.S_IMODE(tenants.path.stat().st_mode) == 0o600
    ids = [e.id for e in tenants.file.entries()]
    assert len(set(ids)) == 4


def test_health_and_reflection_stay_open(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "kvtier.v1.CacheService" in names


def test_refused_calls_are_counted_under_their_status(secure: Daemon,
                                                     channel: grpc.Channel) -> None:
    _code(channel, "Lookup", "tenant-a", None)
    _code(channel, "Delete", "tenant-a", "kvt_bogus")
    totals = secure.context.rpc_stats.totals()
    assert ("Lookup", "UNAUTHENTICATED") in totals and ("Delete", "UNAUTHENTICATED") in totals


def test_async_client_sends_its_token(secure: Daemon, tenants: Tenants) -> None:
    import asyncio

    async def main() -> None:
        c = AsyncKVTierClient(secure.grpc_address, "tenant-a", token=tenants.a,
                              shared_memory=False)
        await c.put([b"k"], [make_page(1)])
        assert (await c.lookup([b"k"])).prefix_length == 1
        await c.close()
        bad = AsyncKVTierClient(secure.grpc_address, "tenant-a", token="kvt_nope",
                                shared_memory=False)
        with pytest.raises(UnauthenticatedError):
            await bad.lookup([b"k"])
        await bad.close()

    asyncio.run(main())


def test_client_refuses_a_token_that_cannot_travel() -> None:
    for token in ("", "a b", "tök", "a\nb"):
        with pytest.raises(ValueError):
            KVTierClient("127.0.0.1:1", token=token)


def test_bearer_token_parsing() -> None:
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("x", "y"), ("authorization", "BEARER  abc "))) == "abc"
    assert bearer_token((("authorization", "Bearer "),)) is None
    assert bearer_token(()) is None
    assert bearer_token(None) is None


def test_non_loopback_grpc_needs_tokens_or_the_insecure_switch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError) as info:
        check_grpc_exposure(Settings(grpc_host="0.0.0.0"))
    assert info.value.field == "auth.tokens_file"
    with pytest.raises(ConfigError):
        Daemon(Settings(grpc_host="0.0.0.0", grpc_port=0)).start()
    check_grpc_exposure(Settings(grpc_host="127.0.0.1"))
    check_grpc_exposure(Settings(grpc_host="::1"))
    check_grpc_exposure(Settings(grpc_host="0.0.0.0",
                                 auth={"tokens_file": str(tmp_path / "t.json")}))
    check_grpc_exposure(Settings(grpc_host="0.0.0.0",
                                 auth={"insecure_allow_unauthenticated": True}))
    assert "INSECURE" in caplog.text


def test_unknown_kvtier_variables_are_named_at_start(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from kvtier.config import load_settings, unknown_env_vars

    env = {"KVTIER_GRPC_PORT": "1", "KVTIER_REDIS__URL": "x", "KVTIER_AUTH__TOKENS_FILE": "f",
           "KVTIER_GRPC_PROT": "1", "KVTIER_REDIS__URLL": "x", "KVTIER_IMAGE_TAG": "cpu",
           "kvtier_http_port": "1", "OTHER": "1", "KVTIER_REDIS__URL__X": "1"}
    assert unknown_env_vars(env) == ["KVTIER_GRPC_PROT", "KVTIER_REDIS__URLL",
                                     "KVTIER_REDIS__URL__X"]
    monkeypatch.setenv("KVTIER_ADMIN_TOKN", "x")
    load_settings()
    assert "KVTIER_ADMIN_TOKN" in caplog.text


def test_cli_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli import main

    path = str(tmp_path / "t.json")
    assert main(["token", "create", "--tokens-file", path, "--namespace", "a",
                 "--namespace", "b", "--read-only"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("kvt_") and "\n" not in token
    assert main(["token", "list", "--tokens-file", path]) == 0
    out = capsys.readouterr().out
    assert "read-only" in out and "a,b" in out and token not in out
    entry = TokenFile(path).entries()[0]
    assert entry.namespaces == ("a", "b") and entry.read_only
    assert main(["token", "list", "--tokens-file", path, "--json"]) == 0
    assert '"hash"' not in capsys.readouterr().out
    assert main(["token", "create", "--tokens-file", path, "--namespace", "ｔenant"]) == 2
    assert main(["token", "create", "--tokens-file", path, "--namespace", "a..b"]) == 2
    assert main(["token", "revoke", "--tokens-file", path, "nope"]) == 2
    assert main(["token", "revoke", "--tokens-file", path, entry.id]) == 0
    assert TokenFile(path).entries() == []


def test_a_second_later_the_file_is_looked_at_again(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    f = TokenFile(path)
    tok, entry = f.create(["ns"])
    reg = TokenRegistry(path, check_interval_s=0.05)
    assert reg.grant(tok) is not None
    f.revoke(entry.id)
    time.sleep(0.1)
    assert reg.grant(tok) is None


def test_policy_service_takes_its_token(caplog: pytest.LogCaptureFixture) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvtier.store.policy import LRUPolicy
    from kvtier.transport.auth.exposure import check_policy_exposure
    from kvtier.transport.policy.client import RemotePolicy
    from kvtier.transport.policy.service import make_policy_server
    from kvtier_proto.v1 import policy_pb2, policy_pb2_grpc

    server, port, _ = make_policy_server(LRUPolicy(), "127.0.0.1", 0, token="p-secret")
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            for metadata in ((), md("wrong"), md("p-secretx")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Status(policy_pb2.PolicyStatusRequest(), metadata=metadata, timeout=5)
                assert info.value.code() == UNAUTH
            with pytest.raises(grpc.RpcError) as info:
                stub.ReportAccesses(iter([policy_pb2.AccessBatch()]), timeout=5)
            assert info.value.code() == UNAUTH
            stub.Status(policy_pb2.PolicyStatusRequest(), metadata=md("p-secret"), timeout=5)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        good = RemotePolicy(address, timeout_s=2.0, token="p-secret")
        bad = RemotePolicy(address, timeout_s=2.0, token="nope")
        try:
            from kvtier.store.policy import PageMeta
            from kvtier.types import Namespace, PageId, PageKey

            page = PageMeta(PageId(Namespace("ns"), PageKey(b"p1")), "hot", 0, 100, 0, 1, 1.0,
                            1, 0)
            good.score([page])
            bad.score([page])
            assert not good.status().fallback_active
            assert bad.status().fallback_active  # refused: the daemon serves with its fallback
        finally:
            good.close()
            bad.close()
    finally:
        server.stop(0)
    with pytest.raises(ConfigError) as err:
        check_policy_exposure(Settings(), "0.0.0.0")
    assert err.value.field == "policy.token"
    check_policy_exposure(Settings(policy={"token": "t"}), "0.0.0.0")
    check_policy_exposure(Settings(), "127.0.0.1")


def _serve(env: dict[str, str]) -> subprocess.Popen[str]:
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    base.update({"KVTIER_GRPC_PORT": "0", "KVTIER_HTTP_PORT": "0", "KVTIER_DEVICE": "cpu",
                 **env})
    return subprocess.Popen([sys.executable, "-m", "kvtier.cli", "--log-level", "WARNING",
                             "serve", "--grace", "1"], env=base, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kvtier_serve_refuses_exposure_and_reloads_tokens_on_sighup(tenants: Tenants) -> None:
    refused = _serve({"KVTIER_GRPC_HOST": "0.0.0.0"})
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "KVTIER_AUTH__TOKENS_FILE" in out, out
    proc = _serve({"KVTIER_AUTH__TOKENS_FILE": str(tenants.path),
                   "KVTIER_AUTH__RELOAD_INTERVAL_S": "3600"})
    try:
        assert proc.stdout is not None
        address = None
        for line in proc.stdout:
            if line.startswith("kvtier: gRPC"):
                address = line.split()[-1]
            if line.startswith("kvtier: ready"):
                break
        assert address is not None, "the daemon did not start"
        with KVTierClient(address, "tenant-a", token=tenants.a, shared_memory=False) as a:
            a.put([b"k"], [make_page(1)])
            tenants.file.revoke(tenants.a_entry.id)
            assert a.lookup([b"k"]).prefix_length == 1  # not looked at for an hour
            proc.send_signal(signal.SIGHUP)

            def refused_now() -> bool:
                try:
                    a.lookup([b"k"])
                except UnauthenticatedError:
                    return True
                return False

            assert wait_for(refused_now, 10.0)
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_tokens_file_others_may_write_is_warned_about(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "t.json"
    TokenFile(path).create(["ns"])
    TokenRegistry(path)
    assert "writable by others" not in caplog.text
    path.chmod(0o666)
    TokenRegistry(path)
    assert "writable by others" in caplog.text


def test_every_guarded_rpc_has_an_entry_in_the_auth_table() -> None:
    """A new RPC must say whether it reads or writes: unlisted ones would default to write."""
    from kvtier.transport.auth.guard import GUARDED_SERVICES, METHODS
    from kvtier_proto.v1 import cache_pb2, device_pb2

    files = (cache_pb2.DESCRIPTOR, device_pb2.DESCRIPTOR)
    rpcs = {m.name for f in files for s in f.services_by_name.values()
            if s.full_name in GUARDED_SERVICES for m in s.methods}
    assert rpcs and rpcs == set(METHODS), sorted(rpcs ^ set(METHODS))
