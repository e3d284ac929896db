"""notify_api.set_channel_provider_v1 / list_channel_providers_v1, the claim's provider, the 24-hour window,
inbound opt-out keywords and one-click unsubscribe."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit
from tests.sql.test_claim_and_record import claim

WA = {"provider": "whatsapp_cloud", "settings": {"phone_number_id": "106540352242922", "rate_per_second": 20},
      "secrets": {"access_token": "env:WA_TOKEN"}}
INGEST = ("select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, '{}', array[]::notify.status_event[], "
          "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))")


def set_provider(db, tenant, channel, body):
    return call(db, "notify_api.set_channel_provider_v1(%s, %s, %s)", tenant, channel, Jsonb(body))


def test_settings_merge_over_defaults_and_secrets_are_masked(db, tenant):
    out = set_provider(db, tenant, "whatsapp", WA)
    assert out["provider"] == "whatsapp_cloud" and out["settings"]["rate_per_second"] == 20
    assert out["settings"]["api_version"] == "v22.0" and "STOP" in out["settings"]["opt_out_keywords"]
    assert out["secrets"] == {"access_token": "env:***"}
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
    ("email", {"provider": "smtp", "settings": {"host": "h", "from_address": "a@example.com", "security": "ssl3"}}, "settings.security"),
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
    assert wa[12]["secrets"] == {"access_token": "env:WA_TOKEN"}
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
