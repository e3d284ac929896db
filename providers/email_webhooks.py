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
import math
import time
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from providers.base import (
    ConfigurationError,
    DeploymentKeyed,
    ParsedWebhook,
    ProviderKind,
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


def _when(ts: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC) if not isinstance(ts, bool) else None
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _fresh(ts: str, tolerance: int) -> None:
    """Only a finite number is a time: "nan" compares false with everything (it would always look fresh)."""
    try:
        value = float(ts)
    except ValueError:
        raise WebhookRejected("timestamp is not a number") from None
    if not math.isfinite(value) or abs(time.time() - value) > tolerance:
        raise WebhookRejected("timestamp outside the tolerance")


# SendGrid drops for a reason on the recipient's side (its suppression lists): suppressed. Every other reason
# ("Invalid SMTPAPI header", "Invalid", ...) is ours to fix: failed (provider-protocols.md §3, the status table).
SUPPRESSION_REASONS = frozenset({"unsubscribed address", "bounced address", "spam reporting address"})


class SendGridWebhooks(DeploymentKeyed):
    provider = "sendgrid"

    def __init__(self, verification_key: str | None, tolerance_seconds: int = 300) -> None:
        # Read as SendGrid's libraries read it: base64 DER of the P-256 public key (PEM armour tolerated).
        self._key = None
        if verification_key:
            der = "".join(line for line in verification_key.strip().splitlines() if not line.startswith("-----"))
            try:
                key = load_der_public_key(base64.b64decode(der, validate=True))
            except ValueError:
                raise ConfigurationError("DISPATCHER_SENDGRID_VERIFICATION_KEY is not a base64 DER public key") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ConfigurationError("DISPATCHER_SENDGRID_VERIFICATION_KEY is not an elliptic-curve (P-256) key")
            self._key = key
        self._tolerance = tolerance_seconds

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        if self._key is None:
            raise WebhookRejected("SendGrid webhooks are not configured (DISPATCHER_SENDGRID_VERIFICATION_KEY)", status=404)
        headers, body = request.headers, request.body
        signature = headers.get("x-twilio-email-event-webhook-signature", "")
        timestamp = headers.get("x-twilio-email-event-webhook-timestamp", "")
        if not signature or not timestamp:
            raise WebhookRejected("missing SendGrid signature headers")
        _fresh(timestamp, self._tolerance)
        try:
            self._key.verify(base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise WebhookRejected("SendGrid signature does not verify") from None
        key = body_key(body)
        return salvage(body, key, lambda payload: self._parse(key, payload))

    def _parse(self, key: str, items: Any) -> ParsedWebhook:
        if not isinstance(items, list):
            return ParsedWebhook(
                event_key=key, payload=items, events=[], notes=["SendGrid posts a JSON array of events: nothing applied"]
            )
        events: list[StatusEvent] = []
        notes: list[str] = []
        for i, item in enumerate(items):
            try:
                event = self._event(item) if isinstance(item, dict) else None
                if not isinstance(item, dict):
                    notes.append(f"[{i}] not an object: not applied")
            except Exception as exc:  # noqa: BLE001 - one bad event is kept with its reason; the others apply
                notes.append(f"[{i}] not parsed: {why(exc)}")
                continue
            if event is not None:
                events.append(event)
        return ParsedWebhook(event_key=key, payload=items, events=events, notes=notes)

    @staticmethod
    def _event(item: dict[str, Any]) -> StatusEvent | None:
        tenant_id, delivery_id = parse_correlation_id(item.get("nd_correlation"))
        common = {
            "tenant_id": tenant_id,
            "delivery_id": delivery_id,
            "occurred_at": _when(item.get("timestamp")),
            "provider_message_id": (text(item.get("smtp-id"), 500) or "").strip("<>") or None,
        }
        kind = item.get("event")
        reason = text(item.get("reason"), 500) or text(item.get("response"), 500)
        if kind == "processed":
            return StatusEvent(status="sent", **common)
        if kind == "delivered":
            return StatusEvent(status="delivered", **common)
        if kind == "bounce":
            return StatusEvent(
                status="bounced", error_code=f"sendgrid_{text(item.get('type'), 50) or 'bounce'}", error_message=reason, **common
            )
        if kind == "dropped":
            suppressed = (text(item.get("reason")) or "").strip().lower() in SUPPRESSION_REASONS
            return StatusEvent(
                status="suppressed" if suppressed else "failed", error_code="sendgrid_dropped", error_message=reason, **common
            )
        flag = {
            "open": "opened",
            "click": "clicked",
            "spamreport": "complained",
            "unsubscribe": "unsubscribed",
            "group_unsubscribe": "unsubscribed",
        }.get(str(kind))
        return StatusEvent(status=None, flag=flag, **common) if flag else None


class _Signature(msgspec.Struct):
    timestamp: str
    token: str
    signature: str


class _Mailgun(msgspec.Struct):
    """Only the signature is decoded strictly (it is what is verified); the rest is parsed after verification."""

    signature: _Signature


class MailgunWebhooks(DeploymentKeyed):
    provider = "mailgun"

    def __init__(self, signing_key: str | None, tolerance_seconds: int = 300) -> None:
        self._key = signing_key
        self._tolerance = tolerance_seconds

    def parse(self, request: WebhookRequest) -> ParsedWebhook:
        if not self._key:
            raise WebhookRejected("Mailgun webhooks are not configured (DISPATCHER_MAILGUN_SIGNING_KEY)", status=404)
        body = request.body
        try:
            payload = msgspec.json.decode(body, type=_Mailgun)
        except msgspec.DecodeError:
            raise WebhookRejected("missing or malformed Mailgun signature") from None
        sig = payload.signature
        expected = hmac.new(self._key.encode(), (sig.timestamp + sig.token).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), sig.signature.encode()):
            raise WebhookRejected("Mailgun signature does not verify")
        _fresh(sig.timestamp, self._tolerance)
        key = "token:" + sig.token if len(sig.token) <= 400 else body_key(body)
        return salvage(body, key, lambda whole: self._parse(key, whole))

    @staticmethod
    def _parse(key: str, whole: Any) -> ParsedWebhook:
        data = obj(obj(whole).get("event-data"))
        if not data:
            return ParsedWebhook(event_key=key, payload=whole, events=[], notes=["no event-data object: nothing applied"])
        tenant_id, delivery_id = parse_correlation_id(obj(data.get("user-variables")).get("nd_correlation"))
        message_id = text(obj(obj(data.get("message")).get("headers")).get("message-id"), 500)
        common = {
            "tenant_id": tenant_id,
            "delivery_id": delivery_id,
            "occurred_at": _when(data.get("timestamp")),
            "provider_message_id": message_id.strip("<>") if message_id else None,
        }
        kind = data.get("event")
        status = obj(data.get("delivery-status"))
        reason = text(status.get("message"), 500) or text(status.get("description"), 500) or text(data.get("reason"), 500)
        event: StatusEvent | None = None
        if kind == "accepted":
            event = StatusEvent(status="sent", **common)
        elif kind == "delivered":
            event = StatusEvent(status="delivered", **common)
        elif kind == "failed" and data.get("severity") == "permanent":
            suppressed = (text(data.get("reason")) or "").startswith("suppress-")
            code = text(status.get("code"), 50) or text(data.get("reason"), 50) or "failed"
            event = StatusEvent(
                status="suppressed" if suppressed else "bounced", error_code=f"mailgun_{code}", error_message=reason, **common
            )
        elif kind == "rejected":
            event = StatusEvent(status="failed", error_code="mailgun_rejected", error_message=reason, **common)
        elif kind in ("opened", "clicked", "complained", "unsubscribed"):
            event = StatusEvent(status=None, flag=str(kind), **common)
        return ParsedWebhook(event_key=key, payload=whole, events=[event] if event else [])


# Webhook-only kinds: an ESP's delivery reports for mail the tenant's SMTP relay (that ESP's) sent.
SENDGRID = ProviderKind(
    name="sendgrid",
    channels=("email",),
    webhooks=(Webhook("sendgrid", lambda s: SendGridWebhooks(s.sendgrid_verification_key, s.webhook_tolerance_seconds)),),
    reads=("sendgrid_verification_key", "webhook_tolerance_seconds"),
)
MAILGUN = ProviderKind(
    name="mailgun",
    channels=("email",),
    webhooks=(Webhook("mailgun", lambda s: MailgunWebhooks(s.mailgun_signing_key, s.webhook_tolerance_seconds)),),
    reads=("mailgun_signing_key", "webhook_tolerance_seconds"),
)
