"""notify_api.run_retention_v1: daily partitions made ahead, a default partition for anything outside them, partitions
dropped once older than the longest history (or, for content tables, content) period of any tenant; raw webhook
payloads after the shortest content period, callback messages only once none of the day's is still to be sent."""

from __future__ import annotations

import datetime as dt
import threading
import time

from psycopg.types.json import Jsonb

from tests.conftest import call
from tests.sql.test_state_machine import INGEST

TABLES = ("delivery_events", "delivery_attempts", "callback_attempts", "mock_messages", "callback_messages", "webhook_events")


def today(db) -> dt.date:
    return db.execute("select (now() at time zone 'UTC')::date").fetchone()[0]


def partitions(db, table: str) -> list[str]:
    return [
        r[0]
        for r in db.execute(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid"
            " where i.inhparent = %s::regclass order by 1",
            (f"notify.{table}",),
        )
    ]


def name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def add_event(db, tenant: str, at: str) -> str:
    """One delivery_events row at `at` (an SQL expression); returns the partition it landed in."""
    return db.execute(
        f"insert into notify.delivery_events (tenant_id, delivery_id, seq, to_status, source, occurred_at) "
        f"values (%s, gen_random_uuid(), 1, 'queued', 'test', {at}) returning tableoid::regclass::text",
        (tenant,),
    ).fetchone()[0]


def test_partitions_exist_ahead_after_maintenance(db):
    day = today(db)
    made = call(db, "notify_api.run_retention_v1(10)")
    for table in TABLES:
        names = partitions(db, table)
        assert f"{table}_default" in names
        assert all(name(table, day + dt.timedelta(days=n)) in names for n in range(11)), (table, names)
    assert made["partitions_created"] == 3 * len(TABLES)  # the schema made today + 7 days; 10 ahead adds days 8-10
    assert call(db, "notify_api.run_retention_v1(10)")["partitions_created"] == 0


def test_an_insert_outside_every_partition_lands_in_the_default_one(db, tenant):
    assert add_event(db, tenant, "'2099-06-01 12:00+00'") == "notify.delivery_events_default"
    assert add_event(db, tenant, "'1990-01-01 00:00+00'") == "notify.delivery_events_default"
    assert add_event(db, tenant, "now()") == f"notify.{name('delivery_events', today(db))}"


def test_rows_the_default_partition_took_move_into_their_days_partition(db, tenant):
    ahead = today(db) + dt.timedelta(days=20)
    assert add_event(db, tenant, f"'{ahead}'::date + time '06:00' at time zone 'UTC'") == "notify.delivery_events_default"
    call(db, "notify_api.run_retention_v1(25)")
    assert db.execute(f"select count(*) from notify.{name('delivery_events', ahead)}").fetchone()[0] == 1
    assert db.execute("select count(*) from notify.delivery_events_default").fetchone()[0] == 0


def test_rows_a_past_day_left_in_the_default_partition_go_with_their_day(db, tenant):
    """The worker was down when a day began: that day had no partition and its rows went to the default partition.
    The next run makes the day's partition and moves them there (to be dropped with their day), and a day already past
    its period goes at once."""
    day = today(db)
    recent, ancient = day - dt.timedelta(days=3), day - dt.timedelta(days=400)
    for d in (recent, ancient):
        assert add_event(db, tenant, f"'{d}'::date + time '12:00' at time zone 'UTC'") == "notify.delivery_events_default"
    got = call(db, "notify_api.run_retention_v1()")
    assert db.execute("select count(*) from notify.delivery_events_default").fetchone()[0] == 0
    where = db.execute("select tableoid::regclass::text from notify.delivery_events where tenant_id = %s", (tenant,)).fetchall()
    assert where == [(f"notify.{name('delivery_events', recent)}",)]  # the ancient row went with its (dropped) day
    assert name("delivery_events", ancient) in got["partitions_dropped"]
    assert name("delivery_events", recent) in partitions(db, "delivery_events")


def test_partitions_past_the_longest_period_of_any_tenant_are_dropped(db, tenant):
    day = today(db)
    old = [day - dt.timedelta(days=n) for n in (150, 100, 91, 89, 40)]
    call(db, "notify._ensure_partitions(%s, %s)", old[0], old[0])
    for d in old[1:]:
        call(db, "notify._ensure_partitions(%s, %s)", d, d)
    for d in old:
        assert add_event(db, tenant, f"'{d}'::date + time '12:00' at time zone 'UTC'") == f"notify.{name('delivery_events', d)}"
    # A second tenant keeps its history for 120 days: partitions up to 120 days old stay for everyone.
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(db, "notify_api.set_retention_v1(%s, %s)", other, Jsonb({"history_days": 120}))
    got = call(db, "notify_api.run_retention_v1()")
    assert got["longest_history_days"] == 120 and got["longest_content_days"] == 30
    names = partitions(db, "delivery_events")
    assert [name("delivery_events", d) in names for d in old] == [False, True, True, True, True]
    assert name("delivery_attempts", old[0]) in got["partitions_dropped"]
    # Content tables (the mock outbox) go after the longest content period: 30 days.
    assert [name("mock_messages", d) in partitions(db, "mock_messages") for d in old] == [False] * 5
    # Back to the defaults: 90 days.
    call(db, "notify_api.set_retention_v1(%s, %s)", other, Jsonb({}))
    call(db, "notify_api.run_retention_v1()")
    names = partitions(db, "delivery_events")
    assert [name("delivery_events", d) in names for d in old] == [False, False, False, True, True]
    assert db.execute("select count(*) from notify.delivery_events").fetchone()[0] == 2


