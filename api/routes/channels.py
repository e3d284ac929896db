"""/internal/channels: each channel's provider (secret references, endpoints) and consent policy."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.db import Database
from api.problems import ProblemException
from api.routes.common import ERRORS, Tenant, body_text, sql_json
from api.schemas import PolicyOut, PolicyPut, ProviderOut, ProviderPut, ProvidersPut, UnknownDeadlineOut, UnknownDeadlinePut
from providers.registry import CHANNELS, kind
from providers.secrets import Grants, check_endpoints


class Channels(Controller):
    path = "/channels"
    tags = ["consent"]

    @get(
        "/policies",
        responses=ERRORS,
        operation_id="listChannelPolicies",
        opt={"scope": "read"},
        summary="Consent policy per channel",
    )
    async def policies(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[PolicyOut]]:
        return await sql_json(db, "notify_api.list_channel_policies_v1(%s)", tenant.id)

    @get(
        "/providers",
        responses=ERRORS,
        operation_id="listChannelProviders",
        opt={"scope": "admin"},
        summary="The provider of each channel (secret references shown, values never)",
    )
    async def providers(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[ProviderOut]]:
        return await sql_json(db, "notify_api.list_channel_providers_v1(%s)", tenant.id)

    @put(
        "/{channel:str}/provider",
        responses=ERRORS,
        operation_id="setChannelProvider",
        opt={"scope": "admin"},
        summary="Configure the provider of a channel",
        description="Secrets are references (env:NAME or file:/path) inside the namespace the operator granted the tenant, "
        "resolved by the worker; never values. base_url (WhatsApp, Twilio) and host (SMTP) must be public hosts unless the "
        "operator granted private endpoints; a WhatsApp phone_number_id, a Twilio from_number and a Twilio "
        "messaging_service_sid belong to one tenant (409 phone_number_taken).",
    )
    async def set_provider(
        self,
        request: Request[Any, Any, Any],
        channel: FromPath[str],
        data: JSONBody[ProviderPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
    ) -> Response[ProviderOut]:
        if channel not in CHANNELS:
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        await _check_entry(data.provider, data.settings, "", state, db, tenant, {})
        return await sql_json(
            db,
            "notify_api.set_channel_provider_v1(%s, %s::notify.channel, %s::jsonb)",
            tenant.id,
            channel,
            await body_text(request),
        )

    @get(
        "/{channel:str}/providers",
        responses=ERRORS,
        operation_id="getChannelProviders",
        opt={"scope": "admin"},
        summary="A channel's provider failover chain, in order, with each provider's health",
    )
    async def chain(
        self, channel: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[ProviderOut]:
        if channel not in CHANNELS:
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        return await sql_json(
            db,
            "(select p from jsonb_array_elements(notify_api.list_channel_providers_v1(%s)) p where p ->> 'channel' = %s)",
            tenant.id,
            channel,
        )

    @put(
        "/{channel:str}/providers",
        responses=ERRORS,
        operation_id="setChannelProviders",
        opt={"scope": "admin"},
        summary="Replace a channel's provider failover chain (the primary first)",
        description="1 to 5 providers as PUT .../provider takes them, each checked the same way (errors name "
        "providers[i].<field>; nothing is written unless all pass). A send known not to have been accepted (connection "
        "refused, authentication refused, refused before acceptance) moves to the next provider at once; an ambiguous "
        "outcome never does on WhatsApp or SMS.",
    )
    async def set_chain(
        self,
        channel: FromPath[str],
        data: JSONBody[ProvidersPut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
        state: State,
    ) -> Response[ProviderOut]:
        if channel not in CHANNELS:
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        grants: dict[str, Grants] = {}  # read once for the chain
        for i, entry in enumerate(data.providers):
            await _check_entry(entry.provider, entry.settings, f"providers[{i}].", state, db, tenant, grants)
        return await sql_json(
            db,
            "notify_api.set_channel_providers_v1(%s, %s::notify.channel, %s::jsonb)",
            tenant.id,
            channel,
            msgspec.json.encode(data.providers).decode(),
        )

    @put(
        "/{channel:str}/policy",
        responses=ERRORS,
        operation_id="setChannelPolicy",
        opt={"scope": "admin"},
        summary="Make a channel opt_in or opt_out",
    )
    async def set_policy(
        self, channel: FromPath[str], data: JSONBody[PolicyPut], tenant: NamedDependency[Tenant], db: NamedDependency[Database]
    ) -> Response[PolicyOut]:
        if channel not in CHANNELS:
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        return await sql_json(
            db,
            "notify_api.set_channel_policy_v1(%s, %s::notify.channel, %s::notify.consent_policy)",
            tenant.id,
            channel,
            data.policy,
        )

    @put(
        "/{channel:str}/unknown-deadline",
        responses=ERRORS,
        operation_id="setUnknownDeadline",
        opt={"scope": "admin"},
        summary="How long a delivery on the channel may stay unknown before it becomes failed",
        description="after_seconds from 60 to 31,536,000; null restores the default (7 days for WhatsApp and SMS, 1 day "
        "for e-mail). Applied by the periodic maintenance; never a resend.",
    )
    async def set_unknown_deadline(
        self,
        channel: FromPath[str],
        data: JSONBody[UnknownDeadlinePut],
        tenant: NamedDependency[Tenant],
        db: NamedDependency[Database],
    ) -> Response[UnknownDeadlineOut]:
        return await sql_json(db, "notify_api.set_unknown_deadline_v1(%s, %s, %s)", tenant.id, channel, data.after_seconds)


async def _check_entry(
    provider: str,
    settings: dict[str, Any] | None,
    prefix: str,
    state: State,
    db: Database,
    tenant: Tenant,
    grants: dict[str, Grants],
) -> None:
    """What the API checks of one provider configuration before the database does the rest (a single provider, or
    each entry of a failover chain with its field prefixed `providers[i].`)."""
    spec = kind(provider)
    where = f"{prefix.rstrip('.')}: " if prefix else ""  # providers[1]: ...
    if spec is not None and spec.needs_public_url and not state.settings.public_url:
        # Refused now rather than at every send: the deployment cannot report back or verify this provider's webhooks.
        raise ProblemException(
            422,
            "public_url_missing",
            f"{where}{provider} needs the deployment's public URL (DISPATCHER_PUBLIC_URL), which is not set: ask the operator",
            f"{prefix}provider",
        )
    if provider != "mock" and settings:
        # SSRF: a name that resolves to a private address is refused now, not only at the first send (the database
        # refuses private IP literals and local names itself; without the operator's private-endpoints grant).
        if "grants" not in grants:
            row = await db.one("select notify_api.get_provider_grants_v1(%s)", (tenant.id,))
            grants["grants"] = Grants.of(row[0] if row else None)
        refused = await check_endpoints(spec.endpoint if spec else None, settings, grants["grants"])
        if refused is not None:
            raise ProblemException(422, "unsafe_endpoint", f"{where}{refused[1]}", f"{prefix}{refused[0]}")
