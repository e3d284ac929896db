"""Attack surface: a test key (README "Test keys"). The attacker holds a test key of a tenant whose WhatsApp and e-mail
go to real providers (the Graph API fake and an SMTP server here) and tries, by every field of every submission
route's body, to make a real send. Nothing may reach either fake; every delivery it made is a test one, sent by the
mock."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from cli import commands as cli
from tests.conftest import Service, stop_service
from tests.e2e.test_test_keys import grant, start_stack
from tests.fakes.graph_api import GraphFake
from tests.fakes.smtp import SmtpFake

pytestmark = pytest.mark.slow

REAL_PHONE = "+34600111222"
REAL_EMAIL = "ana@example.com"


@pytest.fixture
def stack(db: psycopg.Connection, tmp_path) -> Iterator[tuple[Service, GraphFake, SmtpFake, str]]:  # noqa: ANN001
    svc, graph, smtp, _ = start_stack(db, tmp_path)
    with psycopg.connect(svc.db_url, autocommit=True) as conn:
        test_key, _info = cli.create_key(conn, svc.tenant_id, "attacker", test=True)
    yield svc, graph, smtp, test_key
    stop_service(svc)
    graph.stop()
    smtp.stop()


def body(ref: str, **extra: object) -> dict:
    return {
        "recipient": {"ref": ref, "addresses": {"whatsapp": REAL_PHONE, "email": REAL_EMAIL}},
        "channels": ["whatsapp", "email"],
        "template": "event_reminder",
        "variables": {"name": "Ana", "event": "Long run"},
        **extra,
    }


def test_a_test_key_cannot_make_a_real_send_by_any_field_of_the_body(stack) -> None:  # noqa: ANN001
    svc, graph, smtp, key = stack
    grant(svc, key, "victim")
    grant(svc, key, "victim-2")
    accepted: list[str] = []
    with svc.client(key) as c:
        # fields that do not exist are refused, whatever they say
        for field, value in (
            ("test", False),
            ("live", True),
            ("provider", "whatsapp_cloud"),
            ("provider_config", {"settings": {}}),
            ("mode", "live"),
        ):
            answer = c.post("/internal/notifications", json=body("victim", **{field: value}))
            assert answer.status_code in (400, 422), (field, answer.status_code, answer.text)
        answer = c.post(
            "/internal/notifications", json={**body("victim"), "recipient": {**body("victim")["recipient"], "test": False}}
        )
        assert answer.status_code in (400, 422), answer.text
        # fields that exist, with values that might look like a switch
        for extra in (
            {"metadata": {"test": False, "live": True, "provider": "whatsapp_cloud"}},
            {"variables": {"name": "Ana", "event": "Long run", "test": False}},
            {"category": "live"},
        ):
            answer = c.post("/internal/notifications", json=body("victim", **extra))
            assert answer.status_code == 202, answer.text
            accepted.append(answer.json()["id"])
        # a fan-out, with per-recipient variables
        fanout = {k: v for k, v in body("x").items() if k != "recipient"}
        fanout["recipients"] = [
            {"ref": "victim", "addresses": {"whatsapp": REAL_PHONE, "email": REAL_EMAIL}, "variables": {"test": False}},
            {"ref": "victim-2", "addresses": {"whatsapp": "+34600111333", "email": "bob@example.com"}},
        ]
        answer = c.post("/internal/notifications", json=fanout)
        assert answer.status_code == 202, answer.text
        assert answer.json()["test"] is True
        accepted.append(answer.json()["id"])
        # the batch route, an item trying a field of its own
        batch = c.post(
            "/internal/notifications/batch",
            json={
                "items": [
                    {"idempotency_key": "b-1", "notification": body("victim")},
                    {"idempotency_key": "b-2", "notification": body("victim", test=False)},
                    {"test": False},
                ]
            },
        )
        assert batch.status_code == 200, batch.text
        items = batch.json()["items"]
        assert batch.json()["test"] is True and items[0]["body"]["test"] is True
        assert [i["outcome"] for i in items] == ["accepted", "error", "error"]
        accepted.append(items[0]["body"]["id"])
        # an idempotency key: a replay of its own test request stays a test request
        first = c.post("/internal/notifications", json=body("victim"), headers={"Idempotency-Key": "same"})
        again = c.post("/internal/notifications", json=body("victim"), headers={"Idempotency-Key": "same"})
        assert first.status_code == 202 and again.status_code == 200 and again.json()["test"] is True
        accepted.append(first.json()["id"])

    for nid in accepted:
        done = svc.wait_for(
            nid,
            lambda b: (
                b["status"] == "completed" or all(d["status"] not in ("queued", "scheduled", "sending") for d in b["deliveries"])
            ),
            timeout=30,
        )
        assert done["test"] is True
        for d in done["deliveries"]:
            assert d["test"] is True and d.get("provider") == "mock", d
    assert graph.requests == [] and graph.accepted == []
    assert smtp.received == []
    with psycopg.connect(svc.db_url) as conn:  # the database agrees: every row the key made is a test one, none left the mock
        rows = conn.execute(
            "select count(*), count(*) filter (where d.test and r.test and d.provider = 'mock')"
            "  from notify.notification_deliveries d join notify.notification_requests r on r.id = d.request_id"
        ).fetchone()
    assert rows is not None and rows[0] > 0 and rows[0] == rows[1]
