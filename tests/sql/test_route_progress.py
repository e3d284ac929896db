"""Fallback routes advancing (trigger _350_advance_route, sql/040_triggers.sql): each rule, not_needed, the within
timer (moved into the past instead of waited for), and the races, with two scripted connections."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, record, result, submit
from tests.sql.test_state_machine import INGEST

WA_THEN_EMAIL = [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}]


def routed(db: psycopg.Connection, tenant: str, route: list[dict] | None = None, **overrides: Any) -> dict:
    body = intent(**overrides)
    body.pop("channels")
    body["route"] = route or WA_THEN_EMAIL
    return submit(db, tenant, body)[0]


def steps(db: psycopg.Connection, request_id: str) -> list[tuple]:
    """(step, status, reason, due: 'now' | 'later' | 'never')"""
    return db.execute(
        "select route_step, status::text, reason,"
        " case when due_at = 'infinity' then 'never' when due_at <= now() then 'now' else 'later' end"
        " from notify.notification_deliveries where request_id = %s order by route_step",
        (request_id,),
    ).fetchall()


def step_id(db: psycopg.Connection, request_id: str, step: int) -> str:
    return str(
        db.execute(
            "select id from notify.notification_deliveries where request_id = %s and route_step = %s", (request_id, step)
        ).fetchone()[0]
    )


def make_due(db: psycopg.Connection, request_id: str, step: int) -> None:
    """The within timer ran out: its due time moved into the past (no sleeping)."""
    db.execute(
        "update notify.notification_deliveries set due_at = now() - interval '1 second'"
        " where request_id = %s and route_step = %s and due_at < 'infinity'",
        (request_id, step),
    )


def report(conn: psycopg.Connection, tenant: str, delivery_id: str, status: str, key: str) -> dict:
    event = {"status": status, "occurred_at": "2026-11-26T10:00:00Z", "tenant_id": tenant, "delivery_id": delivery_id}
    return conn.execute(INGEST, ("mock", key, Jsonb({}), Jsonb([event]))).fetchone()[0]


def history(db: psycopg.Connection, delivery_id: str) -> list[tuple]:
    return db.execute(
        "select from_status::text, to_status::text, source, reason from notify.delivery_events where delivery_id = %s"
        " order by seq, id",
        (delivery_id,),
    ).fetchall()


def send_step_1(db: psycopg.Connection) -> tuple:
    (row,) = claim(db, "whatsapp")
    record(db, result(row, "sent", provider_message_id=f"pm-{row[1]}"))
    return row


def wakeups(db: psycopg.Connection, channel: str) -> int:
    return db.execute(
        "select count(*) from procrastinate_jobs where task_name = 'dispatch' and args ->> 'channel' = %s and status = 'todo'",
        (channel,),
    ).fetchone()[0]


# -- rule 3: the first claim starts the next step's timer ----------------------------------------------------------
def test_the_claim_of_a_step_starts_the_next_steps_timer(db, ready):
    r = routed(db, ready)
    assert steps(db, r["id"]) == [(1, "queued", None, "now"), (2, "waiting", None, "never")]
    claim(db, "whatsapp")
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "sending", None), (2, "waiting", "step_1_not_delivered_in_time")]
    timer = db.execute(
        "select d2.due_at - d1.updated_at from notify.notification_deliveries d1, notify.notification_deliveries d2"
        " where d1.request_id = %s and d2.request_id = d1.request_id and d1.route_step = 1 and d2.route_step = 2",
        (r["id"],),
    ).fetchone()[0]
    assert timer.total_seconds() == 15 * 60
    assert steps(db, r["id"])[1][3] == "later"
    assert claim(db, "email") == []  # not due yet


def test_without_within_the_next_step_waits_for_an_outcome(db, ready):
    r = routed(db, ready, [{"channel": "whatsapp"}, {"channel": "email"}])
    send_step_1(db)
    assert steps(db, r["id"])[1] == (2, "waiting", None, "never")


def test_the_timer_runs_out_and_the_next_step_is_sent(db, ready):
    r = routed(db, ready)
    send_step_1(db)
    make_due(db, r["id"], 2)
    (row,) = claim(db, "email")
    assert str(row[1]) == step_id(db, r["id"], 2)
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "sent", None), (2, "sending", "step_1_not_delivered_in_time")]
    assert history(db, step_id(db, r["id"], 2)) == [
        (None, "waiting", "submit", None),
        ("waiting", "sending", "claim", "step_1_not_delivered_in_time"),
    ]


def test_an_unknown_outcome_counts_as_not_reached(db, ready):
    r = routed(db, ready)
    (row,) = claim(db, "whatsapp")
    record(db, result(row, "unknown"))
    assert steps(db, r["id"])[1][:2] == (2, "waiting")
    make_due(db, r["id"], 2)
    assert len(claim(db, "email")) == 1


# -- rule 2: a step that cannot succeed makes the next one due now --------------------------------------------------
def test_a_failed_step_makes_the_next_due_at_once_and_wakes_the_worker(db, ready):
    r = routed(db, ready)
    (row,) = claim(db, "whatsapp")
    before = wakeups(db, "email")
    record(db, result(row, "failed", error_code="131026", error_message="undeliverable"))
    assert steps(db, r["id"]) == [(1, "failed", "provider_rejected", "now"), (2, "queued", "step_1_failed", "now")]
    assert wakeups(db, "email") == before + 1
    assert len(claim(db, "email")) == 1
    assert history(db, step_id(db, r["id"], 2))[1] == ("waiting", "queued", "route", "step_1_failed")


def test_a_step_suppressed_at_claim_makes_the_next_due(db, ready):
    r = routed(db, ready)
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "revoked", "source": "stop_keyword"}),
    )
    assert claim(db, "whatsapp") == []
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "suppressed", "no_consent"), (2, "queued", "step_1_suppressed")]


def test_a_bounce_makes_the_next_due_and_a_suppressed_step_is_skipped(db, ready):
    route = [{"channel": "email", "within": "PT1H"}, {"channel": "sms"}, {"channel": "whatsapp"}]
    r = routed(db, ready, route)
    assert [s[1] for s in steps(db, r["id"])] == ["queued", "suppressed", "waiting"]
    (row,) = claim(db, "email")
    record(db, result(row, "bounced"))
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "bounced", "rejected_by_recipient_server"),
        (2, "suppressed", "no_address"),
        (3, "queued", "step_1_bounced"),
    ]


def test_expiry_covers_the_whole_route(db, ready):
    r = routed(db, ready)
    db.execute("update notify.notification_deliveries set expires_at = now() where request_id = %s", (r["id"],))
    call(db, "notify_api.run_maintenance_v1()")
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "expired", "expired_before_send"), (2, "expired", "expired_before_send")]


def test_a_callers_cancel_covers_waiting_steps_and_does_not_advance(db, ready):
    r = routed(db, ready)
    (row,) = claim(db, "whatsapp")  # step 1 is being sent: cancel cannot stop it
    out = call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, r["id"])
    assert sorted((d["channel"], d["cancelled"]) for d in out["deliveries"]) == [("email", True), ("whatsapp", False)]
    record(db, result(row, "failed"))
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "failed", "provider_rejected"), (2, "cancelled", "cancelled_by_caller")]


# -- rule 1: a goal reached makes the later steps not needed --------------------------------------------------------
def test_a_delivered_step_makes_the_later_ones_not_needed(db, ready):
    r = routed(db, ready)
    row = send_step_1(db)
    report(db, ready, str(row[1]), "delivered", "d1")
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "delivered", None), (2, "not_needed", "step_1_delivered")]
    make_due(db, r["id"], 2)
    assert claim(db, "email") == []
    assert history(db, step_id(db, r["id"], 2))[-1] == ("waiting", "not_needed", "route", "step_1_delivered")


def test_read_counts_for_delivered_and_delivered_for_sent(db, ready):
    r = routed(db, ready)
    row = send_step_1(db)
    report(db, ready, str(row[1]), "read", "r1")
    assert steps(db, r["id"])[1][1:3] == ("not_needed", "step_1_read")

    submit(db, ready, intent(recipient={"ref": "runner-43", "addresses": {"email": "b@example.com"}}, channels=["email"]))
    claim(db, "email")
    r2 = routed(db, ready, [{"channel": "email", "until": "sent", "within": "PT5M"}, {"channel": "sms"}, {"channel": "whatsapp"}])
    (row,) = claim(db, "email")
    record(db, result(row, "sent", provider_message_id=f"pm-{row[1]}"))
    assert [s[1:3] for s in steps(db, r2["id"])] == [("sent", None), ("suppressed", "no_address"), ("not_needed", "step_1_sent")]


def test_until_read_is_not_reached_by_delivered(db, ready):
    r = routed(db, ready, [{"channel": "whatsapp", "until": "read", "within": "PT1H"}, {"channel": "email"}])
    row = send_step_1(db)
    report(db, ready, str(row[1]), "delivered", "d1")
    assert steps(db, r["id"])[1][1] == "waiting"
    report(db, ready, str(row[1]), "read", "r1")
    assert steps(db, r["id"])[1][1:3] == ("not_needed", "step_1_read")


def test_a_late_goal_after_the_next_step_was_claimed_says_both_went_out(db, ready):
    r = routed(db, ready)
    row = send_step_1(db)
    make_due(db, r["id"], 2)
    assert len(claim(db, "email")) == 1
    report(db, ready, str(row[1]), "delivered", "late")
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "delivered", "step_2_already_claimed"),
        (2, "sending", "step_1_not_delivered_in_time"),
    ]
    assert history(db, str(row[1]))[-2:] == [
        ("sent", "delivered", "webhook", None),
        ("delivered", "delivered", "route", "step_2_already_claimed"),
    ]


def test_a_retry_of_step_1_is_superseded_when_step_2_is_claimed(db, ready):
    r = routed(db, ready)
    (row,) = claim(db, "whatsapp")
    record(db, result(row, "retry"))  # step 1 waits for its backoff
    assert steps(db, r["id"])[0][1:4] == ("queued", None, "later")
    make_due(db, r["id"], 2)
    assert len(claim(db, "email")) == 1
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "cancelled", "superseded_by_step_2"),
        (2, "sending", "step_1_not_delivered_in_time"),
    ]
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (row[1],))
    assert claim(db, "whatsapp") == []


def test_a_fan_out_advances_each_recipients_route_alone(db, ready):
    body = intent(
        recipients=[
            {"ref": "a", "addresses": {"whatsapp": "+34600000001", "email": "a@example.com"}},
            {"ref": "b", "addresses": {"whatsapp": "+34600000002", "email": "b@example.com"}},
        ]
    )
    body.pop("recipient")
    body.pop("channels")
    body["route"] = WA_THEN_EMAIL
    for ref in ("a", "b"):
        call(
            db,
            "notify_api.record_consent_v1(%s, %s, %s)",
            ready,
            ref,
            Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form"}),
        )
    r = submit(db, ready, body)[0]
    rows = claim(db, "whatsapp")
    assert len(rows) == 2
    record(db, result(rows[0], "failed"), result(rows[1], "sent", provider_message_id="pm-b"))
    got = db.execute(
        "select r.ref, d.route_step, d.status::text, d.reason from notify.notification_deliveries d"
        " join notify.recipients r on r.id = d.recipient_id where d.request_id = %s order by 1, 2",
        (r["id"],),
    ).fetchall()
    failed_ref = db.execute(
        "select r.ref from notify.notification_deliveries d join notify.recipients r on r.id = d.recipient_id where d.id = %s",
        (rows[0][1],),
    ).fetchone()[0]
    by_ref = {ref: [(s, st, re) for f, s, st, re in got if f == ref] for ref in ("a", "b")}
    other = "b" if failed_ref == "a" else "a"
    assert by_ref[failed_ref] == [(1, "failed", "provider_rejected"), (2, "queued", "step_1_failed")]
    assert by_ref[other] == [(1, "sent", None), (2, "waiting", "step_1_not_delivered_in_time")]


# -- races: two scripted connections ---------------------------------------------------------------------------------
def wait_until_blocked(db: psycopg.Connection, conn: psycopg.Connection) -> None:
    """Polls until conn's backend waits for a lock (no fixed sleep: the order of the steps is what is tested)."""
    pid = conn.info.backend_pid
    for _ in range(1000):
        row = db.execute("select wait_event_type from pg_stat_activity where pid = %s", (pid,)).fetchone()
        if row and row[0] == "Lock":
            return
        time.sleep(0.01)
    raise AssertionError("the second connection never waited for the first one's lock")


