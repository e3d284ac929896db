"""notify_api.get_notification_timeline_v1 (`dispatcher notifications show`): the provider reports on a delivery
appear in its timeline (kind webhook: provider, reported status, what ingest did), found by our delivery id or by the
provider's message id, never the raw payload, and never another tenant's entries of the same webhook."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, call, claim, intent, record, result, submit
from tests.sql.test_state_machine import INGEST


def ingest(db, provider: str, key: str, payload: dict, events: list[dict]) -> dict:
    return db.execute(INGEST, (provider, key, Jsonb(payload), Jsonb(events))).fetchone()[0]


def webhooks(db, tenant: str, notification: str) -> list[dict]:
    got = call(db, "notify_api.get_notification_timeline_v1(%s, %s)", tenant, notification)
    return [e for e in got["timeline"] if e["kind"] == "webhook"]


def test_provider_reports_appear_by_delivery_id_and_by_message_id_without_the_payload(db, ready):
    sent, _ = submit(db, ready, intent(channels=["email"]))
    [row] = claim(db, "email")
    record(db, result(row, "sent", provider_message_id="pm-timeline-1"))
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", other, Jsonb(REMINDER))
    theirs, _ = submit(db, other, intent(channels=["email"]))
    [their_row] = claim(db, "email")
    record(db, result(their_row, "sent", provider_message_id="pm-timeline-2"))

    # One webhook reporting on both tenants' deliveries, with a phone number in its payload.
    ingest(
        db,
        "mock",
        "batch-1",
        {"secret": "+34600111222"},
        [
            {"provider_message_id": "pm-timeline-1", "status": "delivered", "occurred_at": "2026-12-01T10:00:00Z"},
            {"provider_message_id": "pm-timeline-2", "status": "delivered", "occurred_at": "2026-12-01T10:00:00Z"},
        ],
    )
    ingest(
        db,
        "mock",
        "batch-2",
        {},
        [{"tenant_id": ready, "delivery_id": str(row[1]), "status": "sent", "occurred_at": "2026-12-01T10:00:01Z"}],
    )
    # Another provider's report naming the same message id is not about our delivery (ingest would not match it).
    ingest(db, "sendgrid", "sg-1", {}, [{"provider_message_id": "pm-timeline-1", "status": "bounced"}])

    mine = webhooks(db, ready, sent["id"])
    assert [(e["provider"], e["status"], e["outcome"]) for e in mine] == [
        ("mock", "delivered", "applied"),
        ("mock", "sent", "stale"),
    ], mine
    assert all(e["delivery_id"] == str(row[1]) and "payload" not in e and "+34600111222" not in str(e) for e in mine)
    assert [(e["status"], e["delivery_id"]) for e in webhooks(db, other, theirs["id"])] == [("delivered", str(their_row[1]))]
