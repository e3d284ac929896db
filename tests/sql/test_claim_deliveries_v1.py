"""notify_api.claim_deliveries_v1 and record_attempts_v1: batches, fencing, retries, expiry, consent at claim."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, submit
from tests.sql.test_set_channel_provider_v1 import INGEST, WA, set_provider


def status(conn: psycopg.Connection, delivery_id: object) -> tuple:
    return conn.execute(
        "select status::text, attempt, reason from notify.notification_deliveries where id = %s", (delivery_id,)
    ).fetchone()


def test_claim_takes_a_batch_and_returns_what_to_send(db, ready):
    for _ in range(5):
        submit(db, ready, intent(channels=["email"]))
    rows = claim(db, "email", limit=3)
    assert len(rows) == 3
    first = rows[0]
    assert first[3] == "email" and first[4] == "ana@example.com" and first[5] == "event_reminder"
    assert first[7]["subject"] == "Reminder: {{event}}" and first[8] == {"name": "Ana", "event": "Long run"}
    assert {status(db, r[1])[:2] for r in rows} == {("sending", 1)}
    assert len(claim(db, "email", limit=10)) == 2
    assert claim(db, "email") == []


def test_claim_only_takes_its_channel_and_due_rows(db, ready):
    submit(db, ready, intent(channels=["whatsapp"], send_at="2099-01-01T00:00:00Z"))
    submit(db, ready, intent(channels=["email"]))
    assert claim(db, "whatsapp") == []
    assert len(claim(db, "email")) == 1


def test_concurrent_claims_are_disjoint(db, ready, connect):
    for _ in range(10):
        submit(db, ready, intent(channels=["email"]))
    a, b = connect(), connect()
    rows_a = claim(a, "email", limit=6)  # a holds its row locks (transaction open)
    rows_b = claim(b, "email", limit=6)  # b skips them
    a.commit()
    b.commit()
    ids_a, ids_b = {r[1] for r in rows_a}, {r[1] for r in rows_b}
    assert len(ids_a) == 6 and len(ids_b) == 4 and not ids_a & ids_b


def test_claim_expires_what_is_past_its_deadline(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"], expires_at="2099-01-01T00:00:00Z"))
    delivery = response["deliveries"][0]["id"]
    db.execute("update notify.notification_deliveries set expires_at = now() - interval '1 second' where id = %s", (delivery,))
    assert claim(db, "email") == []
    assert status(db, delivery) == ("expired", 0, "expired_before_send")


def test_consent_revoked_after_submit_suppresses_at_claim(db, ready):
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "revoked", "source": "reply_stop"}),
    )
    assert claim(db, "whatsapp") == []
    assert status(db, response["deliveries"][0]["id"]) == ("suppressed", 0, "no_consent")


def test_claim_limit_is_checked(db, ready):
    with pytest.raises(psycopg.Error) as info:
        claim(db, "email", limit=0)
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == "limit"


def test_scheduled_deliveries_are_claimed_when_due(db, ready):
    response, _ = submit(
        db, ready, intent(channels=["email"], send_at=(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat())
    )
    assert claim(db, "email") == []
    db.execute("update notify.notification_deliveries set due_at = now() - interval '1 second'")
    rows = claim(db, "email")
    assert [r[1] for r in rows] == [response["deliveries"][0]["id"]] or str(rows[0][1]) == response["deliveries"][0]["id"]


def test_the_claim_carries_the_tenants_provider(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    submit(db, ready, intent())
    wa, email = claim(db, "whatsapp")[0], claim(db, "email")[0]
    assert wa[11] == "whatsapp_cloud" and wa[12]["settings"]["phone_number_id"] == "106540352242922"
    assert wa[12]["secrets"] == {"access_token": "env:TEST_WA_TOKEN"}
    assert wa[12]["grants"] == {"env_prefix": "TEST_", "file_dir": None, "private_endpoints": False}
    assert email[11] == "mock" and email[12] is None


def test_free_form_text_outside_the_window_is_refused_and_an_inbound_message_opens_it(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_template_v1(%s, 'chat', %s)", ready, Jsonb({"channels": {"whatsapp": {"text": "Hi {{name}}"}}}))
    first, _ = submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert claim(db, "whatsapp") == []
    assert db.execute("select status::text, reason from notify.notification_deliveries").fetchone() == (
        "failed",
        "outside_customer_service_window",
    )
    db.execute(
        INGEST,
        (
            "in-1",
            Jsonb(
                [
                    {
                        "phone_number_id": "106540352242922",
                        "sender": "34600111222",
                        "message_id": "wamid.in1",
                        "text": "hola",
                        "received_at": "2026-11-26T10:00:00Z",
                    }
                ]
            ),
        ),
    )
    db.execute("update notify.whatsapp_windows set last_inbound_at = now()")
    submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert len(claim(db, "whatsapp")) == 1
    db.execute("update notify.whatsapp_windows set last_inbound_at = now() - interval '25 hours'")
    submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert claim(db, "whatsapp") == []


def test_template_messages_need_no_window(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    submit(db, ready, intent(channels=["whatsapp"]))
    assert len(claim(db, "whatsapp")) == 1
