"""WhatsApp Cloud API (Meta Graph API): sending, and its webhooks.

Sending: POST {base_url}/{api_version}/{phone_number_id}/messages with the tenant's access token; our
correlation id travels as biz_opaque_callback_data; the returned wamid is the provider message id.
Outbound pacing per phone number goes through a token bucket in Postgres, shared by every worker process.
Errors are classified by Meta's error.code (not the HTTP status); a request that may have left us without
an answer is `unknown`, never resent blindly.

Webhooks: the GET verification handshake, X-Hub-Signature-256 over the raw body (HMAC-SHA256 with the app
secret), statuses (sent, delivered, read, failed with errors, and their pricing) and inbound messages (24-hour window,
opt-out keywords), in Meta's 2026 shapes: a user may be named by a business-scoped user id (BSUID, `user_id`,
`recipient_user_id`) with or without a phone number. Account-level changes (`user_id_update`,
`template_category_update`, `business_capability_update`) become normalized updates for the database.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec

from dispatcher.callback_urls import UnsafeUrl
from providers.base import (
    DeploymentKeyed,
    InboundMessage,
    Message,
    ParsedWebhook,
    ProviderContext,
    ProviderKind,
    SendResult,
    StatusEvent,
    Webhook,
    WebhookRejected,
    WebhookRequest,
    body_key,
    obj,
    parse_correlation_id,
    salvage,
    text,
    why,
)
from providers.secrets import Endpoint, Grants, SecretMissing, endpoint, resolve

NAME = "whatsapp_cloud"
log = logging.getLogger("providers.whatsapp")

# Meta's error codes by what we do about them (provider-protocols.md §1.4).
RETRY_SOON = {1, 2, 131000, 131016, 130429, 133004}
RETRY_LATER = {4, 80007, 131057}
PAIR_RATE = {131056}
OPTED_OUT = {131050}
# Per-user marketing limit (whatsapp-2026.md §4): adaptive, "avoid immediate retry": tried again a day later.
MARKETING_LIMIT = {131049}
MARKETING_LIMIT_RETRY_SECONDS = 86400.0
BSUID = re.compile(r"^[A-Z][A-Z]\.([A-Z]+\.)?[A-Za-z0-9]+$")  # notify._is_bsuid
MAX_RATE = 1000.0  # messages per second per number: Meta's upgraded throughput (whatsapp-2026.md §1); default 80
CONFIGURATION = {0, 190, 3, 10}  # auth and permissions: keep the message, retry while an operator fixes it
# Account-level errors (provider-protocols.md §1.4: "circuit-break channel; alert"): the business account is locked
# or restricted for policy (131031, 368), has a payment issue (131042), its number's certificate or registration is
# wrong (131045, 133xxx but 133004, which is a temporary outage). Nothing is wrong with the message: handled as
# an invalid token is, the message kept and retried while an operator fixes the account.
ACCOUNT = {131031, 131042, 131045, 368}


def account_level(code: int | None) -> bool:
    return code is not None and (
        code in ACCOUNT or code in CONFIGURATION or 200 <= code <= 299 or (133000 <= code <= 133999 and code not in RETRY_SOON)
    )


def classify(code: int | None, title: str, http_status: int) -> SendResult:
    """A Graph API error response as an attempt outcome."""
    error_code = f"whatsapp_{code}" if code is not None else f"http_{http_status}"
    if code in RETRY_SOON:
        return SendResult(outcome="retry", provider=NAME, error_code=error_code, error_message=title, retry_after_seconds=1.0)
    if code in RETRY_LATER:
        return SendResult(outcome="retry", provider=NAME, error_code=error_code, error_message=title, retry_after_seconds=60.0)
    if code in PAIR_RATE:
        return SendResult(outcome="retry", provider=NAME, error_code=error_code, error_message=title, retry_after_seconds=6.0)
    if code in MARKETING_LIMIT:
        return SendResult(
            outcome="retry",
            provider=NAME,
            error_code=error_code,
            error_message=title,
            retry_after_seconds=MARKETING_LIMIT_RETRY_SECONDS,
        )
    if code in OPTED_OUT:
        return SendResult(outcome="suppressed", provider=NAME, error_code=error_code, error_message=title)
    if account_level(code):
        log.error("whatsapp account or credentials need an operator", extra={"error_code": error_code})
        # Refused with a Graph error object (token, permissions, account): Meta accepted nothing.
        return SendResult(
            outcome="retry", provider=NAME, error_code=error_code, error_message=title, retry_after_seconds=300.0, not_sent=True
        )
    if code is None and http_status >= 500:
        # No Meta error object: we cannot tell whether the message was accepted.
        return SendResult(outcome="unknown", provider=NAME, error_code=error_code, error_message=title or "server error")
    return SendResult(outcome="failed", provider=NAME, error_code=error_code, error_message=title)


def is_bsuid(value: str | None) -> bool:
    return bool(value) and len(value or "") <= 140 and BSUID.match(value or "") is not None


def request_body(message: Message) -> dict[str, Any]:
    rendered = message.rendered
    # A business-scoped user id goes in `recipient` (Meta's 2026 Messages API; `to` would win if both were given), a
    # phone number in `to`.
    address = {"recipient": message.address} if is_bsuid(message.address) else {"to": message.address.lstrip("+")}
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        **address,
        "biz_opaque_callback_data": message.correlation_id,
    }
    if "template" in rendered:
        template: dict[str, Any] = {"name": rendered["template"], "language": {"code": rendered["language"]}}
        components: list[dict[str, Any]] = []
        if rendered.get("header_parameters"):
            components.append(
                {"type": "header", "parameters": [{"type": "text", "text": p} for p in rendered["header_parameters"]]}
            )
        if rendered["parameters"]:
            components.append({"type": "body", "parameters": [{"type": "text", "text": p} for p in rendered["parameters"]]})
        for button in rendered.get("buttons") or []:
            parameter = (
                {"type": "payload", "payload": button["value"]}
                if button["sub_type"] == "quick_reply"
                else {"type": "text", "text": button["value"]}
            )
            components.append(
                {"type": "button", "sub_type": button["sub_type"], "index": str(button["index"]), "parameters": [parameter]}
            )
        if components:
            template["components"] = components
        body.update(type="template", template=template)
    else:
        body.update(type="text", text={"preview_url": False, "body": rendered["text"]})
    return body


class WhatsAppCloud:
    """One tenant's business number."""

    name = NAME

    def __init__(
        self, settings: dict[str, Any], secrets: dict[str, str], ctx: ProviderContext, grants: Grants | None = None
    ) -> None:
        self._settings = settings
        self._token_ref = secrets.get("access_token")
        self._grants = grants or Grants()
        self._ctx = ctx
        self._phone = str(settings["phone_number_id"])
        # Meta: 80 messages per second per number by default, up to 1,000 once upgraded (20 for a coexistence number):
        # the number's configured rate, within that.
        self._rate = min(MAX_RATE, float(settings.get("rate_per_second") or 80))
        base = str(settings.get("base_url") or "https://graph.facebook.com").rstrip("/")
        self._url = f"{base}/{settings.get('api_version') or 'v22.0'}/{self._phone}/messages"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(float(settings.get("timeout_seconds") or 15), connect=5.0),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    async def _paced(self, count: int) -> None:
        """Waits until `count` sends fit in this number's shared budget."""
        while count > 0:
            granted = await self._ctx.take_tokens(f"whatsapp:{self._phone}", self._rate, count)
            count -= granted
            if count > 0:
                await asyncio.sleep(min(1.0, max(0.01, min(count, self._rate) / self._rate)))

    async def _target(self) -> tuple[str, dict[str, str], dict[str, Any] | None]:
        """The URL to post to, pinned to the address that passed the endpoint check (no DNS rebinding in between)."""
        scheme, address, port = await endpoint(self._url, self._grants)
        parts = urlsplit(self._url)
        literal = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((scheme, f"{literal}:{port}", parts.path, parts.query, ""))
        return pinned, {"host": parts.netloc}, {"sni_hostname": parts.hostname} if scheme == "https" else None

    async def _one(self, message: Message, token: str, target: tuple[str, dict[str, str], dict[str, Any] | None]) -> SendResult:
        url, headers, extensions = target
        try:
            response = await self._client.post(
                url, json=request_body(message), headers={**headers, "Authorization": f"Bearer {token}"}, extensions=extensions
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Never left us: safe to retry.
            return SendResult(
                outcome="retry", provider=NAME, error_code="connect_failed", error_message=type(exc).__name__, not_sent=True
            )
        except httpx.HTTPError as exc:
            # The request may have reached Meta: no blind resend on WhatsApp.
            return SendResult(outcome="unknown", provider=NAME, error_code="no_response", error_message=type(exc).__name__)
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code < 300 and isinstance(payload, dict) and payload.get("messages"):
            return SendResult(outcome="sent", provider=NAME, provider_message_id=str(payload["messages"][0]["id"]))
        error = payload.get("error") if isinstance(payload, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        title = str((error or {}).get("message") or (error or {}).get("error_user_title") or response.reason_phrase)
        if response.status_code < 300:
            return SendResult(
                outcome="unknown", provider=NAME, error_code="unexpected_response", error_message="2xx without a message id"
            )
        return classify(int(code) if isinstance(code, int | str) and str(code).isdigit() else None, title, response.status_code)

    async def send_many(self, messages: list[Message]) -> list[SendResult]:
        # The endpoint first, then the token: a token is never read for, let alone sent to, a host that fails the check.
        try:
            target = await self._target()
        except UnsafeUrl as exc:
            log.error("whatsapp endpoint refused", extra={"phone_number_id": self._phone, "reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code="unsafe_endpoint",
                    error_message=str(exc),
                    retry_after_seconds=300.0,
                    not_sent=True,
                )
                for _ in messages
            ]
        try:
            token = resolve(self._token_ref, self._grants) or ""
        except SecretMissing as exc:
            log.error("whatsapp access token unavailable", extra={"phone_number_id": self._phone, "reason": str(exc)})
            return [
                SendResult(
                    outcome="retry",
                    provider=NAME,
                    error_code=exc.code,
                    error_message=str(exc),
                    retry_after_seconds=300.0,
                    not_sent=True,
                )
                for _ in messages
            ]
        results: list[SendResult] = []
        step = max(1, int(self._rate))
        for start in range(0, len(messages), step):
            chunk = messages[start : start + step]
            await self._paced(len(chunk))
            results.extend(await asyncio.gather(*(self._one(m, token, target) for m in chunk)))
        return results

    async def aclose(self) -> None:
        await self._client.aclose()


# --- webhooks -------------------------------------------------------------------------------------------


def signature(app_secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def verify_handshake(params: dict[str, str], verify_token: str | None) -> str | None:
    """The hub.challenge to echo if the GET verification request is ours, else None."""
    if not verify_token or params.get("hub.mode") != "subscribe":
        return None
    offered = params.get("hub.verify_token", "")
    if not hmac.compare_digest(offered.encode(), verify_token.encode()):
        return None
    return params.get("hub.challenge", "")


class _Error(msgspec.Struct):
    code: int | None = None
    title: str | None = None
    message: str | None = None


class _Status(msgspec.Struct):
    id: str
    status: str
    timestamp: str | None = None
    recipient_id: str | None = None  # the phone number (wa_id); optional since 2026
    recipient_user_id: str | None = None  # the business-scoped user id
    recipient_parent_user_id: str | None = None
    biz_opaque_callback_data: str | None = None
    errors: list[_Error] = []
    pricing: dict[str, Any] | None = None


def _pricing(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Meta's status pricing, the fields we keep ({pricing_model, category, billable, type}); None without one."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {k: text(raw.get(k), 40) for k in ("pricing_model", "category", "type") if text(raw.get(k), 40)}
    if isinstance(raw.get("billable"), bool):
        out["billable"] = raw["billable"]
    return out or None


def _user_id(value: Any) -> str | None:
    candidate = text(value, 140)
    return candidate if is_bsuid(candidate) else None


STATUSES = {"sent", "delivered", "read", "failed"}
# Inbound types that carry what the user typed or tapped (opt-out keywords are matched against it). `system`
# messages (the user changed their number) are WhatsApp's, not the user's: they open no 24-hour window.
NOT_FROM_THE_USER = {"system", "unsupported", "errors"}


def _inbound_text(m: dict[str, Any]) -> str | None:
    kind = m.get("type")
    if kind == "text":
        return text(obj(m.get("text")).get("body"), 4096)
    if kind == "button":
        button = obj(m.get("button"))
        return text(button.get("text")) or text(button.get("payload"))
    if kind == "interactive":
        interactive = obj(m.get("interactive"))
        reply = obj(interactive.get("button_reply")) or obj(interactive.get("list_reply"))
        return text(reply.get("title")) or text(reply.get("id"))
    return None


def _time(ts: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(int(ts), dt.UTC) if ts and ts.isascii() and ts.isdigit() else None
    except (ValueError, OverflowError, OSError):
        return None


class WhatsAppWebhooks(DeploymentKeyed):
    """POST /public/webhooks/whatsapp: X-Hub-Signature-256 with any configured app secret; GET: Meta's subscription
    handshake with the verify token."""

    provider = NAME

    def __init__(self, app_secrets: list[str], verify_token: str | None = None) -> None:
        self._secrets = app_secrets
        self._verify_token = verify_token

    def handshake(self, params: Mapping[str, str]) -> str | None:
        return verify_handshake(dict(params), self._verify_token)

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        if not self._secrets:
            raise WebhookRejected("WhatsApp webhooks are not configured (DISPATCHER_WHATSAPP_APP_SECRET)", status=404)
        body = request.body
        offered = request.headers.get("x-hub-signature-256", "")
        if not offered.startswith("sha256="):
            raise WebhookRejected("missing X-Hub-Signature-256")
        if not any(hmac.compare_digest(signature(s, body).encode(), offered.encode()) for s in self._secrets):
            raise WebhookRejected("X-Hub-Signature-256 does not match")
        key = body_key(body)  # Meta has no event id; a retried POST carries the same bytes.
        return salvage(body, key, lambda payload: self._parse(key, payload))

    @staticmethod
    def _parse(key: str, payload: Any) -> ParsedWebhook:
        """Each status, message and change is parsed alone: a bad one is kept with its reason, the others apply."""
        events: list[StatusEvent] = []
        inbound: list[InboundMessage] = []
        notes: list[str] = []
        updates: list[dict[str, Any]] = []
        entries = obj(payload).get("entry")
        for e, entry in enumerate(entries if isinstance(entries, list) else []):
            waba_id = text(obj(entry).get("id"), 64)
            changes = obj(entry).get("changes")
            for c, change in enumerate(changes if isinstance(changes, list) else []):
                field = obj(change).get("field")
                value = obj(obj(change).get("value"))
                phone_number_id = text(obj(value.get("metadata")).get("phone_number_id"), 64) or ""
                where = f"entry[{e}].changes[{c}]"
                if field in ("user_id_update", "template_category_update", "business_capability_update"):
                    updates.extend(_account_updates(field, value, phone_number_id, waba_id, where, notes))
                    continue
                statuses, messages = value.get("statuses"), value.get("messages")
                contacts = (
                    [obj(x) for x in value.get("contacts") or [] if isinstance(x, dict)]
                    if isinstance(value.get("contacts"), list)
                    else []
                )
                for i, raw in enumerate(statuses if isinstance(statuses, list) else []):
                    at = f"{where}.statuses[{i}]"
                    try:
                        s = msgspec.convert(raw, _Status, strict=False)
                    except msgspec.ValidationError as exc:
                        notes.append(f"{at} not parsed: {why(exc)}")
                        continue
                    if s.status not in STATUSES:
                        continue
                    tenant_id, delivery_id = parse_correlation_id(s.biz_opaque_callback_data)
                    error = s.errors[0] if s.errors else None
                    if error is not None and s.status == "failed" and account_level(error.code):
                        log.error("whatsapp account needs an operator", extra={"error_code": f"whatsapp_{error.code}"})
                        notes.append(
                            f"{at}: account-level error whatsapp_{error.code} (configuration, not this "
                            "message's failure): not applied"
                        )
                        continue
                    status = "suppressed" if error and error.code in OPTED_OUT else s.status
                    phone = text(s.recipient_id, 64)
                    events.append(
                        StatusEvent(
                            status=status,
                            tenant_id=tenant_id,
                            delivery_id=delivery_id,
                            provider_message_id=s.id[:500],
                            occurred_at=_time(s.timestamp),
                            error_code=f"whatsapp_{error.code}" if error and error.code else None,
                            error_message=text(error.title or error.message) if error else None,
                            user_id=_user_id(s.recipient_user_id),
                            recipient_phone=phone if phone and phone.isdigit() else None,
                            pricing=_pricing(s.pricing),
                        )
                    )
                for i, m in enumerate(messages if isinstance(messages, list) else []):
                    at = f"{where}.messages[{i}]"
                    m = obj(m)
                    message_id, sender = text(m.get("id"), 500), text(m.get("from"), 64)
                    # 2026: a user with a username may come with a business-scoped user id and no phone number.
                    user_id = _user_id(m.get("user_id")) or _user_id(m.get("from_user_id"))
                    if user_id is None:
                        matching = [x for x in contacts if sender and text(x.get("wa_id"), 64) == sender] or (
                            contacts if len(contacts) == 1 else []
                        )
                        user_id = _user_id(matching[0].get("user_id")) if matching else None
                    if not message_id or not (sender or user_id):
                        notes.append(f"{at}: no id or sender: not applied")
                        continue
                    if m.get("type") in NOT_FROM_THE_USER:
                        notes.append(f"{at}: {m.get('type')} message: not from the user, opens no window")
                        continue
                    inbound.append(
                        InboundMessage(
                            to=phone_number_id,
                            sender=sender if sender and not is_bsuid(sender) else None,
                            message_id=message_id,
                            text=_inbound_text(m),
                            received_at=_time(text(m.get("timestamp"))),
                            sender_user_id=user_id or (sender if is_bsuid(sender) else None),
                        )
                    )
        return ParsedWebhook(event_key=key, payload=payload, events=events, inbound=inbound, notes=notes, updates=updates)


TIER_FIELDS = ("whatsapp_business_manager_messaging_limit", "max_daily_conversations_per_business", "messaging_limit_tier")


def _account_updates(
    field: str, value: dict[str, Any], phone_number_id: str, waba_id: str | None, where: str, notes: list[str]
) -> list[dict[str, Any]]:
    """A change of `field` as normalized updates for notify._apply_whatsapp_update ({kind, phone_number_id?, waba_id?, ...})."""
    base = {"phone_number_id": phone_number_id or None, "waba_id": waba_id}
    if field == "user_id_update":
        # Read tolerantly: a list of {wa_id?, user_id: {previous, current}} or {previous_user_id, user_id|new_user_id}.
        items = value.get("user_id_update")
        items = items if isinstance(items, list) else [value]
        out = []
        for i, raw in enumerate(items):
            item = obj(raw)
            ids = obj(item.get("user_id"))
            new = _user_id(ids.get("current")) or _user_id(item.get("new_user_id")) or _user_id(item.get("user_id"))
            old = _user_id(ids.get("previous")) or _user_id(item.get("previous_user_id"))
            if new is None:
                notes.append(f"{where}.user_id_update[{i}]: no new business-scoped user id: not applied")
                continue
            wa_id = text(item.get("wa_id"), 64)
            out.append(
                {
                    **base,
                    "kind": "user_id_update",
                    "user_id": new,
                    "previous_user_id": old,
                    "wa_id": wa_id if wa_id and wa_id.isdigit() else None,
                    "parent_user_id": _user_id(obj(item.get("parent_user_id")).get("current"))
                    or _user_id(item.get("parent_user_id")),
                }
            )
        return out
    if field == "template_category_update":
        name = text(value.get("message_template_name"), 512)
        if not name:
            notes.append(f"{where}: template_category_update without message_template_name: not applied")
            return []
        return [
            {
                **base,
                "kind": "template_category_update",
                "name": name,
                "language": text(value.get("message_template_language"), 16),
                "template_id": text(value.get("message_template_id"), 64),
                "previous_category": (text(value.get("previous_category"), 40) or "").lower() or None,
                "new_category": (text(value.get("new_category"), 40) or "").lower() or None,
                "correct_category": (text(value.get("correct_category"), 40) or "").lower() or None,
                "category_update_timestamp": text(value.get("category_update_timestamp"), 40),
            }
        ]
    tier = next((text(value.get(k), 40) for k in TIER_FIELDS if text(value.get(k), 40)), None)
    if tier is None and value.get("max_daily_conversation_per_phone") is not None:
        tier = text(value.get("max_daily_conversation_per_phone"), 40)
    return [{**base, "kind": "messaging_tier", "tier": tier, "payload": value}]


KIND = ProviderKind(
    name=NAME,
    channels=("whatsapp",),
    make=lambda c, ctx: WhatsAppCloud(c.settings, c.secrets, ctx, c.grants),
    webhooks=(Webhook("whatsapp", lambda s: WhatsAppWebhooks(s.whatsapp_app_secrets, s.whatsapp_verify_token)),),
    endpoint=Endpoint("base_url"),
    reads=("whatsapp_app_secrets", "whatsapp_verify_token"),
)
