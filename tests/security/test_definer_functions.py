"""Attacks on the security definer functions through objects a login plants in its temporary schema.

Postgres looks up relation and type names in the session's temporary schema first unless the path lists pg_temp (even
with search_path = ''). A login that pre-creates a temporary table a definer function creates "if not exists", a
temporary domain named like a built-in type, or a temporary table named like one of procrastinate's, gets its own
code run as the function's owner. Each attack plants its trap as the attacker's own login, calls what that login may
call, and checks the harm: no code of the attacker ran as an owner (it reports through NOTICE, which survives a
rollback), no API key appeared for another tenant, nothing of another tenant was read.

Each trap is tried twice: as the deployment has it (no TEMPORARY for application roles: planting fails) and with
TEMPORARY granted back to the attacker, which shows that the functions themselves no longer run planted code.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from dispatcher import keys
from tests.conftest import app_url, call, intent

MARK = "planted code ran"
PLANTED_HASH = keys.digest("nd_planted_key_of_the_attacker")


def payload(victim: str) -> str:
    """The attacker's code, run as whoever fires it: reads the victim's addresses and key hashes, mints a key for it."""
    return f"""
    declare
        v_me text := pg_catalog.current_setting('notify.tenant_id', true);
        v_loot text;
    begin
        if pg_catalog.current_setting('attack.busy', true) = 'on' then
            return;
        end if;
        perform pg_catalog.set_config('attack.busy', 'on', true);
        perform pg_catalog.set_config('notify.tenant_id', '{victim}', true);
        select pg_catalog.string_agg(a.address, ',') into v_loot from notify.recipient_addresses a;
        raise notice '{MARK} as %: addresses %', current_user, v_loot;
        select pg_catalog.string_agg(pg_catalog.encode(c.key_hash, 'hex'), ',') into v_loot from notify.api_clients c;
        raise notice '{MARK} as %: key hashes %', current_user, v_loot;
        perform pg_catalog.set_config('notify.tenant_id', '', true);
        perform notify_api.create_api_key_v1('{victim}'::uuid, 'planted', 'nd_plant', '\\x{PLANTED_HASH.hex()}'::bytea);
        perform pg_catalog.set_config('notify.tenant_id', v_me, true);
        perform pg_catalog.set_config('attack.busy', 'off', true);
    exception when others then
        raise notice '{MARK} as % but failed: %', current_user, sqlerrm;
    end
    """


def plant_trigger_trap(conn: psycopg.Connection, table: str, columns: str, victim: str) -> None:
    """A temporary table named like one the functions use, open to everyone, with a trigger running the payload."""
    conn.execute(f"""create function pg_temp.attack() returns void language plpgsql as $body$ {payload(victim)} $body$""")  # type: ignore[arg-type]
    conn.execute("""create function pg_temp.attack_trigger() returns trigger language plpgsql as $body$
                    begin perform pg_temp.attack(); return null; end $body$""")
    conn.execute(sql.SQL("create temporary table {} ({})").format(sql.Identifier(table), sql.SQL(columns)))
    conn.execute(sql.SQL("grant all on table pg_temp.{} to public").format(sql.Identifier(table)))
    for event in ("insert", "update", "delete", "truncate"):
        conn.execute(
            sql.SQL(
                "create trigger {} after {} on pg_temp.{} for each statement execute function pg_temp.attack_trigger()"
            ).format(sql.Identifier(f"attack_{event}"), sql.SQL(event), sql.Identifier(table))
        )


def plant_domain_trap(conn: psycopg.Connection, type_name: str, victim: str) -> None:
    """A temporary domain named like a built-in type whose check runs the payload."""
    conn.execute(f"""create function pg_temp.attack() returns void language plpgsql as $body$ {payload(victim)} $body$""")  # type: ignore[arg-type]
    conn.execute(
        sql.SQL("""create function pg_temp.attack_check(v pg_catalog.{}) returns pg_catalog.bool language plpgsql as $body$
                            begin perform pg_temp.attack(); return true; end $body$""").format(sql.Identifier(type_name))
    )
    conn.execute(
        sql.SQL("create domain pg_temp.{} as pg_catalog.{} check (pg_temp.attack_check(value))").format(
            sql.Identifier(type_name), sql.Identifier(type_name)
        )
    )


@pytest.fixture
def victim(db: psycopg.Connection) -> str:
    """Another tenant with a recipient whose address the attacker wants."""
    victim_id = str(call(db, "notify_api.create_tenant_v1('victim', 'Victim Club', 'en')")["id"])
    call(
        db,
        "notify_api.upsert_recipient_v1(%s, 'secret-member', %s)",
        victim_id,
        Jsonb({"addresses": {"email": "hidden@victim.example", "whatsapp": "+34699999999"}}),
    )
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'victim key', %s, %s)", victim_id, keys.display_prefix(key), keys.digest(key))
    return victim_id


class Attacker:
    """One session of the attacker's login, collecting every NOTICE it receives."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self.notices: list[str] = []
        self.conn.add_notice_handler(lambda d: self.notices.append(d.message_primary or ""))
        self.planted = False

    def plant(self, trap) -> None:  # noqa: ANN001
        """Plants the trap in one transaction; records whether the database let it."""
        try:
            with self.conn.transaction():
                trap(self.conn)
            self.planted = True
        except psycopg.errors.InsufficientPrivilege:
            self.planted = False

    def ran(self) -> list[str]:
        return [n for n in self.notices if MARK in n]


