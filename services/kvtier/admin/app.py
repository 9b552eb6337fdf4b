"""The daemon's HTTP surface: admin REST, ``/metrics``, ``/healthz``, ``/readyz``.

:func:`create_app` builds one FastAPI app over a :class:`kvtier.transport.context.DaemonContext`.
Routes are thin: validate, call the store, turn the answer into JSON. Store calls block, so
routes are plain ``def`` functions and FastAPI runs them on its worker threads (the store is
thread-safe).

==========  ======================================  ======================================
method      path                                    what
==========  ======================================  ======================================
GET         /healthz                                alive (200 while the process answers)
GET         /readyz                                 200 when serving, 503 otherwise; tiers,
                                                    Redis and policy state in the body
GET         /metrics                                Prometheus text format
GET         /v1/stats                               the store's whole stats snapshot
GET         /v1/tiers                               capacity, bytes, pages, watermarks
PATCH       /v1/tiers/{name}                        resize capacity/watermarks (admin)
GET         /v1/pages/{namespace}/{key_hex}         tier, precision, size, last access, score
POST        /v1/pages/{namespace}/{key_hex}/promote move up to ``{"tier": ...}`` (admin)
POST        /v1/pages/{namespace}/{key_hex}/demote  move down to ``{"tier": ...}`` (admin)
DELETE      /v1/pages/{namespace}/{key_hex}         delete the page (admin)
GET         /v1/policy                              configured/active policy, fallback
PUT         /v1/policy                              switch policy ``{"name": ...}`` (admin)
POST        /v1/drain                               write memory-tier pages to Redis (admin)
==========  ======================================  ======================================

Errors: one handler maps every exception through :func:`kvtier.errors.status_for` to a body
``{"error": {"code", "status", "message", "field"}}``: unknown page or tier in the path 404,
bad values 400, bodies that do not parse 422, auth 401/403, anything unexpected 500 with a
generic message and the traceback logged. OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.admin.auth import authorize_mutation
from kvtier.admin.metrics import CONTENT_TYPE, DaemonMetrics
from kvtier.admin.schemas import (
    MoveRequest,
    PolicyChoice,
    TierLimits,
    jsonable,
    policy_view,
    stats_view,
    tier_view,
)
from kvtier.errors import (
    BackendUnavailable,
    Conflict,
    InvalidArgument,
    KVTierError,
    NotFound,
    UnknownTier,
    is_internal,
    status_for,
)
from kvtier.pages import check_key, check_namespace
from kvtier.policy.registry import policy_names
from kvtier.transport.context import DaemonContext, Readiness
from kvtier.transport.policy.client import make_policy
from kvtier.types import Medium

log = logging.getLogger(__name__)


def _error_body(code: str, status: int, message: str, field: str | None) -> dict[str, Any]:
    return {"error": {"code": code, "status": status, "message": message, "field": field}}


async def _handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one error handler: kvtier errors by the table, validation 422, the rest 500."""
    headers: dict[str, str] = {}
    if isinstance(exc, RequestValidationError):
        problems = []
        first_field: str | None = None
        for err in exc.errors():
            loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "path", "query")]
            where = ".".join(loc) or "body"
            first_field = first_field or where
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        body = _error_body("INVALID_ARGUMENT", 422, "; ".join(problems), first_field)
        return JSONResponse(body, status_code=422)
    if isinstance(exc, StarletteHTTPException):
        # Routing errors (unknown path 404, wrong method 405) keep their status.
        code = "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"
        return JSONResponse(
            _error_body(code, exc.status_code, str(exc.detail), None),
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )
    grpc_code, status, message = status_for(exc)
    internal = is_internal(exc)
    field = exc.field if isinstance(exc, KVTierError) and not internal else None
    if internal:
        log.error(
            "%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc
        )
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="kvtier-admin"'
    return JSONResponse(
        _error_body(grpc_code, status, message, field), status_code=status, headers=headers
    )


