"""notify_api.find_notifications_v1 (and get_notification_v2, list_deliveries_v1): find notifications without their id,
newest first, by keyset pages; a fan-out read as a summary and its deliveries page by page."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, record, result, submit


def find(db, tenant, filters=None, cursor=None, limit=50):
    return call(db, "notify_api.find_notifications_v1(%s, %s, %s, %s)", tenant, Jsonb(filters or {}), cursor, limit)


def ids(page):
    return [i["id"] for i in page["items"]]


def test_newest_first_with_every_filter(db, ready):
    a, _ = submit(db, ready, intent(metadata={"order": "7"}, category="reminders"), key="k-a")
    b, _ = submit(db, ready, intent(recipient={"ref": "runner-7", "addresses": {"email": "bo@example.com"}}, channels=["email"]))
    c, _ = submit(db, ready, intent(channels=["email"], metadata={"order": "8"}))
    assert ids(find(db, ready)) == [c["id"], b["id"], a["id"]]
    assert ids(find(db, ready, {"recipient": "runner-42"})) == [c["id"], a["id"]]
    assert ids(find(db, ready, {"recipient": "runner-7"})) == [b["id"]]
    assert ids(find(db, ready, {"recipient": "nobody"})) == []
    assert ids(find(db, ready, {"idempotency_key": "k-a"})) == [a["id"]]
    assert ids(find(db, ready, {"channel": "whatsapp"})) == [a["id"]]
    assert ids(find(db, ready, {"category": "reminders"})) == [a["id"]]
    assert ids(find(db, ready, {"template": "event_reminder"})) == [c["id"], b["id"], a["id"]]
    assert ids(find(db, ready, {"template": "other"})) == []
    assert ids(find(db, ready, {"metadata_key": "order", "metadata_value": "8"})) == [c["id"]]
    assert ids(find(db, ready, {"created_from": "2000-01-01T00:00:00Z", "created_to": "2000-01-02T00:00:00Z"})) == []
    assert ids(find(db, ready, {"created_from": "2000-01-01T00:00:00Z"})) == [c["id"], b["id"], a["id"]]
    # status is a delivery's: suppressed (no whatsapp address for runner-7's email-only intent is not whatsapp) vs queued
    [row] = [r for r in claim(db, "email") if str(r[1]) == b["deliveries"][0]["id"]] or [None]
    assert row is not None
    record(db, result(row, "failed", error_code="x"))
    assert ids(find(db, ready, {"status": "failed"})) == [b["id"]]
    assert ids(find(db, ready, {"status": "failed", "recipient": "runner-42"})) == []
    item = find(db, ready, {"recipient": "runner-42", "channel": "email"})["items"][0]
    assert item["recipient"] == "runner-42" and [d["channel"] for d in item["deliveries"]] == ["email"]


def test_keyset_pages_walk_everything_once(db, ready):
    made = [submit(db, ready, intent(channels=["email"]), key=f"p-{i}")[0]["id"] for i in range(7)]
    seen, cursor = [], None
    while True:
        page = find(db, ready, {"recipient": "runner-42"}, cursor, limit=3)
        seen += ids(page)
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    # the tenant-wide walk too
    first = find(db, ready, {}, None, 5)
    second = find(db, ready, {}, first["next_cursor"], 5)
    assert ids(first) + ids(second) == made[::-1] and second["next_cursor"] is None


@pytest.mark.parametrize(
    ("filters", "cursor", "limit", "field"),
    [
        ({"status": "lost"}, None, 10, "status"),
        ({"channel": "fax"}, None, 10, "channel"),
        ({"created_from": "yesterday-ish"}, None, 10, "created_from"),
        ({"metadata_key": "order"}, None, 10, "metadata_value"),
        ({"colour": "red"}, None, 10, "colour"),
        ({"recipient": 42}, None, 10, "recipient"),
        ({}, "not-a-cursor", 10, "cursor"),
        ({}, "bm90LmEuY3Vyc29y", 10, "cursor"),
        ({}, None, 0, "limit"),
        ({}, None, 201, "limit"),
    ],
)
def test_a_bad_filter_or_cursor_is_422_naming_the_field(db, ready, filters, cursor, limit, field):
    with pytest.raises(psycopg.Error) as err:
        find(db, ready, filters, cursor, limit)
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == field


def test_another_tenant_finds_nothing(db, ready):
    submit(db, ready, intent(), key="shared-key")
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    for filters in ({}, {"recipient": "runner-42"}, {"idempotency_key": "shared-key"}, {"template": "event_reminder"}):
        assert find(db, other, filters)["items"] == [], filters


def test_a_page_stops_at_the_read_budget_and_says_where_to_go_on(db, ready):
    # 1,003 requests, only the oldest matches: the first call reads 1,000 candidates, answers none and a cursor.
    submit(db, ready, intent(channels=["email"], category="rare"))
    db.execute(
        """insert into notify.notification_requests (tenant_id, fingerprint, template_key, channels, created_at)
           select %s, '\\x00', 'event_reminder', '{email}', now() + g * interval '1 ms' from generate_series(1, 1002) g""",
        (ready,),
    )
    page = find(db, ready, {"category": "rare"})
    assert page["items"] == [] and page["next_cursor"] is not None
    page = find(db, ready, {"category": "rare"}, page["next_cursor"])
    assert len(page["items"]) == 1 and page["next_cursor"] is None


def fanout(n):
    return {
        "recipients": [{"ref": f"f-{i}", "addresses": {"email": f"f{i}@example.com"}} for i in range(n)],
        "channels": ["email"],
        "template": "event_reminder",
        "variables": {"name": "A", "event": "B"},
    }


def test_a_small_notification_keeps_its_deliveries_inline(db, ready):
    response, _ = submit(db, ready, intent())
    shown = call(db, "notify_api.get_notification_v2(%s, %s)", ready, response["id"])
    v1 = call(db, "notify_api.get_notification_v1(%s, %s)", ready, response["id"])
    assert [d["id"] for d in shown["deliveries"]] == [d["id"] for d in v1["deliveries"]]
    assert shown["deliveries"][0]["events"] and shown["deliveries"][0]["recipient"] == "runner-42"
    assert shown["delivery_count"] == 2 and {(s["channel"], s["status"]) for s in shown["summary"]} == {
        ("whatsapp", "queued"),
        ("email", "queued"),
    }


def test_a_large_fanout_answers_a_summary_and_pages_its_deliveries(db, ready):
    response, _ = submit(db, ready, fanout(250))
    shown = call(db, "notify_api.get_notification_v2(%s, %s)", ready, response["id"])
    assert "deliveries" not in shown and shown["deliveries_omitted"] is True
    assert shown["recipient_count"] == 250 and shown["summary"] == [{"channel": "email", "status": "queued", "count": 250}]
    seen, cursor, pages = [], None, 0
    while True:
        page = call(db, "notify_api.list_deliveries_v1(%s, %s, %s, %s)", ready, response["id"], cursor, 100)
        seen += [(d["recipient"], d["id"]) for d in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 250 and len(set(seen)) == 250
    assert {r for r, _ in seen} == {f"f-{i}" for i in range(250)}
    with pytest.raises(psycopg.Error) as err:
        call(db, "notify_api.list_deliveries_v1(%s, %s, %s, %s)", ready, response["id"], "garbage!", 10)
    assert err.value.sqlstate == "ND422" and err.value.diag.column_name == "cursor"
    other = str(call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"])
    for fn in ("get_notification_v2(%s, %s)", "list_deliveries_v1(%s, %s)"):
        with pytest.raises(psycopg.Error) as err:
            call(db, f"notify_api.{fn}", other, response["id"])
        assert err.value.sqlstate == "ND404"


def test_a_fanout_is_found_by_any_of_its_recipients_with_that_recipients_deliveries(db, ready):
    fan, _ = submit(db, ready, fanout(5))
    single, _ = submit(db, ready, intent(recipient={"ref": "f-3", "addresses": {"email": "f3@example.com"}}, channels=["email"]))
    page = find(db, ready, {"recipient": "f-3"})
    assert ids(page) == [single["id"], fan["id"]]
    item = page["items"][1]
    assert item["recipient_count"] == 5 and "recipient" not in item and len(item["deliveries"]) == 1
    listed = find(db, ready)["items"]
    assert [("deliveries" in i) for i in listed] == [True, False]  # a fan-out listed without a recipient: no deliveries
