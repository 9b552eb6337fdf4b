"""TLS on every port: gRPC (sync and asyncio clients, mTLS), HTTP, the policy service, and
Redis over TLS against a real ``redis-server --tls-port``."""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvtier.config import PolicyConfig, Settings, TlsConfig, load_settings
from kvtier.daemon import Daemon, default_start_http
from kvtier.errors import ConfigError
from kvtier.store.policy import LRUPolicy, PageMeta
from kvtier.procs.certs import CertPair, self_signed
from kvtier.procs.redis import RedisProcess
from kvtier.transport.policy.client import make_policy
from kvtier.transport.policy.service import make_metrics_server, make_policy_server
from kvtier.types import Namespace, PageId
from kvtier_client import AsyncKVTierClient, KVTierClient
from kvtier_client.errors import KVTierClientError

from .conftest import DaemonFactory, make_page, tiny_tiers


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertPair]:
    d = tmp_path_factory.mktemp("pki")
    return {name: self_signed(d, name) for name in ("server", "client", "stranger")}


def _tls(pki: dict[str, CertPair], mtls: bool = False) -> dict[str, str]:
    tls = {"cert_file": pki["server"].cert_file, "key_file": pki["server"].key_file}
    if mtls:
        tls["client_ca_file"] = pki["client"].cert_file
    return tls


@pytest.mark.parametrize("shm", [False, True])
def test_roundtrip_over_tls(make_daemon: DaemonFactory, pki: dict[str, CertPair],
                            shm: bool) -> None:
    daemon = make_daemon(tls=_tls(pki))
    with KVTierClient(daemon.grpc_address, "t", shared_memory=shm,
                      tls_ca_file=pki["server"].cert_file) as c:
        assert c.put([b"a"], [make_page(1)]) == ["stored"]
        got = c.get([b"a"])[0]
        assert got is not None and np.array_equal(got.k, make_page(1).k)
        assert c.lookup([b"a"]).prefix_length == 1
        assert c.uses_shared_memory is shm
        assert c.uses_data_channel  # its connection speaks TLS too (inline pages ride it)


def test_data_channel_over_mtls(make_daemon: DaemonFactory, pki: dict[str, CertPair]) -> None:
    daemon = make_daemon(tls=_tls(pki, mtls=True))
    assert daemon._data is not None and daemon._data.tls
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False,
                      tls_ca_file=pki["server"].cert_file,
                      tls_cert_file=pki["client"].cert_file,
                      tls_key_file=pki["client"].key_file) as c:
        pages = [make_page(i) for i in range(3)]
        assert c.put([b"a", b"b", b"c"], pages) == ["stored"] * 3
        got = c.get([b"a", b"b", b"c"])
        assert c.uses_data_channel
        for g, p in zip(got, pages):
            assert g is not None and np.array_equal(g.k, p.k) and np.array_equal(g.v, p.v)


def test_asyncio_client_over_mtls(make_daemon: DaemonFactory, pki: dict[str, CertPair]) -> None:
    daemon = make_daemon(tls=_tls(pki, mtls=True))

    async def go() -> None:
        async with AsyncKVTierClient(daemon.grpc_address, "t",
                                     tls_ca_file=pki["server"].cert_file,
                                     tls_cert_file=pki["client"].cert_file,
                                     tls_key_file=pki["client"].key_file) as c:
            await c.put([b"a"], [make_page(2)])
            got = (await c.get([b"a"]))[0]
            assert got is not None and np.array_equal(got.v, make_page(2).v)

    asyncio.run(go())


def test_plaintext_client_fails_cleanly(make_daemon: DaemonFactory,
                                        pki: dict[str, CertPair]) -> None:
    daemon = make_daemon(tls=_tls(pki))
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False, timeout_s=5.0) as c:
        t0 = time.monotonic()
        with pytest.raises(KVTierClientError) as info:
            c.lookup([b"a"])
        assert info.value.code == "UNAVAILABLE"
        assert time.monotonic() - t0 < 5.5  # no hang past the deadline


def test_tls_client_against_a_plaintext_daemon_fails_cleanly(
        make_daemon: DaemonFactory, pki: dict[str, CertPair]) -> None:
    daemon = make_daemon()
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False, timeout_s=3.0,
                      tls_ca_file=pki["server"].cert_file) as c:
        with pytest.raises(KVTierClientError) as info:
            c.lookup([b"a"])
        assert info.value.code == "UNAVAILABLE"


@pytest.mark.parametrize("who", ["no certificate", "untrusted certificate", "wrong server CA"])
def test_mtls_refuses_clients_without_a_trusted_certificate(
        make_daemon: DaemonFactory, pki: dict[str, CertPair], who: str) -> None:
    daemon = make_daemon(tls=_tls(pki, mtls=True))
    kw: dict[str, str] = {"tls_ca_file": pki["server"].cert_file}
    if who == "untrusted certificate":
        kw.update(tls_cert_file=pki["stranger"].cert_file,
                  tls_key_file=pki["stranger"].key_file)
    if who == "wrong server CA":  # the client does not trust the daemon
        kw.update(tls_ca_file=pki["stranger"].cert_file, tls_cert_file=pki["client"].cert_file,
                  tls_key_file=pki["client"].key_file)
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False, timeout_s=3.0,
                      **kw) as c:  # type: ignore[arg-type]
        with pytest.raises(KVTierClientError) as info:
            c.lookup([b"a"])
        assert info.value.code == "UNAVAILABLE"
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False,
                      tls_ca_file=pki["server"].cert_file,
                      tls_cert_file=pki["client"].cert_file,
                      tls_key_file=pki["client"].key_file) as ok:
        assert ok.lookup([b"a"]).prefix_length == 0


