"""/public: provider webhooks (verified over the raw body), WhatsApp's verification handshake, and one-click
unsubscribe. No API key: each route verifies its caller itself."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from psycopg.types.json import Jsonb

from api.db import Database
from api.problems import ProblemException
from api.routes.common import ERRORS, encode, json_response
from api.schemas import WebhookAck
from dispatcher import metrics
from providers.base import Handshake, WebhookRejected, WebhookRequest, webhook_url
from providers.registry import webhooks_needing_public_url
from providers.unsubscribe import check_token

log = logging.getLogger("api")

INGEST = (
    "select notify_api.ingest_webhook_v1(%s, %s, %s, "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r), "
    "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r), %s::text[], %s::jsonb)::text"
)


@post(
    "/webhooks/{provider:str}",
    responses=ERRORS,
    operation_id="receiveWebhook",
    status_code=200,
    tags=["webhooks"],
    summary="Provider status reports",
    security=[],
    description="Verified over the raw body before anything is parsed; stored once per provider event; applied by rank.",
)
async def receive_webhook(
    request: Request[Any, Any, Any], provider: FromPath[str], db: NamedDependency[Database], state: State
) -> Response[WebhookAck]:
    adapter = state.webhook_adapters.get(provider)
    if adapter is None:
        raise ProblemException(404, "not_found", f"no webhook endpoint for provider {provider}", "provider")
    body = await request.body()
    headers = {k.lower(): v for k, v in request.headers.items()}
    query = request.scope.get("query_string", b"").decode("latin-1")
    public_url = state.settings.public_url
    # The URL as the provider requested it, from the configured public URL (never the Host header): what a provider that
    # signs the URL (Twilio) signed.
    hook = WebhookRequest(
        headers=headers, body=body, query=query, url=webhook_url(public_url, provider, query) if public_url else None
    )
    try:
        # The same two steps for every provider: whose tenant keys to verify with (None: the deployment's own secrets),
        # then verify over the raw bytes and parse.
        hints = adapter.key_hints(hook)
        if hints is not None:
            row = await db.one("select notify_api.webhook_keys_v1(%s, %s)::text", (adapter.provider, Jsonb(hints)))
            hook = dataclasses.replace(hook, keys=tuple(msgspec.json.decode(row[0]) if row and row[0] else ()))
        parsed = adapter.parse(hook)
    except WebhookRejected as exc:
        metrics.WEBHOOKS.labels(provider, "rejected").inc()
        if hook.url is None and provider in webhooks_needing_public_url():
            # An operator's fix, not a forged request: said as an error, once per request.
            log.error(
                "webhook cannot be verified: DISPATCHER_PUBLIC_URL is not set", extra={"provider": provider, "reason": exc.reason}
            )
        else:
            log.warning("webhook rejected", extra={"provider": provider, "reason": exc.reason})
        raise ProblemException(exc.status, "webhook_rejected", exc.reason) from None
    # Verified from here on: the provider gets 200 whatever the payload holds (a 4xx or 5xx makes it retry for hours
    # and then drop the event); what cannot be applied is stored with its reason.
    event_key = (
        parsed.event_key if len(parsed.event_key) <= 500 else "sha256:" + hashlib.sha256(parsed.event_key.encode()).hexdigest()
    )
    try:
        row = await db.one(
            INGEST,
            (
                adapter.provider,
                event_key,
                Jsonb(parsed.payload),
                Jsonb(msgspec.to_builtins(parsed.events)),
                Jsonb(msgspec.to_builtins(parsed.inbound)),
                parsed.notes,
                Jsonb(parsed.updates),
            ),
        )
    except (psycopg.Error, ValueError) as exc:
        if isinstance(exc, psycopg.OperationalError):
            raise  # the database is down: 503, and the provider retries later
        # Something in the events does not fit the database (a value out of range, a NUL): store the event alone.
        log.warning("webhook events not applied", extra={"provider": provider, "error": type(exc).__name__})
        notes = [*parsed.notes, f"events not applied: {getattr(exc, 'sqlstate', None) or type(exc).__name__}"]
        row = await db.one(INGEST, (adapter.provider, event_key, Jsonb(parsed.payload), Jsonb([]), Jsonb([]), notes, Jsonb([])))
    result = msgspec.json.decode(row[0]) if row else {}
    if result.get("duplicate"):
        metrics.WEBHOOKS.labels(provider, "duplicate").inc()
    for outcome in result.get("outcomes", []):
        metrics.WEBHOOKS.labels(provider, outcome.get("outcome", "unknown")).inc()
    # The status outcomes come first, one per event in order: what Meta says a message cost, counted once per delivery.
    for event, outcome in zip(parsed.events, result.get("outcomes", []), strict=False):
        if outcome.get("priced") and event.pricing:
            metrics.PRICED_MESSAGES.labels(
                provider,
                str(event.pricing.get("pricing_model") or ""),
                str(event.pricing.get("category") or ""),
                str(event.pricing.get("billable")).lower() if event.pricing.get("billable") is not None else "",
            ).inc()
    log.info(
        "webhook ingested",
        extra={
            "provider": provider,
            "duplicate": result.get("duplicate"),
            "outcomes": [o.get("outcome") for o in result.get("outcomes", [])],
        },
    )
    return json_response(encode(WebhookAck(stored=bool(result.get("stored")), duplicate=bool(result.get("duplicate")))).decode())


@get(
    "/webhooks/{provider:str}",
    responses=ERRORS,
    operation_id="verifyWebhook",
    tags=["webhooks"],
    security=[],
    media_type="text/plain",
    summary="WhatsApp webhook verification handshake",
    description="Meta's GET with hub.mode=subscribe, hub.verify_token and hub.challenge: the challenge is echoed if the "
    "token matches DISPATCHER_WHATSAPP_VERIFY_TOKEN, else 403.",
)
async def verify_webhook(request: Request[Any, Any, Any], provider: FromPath[str], state: State) -> Response[str]:
    adapter = state.webhook_adapters.get(provider)
    if not isinstance(adapter, Handshake):
        raise ProblemException(404, "not_found", f"no verification handshake for provider {provider}", "provider")
    challenge = adapter.handshake(dict(request.query_params))
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


@get(
    "/unsubscribe/{token:str}",
    responses=ERRORS,
    operation_id="unsubscribePage",
    tags=["unsubscribe"],
    security=[],
    media_type="text/html",
    summary="The page behind a List-Unsubscribe link",
    description="Changes nothing (link scanners fetch it); its button POSTs.",
)
async def unsubscribe_page(token: FromPath[str], state: State) -> Response[str]:
    _unsubscribe_target(state, token)
    return Response(content=_UNSUBSCRIBE_PAGE, media_type="text/html")


@post(
    "/unsubscribe/{token:str}",
    responses=ERRORS,
    operation_id="unsubscribe",
    tags=["unsubscribe"],
    security=[],
    status_code=200,
    summary="RFC 8058 one-click unsubscribe",
    description="Records an e-mail opt-out for the message's category.",
)
async def unsubscribe(token: FromPath[str], state: State, db: NamedDependency[Database]) -> Response[str]:
    tenant_id, delivery_id = _unsubscribe_target(state, token)
    await db.one("select notify_api.unsubscribe_v1(%s, %s)", (tenant_id, delivery_id))
    return Response(content="You are unsubscribed.", media_type="text/plain")