class _UnexpectedErrors:
    """ASGI middleware: an exception no handler took becomes the one handler's 500 answer.

    Starlette would hand a catch-all handler's response to the server and then re-raise, which
    drops the connection; catching here answers the client properly and logs once.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # too late for an error body; let the server close the connection
                raise
            response = await _handle_error(Request(scope), exc)
            await response(scope, receive, send)


def create_app(context: DaemonContext, metrics: DaemonMetrics | None = None) -> FastAPI:
    """The FastAPI app of one daemon. ``metrics`` defaults to a fresh registry of its own."""
    settings = context.settings
    store = context.store
    daemon_metrics = metrics or DaemonMetrics(store, context.rpc_stats, context.started_at,
                                              context.buffers, context.relocator)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        daemon_metrics.attach()
        try:
            yield
        finally:
            daemon_metrics.detach()

    app = FastAPI(
        title="kvtier admin",
        version="1",
        description="Admin API of the kvtier cache daemon. Mutating routes need "
        "'Authorization: Bearer <KVTIER_ADMIN_TOKEN>'.",
        lifespan=lifespan,
    )
    app.state.metrics = daemon_metrics
    for exc_type in (KVTierError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, _handle_error)
    app.add_middleware(_UnexpectedErrors)

    def admin(authorization: str | None = Header(default=None)) -> None:
        authorize_mutation(settings, authorization)

    mutation = [Depends(admin)]

    def page_id(namespace: str, key_hex: str) -> tuple[str, bytes]:
        check_namespace(namespace)
        try:
            key = bytes.fromhex(key_hex)
        except ValueError:
            raise InvalidArgument(
                f"key must be hex-encoded bytes, got {key_hex[:80]!r}", field="key_hex"
            ) from None
        return namespace, check_key(key, settings.max_key_bytes)

    def tier_index(name: str) -> int:
        """A tier named in the path is a resource: 404 when there is none."""
        try:
            return store.tier_index(name)
        except UnknownTier as e:
            raise NotFound(e.message, field="name") from None

    def existing_page(namespace: str, key: bytes) -> Any:
        info = store.page_info(namespace, key)
        if info is None:
            raise NotFound(f"no page {key.hex()} in namespace {namespace!r}", field="key_hex")
        return info

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, Any]:
        """Liveness: answers while the process serves HTTP."""
        return {"status": "alive", "state": context.health.state.value}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: 200 while the daemon serves. Redis down or the policy in fallback is
        reported (``degraded``) but keeps the daemon ready: the data path answers misses for
        Redis-only pages and the memory tiers keep serving."""
        state = context.health.state
        checks: dict[str, Any] = {"state": state.value}
        ready = state is Readiness.SERVING
        try:
            stats = store.stats()
        except Exception as exc:  # a broken store must show as not ready, not as a 500
            log.warning("readiness: store stats failed: %s", exc)
            ready = False
            checks["store"] = f"error: {type(exc).__name__}"
        else:
            checks["tiers"] = [t.name for t in stats.tiers]
            has_redis = settings.redis.url is not None and any(
                t.medium == Medium.REDIS for t in stats.tiers
            )
            checks["redis"] = ("up" if stats.redis_up else "down") if has_redis else "none"
            checks["policy"] = jsonable(stats.policy)
            checks["degraded"] = (has_redis and not stats.redis_up) or bool(
                stats.policy.fallback_active
            )
        checks["status"] = "ready" if ready else "not ready"
        return JSONResponse(checks, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics_route() -> Response:
        """Prometheus metrics, read from the store's stats at scrape time."""
        return Response(daemon_metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/stats", tags=["stats"])
    def get_stats() -> dict[str, Any]:
        return stats_view(store.stats())

    @app.get("/v1/tiers", tags=["tiers"])
    def get_tiers() -> dict[str, Any]:
        return {"tiers": [tier_view(t) for t in store.stats().tiers]}

    @app.patch("/v1/tiers/{name}", tags=["tiers"], dependencies=mutation)
    def patch_tier(name: str, limits: TierLimits) -> dict[str, Any]:
        """Resize a tier live; a shrink below the bytes held demotes right away."""
        tier_index(name)
        if limits.capacity_bytes is None and limits.high_watermark is None and (
            limits.low_watermark is None
        ):
            raise InvalidArgument(
                "give at least one of capacity_bytes, high_watermark, low_watermark",
                field="body",
            )
        tier = store.set_tier_limits(
            name,
            capacity_bytes=limits.capacity_bytes,
            high_watermark=limits.high_watermark,
            low_watermark=limits.low_watermark,
        )
        log.info("admin: tier %s limits set to %s", name, limits.model_dump(exclude_none=True))
        return tier_view(tier)

    @app.get("/v1/pages/{namespace}/{key_hex}", tags=["pages"])
    def get_page(namespace: str, key_hex: str) -> dict[str, Any]:
        ns, key = page_id(namespace, key_hex)
        view: dict[str, Any] = {"namespace": ns, "key": key.hex()}
        view.update(jsonable(existing_page(ns, key)))
        del view["page"]
        return view

    def move(namespace: str, key_hex: str, body: MoveRequest, op: Callable[..., list[bool]],
             upward: bool) -> dict[str, Any]:
        ns, key = page_id(namespace, key_hex)
        target = store.tier_index(body.tier)
        current = tier_index(existing_page(ns, key).tier)
        if not upward and target < current:
            raise Conflict(
                f"cannot demote page {key.hex()} to tier {body.tier!r}: it is already lower, "
                f"in tier {store.tier_names[current]!r}", field="tier",
            )
        (ok,) = op(ns, [key], body.tier)
        after = store.page_info(ns, key)
        return {
            "namespace": ns, "key": key.hex(), "moved": bool(ok),
            "tier": after.tier if after is not None else None,
        }

    @app.post("/v1/pages/{namespace}/{key_hex}/promote", tags=["pages"], dependencies=mutation)
    def promote(namespace: str, key_hex: str, body: MoveRequest) -> dict[str, Any]:
        """Move a page up to ``tier`` (decoding it; lost precision stays lost)."""
        return move(namespace, key_hex, body, store.promote, upward=True)

    @app.post("/v1/pages/{namespace}/{key_hex}/demote", tags=["pages"], dependencies=mutation)
    def demote(namespace: str, key_hex: str, body: MoveRequest) -> dict[str, Any]:
        """Move a page down to ``tier`` (re-encoding it with that tier's codec)."""
        return move(namespace, key_hex, body, store.demote, upward=False)

    @app.delete("/v1/pages/{namespace}/{key_hex}", tags=["pages"], dependencies=mutation)
    def delete_page(namespace: str, key_hex: str) -> dict[str, Any]:
        ns, key = page_id(namespace, key_hex)
        if store.delete(ns, [key]) == 0:
            raise NotFound(f"no page {key.hex()} in namespace {ns!r}", field="key_hex")
        return {"namespace": ns, "key": key.hex(), "deleted": True}

    @app.get("/v1/policy", tags=["policy"])
    def get_policy() -> dict[str, Any]:
        return policy_view(store.policy.status(), policy_names())

    @app.put("/v1/policy", tags=["policy"], dependencies=mutation)
    def put_policy(choice: PolicyChoice) -> dict[str, Any]:
        """Switch the live policy; page metadata stays, the new policy scores from now on."""
        policy = make_policy(settings.policy.model_copy(update={"name": choice.name}))
        old = store.policy
        store.set_policy(policy)
        old.close()  # a remote policy owns a channel and a sender
        log.info("admin: policy switched from %s to %s", old.name, choice.name)
        return policy_view(store.policy.status(), policy_names())

    @app.post("/v1/drain", tags=["tiers"], dependencies=mutation)
    def drain() -> dict[str, Any]:
        """Write every memory-tier page to the Redis tier (before a planned restart)."""
        if settings.redis.url is None or not any(
            t.medium == Medium.REDIS for t in store.stats().tiers
        ):
            raise Conflict("this daemon has no Redis tier to drain into", field="tiers")
        if not store.redis_up:
            raise BackendUnavailable("the Redis tier is down; nothing was drained", field="redis")
        n = store.drain()
        log.info("admin: drained %d pages to the Redis tier", n)
        return {"drained": int(n)}

    return app