def test_a_row_the_default_partition_takes_while_its_day_is_made_does_not_fail_the_run(db, connect, tenant):
    """A day with no partition yet (the worker was down) takes its rows in the default partition. When the partition is
    made, a writer that commits such a row after the move but before the attach must not fail the run (ATTACH would find
    the row in the default partition: "updated partition constraint for default partition would be violated")."""
    day = today(db) + dt.timedelta(days=30)  # beyond the partitions made ahead
    at = f"'{day.isoformat()} 12:00:00+00'::timestamptz"
    assert add_event(db, tenant, at) == "notify.delivery_events_default"
    writer = connect()
    assert add_event(writer, tenant, at) == "notify.delivery_events_default"  # not committed yet
    runner = connect(autocommit=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["made"] = runner.execute("select notify._ensure_partitions(%s, %s)", (day, day)).fetchone()[0]
        except Exception as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    for _ in range(200):  # until the run waits for the writer's lock (after its move)
        waiting = db.execute(
            "select count(*) from pg_stat_activity where pid = %s and wait_event_type = 'Lock'", (runner.info.backend_pid,)
        ).fetchone()[0]
        if waiting:
            break
        time.sleep(0.01)
    writer.commit()
    thread.join()
    assert "error" not in outcome, outcome
    # both rows are in the day's partition now, or (the run gave up this day) both still wait in the default one
    where = db.execute(
        f"select tableoid::regclass::text, count(*) from notify.delivery_events where occurred_at = {at} group by 1"
    ).fetchall()
    assert where in ([(f"notify.{name('delivery_events', day)}", 2)], [("notify.delivery_events_default", 2)]), where


def noon(day: dt.date) -> str:
    return f"'{day}'::date + time '12:00' at time zone 'UTC'"


def ingest(db, key: str) -> dict:
    return db.execute(INGEST, ("mock", key, Jsonb({"to": "+34600111222"}), Jsonb([]))).fetchone()[0]


def test_a_day_of_webhook_payloads_past_retention_is_dropped_while_its_keys_still_refuse_a_duplicate(db, tenant):
    """Raw payloads are no tenant's: their day goes after the shortest content period of any tenant (here 5 days, while
    another tenant's 60 keep the other content tables' day); deduplication does not depend on the payload, only on the
    key, which scrub_expired_v1 deletes past the same period."""
    call(db, "notify_api.set_retention_v1(%s, %s)", tenant, Jsonb({"content_days": 5}))
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(db, "notify_api.set_retention_v1(%s, %s)", other, Jsonb({"content_days": 60}))
    old = today(db) - dt.timedelta(days=10)
    call(db, "notify._ensure_partitions(%s, %s)", old, old)
    assert ingest(db, "old-1")["stored"] and ingest(db, "new-1")["stored"]
    # The payload of old-1 was received on `old` (its key is still within its window: received now).
    assert (
        db.execute(
            f"update notify.webhook_events set received_at = {noon(old)} where event_key = 'old-1'"
            " returning tableoid::regclass::text"
        ).fetchone()[0]
        == f"notify.{name('webhook_events', old)}"
    )

    got = call(db, "notify_api.run_retention_v1()")
    assert got["shortest_content_days"] == 5 and got["longest_content_days"] == 60
    assert name("webhook_events", old) in got["partitions_dropped"]
    assert name("mock_messages", old) in partitions(db, "mock_messages")  # content: the longest period (60 days)
    assert [r[0] for r in db.execute("select event_key from notify.webhook_events")] == ["new-1"]
    # Its key still refuses the duplicate, until the key itself is past the period.
    assert ingest(db, "old-1") == {"stored": False, "duplicate": True, "outcomes": []}
    assert call(db, "notify_api.scrub_expired_v1(1000)")["webhook_event_keys"] == 0
    db.execute("update notify.webhook_event_keys set received_at = now() - interval '6 days' where event_key = 'old-1'")
    assert call(db, "notify_api.scrub_expired_v1(1000)")["webhook_event_keys"] == 1
    assert ingest(db, "old-1")["stored"]
    assert not ingest(db, "new-1")["stored"]


def test_a_callback_day_with_a_message_still_to_be_sent_is_kept_until_it_is_finished(db, tenant):
    day = today(db)
    pending, finished = day - dt.timedelta(days=40), day - dt.timedelta(days=41)
    call(db, "notify._ensure_partitions(%s, %s)", finished, pending)
    for at, status in ((pending, "delivered"), (pending, "pending"), (finished, "delivered"), (finished, "failed")):
        db.execute(
            "insert into notify.callback_messages"
            " (tenant_id, notification_id, delivery_id, seq, url, payload, status, created_at)"
            f" values (%s, gen_random_uuid(), gen_random_uuid(), 1, 'https://example.com/cb', '{{}}', %s, {noon(at)})",
            (tenant, status),
        )
    got = call(db, "notify_api.run_retention_v1()")
    assert name("callback_messages", finished) in got["partitions_dropped"]
    assert name("callback_messages", pending) not in got["partitions_dropped"]
    assert name("callback_messages", pending) in partitions(db, "callback_messages")
    assert name("mock_messages", pending) not in partitions(db, "mock_messages")  # the other content of that day went
    # Sending holds it too; once given up (failed), the next run drops it.
    db.execute("update notify.callback_messages set status = 'sending' where status = 'pending'")
    assert name("callback_messages", pending) not in call(db, "notify_api.run_retention_v1()")["partitions_dropped"]
    db.execute("update notify.callback_messages set status = 'failed' where status = 'sending'")
    assert name("callback_messages", pending) in call(db, "notify_api.run_retention_v1()")["partitions_dropped"]
    assert db.execute("select count(*) from notify.callback_messages").fetchone()[0] == 0