def test_race_a_late_delivered_webhook_while_step_2_is_being_claimed(db, ready, connect):
    r = routed(db, ready)
    row = send_step_1(db)
    make_due(db, r["id"], 2)
    worker, webhook = connect(), connect()
    # 1. The worker claims step 2 (FOR UPDATE SKIP LOCKED, sending) and has not committed.
    assert len(claim(worker, "email")) == 1
    # 2. The delivered webhook for step 1 arrives: its trigger must wait for step 2's row lock.
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(out=report(webhook, ready, str(row[1]), "delivered", "late")))
    thread.start()
    wait_until_blocked(db, webhook)
    # 3. The worker commits; the trigger then sees step 2 sending, leaves it, and says so on step 1.
    worker.commit()
    thread.join(10)
    webhook.commit()
    assert done["out"]["outcomes"][0]["outcome"] == "applied"
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "delivered", "step_2_already_claimed"),
        (2, "sending", "step_1_not_delivered_in_time"),
    ]
    assert ("delivered", "delivered", "route", "step_2_already_claimed") in history(db, str(row[1]))


def test_race_a_claim_while_the_delivered_webhook_holds_step_2(db, ready, connect):
    r = routed(db, ready)
    row = send_step_1(db)
    make_due(db, r["id"], 2)
    worker, webhook = connect(), connect()
    # 1. The delivered webhook for step 1 is applied (step 2 not_needed) and has not committed.
    report(webhook, ready, str(row[1]), "delivered", "first")
    # 2. The worker's claim skips the locked step 2 at once.
    assert claim(worker, "email") == []
    worker.commit()
    # 3. The webhook commits: step 2 is not needed, and a later claim finds nothing.
    webhook.commit()
    assert claim(worker, "email") == []
    worker.commit()
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "delivered", None), (2, "not_needed", "step_1_delivered")]


