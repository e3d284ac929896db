"""Fallback routes end to end (issue #14): HTTP submit -> worker -> mock provider -> signed webhooks -> the route
advances in the database. The mock's magic addresses (README "Test keys and magic addresses") decide each outcome."""

from __future__ import annotations

import pytest

from tests.conftest import REMINDER, Service

pytestmark = pytest.mark.slow

WA_FAILS = "+12025550103"  # failed at once (provider_rejected)
WA_DELIVERED = "+12025550100"  # sent, then delivered by a report
WA_UNKNOWN = "+12025550104"  # unknown, no report follows
EMAIL = "delivered@simulator.dispatcher.test"


def send(svc: Service, ref: str, whatsapp: str, within: str = "PT15M") -> str:
    with svc.client() as c:
        assert c.put("/internal/templates/event_reminder", json=REMINDER).status_code == 200
        consent = {"channel": "whatsapp", "status": "granted", "source": "signup_form"}
        assert c.post(f"/internal/recipients/{ref}/consents", json=consent).status_code == 201
        body = {
            "recipient": {"ref": ref, "addresses": {"whatsapp": whatsapp, "email": EMAIL}, "locale": "en"},
            "route": [{"channel": "whatsapp", "until": "delivered", "within": within}, {"channel": "email"}],
            "template": "event_reminder",
            "variables": {"name": "Ana", "event": "Long run"},
            "priority": "high",
        }
        accepted = c.post("/internal/notifications", json=body)
        assert accepted.status_code == 202, accepted.text
        assert [(d["step"], d["status"]) for d in accepted.json()["deliveries"]] == [(1, "queued"), (2, "waiting")]
        return accepted.json()["id"]


def by_step(body: dict) -> dict[int, dict]:
    return {d["step"]: d for d in body["deliveries"]}


def test_a_failed_whatsapp_step_sends_the_email(service: Service) -> None:
    nid = send(service, "r-fails", WA_FAILS)
    body = service.wait_for(nid, lambda b: by_step(b)[2]["status"] == "delivered")
    steps = by_step(body)
    assert (steps[1]["status"], steps[1]["reason"]) == ("failed", "provider_rejected")
    assert steps[2]["attempts"] == 1
    assert [(e["to"], e["source"], e.get("reason")) for e in steps[2]["events"]][:3] == [
        ("waiting", "submit", None),
        ("queued", "route", "step_1_failed"),
        ("sending", "claim", "step_1_failed"),
    ]
    assert body["route"][0]["within"] == "PT15M" and body["priority"] == "high"


def test_a_delivered_whatsapp_step_makes_the_email_not_needed(service: Service) -> None:
    nid = send(service, "r-delivered", WA_DELIVERED)
    body = service.wait_for(nid, lambda b: b["status"] == "completed")
    steps = by_step(body)
    assert steps[1]["status"] == "delivered"
    assert (steps[2]["status"], steps[2]["reason"], steps[2]["attempts"]) == ("not_needed", "step_1_delivered", 0)
    with service.client() as c:
        sent = c.get("/internal/mock/messages", params={"delivery_id": steps[2]["id"]}).json()
    assert sent == []


def test_an_unknown_whatsapp_outcome_sends_the_email_when_within_runs_out(service: Service) -> None:
    nid = send(service, "r-unknown", WA_UNKNOWN, within="PT1S")
    body = service.wait_for(nid, lambda b: by_step(b)[2]["status"] == "delivered")
    steps = by_step(body)
    assert steps[1]["status"] == "unknown"
    assert [e["to"] for e in steps[2]["events"]][:2] == ["waiting", "sending"]
    assert steps[2]["events"][1]["reason"] == "step_1_not_delivered_in_time"
