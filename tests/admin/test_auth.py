"""Who may mutate through the admin API, and where it may listen (real uvicorn + TierStore)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kvtier.admin.auth import check_exposure, is_loopback
from kvtier.admin.server import serve_http
from kvtier.errors import ConfigError
from kvtier.store.store import TierStore
from kvtier.transport.context import DaemonContext

from .conftest import AUTH, NS, TOKEN, Admin, error, make_settings, put_pages

# -- auth ---------------------------------------------------------------------------------------

MUTATIONS: list[tuple[str, str, Any]] = [
    ("PATCH", "/v1/tiers/hot", {"capacity_bytes": 4096}),
    ("POST", f"/v1/pages/{NS}/a000/promote", {"tier": "hot"}),
    ("POST", f"/v1/pages/{NS}/a000/demote", {"tier": "cold"}),
    ("DELETE", f"/v1/pages/{NS}/a000", None),
    ("PUT", "/v1/policy", {"name": "lfu"}),
    ("POST", "/v1/drain", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS)
def test_mutations_need_the_bearer_token(admin: Admin, method: str, path: str,
                                         body: Any) -> None:
    put_pages(admin, 1)
    before = admin.http.get("/v1/stats").json()["tiers"]

    def call(headers: dict[str, str]) -> httpx.Response:
        return admin.http.request(method, path, json=body, headers=headers)

    r = call({})
    error(r, 401, "UNAUTHENTICATED", "authorization")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    error(call({"Authorization": TOKEN}), 401, "UNAUTHENTICATED")  # no scheme
    error(call({"Authorization": f"Basic {TOKEN}"}), 401, "UNAUTHENTICATED")
    error(call({"Authorization": "Bearer"}), 401, "UNAUTHENTICATED")
    error(call({"Authorization": f"Bearer {TOKEN}x"}), 403, "PERMISSION_DENIED")
    error(call({"Authorization": "Bearer wrong"}), 403, "PERMISSION_DENIED")
    after = admin.http.get("/v1/stats").json()["tiers"]
    assert [(t["pages"], t["capacity_bytes"]) for t in after] == [
        (t["pages"], t["capacity_bytes"]) for t in before
    ], "a refused mutation changed nothing"
    assert admin.store.policy.name == "lru"
    assert call(AUTH).status_code == 200


def test_auth_is_checked_before_the_body(admin: Admin) -> None:
    # Callers without the token learn nothing about what a valid body looks like.
    error(admin.http.patch("/v1/tiers/hot", json={"capacity_bytes": -1}), 401, "UNAUTHENTICATED")
    error(admin.http.patch("/v1/tiers/nope", json={"capacity_bytes": -1},
                           headers={"Authorization": "Bearer wrong"}), 403, "PERMISSION_DENIED")


def test_daemon_wide_reads_need_no_token_and_page_reads_do(admin: Admin) -> None:
    keys = put_pages(admin, 1)
    for path in ("/healthz", "/readyz", "/metrics", "/v1/stats", "/v1/tiers", "/v1/policy",
                 "/docs", "/openapi.json"):
        assert admin.http.get(path).status_code == 200, path
    page = f"/v1/pages/{NS}/{keys[0].hex()}"
    error(admin.http.get(page), 401, "UNAUTHENTICATED", "authorization")
    error(admin.http.get(page, headers={"Authorization": "Bearer wrong"}), 403,
          "PERMISSION_DENIED")
    assert admin.http.get(page, headers=AUTH).status_code == 200


def test_mutations_disabled_are_forbidden_even_with_the_token(
    start_admin: Callable[..., Admin], redis_url: str
) -> None:
    admin = start_admin(make_settings(redis_url, admin_mutations=False))
    for method, path, body in MUTATIONS:
        r = admin.http.request(method, path, json=body, headers=AUTH)
        assert "disabled" in error(r, 403, "PERMISSION_DENIED")
    assert admin.http.get("/v1/tiers").status_code == 200


@pytest.mark.parametrize("token", [None, ""])
def test_no_configured_token_refuses_mutations(
    start_admin: Callable[..., Admin], redis_url: str, token: str | None
) -> None:
    admin = start_admin(make_settings(redis_url, admin_token=token))
    for headers in ({}, AUTH, {"Authorization": "Bearer"}):
        r = admin.http.put("/v1/policy", json={"name": "lfu"}, headers=headers)
        assert "KVTIER_ADMIN_TOKEN" in error(r, 403, "PERMISSION_DENIED")
    assert admin.store.policy.name == "lru"


def test_refuses_to_start_exposed_without_a_token(redis_url: str) -> None:
    settings = make_settings(redis_url, admin_token=None, http_host="0.0.0.0")
    with pytest.raises(ConfigError, match="KVTIER_ADMIN_TOKEN") as info:
        check_exposure(settings)
    assert info.value.field == "admin_token"
    store = TierStore(settings)
    try:
        with pytest.raises(ConfigError):
            serve_http(DaemonContext(settings=settings, store=store), port=0)
    finally:
        store.close()
    # Each way out of the rule is accepted.
    check_exposure(make_settings(redis_url, admin_token="t", http_host="0.0.0.0"))
    check_exposure(make_settings(redis_url, admin_token=None, http_host="0.0.0.0",
                                 admin_mutations=False))
    check_exposure(make_settings(redis_url, admin_token=None, http_host="127.0.0.1"))
    check_exposure(make_settings(redis_url, admin_token=None, http_host="::1"))


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
    ("kvtier-daemon", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback




def test_daemon_refuses_to_start_exposed_without_a_token(redis_url: str) -> None:
    from kvtier.admin.server import start_http
    from kvtier.daemon import Daemon

    settings = make_settings(redis_url, admin_token=None, http_host="0.0.0.0")
    daemon = Daemon(settings, start_http=start_http)
    with pytest.raises(ConfigError, match="non-loopback"):
        daemon.start()
    # Nothing is left serving: the gRPC server that had started is stopped again.
    assert daemon.http_port is None
    if daemon.grpc_port:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", daemon.grpc_port), timeout=1).close()
