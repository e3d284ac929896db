"""SendGrid (ECDSA P-256) and Mailgun (HMAC) webhooks: verification with locally generated keys, mapping,
and what the database does with them (delivered, bounced, complaint -> consent revoked)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from psycopg.types.json import Jsonb

from providers.base import WebhookRejected, WebhookRequest
from providers.email_webhooks import MailgunWebhooks, SendGridWebhooks
from tests.conftest import call, claim, intent, record, result, submit

TENANT, DELIVERY = uuid.uuid4(), uuid.uuid4()


class SendGridKeys:
    def __init__(self) -> None:
        self.private = ec.generate_private_key(ec.SECP256R1())
        der = self.private.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.verification_key = base64.b64encode(der).decode()

    def sign(self, body: bytes, timestamp: str | None = None) -> dict[str, str]:
        ts = timestamp or str(int(time.time()))
        sig = self.private.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "x-twilio-email-event-webhook-signature": base64.b64encode(sig).decode(),
            "x-twilio-email-event-webhook-timestamp": ts,
        }


def sendgrid_events(correlation: str, message_id: str = "<m1@runflow.example>") -> list[dict]:
    base = {"email": "ana@example.com", "timestamp": int(time.time()), "smtp-id": message_id, "nd_correlation": correlation}
    return [
        {**base, "event": "processed", "sg_event_id": "e1"},
        {**base, "event": "delivered", "sg_event_id": "e2"},
        {**base, "event": "open", "sg_event_id": "e3"},
        {**base, "event": "deferred", "sg_event_id": "e4"},
        {**base, "event": "bounce", "type": "bounce", "reason": "550 5.1.1 unknown", "sg_event_id": "e5"},
        {**base, "event": "spamreport", "sg_event_id": "e6"},
        {**base, "event": "dropped", "reason": "Unsubscribed Address", "sg_event_id": "e7"},
    ]


def test_sendgrid_events_verify_and_map():
    keys = SendGridKeys()
    body = json.dumps(sendgrid_events(f"{TENANT}:{DELIVERY}")).encode()
    parsed = SendGridWebhooks(keys.verification_key).parse(WebhookRequest(keys.sign(body), body))
    assert [(e.status, e.flag) for e in parsed.events] == [
        ("sent", None),
        ("delivered", None),
        (None, "opened"),
        ("bounced", None),
        (None, "complained"),
        ("suppressed", None),
    ]
    assert {(e.tenant_id, e.delivery_id, e.provider_message_id) for e in parsed.events} == {
        (TENANT, DELIVERY, "m1@runflow.example")
    }
    assert parsed.events[3].error_code == "sendgrid_bounce"


@pytest.mark.parametrize("tamper", ["forged", "tampered_body", "other_key", "stale", "missing", "reserialized"])
def test_sendgrid_forgeries_are_refused(tamper):
    keys = SendGridKeys()
    body = json.dumps(sendgrid_events("x:y")).encode()
    headers = keys.sign(body)
    if tamper == "forged":
        headers["x-twilio-email-event-webhook-signature"] = base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()
    elif tamper == "tampered_body":
        body = body.replace(b"delivered", b"delivereD")
    elif tamper == "other_key":
        headers = SendGridKeys().sign(body)
    elif tamper == "stale":
        headers = keys.sign(body, str(int(time.time()) - 3600))
    elif tamper == "missing":
        headers = {}
    elif tamper == "reserialized":
        body = json.dumps(json.loads(body), indent=2).encode()
    with pytest.raises(WebhookRejected) as info:
        SendGridWebhooks(keys.verification_key).parse(WebhookRequest(headers, body))
    assert info.value.status == 401


def mailgun_body(
    key: str, event: dict, timestamp: int | None = None, token: str | None = None, signature: str | None = None
) -> bytes:
    ts, tok = str(timestamp or int(time.time())), token or uuid.uuid4().hex
    sig = signature or hmac.new(key.encode(), (ts + tok).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"signature": {"timestamp": ts, "token": tok, "signature": sig}, "event-data": event}).encode()


def mailgun_event(kind: str, **extra: object) -> dict:
    return {
        "event": kind,
        "timestamp": time.time(),
        "user-variables": {"nd_correlation": f"{TENANT}:{DELIVERY}"},
        "message": {"headers": {"message-id": "m1@runflow.example"}},
        **extra,
    }


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (mailgun_event("delivered"), ("delivered", None)),
        (
            mailgun_event(
                "failed", severity="permanent", reason="bounce", **{"delivery-status": {"code": 550, "message": "no such user"}}
            ),
            ("bounced", None),
        ),
        (mailgun_event("failed", severity="permanent", reason="suppress-bounce"), ("suppressed", None)),
        (mailgun_event("failed", severity="temporary"), None),
        (mailgun_event("complained"), (None, "complained")),
        (mailgun_event("opened"), (None, "opened")),
    ],
)
def test_mailgun_events_verify_and_map(event, expected):
    parsed = MailgunWebhooks("mg-key").parse(WebhookRequest({}, mailgun_body("mg-key", event)))
    assert [(e.status, e.flag) for e in parsed.events] == ([expected] if expected else [])
    assert parsed.event_key.startswith("token:")
    if expected:
        assert (parsed.events[0].delivery_id, parsed.events[0].provider_message_id) == (DELIVERY, "m1@runflow.example")


@pytest.mark.parametrize("tamper", ["forged", "wrong_key", "stale", "no_signature"])
def test_mailgun_forgeries_are_refused(tamper):
    event = mailgun_event("delivered")
    body = {
        "forged": lambda: mailgun_body("mg-key", event, signature="0" * 64),
        "wrong_key": lambda: mailgun_body("other", event),
        "stale": lambda: mailgun_body("mg-key", event, timestamp=int(time.time()) - 3600),
        "no_signature": lambda: json.dumps({"event-data": event}).encode(),
    }[tamper]()
    with pytest.raises(WebhookRejected):
        MailgunWebhooks("mg-key").parse(WebhookRequest({}, body))


INGEST = (
    "select notify_api.ingest_webhook_v1(%s, %s, %s, "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r))"
)


def test_reports_on_smtp_messages_apply_and_a_complaint_revokes_consent(db, ready):
    submit(db, ready, intent(channels=["email"]))
    row = claim(db, "email")[0]
    record(db, {**result(row, "sent", provider_message_id=f"{row[1]}@runflow.example"), "provider": "smtp"})
    correlation = f"{row[0]}:{row[1]}"
    keys = SendGridKeys()
    body = json.dumps(sendgrid_events(correlation, f"<{row[1]}@runflow.example>")[:3]).encode()
    parsed = SendGridWebhooks(keys.verification_key).parse(WebhookRequest(keys.sign(body), body))
    events = msgspec.to_builtins(parsed.events)  # as the webhook route passes them
    out = db.execute(INGEST, ("sendgrid", parsed.event_key, Jsonb(parsed.payload), Jsonb(events))).fetchone()[0]
    assert [o["outcome"] for o in out["outcomes"]] == ["stale", "applied", "flagged"]
    state = db.execute(
        "select status::text, opened_at is not null, delivered_at is not null from notify.notification_deliveries"
    ).fetchone()
    assert state == ("delivered", True, True)
    # the open is returned where the docs say: in the delivery's detail, the stored first open
    request_id, opened = db.execute("select request_id, opened_at from notify.notification_deliveries").fetchone()
    [email] = call(db, "notify_api.get_notification_v1(%s, %s)", ready, request_id)["deliveries"]
    assert datetime.fromisoformat(email["opened_at"]) == opened
    complaint = [{"status": None, "flag": "complained", "provider_message_id": f"{row[1]}@runflow.example"}]
    out = db.execute(INGEST, ("sendgrid", "k2", Jsonb({}), Jsonb(complaint))).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "flagged"
    consents = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)
    assert consents["history"][-1]["source"] == "complaint" and consents["history"][-1]["status"] == "revoked"
    assert [c["allowed"] for c in consents["current"] if c["channel"] == "email"] == [False]
    bounce = [{"status": "bounced", "provider_message_id": f"{row[1]}@runflow.example", "error_code": "sendgrid_bounce"}]
    db.execute(INGEST, ("sendgrid", "k3", Jsonb({}), Jsonb(bounce)))
    assert db.execute("select status::text from notify.notification_deliveries").fetchone()[0] == "bounced"
