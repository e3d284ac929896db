"""migrations/ rebuild exactly the schema of sql/, landed migrations are unchanged, migrating twice is a no-op."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from dispatcher import schema

SNAPSHOT = """
with ns as (select oid, nspname from pg_namespace where nspname in ('notify', 'notify_api', 'public'))
select 'relation', ns.nspname || '.' || c.relname, c.relkind::text || ' ' || coalesce(obj_description(c.oid, 'pg_class'), '')
       || ' acl=' || coalesce(c.relacl::text, '') || ' rls=' || c.relrowsecurity::text || ' force=' || c.relforcerowsecurity::text
       || ' owner=' || c.relowner::regrole::text
  from pg_class c join ns on ns.oid = c.relnamespace
 where c.relname not like '\\_yoyo%%' and c.relname not like 'yoyo%%'
union all
select 'column', ns.nspname || '.' || c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin,
         d.adrelid), '')
       || ' ' || coalesce(col_description(c.oid, a.attnum), '') || ' ' || a.attnum
  from pg_attribute a join pg_class c on c.oid = a.attrelid join ns on ns.oid = c.relnamespace
  left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
 where a.attnum > 0 and not a.attisdropped and c.relname not like '\\_yoyo%%' and c.relname not like 'yoyo%%'
union all
select 'constraint', ns.nspname || '.' || conrelid::regclass::text || '.' || conname, pg_get_constraintdef(co.oid)
  from pg_constraint co join ns on ns.oid = co.connamespace
union all
select 'index', ns.nspname || '.' || c.relname, pg_get_indexdef(c.oid)
  from pg_index i join pg_class c on c.oid = i.indexrelid join ns on ns.oid = c.relnamespace
 where c.relname not like '\\_yoyo%%' and c.relname not like 'yoyo%%'
union all
select 'function', ns.nspname || '.' || p.oid::regprocedure::text,
       pg_get_functiondef(p.oid) || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '') || ' acl=' ||
         coalesce(p.proacl::text, '')
       || ' owner=' || p.proowner::regrole::text
  from pg_proc p join ns on ns.oid = p.pronamespace
union all
select 'trigger', t.tgrelid::regclass::text || '.' || t.tgname, pg_get_triggerdef(t.oid)
  from pg_trigger t join pg_class c on c.oid = t.tgrelid join ns on ns.oid = c.relnamespace where not t.tgisinternal
union all
select 'type', ns.nspname || '.' || t.typname,
       t.typtype::text || ' ' || coalesce((select string_agg(enumlabel, ',' order by enumsortorder) from pg_enum where
         enumtypid = t.oid), '')
       || ' ' || coalesce(obj_description(t.oid, 'pg_type'), '') || ' owner=' || t.typowner::regrole::text
  from pg_type t join ns on ns.oid = t.typnamespace where t.typtype in ('e', 'c') and t.typrelid = 0 or (t.typtype = 'c' and
    ns.nspname = 'notify')
union all
select 'policy', schemaname || '.' || tablename || '.' || policyname,
       cmd || ' ' || roles::text || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
  from pg_policies where schemaname in ('notify', 'notify_api')
union all
select 'schema', nspname, coalesce(obj_description(oid, 'pg_namespace'), '') || ' acl=' || coalesce(nspacl::text, '')
  from pg_namespace where nspname in ('notify', 'notify_api')
order by 1, 2
"""


def snapshot(url: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(SNAPSHOT).fetchall()  # type: ignore[arg-type]
    return [r for r in rows if "yoyo" not in r[1]]  # yoyo's own bookkeeping tables


@pytest.fixture
def empty_db(db: psycopg.Connection, pg_server) -> str:  # noqa: ANN001
    name = f"{db.info.dbname}_migrated"
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {}").format(sql.Identifier(name)))
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    yield pg_server.url(name)
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def test_migrations_build_the_same_schema_as_sql_dir(db_url: str, empty_db: str) -> None:
    applied = schema.migrate(empty_db)
    assert applied == [p.stem for p in schema.migration_files()]
    from_sql, from_migrations = snapshot(db_url), snapshot(empty_db)
    assert len(from_sql) > 200
    only_sql = sorted(set(from_sql) - set(from_migrations))
    only_migrations = sorted(set(from_migrations) - set(from_sql))
    differ = "\n".join(
        f"{a[1]}\n  sql/:        ...{a[2][-150:]}\n  migrations/: ...{b[2][-150:]}"
        for a, b in zip(only_sql, only_migrations, strict=False)
    )
    assert (only_sql, only_migrations) == ([], []), differ[:4000]


def test_migrating_again_applies_nothing(empty_db: str) -> None:
    schema.migrate(empty_db)
    assert schema.migrate(empty_db) == []


def test_landed_migrations_are_unchanged() -> None:
    assert schema.verify_checksums() == []


def test_an_edited_migration_is_detected(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    for p in schema.migration_files():
        (migrations / p.name).write_bytes(p.read_bytes())
    (migrations / "CHECKSUMS").write_text(schema.CHECKSUMS.read_text())
    monkeypatch.setattr(schema, "MIGRATIONS_DIR", migrations)
    monkeypatch.setattr(schema, "CHECKSUMS", migrations / "CHECKSUMS")
    assert schema.verify_checksums() == []
    first = schema.migration_files()[0]
    first.write_text(first.read_text() + "\n-- a quiet edit\n")
    (migrations / "9999_new.sql").write_text("select 1;\n")
    problems = schema.verify_checksums()
    assert any(first.name in p and "edited" in p for p in problems)
    assert any("9999_new.sql" in p and "not in migrations/CHECKSUMS" in p for p in problems)
    with pytest.raises(RuntimeError, match="edited after landing"):
        schema.migrate("postgresql://nobody@/nowhere")


def test_every_table_and_function_is_commented(db: psycopg.Connection) -> None:
    missing = db.execute("""
        select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'notify' and c.relkind = 'r' and obj_description(c.oid, 'pg_class') is null
        union all
        select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname in ('notify', 'notify_api') and obj_description(p.oid, 'pg_proc') is null
    """).fetchall()
    assert missing == []


# Hot, pure helpers carry no SET clause so the planner can inline them (docs/architecture.md). They must stay
# private, SQL-language, not security definer, and name everything schema-qualified.
INLINED = {
    "_address_valid",
    "_channel_rules",
    "_consent",
    "_default_policy",
    "_find_candidates",
    "_is_bsuid",
    "_is_final",
    "_is_usual_submission",
    "_provider_family",
    "_rank",
    "_tenant",
    "_transition_allowed",
    "_uuidv7",
}


def test_every_function_pins_its_search_path_except_the_inlined_helpers(db: psycopg.Connection) -> None:
    unpinned = db.execute("""
        select p.proname, l.lanname, p.prosecdef, n.nspname from pg_proc p
          join pg_namespace n on n.oid = p.pronamespace join pg_language l on l.oid = p.prolang
         where n.nspname in ('notify', 'notify_api')
           and not exists (select from unnest(coalesce(p.proconfig, '{}')) c where c like 'search_path=%%')
    """).fetchall()
    assert {r[0] for r in unpinned} == INLINED
    assert {(r[1], r[2], r[3]) for r in unpinned} == {("sql", False, "notify")}
