"""Attacks by a database login bound to one tenant (notify.login_tenants) on the other tenants of the same database.

The trusted direct-SQL caller logs in as dispatcher_caller (notify_caller). Bound to its own tenant, it tries another
tenant's data through every function it may call, with the tricks a caller has: a known tenant id, the tenant
setting set by hand, SET ROLE. Each is refused with ND403 tenant_not_allowed (whether or not the tenant exists), and
the tenant lookup does not show the other tenant. Unbound logins keep today's behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, ROOT, app_url, call, intent


@pytest.fixture
def victim(db: psycopg.Connection) -> str:
    victim_id = str(call(db, "notify_api.create_tenant_v1('victim', 'Victim Club', 'en')")["id"])
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", victim_id, Jsonb(REMINDER))
    call(
        db,
        "notify_api.upsert_recipient_v1(%s, 'secret-member', %s)",
        victim_id,
        Jsonb({"addresses": {"email": "hidden@victim.example"}}),
    )
    return victim_id


@pytest.fixture
def bound_caller(db: psycopg.Connection, db_url: str, ready: str, victim: str) -> psycopg.Connection:
    """dispatcher_caller, bound to the tenant acme (the `ready` fixture's) by the operator."""
    url = app_url(db_url, "dispatcher_caller")
    call(db, "notify.bind_login_v1('dispatcher_caller', 'acme')")
    conn = psycopg.connect(url, autocommit=True)
    yield conn
    conn.close()


# Every function notify_caller may call that takes a tenant, with arguments that would succeed for the right tenant.
CALLS = [
    ("select * from notify_api.submit_notification_v1(%s, %s)", lambda: [Jsonb(intent(channels=["email"]))]),
    ("select notify_api.submit_notifications_v1(%s, %s)", lambda: [Jsonb([{"notification": intent(channels=["email"])}])]),
    ("select notify_api.get_recipient_v1(%s, %s)", lambda: ["secret-member"]),
    (
        "select notify_api.upsert_recipient_v1(%s, %s, %s)",
        lambda: ["secret-member", Jsonb({"addresses": {"email": "x@attacker.example"}})],
    ),
    (
        "select notify_api.record_consent_v1(%s, %s, %s)",
        lambda: ["secret-member", Jsonb({"channel": "email", "status": "revoked", "source": "x"})],
    ),
    ("select notify_api.list_consents_v1(%s, %s)", lambda: ["secret-member"]),
    ("select notify_api.list_templates_v1(%s, %s)", lambda: [None]),
    ("select notify_api.get_notification_v1(%s, %s)", lambda: [str(uuid.uuid4())]),
    ("select notify_api.cancel_notification_v1(%s, %s)", lambda: [str(uuid.uuid4())]),
    ("select notify_api.list_callbacks_v1(%s, %s)", lambda: [str(uuid.uuid4())]),
]


def refused(conn: psycopg.Connection, query: str, *params: object) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params).fetchall()  # type: ignore[arg-type]
    assert (info.value.sqlstate, info.value.diag.constraint_name) == ("ND403", "tenant_not_allowed"), info.value


@pytest.mark.parametrize(("query", "args"), CALLS, ids=[c[0].split("notify_api.")[1].split("(")[0] for c in CALLS])
def test_a_bound_login_cannot_reach_another_tenant(db, bound_caller, victim, query, args):
    refused(bound_caller, query, victim, *args())
    assert db.execute("select count(*) from notify.notification_requests where tenant_id = %s", (victim,)).fetchone()[0] == 0
    assert db.execute("select address from notify.recipient_addresses where tenant_id = %s", (victim,)).fetchall() == [
        ("hidden@victim.example",)
    ]
    assert db.execute("select count(*) from notify.recipient_consents where tenant_id = %s", (victim,)).fetchone()[0] == 0


def test_a_bound_login_cannot_find_another_tenant_nor_probe_for_one(bound_caller, victim):
    assert bound_caller.execute("select notify_api.get_tenant_v1('victim')").fetchone()[0] is None
    assert bound_caller.execute("select notify_api.get_tenant_v1('acme')").fetchone()[0]["slug"] == "acme"
    refused(
        bound_caller, "select notify_api.get_recipient_v1(%s, 'secret-member')", str(uuid.uuid4())
    )  # no such tenant: same answer


def test_setting_the_tenant_by_hand_or_another_role_does_not_lift_the_binding(bound_caller, victim):
    with bound_caller.transaction():
        bound_caller.execute("select set_config('notify.tenant_id', %s, true)", (victim,))
        refused(bound_caller, "select notify_api.get_recipient_v1(%s, 'secret-member')", victim)
    with bound_caller.transaction():
        bound_caller.execute("set local role notify_caller")  # current_user changes, session_user (the login) does not
        refused(bound_caller, "select notify_api.get_recipient_v1(%s, 'secret-member')", victim)


