"""/health and /version (diagnostics, no API key), and the benchmark's baseline route (only when enabled)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.di import NamedDependency

from api.db import Database
from api.routes.common import ERRORS, JSON, body_text, encode, json_response
from api.schemas import Health, Version
from dispatcher import __version__, schema


@get("/health", responses=ERRORS, operation_id="health", tags=["diagnostics"], security=[], summary="Liveness and database check")
async def health(db: NamedDependency[Database]) -> Response[Health]:
    ok = await db.ping()
    body = Health(status="ok" if ok else "unavailable", database="ok" if ok else "unavailable")
    return Response(
        content=encode(body), status_code=200 if ok else 503, media_type=JSON, headers=None if ok else {"Retry-After": "2"}
    )


@get(
    "/version", responses=ERRORS, operation_id="version", tags=["diagnostics"], security=[], summary="Service and schema version"
)
async def version() -> Version:
    return Version(version=__version__, schema=schema.latest_migration())


@post("/bench/baseline", responses=ERRORS, status_code=202, include_in_schema=False)
async def bench_baseline(request: Request[Any, Any, Any], db: NamedDependency[Database]) -> Response[Any]:
    """The benchmark's baseline: one INSERT of the same payload (only with DISPATCHER_BENCH_BASELINE=1)."""
    row = await db.one("insert into bench_baseline (payload) values (%s::jsonb) returning id", (await body_text(request),))
    return json_response(f'{{"id": {row[0] if row else 0}}}', 202)
