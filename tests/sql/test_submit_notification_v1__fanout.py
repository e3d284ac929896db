"""Fan-out (one intent, many recipients) and batch (many intents, one call): idempotency, partial failure, consent."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, submit


def fanout(n: int, **overrides: object) -> dict:
    recipients = [
        {
            "ref": f"member-{i}",
            "addresses": {"whatsapp": f"+3460{i:07d}", "email": f"m{i}@example.com"},
            "variables": {"name": f"Member {i}"},
        }
        for i in range(n)
    ]
    body = intent(recipients=recipients, **overrides)
    del body["recipient"]
    return body


def counts(db: psycopg.Connection) -> dict[tuple[str, str], int]:
    return {
        (c, s): n
        for c, s, n in db.execute(
            "select channel::text, status::text, count(*) from notify.notification_deliveries group by 1, 2"
        ).fetchall()
    }


def test_a_fanout_makes_one_delivery_per_recipient_and_channel(db, ready):
    for i in range(0, 10, 2):  # half the members opted in to WhatsApp
        call(
            db,
            "notify_api.record_consent_v1(%s, %s, %s)",
            ready,
            f"member-{i}",
            Jsonb({"channel": "whatsapp", "status": "granted", "source": "app"}),
        )
    response, replayed = submit(db, ready, fanout(10), "club-reminder-1")
    assert not replayed and response["recipient_count"] == 10 and response["status"] == "accepted"
    assert sorted((s["channel"], s["status"], s.get("reason"), s["count"]) for s in response["summary"]) == [
        ("email", "queued", None, 10),
        ("whatsapp", "queued", None, 5),
        ("whatsapp", "suppressed", "no_consent", 5),
    ]
    assert counts(db) == {("email", "queued"): 10, ("whatsapp", "queued"): 5, ("whatsapp", "suppressed"): 5}
    assert db.execute("select count(*) from notify.recipients where ref like 'member-%'").fetchone()[0] == 10
    assert db.execute("select count(*) from notify.recipient_addresses").fetchone()[0] == 20


def test_per_recipient_variables_reach_the_worker(db, ready):
    submit(db, ready, fanout(3, channels=["email"], variables={"event": "Long run"}))
    rows = claim(db, "email")
    assert sorted(r[8]["name"] for r in rows) == ["Member 0", "Member 1", "Member 2"]
    assert {r[8]["event"] for r in rows} == {"Long run"}


def test_one_key_covers_the_whole_fanout(db, ready):
    first, _ = submit(db, ready, fanout(50), "fan-key")
    again, replayed = submit(db, ready, fanout(50), "fan-key")
    assert replayed and again == first
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 100
    with pytest.raises(psycopg.Error) as info:
        submit(db, ready, fanout(51), "fan-key")
    assert info.value.sqlstate == "ND422"


@pytest.mark.parametrize(
    ("mutate", "field", "code"),
    [
        (lambda b: b["recipients"][3].update(ref=""), "recipients[3]", "invalid_value"),
        (lambda b: b["recipients"][4].update(nickname="x"), "recipients[4].nickname", "unknown_field"),
        (lambda b: b["recipients"][5]["addresses"].update(whatsapp="600"), "recipients[5].addresses.whatsapp", "invalid_address"),
        (lambda b: b["recipients"][6].update(timezone="Mars/Base"), "recipients[6].timezone", "invalid_timezone"),
        (lambda b: b["recipients"][7].update(ref="member-1"), "recipients", "duplicate_recipient"),
        (lambda b: b["recipients"][2].update(variables={}), "recipients[2].variables.name", "missing_variables"),
        (lambda b: b.update(recipient={"ref": "x"}), "recipient", "missing_field"),
        (lambda b: b.update(recipients=[]), "recipients", "invalid_length"),
    ],
)
def test_a_bad_recipient_is_named_and_nothing_is_written(db, ready, mutate, field, code):
    body = fanout(10, variables={"event": "x"})
    mutate(body)
    with pytest.raises(psycopg.Error) as info:
        submit(db, ready, body, "k")
    assert (info.value.diag.column_name, info.value.diag.constraint_name) == (field, code)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0
    assert db.execute("select count(*) from notify.recipients where ref like 'member-%'").fetchone()[0] == 0


def test_a_fanout_wakes_each_channel_with_work_once(db, ready):
    submit(db, ready, fanout(100))  # nobody granted WhatsApp: only e-mail has work
    assert db.execute("select queueing_lock from procrastinate_jobs").fetchall() == [("dispatch:email",)]
    call(db, "notify_api.set_channel_policy_v1(%s, 'whatsapp', 'opt_out')", ready)
    submit(db, ready, fanout(100))
    assert sorted(r[0] for r in db.execute("select queueing_lock from procrastinate_jobs")) == [
        "dispatch:email",
        "dispatch:whatsapp",
    ]


def test_ten_thousand_recipients_in_one_call(db, ready):
    response, _ = submit(db, ready, fanout(10_000, channels=["email"]))
    assert response["recipient_count"] == 10_000
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 10_000
    assert db.execute("select count(*) from notify.delivery_events").fetchone()[0] == 10_000
    with pytest.raises(psycopg.Error) as info:
        submit(db, ready, fanout(10_001, channels=["email"]))
    assert info.value.diag.column_name == "recipients"


def batch(db: psycopg.Connection, tenant: str, items: list) -> dict:
    return call(db, "notify_api.submit_notifications_v1(%s, %s)", tenant, Jsonb(items))
