"""Attacks on retention settings: another tenant's API key, a login bound to another tenant, a trusted SQL caller and the
application role going for the tables and partitions directly. Each attacker uses its own key or login."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher.settings import Settings
from tests.api.test_api import SECRET, is_problem, make_key
from tests.conftest import app_url, call

VICTIM = {"content_days": 400, "history_days": 3000}


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, ready: str) -> Iterator[TestClient]:
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET, max_body_bytes=64 * 1024)
    key, _ = make_key(db, ready)
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


@pytest.fixture
def victim(db, ready) -> str:
    call(db, "notify_api.set_retention_v1(%s, %s)", ready, Jsonb(VICTIM))
    return ready


def attacker_key(db) -> tuple[str, str]:
    other = str(call(db, "notify_api.create_tenant_v1('mallory')")["id"])
    return other, make_key(db, other)[0]


def test_another_tenants_key_neither_reads_nor_changes_the_settings(client, db, victim):
    _, key = attacker_key(db)
    headers = {"Authorization": f"Bearer {key}"}
    seen = client.get("/internal/retention", headers=headers, params={"tenant_id": victim})
    assert (
        seen.status_code == 200 and seen.json()["content_days"] == 30 and seen.json()["default"] is True
    )  # its own, not the victim's
    is_problem(client.put("/internal/retention", json={"tenant_id": victim, "content_days": 1}, headers=headers), 400)
    assert (
        client.put("/internal/retention", json={"content_days": 1}, headers=headers, params={"tenant_id": victim}).status_code
        == 200
    )
    got = call(db, "notify_api.get_retention_v1(%s)", victim)
    assert (got["content_days"], got["history_days"]) == (400, 3000)


def test_a_login_bound_to_another_tenant_cannot_reach_the_settings(db, db_url, victim):
    call(db, "notify_api.create_tenant_v1('mallory')")
    call(db, "notify.bind_login_v1('dispatcher_app', 'mallory')")
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:
        for query in ("notify_api.get_retention_v1(%s)", "notify_api.set_retention_v1(%s, '{\"content_days\": 1}')"):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(f"select {query}", (victim,))
            assert err.value.sqlstate == "ND403", query
    assert call(db, "notify_api.get_retention_v1(%s)", victim)["content_days"] == 400


def test_a_trusted_sql_caller_gets_no_retention_function_and_no_table(db_url, victim):
    with psycopg.connect(app_url(db_url, "dispatcher_caller"), autocommit=True) as conn:
        for query in (
            f"notify_api.set_retention_v1('{victim}', '{{}}')",
            f"notify_api.get_retention_v1('{victim}')",
            "notify_api.scrub_expired_v1(10000)",
            "notify_api.run_retention_v1(90)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select {query}")


def test_the_application_role_reaches_no_partition_and_no_settings_row(db_url, victim):
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:
        for table in (
            "retention_settings",
            "delivery_events",
            "delivery_events_default",
            "mock_messages_default",
            "delivery_attempts",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select * from notify.{table}")
        part = conn.execute(
            "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
            "where i.inhparent = 'notify.delivery_events'::regclass and c.relname like '%%_p%%' limit 1"
        ).fetchone()[0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select * from notify.{part}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"drop table notify.{part}")
