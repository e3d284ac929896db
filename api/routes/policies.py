"""/internal/quiet-hours and /internal/frequency-caps: when a tenant's deliveries are held and how many a recipient may
get (sql/077_api_policies.sql). Applied by the worker's claim; WhatsApp's pair rate limit needs no setting."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, put
from litestar.di import NamedDependency
from litestar.params import JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import FrequencyCapsOut, FrequencyCapsPut, QuietHoursOut, QuietHoursPut


class QuietHours(Controller):
    path = "/quiet-hours"
    tags = ["policies"]

    @get("", responses=ERRORS, operation_id="getQuietHours", opt={"scope": "read"}, summary="Quiet hours in force")
    async def get_quiet_hours(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[QuietHoursOut]:
        return await sql_json(db, "notify_api.get_quiet_hours_v1(%s)", tenant.id)

    @put(
        "",
        responses=ERRORS,
        operation_id="setQuietHours",
        opt={"scope": "admin"},
        summary="Set the quiet hours",
        description="start and end (HH:MM, the recipient's local time; start after end crosses midnight) are the default "
        "window; categories give a category its own window or exempt it. A delivery falling due inside them is held "
        "until they end (expired if that is past its expires_at). timezone: for recipients without one (default UTC). "
        "Replaces the previous settings.",
    )
    async def set_quiet_hours(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[QuietHoursPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[QuietHoursOut]:
        return await sql_json(db, "notify_api.set_quiet_hours_v1(%s, %s::jsonb)", tenant.id, await body_text(request))

    @delete(
        "",
        responses=ERRORS,
        operation_id="deleteQuietHours",
        opt={"scope": "admin"},
        status_code=200,
        summary="Remove the quiet hours (and the default time zone)",
    )
    async def delete_quiet_hours(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[QuietHoursOut]:
        return await sql_json(db, "notify_api.delete_quiet_hours_v1(%s)", tenant.id)


class FrequencyCaps(Controller):
    path = "/frequency-caps"
    tags = ["policies"]

    @get("", responses=ERRORS, operation_id="getFrequencyCaps", opt={"scope": "read"}, summary="Frequency caps in force")
    async def get_frequency_caps(
        self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[FrequencyCapsOut]:
        return await sql_json(db, "notify_api.get_frequency_caps_v1(%s)", tenant.id)

    @put(
        "",
        responses=ERRORS,
        operation_id="setFrequencyCaps",
        opt={"scope": "admin"},
        summary="Set the frequency caps",
        description="Each cap: at most max messages to one recipient in any sliding period (ISO 8601, PT1S to P31D), "
        "counting only its channel and category when given; over it a delivery is suppressed (action suppress, the "
        "default) or held until the cap frees (hold). Replaces the previous caps; [] removes them.",
    )
    async def set_frequency_caps(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[FrequencyCapsPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[FrequencyCapsOut]:
        return await sql_json(db, "notify_api.set_frequency_caps_v1(%s, %s::jsonb)", tenant.id, await body_text(request))

    @delete(
        "",
        responses=ERRORS,
        operation_id="deleteFrequencyCaps",
        opt={"scope": "admin"},
        status_code=200,
        summary="Remove the frequency caps",
    )
    async def delete_frequency_caps(
        self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[FrequencyCapsOut]:
        return await sql_json(db, "notify_api.delete_frequency_caps_v1(%s)", tenant.id)
