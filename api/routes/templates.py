"""/internal/templates: template contents per locale; every text must compile in the worker's sandbox."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from api.db import Database
from api.problems import ProblemException
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import TemplateOut, TemplatePut
from dispatcher.render import check_syntax

TEMPLATE_TEXTS = ("subject", "text", "html")
TEMPLATE_COMPILE_MAX = 262_144  # longer texts are refused by upsert_template_v1 (template_too_large) without compiling


def _check_template_syntax(text: str) -> None:
    """Every text of every channel must compile in the worker's sandbox: 422 invalid_template naming the field."""
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return  # the schema check already answered
    channels = body.get("channels") if isinstance(body, dict) else None
    for channel, content in channels.items() if isinstance(channels, dict) else ():
        if not isinstance(content, dict):
            continue
        for name in TEMPLATE_TEXTS:
            source = content.get(name)
            if isinstance(source, str) and len(source) <= TEMPLATE_COMPILE_MAX:
                reason = check_syntax(source, escape=name == "html")
                if reason is not None:
                    field = f"channels.{channel}.{name}"
                    raise ProblemException(422, "invalid_template", f"{field} does not compile: {reason}"[:500], field)


class Templates(Controller):
    path = "/templates"
    tags = ["templates"]

    @put(
        "/{key:str}",
        responses=ERRORS,
        operation_id="upsertTemplate",
        opt={"scope": "admin"},
        summary="Set a template's content for one locale",
        description="Placeholders are {{name}}; the variables a template needs are derived and checked at submit time.",
    )
    async def upsert(
        self,
        request: Request[Any, Any, Any],
        key: FromPath[str],
        data: JSONBody[TemplatePut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[list[TemplateOut]]:
        text = await body_text(request)
        await asyncio.to_thread(_check_template_syntax, text)  # compiling is CPU work: off the event loop
        return await sql_json(db, "notify_api.upsert_template_v1(%s, %s, %s::jsonb)", tenant.id, key, text)

    @get("/", responses=ERRORS, operation_id="listTemplates", opt={"scope": "read"}, summary="List templates")
    async def list(
        self,
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        key: Annotated[str | None, QueryParameter(name="key", required=False)] = None,
    ) -> Response[list[TemplateOut]]:
        return await sql_json(db, "notify_api.list_templates_v1(%s, %s)", tenant.id, key)