@pytest.fixture
def attacker_factory(db_url: str) -> Iterator:
    opened: list[Attacker] = []

    def make(role: str = "dispatcher_caller") -> Attacker:
        a = Attacker(app_url(db_url, role))
        opened.append(a)
        return a

    yield make
    for a in opened:
        a.conn.close()


def grant_temporary(db: psycopg.Connection, role: str) -> None:
    """Undoes the deployment-level defence for one login, to test the functions' own."""
    db.execute(sql.SQL("grant temporary on database {} to {}").format(sql.Identifier(db.info.dbname), sql.Identifier(role)))


def assert_no_harm(db: psycopg.Connection, attacker: Attacker, victim: str) -> None:
    assert attacker.ran() == [], attacker.ran()
    assert db.execute("select count(*) from notify.api_clients where key_hash = %s", (PLANTED_HASH,)).fetchone()[0] == 0
    assert db.execute("select count(*) from notify.api_clients where tenant_id = %s", (victim,)).fetchone()[0] == 1


def fanout_body() -> dict:
    body = intent(
        recipients=[{"ref": f"member-{i}", "addresses": {"email": f"m{i}@example.com"}} for i in range(3)], channels=["email"]
    )
    del body["recipient"]
    return body


def submit_as(attacker: Attacker, tenant: str, body: dict) -> None:
    """The attacker's ordinary call; an error (the function refusing a planted object) is no harm in itself."""
    try:
        with attacker.conn.transaction():
            attacker.conn.execute(
                "select * from notify_api.submit_notification_v1(%s, %s, null)", (tenant, Jsonb(body))
            ).fetchall()
    except psycopg.errors.DuplicateTable:
        pass


FANOUT_INPUT = (
    "i integer, ref text, addresses jsonb, locale text, timezone text, variables jsonb, recipient_id uuid, effective_locale text"
)
FANOUT_TEMPLATES = "channel notify.channel, locale text, template_locale text, required_variables text[]"


# (a) The fan-out's temporary tables, as the trusted direct-SQL caller.


@pytest.mark.parametrize("with_temporary", [False, True], ids=["as-deployed", "temporary-granted-back"])
@pytest.mark.parametrize(("table", "columns"), [("_fanout_input", FANOUT_INPUT), ("_fanout_templates", FANOUT_TEMPLATES)])
def test_a_planted_fanout_table_runs_nothing_as_the_owner(db, ready, victim, attacker_factory, table, columns, with_temporary):
    if with_temporary:
        grant_temporary(db, "dispatcher_caller")
    attacker = attacker_factory("dispatcher_caller")
    attacker.plant(lambda c: plant_trigger_trap(c, table, columns, victim))
    submit_as(attacker, ready, fanout_body())
    assert_no_harm(db, attacker, victim)
    assert attacker.planted == with_temporary  # as deployed, the login cannot plant anything


