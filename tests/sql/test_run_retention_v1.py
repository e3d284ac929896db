"""notify_api.run_retention_v1: daily partitions made ahead, a default partition for anything outside them, partitions
dropped once older than the longest history (or, for content tables, content) period of any tenant."""

from __future__ import annotations

import datetime as dt
import threading
import time

from psycopg.types.json import Jsonb

from tests.conftest import call

TABLES = ("delivery_events", "delivery_attempts", "callback_attempts", "mock_messages")


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
