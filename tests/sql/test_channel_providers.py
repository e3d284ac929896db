"""notify_api.set_channel_provider_v1 / list_channel_providers_v1, the claim's provider, the 24-hour window,
inbound opt-out keywords and one-click unsubscribe."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, submit

WA = {"provider": "whatsapp_cloud", "settings": {"phone_number_id": "106540352242922", "rate_per_second": 20},
      "secrets": {"access_token": "env:TEST_WA_TOKEN"}}
INGEST = ("select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, '{}', array[]::notify.status_event[], "
          "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))")


def grant(db, tenant, env_prefix="TEST_", file_dir=None, private=False):
    return call(db, "notify_api.set_provider_grants_v1(%s, %s, %s, %s)", tenant, env_prefix, file_dir, private)


def set_provider(db, tenant, channel, body, granted=True):
    if granted:
        grant(db, tenant)
    return call(db, "notify_api.set_channel_provider_v1(%s, %s, %s)", tenant, channel, Jsonb(body))


def test_settings_merge_over_defaults_and_secret_references_are_shown(db, tenant):
    out = set_provider(db, tenant, "whatsapp", WA)
    assert out["provider"] == "whatsapp_cloud" and out["settings"]["rate_per_second"] == 20
    assert out["settings"]["api_version"] == "v22.0" and "STOP" in out["settings"]["opt_out_keywords"]
    assert out["secrets"] == {"access_token": "env:TEST_WA_TOKEN"}   # the variable's name, never its value
    listed = {p["channel"]: p for p in call(db, "notify_api.list_channel_providers_v1(%s)", tenant)}
    assert listed["email"]["provider"] == "mock" and listed["email"]["default"] is True


@pytest.mark.parametrize(("channel", "body", "field"), [
    ("email", WA, "provider"),
    ("whatsapp", {**WA, "secrets": {"access_token": "EAAG-a-real-token"}}, "secrets.access_token"),
    ("whatsapp", {**WA, "secrets": {}}, "secrets.access_token"),
    ("whatsapp", {**WA, "settings": {"phone_number_id": "+34 600"}}, "settings.phone_number_id"),
    ("whatsapp", {**WA, "settings": {**WA["settings"], "colour": "red"}}, "settings.colour"),
    ("email", {"provider": "smtp", "settings": {"host": "smtp.example.com", "from_address": "nope"}}, "settings.from_address"),
    ("email", {"provider": "smtp", "settings": {"from_address": "a@example.com"}}, "settings.host"),
    ("email", {"provider": "smtp", "settings": {"host": "smtp.example.com", "from_address": "a@example.com", "security": "ssl3"}},
     "settings.security"),
    ("email", {"provider": "sendmail"}, "provider"),
])
def test_bad_configurations_are_refused_naming_the_field(db, tenant, channel, body, field):
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, channel, body)
    assert info.value.diag.column_name == field
    assert db.execute("select count(*) from notify.channel_providers").fetchone()[0] == 0


def test_the_table_itself_refuses_a_secret_value(db, tenant):
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into notify.channel_providers (tenant_id, channel, provider, secrets) values (%s, 'whatsapp', 'mock', %s)",
                   (tenant, Jsonb({"token": "EAAG123"})))


def test_the_claim_carries_the_tenants_provider(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    submit(db, ready, intent())
    wa, email = claim(db, "whatsapp")[0], claim(db, "email")[0]
    assert wa[11] == "whatsapp_cloud" and wa[12]["settings"]["phone_number_id"] == "106540352242922"
    assert wa[12]["secrets"] == {"access_token": "env:TEST_WA_TOKEN"}
    assert wa[12]["grants"] == {"env_prefix": "TEST_", "file_dir": None, "private_endpoints": False}
    assert email[11] == "mock" and email[12] is None


def test_free_form_text_outside_the_window_is_refused_and_an_inbound_message_opens_it(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_template_v1(%s, 'chat', %s)", ready, Jsonb({"channels": {"whatsapp": {"text": "Hi {{name}}"}}}))
    first, _ = submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert claim(db, "whatsapp") == []
    assert db.execute("select status::text, reason from notify.notification_deliveries").fetchone() == ("failed", "outside_customer_service_window")
    db.execute(INGEST, ("in-1", Jsonb([{"phone_number_id": "106540352242922", "sender": "34600111222", "message_id": "wamid.in1",
                                         "text": "hola", "received_at": "2026-11-26T10:00:00Z"}])))
    db.execute("update notify.whatsapp_windows set last_inbound_at = now()")
    submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert len(claim(db, "whatsapp")) == 1
    db.execute("update notify.whatsapp_windows set last_inbound_at = now() - interval '25 hours'")
    submit(db, ready, intent(template="chat", channels=["whatsapp"]))
    assert claim(db, "whatsapp") == []


def test_template_messages_need_no_window(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    submit(db, ready, intent(channels=["whatsapp"]))
    assert len(claim(db, "whatsapp")) == 1


def test_an_opt_out_keyword_revokes_whatsapp_consent_with_the_message_as_evidence(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"addresses": {"whatsapp": "+34600111222"}}))
    out = db.execute(INGEST, ("in-2", Jsonb([{"phone_number_id": "106540352242922", "sender": "34600111222", "message_id": "wamid.stop",
                                               "text": " baja ", "received_at": "2026-11-26T10:00:00Z"}]))).fetchone()[0]
    assert out["outcomes"] == [{"inbound": "wamid.stop", "outcome": "opted_out"}]
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"][-1]
    assert (entry["status"], entry["source"], entry["evidence"]["text"], entry["evidence"]["message_id"]) == (
        "revoked", "inbound_keyword", " baja ", "wamid.stop")
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    assert response["deliveries"][0]["reason"] == "no_consent"


def test_an_ordinary_inbound_message_changes_no_consent(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    out = db.execute(INGEST, ("in-3", Jsonb([{"phone_number_id": "106540352242922", "sender": "34600111222", "message_id": "m",
                                               "text": "stop by later?", "received_at": None}]))).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "window_opened"
    assert len(call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"]) == 1


def test_unsubscribe_revokes_the_category_once(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"], category="newsletter"))
    delivery = response["deliveries"][0]["id"]
    assert call(db, "notify_api.unsubscribe_v1(%s, %s)", ready, delivery)["unsubscribed"] is True
    call(db, "notify_api.unsubscribe_v1(%s, %s)", ready, delivery)
    history = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", ready)["history"]
    revokes = [h for h in history if h["source"] == "list_unsubscribe"]
    assert len(revokes) == 1 and revokes[0]["category"] == "newsletter"
    again, _ = submit(db, ready, intent(channels=["email"], category="newsletter"))
    other, _ = submit(db, ready, intent(channels=["email"], category="reminders"))
    assert again["deliveries"][0]["status"] == "suppressed" and other["deliveries"][0]["status"] == "queued"


def test_an_opt_out_keyword_from_an_unknown_sender_revokes_nothing(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    out = db.execute(INGEST, ("in-4", Jsonb([{"phone_number_id": "106540352242922", "sender": "34999999999", "message_id": "m",
                                               "text": "STOP", "received_at": None}]))).fetchone()[0]
    assert out["outcomes"][0]["outcome"] == "opt_out_unknown_sender"


def test_the_operator_grant_decides_which_secrets_a_tenant_may_name(db, tenant):
    body = {**WA, "secrets": {"access_token": "env:TEST_WA_TOKEN"}}
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, "whatsapp", body, granted=False)   # no grant: no secrets at all
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("secret_not_allowed", "secrets.access_token")
    grant(db, tenant, "NOTIFY_TENANT_ACME_", "/run/secrets/acme/")
    for ref in ("env:TEST_WA_TOKEN", "env:NOTIFY_TENANT_ACME_", "env:DATABASE_URL", "file:/etc/passwd", "file:/run/secrets/acme/../x",
                "file:/run/secrets/acme/./x", "file:/run/secrets/acme//x", "file:/run/secrets/acmex/t", "file:/run/secrets/acme/"):
        with pytest.raises(psycopg.Error) as info:
            set_provider(db, tenant, "whatsapp", {**WA, "secrets": {"access_token": ref}}, granted=False)
        assert info.value.diag.constraint_name == "secret_not_allowed", ref
    for ref in ("env:NOTIFY_TENANT_ACME_WA_TOKEN", "file:/run/secrets/acme/wa/token"):
        assert set_provider(db, tenant, "whatsapp", {**WA, "secrets": {"access_token": ref}}, granted=False)["secrets"] == {"access_token": ref}


@pytest.mark.parametrize(("env_prefix", "file_dir", "field"), [
    ("DATABASE_", None, "env_prefix"), ("DISPATCHER_", None, "env_prefix"), ("PGPASS", None, "env_prefix"), ("A_", None, "env_prefix"),
    ("NO_UNDERSCORE", None, "env_prefix"), (None, "/run/secrets/acme", "file_dir"), (None, "/run/secrets/../", "file_dir"),
    (None, "relative/", "file_dir"),
])
def test_a_bad_namespace_is_refused(db, tenant, env_prefix, file_dir, field):
    with pytest.raises(psycopg.Error) as info:
        grant(db, tenant, env_prefix, file_dir)
    assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("invalid_secret_namespace", field)


def test_namespaces_of_two_tenants_may_not_overlap(db, tenant):
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    grant(db, tenant, "NT_ACME_", "/run/secrets/acme/")
    for env_prefix, file_dir, field in (("NT_ACME_X_", None, "env_prefix"), ("NT_", None, "env_prefix"),
                                        (None, "/run/secrets/acme/x/", "file_dir"), (None, "/run/secrets/", "file_dir")):
        with pytest.raises(psycopg.Error) as info:
            grant(db, other, env_prefix, file_dir)
        assert (info.value.diag.constraint_name, info.value.diag.column_name) == ("secret_namespace_overlaps", field)
    assert grant(db, other, "NT_OTHER_", "/run/secrets/other/")["env_prefix"] == "NT_OTHER_"


@pytest.mark.parametrize("base_url", [
    "http://graph.facebook.com", "https://127.0.0.1:8443", "https://10.1.2.3", "https://[::1]", "https://[fd00::1]/x",
    "https://169.254.169.254", "https://localhost", "https://api.localhost", "https://graph", "https://printer.local",
    "https://2130706433", "https://127.1", "https://0x7f.1", "https://[::ffff:127.0.0.1]",
])
def test_a_private_whatsapp_endpoint_is_refused_without_the_grant(db, tenant, base_url):
    with pytest.raises(psycopg.Error) as info:
        set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "base_url": base_url}})
    assert (info.value.diag.constraint_name, info.value.diag.column_name) in (
        ("unsafe_endpoint", "settings.base_url"), ("invalid_format", "settings.base_url"))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "mailpit", "10.0.0.5", "relay.internal", "::1", "[::1]", "192.168.1.1"])
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
    out = set_provider(db, tenant, "email", {"provider": "smtp", "settings": {"host": "smtp.sendgrid.net", "from_address": "a@example.com"}})
    assert out["settings"]["host"] == "smtp.sendgrid.net"
    assert call(db, "notify._host_public('8.8.8.8')") is True and call(db, "notify._host_public('[2606:4700::1111]')") is True


def test_a_business_number_belongs_to_one_tenant(db, tenant):
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    set_provider(db, tenant, "whatsapp", WA)
    set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "rate_per_second": 10}})  # its own number again: fine
    call(db, "notify_api.set_provider_grants_v1(%s, 'OTHER_', null, false)", other)
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.set_channel_provider_v1(%s, 'whatsapp', %s)", other,
             Jsonb({**WA, "secrets": {"access_token": "env:OTHER_TOKEN"}}))
    assert (info.value.sqlstate, info.value.diag.constraint_name, info.value.diag.column_name) == (
        "ND409", "phone_number_taken", "settings.phone_number_id")
