"""Tenant tokens on the admin API, its body limit, its 405s, and inputs it must refuse."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from kvtier.admin.app import MAX_BODY_BYTES
from kvtier.admin.server import start_http
from kvtier.daemon import Daemon
from kvtier.transport.auth.tokens import TokenFile, TokenRegistry
from kvtier_proto.v1 import cache_pb2 as pb
from kvtier_proto.v1 import cache_pb2_grpc as pb_grpc

from .conftest import AUTH, NS, Admin, error, make_settings, put_pages, tiers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def tenant_admin(start_admin: Callable[..., Admin], redis_url: str,
                 tmp_path: Path) -> Iterator[tuple[Admin, dict[str, str]]]:
    path = tmp_path / "tokens.json"
    f = TokenFile(path)
    tokens = {"a": f.create([NS])[0], "b": f.create(["tenant-b"])[0],
              "a_ro": f.create([NS], read_only=True)[0]}
    admin = start_admin(make_settings(redis_url))
    # the context is frozen; the app reads its tokens on every request
    object.__setattr__(admin.context, "tokens", TokenRegistry(path, 0.05))
    yield admin, tokens


def test_tenant_tokens_read_their_own_pages_only(tenant_admin: tuple[Admin, dict[str, str]]
                                                 ) -> None:
    admin, tok = tenant_admin
    keys = put_pages(admin, 1)
    page = f"/v1/pages/{NS}/{keys[0].hex()}"
    assert admin.http.get(page, headers=bearer(tok["a"])).json()["tier"] == "hot"
    assert admin.http.get(page, headers=bearer(tok["a_ro"])).status_code == 200
    r = admin.http.get(page, headers=bearer(tok["b"]))
    assert "tenant-a" in error(r, 403, "PERMISSION_DENIED", "authorization")
    assert "tier" not in r.text
    error(admin.http.get(page, headers=bearer("kvt_bogus")), 403, "PERMISSION_DENIED")
    error(admin.http.get(page), 401, "UNAUTHENTICATED")
    # a tenant never mutates, not even its own pages
    for method, path, body in (("DELETE", page, None), ("POST", f"{page}/demote", {"tier": "cold"}),
                               ("PATCH", "/v1/tiers/hot", {"capacity_bytes": 1}),
                               ("POST", "/v1/drain", None)):
        r = admin.http.request(method, path, json=body, headers=bearer(tok["a"]))
        error(r, 403, "PERMISSION_DENIED")
    assert admin.store.page_info(NS, keys[0]) is not None
    assert admin.http.get(page, headers=AUTH).status_code == 200  # the admin token reads all


def test_page_reads_without_any_token_configured(start_admin: Callable[..., Admin],
                                                 redis_url: str) -> None:
    local = start_admin(make_settings(redis_url, admin_token=None))
    keys = put_pages(local, 1)
    assert local.http.get(f"/v1/pages/{NS}/{keys[0].hex()}").status_code == 200  # loopback
    exposed = start_admin(make_settings(redis_url, admin_token=None, http_host="0.0.0.0",
                                        admin_mutations=False))
    keys = put_pages(exposed, 1)
    r = exposed.http.get(f"/v1/pages/{NS}/{keys[0].hex()}")
    assert "KVTIER_ADMIN_TOKEN" in error(r, 403, "PERMISSION_DENIED")


def test_body_limit_is_checked_after_auth(admin: Admin) -> None:
    big = b'{"capacity_bytes": 1' + b" " * MAX_BODY_BYTES + b"}"
    hdr = {"Content-Type": "application/json"}
    error(admin.http.patch("/v1/tiers/hot", content=big, headers=hdr), 401, "UNAUTHENTICATED")
    error(admin.http.patch("/v1/tiers/hot", content=big, headers={**hdr, **bearer("wrong")}),
          403, "PERMISSION_DENIED")
    error(admin.http.patch("/v1/tiers/hot", content=big, headers={**hdr, **AUTH}), 413,
          "INVALID_ARGUMENT", "body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"capacity_bytes": 1'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096
        yield b"}"

    error(admin.http.patch("/v1/tiers/hot", content=chunks(), headers={**hdr, **AUTH}), 413,
          "INVALID_ARGUMENT")
    assert tiers(admin)["hot"]["capacity_bytes"] > 1
    ok = admin.http.patch("/v1/tiers/hot", content=b'{"capacity_bytes": 65536}',
                          headers={**hdr, **AUTH})
    assert ok.status_code == 200 and ok.json()["capacity_bytes"] == 65536


def test_an_unauthenticated_client_cannot_make_the_daemon_read_its_body(admin: Admin) -> None:
    """A huge Content-Length and no token: answered 401 at once, the body never read."""
    host, port = admin.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"PATCH /v1/tiers/hot HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000000000\r\n\r\n{")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401")


def test_405_allows_every_method_of_the_path(admin: Admin) -> None:
    r = admin.http.put(f"/v1/pages/{NS}/a000", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["status"] == 405
    assert set(r.headers["allow"].split(", ")) >= {"GET", "DELETE"}
    r = admin.http.post("/v1/policy", headers=AUTH)
    assert set(r.headers["allow"].split(", ")) >= {"GET", "PUT"}
    r = admin.http.delete("/v1/tiers/hot", headers=AUTH)
    assert r.headers["allow"] == "PATCH"


@pytest.mark.parametrize("body", [
    {"capacity_bytes": True}, {"capacity_bytes": False}, {"capacity_bytes": 1.0},
    {"capacity_bytes": 4096.5}, {"capacity_bytes": "4096"}, {"capacity_bytes": 2**70},
    {"capacity_bytes": 2**63}, {"capacity_bytes": None, "high_watermark": True},
    {"low_watermark": False}, {"low_watermark": "0.1"}, {"high_watermark": [0.5]},
    {"capacity_bytes": 0}, {"capacity_bytes": -1},
])
def test_sizes_and_ratios_are_never_coerced(admin: Admin, body: dict[str, Any]) -> None:
    before = tiers(admin)["hot"]
    r = admin.http.patch("/v1/tiers/hot", json=body, headers=AUTH)
    error(r, 422, "INVALID_ARGUMENT")
    assert tiers(admin)["hot"] == before


def test_ints_are_ratios_and_the_size_cap_keeps_grpc_stats_working(redis_url: str) -> None:
    settings = make_settings(redis_url, http_port=0, grpc_port=0)
    daemon = Daemon(settings, start_http=start_http).start()
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=10)
        r = http.patch("/v1/tiers/warm", json={"capacity_bytes": 2**63 - 1,
                                               "low_watermark": 0, "high_watermark": 1},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["low_watermark"] == 0.0 and r.json()["high_watermark"] == 1.0
        with grpc.insecure_channel(daemon.grpc_address) as ch:
            reply = pb_grpc.CacheServiceStub(ch).Stats(pb.StatsRequest(), timeout=10)
        warm = [t for t in reply.tiers if t.name == "warm"][0]
        assert warm.capacity_bytes == 2**63 - 1
        http.close()
    finally:
        daemon.stop(grace_s=0.5)


@pytest.mark.parametrize("namespace", [
    "ｔｅｎａｎｔ-a", "tenant-ａ", "ténant", "tenant\u200b", "..", ".hidden", "a..b", "a/b",
    "%2e%2e", "a b", "",
])
def test_look_alike_namespaces_are_refused(admin: Admin, namespace: str) -> None:
    from kvtier.errors import InvalidArgument
    from kvtier.pages import check_namespace

    with pytest.raises(InvalidArgument):
        check_namespace(namespace)
    if namespace and "/" not in namespace:
        r = admin.http.get(f"/v1/pages/{namespace}/a000", headers=AUTH)
        assert r.status_code in (400, 404) and r.status_code != 200
        if r.status_code == 400:
            assert r.json()["error"]["field"] == "namespace"
