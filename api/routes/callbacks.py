"""/internal/callbacks: the tenant's status callback settings and signing secret."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, body_text, check_callback_url, sql_json
from api.schemas import CallbacksOut, CallbacksPut, SecretRotation
from providers import standard_webhooks


class Callbacks(Controller):
    path = "/callbacks"
    tags = ["callbacks"]

    @put(
        "/",
        responses=ERRORS,
        operation_id="setCallbacks",
        opt={"scope": "admin"},
        summary="Set up status callbacks",
        description="Every delivery status change is posted to `url` (or to a request's own `callback_url`) as a Standard "
        "Webhooks message signed with the tenant's whsec_ secret, shown once in this answer when created. "
        "Private, loopback and link-local targets are refused outside development mode.",
    )
    async def set(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CallbacksPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
    ) -> Response[CallbacksOut]:
        await check_callback_url(state, data.url, "url")
        return await sql_json(
            db,
            "notify_api.set_callbacks_v1(%s, %s::jsonb, %s)",
            tenant.id,
            await body_text(request),
            standard_webhooks.new_secret(),
        )

    @get(
        "/", responses=ERRORS, operation_id="getCallbacks", opt={"scope": "admin"}, summary="Status callback settings (no secret)"
    )
    async def get(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[CallbacksOut]:
        return await sql_json(db, "notify_api.get_callbacks_v1(%s)", tenant.id)

    @post(
        "/rotate-secret",
        responses=ERRORS,
        operation_id="rotateCallbackSecret",
        opt={"scope": "admin"},
        status_code=200,
        summary="Replace the signing secret",
        description="Messages carry signatures with both secrets until the overlap ends.",
    )
    async def rotate(
        self, tenant: NamedDependency[Tenant], db: NamedDependency[Database], data: JSONBody[SecretRotation | None] = None
    ) -> Response[CallbacksOut]:
        overlap = data.overlap_seconds if data else 86_400
        return await sql_json(
            db, "notify_api.rotate_callback_secret_v1(%s, %s, %s)", tenant.id, standard_webhooks.new_secret(), overlap
        )
