"""notify_api.set_channel_providers_v1: a channel's failover chain replaced at once, each entry with set_channel_provider_v1's
checks (notify._provider_entry), errors naming providers[i].<field>, nothing half-written; list_channel_providers_v1
shows the chain in order with each provider's health; set_channel_provider_v1 still sets the primary."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def relay(host: str, **settings: object) -> dict:
    return {"provider": "smtp", "settings": {"host": host, "from_address": "club@example.com", **settings}}


def twilio(number: str, sid_digit: str = "1") -> dict:
    return {
        "provider": "twilio",
        "settings": {"account_sid": "AC" + sid_digit * 32, "from_number": number},
        "secrets": {"auth_token": "env:TEST_TW_TOKEN"},
    }


def set_chain(db, tenant, channel, entries):
    return call(db, "notify_api.set_channel_providers_v1(%s, %s, %s)", tenant, channel, Jsonb(entries))


def chain_of(db, tenant, channel):
    return next(c for c in call(db, "notify_api.list_channel_providers_v1(%s)", tenant) if c["channel"] == channel)


@pytest.fixture
def granted(db, tenant):
    call(db, "notify_api.set_provider_grants_v1(%s, 'TEST_', null, false)", tenant)
    return tenant


def test_a_chain_is_stored_in_order_and_listed_with_its_health(db, granted):
    out = set_chain(db, granted, "email", [relay("smtp1.example.com"), relay("smtp2.example.com", port=2525)])
    assert out["provider"] == "smtp" and out["settings"]["host"] == "smtp1.example.com"  # the primary, as before
    assert [(c["position"], c["settings"]["host"]) for c in out["chain"]] == [(0, "smtp1.example.com"), (1, "smtp2.example.com")]
    assert out["chain"][1]["settings"]["port"] == 2525 and out["chain"][0]["settings"]["port"] == 587  # defaults merged
    assert all(
        c["health"]
        == {
            "demoted": False,
            "demoted_until": None,
            "errors": 0,
            "demotions": 0,
            "last_error_code": None,
            "last_error_at": None,
            "last_success_at": None,
        }
        for c in out["chain"]
    )
    assert chain_of(db, granted, "whatsapp")["chain"] == []  # the built-in mock: no chain


def test_set_channel_provider_v1_replaces_the_primary_and_keeps_the_fallbacks(db, granted):
    set_chain(db, granted, "email", [relay("smtp1.example.com"), relay("smtp2.example.com")])
    out = call(db, "notify_api.set_channel_provider_v1(%s, 'email', %s)", granted, Jsonb(relay("smtp0.example.com")))
    assert [c["settings"]["host"] for c in out["chain"]] == ["smtp0.example.com", "smtp2.example.com"]


@pytest.mark.parametrize(
    ("entries", "field", "status"),
    [
        ([relay("smtp1.example.com"), relay("smtp2.example.com", security="ssl3")], "providers[1].settings.security", "ND400"),
        (
            [relay("smtp1.example.com"), {"provider": "smtp", "settings": {"from_address": "a@example.com"}}],
            "providers[1].settings.host",
            "ND400",
        ),
        ([relay("smtp1.example.com"), relay("localhost")], "providers[1].settings.host", "ND422"),  # no private grant
        ([{"provider": "whatsapp_cloud"}], "providers[0].provider", "ND422"),
        ([relay("smtp1.example.com"), {**relay("smtp2.example.com"), "colour": "red"}], "providers[1].colour", "ND400"),
        (
            [relay("smtp1.example.com"), {**relay("smtp2.example.com"), "secrets": {"password": "hunter2"}}],
            "providers[1].secrets.password",
            "ND422",
        ),
        ([], "providers", "ND400"),
        ([relay(f"smtp{i}.example.com") for i in range(6)], "providers", "ND400"),
    ],
)
def test_a_bad_entry_is_refused_naming_it_and_nothing_is_written(db, granted, entries, field, status):
    before = set_chain(db, granted, "email", [relay("old.example.com")])
    with pytest.raises(psycopg.Error) as info:
        set_chain(db, granted, "email", entries)
    assert info.value.diag.column_name == field
    assert info.value.sqlstate == status
    assert chain_of(db, granted, "email")["chain"] == before["chain"]  # the old chain, untouched


def test_not_an_array_is_refused(db, granted):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_providers_v1(%s, 'email', %s)", granted, Jsonb(relay("smtp1.example.com")))
    assert info.value.diag.column_name == "providers"


def test_a_number_twice_or_another_tenants_is_refused_naming_the_entry(db, granted):
    with pytest.raises(psycopg.Error) as info:
        set_chain(db, granted, "sms", [twilio("+15005550006"), twilio("+15005550006", "2")])
    assert info.value.diag.column_name == "providers[1].settings.from_number" and info.value.sqlstate == "ND409"
    assert chain_of(db, granted, "sms")["chain"] == []
    other = call(db, "notify_api.create_tenant_v1('other', 'Other', 'en')")["id"]
    call(db, "notify_api.set_provider_grants_v1(%s, 'OTHER_', null, false)", other)
    call(
        db,
        "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
        other,
        Jsonb({**twilio("+15005550009"), "secrets": {"auth_token": "env:OTHER_TOKEN"}}),
    )
    with pytest.raises(psycopg.Error) as info:
        set_chain(db, granted, "sms", [twilio("+15005550006"), twilio("+15005550009", "2")])
    assert info.value.diag.column_name == "providers[1].settings.from_number"


def test_replacing_the_chain_starts_its_health_afresh(db, granted):
    set_chain(db, granted, "email", [relay("smtp1.example.com"), relay("smtp2.example.com")])
    call(
        db,
        "notify_api.record_provider_health_v1(%s, 1, 60, 600)",
        Jsonb([{"tenant_id": granted, "channel": "email", "position": 0, "failures": 1, "successes": 0, "error_code": "x"}]),
    )
    assert chain_of(db, granted, "email")["chain"][0]["health"]["demoted"] is True
    set_chain(db, granted, "email", [relay("smtp1.example.com"), relay("smtp3.example.com")])
    assert chain_of(db, granted, "email")["chain"][0]["health"]["demoted"] is False
    assert db.execute("select count(*) from notify.provider_health").fetchone()[0] == 0


def test_errors_within_the_window_demote_and_the_claim_tries_the_demoted_last(db, granted):
    set_chain(db, granted, "email", [relay("smtp1.example.com"), relay("smtp2.example.com"), relay("smtp3.example.com")])
    one = Jsonb([{"tenant_id": granted, "channel": "email", "position": 0, "failures": 1, "successes": 0, "error_code": "e"}])
    assert call(db, "notify_api.record_provider_health_v1(%s, 3, 60, 600)", one) == []
    assert call(db, "notify_api.record_provider_health_v1(%s, 3, 60, 600)", one) == []
    [demoted] = call(db, "notify_api.record_provider_health_v1(%s, 3, 60, 600)", one)
    assert (demoted["tenant_id"], demoted["channel"], demoted["position"]) == (granted, "email", 0)
    health = chain_of(db, granted, "email")["chain"][0]["health"]
    assert health["demoted"] and health["errors"] == 0 and health["demotions"] == 1
    # a position that is gone (the chain changed since the claim) is skipped, not an error
    gone = Jsonb([{"tenant_id": granted, "channel": "email", "position": 4, "failures": 1, "successes": 0}])
    assert call(db, "notify_api.record_provider_health_v1(%s, 1, 60, 600)", gone) == []
