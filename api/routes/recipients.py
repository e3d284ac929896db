"""/internal/recipients: recipients, their addresses and their consent ledger."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.db import Database
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import ConsentEntry, ConsentIn, ConsentsOut, ErasureReceipt, RecipientExport, RecipientOut, RecipientPut


class Recipients(Controller):
    path = "/recipients"
    tags = ["recipients"]

    @put(
        "/{ref:str}",
        responses=ERRORS,
        operation_id="upsertRecipient",
        opt={"scope": "submit"},
        summary="Create or update a recipient and its addresses",
        description="An address set to null is removed.",
    )
    async def upsert(
        self,
        request: Request[Any, Any, Any],
        ref: FromPath[str],
        data: JSONBody[RecipientPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[RecipientOut]:
        return await sql_json(db, "notify_api.upsert_recipient_v1(%s, %s, %s::jsonb)", tenant.id, ref, await body_text(request))

    @get("/{ref:str}", responses=ERRORS, operation_id="getRecipient", opt={"scope": "read"}, summary="Read a recipient")
    async def read(
        self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[RecipientOut]:
        return await sql_json(db, "notify_api.get_recipient_v1(%s, %s)", tenant.id, ref)

    @post(
        "/{ref:str}/consents",
        responses=ERRORS,
        operation_id="recordConsent",
        opt={"scope": "submit"},
        status_code=201,
        summary="Append a consent entry",
    )
    async def record_consent(
        self,
        request: Request[Any, Any, Any],
        ref: FromPath[str],
        data: JSONBody[ConsentIn],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[ConsentEntry]:
        return await sql_json(
            db,
            "notify_api.record_consent_v1(%s, %s, %s::jsonb, %s)",
            tenant.id,
            ref,
            await body_text(request),
            f"api_key:{tenant.key_id}",
            status=201,
        )

    @get(
        "/{ref:str}/consents",
        responses=ERRORS,
        operation_id="listConsents",
        opt={"scope": "read"},
        summary="Consent in force per channel, and the ledger",
    )
    async def list_consents(
        self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[ConsentsOut]:
        return await sql_json(db, "notify_api.list_consents_v1(%s, %s)", tenant.id, ref)

    @delete(
        "/{ref:str}",
        responses=ERRORS,
        operation_id="eraseRecipient",
        opt={"scope": "admin"},
        status_code=200,
        summary="Erase a recipient's personal data (a request to be forgotten)",
        description="Cancels its pending deliveries, keeps what it had opted out of as keyed hashes (a later submission "
        "to the same address stays suppressed), and removes its addresses and every copy of its personal data; the "
        "content-free history stays. Answers with the receipt, also recorded (docs/operations.md, Erasure).",
    )
    async def erase(
        self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[ErasureReceipt]:
        return await sql_json(db, "notify_api.erase_recipient_v1(%s, %s, %s)", tenant.id, ref, f"api_key:{tenant.key_id}")

    @get(
        "/{ref:str}/export",
        responses=ERRORS,
        operation_id="exportRecipient",
        opt={"scope": "read"},
        summary="Everything held about a recipient, as one document (an access request)",
    )
    async def export(
        self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[RecipientExport]:
        return await sql_json(db, "notify_api.export_recipient_v1(%s, %s)", tenant.id, ref)
