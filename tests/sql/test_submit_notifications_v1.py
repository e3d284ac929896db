"""notify_api.submit_notifications_v1: a batch of independent intents, each item succeeding or failing alone."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import intent
from tests.sql.test_submit_notification_v1__fanout import batch


def test_a_batch_reports_each_item_in_order_and_a_bad_one_rejects_no_other(db, ready):
    items = [
        {
            "idempotency_key": f"b-{i}",
            "notification": intent(recipient={"ref": f"r-{i}", "addresses": {"email": f"r{i}@example.com"}}, channels=["email"]),
        }
        for i in range(5)
    ]
    items[2]["notification"]["template"] = "missing"
    items[3] = {"idempotency_key": "b-3", "notification": {**items[3]["notification"], "colour": "red"}}
    out = batch(db, ready, items)
    assert [(i["index"], i["outcome"], i["status"]) for i in out["items"]] == [
        (0, "accepted", 202),
        (1, "accepted", 202),
        (2, "error", 422),
        (3, "error", 400),
        (4, "accepted", 202),
    ]
    assert out["items"][2]["error"] == {
        "type": "template_not_found",
        "field": "template",
        "detail": "template missing has no email content for locale en or its fallbacks",
    }
    assert out["items"][3]["error"]["field"] == "colour"
    assert (out["accepted"], out["replayed"], out["failed"]) == (3, 0, 2)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 3
    assert db.execute("select count(*) from notify.recipients where ref in ('r-2', 'r-3')").fetchone()[0] == 0
    again = batch(db, ready, items[:2])
    assert [i["outcome"] for i in again["items"]] == ["replayed", "replayed"]
    assert again["items"][0]["body"] == out["items"][0]["body"]


def test_batch_limits_and_shapes(db, ready):
    with pytest.raises(psycopg.Error) as info:
        batch(db, ready, [])
    assert info.value.diag.column_name == "items"
    out = batch(db, ready, [{"notification": "nope"}, {"idempotency_key": 5, "notification": intent()}])
    assert [i["status"] for i in out["items"]] == [400, 400]


def test_a_batch_respects_consent_per_item(db, ready):
    out = batch(
        db,
        ready,
        [
            {"notification": intent(channels=["whatsapp"])},
            {
                "notification": intent(
                    channels=["whatsapp"], recipient={"ref": "stranger", "addresses": {"whatsapp": "+34600999000"}}
                )
            },
        ],
    )
    statuses = [i["body"]["deliveries"][0]["status"] for i in out["items"]]
    assert statuses == ["queued", "suppressed"]
