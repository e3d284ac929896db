"""Query plans on a new database, before autovacuum has analyzed anything.

Postgres keeps the plan of a foreign-key check (and of a PL/pgSQL statement, once generic) for the life of the
connection. Planned on empty tables without statistics, a lookup by primary key (tenant_id, id) was served by
another unique index that also started with tenant_id ("Index Cond: tenant_id = $1, Filter: id = $2"), so each
check read every row of the tenant and submissions slowed down as the tables grew (migration 0012). These tests
plan every lookup by a primary or unique key and every foreign-key check the way Postgres does, on the suite's new database,
and require an index condition on every key column; and they prove that a submission costs the same after
thousands of others.
"""

from __future__ import annotations

import psycopg

from tests.conftest import call, intent, submit

KEYS = """
select c.conname, c.contype, t.oid::regclass::text,
       array(select a.attname from unnest(case c.contype when 'f' then c.confkey else c.conkey end) with ordinality k(n, o)
               join pg_attribute a on a.attrelid = t.oid and a.attnum = k.n order by k.o),
       array(select format_type(a.atttypid, a.atttypmod) from unnest(case c.contype when 'f' then c.confkey else c.conkey end)
               with ordinality k(n, o) join pg_attribute a on a.attrelid = t.oid and a.attnum = k.n order by k.o)
  from pg_constraint c
  join pg_class t on t.oid = case c.contype when 'f' then c.confrelid else c.conrelid end
 where c.contype in ('p', 'f', 'u') and c.connamespace = 'notify'::regnamespace
   -- A partitioned table (sql/105_retention.sql) holds no rows itself (`only` plans as an empty Result); each of its
   -- partitions' keys is listed and planned instead.
   and t.relkind <> 'p'
 order by 1
"""


def generic_plan(conn: psycopg.Connection, table: str, columns: list[str], types: list[str]) -> str:
    """The plan of `select ... where key = $n for key share`, the query a foreign-key check prepares, as a
    generic plan (the kind kept for the connection's life)."""
    conn.execute("set plan_cache_mode = force_generic_plan")
    where = " and ".join(f"{c} = ${n}" for n, c in enumerate(columns, 1))
    conn.execute(f"prepare key_lookup ({', '.join(types)}) as select 1 from only {table} x where {where} for key share of x")
    try:
        return "\n".join(r[0] for r in conn.execute(f"explain execute key_lookup ({', '.join('null' for _ in columns)})"))
    finally:
        conn.execute("deallocate key_lookup")


def test_every_key_lookup_uses_every_key_column_on_a_new_database(db: psycopg.Connection) -> None:
    # The tables of the submission path are new and empty in every test's database: never analyzed, as in production
    # before autovacuum's first visit (autovacuum does not analyze a table nothing was written to).
    assert (
        db.execute(
            "select count(*) from pg_class where oid in ('notify.notification_requests'::regclass, "
            "'notify.notification_deliveries'::regclass, 'notify.recipients'::regclass) and reltuples < 0"
        ).fetchone()[0]
        == 3
    )
    keys = db.execute(KEYS).fetchall()
    assert len(keys) > 20
    wrong = []
    for name, kind, table, columns, types in keys:
        plan = generic_plan(db, table, columns, types)
        # (a column named like a keyword, channel_providers.position, is shown quoted)
        conditions = " ".join(line for line in plan.splitlines() if "Index Cond" in line).replace('"', "")
        if "Filter" in plan or "Seq Scan" in plan or not all(f"{c} = $" in conditions for c in columns):
            wrong.append(f"{name} ({ {'p': 'primary key', 'f': 'foreign key', 'u': 'unique key'}[kind] } of {table}):\n{plan}")
    print(f"\nkey lookups planned: {len(keys)}, without an index condition on every key column: {len(wrong)}")
    assert not wrong, "\n\n".join(wrong)


INDEX_TUPLES_READ = """
select coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
  from pg_index i join pg_class c on c.oid = i.indrelid where c.relnamespace = 'notify'::regnamespace
"""


