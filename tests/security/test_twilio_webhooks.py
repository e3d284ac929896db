"""Attacks on /public/webhooks/twilio, through the real API: a forged or replayed X-Twilio-Signature, another tenant
signing with its own Twilio account (a STOP to our number or to a number of our Messaging Service, a report on our
delivery), another tenant claiming our Messaging Service, a Host header pointing elsewhere.
Each tenant's own auth token is the only key that verifies a request about it; a verified webhook never gets a 5xx."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from tests.api.test_api import is_problem, make_key
from tests.conftest import REMINDER, call, claim, intent, record, result, submit
from tests.fakes.twilio import sign
from tests.security.test_webhooks import app_settings

PUBLIC = "https://notify.example.com"
URL = f"{PUBLIC}/public/webhooks/twilio"
A_ACCOUNT, B_ACCOUNT = "AC" + "a" * 32, "AC" + "b" * 32
A_TOKEN, B_TOKEN = "acme-auth-token", "globex-auth-token"
A_NUMBER, B_NUMBER = "+15005550006", "+15005550007"
A_SERVICE = "MG" + "a" * 32  # acme's Messaging Service: its sender pool answers from other numbers than A_NUMBER
POOL_NUMBER = "+15005550010"  # a number of acme's Messaging Service pool (no tenant's from_number)
PHONE = "+34600111222"


@pytest.fixture
def tenants(db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """acme (the victim) and globex (the attacker), each with its own Twilio account, number and token."""
    monkeypatch.setenv("ACMETW_TOKEN", A_TOKEN)
    monkeypatch.setenv("GLOBEXTW_TOKEN", B_TOKEN)
    out = {}
    for slug, prefix, account, number in (("acme", "ACMETW_", A_ACCOUNT, A_NUMBER), ("globex", "GLOBEXTW_", B_ACCOUNT, B_NUMBER)):
        tenant = str(call(db, "notify_api.create_tenant_v1(%s, %s, 'en')", slug, slug)["id"])
        call(db, "notify_api.set_provider_grants_v1(%s, %s, null, false)", tenant, prefix)
        service = {"messaging_service_sid": A_SERVICE} if slug == "acme" else {}
        body = {
            "provider": "twilio",
            "settings": {"account_sid": account, "from_number": number, **service},
            "secrets": {"auth_token": f"env:{prefix}TOKEN"},
        }
        call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", tenant, Jsonb(body))
        call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
        call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", tenant, Jsonb({"addresses": {"sms": PHONE}}))
        grant = {"channel": "sms", "status": "granted", "source": "form"}
        call(db, "notify_api.record_consent_v1(%s, 'runner-42', %s)", tenant, Jsonb(grant))
        out[slug] = tenant
    return out


@pytest.fixture
def client(db_url: str, tenants: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(app=create_app(app_settings(db_url, public_url=PUBLIC)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def delivery(db: psycopg.Connection, tenants: dict[str, str]) -> tuple[str, str]:
    """acme's SMS, sent (SM1): (tenant, delivery id)."""
    submit(db, tenants["acme"], intent(channels=["sms"], recipient={"ref": "runner-42", "addresses": {"sms": PHONE}}))
    [row] = claim(db, "sms")
    record(db, result(row, "sent", provider="twilio", provider_message_id="SM" + "1" * 32))
    return str(row[0]), str(row[1])


def post(client: TestClient, params: dict[str, str], query: str = "", signature: str | None = None, **headers: str) -> Any:
    return client.post(
        "/public/webhooks/twilio" + (f"?{query}" if query else ""),
        content=urlencode(params).encode(),
        headers={"content-type": "application/x-www-form-urlencoded", "x-twilio-signature": signature or "", **headers},
    )


def status(account: str, status: str, code: str | None = None) -> dict[str, str]:
    params = {"AccountSid": account, "MessageSid": "SM" + "1" * 32, "MessageStatus": status, "From": A_NUMBER, "To": PHONE}
    return {**params, "ErrorCode": code} if code else params


def stop(account: str, to: str = A_NUMBER, body: str = "STOP", service: str | None = None) -> dict[str, str]:
    params = {
        "AccountSid": account,
        "MessageSid": f"SM{uuid.uuid4().hex}",
        "SmsStatus": "received",
        "From": PHONE,
        "To": to,
        "Body": body,
    }
    return {**params, "MessagingServiceSid": service} if service else params


