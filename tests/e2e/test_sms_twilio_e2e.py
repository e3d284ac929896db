"""SMS end to end through Twilio: the API and worker processes, a tenant configured for the Twilio fake, and the fake's
signed status callbacks (shuffled and duplicated) reaching the API as if through a reverse proxy (signed over
DISPATCHER_PUBLIC_URL, delivered to the API's own address). submit -> sent -> delivered; undelivered -> failed;
21610 -> suppressed and consent revoked; a timeout -> unknown, never resent; an inbound STOP revokes, START restores,
also to a number of the tenant's Messaging Service pool."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from tests.conftest import REMINDER, Service, call, intent, start_service, stop_service, url_of
from tests.fakes.twilio import TwilioFake

pytestmark = pytest.mark.slow

PUBLIC = "https://notify.example.com"
NUMBER = "+15005550006"


@dataclass
class Stack:
    svc: Service
    twilio: TwilioFake


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path) -> Iterator[Stack]:  # noqa: ANN001
    twilio = TwilioFake()
    twilio_url = twilio.start()
    svc = start_service(url_of(db), tmp_path, {"DISPATCHER_PUBLIC_URL": PUBLIC, "E2E_TW_TOKEN": twilio.auth_token})
    twilio.deliver_to = svc.base_url  # the proxy: Twilio requests PUBLIC, the API listens here
    with psycopg.connect(svc.db_url, autocommit=True) as conn:  # the operator: E2E_* secrets, the fake on this machine
        call(conn, "notify_api.set_provider_grants_v1(%s, 'E2E_', null, true)", svc.tenant_id)
        call(conn, "notify_api.set_retry_policy_v1(%s, 3, 50, 200)", svc.tenant_id)
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        sms = c.put(
            "/internal/channels/sms/provider",
            json={
                "provider": "twilio",
                "secrets": {"auth_token": "env:E2E_TW_TOKEN"},
                "settings": {
                    "account_sid": twilio.account_sid,
                    "from_number": NUMBER,
                    "base_url": twilio_url,
                    "timeout_seconds": 1,
                },
            },
        )
        assert sms.status_code == 200, sms.text
    yield Stack(svc, twilio)
    stop_service(svc)
    twilio.stop()


def submit_sms(stack: Stack, ref: str, phone: str) -> str:
    with stack.svc.client() as c:
        consent = {"channel": "sms", "status": "granted", "source": "form"}
        assert c.post(f"/internal/recipients/{ref}/consents", json=consent).status_code == 201
        body = intent(channels=["sms"], recipient={"ref": ref, "addresses": {"sms": phone}, "locale": "en"})
        response = c.post("/internal/notifications", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]


def sms_of(body: dict) -> dict:
    [d] = [d for d in body["deliveries"] if d["channel"] == "sms"]
    return d


def sms_allowed(stack: Stack, ref: str) -> bool:
    with stack.svc.client() as c:
        current = c.get(f"/internal/recipients/{ref}/consents").json()["current"]
    return next(x for x in current if x["channel"] == "sms")["allowed"]


def wait_posted(stack: Stack, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(stack.twilio.posted) < n:
        assert time.monotonic() < deadline, stack.twilio.posted
        time.sleep(0.05)


def test_sms_is_sent_then_delivered_with_its_cost(stack: Stack) -> None:
    nid = submit_sms(stack, "runner-1", "+34600000001")
    body = stack.svc.wait_for(nid, lambda b: sms_of(b)["status"] == "delivered")
    d = sms_of(body)
    assert d["provider"] == "twilio" and d["provider_message_id"].startswith("SM")
    assert d["pricing"] == {"encoding": "GSM-7", "segments": 1, "units": len("Hi Ana: Long run"), "twilio_segments": 1}
    [request] = stack.twilio.requests
    assert request["form"]["Body"] == "Hi Ana: Long run" and request["form"]["From"] == NUMBER
    assert request["form"]["StatusCallback"].startswith(f"{PUBLIC}/public/webhooks/twilio?nd=")
    wait_posted(stack, 4)  # queued, sent, delivered and one duplicate, shuffled
    assert all(answer == 200 for _, answer in stack.twilio.posted)
    with psycopg.connect(stack.svc.db_url) as conn:  # the duplicate was stored once
        assert conn.execute("select count(*) from notify.webhook_events where provider = 'twilio'").fetchone()[0] == 3
    path = [e["to"] for e in d["events"]]
    assert path[:3] == ["queued", "sending", "sent"] and path[-1] == "delivered"


def test_undelivered_is_failed_with_the_carriers_code(stack: Stack) -> None:
    stack.twilio.scripts["+34600000002"] = ["async_failed:30003"]
    nid = submit_sms(stack, "runner-2", "+34600000002")
    d = sms_of(stack.svc.wait_for(nid, lambda b: sms_of(b)["status"] == "failed"))
    assert d["error"]["code"] == "twilio_30003" and d["reason"] == "provider_reported"


def test_an_unsubscribed_recipient_is_suppressed_and_its_consent_revoked(stack: Stack) -> None:
    stack.twilio.scripts["+34600000003"] = ["error:21610"]
    nid = submit_sms(stack, "runner-3", "+34600000003")
    d = sms_of(stack.svc.wait_for(nid, lambda b: sms_of(b)["status"] == "suppressed"))
    assert d["error"]["code"] == "twilio_21610"
    assert not sms_allowed(stack, "runner-3")
    assert len(stack.twilio.requests) == 1


def test_a_timeout_is_unknown_and_never_resent(stack: Stack) -> None:
    stack.twilio.scripts["+34600000004"] = ["timeout"]
    nid = submit_sms(stack, "runner-4", "+34600000004")
    d = sms_of(stack.svc.wait_for(nid, lambda b: sms_of(b)["status"] == "unknown"))
    assert d["reason"] == "outcome_unknown"
    time.sleep(1.5)  # retries (50-200 ms apart) would have sent it again by now
    assert [r["form"]["To"] for r in stack.twilio.requests] == ["+34600000004"]
    with stack.svc.client() as c:
        assert sms_of(c.get(f"/internal/notifications/{nid}").json())["status"] == "unknown"


def test_a_throttled_send_is_retried_then_sent(stack: Stack) -> None:
    stack.twilio.scripts["+34600000005"] = ["error:20429", "ok"]
    stack.twilio.retry_after = "0"
    nid = submit_sms(stack, "runner-5", "+34600000005")
    stack.svc.wait_for(nid, lambda b: sms_of(b)["status"] == "delivered")
    assert len(stack.twilio.requests) == 2


def test_inbound_stop_revokes_and_start_restores(stack: Stack) -> None:
    with stack.svc.client() as c:
        consent = {"channel": "sms", "status": "granted", "source": "form"}
        c.put("/internal/recipients/runner-6", json={"addresses": {"sms": "+34600000006"}})
        assert c.post("/internal/recipients/runner-6/consents", json=consent).status_code == 201
    url = f"{PUBLIC}/public/webhooks/twilio"
    assert stack.twilio.inbound(url, "+34600000006", NUMBER, "Stop") == 200
    assert not sms_allowed(stack, "runner-6")
    assert stack.twilio.inbound(url, "+34600000006", NUMBER, "START") == 200
    assert sms_allowed(stack, "runner-6")
    assert stack.twilio.inbound(url, "+34600000006", NUMBER, "STOP", token="not-the-token") == 401
    assert sms_allowed(stack, "runner-6")


def test_inbound_stop_to_a_number_of_the_messaging_service_pool_revokes(stack: Stack) -> None:
    """The tenant sends through a Messaging Service: a recipient's STOP to any number of its pool (not the tenant's
    from_number) names the service, is verified with the tenant's token and revokes its SMS consent with evidence."""
    service, pool_number = "MG" + "5" * 32, "+15005550011"
    with stack.svc.client() as c:
        sms = c.put(
            "/internal/channels/sms/provider",
            json={
                "provider": "twilio",
                "secrets": {"auth_token": "env:E2E_TW_TOKEN"},
                "settings": {"account_sid": stack.twilio.account_sid, "from_number": NUMBER, "messaging_service_sid": service},
            },
        )
        assert sms.status_code == 200, sms.text
        consent = {"channel": "sms", "status": "granted", "source": "form"}
        c.put("/internal/recipients/runner-7", json={"addresses": {"sms": "+34600000007"}})
        assert c.post("/internal/recipients/runner-7/consents", json=consent).status_code == 201
    url = f"{PUBLIC}/public/webhooks/twilio"
    assert (
        stack.twilio.inbound(url, "+34600000007", pool_number, "STOP", token="not-the-token", messaging_service_sid=service)
        == 401
    )
    assert sms_allowed(stack, "runner-7")
    assert stack.twilio.inbound(url, "+34600000007", pool_number, "STOP", messaging_service_sid=service) == 200
    assert not sms_allowed(stack, "runner-7")
    with stack.svc.client() as c:
        entry = c.get("/internal/recipients/runner-7/consents").json()["history"][-1]
    assert (entry["status"], entry["source"]) == ("revoked", "inbound_keyword")
    assert (entry["evidence"]["to"], entry["evidence"]["messaging_service_sid"]) == (pool_number, service)
    assert stack.twilio.inbound(url, "+34600000007", pool_number, "START", messaging_service_sid=service) == 200
    assert sms_allowed(stack, "runner-7")
