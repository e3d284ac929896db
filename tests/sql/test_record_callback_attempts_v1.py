"""notify_api.record_callback_attempts_v1 (the worker's statement, runner.callbacks.RECORD): delivered, retried per the
tenant's schedule and failed once it is used up, failed at once; a stale attempt changes nothing."""

from __future__ import annotations

from tests.conftest import intent, submit
from tests.sql.callbacks import attempt, claim_callbacks, configure, record_callbacks


def message(db):
    return db.execute("select status, attempts, last_error, finished_at is not null from notify.callback_messages").fetchone()


def claimed_one(db, ready, schedule):
    configure(db, ready, {"url": "https://hooks.runflow.example/notify", "retry_schedule_ms": schedule})
    submit(db, ready, intent(channels=["email"]))
    [row] = claim_callbacks(db)
    return row


def test_a_2xx_is_delivered(db, ready):
    row = claimed_one(db, ready, [0])
    assert record_callbacks(db, attempt(ready, row[1], 1, "delivered", 200)) == 1
    assert message(db) == ("delivered", 1, None, True)
    assert db.execute("select outcome, status_code from notify.callback_attempts").fetchall() == [("delivered", 200)]


def test_a_retry_follows_the_schedule_then_fails(db, ready):
    row = claimed_one(db, ready, [60_000])
    record_callbacks(db, attempt(ready, row[1], 1, "retry"))
    status = db.execute("select status, next_attempt_at > now() + interval '50 seconds' from notify.callback_messages").fetchone()
    assert status == ("pending", True)
    db.execute("update notify.callback_messages set next_attempt_at = now()")
    [again] = claim_callbacks(db)
    record_callbacks(db, attempt(ready, again[1], 2, "retry"))
    assert message(db) == ("failed", 2, "HTTP 503", True)


def test_gone_or_refused_fails_at_once(db, ready):
    row = claimed_one(db, ready, [0, 0, 0])
    record_callbacks(db, {**attempt(ready, row[1], 1, "refused", None), "error": "refused: private address"})
    assert message(db) == ("failed", 1, "refused: private address", True)


def test_a_stale_attempt_changes_nothing(db, ready):
    row = claimed_one(db, ready, [0])
    record_callbacks(db, attempt(ready, row[1], 1, "retry"))
    [again] = claim_callbacks(db)
    record_callbacks(db, attempt(ready, row[1], 1, "delivered", 200))  # attempt 1's late answer
    assert message(db)[:2] == ("sending", 2)
    assert db.execute("select count(*) from notify.callback_attempts").fetchone()[0] == 1


def test_the_message_is_found_by_its_creation_time_when_the_worker_names_it(db, ready):
    """The worker passes the message's created_at back (the outbox is partitioned by it, so the record looks in that
    day's partition alone); the key is exact: another time matches no message, and an older worker's record without it
    still finds the message."""
    row = claimed_one(db, ready, [0, 0])
    created = row[6]
    wrong = {**attempt(ready, row[1], 1, "delivered", 200), "created_at": "2001-01-01T00:00:00Z"}
    record_callbacks(db, wrong)
    assert message(db)[:2] == ("sending", 1)
    record_callbacks(db, {**attempt(ready, row[1], 1, "retry"), "created_at": created.isoformat()})
    assert message(db)[:2] == ("pending", 1)
    db.execute("update notify.callback_messages set next_attempt_at = now()")
    [again] = claim_callbacks(db)
    record_callbacks(db, attempt(ready, again[1], 2, "delivered", 200))  # no created_at: looked up first
    assert message(db)[:2] == ("delivered", 2)
