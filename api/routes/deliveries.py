"""/internal/deliveries: one delivery by its id — an operator's resolution of an unknown outcome."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import DeliveryOut, Resolution


class Deliveries(Controller):
    path = "/deliveries"
    tags = ["notifications"]

    @post(
        "/{delivery_id:uuid}/resolve",
        responses=ERRORS,
        operation_id="resolveDelivery",
        opt={"scope": "admin"},
        status_code=200,
        summary="Resolve an unknown outcome by hand (to sent or failed, with a note)",
        description="Only a delivery in status unknown (409 not_unknown otherwise). Recorded in its history with the key "
        "that resolved it and the note. Unresolved unknowns become failed after the channel's deadline "
        "(docs/operations.md, Unknown outcomes).",
    )
    async def resolve(
        self,
        request: Request[Any, Any, Any],
        delivery_id: FromPath[UUID],
        data: JSONBody[Resolution],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[DeliveryOut]:
        return await sql_json(
            db,
            "notify_api.resolve_delivery_v1(%s, %s, %s::jsonb, %s)",
            tenant.id,
            delivery_id,
            await body_text(request),
            f"api_key:{tenant.key_id}",
        )
