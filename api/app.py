"""The Litestar application: /internal (API key), /public/webhooks (provider signatures), /health, /version.

Each handler decodes, calls one notify_api function, and returns the JSON that function built.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any
from uuid import UUID

import msgspec
import psycopg
from litestar import Controller, Litestar, Request, Response, Router, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler
from litestar.di import NamedDependency, Provide
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusConfig
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from psycopg.types.json import Jsonb

from api import problems, reference, request_ids
from api.db import Database
from api.problems import ProblemException
from api.schemas import (
    BatchIn, BatchItem, BatchOut, CallbackMessage, CallbacksOut, CallbacksPut, CancelResult, ConsentEntry, ConsentIn, ConsentsOut, Health, MockMessage, NotificationAccepted, NotificationIn,
    NotificationOut, PolicyOut, Problem, PolicyPut, ProviderOut, ProviderPut, RecipientOut, RecipientPut, SecretRotation, TemplateOut, TemplatePut, Version, WebhookAck,
)
from dispatcher import __version__, keys, metrics, schema, tracing
from dispatcher.render import check_syntax
from dispatcher.callback_urls import UnsafeUrl
from dispatcher.callback_urls import resolve as resolve_callback_url
from dispatcher.settings import Settings
from providers import standard_webhooks
from providers.base import ConfigurationError, WebhookRejected
from providers.registry import webhook_adapters
from providers.secrets import Grants, check_endpoints
from providers.unsubscribe import check_token
from providers.whatsapp import verify_handshake

log = logging.getLogger("api")
JSON = "application/json"
# Every route may answer with a problem (RFC 9457); documented so clients and schema checkers expect it.
ERRORS = {status: ResponseSpec(data_container=Problem, media_type="application/problem+json", generate_examples=False,
                                description=description)
          for status, description in {400: "Bad request: the body or a parameter is malformed; `field` names it",
                                      401: "Missing, unknown or revoked API key, or an unverified webhook",
                                      403: "Forbidden", 404: "No such object for this tenant, or no such route",
                                      409: "Conflict", 413: "Body too large", 422: "Well-formed but refused; `field` names why",
                                      503: "The database is unavailable; retry after Retry-After seconds"}.items()}
_encode = msgspec.json.Encoder().encode


@dataclasses.dataclass(frozen=True)
class Tenant:
    id: UUID
    key_id: UUID
    rate: float | None = None   # set when the route's own statement takes the rate token (opt charge="statement")


# The request id travels as the transaction setting notify.request_id (the column's default reads it). It is set in
# the argument list, so it happens before the submission and within the same statement: still one round trip.
_WITH_REQUEST_ID = ("case when set_config('notify.request_id', coalesce(%(request_id)s, ''), true) is null"
                    " or set_config('notify.traceparent', coalesce(%(traceparent)s, ''), true) is null then null else {} end")
# The guard checked the key (read-only, before the body was read); the submission statement takes the rate token last,
# in its own transaction, so a submission is one commit and the bucket's row lock is held only while it commits.
SUBMIT = ("select s.response::text, s.replayed, notify_api.charge_api_key_v1(%(key_id)s, %(rate)s) "
          "from notify_api.submit_notification_v1(%(tenant)s, %(body)s::jsonb, "
          + _WITH_REQUEST_ID.format("%(idempotency_key)s::text") + ") s")
BATCH = ("select notify_api.submit_notifications_v1(%(tenant)s, " + _WITH_REQUEST_ID.format("(%(body)s::jsonb) -> 'items'")
         + ")::text, notify_api.charge_api_key_v1(%(key_id)s, %(rate)s)")
CHARGE = "select notify_api.charge_api_key_v1(%(key_id)s, %(rate)s)"


def _json(text: str | None, status: int = 200, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(content=(text or "null").encode(), status_code=status, media_type=JSON, headers=headers)


async def provide_db(state: State) -> Database:
    return state.db  # type: ignore[no-any-return]


def _key_digest(request: ASGIConnection[Any, Any, Any, Any]) -> bytes:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ProblemException(401, "unauthorized", "send an API key as Authorization: Bearer <key>",
                               headers={"WWW-Authenticate": "Bearer"})
    return keys.digest(key.strip())


def _unauthorized() -> ProblemException:
    return ProblemException(401, "unauthorized", "unknown or revoked API key", headers={"WWW-Authenticate": "Bearer"})


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
    """The guard of every /internal route, run before the body is read or decoded: the key's tenant, if the key may
    use this route (its scope is the handler's opt["scope"]; 403 without it), and the key's rate limit (429). Both are
    checked in Postgres, in one call. An anonymous caller costs no body parsing and learns nothing about the body."""
    scope = route_handler.opt.get("scope", "admin")
    db: Database = connection.app.state.db
    if route_handler.opt.get("charge") == "statement":   # the route's statement takes the token (SUBMIT, BATCH)
        row = await db.one("select tenant_id, api_key_id, rate_per_second from notify_api.check_api_key_v1(%s, %s)",
                           (_key_digest(connection), scope))
    else:
        row = await db.one("select tenant_id, api_key_id, null from notify_api.authorize_v1(%s, %s)", (_key_digest(connection), scope))
    if row is None:
        raise _unauthorized()
    connection.state.tenant = Tenant(id=row[0], key_id=row[1], rate=row[2])


async def authenticate(request: Request[Any, Any, Any]) -> Tenant:
    """The tenant the guard found (require_key)."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:  # a route outside the guarded routers
        raise _unauthorized()
    return tenant  # type: ignore[no-any-return]


def _too_large(limit: int, setting: str) -> ProblemException:
    return ProblemException(413, "payload_too_large", f"the body is over {limit} bytes ({setting})")


async def _body_text(request: Request[Any, Any, Any]) -> str:
    return (await request.body()).decode("utf-8")


TEMPLATE_TEXTS = ("subject", "text", "html")
TEMPLATE_COMPILE_MAX = 262_144   # longer texts are refused by upsert_template_v1 (template_too_large) without compiling


def _check_template_syntax(text: str) -> None:
    """Every text of every channel must compile in the worker's sandbox: 422 invalid_template naming the field."""
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return  # the schema check already answered
    channels = body.get("channels") if isinstance(body, dict) else None
    for channel, content in (channels.items() if isinstance(channels, dict) else ()):
        if not isinstance(content, dict):
            continue
        for name in TEMPLATE_TEXTS:
            source = content.get(name)
            if isinstance(source, str) and len(source) <= TEMPLATE_COMPILE_MAX:
                reason = check_syntax(source, escape=name == "html")
                if reason is not None:
                    field = f"channels.{channel}.{name}"
                    raise ProblemException(422, "invalid_template", f"{field} does not compile: {reason}"[:500], field)


async def _check_callback_url(state: State, url: str | None, field: str) -> None:
    """SSRF: a callback URL must resolve to public addresses only (outside development mode); 422 names the field."""
    if url is not None:
        try:
            await resolve_callback_url(url, allow_private=state.settings.dev_mode)
        except UnsafeUrl as exc:
            raise ProblemException(422, "unsafe_callback_url", str(exc), field) from None


class Notifications(Controller):
    path = "/notifications"
    tags = ["notifications"]

    @post("/", responses=ERRORS, operation_id="submitNotification", opt={"scope": "submit", "charge": "statement"}, status_code=202,
          summary="Submit a notification intent",
          description="One delivery per channel (per recipient and channel for a fan-out with `recipients`); suppressed "
                      "deliveries say why. A repeated Idempotency-Key with the same body replays the original response with "
                      "200 and Idempotent-Replayed: true; with another body, 422. Bodies over DISPATCHER_MAX_BODY_BYTES get "
                      "413, except a fan-out, which may reach DISPATCHER_MAX_BULK_BODY_BYTES.")
    async def submit(
        self, request: Request[Any, Any, Any], data: JSONBody[NotificationIn], tenant: NamedDependency[Tenant],
        db: NamedDependency[Database], state: State,
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", required=False, max_length=255)] = None,
    ) -> Response[NotificationAccepted]:
        # The guard verified the key before the body was read; this router's body limit is the bulk one (a fan-out).
        body = await request.body()
        settings: Settings = state.settings
        if data.recipients is None and len(body) > settings.max_body_bytes:
            raise _too_large(settings.max_body_bytes, "DISPATCHER_MAX_BODY_BYTES")
        await _check_callback_url(state, data.callback_url, "callback_url")
        row = await db.one(SUBMIT, {"tenant": tenant.id, "body": body.decode("utf-8"),
                                    "request_id": request_ids.current(), "traceparent": tracing.current_traceparent(),
                                    "idempotency_key": idempotency_key, "key_id": tenant.key_id, "rate": tenant.rate})
        if row is None:
            raise _unauthorized()
        metrics.SUBMISSIONS.labels("replayed" if row[1] else "accepted").inc()
        if row[1]:
            return _json(row[0], 200, {"Idempotent-Replayed": "true"})
        return _json(row[0], 202)

    @post("/batch", responses=ERRORS, operation_id="submitNotificationBatch", opt={"scope": "submit", "charge": "statement"},
          status_code=200,
          summary="Submit up to 1,000 independent intents",
          description="Each item has its own idempotency key and succeeds or fails alone, a `notification` of the wrong "
                      "shape included; the answer reports each item's outcome (accepted, replayed, or its error) in order. "
                      "Bodies up to DISPATCHER_MAX_BULK_BODY_BYTES.")
    async def batch(self, request: Request[Any, Any, Any], data: JSONBody[BatchIn], tenant: NamedDependency[Tenant],
                    db: NamedDependency[Database], state: State) -> Response[BatchOut]:
        # Only the envelope is decoded strictly; each item's shape is checked alone (a bad one fails alone).
        failed: dict[int, dict[str, Any]] = {}
        for i, raw in enumerate(data.items):
            try:
                item = msgspec.convert(raw, BatchItem)
            except msgspec.ValidationError as exc:
                failed[i] = problems.batch_item_error(str(exc), i)
                continue
            try:
                await _check_callback_url(state, item.notification.callback_url, "callback_url")
            except ProblemException as exc:
                failed[i] = {"index": i, "outcome": "error", "status": exc.status_code,
                             "error": {"type": exc.type_, "detail": exc.detail, "field": exc.field}}
        kept = [i for i in range(len(data.items)) if i not in failed]
        results: list[dict[str, Any]] = []
        if kept:
            items = [data.items[i] for i in kept] if failed else data.items
            row = await db.one(BATCH, {"tenant": tenant.id, "body": _encode({"items": items}).decode() if failed else
                                       (await request.body()).decode("utf-8"),
                                       "request_id": request_ids.current(), "traceparent": tracing.current_traceparent(),
                                       "key_id": tenant.key_id, "rate": tenant.rate})
            answer = msgspec.json.decode(row[0]) if row else {"items": []}
            for position, result in zip(kept, answer["items"], strict=True):
                results.append({**result, "index": position})
        else:   # every item failed its shape: the request still takes its token
            await db.one(CHARGE, {"key_id": tenant.key_id, "rate": tenant.rate})
        results.extend(failed.values())
        results.sort(key=lambda r: r["index"])
        out = {"items": results, **{name: sum(1 for r in results if r["outcome"] == outcome)
                                    for name, outcome in (("accepted", "accepted"), ("replayed", "replayed"), ("failed", "error"))}}
        return _json(_encode(out).decode())

    @get("/{notification_id:uuid}", responses=ERRORS, operation_id="getNotification", opt={"scope": "read"}, summary="Read a notification and its deliveries")
    async def read(self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[NotificationOut]:
        row = await db.one("select notify_api.get_notification_v1(%s, %s)::text", (tenant.id, notification_id))
        return _json(row[0] if row else None)

    @post("/{notification_id:uuid}/cancel", responses=ERRORS, operation_id="cancelNotification", opt={"scope": "submit"}, status_code=200,
          summary="Cancel what has not been claimed yet", description="Says per delivery whether it was cancelled and, if not, why.")
    async def cancel(self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[CancelResult]:
        row = await db.one("select notify_api.cancel_notification_v1(%s, %s)::text", (tenant.id, notification_id))
        return _json(row[0] if row else None)

    @get("/{notification_id:uuid}/callbacks", responses=ERRORS, operation_id="listNotificationCallbacks", opt={"scope": "read"},
         summary="The status callbacks of a notification, with every attempt",
         description="One message per delivery status change, in sequence order per delivery; each attempt with the "
                     "receiver's status code or the error.")
    async def callbacks(self, notification_id: FromPath[UUID], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[CallbackMessage]]:
        row = await db.one("select notify_api.list_callbacks_v1(%s, %s)::text", (tenant.id, notification_id))
        return _json(row[0] if row else None)


class Callbacks(Controller):
    path = "/callbacks"
    tags = ["callbacks"]

    @put("/", responses=ERRORS, operation_id="setCallbacks", opt={"scope": "admin"}, summary="Set up status callbacks",
         description="Every delivery status change is posted to `url` (or to a request's own `callback_url`) as a Standard "
                     "Webhooks message signed with the tenant's whsec_ secret, shown once in this answer when created. "
                     "Private, loopback and link-local targets are refused outside development mode.")
    async def set(self, request: Request[Any, Any, Any], data: JSONBody[CallbacksPut], tenant: NamedDependency[Tenant],
                  db: NamedDependency[Database], state: State) -> Response[CallbacksOut]:
        await _check_callback_url(state, data.url, "url")
        row = await db.one("select notify_api.set_callbacks_v1(%s, %s::jsonb, %s)::text",
                           (tenant.id, await _body_text(request), standard_webhooks.new_secret()))
        return _json(row[0] if row else None)

    @get("/", responses=ERRORS, operation_id="getCallbacks", opt={"scope": "admin"}, summary="Status callback settings (no secret)")
    async def get(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[CallbacksOut]:
        row = await db.one("select notify_api.get_callbacks_v1(%s)::text", (tenant.id,))
        return _json(row[0] if row else None)

    @post("/rotate-secret", responses=ERRORS, operation_id="rotateCallbackSecret", opt={"scope": "admin"}, status_code=200,
          summary="Replace the signing secret", description="Messages carry signatures with both secrets until the overlap ends.")
    async def rotate(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database],
                     data: JSONBody[SecretRotation | None] = None) -> Response[CallbacksOut]:
        overlap = data.overlap_seconds if data else 86_400
        row = await db.one("select notify_api.rotate_callback_secret_v1(%s, %s, %s)::text",
                           (tenant.id, standard_webhooks.new_secret(), overlap))
        return _json(row[0] if row else None)


class Recipients(Controller):
    path = "/recipients"
    tags = ["recipients"]

    @put("/{ref:str}", responses=ERRORS, operation_id="upsertRecipient", opt={"scope": "submit"}, summary="Create or update a recipient and its addresses",
         description="An address set to null is removed.")
    async def upsert(self, request: Request[Any, Any, Any], ref: FromPath[str], data: JSONBody[RecipientPut], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[RecipientOut]:
        row = await db.one("select notify_api.upsert_recipient_v1(%s, %s, %s::jsonb)::text", (tenant.id, ref, await _body_text(request)))
        return _json(row[0] if row else None)

    @get("/{ref:str}", responses=ERRORS, operation_id="getRecipient", opt={"scope": "read"}, summary="Read a recipient")
    async def read(self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[RecipientOut]:
        row = await db.one("select notify_api.get_recipient_v1(%s, %s)::text", (tenant.id, ref))
        return _json(row[0] if row else None)

    @post("/{ref:str}/consents", responses=ERRORS, operation_id="recordConsent", opt={"scope": "submit"}, status_code=201, summary="Append a consent entry")
    async def record_consent(self, request: Request[Any, Any, Any], ref: FromPath[str], data: JSONBody[ConsentIn], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[ConsentEntry]:
        row = await db.one("select notify_api.record_consent_v1(%s, %s, %s::jsonb, %s)::text",
                           (tenant.id, ref, await _body_text(request), f"api_key:{tenant.key_id}"))
        return _json(row[0] if row else None, 201)

    @get("/{ref:str}/consents", responses=ERRORS, operation_id="listConsents", opt={"scope": "read"}, summary="Consent in force per channel, and the ledger")
    async def list_consents(self, ref: FromPath[str], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[ConsentsOut]:
        row = await db.one("select notify_api.list_consents_v1(%s, %s)::text", (tenant.id, ref))
        return _json(row[0] if row else None)


class Templates(Controller):
    path = "/templates"
    tags = ["templates"]

    @put("/{key:str}", responses=ERRORS, operation_id="upsertTemplate", opt={"scope": "admin"}, summary="Set a template's content for one locale",
         description="Placeholders are {{name}}; the variables a template needs are derived and checked at submit time.")
    async def upsert(self, request: Request[Any, Any, Any], key: FromPath[str], data: JSONBody[TemplatePut], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[TemplateOut]]:
        text = await _body_text(request)
        await asyncio.to_thread(_check_template_syntax, text)   # compiling is CPU work: off the event loop
        row = await db.one("select notify_api.upsert_template_v1(%s, %s, %s::jsonb)::text", (tenant.id, key, text))
        return _json(row[0] if row else None)

    @get("/", responses=ERRORS, operation_id="listTemplates", opt={"scope": "read"}, summary="List templates")
    async def list(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database],
                   key: Annotated[str | None, QueryParameter(name="key", required=False)] = None) -> Response[list[TemplateOut]]:
        row = await db.one("select notify_api.list_templates_v1(%s, %s)::text", (tenant.id, key))
        return _json(row[0] if row else None)


class Channels(Controller):
    path = "/channels"
    tags = ["consent"]

    @get("/policies", responses=ERRORS, operation_id="listChannelPolicies", opt={"scope": "read"}, summary="Consent policy per channel")
    async def policies(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[PolicyOut]]:
        row = await db.one("select notify_api.list_channel_policies_v1(%s)::text", (tenant.id,))
        return _json(row[0] if row else None)

    @get("/providers", responses=ERRORS, operation_id="listChannelProviders", opt={"scope": "admin"}, summary="The provider of each channel (secret references shown, values never)")
    async def providers(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[list[ProviderOut]]:
        row = await db.one("select notify_api.list_channel_providers_v1(%s)::text", (tenant.id,))
        return _json(row[0] if row else None)

    @put("/{channel:str}/provider", responses=ERRORS, operation_id="setChannelProvider", opt={"scope": "admin"}, summary="Configure the provider of a channel",
         description="Secrets are references (env:NAME or file:/path) inside the namespace the operator granted the tenant, "
                     "resolved by the worker; never values. base_url (WhatsApp) and host (SMTP) must be public hosts unless the "
                     "operator granted private endpoints; a WhatsApp phone_number_id belongs to one tenant.")
    async def set_provider(self, request: Request[Any, Any, Any], channel: FromPath[str], data: JSONBody[ProviderPut],
                           tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[ProviderOut]:
        if channel not in ("whatsapp", "email", "sms"):
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        if data.provider != "mock" and data.settings:
            # SSRF: a name that resolves to a private address is refused now, not only at the first send (the database
            # refuses private IP literals and local names itself; without the operator's private-endpoints grant).
            grants = await db.one("select notify_api.get_provider_grants_v1(%s)", (tenant.id,))
            refused = await check_endpoints(data.provider, data.settings, Grants.of(grants[0] if grants else None))
            if refused is not None:
                raise ProblemException(422, "unsafe_endpoint", refused[1], refused[0])
        row = await db.one("select notify_api.set_channel_provider_v1(%s, %s::notify.channel, %s::jsonb)::text",
                           (tenant.id, channel, await _body_text(request)))
        return _json(row[0] if row else None)

    @put("/{channel:str}/policy", responses=ERRORS, operation_id="setChannelPolicy", opt={"scope": "admin"}, summary="Make a channel opt_in or opt_out")
    async def set_policy(self, channel: FromPath[str], data: JSONBody[PolicyPut], tenant: NamedDependency[Tenant], db: NamedDependency[Database]) -> Response[PolicyOut]:
        if channel not in ("whatsapp", "email", "sms"):
            raise ProblemException(404, "not_found", f"no channel {channel}", "channel")
        row = await db.one("select notify_api.set_channel_policy_v1(%s, %s::notify.channel, %s::notify.consent_policy)::text",
                           (tenant.id, channel, data.policy))
        return _json(row[0] if row else None)


class Mock(Controller):
    path = "/mock"
    tags = ["mock provider"]

    @get("/messages", responses=ERRORS, operation_id="listMockMessages", opt={"scope": "read"}, summary="What the mock provider would have sent")
    async def messages(self, tenant: NamedDependency[Tenant], db: NamedDependency[Database],
                       delivery_id: Annotated[UUID | None, QueryParameter(name="delivery_id", required=False)] = None,
                       limit: Annotated[int, QueryParameter(name="limit", ge=1, le=1000)] = 100) -> Response[list[MockMessage]]:
        row = await db.one("select notify_api.list_mock_messages_v1(%s, %s, %s)::text", (tenant.id, delivery_id, limit))
        return _json(row[0] if row else None)


INGEST = (
    "select notify_api.ingest_webhook_v1(%s, %s, %s, "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r), "
    "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r), %s::text[])::text"
)


@post("/webhooks/{provider:str}", responses=ERRORS, operation_id="receiveWebhook", status_code=200, tags=["webhooks"],
      summary="Provider status reports", security=[],
      description="Verified over the raw body before anything is parsed; stored once per provider event; applied by rank.")
async def receive_webhook(request: Request[Any, Any, Any], provider: FromPath[str], db: NamedDependency[Database], state: State) -> Response[WebhookAck]:
    adapter = state.webhook_adapters.get(provider)
    if adapter is None:
        raise ProblemException(404, "not_found", f"no webhook endpoint for provider {provider}", "provider")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        parsed = adapter.parse(headers, body)
    except WebhookRejected as exc:
        metrics.WEBHOOKS.labels(provider, "rejected").inc()
        log.warning("webhook rejected", extra={"provider": provider, "reason": exc.reason})
        raise ProblemException(exc.status, "webhook_rejected", exc.reason) from None
    # Verified from here on: the provider gets 200 whatever the payload holds (a 4xx or 5xx makes it retry for hours
    # and then drop the event); what cannot be applied is stored with its reason.
    event_key = parsed.event_key if len(parsed.event_key) <= 500 else "sha256:" + hashlib.sha256(parsed.event_key.encode()).hexdigest()
    try:
        row = await db.one(INGEST, (adapter.provider, event_key, Jsonb(parsed.payload), Jsonb(msgspec.to_builtins(parsed.events)),
                                    Jsonb(msgspec.to_builtins(parsed.inbound)), parsed.notes))
    except (psycopg.Error, ValueError) as exc:
        if isinstance(exc, psycopg.OperationalError):
            raise  # the database is down: 503, and the provider retries later
        # Something in the events does not fit the database (a value out of range, a NUL): store the event alone.
        log.warning("webhook events not applied", extra={"provider": provider, "error": type(exc).__name__})
        notes = [*parsed.notes, f"events not applied: {getattr(exc, 'sqlstate', None) or type(exc).__name__}"]
        row = await db.one(INGEST, (adapter.provider, event_key, Jsonb(parsed.payload), Jsonb([]), Jsonb([]), notes))
    result = msgspec.json.decode(row[0]) if row else {}
    if result.get("duplicate"):
        metrics.WEBHOOKS.labels(provider, "duplicate").inc()
    for outcome in result.get("outcomes", []):
        metrics.WEBHOOKS.labels(provider, outcome.get("outcome", "unknown")).inc()
    log.info("webhook ingested", extra={"provider": provider, "duplicate": result.get("duplicate"),
                                        "outcomes": [o.get("outcome") for o in result.get("outcomes", [])]})
    return _json(_encode(WebhookAck(stored=bool(result.get("stored")), duplicate=bool(result.get("duplicate")))).decode())


@get("/webhooks/{provider:str}", responses=ERRORS, operation_id="verifyWebhook", tags=["webhooks"], security=[], media_type="text/plain",
     summary="WhatsApp webhook verification handshake",
     description="Meta's GET with hub.mode=subscribe, hub.verify_token and hub.challenge: the challenge is echoed if the "
                 "token matches DISPATCHER_WHATSAPP_VERIFY_TOKEN, else 403.")
async def verify_webhook(request: Request[Any, Any, Any], provider: FromPath[str], state: State) -> Response[str]:
    if provider != "whatsapp":
        raise ProblemException(404, "not_found", f"no verification handshake for provider {provider}", "provider")
    challenge = verify_handshake(dict(request.query_params), state.settings.whatsapp_verify_token)
    if challenge is None:
        raise ProblemException(403, "forbidden", "verification token does not match")
    return Response(content=challenge, media_type="text/plain")


_UNSUBSCRIBE_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Unsubscribe</title></head><body>
<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">
<p>Stop receiving these e-mails?</p><button type="submit">Unsubscribe</button></form></body></html>"""


def _unsubscribe_target(state: State, token: str) -> tuple[UUID, UUID]:
    secret = state.settings.unsubscribe_secret
    target = check_token(secret, token) if secret else None
    if target is None:
        raise ProblemException(404, "not_found", "unknown unsubscribe link")
    return target


@get("/unsubscribe/{token:str}", responses=ERRORS, operation_id="unsubscribePage", tags=["unsubscribe"], security=[], media_type="text/html",
     summary="The page behind a List-Unsubscribe link", description="Changes nothing (link scanners fetch it); its button POSTs.")
async def unsubscribe_page(token: FromPath[str], state: State) -> Response[str]:
    _unsubscribe_target(state, token)
    return Response(content=_UNSUBSCRIBE_PAGE, media_type="text/html")


@post("/unsubscribe/{token:str}", responses=ERRORS, operation_id="unsubscribe", tags=["unsubscribe"], security=[], status_code=200,
      summary="RFC 8058 one-click unsubscribe", description="Records an e-mail opt-out for the message's category.")
async def unsubscribe(token: FromPath[str], state: State, db: NamedDependency[Database]) -> Response[str]:
    tenant_id, delivery_id = _unsubscribe_target(state, token)
    await db.one("select notify_api.unsubscribe_v1(%s, %s)", (tenant_id, delivery_id))
    return Response(content="You are unsubscribed.", media_type="text/plain")


@get("/health", responses=ERRORS, operation_id="health", tags=["diagnostics"], security=[], summary="Liveness and database check")
async def health(db: NamedDependency[Database]) -> Response[Health]:
    ok = await db.ping()
    body = Health(status="ok" if ok else "unavailable", database="ok" if ok else "unavailable")
    return Response(content=_encode(body), status_code=200 if ok else 503, media_type=JSON,
                    headers=None if ok else {"Retry-After": "2"})


@get("/version", responses=ERRORS, operation_id="version", tags=["diagnostics"], security=[], summary="Service and schema version")
async def version() -> Version:
    return Version(version=__version__, schema=schema.latest_migration())


@post("/bench/baseline", responses=ERRORS, status_code=202, include_in_schema=False)
async def bench_baseline(request: Request[Any, Any, Any], db: NamedDependency[Database]) -> Response[Any]:
    """The benchmark's baseline: one INSERT of the same payload (only with DISPATCHER_BENCH_BASELINE=1)."""
    row = await db.one("insert into bench_baseline (payload) values (%s::jsonb) returning id", (await _body_text(request),))
    return _json(f'{{"id": {row[0] if row else 0}}}', 202)


def create_app(settings: Settings, *, debug: bool = False) -> Litestar:
    db = Database(settings.database_url, min_size=settings.pool_min, max_size=settings.pool_max)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await db.open()
        metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port) if settings.metrics_port else None
        try:
            yield
        finally:
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            await db.close()

    metrics.register_queue_health(settings.database_url)
    prometheus = PrometheusConfig(app_name="dispatcher", prefix="dispatcher_http", group_path=True,
                                  exclude=["/metrics"])
    # Every /internal route is guarded by the API key check, which runs before the body is read (require_key).
    # The notification routes take the bulk body limit (a fan-out, a batch); submit holds a single intent to the
    # ordinary one itself; every other route has the ordinary limit (the app's).
    guarded: dict[str, Any] = {"dependencies": {"tenant": Provide(authenticate)}, "guards": [require_key],
                               "security": [{"BearerAuth": []}]}
    bulk = Router(path="/internal", route_handlers=[Notifications], request_max_body_size=settings.max_bulk_body_bytes, **guarded)
    internal = Router(path="/internal", route_handlers=[Callbacks, Recipients, Templates, Channels, Mock], **guarded)
    public = Router(path="/public", route_handlers=[receive_webhook, verify_webhook, unsubscribe_page, unsubscribe])
    plugins = []
    if tracing.enabled:
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/metrics", "/health"])))
    return Litestar(
        plugins=plugins,
        route_handlers=[bulk, internal, public, health, version,
                        *([bench_baseline] if settings.bench_baseline else [])],
        middleware=[request_ids.middleware, prometheus.middleware],
        dependencies={"db": Provide(provide_db)},
        state=State({"db": db, "webhook_adapters": webhook_adapters(settings), "settings": settings}),
        lifespan=[lifespan],
        exception_handlers={Exception: problems.handle},
        request_max_body_size=settings.max_body_bytes,
        debug=debug,
        logging_config=None,  # dispatcher.logs owns logging (JSON, masked)
        openapi_config=OpenAPIConfig(
            title="notification-dispatcher", version=__version__, path=reference.SCHEMA_PATH,
            description="Multi-channel notification dispatcher. /internal routes take Authorization: Bearer <API key>.",
            components=Components(security_schemes={"BearerAuth": SecurityScheme(type="http", scheme="bearer")}),
            render_plugins=[reference.LocalSwaggerPlugin()],  # Swagger UI served from the service itself: no CDN
        ),
    )


def app_from_env() -> Litestar:
    """Factory for `uvicorn --factory api.app:app_from_env`."""
    from dispatcher import logs

    settings = Settings.from_env()
    logs.configure(settings.log_level)
    tracing.setup("dispatcher-api")
    try:
        return create_app(settings)
    except ConfigurationError as exc:
        raise SystemExit(f"dispatcher api: configuration error: {exc}") from None