def _https_get(url: str, pki: dict[str, CertPair], client: bool) -> int:
    ctx = ssl.create_default_context(cafile=pki["server"].cert_file)
    if client:
        ctx.load_cert_chain(pki["client"].cert_file, pki["client"].key_file)
    with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
        return int(r.status)


def test_http_port_over_tls_and_mtls(pki: dict[str, CertPair]) -> None:
    settings = Settings(grpc_port=0, http_port=0, tls=_tls(pki, mtls=True))
    daemon = Daemon(settings, start_http=default_start_http()).start()
    try:
        base = f"https://127.0.0.1:{daemon.http_port}"
        assert _https_get(base + "/healthz", pki, client=True) == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            _https_get(base + "/healthz", pki, client=False)  # no client certificate
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext HTTP
            urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/healthz", timeout=5)
    finally:
        daemon.stop(grace_s=0.5)


def test_policy_service_over_mtls(pki: dict[str, CertPair]) -> None:
    tls = TlsConfig(**_tls(pki), client_ca_file=pki["server"].cert_file)
    server, port, servicer = make_policy_server(LRUPolicy(), "127.0.0.1", 0, tls=tls)
    httpd, http_port = make_metrics_server(servicer, "127.0.0.1", 0, tls=tls)
    server.start()
    web = threading.Thread(target=httpd.serve_forever, daemon=True)
    web.start()
    config = PolicyConfig(name="lru", address=f"127.0.0.1:{port}", timeout_s=2.0)
    try:
        page = PageMeta(PageId(Namespace("t"), b"a"), "hot", 0, 100, 0, 1, 1.0, 1, 0)
        remote = make_policy(config, tls)  # the daemon's pair is also its client certificate
        try:
            assert len(remote.score([page])) == 1
            assert not remote.down and remote.fallback_calls == 0  # type: ignore[attr-defined]
        finally:
            remote.close()
        plain = make_policy(config)  # without TLS: the service stays out of reach
        try:
            plain.score([page])
            assert plain.down  # type: ignore[attr-defined]
        finally:
            plain.close()
        ctx = ssl.create_default_context(cafile=pki["server"].cert_file)
        ctx.load_cert_chain(pki["server"].cert_file, pki["server"].key_file)
        with urllib.request.urlopen(f"https://127.0.0.1:{http_port}/metrics", context=ctx,
                                    timeout=5) as r:
            assert b"kvtier_policy" in r.read()
    finally:
        server.stop(0)
        httpd.shutdown()


@pytest.fixture()
def tls_redis(pki: dict[str, CertPair], tmp_path: Path) -> Iterator[RedisProcess]:
    pair = self_signed(tmp_path, "redis")
    with RedisProcess(tls=pair, tls_clients=True) as proc:
        yield proc


def test_redis_tier_over_tls(make_daemon: DaemonFactory, tls_redis: RedisProcess) -> None:
    pair = tls_redis.tls
    assert pair is not None and tls_redis.url.startswith("rediss://")
    daemon = make_daemon(tiers=tiny_tiers(with_redis=True),
                         redis={"url": tls_redis.url, "ssl_ca_file": pair.cert_file,
                                "ssl_cert_file": pair.cert_file,
                                "ssl_key_file": pair.key_file})
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False) as c:
        keys = [f"k{i}".encode() for i in range(8)]
        for i, k in enumerate(keys):
            c.put([k], [make_page(i)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            tiers = c.lookup(keys).tiers
            if "remote" in tiers:
                break
            time.sleep(0.05)
        assert "remote" in tiers
        i = tiers.index("remote")
        got = c.get([keys[i]])[0]
        assert got is not None and got.tier == "remote" and got.k.shape == make_page(i).k.shape
        assert c.stats().redis_up


def test_redis_without_the_ca_is_down_not_a_crash(make_daemon: DaemonFactory,
                                                   tls_redis: RedisProcess) -> None:
    daemon = make_daemon(tiers=tiny_tiers(with_redis=True), redis={"url": tls_redis.url})
    with KVTierClient(daemon.grpc_address, "t", shared_memory=False) as c:
        for i in range(6):
            c.put([f"k{i}".encode()], [make_page(i)])
        assert not c.stats().redis_up  # the self-signed certificate is not trusted


def test_tls_settings_are_checked(pki: dict[str, CertPair], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cert_file and tls.key_file"):
        load_settings(tls={"cert_file": pki["server"].cert_file})
    with pytest.raises(ConfigError, match="client_ca_file"):
        load_settings(tls={"client_ca_file": pki["client"].cert_file})
    with pytest.raises(ConfigError, match="rediss://"):
        load_settings(redis={"url": "redis://127.0.0.1:1/0", "ssl_ca_file": "x.pem"})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls.cert_file"):
        Daemon(Settings(grpc_port=0, tls={"cert_file": str(bad),
                                          "key_file": pki["server"].key_file})).start()
    with pytest.raises(ConfigError, match="cannot read"):
        Daemon(Settings(grpc_port=0, tls={"cert_file": str(tmp_path / "missing.pem"),
                                          "key_file": pki["server"].key_file})).start()


def test_up_tls_makes_a_pair_clients_can_trust(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kvtier.cli.up import with_self_signed_tls

    settings = with_self_signed_tls(Settings(grpc_port=0), str(tmp_path))
    assert settings.tls.enabled and settings.tls.cert_file is not None
    assert "tls_ca_file=" in capsys.readouterr().out
    daemon = Daemon(settings).start()
    try:
        with KVTierClient(daemon.grpc_address, "t", shared_memory=False,
                          tls_ca_file=settings.tls.cert_file) as c:
            assert c.lookup([b"a"]).prefix_length == 0
    finally:
        daemon.stop(grace_s=0.5)