def test_race_a_cancel_waits_for_the_webhook_without_deadlock(db, ready, connect):
    r = routed(db, ready)
    row = send_step_1(db)
    webhook, caller = connect(), connect()
    # 1. The webhook locks step 1 (delivered) and then step 2 (not_needed), uncommitted.
    report(webhook, ready, str(row[1]), "delivered", "d")
    # 2. The caller's cancel locks the deliveries by id, which is step order: it waits at step 1, holding nothing.
    done: dict = {}
    thread = threading.Thread(
        target=lambda: done.update(out=call(caller, "notify_api.cancel_notification_v1(%s, %s)", ready, r["id"]))
    )
    thread.start()
    wait_until_blocked(db, caller)
    webhook.commit()
    thread.join(10)
    caller.commit()
    assert {d["channel"]: (d["cancelled"], d["reason"]) for d in done["out"]["deliveries"]} == {
        "whatsapp": (False, "already_delivered"),
        "email": (False, "already_not_needed"),
    }
    assert [s[1] for s in steps(db, r["id"])] == ["delivered", "not_needed"]


def test_race_a_failure_and_the_timer_claim_end_in_one_outcome(db, ready, connect):
    """Step 1 fails (the worker's record) while another worker claims step 2 because its timer ran out: step 2 is sent
    once (not queued again), and its reason says why it went (the timer)."""
    r = routed(db, ready)
    (row,) = claim(db, "whatsapp")
    make_due(db, r["id"], 2)
    a, b = connect(), connect()
    assert len(claim(a, "email")) == 1  # 1. claim of step 2, uncommitted
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(out=record(b, result(row, "failed"))))
    # 2. Step 1 fails: rule 2 still sees step 2 waiting and waits for the claim's row lock ...
    thread.start()
    wait_until_blocked(db, b)
    # 3. ... the claim commits; rule 2 then finds step 2 sending, not waiting, and leaves it.
    a.commit()
    thread.join(10)
    b.commit()
    assert done["out"][0][1] == "failed"
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "failed", "provider_rejected"),
        (2, "sending", "step_1_not_delivered_in_time"),
    ]
    assert (
        db.execute("select count(*) from notify.delivery_attempts where delivery_id = %s", (step_id(db, r["id"], 2),)).fetchone()[
            0
        ]
        == 1
    )