def state(db: psycopg.Connection, tenant: str) -> tuple[str | None, bool]:
    d = db.execute("select status from notify.notification_deliveries where tenant_id = %s", (tenant,)).fetchone()
    current = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", tenant)["current"]
    return (d[0] if d else None), next(c for c in current if c["channel"] == "sms")["allowed"]


def test_a_signed_report_behind_a_proxy_is_applied(client, db, tenants, delivery):
    tenant, delivery_id = delivery
    query = urlencode({"nd": f"{tenant}:{delivery_id}"})
    params = status(A_ACCOUNT, "delivered")
    # The proxy forwards to the API's own address: Host (and X-Forwarded-Host) are not what Twilio signed.
    answer = post(client, params, query, sign(A_TOKEN, f"{URL}?{query}", params), host="10.0.0.5:8000")
    assert answer.status_code == 200 and answer.json() == {"stored": True, "duplicate": False}
    assert state(db, tenant) == ("delivered", True)
    assert post(client, params, query, sign(A_TOKEN, f"{URL}?{query}", params)).json()["duplicate"] is True  # Twilio retried


def test_a_forged_signature_changes_nothing(client, db, tenants, delivery):
    tenant, delivery_id = delivery
    query = urlencode({"nd": f"{tenant}:{delivery_id}"})
    params = status(A_ACCOUNT, "undelivered", "30003")
    for forged in ("", "bm90IGEgc2lnbmF0dXJl", sign("guessed-token", f"{URL}?{query}", params)):
        assert post(client, params, query, forged).status_code == 401
    # Signed over the URL the request's own Host names (what a naive check rebuilds), not the public URL.
    assert (
        post(client, params, query, sign(A_TOKEN, f"http://testserver.local/public/webhooks/twilio?{query}", params)).status_code
        == 401
    )
    assert state(db, tenant) == ("sent", True)
    assert db.execute("select count(*) from notify.webhook_events").fetchone()[0] == 0


def test_a_replayed_signature_on_other_parameters_or_another_delivery_changes_nothing(client, db, tenants, delivery):
    tenant, delivery_id = delivery
    query = urlencode({"nd": f"{tenant}:{delivery_id}"})
    captured = status(A_ACCOUNT, "sent")
    signature = sign(A_TOKEN, f"{URL}?{query}", captured)
    assert post(client, captured, query, signature).status_code == 200
    # The captured signature on a failure report (STOP error: it would revoke consent), and on another delivery's URL.
    assert post(client, status(A_ACCOUNT, "failed", "21610"), query, signature).status_code == 401
    other = urlencode({"nd": f"{tenant}:{uuid.uuid4()}"})
    assert post(client, captured, other, signature).status_code == 401
    # The same request again is a duplicate: stored once, applied once.
    assert post(client, captured, query, signature).json()["duplicate"] is True
    assert state(db, tenant) == ("sent", True)


def test_another_tenant_cannot_stop_our_recipient_through_its_own_account(client, db, tenants):
    # globex signs, with its own valid token, a STOP "to" acme's number: under its own account SID and under acme's.
    for account in (B_ACCOUNT, A_ACCOUNT):
        params = stop(account)
        assert post(client, params, "", sign(B_TOKEN, URL, params)).status_code == 401
    assert state(db, tenants["acme"])[1] is True
    # The same STOP signed with acme's token (Twilio itself, for acme's number) is applied: to acme only.
    params = stop(A_ACCOUNT)
    assert post(client, params, "", sign(A_TOKEN, URL, params)).status_code == 200
    assert state(db, tenants["acme"])[1] is False and state(db, tenants["globex"])[1] is True


def test_another_tenant_cannot_stop_our_recipient_through_our_messaging_service(client, db, tenants):
    # globex signs, with its own valid token, a STOP to a number of acme's Messaging Service pool naming acme's service:
    # under its own account SID and under acme's. No key of globex's is offered for acme's service: refused.
    for account in (B_ACCOUNT, A_ACCOUNT):
        params = stop(account, to=POOL_NUMBER, service=A_SERVICE)
        assert post(client, params, "", sign(B_TOKEN, URL, params)).status_code == 401
    # To globex's own number (so verified with globex's key) but naming acme's service: applied to globex, never acme.
    params = stop(B_ACCOUNT, to=B_NUMBER, service=A_SERVICE)
    assert post(client, params, "", sign(B_TOKEN, URL, params)).status_code == 200
    assert state(db, tenants["acme"])[1] is True and state(db, tenants["globex"])[1] is False
    # The same STOP to the pool number signed with acme's token (Twilio itself, for acme's service): applied to acme.
    params = stop(A_ACCOUNT, to=POOL_NUMBER, service=A_SERVICE)
    assert post(client, params, "", sign(A_TOKEN, URL, params)).status_code == 200
    assert state(db, tenants["acme"])[1] is False
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", tenants["acme"])["history"][-1]
    assert (entry["status"], entry["source"]) == ("revoked", "inbound_keyword")
    assert (entry["evidence"]["to"], entry["evidence"]["messaging_service_sid"]) == (POOL_NUMBER, A_SERVICE)


