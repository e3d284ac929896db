"""Tenant isolation in Postgres itself: the row security catalog audit, the policies as the owning role, direct SQL as
an application role, and the cross-tenant matrix over HTTP (reference/reliability.md sections 4 and 6.9)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.conftest import REMINDER, app_url, call, intent, submit

# Unique keys that do not start with tenant_id, each on purpose (sql/020_tables.sql says why).
GLOBAL_UNIQUE = {
    "tenants_pkey",
    "tenants_slug_key",
    "api_clients_key_hash_key",
    "notification_deliveries_provider_message",
    "channel_providers_phone_number_id_key",
    "channel_providers_twilio_number_key",
    "channel_providers_twilio_service_key",
    "channel_providers_kind",
}  # a WhatsApp business number, a Twilio number or Messaging Service belongs to one tenant; a provider is of a kind every
# tenant shares (sql/020)
# Functions that see every tenant's rows (owned by notify_system): the worker, webhooks, key lookup, tenant creation.
CROSS_TENANT = {
    "create_tenant_v1",
    "get_tenant_v1",
    "authenticate_api_key_v1",
    "authorize_v1",
    "take_tokens_v1",
    "claim_deliveries_v1",
    "record_attempts_v1",
    "run_maintenance_v1",
    "queue_health_v1",
    "ingest_webhook_v1",
    "record_mock_messages_v1",
    "claim_callbacks_v1",
    "record_callback_attempts_v1",
    "check_api_key_v1",
    "charge_api_key_v1",
    "set_provider_grants_v1",
    "whatsapp_limits_v1",  # dispatcher status: every tenant's WhatsApp messaging tier, like queue_health_v1
    "run_retention_v1",
    "scrub_expired_v1",
    "webhook_keys_v1",  # Twilio: whose auth token verifies a webhook, found before its tenant is known
    "record_provider_health_v1",  # the worker's batch: how every tenant's chained providers did (failover)
    "provider_health_v1",  # dispatcher status and metrics: every tenant's demoted providers, like queue_health_v1
}  # the operator's: a tenant's secret namespace may not overlap another's
APP_ROLES = ("notify_service", "notify_caller", "dispatcher_app", "dispatcher_caller")


def violations(db: psycopg.Connection) -> list[str]:
    """The RLS catalog audit as SQL: every rule of reliability.md 6.9, one message per violation."""
    found: list[str] = []
    tenant_tables = db.execute("""
        select c.relname, c.relrowsecurity, c.relforcerowsecurity, c.relowner::regrole::text
          from pg_class c
         where c.relnamespace = 'notify'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition
           and (c.relname = 'tenants' or exists (select from pg_attribute a where a.attrelid = c.oid and a.attname = 'tenant_id'))
    """).fetchall()
    assert len(tenant_tables) >= 14
    for name, rls, force, owner in tenant_tables:
        if not (rls and force):
            found.append(f"{name}: row security not enabled and forced")
        if owner != "notify_owner":
            found.append(f"{name}: owned by {owner}")
        policies = {
            r[0] for r in db.execute("select policyname from pg_policies where schemaname = 'notify' and tablename = %s", (name,))
        }
        if policies != {"tenant_rows", "system_rows"}:
            found.append(f"{name}: policies {sorted(policies)}")
    # A partition (sql/105_retention.sql) is reached through its parent, whose policies apply; it has none of its own, so
    # no role but its owner (and notify_system, which sees every row anyway) may hold a privilege on it.
    found += [
        f"{r[0]}: partition with privileges for {r[1]}"
        for r in db.execute("""
        select c.relname, a.grantee::regrole::text from pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
         where c.relnamespace = 'notify'::regnamespace and c.relispartition
           and a.grantee not in (c.relowner, 'notify_system'::regrole)""")
    ]
    for role, superuser, bypass, login in db.execute(
        "select rolname, rolsuper, rolbypassrls, rolcanlogin from pg_roles where rolname = any(%s) or rolname in "
        "('notify_owner', 'notify_system')",
        (list(APP_ROLES),),
    ).fetchall():
        # notify_system may bypass row security (the named cross-tenant functions' role, reliability.md 4.1); no other.
        if superuser or (bypass and role != "notify_system"):
            found.append(f"role {role}: superuser or BYPASSRLS")
        if role in ("notify_owner", "notify_system") and login:
            found.append(f"role {role}: can log in")
    for role, owned in db.execute(
        """
            select r.rolname, count(c.oid) + count(p.oid) from pg_roles r
              left join pg_class c on c.relowner = r.oid and c.relnamespace in ('notify'::regnamespace,
                'notify_api'::regnamespace)
              left join pg_proc p on p.proowner = r.oid and p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace)
             where r.rolname = any(%s) group by r.rolname""",
        (list(APP_ROLES),),
    ).fetchall():
        if owned:
            found.append(f"role {role}: owns {owned} objects")
    for role in APP_ROLES:
        for owner in ("notify_owner", "notify_system"):
            if db.execute("select pg_has_role(%s, %s, 'member')", (role, owner)).fetchone()[0]:
                found.append(f"role {role}: member of {owner}")
    found += [
        f"view {r[0]}: not security_invoker"
        for r in db.execute("""
        select c.relname from pg_class c where c.relkind = 'v' and c.relnamespace in ('notify'::regnamespace,
          'notify_api'::regnamespace)
           and not coalesce('security_invoker=true' = any(c.reloptions), false)""")
    ]
    for name, config, owner, src, args in db.execute("""
            select p.proname, p.proconfig, p.proowner::regrole::text, p.prosrc, pg_get_function_arguments(p.oid)
              from pg_proc p where p.pronamespace = 'notify_api'::regnamespace"""):
        if not any(c.startswith("search_path=") for c in config or []):
            found.append(f"{name}: search_path not pinned")
        expected_owner = "notify_system" if name in CROSS_TENANT else "notify_owner"
        if owner != expected_owner:
            found.append(f"{name}: owned by {owner}, expected {expected_owner}")
        if owner == "notify_owner" and "p_tenant_id uuid" in args:
            first = src.split("begin", 1)[-1] if "begin" in src.split("notify._enter")[0] else src
            if "notify._enter(p_tenant_id)" not in first.strip().splitlines()[0]:
                found.append(f"{name}: does not bind its tenant first")
    public_exec = db.execute("""
        select p.proname from pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
         where p.pronamespace in ('notify'::regnamespace, 'notify_api'::regnamespace) and a.grantee = 0""").fetchall()
    found += [f"{r[0]}: PUBLIC may execute" for r in public_exec]
    found += [
        f"{r[0]}.{r[1]}: unique or foreign key without tenant_id"
        for r in db.execute("""
        select c.conrelid::regclass::text, c.conname from pg_constraint c
         where c.connamespace = 'notify'::regnamespace and c.contype in ('u', 'p', 'f')
           and not exists (select from pg_attribute a where a.attrelid = c.conrelid and a.attnum = any(c.conkey) and
             a.attname = 'tenant_id')
           and c.conrelid::regclass::text not in ('notify.rate_buckets', 'notify.webhook_event_keys', 'notify.login_tenants',
                                                    'notify.address_hash_key', 'notify.provider_kinds')
           and c.conrelid::regclass::text !~ '^notify[.]webhook_events(_default|_p[0-9]{8})?$'
        union all
        select i.indrelid::regclass::text, x.relname from pg_index i join pg_class x on x.oid = i.indexrelid
         where x.relnamespace = 'notify'::regnamespace and i.indisunique
           and not exists (select from pg_attribute a where a.attrelid = i.indrelid and a.attnum = any(i.indkey) and
             a.attname = 'tenant_id')
           and i.indrelid::regclass::text not in ('notify.rate_buckets', 'notify.webhook_event_keys', 'notify.login_tenants',
                                                    'notify.address_hash_key', 'notify.provider_kinds')
           and i.indrelid::regclass::text !~ '^notify[.]webhook_events(_default|_p[0-9]{8})?$'""")
        if r[1] not in GLOBAL_UNIQUE
    ]
    return found


def test_rls_catalog_audit_finds_no_violations(db: psycopg.Connection) -> None:
    app_url(url_of_db(db))  # the login roles exist, so they are audited too
    found = violations(db)
    print(f"\nRLS catalog audit: {len(found)} violations")
    assert found == []


def test_the_audit_catches_a_table_without_forced_row_security(db: psycopg.Connection) -> None:
    db.execute("alter table notify.templates no force row level security")
    db.execute("alter function notify_api.get_tenant_v1(text) owner to notify_owner")
    found = violations(db)
    assert "templates: row security not enabled and forced" in found
    assert "get_tenant_v1: owned by notify_owner, expected notify_system" in found


def url_of_db(db: psycopg.Connection) -> str:
    info = db.info
    return f"postgresql://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"


@pytest.fixture
def world(db: psycopg.Connection) -> dict[str, dict[str, Any]]:
    """Three tenants, each with the same shared refs (runner-1, event_reminder) and objects only it has."""
    tenants: dict[str, dict[str, Any]] = {}
    for name in ("north", "south", "east"):
        tid = str(call(db, "notify_api.create_tenant_v1(%s)", name)["id"])
        call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tid, Jsonb(REMINDER))
        call(db, "notify_api.upsert_template_v1(%s, %s, %s)", tid, f"only-{name}", Jsonb(REMINDER))
        call(
            db,
            "notify_api.record_consent_v1(%s, %s, %s)",
            tid,
            f"only-{name}",
            Jsonb({"channel": "whatsapp", "status": "granted", "source": "signup_form"}),
        )
        call(db, "notify_api.set_channel_policy_v1(%s, 'sms', 'opt_in')", tid)
        body = intent(
            recipient={"ref": f"only-{name}", "addresses": {"whatsapp": "+34600111222"}},
            channels=["whatsapp"],
            send_at="2099-01-01T00:00:00Z",
        )
        created, _ = submit(db, tid, body, f"key-{name}")
        key = keys.generate()
        key_info = call(db, "notify_api.create_api_key_v1(%s, 'tests', %s, %s)", tid, keys.display_prefix(key), keys.digest(key))
        tenants[name] = {
            "id": tid,
            "notification": created["id"],
            "delivery": created["deliveries"][0]["id"],
            "key": key,
            "key_id": key_info["id"],
            "ref": f"only-{name}",
        }
    return tenants


TENANT_TABLES = [
    "tenants",
    "api_clients",
    "channel_policies",
    "channel_providers",
    "whatsapp_windows",
    "recipients",
    "recipient_addresses",
    "recipient_consents",
    "templates",
    "notification_requests",
    "notification_deliveries",
    "delivery_attempts",
    "delivery_events",
    "mock_messages",
    "callback_endpoints",
    "callback_messages",
    "callback_attempts",
    "provider_grants",
]


def test_policies_filter_every_tenant_table_for_the_owning_role(db: psycopg.Connection, world: dict[str, dict[str, Any]]) -> None:
    north, south = world["north"]["id"], world["south"]["id"]
    column = {"tenants": "id"}
    seen = 0
    south_templates = db.execute("select count(*) from notify.templates where tenant_id = %s", (south,)).fetchone()[0]
    with db.transaction():
        db.execute("set local role notify_owner")
        for table in TENANT_TABLES:  # no tenant set: the policies fail closed
            assert db.execute(f"select count(*) from notify.{table}").fetchone()[0] == 0, table  # type: ignore[arg-type]
        db.execute("select set_config('notify.tenant_id', %s, true)", (north,))
        for table in TENANT_TABLES:
            col = column.get(table, "tenant_id")
            counts = db.execute(f"select count(*) filter (where {col} = %s), count(*) from notify.{table}", (north,)).fetchone()  # type: ignore[arg-type]
            assert counts[0] == counts[1], table  # only north's rows are visible
            seen += counts[1]
        assert db.execute("update notify.notification_requests set send_at = now() where tenant_id = %s", (south,)).rowcount == 0
        assert db.execute("delete from notify.templates where tenant_id = %s", (south,)).rowcount == 0
    assert seen > 10
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"), db.transaction():
        db.execute("set local role notify_owner")
        db.execute("select set_config('notify.tenant_id', %s, true)", (north,))
        db.execute("insert into notify.channel_policies (tenant_id, channel, policy) values (%s, 'email', 'opt_in')", (south,))
    with db.transaction():  # the cross-tenant role's policy admits every row
        db.execute("set local role notify_system")
        assert db.execute("select count(distinct tenant_id) from notify.notification_requests").fetchone()[0] == 3
    assert db.execute("select count(*) from notify.templates where tenant_id = %s", (south,)).fetchone()[0] == south_templates > 0


def expect_404(conn: psycopg.Connection, query: str, *params: Any) -> None:
    with pytest.raises(psycopg.Error) as err:
        with conn.transaction():
            conn.execute(f"select {query}", params)  # type: ignore[arg-type]
    assert err.value.sqlstate == "ND404", (query, err.value)


def test_direct_sql_as_the_application_role_sees_nothing_of_another_tenant(
    db: psycopg.Connection, world: dict[str, dict[str, Any]]
) -> None:
    north, south = world["north"], world["south"]
    checks = 0
    with psycopg.connect(app_url(url_of_db(db), "dispatcher_caller"), autocommit=True) as caller:
        assert caller.execute("select rolsuper or rolbypassrls from pg_roles where rolname = current_user").fetchone()[0] is False
        for table in TENANT_TABLES:  # no privilege on any table: row security is the second wall, not the first
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                caller.execute(f"select count(*) from notify.{table}")  # type: ignore[arg-type]
            checks += 1
        # With north's database setting (a session setting here; the API binds each transaction), south's objects are 404,
        # whichever tenant id is passed.
        caller.execute("select set_config('notify.tenant_id', %s, false)", (north["id"],))
        for tenant in (north["id"], south["id"]):
            expect_404(caller, "notify_api.get_notification_v1(%s, %s)", tenant, south["notification"])
            expect_404(caller, "notify_api.cancel_notification_v1(%s, %s)", tenant, south["notification"])
            expect_404(caller, "notify_api.get_recipient_v1(%s, %s)", tenant, south["ref"])
            expect_404(caller, "notify_api.list_consents_v1(%s, %s)", tenant, south["ref"])
            checks += 4
        expect_404(caller, "notify_api.list_templates_v1(%s)", south["id"])
        expect_404(caller, "notify_api.submit_notification_v1(%s, %s)", south["id"], Jsonb(intent()))
        expect_404(caller, "notify_api.upsert_recipient_v1(%s, 'x', '{}')", south["id"])
        checks += 3
        listed = call(caller, "notify_api.list_templates_v1(%s)", north["id"])
        assert {t["key"] for t in listed} == {"event_reminder", "only-north"}
        assert (
            call(caller, "notify_api.get_notification_v1(%s, %s)", north["id"], north["notification"])["id"]
            == north["notification"]
        )
        caller.execute("reset notify.tenant_id")
        # Per transaction: the first tenant a transaction enters is the only one it may touch; the next transaction is free.
        with pytest.raises(psycopg.Error) as err, caller.transaction():
            call(caller, "notify_api.get_notification_v1(%s, %s)", north["id"], north["notification"])
            call(caller, "notify_api.get_notification_v1(%s, %s)", south["id"], south["notification"])
        assert err.value.sqlstate == "ND404"
        checks += 1
        assert (
            call(caller, "notify_api.get_notification_v1(%s, %s)", south["id"], south["notification"])["id"]
            == south["notification"]
        )
    with psycopg.connect(app_url(url_of_db(db), "dispatcher_caller"), autocommit=True) as caller:
        # notify_caller has no key, worker or webhook functions at all.
        for query in ("notify_api.list_api_keys_v1(%s)", "notify_api.claim_deliveries_v1('whatsapp', 10)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                caller.execute(f"select {query}", (north["id"],) if "%s" in query else None)  # type: ignore[arg-type]
            checks += 1
    state = db.execute("select status from notify.notification_deliveries where id = %s", (south["delivery"],)).fetchone()[0]
    assert state == "scheduled"  # the cancel attempts did nothing
    print(f"\ndirect SQL as dispatcher_caller: 0 of {checks} cross-tenant reads/writes succeeded")


@pytest.fixture
def http(db: psycopg.Connection, db_url: str) -> Iterator[TestClient]:
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret="")
    with TestClient(app=create_app(settings)) as client:
        yield client


def test_cross_tenant_matrix_over_http_is_all_404(
    http: TestClient, db: psycopg.Connection, world: dict[str, dict[str, Any]]
) -> None:
    tried = succeeded = 0
    for name, me in world.items():
        auth = {"Authorization": f"Bearer {me['key']}"}
        for other_name, other in world.items():
            if other_name == name:
                continue
            for method, path in (
                ("GET", f"/internal/notifications/{other['notification']}"),
                ("POST", f"/internal/notifications/{other['notification']}/cancel"),
                ("GET", f"/internal/recipients/{other['ref']}"),
                ("GET", f"/internal/recipients/{other['ref']}/consents"),
            ):
                response = http.request(method, path, headers=auth)
                tried += 1
                if response.status_code != 404:
                    succeeded += 1
                assert response.status_code == 404 and response.headers["content-type"].startswith("application/problem+json"), (
                    method,
                    path,
                )
            for path in (
                "/internal/templates",
                f"/internal/templates?key=only-{other_name}",
                f"/internal/mock/messages?delivery_id={other['delivery']}",
            ):
                listed = http.get(path, headers=auth)
                tried += 1
                assert listed.status_code == 200
                if other_name in listed.text or other["delivery"] in listed.text:
                    succeeded += 1
        assert {t["key"] for t in http.get("/internal/templates", headers=auth).json()} == {"event_reminder", f"only-{name}"}
        policies = http.get("/internal/channels/policies", headers=auth).json()
        assert {p["channel"]: p["policy"] for p in policies}["sms"] == "opt_in"
    # A tenant writing under a shared ref touches only its own recipient.
    north = {"Authorization": f"Bearer {world['north']['key']}"}
    assert (
        http.put("/internal/recipients/only-south", json={"addresses": {"email": "x@example.com"}}, headers=north).status_code
        == 200
    )
    owners = db.execute(
        "select t.slug from notify.recipients r join notify.tenants t on t.id = r.tenant_id where r.ref = 'only-south' order by 1"
    ).fetchall()
    assert [o[0] for o in owners] == ["north", "south"]
    assert db.execute("select count(*) from notify.notification_deliveries where status = 'cancelled'").fetchone()[0] == 0
    assert http.get(f"/internal/notifications/{uuid.uuid4()}", headers=north).status_code == 404  # unknown looks the same
    print(f"\ncross-tenant matrix over HTTP (3 tenants): {succeeded} of {tried} cross-tenant reads/writes succeeded")
    assert succeeded == 0
