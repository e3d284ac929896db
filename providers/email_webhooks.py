"""Delivery-status webhooks of e-mail service providers, each verified its own way.

- SendGrid Event Webhook: ECDSA P-256 / SHA-256 over timestamp + raw body, with the account's verification
  key (base64 DER); events in a JSON array; our correlation id returns as the custom arg nd_correlation.
- Mailgun: HMAC-SHA256(signing key, timestamp + token) in the body; the token is the dedup key (replays).
Both map to the unified vocabulary: sent, delivered, bounced, suppressed, failed, and flags opened, clicked,
complained (-> e-mail consent revoked), unsubscribed (-> revoked).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import time
from typing import Any
from uuid import UUID

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from providers.base import ParsedWebhook, StatusEvent, WebhookRejected


def _correlation(value: Any) -> tuple[UUID | None, UUID | None]:
    if isinstance(value, str) and value.count(":") == 1:
        try:
            tenant, delivery = value.split(":")
            return UUID(tenant), UUID(delivery)
        except ValueError:
            pass
    return None, None


def _when(ts: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC)
    except (TypeError, ValueError, OverflowError):
        return None


def _fresh(ts: str, tolerance: int) -> None:
    try:
        if abs(time.time() - float(ts)) > tolerance:
            raise WebhookRejected("timestamp outside the tolerance")
    except ValueError:
        raise WebhookRejected("timestamp is not a number") from None


SUPPRESSION_REASONS = ("unsubscribed address", "bounced address", "spam reporting address", "invalid")


class SendGridWebhooks:
    provider = "sendgrid"

    def __init__(self, verification_key: str | None, tolerance_seconds: int = 300) -> None:
        self._key = load_der_public_key(base64.b64decode(verification_key)) if verification_key else None
        self._tolerance = tolerance_seconds

    def parse(self, headers: dict[str, str], body: bytes) -> ParsedWebhook:
        if self._key is None:
            raise WebhookRejected("SendGrid webhooks are not configured (DISPATCHER_SENDGRID_VERIFICATION_KEY)", status=404)
        signature = headers.get("x-twilio-email-event-webhook-signature", "")
        timestamp = headers.get("x-twilio-email-event-webhook-timestamp", "")
        if not signature or not timestamp:
            raise WebhookRejected("missing SendGrid signature headers")
        _fresh(timestamp, self._tolerance)
        try:
            assert isinstance(self._key, ec.EllipticCurvePublicKey)
            self._key.verify(base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise WebhookRejected("SendGrid signature does not verify") from None
        try:
            items = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise WebhookRejected(f"invalid payload: {exc}", status=400) from None
        if not isinstance(items, list):
            raise WebhookRejected("SendGrid posts a JSON array of events", status=400)
        events = [e for e in (self._event(i) for i in items if isinstance(i, dict)) if e is not None]
        return ParsedWebhook(event_key="sha256:" + hashlib.sha256(body).hexdigest(), payload=items, events=events)

    @staticmethod
    def _event(item: dict[str, Any]) -> StatusEvent | None:
        tenant_id, delivery_id = _correlation(item.get("nd_correlation"))
        common = {"tenant_id": tenant_id, "delivery_id": delivery_id, "occurred_at": _when(item.get("timestamp")),
                  "provider_message_id": str(item.get("smtp-id") or "").strip("<>") or None}
        kind = item.get("event")
        reason = str(item.get("reason") or item.get("response") or "")[:500] or None
        if kind == "processed":
            return StatusEvent(status="sent", **common)
        if kind == "delivered":
            return StatusEvent(status="delivered", **common)
        if kind == "bounce":
            return StatusEvent(status="bounced", error_code=f"sendgrid_{item.get('type') or 'bounce'}", error_message=reason, **common)
        if kind == "dropped":
            suppressed = any(r in str(item.get("reason", "")).lower() for r in SUPPRESSION_REASONS)
            return StatusEvent(status="suppressed" if suppressed else "failed", error_code="sendgrid_dropped", error_message=reason, **common)
        flag = {"open": "opened", "click": "clicked", "spamreport": "complained", "unsubscribe": "unsubscribed",
                "group_unsubscribe": "unsubscribed"}.get(str(kind))
        return StatusEvent(status=None, flag=flag, **common) if flag else None


class _Signature(msgspec.Struct):
    timestamp: str
    token: str
    signature: str


class _Mailgun(msgspec.Struct, rename={"event_data": "event-data"}):
    signature: _Signature
    event_data: dict[str, Any] = {}


class MailgunWebhooks:
    provider = "mailgun"

    def __init__(self, signing_key: str | None, tolerance_seconds: int = 300) -> None:
        self._key = signing_key
        self._tolerance = tolerance_seconds

    def parse(self, headers: dict[str, str], body: bytes) -> ParsedWebhook:
        if not self._key:
            raise WebhookRejected("Mailgun webhooks are not configured (DISPATCHER_MAILGUN_SIGNING_KEY)", status=404)
        try:
            payload = msgspec.json.decode(body, type=_Mailgun)
        except msgspec.DecodeError:
            raise WebhookRejected("missing or malformed Mailgun signature") from None
        sig = payload.signature
        expected = hmac.new(self._key.encode(), (sig.timestamp + sig.token).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), sig.signature.encode()):
            raise WebhookRejected("Mailgun signature does not verify")
        _fresh(sig.timestamp, self._tolerance)
        data = payload.event_data
        tenant_id, delivery_id = _correlation((data.get("user-variables") or {}).get("nd_correlation"))
        message_id = ((data.get("message") or {}).get("headers") or {}).get("message-id")
        common = {"tenant_id": tenant_id, "delivery_id": delivery_id, "occurred_at": _when(data.get("timestamp")),
                  "provider_message_id": str(message_id).strip("<>") if message_id else None}
        kind = data.get("event")
        status = (data.get("delivery-status") or {})
        reason = str(status.get("message") or status.get("description") or data.get("reason") or "")[:500] or None
        event: StatusEvent | None = None
        if kind == "accepted":
            event = StatusEvent(status="sent", **common)
        elif kind == "delivered":
            event = StatusEvent(status="delivered", **common)
        elif kind == "failed" and data.get("severity") == "permanent":
            suppressed = str(data.get("reason", "")).startswith("suppress-")
            event = StatusEvent(status="suppressed" if suppressed else "bounced",
                                error_code=f"mailgun_{status.get('code') or data.get('reason') or 'failed'}", error_message=reason, **common)
        elif kind == "rejected":
            event = StatusEvent(status="failed", error_code="mailgun_rejected", error_message=reason, **common)
        elif kind in ("opened", "clicked", "complained", "unsubscribed"):
            event = StatusEvent(status=None, flag=str(kind), **common)
        return ParsedWebhook(event_key="token:" + sig.token, payload=msgspec.json.decode(body), events=[event] if event else [])
