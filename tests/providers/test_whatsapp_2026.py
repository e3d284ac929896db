"""WhatsApp as it is in 2026 (issue #17), end to end through the API, the worker and the Graph API fake with payloads in
Meta's 2026 shapes: business-scoped user ids (a status and an inbound message carrying only a BSUID, user_id_update),
template categories (template_category_update, marketing consent, 131049/131050), pricing, throughput per number and
the portfolio's messaging tier. Plus the adapter's parsing of those shapes, and the send body for a BSUID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from providers.base import WebhookRequest
from providers.whatsapp import WhatsAppWebhooks, classify, request_body, signature
from tests.conftest import ROOT, Service, free_port, stop_service
from tests.e2e.test_test_keys import start_stack
from tests.fakes.graph_api import GraphFake
from tests.providers.test_whatsapp import ctx, message, provider, send  # noqa: F401 - ctx: a fixture
from tests.providers.test_whatsapp import graph as graph  # noqa: F401, PLC0414 - a fixture

BSUID = "US.13491208655302741918"
NEW_BSUID = "US.77700011122233344455"
PHONE = "+34600111222"


# --- the adapter alone ------------------------------------------------------------------------------------


def test_a_bsuid_is_sent_in_recipient_and_a_phone_number_in_to() -> None:
    assert request_body(message(BSUID))["recipient"] == BSUID and "to" not in request_body(message(BSUID))
    assert request_body(message(PHONE))["to"] == "34600111222" and "recipient" not in request_body(message(PHONE))


def test_the_marketing_limit_is_retried_a_day_later_not_at_once() -> None:
    limited = classify(131049, "healthy ecosystem", 400)
    assert limited.outcome == "retry" and limited.retry_after_seconds is not None and limited.retry_after_seconds >= 86400
    assert classify(131050, "stopped marketing", 400).outcome == "suppressed"


def parse(value: dict, field: str = "messages") -> object:
    body = json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": field, "value": value}]}],
        }
    ).encode()
    return WhatsAppWebhooks(["s"]).parse(WebhookRequest({"x-hub-signature-256": signature("s", body)}, body))


def test_2026_shapes_are_normalized() -> None:
    meta = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": "106540352242922"}}
    status = parse(
        {
            **meta,
            "statuses": [
                {
                    "id": "wamid.1",
                    "status": "delivered",
                    "timestamp": "1767225600",
                    "recipient_user_id": BSUID,
                    "recipient_parent_user_id": "US.ENT.1181579921288",
                    "pricing": {
                        "billable": True,
                        "pricing_model": "PMP",
                        "category": "marketing",
                        "type": "regular",
                        "extra": "x",
                    },
                }
            ],
        }
    )
    [event] = status.events  # type: ignore[attr-defined]
    assert (event.user_id, event.recipient_phone) == (BSUID, None)
    assert event.pricing == {"pricing_model": "PMP", "category": "marketing", "type": "regular", "billable": True}
    inbound = parse(
        {
            **meta,
            "contacts": [{"profile": {"name": "A"}, "user_id": BSUID}],
            "messages": [{"id": "wamid.in", "timestamp": "1767225600", "type": "text", "text": {"body": "STOP"}}],
        }
    )
    [m] = inbound.inbound  # type: ignore[attr-defined]
    assert (m.sender, m.sender_user_id, m.text) == (None, BSUID, "STOP")
    update = parse(
        {**meta, "user_id_update": [{"wa_id": "34600111222", "user_id": {"previous": BSUID, "current": NEW_BSUID}}]},
        field="user_id_update",
    )
    assert update.updates == [
        {
            "phone_number_id": "106540352242922",
            "waba_id": "102290129340398",  # type: ignore[attr-defined]
            "kind": "user_id_update",
            "user_id": NEW_BSUID,
            "previous_user_id": BSUID,
            "wa_id": "34600111222",
            "parent_user_id": None,
        }
    ]
    category = parse(
        {
            "message_template_id": 1,
            "message_template_name": "promo",
            "message_template_language": "en_US",
            "previous_category": "UTILITY",
            "new_category": "MARKETING",
        },
        field="template_category_update",
    )
    [u] = category.updates  # type: ignore[attr-defined]
    assert (u["kind"], u["name"], u["previous_category"], u["new_category"], u["waba_id"]) == (
        "template_category_update",
        "promo",
        "utility",
        "marketing",
        "102290129340398",
    )
    tier = parse({"whatsapp_business_manager_messaging_limit": "TIER_10K"}, field="business_capability_update")
    assert tier.updates[0]["kind"] == "messaging_tier" and tier.updates[0]["tier"] == "TIER_10K"  # type: ignore[attr-defined]


def test_pacing_follows_the_numbers_configured_rate(graph, ctx, monkeypatch, db) -> None:  # noqa: ANN001, F811
    """The number's bucket is filled at its configured rate (1,000/s here, 80/s by default), never above Meta's 1,000."""
    key = f"whatsapp:{graph.phone_number_id}"
    assert [r.outcome for r in send(provider(graph, ctx, monkeypatch, rate_per_second=1000), message())] == ["sent"]
    assert 900 < db.execute("select tokens from notify.rate_buckets where key = %s", (key,)).fetchone()[0] <= 1000
    db.execute("delete from notify.rate_buckets")
    settings = {"rate_per_second": None}
    assert [r.outcome for r in send(provider(graph, ctx, monkeypatch, **settings), message())] == ["sent"]
    assert db.execute("select tokens from notify.rate_buckets where key = %s", (key,)).fetchone()[0] <= 80
    db.execute("delete from notify.rate_buckets")
    send(provider(graph, ctx, monkeypatch, rate_per_second=5000), message())
    assert db.execute("select tokens from notify.rate_buckets where key = %s", (key,)).fetchone()[0] <= 1000


# --- end to end -------------------------------------------------------------------------------------------


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path) -> Iterator[tuple[Service, GraphFake, str]]:  # noqa: ANN001
    api_metrics = free_port()
    svc, graph, smtp, _ = start_stack(db, tmp_path, {"DISPATCHER_METRICS_PORT": str(api_metrics)})
    with svc.client() as c:
        answer = c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "secrets": {"access_token": "env:E2E_WA_TOKEN"},
                "settings": {
                    "phone_number_id": graph.phone_number_id,
                    "base_url": graph.base_url,  # type: ignore[attr-defined]
                    "timeout_seconds": 2,
                    "waba_id": graph.waba_id,
                    "rate_per_second": 1000,
                },
            },
        )
        assert answer.status_code == 200, answer.text
        assert c.put("/internal/templates/chat", json={"channels": {"whatsapp": {"text": "Hola {{name}}"}}}).status_code == 200
        promo = {
            "channels": {"whatsapp": {"name": "spring_promo", "language": "en", "parameters": ["name"], "category": "utility"}}
        }
        assert c.put("/internal/templates/promo", json=promo).status_code == 200
    yield svc, graph, f"http://127.0.0.1:{api_metrics}/metrics"
    stop_service(svc)
    graph.stop()
    smtp.stop()


def consent(svc: Service, ref: str, status: str = "granted", category: str | None = None) -> None:
    body = {"channel": "whatsapp", "status": status, "source": "form", **({"category": category} if category else {})}
    with svc.client() as c:
        assert c.post(f"/internal/recipients/{ref}/consents", json=body).status_code == 201


def submit(svc: Service, ref: str, address: str, template: str = "event_reminder", **extra: object) -> str:
    body = {
        "recipient": {"ref": ref, "addresses": {"whatsapp": address}},
        "channels": ["whatsapp"],
        "template": template,
        "variables": {"name": "Ana", "event": "Long run"},
        **extra,
    }
    with svc.client() as c:
        answer = c.post("/internal/notifications", json=body)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]


def delivery(svc: Service, nid: str, status: str) -> dict:
    return svc.wait_for(nid, lambda b: b["deliveries"][0]["status"] == status, timeout=20)["deliveries"][0]


def ingested(svc: Service, kind: str, count: int = 1) -> list[dict]:
    """The outcomes the webhook events of one kind got (the fake's posts are answered before they are read here)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(svc.db_url) as conn:
        while True:
            rows = conn.execute(
                "select o from notify.webhook_events, jsonb_array_elements(outcomes) o where o ->> 'update' = %s", (kind,)
            ).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                return [r[0] for r in rows]
            time.sleep(0.05)


def test_a_recipient_known_only_by_its_bsuid_is_sent_to_and_its_statuses_and_pricing_reach_it(stack) -> None:  # noqa: ANN001
    svc, graph, api_metrics = stack
    graph.users[BSUID] = ""  # Meta knows no phone number for it: statuses carry only recipient_user_id
    consent(svc, "bsuid-only")
    nid = submit(svc, "bsuid-only", BSUID)
    d = delivery(svc, nid, "read")
    [request] = graph.requests
    assert request["body"]["recipient"] == BSUID and "to" not in request["body"]
    assert d["pricing"] == {"billable": True, "pricing_model": "PMP", "category": "utility", "type": "regular"}
    scraped = httpx.get(api_metrics, timeout=5).text
    assert (
        'dispatcher_priced_messages_total{billable="true",category="utility",pricing_model="PMP",provider="whatsapp"} 1.0'
        in scraped
    )


def test_a_status_with_only_the_bsuid_maps_it_and_an_inbound_message_by_bsuid_opens_the_window_and_opts_out(stack) -> None:  # noqa: ANN001
    svc, graph, _ = stack
    phone = PHONE.lstrip("+")
    graph.users[BSUID] = phone
    graph.hidden_phones.add(phone)  # a user with a username: statuses name only the BSUID
    consent(svc, "runner-42")
    d = delivery(svc, submit(svc, "runner-42", PHONE), "read")
    assert d["provider"] == "whatsapp_cloud"
    with psycopg.connect(svc.db_url) as conn:
        assert conn.execute("select wa_id from notify.whatsapp_users where user_id = %s", (BSUID,)).fetchone() == (phone,)
    # free-form text needs the 24-hour window, which the user opens by writing in, known only by its BSUID
    closed = delivery(svc, submit(svc, "runner-42", PHONE, template="chat"), "failed")
    assert closed["reason"] == "outside_customer_service_window"
    assert graph.inbound("", "hola", user_id=BSUID) == 200
    opened = delivery(svc, submit(svc, "runner-42", PHONE, template="chat"), "read")
    assert opened["provider"] == "whatsapp_cloud"
    # and an opt-out keyword from the BSUID alone revokes the phone number's recipient
    assert graph.inbound("", "STOP", user_id=BSUID) == 200
    with svc.client() as c:
        last = c.get("/internal/recipients/runner-42/consents").json()["history"][-1]
    assert (last["channel"], last["status"], last["source"]) == ("whatsapp", "revoked", "inbound_keyword")
    assert last["evidence"]["user_id"] == BSUID


def test_a_user_id_update_keeps_the_recipient_reachable_by_its_new_bsuid(stack) -> None:  # noqa: ANN001
    svc, graph, _ = stack
    graph.users[BSUID] = ""
    consent(svc, "renamed")
    delivery(svc, submit(svc, "renamed", BSUID), "read")
    assert graph.inbound("", "hola", user_id=BSUID) == 200
    assert graph.user_id_update(BSUID, NEW_BSUID) == 200
    assert [o["outcome"] for o in ingested(svc, "user_id_update")] == ["user_id_updated"]
    with svc.client() as c:
        assert c.get("/internal/recipients/renamed").json()["addresses"]["whatsapp"] == NEW_BSUID
    graph.users[NEW_BSUID] = ""
    with svc.client() as c:  # the caller's next submission still names the old id: the one stored wins only if unchanged
        body = {"recipient": {"ref": "renamed"}, "channels": ["whatsapp"], "template": "chat", "variables": {"name": "Ana"}}
        nid = c.post("/internal/notifications", json=body).json()["id"]
    d = delivery(svc, nid, "read")  # free-form: the window opened under the old id moved to the new one
    assert graph.requests[-1]["body"]["recipient"] == NEW_BSUID and d["status"] == "read"


def test_template_categories_follow_meta_and_marketing_needs_marketing_consent(stack) -> None:  # noqa: ANN001
    svc, graph, _ = stack
    consent(svc, "shopper", category="transactional")  # the caller's own category; no channel-wide grant (opt-in)
    promo = {"template": "promo", "category": "transactional"}
    assert graph.template_category_update("spring_promo", "en", "marketing", correct="marketing") == 200  # impending
    assert [o["outcome"] for o in ingested(svc, "template_category_update")] == ["category_update_impending"]
    delivery(svc, submit(svc, "shopper", PHONE, **promo), "read")  # still utility: sent
    assert graph.template_category_update("spring_promo", "en", "marketing", previous="utility") == 200  # completed
    assert [o["outcome"] for o in ingested(svc, "template_category_update", 2)][-1] == "category_updated"
    with svc.client() as c:
        [tpl] = c.get("/internal/templates", params={"key": "promo"}).json()
    assert tpl["content"]["category"] == "marketing"
    # now marketing: the request's category (consented) is not enough, the template needs marketing consent
    suppressed = delivery(svc, submit(svc, "shopper", PHONE, **promo), "suppressed")
    assert suppressed["reason"] == "no_consent" and len(graph.requests) == 1
    consent(svc, "shopper", category="marketing")
    delivery(svc, submit(svc, "shopper", PHONE, **promo), "read")
    assert len(graph.requests) == 2


def test_marketing_error_codes(stack) -> None:  # noqa: ANN001
    svc, graph, _ = stack
    for ref in ("limited", "stopped"):
        consent(svc, ref)
        consent(svc, ref, category="marketing")
    graph.scripts["34600000149"] = ["error:131049"]
    graph.scripts["34600000150"] = ["error:131050"]
    limited = submit(svc, "limited", "+34600000149", template="promo")
    stopped = submit(svc, "stopped", "+34600000150", template="promo")
    d = svc.wait_for(limited, lambda b: b["deliveries"][0]["attempt_history"] and b["deliveries"][0]["status"] == "queued")
    d = d["deliveries"][0]
    assert d["error"]["code"] == "whatsapp_131049" and d["attempt_history"][0]["outcome"] == "retry"
    with psycopg.connect(svc.db_url) as conn:  # not retried at once: a day later
        assert conn.execute(
            "select due_at > now() + interval '23 hours' from notify.notification_deliveries where id = %s", (d["id"],)
        ).fetchone() == (True,)
    d = delivery(svc, stopped, "suppressed")
    assert (d["reason"], d["error"]["code"]) == ("provider_opt_out", "whatsapp_131050")
    with svc.client() as c:
        last = c.get("/internal/recipients/stopped/consents").json()["history"][-1]
    assert (last["status"], last["category"], last["source"]) == ("revoked", "marketing", "provider_opt_out")
    assert last["evidence"]["delivery_id"] == d["id"] and last["evidence"]["error_code"] == "whatsapp_131050"


def test_throughput_limits_and_the_messaging_tier_in_dispatcher_status(stack) -> None:  # noqa: ANN001
    svc, graph, _ = stack
    with svc.client() as c:
        too_fast = c.put(
            "/internal/channels/whatsapp/provider",
            json={
                "provider": "whatsapp_cloud",
                "secrets": {"access_token": "env:E2E_WA_TOKEN"},
                "settings": {"phone_number_id": graph.phone_number_id, "rate_per_second": 1001},
            },
        )
    assert too_fast.status_code == 400 and too_fast.json()["field"] == "settings.rate_per_second"
    env = {**os.environ, "DATABASE_URL": svc.db_url}

    def status(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", "status", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        ).stdout

    assert "messaging tier" not in status()
    assert graph.business_capability_update("TIER_10K") == 200
    assert [o["outcome"] for o in ingested(svc, "messaging_tier")] == ["tier_recorded"]
    assert f"whatsapp messaging tier: tenant acme business account {graph.waba_id}: TIER_10K" in status()
    assert isinstance(json.loads(status("--json")), list)  # the JSON answer keeps its shape (the queues)
