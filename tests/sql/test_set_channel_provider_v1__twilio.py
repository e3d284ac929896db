"""notify_api.set_channel_provider_v1 for Twilio (sms): settings checked, secrets only as references inside the grant,
a number belongs to one tenant; notify_api.webhook_keys_v1 hands out the right tenant's key reference only."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call
from tests.sql.test_set_channel_provider_v1 import grant, set_provider

ACCOUNT = "AC" + "0123456789abcdef" * 2
TWILIO = {
    "provider": "twilio",
    "settings": {"account_sid": ACCOUNT, "from_number": "+15005550006"},
    "secrets": {"auth_token": "env:TEST_TW_TOKEN"},
}


def with_settings(**settings: object) -> dict:
    return {**TWILIO, "settings": {**TWILIO["settings"], **settings}}


def test_a_twilio_number_is_saved_with_its_defaults(db, tenant):
    out = set_provider(db, tenant, "sms", TWILIO)
    assert out["provider"] == "twilio" and out["secrets"] == {"auth_token": "env:TEST_TW_TOKEN"}
    assert out["settings"] == {
        "account_sid": ACCOUNT,
        "from_number": "+15005550006",
        "base_url": "https://api.twilio.com",
        "rate_per_second": 10,
        "timeout_seconds": 15,
        "opt_out_keywords": [],
        "opt_in_keywords": [],
    }


def test_an_api_key_and_a_messaging_service(db, tenant):
    body = {
        "provider": "twilio",
        "settings": {
            "account_sid": ACCOUNT,
            "api_key_sid": "SK" + "1" * 32,
            "messaging_service_sid": "MG" + "2" * 32,
            "validity_period": 3600,
            "opt_out_keywords": ["BAJA", "ARRÊT"],
        },
        "secrets": {"auth_token": "env:TEST_TW_TOKEN", "api_key_secret": "env:TEST_TW_KEY"},
    }
    assert set_provider(db, tenant, "sms", body)["settings"]["opt_out_keywords"] == ["BAJA", "ARRÊT"]


@pytest.mark.parametrize(
    ("channel", "body", "field"),
    [
        ("whatsapp", TWILIO, "provider"),  # twilio serves sms only
        ("sms", {**TWILIO, "provider": "whatsapp_cloud"}, "provider"),
        ("sms", {**TWILIO, "secrets": {"auth_token": "0123456789abcdef"}}, "secrets.auth_token"),  # a value, not a reference
        ("sms", {**TWILIO, "secrets": {}}, "secrets.auth_token"),
        ("sms", with_settings(account_sid="AC123"), "settings.account_sid"),
        ("sms", {**TWILIO, "settings": {"account_sid": ACCOUNT}}, "settings.from_number"),
        ("sms", with_settings(from_number="15005550006"), "settings.from_number"),
        ("sms", with_settings(messaging_service_sid="MGnothex"), "settings.messaging_service_sid"),
        ("sms", with_settings(api_key_sid="SK" + "1" * 32), "secrets.api_key_secret"),
        ("sms", with_settings(api_key_sid="SKshort"), "settings.api_key_sid"),
        ("sms", {**TWILIO, "secrets": {**TWILIO["secrets"], "api_key_secret": "env:TEST_K"}}, "settings.api_key_sid"),
        ("sms", with_settings(validity_period=0), "settings.validity_period"),
        ("sms", with_settings(validity_period=36001), "settings.validity_period"),
        ("sms", with_settings(rate_per_second=5000), "settings.rate_per_second"),
        ("sms", with_settings(opt_out_keywords="STOP"), "settings.opt_out_keywords"),
        ("sms", with_settings(opt_in_keywords=["two words"]), "settings.opt_in_keywords"),
        ("sms", with_settings(base_url="https://127.0.0.1"), "settings.base_url"),  # a private endpoint needs the grant
        ("sms", with_settings(colour="red"), "settings.colour"),
        ("sms", {**TWILIO, "secrets": {**TWILIO["secrets"], "password": "env:TEST_P"}}, "secrets.password"),
    ],
)
def test_bad_twilio_configurations_are_refused_naming_the_field(db, tenant, channel, body, field):
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, channel, body)
    assert info.value.diag.column_name == field
    assert db.execute("select count(*) from notify.channel_providers").fetchone()[0] == 0


def test_a_secret_outside_the_grant_is_refused(db, tenant):
    grant(db, tenant, env_prefix="ACME_")
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", tenant, Jsonb(TWILIO))
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("secret_not_allowed", "secrets.auth_token")


def test_the_table_refuses_twilio_on_another_channel(db, tenant):
    # notify.provider_kinds says which channel each provider serves; channel_providers references it
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute(
            "insert into notify.channel_providers (tenant_id, channel, provider) values (%s, 'email', 'twilio')", (tenant,)
        )


def test_a_twilio_number_belongs_to_one_tenant(db, tenant):
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    set_provider(db, tenant, "sms", TWILIO)
    grant(db, other, env_prefix="GLOBEX_")
    with pytest.raises(psycopg.Error) as info:
        call(
            db,
            "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
            other,
            Jsonb({**TWILIO, "secrets": {"auth_token": "env:GLOBEX_TW"}}),
        )
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (
        "ND409",
        "phone_number_taken",
        "settings.from_number",
    )
    set_provider(db, tenant, "sms", TWILIO)  # the same tenant saving its number again is fine


def test_webhook_keys_name_only_the_tenant_the_request_is_about(db, tenant):
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    set_provider(db, tenant, "sms", TWILIO)
    grant(db, other, env_prefix="GLOBEX_")
    call(
        db,
        "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
        other,
        Jsonb(
            {
                **TWILIO,
                "settings": {**TWILIO["settings"], "from_number": "+15005550007"},
                "secrets": {"auth_token": "env:GLOBEX_TW"},
            }
        ),
    )

    def keys(**hints: object) -> list:
        return call(db, "notify_api.webhook_keys_v1('twilio', %s)", Jsonb(hints))

    [by_number] = keys(account_sid=ACCOUNT, number="+15005550006")
    assert by_number == {
        "tenant_id": tenant,
        "settings": {"account_sid": ACCOUNT},
        "secrets": {"auth_token": "env:TEST_TW_TOKEN"},
        "grants": {"env_prefix": "TEST_", "file_dir": None},
    }
    assert [k["tenant_id"] for k in keys(account_sid=ACCOUNT, tenant_id=other, number="+15005550006")] == [other]
    assert keys(account_sid="AC" + "f" * 32, number="+15005550006") == []  # another account
    assert keys(account_sid=ACCOUNT, number="+15005550009") == []
    assert call(db, "notify_api.webhook_keys_v1('whatsapp_cloud', %s)", Jsonb({"account_sid": ACCOUNT})) == []


SERVICE = "MG" + "2" * 32


def test_a_messaging_service_belongs_to_one_tenant(db, tenant):
    """Inbound SMS to any number of a Messaging Service's pool are routed by the service: it is one tenant's, whether
    set alone or in a chain (and not twice in one chain)."""
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    set_provider(db, tenant, "sms", with_settings(messaging_service_sid=SERVICE))
    grant(db, other, env_prefix="GLOBEX_")
    theirs = {
        "provider": "twilio",
        "settings": {"account_sid": ACCOUNT, "messaging_service_sid": SERVICE},
        "secrets": {"auth_token": "env:GLOBEX_TW"},
    }
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", other, Jsonb(theirs))
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (
        "ND409",
        "phone_number_taken",
        "settings.messaging_service_sid",
    )
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_providers_v1(%s, 'sms', %s)", other, Jsonb([theirs]))
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (
        "ND409",
        "phone_number_taken",
        "providers[0].settings.messaging_service_sid",
    )
    assert "settings.messaging_service_sid" in info.value.diag.message_primary
    # Twice in the tenant's own chain (two numbers, one service) is refused too, naming the second entry.
    mine = [
        with_settings(messaging_service_sid=SERVICE),
        with_settings(from_number="+15005550008", messaging_service_sid=SERVICE),
    ]
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_providers_v1(%s, 'sms', %s)", tenant, Jsonb(mine))
    assert (info.value.sqlstate, info.value.diag.column_name) == ("ND409", "providers[1].settings.messaging_service_sid")
    set_provider(db, tenant, "sms", with_settings(messaging_service_sid=SERVICE))  # the same tenant again is fine


def test_webhook_keys_find_the_tenant_by_its_messaging_service(db, tenant):
    """An inbound message to a pool number (no tenant's from_number) names the Messaging Service: its tenant's key.
    A number that is a tenant's from_number decides alone (the service named beside it changes nothing)."""
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    set_provider(db, tenant, "sms", with_settings(messaging_service_sid=SERVICE))
    grant(db, other, env_prefix="GLOBEX_")
    call(
        db,
        "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
        other,
        Jsonb(
            {
                **TWILIO,
                "settings": {**TWILIO["settings"], "from_number": "+15005550007"},
                "secrets": {"auth_token": "env:GLOBEX_TW"},
            }
        ),
    )

    def keys(**hints: object) -> list:
        return [k["tenant_id"] for k in call(db, "notify_api.webhook_keys_v1('twilio', %s)", Jsonb(hints))]

    assert keys(account_sid=ACCOUNT, number="+15005550010", messaging_service_sid=SERVICE) == [tenant]
    assert keys(account_sid=ACCOUNT, number="+15005550007", messaging_service_sid=SERVICE) == [other]
    assert keys(account_sid="AC" + "f" * 32, number="+15005550010", messaging_service_sid=SERVICE) == []  # another account
    assert keys(account_sid=ACCOUNT, number="+15005550010", messaging_service_sid="MG" + "3" * 32) == []
    assert keys(account_sid=ACCOUNT, number="+15005550010") == []
