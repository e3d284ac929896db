"""notify_api.set_channel_provider_v1 / list_channel_providers_v1, the claim's provider, the 24-hour window,
inbound opt-out keywords and one-click unsubscribe."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call

WA = {
    "provider": "whatsapp_cloud",
    "settings": {"phone_number_id": "106540352242922", "rate_per_second": 20},
    "secrets": {"access_token": "env:TEST_WA_TOKEN"},
}
INGEST = (
    "select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, '{}', array[]::notify.status_event[], "
    "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))"
)


def grant(db, tenant, env_prefix="TEST_", file_dir=None, private=False):
    return call(db, "notify_api.set_provider_grants_v1(%s, %s, %s, %s)", tenant, env_prefix, file_dir, private)


def set_provider(db, tenant, channel, body, granted=True):
    if granted:
        grant(db, tenant)
    return call(db, "notify_api.set_channel_provider_v1(%s, %s, %s)", tenant, channel, Jsonb(body))


@pytest.mark.parametrize(
    ("channel", "body", "field"),
    [
        ("email", WA, "provider"),
        ("whatsapp", {**WA, "secrets": {"access_token": "EAAG-a-real-token"}}, "secrets.access_token"),
        ("whatsapp", {**WA, "secrets": {}}, "secrets.access_token"),
        ("whatsapp", {**WA, "settings": {"phone_number_id": "+34 600"}}, "settings.phone_number_id"),
        ("whatsapp", {**WA, "settings": {**WA["settings"], "colour": "red"}}, "settings.colour"),
        (
            "email",
            {"provider": "smtp", "settings": {"host": "smtp.example.com", "from_address": "nope"}},
            "settings.from_address",
        ),
        ("email", {"provider": "smtp", "settings": {"from_address": "a@example.com"}}, "settings.host"),
        (
            "email",
            {"provider": "smtp", "settings": {"host": "smtp.example.com", "from_address": "a@example.com", "security": "ssl3"}},
            "settings.security",
        ),
        ("email", {"provider": "sendmail"}, "provider"),
    ],
)
def test_bad_configurations_are_refused_naming_the_field(db, tenant, channel, body, field):
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, channel, body)
    assert info.value.diag.column_name == field
    assert db.execute("select count(*) from notify.channel_providers").fetchone()[0] == 0


def test_the_table_itself_refuses_a_secret_value(db, tenant):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "insert into notify.channel_providers (tenant_id, channel, provider, secrets) values (%s, 'whatsapp', 'mock', %s)",
            (tenant, Jsonb({"token": "EAAG123"})),
        )


@pytest.mark.parametrize(
    "base_url",
    [
        "http://graph.facebook.com",
        "https://127.0.0.1:8443",
        "https://10.1.2.3",
        "https://[::1]",
        "https://[fd00::1]/x",
        "https://169.254.169.254",
        "https://localhost",
        "https://api.localhost",
        "https://graph",
        "https://printer.local",
        "https://2130706433",
        "https://127.1",
        "https://0x7f.1",
        "https://[::ffff:127.0.0.1]",
    ],
)
def test_a_private_whatsapp_endpoint_is_refused_without_the_grant(db, tenant, base_url):
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "base_url": base_url}})
    assert (info.value.diag.constraint_name, info.value.diag.column_name) in (
        ("unsafe_endpoint", "settings.base_url"),
        ("invalid_format", "settings.base_url"),
    )


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "mailpit", "10.0.0.5", "relay.internal", "::1", "[::1]", "192.168.1.1"]
)
def test_a_private_smtp_host_is_refused_without_the_grant(db, tenant, host):
    body = {"provider": "smtp", "settings": {"host": host, "from_address": "a@example.com"}}
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, "email", body)
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("unsafe_endpoint", "settings.host")
    call(db, "notify_api.set_provider_grants_v1(%s, null, null, true)", tenant)
    assert call(db, "notify_api.set_channel_provider_v1(%s, 'email', %s)", tenant, Jsonb(body))["settings"]["host"] == host


def test_public_endpoints_need_no_grant(db, tenant):
    out = set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "base_url": "https://graph.facebook.com/"}})
    assert out["settings"]["base_url"] == "https://graph.facebook.com/"
    out = set_provider(
        db, tenant, "email", {"provider": "smtp", "settings": {"host": "smtp.sendgrid.net", "from_address": "a@example.com"}}
    )
    assert out["settings"]["host"] == "smtp.sendgrid.net"
    assert call(db, "notify._host_public('8.8.8.8')") is True and call(db, "notify._host_public('[2606:4700::1111]')") is True


def test_a_business_number_belongs_to_one_tenant(db, tenant):
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    set_provider(db, tenant, "whatsapp", WA)
    set_provider(
        db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "rate_per_second": 10}}
    )  # its own number again: fine
    call(db, "notify_api.set_provider_grants_v1(%s, 'OTHER_', null, false)", other)
    with pytest.raises(psycopg.Error) as info:
        call(
            db,
            "notify_api.set_channel_provider_v1(%s, 'whatsapp', %s)",
            other,
            Jsonb({**WA, "secrets": {"access_token": "env:OTHER_TOKEN"}}),
        )
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (
        "ND409",
        "phone_number_taken",
        "settings.phone_number_id",
    )
