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
bad values 400, bodies that do not parse or do not fit the schema 422, auth 401/403, a body
over :data:`MAX_BODY_BYTES` 413, a method the path does not have 405 (``Allow`` lists every
method it has), anything unexpected 500 with a generic message and the traceback logged.

Who may call what is :mod:`kvtier.admin.auth`. Requests that carry a body are gated before it
is read (:class:`_Gate`): a mutation's token is checked first, then the body's size. The OpenAPI
schema (``/openapi.json``, docs at ``/docs``) declares the bearer scheme, the error body and
every status each route answers, and the formats of the path parameters.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.admin.auth import authorize_mutation, authorize_page_read, visible_namespaces
from kvtier.admin.metrics import CONTENT_TYPE, DaemonMetrics
from kvtier.admin.schemas import (
    ErrorBody,
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
    BodyTooLarge,
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

MAX_BODY_BYTES = 64 << 10  # admin bodies are a few fields of JSON
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# path parameter formats, declared in the schema; the routes check them (400 / 404)
NAMESPACE_PATTERN = r"^(?!\.)(?!.*\.\.)[A-Za-z0-9_.-]{1,128}$"
KEY_HEX_PATTERN = r"^(?:[0-9a-fA-F]{2})+$"
TIER_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"
_WHY = {
    400: "Bad input: a malformed path parameter (namespace, non-hex key), an unknown tier or "
         "policy name, or values that are invalid together.",
    401: "No usable 'Authorization: Bearer <token>' header.",
    403: "The token may not do this (wrong token, tenant token on a mutation or on another "
         "namespace, mutations disabled).",
    404: "No such page or tier.",
    409: "The request conflicts with the current state.",
    413: f"The request body is larger than {MAX_BODY_BYTES} bytes.",
    422: "The body is not JSON or does not fit the schema (wrong types are refused, never "
         "coerced).",
    500: "Unexpected error (logged by the daemon).",
    503: "A backend (Redis) is unavailable.",
}


# declares the bearer scheme in the schema; the token itself is read by kvtier.admin.auth
_BEARER = Depends(HTTPBearer(
    auto_error=False, scheme_name="bearer",
    description="The admin token (KVTIER_ADMIN_TOKEN), or for page reads a tenant token "
                "granted the namespace (kvtier token create)."))


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, all with the one error body."""
    return {s: {"model": ErrorBody, "description": _WHY[s]} for s in (*statuses, 500)}


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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            _error_body(code, exc.status_code, str(exc.detail), None),
            status_code=exc.status_code,
            headers=headers,
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


def truthful_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's schema, corrected to what the API answers: no route sends FastAPI's
    ``{"detail": [...]}`` (the one error handler sends :class:`ErrorBody` for 422 too), routes
    without a body never answer 422, and a 401 carries ``WWW-Authenticate``."""
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for ops in schema.get("paths", {}).values():
        for op in ops.values():
            responses = op.get("responses", {})
            invalid = responses.get("422")
            if invalid is not None and "requestBody" not in op:
                del responses["422"]
            elif invalid is not None:
                invalid["content"] = {"application/json": {"schema": error_ref}}
            if "401" in responses:
                responses["401"]["headers"] = {"WWW-Authenticate": {
                    "description": "Bearer, with the realm", "schema": {"type": "string"}}}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def _allowed_methods(request: Request) -> list[str]:
    """Every method of every route whose path matches the request's (Starlette's own 405
    names only the first such route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


class _Gate:
    """ASGI middleware for requests that may carry a body: a mutation's authorization is
    checked before anything is read, then the body is read up to :data:`MAX_BODY_BYTES` (413
    beyond, by ``Content-Length`` or by counting) and handed on."""

    def __init__(self, app: ASGIApp, authorize: Any, is_mutation: Any) -> None:
        self.app = app
        self.authorize = authorize
        self.is_mutation = is_mutation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        body = bytearray()
        try:
            if self.is_mutation(scope):
                self.authorize(headers.get("authorization"))
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                raise BodyTooLarge(f"the body is {int(length)} bytes, more than the admin "
                                   f"API's limit of {MAX_BODY_BYTES}", field="body")
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    raise BodyTooLarge(f"the body is more than the admin API's limit of "
                                       f"{MAX_BODY_BYTES} bytes", field="body")
                more = bool(message.get("more_body", False))
        except KVTierError as exc:
            response = await _handle_error(Request(scope), exc)
            await response(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


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
                                              context.buffers, context.relocator,
                                              context.limits)

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
        "'Authorization: Bearer <KVTIER_ADMIN_TOKEN>'; page reads need the admin token or a "
        "tenant token granted the page's namespace. Every error answers "
        "{\"error\": {\"code\", \"status\", \"message\", \"field\"}}.",
        lifespan=lifespan,
    )
    app.state.metrics = daemon_metrics

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = truthful_schema(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    for exc_type in (KVTierError, RequestValidationError, StarletteHTTPException):
        app.add_exception_handler(exc_type, _handle_error)
    def admin(request: Request, _: Any = _BEARER) -> None:
        authorize_mutation(settings, request.headers.get("authorization"))

    def page_reader(request: Request, _: Any = _BEARER) -> None:
        authorize_page_read(settings, context.tokens, request.headers.get("authorization"),
                            str(request.path_params.get("namespace", "")))

    mutation = [Depends(admin)]
    page_read = [Depends(page_reader)]

    def is_mutation(scope: Scope) -> bool:
        for route in app.router.routes:
            if isinstance(route, APIRoute) and route.matches(scope)[0] is Match.FULL:
                return any(d.dependency is admin for d in route.dependencies)
        return False

    app.add_middleware(_Gate, authorize=lambda header: authorize_mutation(settings, header),
                       is_mutation=is_mutation)
    app.add_middleware(_UnexpectedErrors)
    ns_path = Path(description="Namespace: ASCII letters, digits, '-', '_', '.'; 1..128; "
                               "not starting with '.', no '..'.",
                   json_schema_extra={"pattern": NAMESPACE_PATTERN, "maxLength": 128})
    key_path = Path(description="The page key, hex-encoded (an even number of hex digits).",
                    json_schema_extra={"pattern": KEY_HEX_PATTERN,
                                       "maxLength": 2 * settings.max_key_bytes})
    tier_path = Path(description="A tier name of the configured stack.",
                     json_schema_extra={"pattern": TIER_PATTERN, "maxLength": 32})

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

    @app.get("/healthz", tags=["health"], responses=_errors())
    def healthz() -> dict[str, Any]:
        """Liveness: answers while the process serves HTTP."""
        return {"status": "alive", "state": context.health.state.value}

    @app.get("/readyz", tags=["health"], responses={
        503: {"description": "Not serving (starting, draining or stopped, or the store is "
                             "broken); the body holds the same checks."}, **_errors()})
    def readyz() -> JSONResponse:
        """Readiness: 200 while the daemon serves. Redis down (or, with a cluster, some
        shards down: ``redis`` is ``degraded`` and ``redis_shards`` says which) or the policy
        in fallback is reported (``degraded``) but keeps the daemon ready: the data path
        answers misses for the pages it cannot reach and the memory tiers keep serving."""
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
            status = store.redis_status() if has_redis else None
            if status is not None:
                health = status.health
                checks["redis"] = health.state  # up, degraded (some shards down), down
                if health.cluster:
                    checks["redis_shards"] = [
                        {"node": s.node, "slots": s.slots, "up": s.up} for s in health.shards]
                    checks["redis_unavailable_slots"] = health.slots_down
            checks["policy"] = jsonable(stats.policy)
            checks["degraded"] = (has_redis and checks["redis"] != "up") or bool(
                stats.policy.fallback_active
            )
        checks["status"] = "ready" if ready else "not ready"
        return JSONResponse(checks, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format."}, **_errors()})
    def metrics_route() -> Response:
        """Prometheus metrics, read from the store's stats at scrape time."""
        return Response(daemon_metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/stats", tags=["stats"], responses=_errors())
    def get_stats(request: Request) -> dict[str, Any]:
        """The store's figures; ``namespaces`` names only what the caller may see (every
        namespace for the admin token, a tenant token's own)."""
        view = stats_view(store.stats())
        seen = visible_namespaces(settings, context.tokens, request.headers.get("authorization"))
        if seen is not None:
            view["namespaces"] = [r for r in view["namespaces"] if r["name"] in seen]
        return view

    @app.get("/v1/tiers", tags=["tiers"], responses=_errors())
    def get_tiers() -> dict[str, Any]:
        return {"tiers": [tier_view(t) for t in store.stats().tiers]}

    @app.patch("/v1/tiers/{name}", tags=["tiers"], dependencies=mutation,
               responses=_errors(400, 401, 403, 404, 413, 422))
    def patch_tier(limits: TierLimits, name: str = tier_path) -> dict[str, Any]:
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

    @app.get("/v1/pages/{namespace}/{key_hex}", tags=["pages"], dependencies=page_read,
             responses=_errors(400, 401, 403, 404))
    def get_page(namespace: str = ns_path, key_hex: str = key_path) -> dict[str, Any]:
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

    @app.post("/v1/pages/{namespace}/{key_hex}/promote", tags=["pages"], dependencies=mutation,
              responses=_errors(400, 401, 403, 404, 413, 422))
    def promote(body: MoveRequest, namespace: str = ns_path,
                key_hex: str = key_path) -> dict[str, Any]:
        """Move a page up to ``tier`` (decoding it; lost precision stays lost)."""
        return move(namespace, key_hex, body, store.promote, upward=True)

    @app.post("/v1/pages/{namespace}/{key_hex}/demote", tags=["pages"], dependencies=mutation,
              responses=_errors(400, 401, 403, 404, 409, 413, 422))
    def demote(body: MoveRequest, namespace: str = ns_path,
               key_hex: str = key_path) -> dict[str, Any]:
        """Move a page down to ``tier`` (re-encoding it with that tier's codec)."""
        return move(namespace, key_hex, body, store.demote, upward=False)

    @app.delete("/v1/pages/{namespace}/{key_hex}", tags=["pages"], dependencies=mutation,
                responses=_errors(400, 401, 403, 404, 413))
    def delete_page(namespace: str = ns_path, key_hex: str = key_path) -> dict[str, Any]:
        ns, key = page_id(namespace, key_hex)
        if store.delete(ns, [key]) == 0:
            raise NotFound(f"no page {key.hex()} in namespace {ns!r}", field="key_hex")
        return {"namespace": ns, "key": key.hex(), "deleted": True}

    @app.get("/v1/policy", tags=["policy"], responses=_errors())
    def get_policy() -> dict[str, Any]:
        return policy_view(store.policy.status(), policy_names())

    @app.put("/v1/policy", tags=["policy"], dependencies=mutation,
             responses=_errors(400, 401, 403, 413, 422))
    def put_policy(choice: PolicyChoice) -> dict[str, Any]:
        """Switch the live policy; page metadata stays, the new policy scores from now on."""
        policy = make_policy(settings.policy.model_copy(update={"name": choice.name}))
        old = store.policy
        store.set_policy(policy)
        old.close()  # a remote policy owns a channel and a sender
        log.info("admin: policy switched from %s to %s", old.name, choice.name)
        return policy_view(store.policy.status(), policy_names())

    @app.post("/v1/drain", tags=["tiers"], dependencies=mutation,
              responses=_errors(401, 403, 409, 413, 503))
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
