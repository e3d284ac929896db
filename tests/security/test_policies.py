"""Attacks on quiet hours and frequency caps: another tenant's API key, a login bound to another tenant, a transaction
bound to another tenant asking the dry-run decision, a trusted SQL caller and the application role going for the
tables directly. Each attacker uses its own key or login."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher.settings import Settings
from tests.api.test_api import SECRET, is_problem, make_key
from tests.conftest import app_url, call, intent, submit

QUIET = {"timezone": "Europe/Madrid", "start": "21:00", "end": "08:00", "categories": {"secret_launch": {"exempt": True}}}
CAPS = {"caps": [{"max": 2, "period": "P1D", "category": "secret_launch"}]}


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, ready: str) -> Iterator[TestClient]:
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET, max_body_bytes=64 * 1024)
    key, _ = make_key(db, ready)
    with TestClient(app=create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


@pytest.fixture
def victim(db, ready) -> str:
    call(db, "notify_api.set_quiet_hours_v1(%s, %s)", ready, Jsonb(QUIET))
    call(db, "notify_api.set_frequency_caps_v1(%s, %s)", ready, Jsonb(CAPS))
    return ready


def attacker_key(db) -> tuple[str, str]:
    other = str(call(db, "notify_api.create_tenant_v1('mallory')")["id"])
    return other, make_key(db, other)[0]


def victim_unchanged(db, victim):
    assert call(db, "notify_api.get_quiet_hours_v1(%s)", victim)["categories"] == QUIET["categories"]
    assert call(db, "notify_api.get_frequency_caps_v1(%s)", victim)["caps"][0]["category"] == "secret_launch"


@pytest.mark.parametrize("path", ["/internal/quiet-hours", "/internal/frequency-caps"])
def test_another_tenants_key_neither_reads_nor_changes_the_policies(client, db, victim, path):
    _, key = attacker_key(db)
    headers = {"Authorization": f"Bearer {key}"}
    for params in ({}, {"tenant_id": victim}):
        seen = client.get(path, headers=headers, params=params)
        assert seen.status_code == 200 and seen.json()["default"] is True, seen.text  # its own, not the victim's
        assert "secret_launch" not in seen.text
    body = {"start": "00:00", "end": "23:59"} if "quiet" in path else {"caps": [{"max": 1, "period": "PT1S"}]}
    is_problem(client.put(path, json={**body, "tenant_id": victim}, headers=headers), 400)
    assert client.put(path, json=body, headers=headers, params={"tenant_id": victim}).status_code == 200  # its own
    assert client.delete(path, headers=headers, params={"tenant_id": victim}).status_code == 200  # its own
    victim_unchanged(db, victim)


def test_a_login_bound_to_another_tenant_cannot_reach_the_policies(db, db_url, victim):
    call(db, "notify_api.create_tenant_v1('mallory')")
    call(db, "notify.bind_login_v1('dispatcher_app', 'mallory')")
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:
        for query in (
            "notify_api.get_quiet_hours_v1(%s)",
            "notify_api.set_quiet_hours_v1(%s, '{}')",
            "notify_api.delete_quiet_hours_v1(%s)",
            "notify_api.get_frequency_caps_v1(%s)",
            "notify_api.set_frequency_caps_v1(%s, '{\"caps\": []}')",
            "notify_api.delete_frequency_caps_v1(%s)",
        ):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(f"select {query}", (victim,))
            assert err.value.sqlstate == "ND403", query
    victim_unchanged(db, victim)


def test_a_transaction_bound_to_another_tenant_gets_not_found(db, db_url, victim):
    other, _ = attacker_key(db)
    with psycopg.connect(app_url(db_url)) as conn:
        call(conn, "notify_api.get_quiet_hours_v1(%s)", other)  # binds the transaction to mallory
        for query in ("notify_api.get_quiet_hours_v1(%s)", "notify_api.delete_frequency_caps_v1(%s)"):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(f"select {query}", (victim,))
            assert err.value.sqlstate == "ND404", query
            conn.rollback()
            call(conn, "notify_api.get_quiet_hours_v1(%s)", other)
    victim_unchanged(db, victim)


def test_row_security_hides_the_victims_policies_from_the_decision(db, victim):
    """The dry run's decision, as the owning role in a transaction bound to mallory, sees none of the victim's rules: a
    delivery the victim's quiet hours or caps would hold reads as send (nothing leaks through it)."""
    submit(db, victim, intent(channels=["email"]))
    rid = call(db, "notify._recipient_id(%s, 'runner-42')", victim)
    other = str(call(db, "notify_api.create_tenant_v1('mallory')")["id"])
    night = "2026-06-10T22:00:00Z"  # 00:00 in Madrid: inside the victim's quiet hours
    query = "select decision from notify._policy_decision(%s, %s, 'email', null, 'mock', null, null, %s)"
    assert db.execute(query, (victim, rid, night)).fetchone()[0] == "hold"  # as the superuser: it is there
    with db.transaction():
        db.execute("set local role notify_owner")
        db.execute("select set_config('notify.tenant_id', %s, true)", (other,))
        assert db.execute(query, (victim, rid, night)).fetchone()[0] == "send"
        assert db.execute("select count(*) from notify.quiet_hours").fetchone()[0] == 0
        assert db.execute("select count(*) from notify.frequency_caps").fetchone()[0] == 0


def test_a_trusted_sql_caller_gets_no_policy_function_and_no_table(db_url, victim):
    with psycopg.connect(app_url(db_url, "dispatcher_caller"), autocommit=True) as conn:
        for query in (
            f"notify_api.set_quiet_hours_v1('{victim}', '{{}}')",
            f"notify_api.get_quiet_hours_v1('{victim}')",
            f"notify_api.delete_frequency_caps_v1('{victim}')",
            f"notify._policy_decision('{victim}', gen_random_uuid(), 'email', null, 'mock', null, null, now())",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select {query}")


def test_the_application_role_reaches_no_policy_table(db_url, victim):
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:
        for table in ("quiet_hours", "frequency_caps", "policy_sends"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select * from notify.{table}")
            conn.execute("select 1")
        for fn in (
            "notify._policy_claim(gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'email', null, 'mock', null)",
            "notify._prune_policy_sends()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"select {fn}")