def test_a_fanout_still_works_twice_in_one_transaction_for_a_caller_without_temporary(db, ready, attacker_factory):
    attacker = attacker_factory("dispatcher_caller")
    with attacker.conn.transaction():
        for key in ("first", "second", "third"):
            attacker.conn.execute(
                "select * from notify_api.submit_notification_v1(%s, %s, %s)", (ready, Jsonb(fanout_body()), key)
            )
        items = [{"idempotency_key": f"batch-{i}", "notification": fanout_body()} for i in range(3)]
        result = attacker.conn.execute("select notify_api.submit_notifications_v1(%s, %s)", (ready, Jsonb(items))).fetchone()[0]
    assert result["accepted"] == 3, result
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 6


# (b) The callback results table. record_callback_attempts_v1 is the worker's (notify_service, not notify_caller), so
# the attacker here is the API/worker login: as notify_system it could read every tenant's key hashes.


@pytest.mark.parametrize("with_temporary", [False, True], ids=["as-deployed", "temporary-granted-back"])
def test_b_a_planted_callback_results_table_runs_nothing_as_the_system_role(db, ready, victim, attacker_factory, with_temporary):
    if with_temporary:
        grant_temporary(db, "dispatcher_app")
    attacker = attacker_factory("dispatcher_app")
    attacker.plant(
        lambda c: plant_trigger_trap(
            c,
            "_callback_results",
            "tenant_id uuid, id uuid, attempt integer, started_at timestamptz, status_code integer, error text, outcome text",
            victim,
        )
    )
    try:
        with attacker.conn.transaction():
            attacker.conn.execute("select notify_api.record_callback_attempts_v1('[]'::pg_catalog.jsonb)")
    except psycopg.errors.DuplicateTable:
        pass
    assert_no_harm(db, attacker, victim)
    assert attacker.planted == with_temporary  # as deployed, the login cannot plant anything


# (c) Through names resolved at run time: a temporary domain shadowing a built-in type (every definer function), and a
# temporary table shadowing one of procrastinate's on the wake-up path (procrastinate's triggers name their tables
# unqualified, and notify._wake_task put public but not pg_temp on its path).


@pytest.mark.parametrize("with_temporary", [False, True], ids=["as-deployed", "temporary-granted-back"])
@pytest.mark.parametrize("type_name", ["jsonb", "text", "timestamptz"])
def test_c_a_temporary_domain_named_like_a_builtin_type_runs_nothing(
    db, ready, victim, attacker_factory, type_name, with_temporary
):
    if with_temporary:
        grant_temporary(db, "dispatcher_caller")
    attacker = attacker_factory("dispatcher_caller")
    attacker.plant(lambda c: plant_domain_trap(c, type_name, victim))
    submit_as(
        attacker, ready, intent(send_at="2999-01-01T00:00:00Z")
    )  # a future send_at also takes _wake_task's timestamptz branch
    submit_as(attacker, ready, fanout_body())
    assert_no_harm(db, attacker, victim)
    assert attacker.planted == with_temporary  # as deployed, the login cannot plant anything


@pytest.mark.parametrize("with_temporary", [False, True], ids=["as-deployed", "temporary-granted-back"])
def test_c_a_temporary_procrastinate_table_runs_nothing_on_the_wake_up_path(db, ready, victim, attacker_factory, with_temporary):
    # procrastinate_events, not procrastinate_jobs: _wake_task names public.procrastinate_jobs, and the triggers on it
    # insert into an unqualified procrastinate_events (a planted procrastinate_jobs was tried too: nothing reaches it).
    if with_temporary:
        grant_temporary(db, "dispatcher_caller")
    attacker = attacker_factory("dispatcher_caller")
    attacker.plant(
        lambda c: plant_trigger_trap(
            c, "procrastinate_events", "job_id bigint, type public.procrastinate_job_event_type, at timestamptz", victim
        )
    )
    submit_as(attacker, ready, intent())  # wakes the worker: inserts a procrastinate job, whose triggers insert an event
    submit_as(attacker, ready, intent(send_at="2999-01-01T00:00:00Z"))
    assert_no_harm(db, attacker, victim)
    assert attacker.planted == with_temporary  # as deployed, the login cannot plant anything
    assert db.execute("select count(*) from public.procrastinate_jobs").fetchone()[0] >= 1
    assert db.execute("select count(*) from public.procrastinate_events").fetchone()[0] >= 1