def retry_pending(db: psycopg.Connection, tenant: str) -> tuple[dict, tuple]:
    """Step 1 was tried once and waits for its retry (due now); step 2's timer has run out."""
    r = routed(db, tenant)
    (row,) = claim(db, "whatsapp")
    record(db, result(row, "retry"))
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (row[1],))
    make_due(db, r["id"], 2)
    return r, row


def test_race_the_timer_claim_first_supersedes_the_retry_a_concurrent_claim_skips(db, ready, connect):
    r, _ = retry_pending(db, ready)
    email_worker, wa_worker = connect(), connect()
    # 1. Step 2 is claimed (its trigger ends step 1's retry, holding its row), uncommitted.
    assert len(claim(email_worker, "email")) == 1
    # 2. A WhatsApp worker's claim skips the locked retry at once.
    wa_worker.execute("set statement_timeout = '5s'")
    assert claim(wa_worker, "whatsapp") == []
    wa_worker.commit()
    # 3. The email worker commits: the retry is superseded, never sent again.
    email_worker.commit()
    assert claim(wa_worker, "whatsapp") == []
    wa_worker.commit()
    assert [s[:3] for s in steps(db, r["id"])] == [
        (1, "cancelled", "superseded_by_step_2"),
        (2, "sending", "step_1_not_delivered_in_time"),
    ]