def test_a_bound_login_works_for_its_own_tenant(bound_caller, ready):
    tenant = bound_caller.execute("select notify_api.get_tenant_v1('acme')").fetchone()[0]
    assert tenant["id"] == ready
    row = bound_caller.execute(
        "select response, replayed from notify_api.submit_notification_v1(%s, %s)", (ready, Jsonb(intent()))
    ).fetchone()
    assert row[0]["status"] == "accepted"
    assert (
        bound_caller.execute("select notify_api.get_recipient_v1(%s, 'runner-42')", (ready,)).fetchone()[0]["ref"] == "runner-42"
    )
    assert (
        bound_caller.execute("select notify_api.get_notification_v1(%s, %s)", (ready, row[0]["id"])).fetchone()[0]["id"]
        == row[0]["id"]
    )


def test_an_unbound_login_keeps_reaching_every_tenant(db_url, bound_caller, ready, victim):
    with psycopg.connect(app_url(db_url, "dispatcher_app"), autocommit=True) as api:
        for tenant in (ready, victim):
            assert api.execute("select notify_api.list_templates_v1(%s)", (tenant,)).fetchone()[0]
        assert api.execute("select notify_api.get_tenant_v1('victim')").fetchone()[0]["id"] == victim


def test_a_login_bound_to_two_tenants_enters_both_but_one_per_transaction(db, bound_caller, ready, victim):
    call(db, "notify.bind_login_v1('dispatcher_caller', 'victim')")
    assert bound_caller.execute("select notify_api.get_recipient_v1(%s, 'secret-member')", (victim,)).fetchone()[0]
    with bound_caller.transaction(), pytest.raises(psycopg.Error) as info:
        bound_caller.execute("select notify_api.get_recipient_v1(%s, 'runner-42')", (ready,))
        bound_caller.execute("select notify_api.get_recipient_v1(%s, 'secret-member')", (victim,))
    assert info.value.sqlstate == "ND404"


@pytest.mark.parametrize("login", ["dispatcher_caller", "dispatcher_app"])
def test_application_logins_cannot_change_bindings(db, db_url, bound_caller, login):
    with psycopg.connect(app_url(db_url, login), autocommit=True) as conn:
        for query in (
            "select notify.unbind_login_v1('dispatcher_caller', 'acme')",
            "select notify.bind_login_v1('dispatcher_caller', 'victim')",
            "select notify.list_login_bindings_v1()",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query)  # type: ignore[arg-type]
    # Even with EXECUTE granted (say, by a later blanket grant), the functions run with the caller's own privileges.
    db.execute("grant execute on function notify.unbind_login_v1(text, text) to notify_caller, notify_service")
    with psycopg.connect(app_url(db_url, login), autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("select notify.unbind_login_v1('dispatcher_caller', 'acme')")
    assert db.execute("select tenant_ids from notify.login_tenants where login = 'dispatcher_caller'").fetchone() is not None


def test_bind_validates_and_unbinding_the_last_tenant_lifts_the_binding(db, bound_caller, victim):
    for args, field in ((("nobody_such_login", "acme"), "login"), (("dispatcher_caller", "no-such-tenant"), "tenant")):
        with pytest.raises(psycopg.Error) as info:
            call(db, "notify.bind_login_v1(%s, %s)", *args)
        assert (info.value.sqlstate, info.value.diag.column_name) == ("ND404", field)
    assert call(db, "notify.bind_login_v1('dispatcher_caller', 'acme')")["tenants"][0]["slug"] == "acme"  # idempotent
    assert len(call(db, "notify.list_login_bindings_v1()")) == 1
    assert call(db, "notify.unbind_login_v1('dispatcher_caller', 'acme')") == {"login": "dispatcher_caller", "tenants": []}
    assert call(db, "notify.list_login_bindings_v1()") == []
    assert bound_caller.execute("select notify_api.get_tenant_v1('victim')").fetchone()[0]["id"] == victim
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify.unbind_login_v1('dispatcher_caller', 'acme')")
    assert info.value.sqlstate == "ND404"


def test_the_cli_binds_lists_and_unbinds(db, db_url, victim):
    app_url(db_url)  # the login roles exist

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dispatcher", "login", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "DATABASE_URL": db_url},
        )

    bound = run("bind", "--login", "dispatcher_caller", "--tenant", "victim")
    assert bound.returncode == 0, bound.stderr
    assert json.loads(bound.stdout)["tenants"] == [{"id": victim, "slug": "victim"}]
    assert json.loads(run("list").stdout)[0]["login"] == "dispatcher_caller"
    assert "no such tenant" in run("bind", "--login", "dispatcher_caller", "--tenant", "nobody").stderr
    assert json.loads(run("unbind", "--login", "dispatcher_caller", "--tenant", "victim").stdout)["tenants"] == []
    assert json.loads(run("list", "--login", "dispatcher_caller").stdout) == []
