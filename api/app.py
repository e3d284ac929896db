"""The Litestar application: /internal (API key), /public/webhooks (provider signatures), /health, /version.

The routes live in api/routes/, one module per route group; here are the guard (the API key, checked before the body
is read), the dependencies, the exception handler and the app's wiring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Router
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusConfig

from api import problems, reference, request_ids
from api.db import Database
from api.problems import ProblemException
from api.routes.callbacks import Callbacks
from api.routes.channels import Channels
from api.routes.common import Tenant, unauthorized
from api.routes.deliveries import Deliveries
from api.routes.health import bench_baseline, health, version
from api.routes.mock import Mock
from api.routes.notifications import Notifications
from api.routes.policies import FrequencyCaps, QuietHours
from api.routes.preview import Previews
from api.routes.recipients import Recipients
from api.routes.retention import Retention
from api.routes.templates import Templates
from api.routes.webhooks import receive_webhook, unsubscribe, unsubscribe_page, verify_webhook
from dispatcher import __version__, keys, metrics, tracing
from dispatcher.render_pool import RenderPool
from dispatcher.settings import Settings
from providers.base import ConfigurationError
from providers.registry import webhook_adapters

__all__ = ["Tenant", "app_from_env", "authenticate", "create_app", "require_key"]


async def provide_db(state: State) -> Database:
    return state.db  # type: ignore[no-any-return]


def _key_digest(request: ASGIConnection[Any, Any, Any, Any]) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ProblemException(
            401, "unauthorized", "send an API key as Authorization: Bearer <key>", headers={"WWW-Authenticate": "Bearer"}
        )
    return keys.digest(key.strip())


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
    """The guard of every /internal route, run before the body is read or decoded: the key's tenant, if the key may
    use this route (its scope is the handler's opt["scope"]; 403 without it), and the key's rate limit (429). Both are
    checked in Postgres, in one call. An anonymous caller costs no body parsing and learns nothing about the body."""
    scope = route_handler.opt.get("scope", "admin")
    db: Database = connection.app.state.db
    if route_handler.opt.get("charge") == "statement":  # the route's statement takes the token (api/routes/notifications.py)
        row = await db.one(
            "select tenant_id, api_key_id, rate_per_second from notify_api.check_api_key_v1(%s, %s)",
            (_key_digest(connection), scope),
        )
    else:
        row = await db.one(
            "select tenant_id, api_key_id, null from notify_api.authorize_v1(%s, %s)", (_key_digest(connection), scope)
        )
    if row is None:
        raise unauthorized()
    connection.state.tenant = Tenant(id=row[0], key_id=row[1], rate=row[2])


async def authenticate(request: Request[Any, Any, Any]) -> Tenant:
    """The tenant the guard found (require_key)."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the guarded routers
        raise unauthorized()
    return tenant  # type: ignore[no-any-return]


def create_app(settings: Settings, *, debug: bool = False) -> Litestar:
    db = Database(settings.database_url, min_size=settings.pool_min, max_size=settings.pool_max)
    render_pool = RenderPool(settings)  # the dry run's renders (POST /internal/notifications/preview), started on first use

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await db.open()
        metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port) if settings.metrics_port else None
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            await db.close()
            render_pool.close()

    metrics.register_queue_health(settings.database_url)
    prometheus = PrometheusConfig(app_name="dispatcher", prefix="dispatcher_http", group_path=True, exclude=["/metrics"])
    # Every /internal route is guarded by the API key check, which runs before the body is read (require_key).
    # The notification routes take the bulk body limit (a fan-out, a batch); submit holds a single intent to the
    # ordinary one itself; every other route has the ordinary limit (the app's).
    guarded: dict[str, Any] = {
        "dependencies": {"tenant": Provide(authenticate)},
        "guards": [require_key],
        "security": [{"BearerAuth": []}],
    }
    bulk = Router(
        path="/internal", route_handlers=[Notifications, Previews], request_max_body_size=settings.max_bulk_body_bytes, **guarded
    )
    internal = Router(
        path="/internal",
        route_handlers=[Callbacks, Recipients, Templates, Channels, Mock, Deliveries, Retention, QuietHours, FrequencyCaps],
        **guarded,
    )
    public = Router(path="/public", route_handlers=[receive_webhook, verify_webhook, unsubscribe_page, unsubscribe])
    plugins = []
    if tracing.enabled:
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/metrics", "/health"])))
    return Litestar(
        plugins=plugins,
        route_handlers=[bulk, internal, public, health, version, *([bench_baseline] if settings.bench_baseline else [])],
        middleware=[request_ids.middleware, prometheus.middleware],
        dependencies={"db": Provide(provide_db)},
        state=State({"db": db, "webhook_adapters": webhook_adapters(settings), "settings": settings, "render_pool": render_pool}),
        lifespan=[lifespan],
        exception_handlers={Exception: problems.handle},
        request_max_body_size=settings.max_body_bytes,
        debug=debug,
        logging_config=None,  # dispatcher.logs owns logging (JSON, masked)
        openapi_config=OpenAPIConfig(
            title="notification-dispatcher",
            version=__version__,
            path=reference.SCHEMA_PATH,
            description="Multi-channel notification dispatcher. /internal routes take Authorization: Bearer <API key>.",
            components=Components(security_schemes={"BearerAuth": SecurityScheme(type="http", scheme="bearer")}),
            render_plugins=[reference.LocalSwaggerPlugin()],  # Swagger UI served from the service itself: no CDN
        ),
    )


def app_from_env() -> Litestar:
    """Factory for `uvicorn --factory api.app:app_from_env`."""
    from dispatcher import logs

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    tracing.setup("dispatcher-api")
    try:
        return create_app(settings)
    except ConfigurationError as exc:
        raise SystemExit(f"dispatcher api: configuration error: {exc}") from None
