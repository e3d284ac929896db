"""Real channels end to end: the API and worker processes, a tenant configured for the Graph API fake and a
local SMTP server, the fakes' signed webhooks. WhatsApp ends read, e-mail delivered, each failure class in
its documented state, the 24-hour window and opt-out keywords work, unsubscribe links record opt-outs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest

from tests.conftest import REMINDER, Service, call, intent, start_service, stop_service, url_of
from tests.fakes.graph_api import GraphFake
from tests.fakes.smtp import SmtpFake
from tests.providers.test_email_webhooks import SendGridKeys

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    svc: Service
    graph: GraphFake
    smtp: SmtpFake
    sendgrid: SendGridKeys


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path) -> Iterator[Stack]:  # noqa: ANN001
    graph, smtp, sendgrid = GraphFake(app_secret="app-secret-e2e"), SmtpFake(), SendGridKeys()
    graph_url, smtp_port = graph.start(), smtp.start()
    svc = start_service(
        url_of(db),
        tmp_path,
        {
            "DISPATCHER_WHATSAPP_APP_SECRET": graph.app_secret,
            "DISPATCHER_WHATSAPP_VERIFY_TOKEN": "verify-me",
            "DISPATCHER_SENDGRID_VERIFICATION_KEY": sendgrid.verification_key,
            "DISPATCHER_PUBLIC_URL": "http://public.example",
            "DISPATCHER_UNSUBSCRIBE_SECRET": "unsub-secret",
            "E2E_WA_TOKEN": graph.access_token,
        },
    )
    graph.webhook_url = f"{svc.base_url}/public/webhooks/whatsapp"
    with psycopg.connect(svc.db_url, autocommit=True) as conn:  # the operator: E2E_* secrets, and the fakes on this machine
        call(conn, "notify_api.set_provider_grants_v1(%s, 'E2E_', null, true)", svc.tenant_id)
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        assert c.put("/internal/templates/chat", json={"channels": {"whatsapp": {"text": "Hola {{name}}"}}}).status_code == 200
        wa = c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "secrets": {"access_token": "env:E2E_WA_TOKEN"},
                "settings": {"phone_number_id": graph.phone_number_id, "base_url": graph_url, "timeout_seconds": 2},
            },
        )
        assert wa.status_code == 200, wa.text
        email = c.put(
            "/internal/channels/email/provider",
            json={
                "provider": "smtp",
                "settings": {
                    "host": "127.0.0.1",
                    "port": smtp_port,
                    "security": "none",
                    "from_address": "club@runflow.example",
                    "esp": "sendgrid",
                },
            },
        )
        assert email.status_code == 200, email.text
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        call(conn, "notify_api.set_retry_policy_v1(%s, 3, 50, 200)", svc.tenant_id)
    yield Stack(svc, graph, smtp, sendgrid)
    stop_service(svc)
    graph.stop()
    smtp.stop()


def grant(stack: Stack, ref: str) -> None:
    with stack.svc.client() as c:
        assert (
            c.post(
                f"/internal/recipients/{ref}/consents", json={"channel": "whatsapp", "status": "granted", "source": "form"}
            ).status_code
            == 201
        )


def submit(stack: Stack, **overrides: object) -> str:
    with stack.svc.client() as c:
        response = c.post("/internal/notifications", json=intent(**overrides))
        assert response.status_code == 202, response.text
        return response.json()["id"]


def statuses(body: dict) -> dict[str, str]:
    return {d["channel"]: d["status"] for d in body["deliveries"]}


def post_sendgrid(stack: Stack, events: list[dict]) -> httpx.Response:
    raw = json.dumps(events).encode()
    return httpx.post(
        f"{stack.svc.base_url}/public/webhooks/sendgrid",
        content=raw,
        headers={"content-type": "application/json", **stack.sendgrid.sign(raw)},
    )


def test_whatsapp_ends_read_and_email_delivered_through_real_providers(stack: Stack) -> None:
    grant(stack, "runner-42")
    nid = submit(stack, category="newsletter")
    body = stack.svc.wait_for(nid, lambda b: statuses(b) == {"whatsapp": "read", "email": "sent"})
    wa = next(d for d in body["deliveries"] if d["channel"] == "whatsapp")
    assert wa["provider"] == "whatsapp_cloud" and wa["provider_message_id"].startswith("wamid.fake-")
    path = [e["to"] for e in wa["events"]]  # reports arrive shuffled: read may come before delivered
    assert path[:3] == ["queued", "sending", "sent"] and path[-1] == "read" and len(path) == len(set(path))
    assert wa["delivered_at"] and wa["read_at"]
    [request] = stack.graph.requests
    assert request["body"]["template"]["components"][0]["parameters"][0]["text"] == "Ana"
    deadline = time.monotonic() + 10
    while len(stack.graph.posted) < 4:  # sent, delivered, read and one duplicate, shuffled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert all(answer == 200 for _, answer in stack.graph.posted)
    with psycopg.connect(stack.svc.db_url) as conn:  # the duplicate was stored once
        assert conn.execute("select count(*) from notify.webhook_events where provider = 'whatsapp_cloud'").fetchone()[0] == 3

    [mail] = stack.smtp.received
    correlation = json.loads(mail.message["X-SMTPAPI"])["unique_args"]["nd_correlation"]
    assert mail.message["Subject"] == "Reminder: Long run" and mail.message["List-Unsubscribe"].startswith(
        "<http://public.example/"
    )
    event = {
        "email": "ana@example.com",
        "timestamp": int(time.time()),
        "event": "delivered",
        "sg_event_id": "d1",
        "smtp-id": mail.message["Message-ID"],
        "nd_correlation": correlation,
    }
    assert post_sendgrid(stack, [event]).status_code == 200
    body = stack.svc.wait_for(nid, lambda b: statuses(b) == {"whatsapp": "read", "email": "delivered"})
    assert body["status"] == "completed"

    # RFC 8058 one-click: the link's page changes nothing, its POST records the opt-out for the category
    path = mail.message["List-Unsubscribe"].strip("<>").removeprefix("http://public.example")
    assert httpx.get(stack.svc.base_url + path).status_code == 200
    with stack.svc.client() as c:
        assert [h["source"] for h in c.get("/internal/recipients/runner-42/consents").json()["history"]] == ["form"]
    assert httpx.post(stack.svc.base_url + path, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    assert httpx.post(stack.svc.base_url + path[:-3] + "xyz").status_code == 404
    with stack.svc.client() as c:
        last = c.get("/internal/recipients/runner-42/consents").json()["history"][-1]
    assert (last["channel"], last["status"], last["category"], last["source"]) == (
        "email",
        "revoked",
        "newsletter",
        "list_unsubscribe",
    )


def test_each_failure_class_ends_in_its_documented_state(stack: Stack) -> None:
    cases = {
        "wa-window": ("+34600000101", "error:131047", "failed", "provider_rejected", "whatsapp_131047"),
        "wa-template": ("+34600000102", "error:132001", "failed", "provider_rejected", "whatsapp_132001"),
        "wa-timeout": ("+34600000103", "timeout", "unknown", "outcome_unknown", "no_response"),
        "wa-async": ("+34600000104", "async_failed:131026", "failed", "provider_reported", "whatsapp_131026"),
        "wa-optout": ("+34600000105", "error:131050", "suppressed", "provider_opt_out", "whatsapp_131050"),
    }
    ids = {}
    for ref, (phone, script, *_rest) in cases.items():
        stack.graph.scripts[phone.lstrip("+")] = [script]
        grant(stack, ref)
        ids[ref] = submit(stack, recipient={"ref": ref, "addresses": {"whatsapp": phone}}, channels=["whatsapp"])
    stack.graph.scripts["34600000106"] = ["error:130429", "ok"]  # throttled once, then accepted
    grant(stack, "wa-throttled")
    throttled = submit(stack, recipient={"ref": "wa-throttled", "addresses": {"whatsapp": "+34600000106"}}, channels=["whatsapp"])
    email_cases = {
        "bounce@example.com": ("rcpt:550 5.1.1 No such user", "bounced", "rejected_by_recipient_server"),
        "spam@example.com": ("data:554 5.7.1 Rejected", "failed", "provider_rejected"),
        "later@example.com": ("rcpt:451 4.3.0 Try later", "failed", "retries_exhausted"),
    }
    email_ids = {}
    for address, (script, *_rest) in email_cases.items():
        stack.smtp.scripts[address] = script
        email_ids[address] = submit(stack, recipient={"ref": address, "addresses": {"email": address}}, channels=["email"])

    for ref, (_, _, status, reason, code) in cases.items():
        d = stack.svc.wait_for(ids[ref], lambda b, s=status: b["deliveries"][0]["status"] == s, timeout=20)["deliveries"][0]
        assert (d["status"], d["reason"], d["error"]["code"]) == (status, reason, code), d
    d = stack.svc.wait_for(throttled, lambda b: b["deliveries"][0]["status"] == "read", timeout=20)["deliveries"][0]
    assert [a["outcome"] for a in d["attempt_history"]] == ["retry", "sent"]
    for address, (_, status, reason) in email_cases.items():
        d = stack.svc.wait_for(email_ids[address], lambda b, s=status: b["deliveries"][0]["status"] == s, timeout=20)[
            "deliveries"
        ][0]
        assert (d["status"], d["reason"]) == (status, reason), d
    assert len([r for r in stack.graph.requests if r["body"]["to"] == "34600000103"]) == 1  # an ambiguous send is never repeated


def test_the_24_hour_window_and_opt_out_keywords(stack: Stack) -> None:
    grant(stack, "runner-42")
    outside = submit(stack, template="chat", channels=["whatsapp"])
    d = stack.svc.wait_for(outside, lambda b: b["deliveries"][0]["status"] == "failed")["deliveries"][0]
    assert d["reason"] == "outside_customer_service_window" and stack.graph.requests == []
    assert stack.graph.inbound("+34600111222", "Hola, ¿a qué hora?") == 200
    inside = submit(stack, template="chat", channels=["whatsapp"])
    stack.svc.wait_for(inside, lambda b: b["deliveries"][0]["status"] == "read")
    assert stack.graph.requests[-1]["body"]["text"]["body"] == "Hola Ana"
    assert stack.graph.inbound("+34600111222", "STOP") == 200
    with stack.svc.client() as c:
        last = c.get("/internal/recipients/runner-42/consents").json()["history"][-1]
        assert (last["status"], last["source"], last["evidence"]["text"]) == ("revoked", "inbound_keyword", "STOP")
        after = c.post("/internal/notifications", json=intent(channels=["whatsapp"])).json()
    assert after["deliveries"][0] == {**after["deliveries"][0], "status": "suppressed", "reason": "no_consent"}


def test_webhook_handshake_and_provider_admin_routes(stack: Stack) -> None:
    base = stack.svc.base_url
    ok = httpx.get(
        f"{base}/public/webhooks/whatsapp",
        params={"hub.mode": "subscribe", "hub.verify_token": "verify-me", "hub.challenge": "42"},
    )
    assert (ok.status_code, ok.text) == (200, "42")
    assert (
        httpx.get(
            f"{base}/public/webhooks/whatsapp", params={"hub.mode": "subscribe", "hub.verify_token": "x", "hub.challenge": "42"}
        ).status_code
        == 403
    )
    forged = httpx.post(
        f"{base}/public/webhooks/whatsapp",
        content=b'{"object":"whatsapp_business_account","entry":[]}',
        headers={"x-hub-signature-256": "sha256=" + "0" * 64},
    )
    assert forged.status_code == 401 and forged.headers["content-type"].startswith("application/problem+json")
    with stack.svc.client() as c:
        listed = {p["channel"]: p for p in c.get("/internal/channels/providers").json()}
        assert listed["whatsapp"]["secrets"] == {"access_token": "env:E2E_WA_TOKEN"} and listed["email"]["provider"] == "smtp"
        bad = c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "settings": {"phone_number_id": "1234567"},
                "secrets": {"access_token": "EAAGm0PX4ZCpsBAKZ"},
            },
        )
        assert bad.status_code == 422 and bad.json()["field"] == "secrets.access_token"
        assert bad.json()["type"].endswith("invalid_secret_reference")
        wrong = c.put("/internal/channels/email/provider", json={"provider": "whatsapp_cloud"})
        assert wrong.status_code == 422 and wrong.json()["field"] == "provider"


def test_a_provider_outage_is_ridden_out_and_nothing_expires(stack: Stack) -> None:
    """For a few seconds the Graph API answers 503 (Meta code 2), then throttles (130429), and the SMTP server is down
    (connection refused): deliveries back off, and after recovery every one is sent once, before its expires_at.
    (A Graph API that drops connections after the request was written makes WhatsApp deliveries `unknown`, by design:
    see test_each_failure_class_ends_in_its_documented_state.)"""
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:
        call(conn, "notify_api.set_retry_policy_v1(%s, 30, 200, 1000)", stack.svc.tenant_id)
    smtp_port = stack.smtp.controller.port  # type: ignore[union-attr]
    stack.graph.outage = "http503"
    stack.smtp.stop()
    started = time.monotonic()
    phones = [f"+3460000{n:04d}" for n in range(20)]
    ids = []
    for n, phone in enumerate(phones):
        grant(stack, f"outage-{n}")
        ids.append(
            submit(
                stack,
                recipient={"ref": f"outage-{n}", "addresses": {"whatsapp": phone, "email": f"outage-{n}@example.com"}},
                expires_at="2099-01-01T00:00:00Z" if n % 2 else _in_seconds(60),
            )
        )
    with psycopg.connect(stack.svc.db_url, autocommit=True) as conn:
        deadline = time.monotonic() + 20
        while (
            conn.execute("select count(*) filter (where attempt >= 2), count(*) from notify.notification_deliveries").fetchone()[
                0
            ]
            < 40
        ):
            assert time.monotonic() < deadline, "deliveries did not retry during the outage"
            time.sleep(0.1)
        stack.graph.outage = "error:130429"  # now throttling
        time.sleep(1.5)
        stack.graph.outage = None  # recovery
        stack.smtp.start(smtp_port)
        outage = time.monotonic() - started
        for nid in ids:
            stack.svc.wait_for(
                nid, lambda b: all(d["status"] in ("sent", "delivered", "read") for d in b["deliveries"]), timeout=30
            )
        rows = conn.execute("""select channel, attempt, sent_at <= coalesce(expires_at, 'infinity'), status
                                 from notify.notification_deliveries""").fetchall()
        refused = conn.execute("select count(*) from notify.delivery_attempts where outcome = 'retry'").fetchone()[0]
    assert len(rows) == 40 and all(in_time for _, _, in_time, _ in rows)
    assert all(attempt >= 3 for _, attempt, _, _ in rows)
    assert sorted(stack.graph.accepted) == sorted(p.lstrip("+") for p in phones)  # each WhatsApp message sent once
    assert sorted(r for m in stack.smtp.received for r in m.recipients) == sorted(f"outage-{n}@example.com" for n in range(20))
    print(
        f"\nprovider outage of {outage:.1f} s: 40 of 40 deliveries sent once after recovery, all before expires_at; "
        f"{refused} retried attempts, at most {max(a for _, a, _, _ in rows)} attempts for one delivery"
    )


def _in_seconds(seconds: int) -> str:
    import datetime as dt

    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)).isoformat()
