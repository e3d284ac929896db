"""/internal/mock: what the mock provider would have sent."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter

from api.db import Database
from api.routes.common import ERRORS, Tenant, sql_json
from api.schemas import MockMessage


class Mock(Controller):
    path = "/mock"
    tags = ["mock provider"]

    @get(
        "/messages",
        responses=ERRORS,
        operation_id="listMockMessages",
        opt={"scope": "read"},
        summary="What the mock provider would have sent",
    )
    async def messages(
        self,
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        delivery_id: Annotated[UUID | None, QueryParameter(name="delivery_id", required=False)] = None,
        limit: Annotated[int, QueryParameter(name="limit", ge=1, le=1000)] = 100,
    ) -> Response[list[MockMessage]]:
        return await sql_json(db, "notify_api.list_mock_messages_v1(%s, %s, %s)", tenant.id, delivery_id, limit)
