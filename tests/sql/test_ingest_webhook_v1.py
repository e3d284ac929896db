"""notify_api.ingest_webhook_v1: a verified webhook is stored once, matched to its delivery by its provider only, input "
"checked."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.sql.test_state_machine import INGEST, current, report, sent_delivery


def test_the_same_webhook_is_stored_once(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    first = report(db, row, "delivered", "dup")
    again = report(db, row, "delivered", "dup")
    assert first["stored"] and not first["duplicate"]
    assert again == {"stored": False, "duplicate": True, "outcomes": []}
    assert db.execute("select count(*) from notify.webhook_events").fetchone()[0] == 1


def test_an_unknown_message_is_stored_as_unmatched(db, ready):
    out = db.execute(
        INGEST, ("mock", "x1", Jsonb({"a": 1}), Jsonb([{"status": "delivered", "provider_message_id": "nope"}]))
    ).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "unmatched"
    assert db.execute("select payload, outcomes->0->>'outcome' from notify.webhook_events").fetchone() == ({"a": 1}, "unmatched")


def test_another_providers_report_cannot_touch_a_delivery(db, ready):
    row = sent_delivery(db, ready, "whatsapp")
    event = {"status": "read", "tenant_id": str(row[0]), "delivery_id": str(row[1]), "provider_message_id": f"pm-{row[1]}"}
    out = db.execute(INGEST, ("other", "o1", Jsonb({}), Jsonb([event]))).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "unmatched"
    assert current(db, row) == "sent"


def test_webhook_input_is_checked(db):
    with pytest.raises(psycopg.Error) as info:
        db.execute(INGEST, ("Bad Provider!", "k", Jsonb({}), Jsonb([])))
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == "provider"
