"""notify_api.submit_notification_v1 with a fallback route (`route` instead of `channels`) and a `priority` (issue #14):
parse errors naming the field, the answer and the stored steps, fan-out, batch, priority."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit

ROUTE = [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}]


def routed(**overrides: object) -> dict:
    body = intent(**overrides)
    body.pop("channels", None)
    body.setdefault("route", ROUTE)
    return body


def raises(db: psycopg.Connection, tenant: str, body: dict) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        submit(db, tenant, body)
    return info.value


def deliveries(db: psycopg.Connection, request_id: str) -> list[tuple]:
    return db.execute(
        "select route_step, channel, status, reason, due_at = 'infinity', route_until, route_within, priority"
        " from notify.notification_deliveries where request_id = %s order by route_step",
        (request_id,),
    ).fetchall()


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"route": []}, "route", "missing_field"),
        ({"route": {"channel": "email"}}, "route", "missing_field"),
        ({"route": ["email"]}, "route[0]", "invalid_type"),
        ({"route": [{"channel": "email", "colour": "red"}]}, "route[0].colour", "unknown_field"),
        ({"route": [{"until": "sent"}]}, "route[0].channel", "invalid_channel"),
        ({"route": [{"channel": "pager"}]}, "route[0].channel", "invalid_channel"),
        ({"route": [{"channel": "email", "within": "PT1M"}, {"channel": "email"}]}, "route[1].channel", "duplicate_channel"),
        ({"route": [{"channel": "whatsapp", "until": "opened"}, {"channel": "email"}]}, "route[0].until", "invalid_value"),
        ({"route": [{"channel": "whatsapp", "until": 1}, {"channel": "email"}]}, "route[0].until", "invalid_value"),
        # e-mail reports no reads (an open is a flag, not a status): a later step would wait for it forever, or
        # always follow after within
        ({"route": [{"channel": "email", "until": "read"}, {"channel": "sms"}]}, "route[0].until", "invalid_value"),
        (
            {"route": [{"channel": "whatsapp", "within": "15 minutes"}, {"channel": "email"}]},
            "route[0].within",
            "invalid_duration",
        ),
        ({"route": [{"channel": "whatsapp", "within": 900}, {"channel": "email"}]}, "route[0].within", "invalid_type"),
        ({"route": [{"channel": "whatsapp", "within": "P1M"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        ({"route": [{"channel": "whatsapp", "within": "PT"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        ({"route": [{"channel": "whatsapp", "within": "P1DT"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        ({"route": [{"channel": "whatsapp", "within": "PT0S"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        ({"route": [{"channel": "whatsapp", "within": "-PT5M"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        ({"route": [{"channel": "whatsapp", "within": "P31D"}, {"channel": "email"}]}, "route[0].within", "invalid_duration"),
        (
            {"route": [{"channel": "whatsapp", "within": "PT99999999999999999999H"}, {"channel": "email"}]},
            "route[0].within",
            "invalid_duration",
        ),
        (
            {"route": [{"channel": "whatsapp", "within": "PT5M"}, {"channel": "email", "within": "PT5M"}]},
            "route[1].within",
            "invalid_value",
        ),
        ({"channels": ["email"]}, "route", "invalid_value"),
        ({"priority": "urgent"}, "priority", "invalid_value"),
        ({"priority": 1}, "priority", "invalid_value"),
    ],
)
def test_a_bad_route_or_priority_names_the_field_and_writes_nothing(db, ready, change, field, code):
    err = raises(db, ready, {**routed(), **change})
    assert err.sqlstate == "ND400"
    assert (err.diag.column_name, err.diag.constraint_name) == (field, code)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


@pytest.mark.parametrize("priority", ["urgent", ["high"], {"a": "high"}, 1, True, ""])
def test_a_bad_priority_is_refused_on_the_usual_body_too(db, ready, priority):
    err = raises(db, ready, intent(priority=priority))
    assert (err.sqlstate, err.diag.column_name, err.diag.constraint_name) == ("ND400", "priority", "invalid_value")


def test_neither_channels_nor_route_is_refused(db, ready):
    body = intent()
    body.pop("channels")
    for given in ({}, {"route": None}, {"channels": None, "route": None}):
        err = raises(db, ready, {**body, **given})
        assert (err.sqlstate, err.diag.column_name, err.diag.constraint_name) == ("ND400", "channels", "missing_field")


def test_a_null_channels_or_route_is_absent(db, ready):
    response, _ = submit(db, ready, {**routed(), "channels": None})
    assert [d["step"] for d in response["deliveries"]] == [1, 2]
    response, _ = submit(db, ready, {**intent(), "route": None})
    assert [d.get("step") for d in response["deliveries"]] == [None, None]


def test_durations_are_read_as_iso_8601(db):
    def parse(text: str) -> dt.timedelta:
        return db.execute("select notify._duration_field(%s, 'within')", (Jsonb(text),)).fetchone()[0]

    assert parse("PT15M") == dt.timedelta(minutes=15)
    assert parse("PT1H30M") == dt.timedelta(hours=1, minutes=30)
    assert parse("P1DT2H") == dt.timedelta(days=1, hours=2)
    assert parse("P1W") == dt.timedelta(days=7)
    assert parse("PT0.5S") == dt.timedelta(seconds=0.5)
    assert parse("PT90S") == dt.timedelta(seconds=90)
    assert parse("P30D") == dt.timedelta(days=30)


def test_a_route_lists_every_step_the_first_due_the_later_ones_waiting(db, ready):
    response, replayed = submit(db, ready, routed(priority="high"))
    assert not replayed and response["status"] == "accepted"
    assert [(d["step"], d["channel"], d["status"]) for d in response["deliveries"]] == [
        (1, "whatsapp", "queued"),
        (2, "email", "waiting"),
    ]
    assert deliveries(db, response["id"]) == [
        (1, "whatsapp", "queued", None, False, "delivered", dt.timedelta(minutes=15), "high"),
        (2, "email", "waiting", None, True, "delivered", None, "high"),
    ]
    stored = db.execute(
        "select route, channels::text, priority from notify.notification_requests where id = %s", (response["id"],)
    ).fetchone()
    assert stored == (
        [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email", "until": "delivered"}],
        "{whatsapp,email}",
        "high",
    )
    # the ids are in step order (cancel locks by id, the route's trigger by step)
    ids = [d["id"] for d in response["deliveries"]]
    assert ids == sorted(ids)
    # history: each step's first event, from submit
    events = db.execute(
        "select e.to_status, e.source from notify.delivery_events e join notify.notification_deliveries d on d.id = e.delivery_id"
        " where d.request_id = %s order by d.route_step",
        (response["id"],),
    ).fetchall()
    assert events == [("queued", "submit"), ("waiting", "submit")]


def test_get_notification_shows_the_route_and_each_step(db, ready):
    response, _ = submit(db, ready, routed())
    got = call(db, "notify_api.get_notification_v1(%s, %s)", ready, response["id"])
    assert got["route"][0] == {"channel": "whatsapp", "until": "delivered", "within": "PT15M"}
    assert got["priority"] == "normal"
    assert [(d["step"], d["status"]) for d in got["deliveries"]] == [(1, "queued"), (2, "waiting")]
    v2 = call(db, "notify_api.get_notification_v2(%s, %s)", ready, response["id"])
    assert v2["route"] == got["route"] and [d["step"] for d in v2["deliveries"]] == [1, 2]
    found = call(db, "notify_api.find_notifications_v1(%s, %s)", ready, Jsonb({"recipient": "runner-42"}))
    assert found["items"][0]["route"] == got["route"]
    assert [d["step"] for d in found["items"][0]["deliveries"]] == [1, 2]


def test_a_suppressed_first_step_makes_the_next_due_at_submit(db, ready):
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "revoked", "source": "stop_keyword"}),
    )
    response, _ = submit(db, ready, routed(route=[{"channel": "whatsapp"}, {"channel": "sms"}, {"channel": "email"}]))
    assert [(d["step"], d["status"], d.get("reason")) for d in response["deliveries"]] == [
        (1, "suppressed", "no_consent"),
        (2, "suppressed", "no_address"),
        (3, "queued", "step_2_suppressed"),
    ]
    assert response["status"] == "accepted"


def test_a_later_step_suppressed_at_submit_stays_suppressed(db, ready):
    response, _ = submit(
        db, ready, routed(route=[{"channel": "email", "within": "PT1H"}, {"channel": "sms"}, {"channel": "whatsapp"}])
    )
    assert [(d["step"], d["status"], d.get("reason")) for d in response["deliveries"]] == [
        (1, "queued", None),
        (2, "suppressed", "no_address"),
        (3, "waiting", None),
    ]


def test_every_step_needs_its_template_locale(db, tenant):
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        tenant,
        Jsonb({"locale": "en", "channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    err = raises(db, tenant, routed(variables={}))
    assert err.sqlstate == "ND422" and err.diag.constraint_name == "template_not_found" and "whatsapp" in err.diag.message_primary


def test_send_at_schedules_the_first_step_and_expiry_covers_every_step(db, ready):
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    response, _ = submit(db, ready, routed(send_at=later.isoformat(), expires_at=(later + dt.timedelta(hours=2)).isoformat()))
    assert [d["status"] for d in response["deliveries"]] == ["scheduled", "waiting"]
    rows = db.execute(
        "select case when due_at < 'infinity' then due_at end, due_at = 'infinity', expires_at"
        " from notify.notification_deliveries where request_id = %s order by route_step",
        (response["id"],),
    ).fetchall()
    assert rows == [(later, False, later + dt.timedelta(hours=2)), (None, True, later + dt.timedelta(hours=2))]


def test_the_same_key_and_route_replays_and_another_route_is_refused(db, ready):
    first, _ = submit(db, ready, routed(), "r-key")
    again, replayed = submit(db, ready, routed(), "r-key")
    assert replayed and again == first
    err = None
    with pytest.raises(psycopg.Error) as info:
        submit(db, ready, routed(route=[{"channel": "email"}]), "r-key")
    err = info.value
    assert err.sqlstate == "ND422" and err.diag.constraint_name == "idempotency_key_reused"
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 2


def test_a_fan_out_gets_one_route_per_recipient(db, ready):
    body = routed(
        recipients=[
            {"ref": "runner-42", "addresses": {"whatsapp": "+34600111222", "email": "ana@example.com"}},
            {"ref": "runner-43", "addresses": {"email": "b@example.com"}},
        ]
    )
    body.pop("recipient")
    response, _ = submit(db, ready, body)
    assert response["recipient_count"] == 2
    rows = db.execute(
        "select r.ref, d.route_step, d.channel, d.status, d.reason, d.due_at = 'infinity', d.route_within, d.id"
        " from notify.notification_deliveries d join notify.recipients r on r.id = d.recipient_id"
        " where d.request_id = %s order by r.ref, d.route_step",
        (response["id"],),
    ).fetchall()
    assert [row[:7] for row in rows] == [
        ("runner-42", 1, "whatsapp", "queued", None, False, dt.timedelta(minutes=15)),
        ("runner-42", 2, "email", "waiting", None, True, None),
        ("runner-43", 1, "whatsapp", "suppressed", "no_address", False, dt.timedelta(minutes=15)),
        ("runner-43", 2, "email", "queued", "step_1_suppressed", False, None),
    ]
    assert rows[0][7] < rows[1][7] and rows[2][7] < rows[3][7]
    summary = {(s["channel"], s["status"]): s["count"] for s in response["summary"]}
    assert summary == {("whatsapp", "queued"): 1, ("whatsapp", "suppressed"): 1, ("email", "waiting"): 1, ("email", "queued"): 1}


def test_a_batch_takes_route_items_one_by_one_and_stores_priority(db, ready):
    out = call(
        db,
        "notify_api.submit_notifications_v1(%s, %s)",
        ready,
        Jsonb(
            [
                {"idempotency_key": "a", "notification": routed()},
                {
                    "idempotency_key": "b",
                    "notification": intent(
                        recipient={"ref": "r-b", "addresses": {"email": "b@example.com"}}, channels=["email"], priority="bulk"
                    ),
                },
                {"idempotency_key": "c", "notification": routed(route=[{"channel": "email", "within": "soon"}])},
            ]
        ),
    )
    assert [i["outcome"] for i in out["items"]] == ["accepted", "accepted", "error"]
    assert [(d["step"], d["status"]) for d in out["items"][0]["body"]["deliveries"]] == [(1, "queued"), (2, "waiting")]
    assert out["items"][2]["error"]["field"] == "route[0].within"
    rows = db.execute(
        "select q.idempotency_key, q.priority, d.priority, d.route_step from notify.notification_requests q"
        " join notify.notification_deliveries d on d.request_id = q.id order by 1, 4"
    ).fetchall()
    assert rows == [("a", "normal", "normal", 1), ("a", "normal", "normal", 2), ("b", "bulk", "bulk", None)]


def test_priority_is_stored_on_the_request_and_each_delivery(db, ready):
    for priority, expected in (("high", "high"), ("bulk", "bulk"), (None, "normal")):
        body = intent(priority=priority) if priority is not None else intent()
        response, _ = submit(db, ready, body)
        rows = db.execute(
            "select q.priority::text, array_agg(distinct d.priority::text) from notify.notification_requests q"
            " join notify.notification_deliveries d on d.request_id = q.id where q.id = %s group by 1",
            (response["id"],),
        ).fetchone()
        assert rows == (expected, [expected])
    fan = intent(recipients=[{"ref": "f-1", "addresses": {"email": "f@example.com"}}], channels=["email"], priority="bulk")
    fan.pop("recipient")
    response, _ = submit(db, ready, fan)
    assert db.execute(
        "select distinct d.priority from notify.notification_deliveries d where d.request_id = %s", (response["id"],)
    ).fetchall() == [("bulk",)]


def test_cancel_covers_waiting_steps(db, ready):
    response, _ = submit(db, ready, routed())
    out = call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, response["id"])
    assert sorted((d["channel"], d["status"]) for d in out["deliveries"]) == [("email", "cancelled"), ("whatsapp", "cancelled")]
    assert [row[2:4] for row in deliveries(db, response["id"])] == [
        ("cancelled", "cancelled_by_caller"),
        ("cancelled", "cancelled_by_caller"),
    ]
