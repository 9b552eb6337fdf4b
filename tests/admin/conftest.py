"""A real admin HTTP server (uvicorn on a free port) over a real TierStore and redis-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from kvtier.admin.server import AdminHttpServer, serve_http
from kvtier.config import Settings, TierConfig
from kvtier.pages import make_page
from kvtier.store.store import TierStore
from kvtier.transport.context import DaemonContext, Readiness
from kvtier.types import Codec, Medium, Page

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PAGE_SHAPE = (2, 16, 2, 32)  # [layers, tokens, kv_heads, head_dim]
PAGE_BYTES = 2 * 2 * 16 * 2 * 32 * 2  # k + v, float16 = 8192


def make_test_page(seed: int) -> Page:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(PAGE_SHAPE, generator=g).to(torch.float16)
    v = torch.randn(PAGE_SHAPE, generator=g).to(torch.float16)
    return make_page(k, v, start_position=16 * seed)


def make_settings(redis_url: str | None, **overrides: Any) -> Settings:
    """Four tiers of 8 pages each (hot, warm, cold) and 64 pages (remote)."""
    tiers = [
        TierConfig(name="hot", medium=Medium.DEVICE, codec=Codec.NONE,
                   capacity_bytes=8 * PAGE_BYTES),
        TierConfig(name="warm", medium=Medium.HOST, codec=Codec.INT8,
                   capacity_bytes=8 * PAGE_BYTES),
        TierConfig(name="cold", medium=Medium.HOST, codec=Codec.INT4,
                   capacity_bytes=8 * PAGE_BYTES),
    ]
    if redis_url is not None:
        tiers.append(TierConfig(name="remote", medium=Medium.REDIS, codec=Codec.INT4,
                                capacity_bytes=64 * PAGE_BYTES))
    base: dict[str, Any] = dict(
        tiers=tiers, redis={"url": redis_url, "prefix": "kvtier-admin-test"},
        codec={"group_size": 16, "sink_tokens": 2}, admin_token=TOKEN,
        http_port=0, grpc_port=0, device="cpu", mover_interval_s=0.02,
    )
    base.update(overrides)
    return Settings(**base)


@dataclass
class Admin:
    """A running admin server and what it serves."""

    server: AdminHttpServer
    context: DaemonContext
    http: httpx.Client

    @property
    def store(self) -> TierStore:
        return self.context.store

    @property
    def url(self) -> str:
        return self.server.url


NS = "tenant-a"


def put_pages(admin: Admin, n: int, namespace: str = NS) -> list[bytes]:
    """Store ``n`` pages (keys a0 00, a0 01, ...) straight into the store."""
    keys = [bytes([0xA0, i]) for i in range(n)]
    admin.store.put(namespace, [(k, make_test_page(i)) for i, k in enumerate(keys)])
    return keys


def tiers(admin: Admin) -> dict[str, dict[str, Any]]:
    r = admin.http.get("/v1/tiers")
    assert r.status_code == 200
    return {t["name"]: t for t in r.json()["tiers"]}


def error(r: httpx.Response, status: int, code: str, field: str | None = None) -> str:
    """Assert an error response of the one error handler; return its message."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["code"] == code, err
    if field is not None:
        assert err["field"] == field, err
    assert err["message"]
    return str(err["message"])


@pytest.fixture()
def start_admin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Admin]]:
    """``start_admin(settings, mover=True)``: a serving store behind a real uvicorn."""
    for key in ("KVTIER_ADMIN_TOKEN", "KVTIER_ADMIN_MUTATIONS", "KVTIER_HTTP_HOST"):
        monkeypatch.delenv(key, raising=False)
    started: list[Admin] = []

    def start(settings: Settings, *, mover: bool = True) -> Admin:
        store = TierStore(settings)
        store.start(mover=mover)
        context = DaemonContext(settings=settings, store=store)
        try:
            server, port = serve_http(context, "127.0.0.1", 0)
        except BaseException:
            store.close()
            raise
        assert port == server.port and port > 0
        context.health.set(Readiness.SERVING)
        admin = Admin(server, context, httpx.Client(base_url=server.url, timeout=10))
        started.append(admin)
        return admin

    yield start
    for admin in started:
        admin.http.close()
        admin.server.stop(1.0)
        admin.store.close()


@pytest.fixture()
def admin(start_admin: Callable[..., Admin], redis_url: str) -> Admin:
    return start_admin(make_settings(redis_url))
