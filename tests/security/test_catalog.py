"""The catalog audit behind tests/security/test_definer_functions.py: every function pins a search_path with pg_temp
explicitly last (or is an inlined helper nobody but the owners may execute), and no application role can create
temporary objects or objects in a schema that definer code searches."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from dispatcher import schema
from tests.catalog.test_migrations import (
    INLINED,
    empty_db,  # noqa: F401  (fixture)
)
from tests.conftest import APP_ROLES, app_url, intent

GROUPS = ("notify_service", "notify_caller")
PINNED = {"pg_catalog, pg_temp", "pg_catalog, public, pg_temp"}
FUNCTIONS = """
    select n.nspname, p.proname, p.oid::regprocedure::text, l.lanname, p.prosecdef, p.prosrc,
           (select substr(c, length('search_path=') + 1) from unnest(p.proconfig) c where c like 'search_path=%%') as path
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace join pg_language l on l.oid = p.prolang
     where n.nspname in ('notify', 'notify_api') or (n.nspname = 'public' and p.proname like 'procrastinate%%')
"""


@pytest.fixture
def roles(db: psycopg.Connection, db_url: str) -> list[str]:
    app_url(db_url)  # creates the login roles
    return [*GROUPS, *APP_ROLES]


def test_every_function_pins_a_search_path_with_pg_temp_last(db):
    rows = db.execute(FUNCTIONS).fetchall()
    assert len([r for r in rows if r[0] == "public"]) >= 15  # procrastinate's, pinned too
    unpinned = [r for r in rows if r[6] not in PINNED]
    # The only exception: inlined helpers (no SET clause, so the planner can inline them, docs/architecture.md).
    assert all((r[0], r[3], r[4], r[6]) == ("notify", "sql", False, None) for r in unpinned), [(r[2], r[6]) for r in unpinned]
    assert {r[1] for r in unpinned} == INLINED
    assert {r[6] for r in rows if r[0] == "public"} == {"pg_catalog, public, pg_temp"}


def test_no_application_role_may_execute_an_inlined_helper(db, roles):
    helpers = [r for r in db.execute(FUNCTIONS).fetchall() if r[6] is None and r[0] == "notify"]
    assert helpers
    for _, _name, signature, *_ in helpers:
        acl = db.execute("select proacl::text[] from pg_proc where oid = %s::regprocedure", (signature,)).fetchone()[0]
        assert acl is not None and not any(a.startswith("=") for a in acl), (signature, acl)  # null acl: PUBLIC may execute
        for role in roles:
            assert not db.execute("select has_function_privilege(%s, %s, 'execute')", (role, signature)).fetchone()[0], (
                role,
                signature,
            )


def test_inlined_helpers_are_called_only_from_pinned_functions(db):
    rows = db.execute(FUNCTIONS).fetchall()
    helpers = {r[1] for r in rows if r[6] is None}
    callers = [(r[2], r[6]) for r in rows for h in helpers if f"notify.{h}(" in r[5]]
    assert len(callers) > 10
    assert [c for c in callers if c[1] not in PINNED and c[0].split("(")[0].removeprefix("notify.") not in helpers] == []
    # Row security policies call notify._tenant(): they run only for roles that reach the tables, which no application role does.
    for role in db.execute("select unnest(%s::text[])", ([*GROUPS, "public"],)).fetchall():
        reachable = db.execute(
            """select c.relname from pg_class c where c.relnamespace = 'notify'::regnamespace and c.relkind = 'r'
                                    and has_table_privilege(%s, c.oid,
                                      'select, insert, update, delete, truncate, references, trigger')""",
            (role[0],),
        ).fetchall()
        assert reachable == [], (role[0], reachable)


def test_no_application_role_may_create_temporary_objects_or_objects_on_a_searched_schema(db, roles):
    for role in roles:
        assert not db.execute("select has_database_privilege(%s, current_database(), 'temporary')", (role,)).fetchone()[0], role
        for nsp in ("public", "notify", "notify_api"):
            assert not db.execute("select has_schema_privilege(%s, %s, 'create')", (role, nsp)).fetchone()[0], (role, nsp)
    for owner in ("notify_owner", "notify_system"):
        assert db.execute("select has_database_privilege(%s, current_database(), 'temporary')", (owner,)).fetchone()[0], owner


@pytest.mark.parametrize("login", list(APP_ROLES))
def test_a_login_cannot_create_temporary_objects_even_after_a_definer_function_made_its_temporary_schema(
    db, db_url, ready, login
):
    body = intent(recipients=[{"ref": "m-1", "addresses": {"email": "m1@example.com"}}], channels=["email"])
    del body["recipient"]
    with psycopg.connect(app_url(db_url, login), autocommit=True) as conn:
        conn.execute(
            "select * from notify_api.submit_notification_v1(%s, %s)", (ready, Jsonb(body))
        )  # the fan-out: temp tables as notify_owner
        assert conn.execute("select pg_my_temp_schema() <> 0").fetchone()[0]  # the session has its temporary schema now
        for statement in (
            "create temporary table _fanout_input (i integer)",
            "create temporary view procrastinate_events as select 1 as job_id",
            "create domain pg_temp.text as pg_catalog.text",
            "create function pg_temp.f() returns integer language sql as 'select 1'",
            "create table public.procrastinate_x (i integer)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)  # type: ignore[arg-type]


def test_every_migrate_takes_temporary_from_public_again(empty_db):  # noqa: F811
    """A database's privileges do not survive CREATE DATABASE ... TEMPLATE or a restore into an existing database."""
    schema.migrate(empty_db)
    with psycopg.connect(empty_db, autocommit=True) as conn:
        name = sql.Identifier(conn.info.dbname)
        conn.execute(sql.SQL("grant temporary on database {} to public").format(name))
        conn.execute(sql.SQL("revoke temporary on database {} from notify_owner, notify_system").format(name))
        assert conn.execute("select has_database_privilege('notify_caller', current_database(), 'temporary')").fetchone()[0]
        assert schema.migrate(empty_db) == []
        assert not conn.execute("select has_database_privilege('notify_caller', current_database(), 'temporary')").fetchone()[0]
        assert conn.execute("select has_database_privilege('notify_owner', current_database(), 'temporary')").fetchone()[0]
