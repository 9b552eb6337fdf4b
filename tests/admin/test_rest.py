"""Every admin route over a real uvicorn, a real TierStore and a real redis-server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from kvtier.admin.server import serve_http
from kvtier.procs.redis import RedisProcess
from kvtier.errors import ConfigError
from kvtier.store.policy import LRUPolicy, PolicyStatus
from kvtier.store.store import TierStore
from kvtier.transport.context import DaemonContext, Readiness

from .conftest import AUTH, NS, PAGE_BYTES, Admin, error, make_settings, put_pages, tiers

# -- health -------------------------------------------------------------------------------------

def test_healthz_and_readyz(admin: Admin) -> None:
    r = admin.http.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "alive"
    r = admin.http.get("/readyz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready"
    assert body["tiers"] == ["hot", "warm", "cold", "remote"]
    assert body["redis"] == "up" and body["degraded"] is False
    assert body["policy"]["name"] == "lru"


@pytest.mark.parametrize("state", [Readiness.STARTING, Readiness.DRAINING, Readiness.STOPPED])
def test_readyz_is_503_unless_serving(admin: Admin, state: Readiness) -> None:
    admin.context.health.set(state)
    r = admin.http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["state"] == state.value and r.json()["status"] == "not ready"
    assert admin.http.get("/healthz").status_code == 200  # alive all the same


def test_readyz_reports_redis_down_as_degraded(
    start_admin: Callable[..., Admin], private_redis: RedisProcess
) -> None:
    admin = start_admin(make_settings(private_redis.url))
    assert admin.http.get("/readyz").json()["redis"] == "up"
    keys = put_pages(admin, 2)
    admin.store.demote(NS, keys[:1], "remote")
    private_redis.stop()
    assert admin.store.get(NS, keys)[0] is None  # the Redis-only page is a miss now
    body = admin.http.get("/readyz").json()
    assert body["redis"] == "down" and body["degraded"] is True
    # Still ready: the memory tiers serve, Redis-only pages answer as misses.
    assert admin.http.get("/readyz").status_code == 200


# -- stats and tiers ----------------------------------------------------------------------------

def test_stats_and_tiers(admin: Admin) -> None:
    keys = put_pages(admin, 3)
    admin.store.get(NS, keys[:2] + [b"\x00missing"])
    stats = admin.http.get("/v1/stats").json()
    assert stats["puts"] == 3 and stats["puts_stored"] == 3
    assert stats["gets"] == 3 and stats["get_hits"] == 2 and stats["get_misses"] == 1
    assert stats["redis_up"] is True
    assert [t["name"] for t in stats["tiers"]] == ["hot", "warm", "cold", "remote"]
    t = tiers(admin)
    assert t["hot"]["pages"] == 3 and t["hot"]["bytes"] >= 3 * PAGE_BYTES
    assert t["hot"]["capacity_bytes"] == 8 * PAGE_BYTES
    assert t["hot"]["high_watermark"] == 0.9 and t["hot"]["low_watermark"] == 0.75
    assert t["hot"]["fill_ratio"] == pytest.approx(t["hot"]["bytes"] / (8 * PAGE_BYTES))
    assert t["warm"]["codec"] == "int8" and t["remote"]["medium"] == "redis"


def test_patch_tier_resizes_and_a_shrink_demotes_now(admin: Admin) -> None:
    put_pages(admin, 6)
    assert tiers(admin)["hot"]["pages"] == 6
    r = admin.http.patch("/v1/tiers/hot", json={"capacity_bytes": 2 * PAGE_BYTES,
                                                "high_watermark": 1.0, "low_watermark": 0.5},
                         headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["capacity_bytes"] == 2 * PAGE_BYTES and body["high_watermark"] == 1.0
    # The answer already shows the shrink done, before any mover pass.
    assert body["bytes"] <= 2 * PAGE_BYTES
    t = tiers(admin)
    assert t["hot"]["pages"] <= 2 and t["hot"]["pages"] + t["warm"]["pages"] == 6
    assert t["hot"]["demotions"] >= 4
    r = admin.http.patch("/v1/tiers/warm", json={"low_watermark": 0.1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["low_watermark"] == 0.1
    assert tiers(admin)["warm"]["low_watermark"] == 0.1


def test_patch_tier_rejects_bad_input(admin: Admin) -> None:
    def patch(name: str, body: Any) -> httpx.Response:
        return admin.http.patch(f"/v1/tiers/{name}", json=body, headers=AUTH)

    assert "lukewarm" in error(patch("lukewarm", {"capacity_bytes": 1}), 404, "NOT_FOUND",
                               "name")
    msg = error(patch("hot", {"capacity_bytes": -5}), 422, "INVALID_ARGUMENT", "capacity_bytes")
    assert "greater than 0" in msg
    error(patch("hot", {"capacity_bytes": "lots"}), 422, "INVALID_ARGUMENT", "capacity_bytes")
    error(patch("hot", {"high_watermark": 1.5}), 422, "INVALID_ARGUMENT", "high_watermark")
    error(patch("hot", {"capacity": 10}), 422, "INVALID_ARGUMENT", "capacity")
    error(patch("hot", {}), 400, "INVALID_ARGUMENT", "body")
    error(patch("hot", [1, 2]), 422, "INVALID_ARGUMENT")
    # Valid fields, invalid together: low above the tier's high watermark.
    msg = error(patch("hot", {"low_watermark": 0.95}), 400, "INVALID_ARGUMENT", "low_watermark")
    assert "high_watermark" in msg
    r = admin.http.patch("/v1/tiers/hot", content=b"{not json", headers={
        **AUTH, "Content-Type": "application/json"})
    error(r, 422, "INVALID_ARGUMENT")
    assert tiers(admin)["hot"]["capacity_bytes"] == 8 * PAGE_BYTES  # nothing changed


# -- pages --------------------------------------------------------------------------------------

def test_page_info(admin: Admin) -> None:
    keys = put_pages(admin, 2)
    admin.store.get(NS, [keys[1]])
    r = admin.http.get(f"/v1/pages/{NS}/{keys[1].hex()}", headers=AUTH)
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["namespace"] == NS and info["key"] == keys[1].hex()
    assert info["tier"] == "hot" and info["precision"] == "full"
    assert info["nbytes"] == PAGE_BYTES and info["stored_bytes"] >= PAGE_BYTES
    assert info["access_count"] >= 2 and info["chain_position"] == 1
    assert info["last_access_time"] > 0 and isinstance(info["score"], float)
    # Namespaces are separate: the same key in another tenant does not exist.
    error(admin.http.get(f"/v1/pages/tenant-b/{keys[1].hex()}", headers=AUTH), 404,
          "NOT_FOUND", "key_hex")


def test_page_routes_reject_bad_keys_and_namespaces(admin: Admin) -> None:
    error(admin.http.get(f"/v1/pages/{NS}/abcd", headers=AUTH), 404, "NOT_FOUND", "key_hex")
    error(admin.http.get(f"/v1/pages/{NS}/xyz1", headers=AUTH), 400, "INVALID_ARGUMENT", "key_hex")
    error(admin.http.get(f"/v1/pages/{NS}/abc", headers=AUTH), 400, "INVALID_ARGUMENT", "key_hex")
    long_key = "ab" * 2000
    error(admin.http.get(f"/v1/pages/{NS}/{long_key}", headers=AUTH), 400,
          "INVALID_ARGUMENT", "key")
    error(admin.http.get("/v1/pages/bad%20ns/abcd", headers=AUTH), 400,
          "INVALID_ARGUMENT", "namespace")
    error(admin.http.delete(f"/v1/pages/{NS}/zz", headers=AUTH), 400, "INVALID_ARGUMENT",
          "key_hex")


def test_demote_then_promote(admin: Admin) -> None:
    keys = put_pages(admin, 2)
    path = f"/v1/pages/{NS}/{keys[0].hex()}"
    r = admin.http.post(f"{path}/demote", json={"tier": "cold"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"namespace": NS, "key": keys[0].hex(), "moved": True, "tier": "cold"}
    info = admin.http.get(path, headers=AUTH).json()
    assert info["tier"] == "cold" and info["precision"] == "int4"
    r = admin.http.post(f"{path}/promote", json={"tier": "hot"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["moved"] is True and r.json()["tier"] == "hot"
    info = admin.http.get(path, headers=AUTH).json()
    assert info["tier"] == "hot" and info["precision"] == "int4"  # bits lost stay lost
    t = tiers(admin)
    assert t["hot"]["demotions"] >= 1 and t["hot"]["promotions"] >= 1
    # Demote all the way to Redis, then back.
    r = admin.http.post(f"{path}/demote", json={"tier": "remote"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["tier"] == "remote"
    assert admin.http.get(path, headers=AUTH).json()["tier"] == "remote"


def test_move_errors(admin: Admin) -> None:
    keys = put_pages(admin, 1)
    path = f"/v1/pages/{NS}/{keys[0].hex()}"
    admin.http.post(f"{path}/demote", json={"tier": "warm"}, headers=AUTH)
    msg = error(admin.http.post(f"{path}/demote", json={"tier": "hot"}, headers=AUTH),
                409, "FAILED_PRECONDITION", "tier")
    assert "warm" in msg
    error(admin.http.post(f"{path}/promote", json={"tier": "tepid"}, headers=AUTH),
          400, "INVALID_ARGUMENT", "tier")
    error(admin.http.post(f"{path}/promote", json={}, headers=AUTH), 422, "INVALID_ARGUMENT",
          "tier")
    error(admin.http.post(f"{path}/promote", json={"tier": "hot", "now": True}, headers=AUTH),
          422, "INVALID_ARGUMENT", "now")
    error(admin.http.post(f"/v1/pages/{NS}/beef/promote", json={"tier": "hot"}, headers=AUTH),
          404, "NOT_FOUND", "key_hex")
    error(admin.http.post(f"/v1/pages/{NS}/beef/demote", json={"tier": "cold"}, headers=AUTH),
          404, "NOT_FOUND", "key_hex")


def test_delete_page(admin: Admin) -> None:
    keys = put_pages(admin, 2)
    r = admin.http.delete(f"/v1/pages/{NS}/{keys[0].hex()}", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"] is True
    error(admin.http.get(f"/v1/pages/{NS}/{keys[0].hex()}", headers=AUTH), 404, "NOT_FOUND")
    error(admin.http.delete(f"/v1/pages/{NS}/{keys[0].hex()}", headers=AUTH), 404, "NOT_FOUND")
    assert admin.store.get(NS, [keys[0]]) == [None]
    assert admin.store.get(NS, [keys[1]])[0] is not None
    assert tiers(admin)["hot"]["evictions"]["deleted"] == 1


# -- policy and drain ---------------------------------------------------------------------------

def test_policy_show_and_switch(admin: Admin) -> None:
    r = admin.http.get("/v1/policy")
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "lru" and body["active"] == "lru" and body["fallback_active"] is False
    assert {"lru", "lfu"} <= set(body["available"])
    r = admin.http.put("/v1/policy", json={"name": "lfu"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["name"] == "lfu"
    assert admin.store.policy.name == "lfu"
    assert admin.http.get("/v1/policy").json()["active"] == "lfu"
    msg = error(admin.http.put("/v1/policy", json={"name": "belady"}, headers=AUTH),
                400, "INVALID_ARGUMENT", "policy")
    assert "lru" in msg  # names the known ones
    error(admin.http.put("/v1/policy", json={"nam": "lru"}, headers=AUTH), 422,
          "INVALID_ARGUMENT")
    assert admin.store.policy.name == "lfu"
    # The learned policy decides by LRU until trained, and says so.
    r = admin.http.put("/v1/policy", json={"name": "learned"}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "learned" and body["active"] == "lru"
    assert body["fallback_active"] is True and "untrained" in body["detail"]


def test_drain_writes_memory_pages_to_redis(admin: Admin) -> None:
    keys = put_pages(admin, 5)
    admin.store.demote(NS, keys[:1], "cold")
    r = admin.http.post("/v1/drain", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json() == {"drained": 5}
    t = tiers(admin)
    assert t["remote"]["pages"] == 5 and t["hot"]["pages"] == t["cold"]["pages"] == 0


def test_drain_without_redis_is_a_conflict(start_admin: Callable[..., Admin]) -> None:
    admin = start_admin(make_settings(None))
    error(admin.http.post("/v1/drain", headers=AUTH), 409, "FAILED_PRECONDITION")


def test_drain_with_redis_down_is_unavailable(
    start_admin: Callable[..., Admin], private_redis: RedisProcess
) -> None:
    admin = start_admin(make_settings(private_redis.url))
    keys = put_pages(admin, 2)
    admin.store.demote(NS, keys[:1], "remote")
    private_redis.stop()
    assert admin.store.get(NS, keys)[0] is None  # the store notices the outage
    error(admin.http.post("/v1/drain", headers=AUTH), 503, "UNAVAILABLE", "redis")


# -- plumbing -----------------------------------------------------------------------------------

def test_unknown_routes_and_methods(admin: Admin) -> None:
    error(admin.http.get("/v1/nothing"), 404, "NOT_FOUND")
    r = admin.http.post("/v1/tiers", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["status"] == 405


def test_openapi_lists_every_route(admin: Admin) -> None:
    spec = admin.http.get("/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) >= {
        "/healthz", "/readyz", "/metrics", "/v1/stats", "/v1/tiers", "/v1/tiers/{name}",
        "/v1/pages/{namespace}/{key_hex}", "/v1/pages/{namespace}/{key_hex}/promote",
        "/v1/pages/{namespace}/{key_hex}/demote", "/v1/policy", "/v1/drain",
    }
    assert "patch" in paths["/v1/tiers/{name}"] and "delete" in paths[
        "/v1/pages/{namespace}/{key_hex}"]
    assert "swagger" in admin.http.get("/docs").text.lower()


def test_server_binds_a_free_port_and_stops(redis_url: str) -> None:
    settings = make_settings(redis_url)
    store = TierStore(settings)
    store.start(mover=False)
    try:
        context = DaemonContext(settings=settings, store=store)
        server, port = serve_http(context, "127.0.0.1", 0)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        server.stop(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
        # The RPC latency observer went away with the server.
        assert not context.rpc_stats._observers
    finally:
        store.close()


def test_port_in_use_is_a_config_error(admin: Admin) -> None:
    with pytest.raises(ConfigError, match="http_port"):
        serve_http(admin.context, "127.0.0.1", admin.server.port)


class BrokenStatusPolicy(LRUPolicy):
    """A policy whose status() fails: an unexpected error inside a route."""

    name = "broken"

    def status(self) -> PolicyStatus:
        raise RuntimeError("status exploded")


def test_unexpected_errors_are_500_with_a_generic_message(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    admin.store.set_policy(BrokenStatusPolicy())
    with caplog.at_level(logging.ERROR, logger="kvtier.admin.app"):
        r = admin.http.get("/v1/policy")
    msg = error(r, 500, "INTERNAL")
    assert "exploded" not in msg  # internals stay in the log
    assert any("GET /v1/policy failed unexpectedly" in rec.getMessage() and rec.exc_info
               for rec in caplog.records)
    assert admin.http.get("/healthz").status_code == 200  # and the server keeps serving