def test_another_tenant_cannot_claim_our_messaging_service(client, db, tenants):
    """globex's admin, with its own API key, configures acme's Messaging Service SID as its sender (so that inbound
    messages to acme's pool would be globex's): refused, one provider or a chain, and acme's keep coming to acme."""
    key, _ = make_key(db, tenants["globex"])
    entry = {
        "provider": "twilio",
        "settings": {"account_sid": B_ACCOUNT, "messaging_service_sid": A_SERVICE},
        "secrets": {"auth_token": "env:GLOBEXTW_TOKEN"},
    }
    auth = {"Authorization": f"Bearer {key}"}
    body = is_problem(
        client.put("/internal/channels/sms/provider", json=entry, headers=auth), 409, "settings.messaging_service_sid"
    )
    assert body["type"].endswith(":phone_number_taken")
    chain = client.put("/internal/channels/sms/providers", json={"providers": [entry]}, headers=auth)
    is_problem(chain, 409, "providers[0].settings.messaging_service_sid")
    rows = db.execute(
        "select tenant_id::text from notify.channel_providers where settings ->> 'messaging_service_sid' = %s", (A_SERVICE,)
    ).fetchall()
    assert rows == [(tenants["acme"],)]
    params = stop(A_ACCOUNT, to=POOL_NUMBER, service=A_SERVICE)
    assert post(client, params, "", sign(A_TOKEN, URL, params)).status_code == 200
    assert state(db, tenants["acme"])[1] is False and state(db, tenants["globex"])[1] is True


def test_another_tenant_cannot_report_on_our_delivery(client, db, tenants, delivery):
    tenant, delivery_id = delivery
    query = urlencode({"nd": f"{tenant}:{delivery_id}"})
    for account in (B_ACCOUNT, A_ACCOUNT):
        params = status(account, "failed", "21610")
        assert post(client, params, query, sign(B_TOKEN, f"{URL}?{query}", params)).status_code == 401
    # globex's callback URL naming acme's delivery: verified with globex's key, but not applied to acme's delivery.
    own = urlencode({"nd": f"{tenants['globex']}:{delivery_id}"})
    params = status(B_ACCOUNT, "failed", "21610")
    assert post(client, params, own, sign(B_TOKEN, f"{URL}?{own}", params)).status_code == 200
    assert state(db, tenant) == ("sent", True)


@pytest.mark.parametrize(
    "params",
    [
        {"AccountSid": A_ACCOUNT, "From": A_NUMBER, "MessageStatus": "delivered"},  # no MessageSid
        {"AccountSid": A_ACCOUNT, "From": A_NUMBER, "MessageSid": "SMx", "MessageStatus": "exploded"},
        {"AccountSid": A_ACCOUNT, "From": A_NUMBER, "MessageSid": "SMx", "MessageStatus": "failed", "ErrorCode": "9" * 40},
        {
            "AccountSid": A_ACCOUNT,
            "MessageSid": "SMy",
            "SmsStatus": "received",
            "From": "\x00",
            "To": A_NUMBER,
            "Body": "\x00STOP",
        },
    ],
)
def test_a_verified_webhook_never_gets_a_5xx(client, db, tenants, params):
    tenant = tenants["acme"]
    query = urlencode({"nd": f"{tenant}:not-a-uuid"}) if "MessageStatus" in params else ""  # found by its number
    answer = post(client, params, query, sign(A_TOKEN, URL + (f"?{query}" if query else ""), params))
    assert answer.status_code == 200, answer.text


def test_an_unverifiable_request_with_odd_hints_is_a_4xx(client, tenants):
    # A NUL in AccountSid, a To that is no number: whose key to try cannot be found, and nothing breaks.
    for params in ({"AccountSid": "AC\x00", "MessageSid": "SMz", "To": A_NUMBER, "Body": "STOP"}, {"To": "x" * 5000}):
        assert post(client, params, "", "c2lnbmF0dXJl").status_code == 401
    assert post(client, {"a": "b"}, "", "x", **{"content-type": "application/json"}).status_code == 400
