"""/internal/notifications/preview: the dry run of a submission. It takes the same body (and the same body limits) as
POST /internal/notifications, writes nothing, and answers per delivery what the submission would do, rendered with the
worker's renderer in the bounded render pool (dispatcher/preview.py)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, encode, json_response, too_large, unauthorized
from api.schemas import NotificationIn, NotificationPreview
from dispatcher.preview import render_preview
from dispatcher.settings import Settings

# One statement (sql/071_api_http.sql): the key's test flag for this transaction, then the preview; nothing is written.
PREVIEW = "select notify_api.preview_notification_http_v1(%s, %s::jsonb, %s)::text"


class Previews(Controller):
    path = "/notifications/preview"
    tags = ["notifications"]

    @post(
        "/",
        responses=ERRORS,
        operation_id="previewNotification",
        opt={"scope": "submit"},
        status_code=200,
        summary="Dry run: what a submission of this body would do, writing nothing",
        description="The body of POST /internal/notifications, read the same way (its shape errors are the same errors "
        "with the same status). Per delivery (per recipient and channel for a fan-out): would_send, status, due_at, the "
        "provider, the rendered content, or every reason it would not be sent (no_address, no_consent with the consent "
        "entry in force, template_not_found with the locales tried, missing_variables, render_failed, ...). Where the "
        "submission would be refused, `outcome` is refused and `refused` holds its error. No Idempotency-Key is read.",
    )
    async def preview(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[NotificationIn],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
    ) -> Response[NotificationPreview]:
        body = await request.body()
        settings: Settings = state.settings
        if data.recipients is None and len(body) > settings.max_body_bytes:
            raise too_large(settings.max_body_bytes, "DISPATCHER_MAX_BODY_BYTES")
        row = await db.one(PREVIEW, (tenant.id, body.decode("utf-8"), tenant.key_id))
        if row is None:
            raise unauthorized()
        answer = await render_preview(msgspec.json.decode(row[0]), state.render_pool)
        return json_response(encode(answer).decode())
