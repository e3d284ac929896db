"""/internal/retention: how long a tenant's personal data and its content-free history are kept (docs/operations.md)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import RetentionOut, RetentionPut


class Retention(Controller):
    path = "/retention"
    tags = ["retention"]

    @get("", responses=ERRORS, operation_id="getRetention", opt={"scope": "read"}, summary="Retention periods in force")
    async def get_retention(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[RetentionOut]:
        return await sql_json(db, "notify_api.get_retention_v1(%s)", tenant.id)

    @put(
        "",
        responses=ERRORS,
        operation_id="setRetention",
        opt={"scope": "admin"},
        summary="Set the retention periods",
        description="content_days: how long addresses, variables, rendered messages, provider error texts and callback "
        "messages are kept; history_days: how long the content-free history (statuses, timestamps, attempts) is kept at "
        "least. Each may differ per channel. Replaces the previous settings; a field left out takes the default.",
    )
    async def set_retention(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[RetentionPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[RetentionOut]:
        return await sql_json(db, "notify_api.set_retention_v1(%s, %s::jsonb)", tenant.id, await body_text(request))