def test_a_submission_reads_as_much_after_thousands(db: psycopg.Connection, ready: str) -> None:
    """On one connection (whose cached plans were made when the tables were empty), a submission reads a few index
    entries however many requests exist: counted by Postgres for the current transaction, not timed. Before
    migration 0012 each submission read every earlier request of its tenant."""
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'plain', %s)",
        ready,
        psycopg.types.json.Jsonb({"locale": "en", "channels": {"email": {"subject": "Hi", "text": "Hi {{name}}"}}}),
    )

    def body(i: int) -> dict:
        return intent(
            recipient={"ref": f"r-{i % 300}", "addresses": {"email": f"r{i % 300}@example.com"}},
            channels=["email"],
            template="plain",
            variables={"name": "A"},
        )

    def index_tuples_per_submission(first: int, n: int) -> float:
        with db.transaction(force_rollback=True):
            before = db.execute(INDEX_TUPLES_READ).fetchone()[0]
            for i in range(first, first + n):
                submit(db, ready, body(i), key=f"k-{i}")
            return float(db.execute(INDEX_TUPLES_READ).fetchone()[0] - before) / n

    early = index_tuples_per_submission(0, 300)  # the first 300 recipients are created here (and rolled back)
    for i in range(2000):
        submit(db, ready, body(i), key=f"k-{i}")
    late = index_tuples_per_submission(2000, 300)
    print(f"\nindex entries read per submission: {early:.1f} on empty tables, {late:.1f} after 2,000 submissions")
    assert late < 30, f"a submission reads {late:.0f} index entries after 2,000 others (a scan that grows with the table)"


TUPLES_READ = """
select coalesce(sum(pg_stat_get_xact_tuples_returned(c.oid)), 0)
  from pg_class c where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'i')
"""


def test_a_batch_reads_as_much_per_item_after_thousands(db: psycopg.Connection, ready: str) -> None:
    """The set-based batch (notify._submit_batch_usual) runs as notify_owner under row security, where a join on an
    expression over the item cannot become an index condition: each item then scanned every request of its tenant.
    Rows and index entries read per item, counted by Postgres for the transaction, stay flat as requests grow."""

    def items(first: int, n: int) -> list[dict]:
        return [
            {
                "idempotency_key": f"b-{i}",
                "notification": intent(
                    recipient={"ref": f"r-{i % 300}", "addresses": {"email": f"r{i % 300}@example.com"}}, channels=["email"]
                ),
            }
            for i in range(first, first + n)
        ]

    def read_per_item(first: int, n: int) -> float:
        with db.transaction(force_rollback=True):
            before = db.execute(TUPLES_READ).fetchone()[0]
            out = call(db, "notify_api.submit_notifications_v1(%s, %s)", ready, psycopg.types.json.Jsonb(items(first, n)))
            assert out["accepted"] == n
            return float(db.execute(TUPLES_READ).fetchone()[0] - before) / n

    # The 300 recipients exist in both measurements and the statistics are current in both, so what differs is only
    # the number of requests: how the planner reads a 300-row table (a sequential scan per item is its cheapest plan
    # once that table is analyzed, whether autovacuum got to it or not) is the same in both.
    call(db, "notify_api.submit_notifications_v1(%s, %s)", ready, psycopg.types.json.Jsonb(items(5_000, 300)))
    db.execute("analyze")
    early = read_per_item(0, 200)
    for first in range(0, 3000, 1000):
        call(db, "notify_api.submit_notifications_v1(%s, %s)", ready, psycopg.types.json.Jsonb(items(10_000 + first, 1000)))
    db.execute("analyze")
    late = read_per_item(20_000, 200)
    print(f"\nrows and index entries read per batch item: {early:.1f} after 300 requests, {late:.1f} after 3,300 requests")
    assert late < 2 * early + 20, f"a batch item reads {late:.0f} rows after 3,300 requests ({early:.0f} after 300)"
