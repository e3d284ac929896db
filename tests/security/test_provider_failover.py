"""Attacks on provider failover chains and their health by another tenant: its own admin API key over HTTP (the real
API, in process), and the database logins a deployment has (notify_caller, a login bound to the attacker's tenant).
It must neither read the victim's chain or health (hosts, secret references, demotions) nor change them, nor take the
victim's number into its own chain; the cross-tenant health functions are the worker's and the operator's only."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.conftest import app_url, call

VICTIM_NUMBER = "+15005550006"
VICTIM_CHAIN = [
    {"provider": "smtp", "settings": {"host": "relay-a.victim.example", "from_address": "club@victim.example"}},
    {
        "provider": "smtp",
        "settings": {"host": "relay-b.victim.example", "from_address": "club@victim.example"},
        "secrets": {"password": "env:VICTIM_SMTP_PASSWORD"},
    },
]


@pytest.fixture
def victim(db: psycopg.Connection) -> str:
    victim_id = str(call(db, "notify_api.create_tenant_v1('victim', 'Victim Club', 'en')")["id"])
    call(db, "notify_api.set_provider_grants_v1(%s, 'VICTIM_', null, false)", victim_id)
    call(db, "notify_api.set_channel_providers_v1(%s, 'email', %s)", victim_id, Jsonb(VICTIM_CHAIN))
    sms = {
        "provider": "twilio",
        "settings": {"account_sid": "AC" + "1" * 32, "from_number": VICTIM_NUMBER},
        "secrets": {"auth_token": "env:VICTIM_TW_TOKEN"},
    }
    call(db, "notify_api.set_channel_providers_v1(%s, 'sms', %s)", victim_id, Jsonb([sms]))
    call(
        db,
        "notify_api.record_provider_health_v1(%s, 1, 60, 3600)",
        Jsonb(
            [{"tenant_id": victim_id, "channel": "email", "position": 0, "failures": 1, "successes": 0, "error_code": "smtp_535"}]
        ),
    )
    return victim_id


@pytest.fixture
def attacker(db: psycopg.Connection) -> str:
    attacker_id = str(call(db, "notify_api.create_tenant_v1('attacker', 'Attacker', 'en')")["id"])
    call(db, "notify_api.set_provider_grants_v1(%s, 'ATTACKER_', null, false)", attacker_id)
    return attacker_id


@pytest.fixture
def client(db: psycopg.Connection, db_url: str, victim: str, attacker: str) -> Iterator[TestClient]:
    """The attacker's own admin API key."""
    key = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'attacker', %s, %s)", attacker, keys.display_prefix(key), keys.digest(key))
    with TestClient(app=create_app(Settings(database_url=app_url(db_url), public_url="https://notify.example.com/"))) as c:
        c.headers["Authorization"] = f"Bearer {key}"
        yield c


def victim_chain(db: psycopg.Connection, victim: str, channel: str = "email") -> list[dict]:
    return next(c for c in call(db, "notify_api.list_channel_providers_v1(%s)", victim) if c["channel"] == channel)["chain"]


def test_another_tenants_chain_and_health_are_never_shown(client, db, victim):
    for path in ("/internal/channels/providers", "/internal/channels/email/providers", "/internal/channels/sms/providers"):
        response = client.get(path)
        assert response.status_code == 200, response.text
        text = response.text
        assert "victim" not in text and "VICTIM_" not in text and VICTIM_NUMBER not in text and "smtp_535" not in text
    own = client.get("/internal/channels/email/providers").json()
    assert own["default"] is True and own["chain"] == []


def test_another_tenants_chain_cannot_be_replaced_or_taken_over(client, db, victim, attacker):
    before = victim_chain(db, victim)
    call(db, "notify_api.set_provider_grants_v1(%s, 'ATTACKER_', null, true)", attacker)  # its own relay on this machine
    mine = [{"provider": "smtp", "settings": {"host": "127.0.0.1", "from_address": "x@attacker.example"}}]
    response = client.put("/internal/channels/email/providers", json={"providers": mine})
    assert response.status_code == 200, response.text
    assert [c["settings"]["host"] for c in response.json()["chain"]] == ["127.0.0.1"]
    assert victim_chain(db, victim) == before  # the victim's chain and its demotion, untouched
    assert before[0]["health"]["demoted"] is True
    # A tenant id smuggled into the body is refused as an unknown field, never used.
    smuggled = client.put("/internal/channels/email/providers", json={"providers": mine, "tenant_id": victim})
    assert smuggled.status_code == 400
    # The victim's Twilio number in the attacker's chain (its inbound SMS would be routed by it) is refused.
    steal = [
        {
            "provider": "twilio",
            "settings": {"account_sid": "AC" + "2" * 32, "from_number": "+15005550009"},
            "secrets": {"auth_token": "env:ATTACKER_TOKEN"},
        },
        {
            "provider": "twilio",
            "settings": {"account_sid": "AC" + "3" * 32, "from_number": VICTIM_NUMBER},
            "secrets": {"auth_token": "env:ATTACKER_TOKEN"},
        },
    ]
    taken = client.put("/internal/channels/sms/providers", json={"providers": steal})
    assert taken.status_code == 409, taken.text
    assert taken.json()["field"] == "providers[1].settings.from_number"
    assert [c["settings"]["from_number"] for c in victim_chain(db, victim, "sms")] == [VICTIM_NUMBER]
    assert client.get("/internal/channels/sms/providers").json()["chain"] == []  # nothing half-written


