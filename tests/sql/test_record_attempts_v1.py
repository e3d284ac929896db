"""notify_api.record_attempts_v1 (the worker's statement): outcomes fenced by attempt, retries with backoff, failures."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import call, claim, intent, record, result, submit
from tests.sql.test_claim_deliveries_v1 import status


def test_sent_records_the_provider_message_id(db, ready):
    submit(db, ready, intent(channels=["email"]))
    row = claim(db, "email")[0]
    assert record(db, result(row, "sent", provider_message_id="m-1")) == [(row[1], "sent", True)]
    assert db.execute(
        "select provider, provider_message_id, sent_at is not null from notify.notification_deliveries"
    ).fetchone() == ("mock", "m-1", True)
    attempt = db.execute("select outcome, provider_message_id, finished_at is not null from notify.delivery_attempts").fetchone()
    assert attempt == ("sent", "m-1", True)


def test_a_stale_worker_write_is_fenced_off(db, ready):
    submit(db, ready, intent(channels=["email"]))
    row = claim(db, "email")[0]
    stale = result(row, "failed", error_code="late")
    db.execute(
        "update notify.notification_deliveries set status = 'queued', due_at = now() where id = %s", (row[1],)
    )  # lease expired
    newer = claim(db, "email")[0]
    assert newer[2] == row[2] + 1
    assert record(db, stale) == [(row[1], None, False)]
    assert status(db, row[1])[:2] == ("sending", 2)


def test_retry_backs_off_exponentially_with_jitter(db, ready):
    call(db, "notify_api.set_retry_policy_v1(%s, 5, 1000, 60000)", ready)
    submit(db, ready, intent(channels=["email"]))
    delays = []
    for attempt in (1, 2, 3):
        db.execute("update notify.notification_deliveries set due_at = now()")
        row = claim(db, "email")[0]
        assert row[2] == attempt
        record(db, result(row, "retry", error_code="503"))
        delay = db.execute("select extract(epoch from due_at - now()) from notify.notification_deliveries").fetchone()[0]
        delays.append(float(delay))
    for n, delay in enumerate(delays):
        base = 2**n
        assert 0.5 * base - 0.05 <= delay <= base + 0.05, (n, delay)
    assert status(db, row[1])[0] == "queued"
    wakeups = db.execute("select scheduled_at from procrastinate_jobs where queueing_lock like 'dispatch:email:%'").fetchall()
    assert wakeups, "a retry schedules a wake-up at its due time"


def test_retry_after_from_the_provider_is_a_floor(db, ready):
    call(db, "notify_api.set_retry_policy_v1(%s, 5, 10, 100)", ready)
    submit(db, ready, intent(channels=["email"]))
    row = claim(db, "email")[0]
    record(db, result(row, "retry", retry_after_seconds=30))
    delay = db.execute("select extract(epoch from due_at - now()) from notify.notification_deliveries").fetchone()[0]
    assert 29 <= float(delay) <= 31


def test_retries_exhausted_end_failed(db, ready):
    call(db, "notify_api.set_retry_policy_v1(%s, 2, 10, 10)", ready)
    submit(db, ready, intent(channels=["email"]))
    for _ in range(2):
        db.execute("update notify.notification_deliveries set due_at = now()")
        row = claim(db, "email")[0]
        record(db, result(row, "retry", error_code="503", error_message="busy"))
    assert status(db, row[1]) == ("failed", 2, "retries_exhausted")
    db.execute("update notify.notification_deliveries set due_at = now()")
    assert claim(db, "email") == []


def test_failed_and_unknown_outcomes(db, ready):
    submit(db, ready, intent(channels=["email"]))
    submit(db, ready, intent(channels=["email"]))
    a, b = claim(db, "email")
    record(db, result(a, "failed", error_code="550", error_message="no such user"), result(b, "unknown", error_code="timeout"))
    assert status(db, a[1]) == ("failed", 1, "provider_rejected")
    assert status(db, b[1]) == ("unknown", 1, "outcome_unknown")
    assert db.execute(
        "select last_error_code, last_error_message from notify.notification_deliveries where id = %s", (a[1],)
    ).fetchone() == ("550", "no such user")


def test_an_unknown_outcome_name_is_refused(db, ready):
    submit(db, ready, intent(channels=["email"]))
    row = claim(db, "email")[0]
    with pytest.raises(psycopg.Error) as info:
        record(db, result(row, "exploded"))
    assert info.value.sqlstate == "ND400"
