"""The delivery state machine: illegal transitions raise, provider reports apply by rank, history is complete."""

from __future__ import annotations

import itertools

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import claim, intent, record, result, submit

INGEST = (
    "select notify_api.ingest_webhook_v1(%s, %s, %s, "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r))"
)


def sent_delivery(db: psycopg.Connection, tenant: str, channel: str) -> tuple:
    submit(db, tenant, intent(channels=[channel]))
    row = claim(db, channel)[0]
    record(db, result(row, "sent", provider_message_id=f"pm-{row[1]}"))
    return row


def report(db: psycopg.Connection, row: tuple, status: str, key: str, by: str = "id") -> dict:
    event = {"status": status, "occurred_at": "2026-11-26T10:00:00Z"}
    if by == "id":
        event |= {"tenant_id": str(row[0]), "delivery_id": str(row[1])}
    else:
        event |= {"provider_message_id": f"pm-{row[1]}"}
    return db.execute(INGEST, ("mock", key, Jsonb({}), Jsonb([event]))).fetchone()[0]


def current(db: psycopg.Connection, row: tuple) -> str:
    return db.execute("select status::text from notify.notification_deliveries where id = %s", (row[1],)).fetchone()[0]


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ("queued", "sent"),
        ("queued", "read"),
        ("queued", "unknown"),
        ("sent", "queued"),
        ("sent", "cancelled"),
        ("sent", "expired"),
        ("read", "delivered"),
        ("suppressed", "queued"),
        ("cancelled", "sending"),
        ("expired", "queued"),
    ],
)
def test_illegal_transitions_raise(db, ready, start, target):
    # only WhatsApp reports reads (notify._channel_rules): a read delivery is a WhatsApp one
    response, _ = submit(db, ready, intent(channels=["whatsapp" if start == "read" else "email"]))
    delivery = response["deliveries"][0]["id"]
    path = {
        "queued": [],
        "sent": ["sending", "sent"],
        "read": ["sending", "sent", "read"],
        "suppressed": ["suppressed"],
        "cancelled": ["cancelled"],
        "expired": ["expired"],
    }[start]
    for step in path:
        db.execute("update notify.notification_deliveries set status = %s where id = %s", (step, delivery))
    with pytest.raises(psycopg.Error) as info:
        db.execute("update notify.notification_deliveries set status = %s where id = %s", (target, delivery))
    assert info.value.sqlstate == "ND409" and info.value.diag.constraint_name == "illegal_transition"


def test_email_cannot_go_back_from_failed_but_whatsapp_can_be_proven_delivered(db, ready):
    email = sent_delivery(db, ready, "email")
    wa = sent_delivery(db, ready, "whatsapp")
    for row in (email, wa):
        db.execute("update notify.notification_deliveries set status = 'failed' where id = %s", (row[1],))
    with pytest.raises(psycopg.Error):
        db.execute("update notify.notification_deliveries set status = 'delivered' where id = %s", (email[1],))
    db.execute("update notify.notification_deliveries set status = 'delivered' where id = %s", (wa[1],))
    assert current(db, wa) == "delivered"


def test_every_change_appends_history_with_a_growing_seq(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    report(db, row, "delivered", "e1")
    report(db, row, "read", "e2")
    history = db.execute(
        "select seq, from_status::text, to_status::text, source from notify.delivery_events where delivery_id = %s order by seq",
        (row[1],),
    ).fetchall()
    assert history == [
        (1, None, "queued", "submit"),
        (2, "queued", "sending", "claim"),
        (3, "sending", "sent", "worker"),
        (4, "sent", "delivered", "webhook"),
        (5, "delivered", "read", "webhook"),
    ]
    assert db.execute("select seq from notify.notification_deliveries where id = %s", (row[1],)).fetchone()[0] == 5


def test_a_late_sent_never_overwrites_delivered(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    assert report(db, row, "delivered", "e1")["outcomes"][0]["outcome"] == "applied"
    assert report(db, row, "sent", "e2")["outcomes"][0]["outcome"] == "stale"
    assert current(db, row) == "delivered"


def test_whatsapp_delivered_beats_a_racing_failed(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    report(db, row, "delivered", "e1")
    assert report(db, row, "failed", "e2")["outcomes"][0]["outcome"] == "stale"
    assert current(db, row) == "delivered"


def test_whatsapp_failed_then_delivered_ends_delivered(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    report(db, row, "failed", "e1")
    assert current(db, row) == "failed"
    report(db, row, "delivered", "e2")
    assert current(db, row) == "delivered"


def test_email_late_bounce_beats_delivered(db, ready):
    row = sent_delivery(db, ready, "email")
    report(db, row, "delivered", "e1")
    assert report(db, row, "bounced", "e2")["outcomes"][0]["outcome"] == "applied"
    assert current(db, row) == "bounced"
    assert report(db, row, "delivered", "e3")["outcomes"][0]["outcome"] == "stale"


def test_reports_in_any_order_end_in_the_same_state(db, ready):
    statuses = ["sent", "delivered", "read"]
    for order in itertools.permutations(statuses):
        row = sent_delivery(db, ready, "whatsapp")
        for n, status in enumerate(order):
            report(db, row, status, f"{row[1]}-{n}", by="message_id")
        assert current(db, row) == "read", order


def test_a_report_can_arrive_before_the_worker_records_sent(db, ready):
    submit(db, ready, intent(channels=["whatsapp"]))
    row = claim(db, "whatsapp")[0]
    assert report(db, row, "delivered", "early")["outcomes"][0]["outcome"] == "applied"
    record(db, result(row, "sent", provider_message_id="wamid.1"))
    assert db.execute(
        "select status::text, provider_message_id from notify.notification_deliveries where id = %s", (row[1],)
    ).fetchone() == ("delivered", "wamid.1")