def test_a_bad_entry_is_a_problem_naming_it(client):
    bad = [{"provider": "mock"}, {"provider": "smtp", "settings": {"from_address": "x@attacker.example"}}]
    response = client.put("/internal/channels/email/providers", json={"providers": bad})
    assert response.status_code == 400 and response.json()["field"] == "providers[1].settings.host"
    private = [{"provider": "smtp", "settings": {"host": "127.0.0.1", "from_address": "x@attacker.example"}}]
    refused = client.put("/internal/channels/email/providers", json={"providers": private})
    assert refused.status_code == 422 and refused.json()["field"] == "providers[0].settings.host"


def test_a_database_login_bound_to_the_attacker_cannot_reach_the_victims_chain(db, db_url, victim, attacker):
    call(db, "notify.bind_login_v1('dispatcher_caller', 'attacker')")
    call(db, "notify.bind_login_v1('dispatcher_app', 'attacker')")
    for role in ("dispatcher_app", "dispatcher_caller"):
        with psycopg.connect(app_url(db_url, role), autocommit=True) as conn:
            for query, args in (
                ("select notify_api.list_channel_providers_v1(%s)", (victim,)),
                ("select notify_api.set_channel_providers_v1(%s, 'email', %s)", (victim, Jsonb(VICTIM_CHAIN[:1]))),
                ("select notify_api.set_channel_provider_v1(%s, 'email', %s)", (victim, Jsonb(VICTIM_CHAIN[0]))),
            ):
                with pytest.raises(psycopg.Error) as info:
                    conn.execute(query, args)
                assert info.value.sqlstate in ("ND403", "42501"), (role, query, info.value)
    assert [c["settings"]["host"] for c in victim_chain(db, victim)] == ["relay-a.victim.example", "relay-b.victim.example"]


def test_the_trusted_sql_caller_cannot_read_or_write_every_tenants_health(db, db_url, victim):
    with psycopg.connect(app_url(db_url, "dispatcher_caller"), autocommit=True) as conn:
        for query, args in (
            ("select * from notify_api.provider_health_v1()", ()),
            (
                "select notify_api.record_provider_health_v1(%s, 1, 60, 60)",
                (Jsonb([{"tenant_id": victim, "channel": "email", "position": 1, "failures": 9, "successes": 0}]),),
            ),
            ("select * from notify.provider_health", ()),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(query, args)
    with psycopg.connect(app_url(db_url), autocommit=True) as conn:  # the API and worker role: functions only, no table
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from notify.provider_health")
    assert [c["health"]["demoted"] for c in victim_chain(db, victim)] == [True, False]


@pytest.mark.parametrize("timeout", [1e9, 0, -1, "30", 86400])
def test_a_provider_that_never_answers_cannot_hold_the_workers_slots_for_ever(client, db, attacker, timeout):
    """The attacker's own relay (or an https base_url on its own server) accepts the connection and never answers; with
    timeout_seconds of a billion, each of its deliveries holds one of the worker's max_in_flight slots for ever (its
    lease expires, maintenance requeues the e-mail, the next claim takes another slot), until the worker sends nothing
    for any tenant. A provider's timeout is bounded where it is stored, for one provider and for every entry of a chain."""
    call(db, "notify_api.set_provider_grants_v1(%s, 'ATTACKER_', null, true)", attacker)  # its own servers, on this machine
    entry = {"provider": "smtp", "settings": {"host": "127.0.0.1", "from_address": "x@attacker.example"}}
    slow = {**entry, "settings": {**entry["settings"], "timeout_seconds": timeout}}
    one = client.put("/internal/channels/email/provider", json=slow)
    assert one.status_code == 400, one.text
    assert one.json()["field"] == "settings.timeout_seconds"
    chain = client.put("/internal/channels/email/providers", json={"providers": [entry, slow]})
    assert chain.status_code == 400, chain.text
    assert chain.json()["field"] == "providers[1].settings.timeout_seconds"
    graph = {
        "provider": "whatsapp_cloud",
        "settings": {"phone_number_id": "999999999999999", "base_url": "http://127.0.0.1:9", "timeout_seconds": timeout},
        "secrets": {"access_token": "env:ATTACKER_WA"},
    }
    assert client.put("/internal/channels/whatsapp/provider", json=graph).status_code == 400
    assert client.get("/internal/channels/email/providers").json()["chain"] == []  # nothing written
    # A bounded timeout is still the tenant's to choose.
    fine = {**entry, "settings": {**entry["settings"], "timeout_seconds": 5}}
    assert client.put("/internal/channels/email/providers", json={"providers": [entry, fine]}).status_code == 200
