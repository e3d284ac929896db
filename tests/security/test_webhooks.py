"""Attacks and real-payload surprises on /public/webhooks: a verified webhook is stored and answered 200 whatever its
shape (a 5xx or 4xx makes the provider retry for hours, then drop it); secrets are read as the reference libraries
read them; nan timestamps are not times; WhatsApp and SendGrid payloads from the field are classified right."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import standardwebhooks
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher.settings import Settings
from providers import standard_webhooks as sw
from providers.base import ConfigurationError, WebhookRejected, WebhookRequest
from providers.email_webhooks import MailgunWebhooks, SendGridWebhooks
from providers.mock import MockWebhooks
from providers.whatsapp import classify
from tests.conftest import ROOT, app_url, call, intent, submit

WA_SECRET, MG_KEY, MOCK_SECRET = "wa-app-secret", "mailgun-signing-key", sw.new_secret()
PHONE_ID = "106540352242922"
SG_PRIVATE = ec.generate_private_key(ec.SECP256R1())
SG_KEY = base64.b64encode(
    SG_PRIVATE.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
).decode()


def wa(payload: Any) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(payload).encode()
    return raw, {"x-hub-signature-256": "sha256=" + hmac.new(WA_SECRET.encode(), raw, hashlib.sha256).hexdigest()}


def mailgun(event: Any, timestamp: str | None = None) -> tuple[bytes, dict[str, str]]:
    ts, token = timestamp or str(int(time.time())), uuid.uuid4().hex
    sig = hmac.new(MG_KEY.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return json.dumps({"signature": {"timestamp": ts, "token": token, "signature": sig}, "event-data": event}).encode(), {}


def sendgrid(events: Any, timestamp: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw, ts = json.dumps(events).encode(), timestamp or str(int(time.time()))
    sig = SG_PRIVATE.sign(ts.encode() + raw, ec.ECDSA(hashes.SHA256()))
    return raw, {
        "x-twilio-email-event-webhook-signature": base64.b64encode(sig).decode(),
        "x-twilio-email-event-webhook-timestamp": ts,
    }


def mock(payload: Any, secret: str = MOCK_SECRET) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(payload).encode()
    return raw, sw.headers(secret, f"msg_{uuid.uuid4().hex}", raw)


SIGNERS = {"whatsapp": wa, "mailgun": mailgun, "sendgrid": sendgrid, "mock": mock}


def app_settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": app_url(db_url),
        "whatsapp_app_secrets": [WA_SECRET],
        "mailgun_signing_key": MG_KEY,
        "sendgrid_verification_key": SG_KEY,
        "mock_webhook_secret": MOCK_SECRET,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with TestClient(app=create_app(app_settings(db_url)), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, provider: str, signed: tuple[bytes, dict[str, str]]) -> Any:
    raw, headers = signed
    return client.post(f"/public/webhooks/{provider}", content=raw, headers={"content-type": "application/json", **headers})


def stored(db: psycopg.Connection) -> list[Any]:
    return [r[0] for r in db.execute("select outcomes from notify.webhook_events order by id").fetchall()]


def wa_value(**value: Any) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "w", "changes": [{"field": "messages", "value": {"metadata": {"phone_number_id": PHONE_ID}, **value}}]}],
    }


def wa_status(status: str = "delivered", **extra: Any) -> dict[str, Any]:
    return {"id": f"wamid.{uuid.uuid4().hex}", "status": status, "timestamp": str(int(time.time())), **extra}


# Signed when the test runs, not at import: the signatures carry a timestamp, and the suite may take longer than
# their five minutes' tolerance to reach this module.
CRASHES = [
    ("whatsapp", lambda: wa({"object": "whatsapp_business_account", "entry": [{"changes": [{"value": "not an object"}]}]})),
    ("whatsapp", lambda: wa(wa_value(statuses=[wa_status("failed", errors="not a list")]))),
    (
        "whatsapp",
        lambda: wa(wa_value(statuses="not a list", messages=[{"id": "m", "from": "34600111222", "type": "text", "text": "hi"}])),
    ),
    ("whatsapp", lambda: wa(wa_value(statuses=[wa_status(timestamp="99999999999999999999")]))),
    ("whatsapp", lambda: wa({"object": "whatsapp_business_account", "entry": "nope"})),
    ("whatsapp", lambda: wa([1, 2, 3])),
    (
        "mailgun",
        lambda: mailgun({"event": "delivered", "user-variables": "not an object", "message": "x", "delivery-status": "y"}),
    ),
    ("mailgun", lambda: mailgun("not an object")),
    (
        "mailgun",
        lambda: mailgun({"event": "failed", "severity": "permanent", "reason": {"a": 1}, "delivery-status": {"code": [1]}}),
    ),
    ("sendgrid", lambda: sendgrid({"event": "delivered"})),
    (
        "sendgrid",
        lambda: sendgrid(
            [
                "a string",
                {"event": "dropped", "reason": {"nested": True}, "smtp-id": ["x"]},
                {"event": "bounce", "timestamp": "nan"},
            ]
        ),
    ),
    ("mock", lambda: mock({"type": "x", "timestamp": "not a time", "data": "not an object"})),
    (
        "mock",
        lambda: mock(
            {
                "type": "x",
                "timestamp": "2026-01-01T00:00:00Z",
                "data": {"message_id": "m\u0000", "status": "delivered", "error": "not an object", "correlation_id": 5},
            }
        ),
    ),
    ("mock", lambda: (b"\x00 not json", None)),
]


@pytest.mark.parametrize(("provider", "signed"), CRASHES, ids=range(len(CRASHES)))
def test_verified_payloads_of_an_unexpected_shape_are_stored_and_answered_200(client, db, provider, signed):
    signed = signed()
    if signed[1] is None:  # a raw body, signed here
        signed = (signed[0], sw.headers(MOCK_SECRET, f"msg_{uuid.uuid4().hex}", signed[0]))
    response = post(client, provider, signed)
    assert response.status_code == 200, response.text
    assert response.json() == {"stored": True, "duplicate": False}
    assert len(stored(db)) == 1


def test_a_bad_part_is_kept_with_its_reason_and_the_rest_applied(client, db, ready):
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    delivery = response["deliveries"][0]["id"]
    db.execute("update notify.notification_deliveries set status = 'sending', attempt = 1 where id = %s", (delivery,))
    db.execute(
        "update notify.notification_deliveries set status = 'sent', provider = 'whatsapp_cloud', provider_message_id = 'wamid.1' "
        "where id = %s",
        (delivery,),
    )
    db.commit()
    good = wa_status("delivered", id="wamid.1", biz_opaque_callback_data=f"{ready}:{delivery}")
    answer = post(client, "whatsapp", wa(wa_value(statuses=[{"id": 5, "status": ["x"]}, good])))
    assert answer.status_code == 200
    outcomes = stored(db)[0]
    assert [o["outcome"] for o in outcomes] == ["applied", "kept"] and "statuses[0]" in outcomes[1]["reason"]
    assert (
        db.execute("select status::text from notify.notification_deliveries where id = %s", (delivery,)).fetchone()[0]
        == "delivered"
    )


def test_an_unpadded_standard_webhooks_secret_verifies_as_the_reference_library_reads_it() -> None:
    unpadded = sw.new_secret().rstrip("=")
    assert unpadded != sw.new_secret() and not unpadded.endswith("=")
    body = json.dumps(
        {
            "type": "message.status.delivered",
            "timestamp": "2026-01-01T00:00:00Z",
            "data": {"message_id": "m1", "status": "delivered"},
        }
    ).encode()
    ts = int(time.time())
    signature = standardwebhooks.Webhook(unpadded).sign("msg_1", dt.datetime.fromtimestamp(ts, dt.UTC), body.decode())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": signature}
    standardwebhooks.Webhook(unpadded).verify(body, headers)  # the reference library accepts it
    assert MockWebhooks([unpadded]).parse(WebhookRequest(headers, body)).events[0].status == "delivered"


@pytest.mark.parametrize("secret", ["whsec_", "whsec_====", "whsec_!!!!"])
def test_an_empty_secret_is_refused_at_start_up(db_url: str, secret: str) -> None:
    # With the old code an empty key was accepted, and anyone could sign with it.
    with pytest.raises(ConfigurationError):
        MockWebhooks([secret])
    with pytest.raises(ConfigurationError):
        create_app(app_settings(db_url, mock_webhook_secret=secret))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update({"DATABASE_URL": app_url(db_url), "DISPATCHER_MOCK_WEBHOOK_SECRET": secret, "PYTHONPATH": str(ROOT)})
    run = subprocess.run(
        [sys.executable, "-m", "dispatcher", "serve", "--port", "1"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "DISPATCHER_MOCK_WEBHOOK_SECRET" in lines[0] and "empty" in lines[0], lines


@pytest.mark.parametrize("timestamp", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_a_nan_or_infinite_timestamp_is_not_fresh(client, db, timestamp):
    event = {"event": "delivered", "timestamp": time.time()}
    assert post(client, "mailgun", mailgun(event, timestamp)).status_code == 401
    assert post(client, "sendgrid", sendgrid([event], timestamp)).status_code == 401
    with pytest.raises(WebhookRejected):
        MailgunWebhooks(MG_KEY).parse(WebhookRequest({}, mailgun(event, timestamp)[0]))
    assert stored(db) == []


def _whatsapp_tenant(db: psycopg.Connection, tenant: str) -> None:
    call(db, "notify_api.set_provider_grants_v1(%s, 'NOTIFY_TENANT_ACME_', null, false)", tenant)  # the operator's grant
    call(
        db,
        "notify_api.set_channel_provider_v1(%s, 'whatsapp', %s)",
        tenant,
        Jsonb(
            {
                "provider": "whatsapp_cloud",
                "settings": {"phone_number_id": PHONE_ID, "opt_out_keywords": ["STOP", "BAJA"]},
                "secrets": {"access_token": "env:NOTIFY_TENANT_ACME_WA_TOKEN"},
            }
        ),
    )
    submit(db, tenant, intent(channels=["whatsapp"]))
    db.commit()


@pytest.mark.parametrize(
    "interactive",
    [
        {"type": "button_reply", "button_reply": {"id": "opt-out", "title": "STOP"}},
        {"type": "list_reply", "list_reply": {"id": "baja", "title": "Baja", "description": "no more"}},
    ],
)
def test_an_interactive_reply_is_inbound_text_for_opt_out_keywords(client, db, ready, interactive):
    _whatsapp_tenant(db, ready)
    message = {
        "from": "34600111222",
        "id": f"wamid.{uuid.uuid4().hex}",
        "timestamp": str(int(time.time())),
        "type": "interactive",
        "interactive": interactive,
    }
    assert post(client, "whatsapp", wa(wa_value(messages=[message]))).status_code == 200
    assert [o["outcome"] for o in stored(db)[0]] == ["opted_out"]
    last = db.execute(
        "select status::text, source from notify.recipient_consents where channel = 'whatsapp' order by id desc limit 1"
    ).fetchone()
    assert last == ("revoked", "inbound_keyword")


def test_a_system_message_opens_no_window(client, db, ready):
    _whatsapp_tenant(db, ready)
    message = {
        "from": "34600111222",
        "id": f"wamid.{uuid.uuid4().hex}",
        "timestamp": str(int(time.time())),
        "type": "system",
        "system": {
            "body": "User A changed from +34600111222 to +34600999888",
            "wa_id": "34600999888",
            "type": "user_changed_number",
        },
    }
    assert post(client, "whatsapp", wa(wa_value(messages=[message]))).status_code == 200
    assert db.execute("select count(*) from notify.whatsapp_windows").fetchone()[0] == 0
    assert [o["outcome"] for o in stored(db)[0]] == ["kept"]


@pytest.mark.parametrize("code", [131031, 131042, 131045, 133010, 133000, 368])
def test_account_level_whatsapp_errors_are_configuration_errors(client, db, ready, code):
    # Sending: kept and retried like an invalid token (code 190), not failed.
    assert classify(code, "account problem", 400).outcome == classify(190, "token", 401).outcome == "retry"
    assert classify(code, "account problem", 400).retry_after_seconds == classify(190, "token", 401).retry_after_seconds
    # A status report with such an error is not this message's failure.
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    delivery = response["deliveries"][0]["id"]
    db.execute("update notify.notification_deliveries set status = 'sending', attempt = 1 where id = %s", (delivery,))
    db.execute(
        "update notify.notification_deliveries set status = 'sent', provider = 'whatsapp_cloud', provider_message_id = 'wamid.2' "
        "where id = %s",
        (delivery,),
    )
    db.commit()
    failed = wa_status(
        "failed",
        id="wamid.2",
        biz_opaque_callback_data=f"{ready}:{delivery}",
        errors=[{"code": code, "title": "Account problem"}],
    )
    assert post(client, "whatsapp", wa(wa_value(statuses=[failed]))).status_code == 200
    assert (
        db.execute("select status::text from notify.notification_deliveries where id = %s", (delivery,)).fetchone()[0] == "sent"
    )
    assert "account-level" in stored(db)[0][0]["reason"]


def test_a_temporary_registration_outage_is_retried_soon() -> None:
    assert classify(133004, "server temporarily unavailable", 503).retry_after_seconds == 1.0


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("Invalid SMTPAPI header", "failed"),
        ("Invalid", "failed"),
        ("Bounced Address", "suppressed"),
        ("Unsubscribed Address", "suppressed"),
        ("Spam Reporting Address", "suppressed"),
        ("Invalid Reply-To", "failed"),
    ],
)
def test_sendgrid_drops_for_our_own_reasons_are_failed(reason, status):
    raw, headers = sendgrid([{"event": "dropped", "reason": reason, "timestamp": int(time.time())}])
    assert SendGridWebhooks(SG_KEY).parse(WebhookRequest(headers, raw)).events[0].status == status


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
KEYS = [
    "object",
    "entry",
    "changes",
    "value",
    "statuses",
    "messages",
    "errors",
    "metadata",
    "event-data",
    "user-variables",
    "event",
    "reason",
    "timestamp",
    "data",
    "status",
    "message_id",
    "correlation_id",
    "type",
    "interactive",
    "id",
    "from",
]
SHAPED = st.recursive(
    JSON,
    lambda children: st.dictionaries(st.sampled_from(KEYS), children, max_size=5) | st.lists(children, max_size=3),
    max_leaves=25,
)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(provider=st.sampled_from(list(SIGNERS)), payload=SHAPED)
def test_fuzz_verified_payloads_of_random_shapes_never_get_a_5xx(client, provider, payload):
    if provider == "mailgun" and isinstance(payload, dict):
        signed = mailgun(payload.get("event-data", payload))
    else:
        signed = SIGNERS[provider](payload)
    response = post(client, provider, signed)
    assert response.status_code == 200, (provider, payload, response.text)