def test_race_the_retry_claimed_first_goes_out_and_no_claim_waits(db, ready, connect):
    """The one case where both go out: step 1's retry is being claimed when step 2's timer claim comes. Neither claim
    waits for the other (the backwards lock skips), so there is no deadlock."""
    r, row = retry_pending(db, ready)
    wa_worker, email_worker = connect(), connect()
    assert len(claim(wa_worker, "whatsapp")) == 1  # 1. the retry is claimed (attempt 2), uncommitted
    email_worker.execute("set statement_timeout = '5s'")
    assert len(claim(email_worker, "email")) == 1  # 2. step 2's claim skips the locked retry instead of waiting
    email_worker.commit()
    wa_worker.commit()
    assert [s[:2] for s in steps(db, r["id"])] == [(1, "sending"), (2, "sending")]
    assert db.execute("select attempt from notify.notification_deliveries where id = %s", (row[1],)).fetchone()[0] == 2


def test_status_callbacks_name_the_route_step(db, ready):
    """A receiver sees how the route went: each status callback of a routed delivery carries its step."""
    from tests.sql.callbacks import configure

    configure(db, ready)
    plain = submit(db, ready, intent(channels=["email"]))[0]
    request = routed(db, ready)
    got = db.execute(
        "select payload -> 'data' ->> 'channel', payload -> 'data' ->> 'status', payload -> 'data' -> 'step'"
        " from notify.callback_messages where notification_id = %s order by delivery_id, seq",
        (request["id"],),
    ).fetchall()
    assert got == [("whatsapp", "queued", 1), ("email", "waiting", 2)]
    unrouted = db.execute(
        "select payload -> 'data' from notify.callback_messages where notification_id = %s", (plain["id"],)
    ).fetchone()[0]
    assert "step" not in unrouted
