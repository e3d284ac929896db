"""Recipients, the consent ledger, templates and channel policies."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit


def consent(db, tenant, **body):
    return call(db, "notify_api.record_consent_v1(%s, 'runner-1', %s, 'tests')", tenant, Jsonb(body))


def allowed(db, tenant, channel, category=None) -> bool:
    return db.execute("select notify._consent_allows(%s, (select id from notify.recipients where ref = 'runner-1'), %s, %s)",
                      (tenant, channel, category)).fetchone()[0]


def test_upsert_recipient_sets_and_removes_addresses(db, tenant):
    r = call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', %s)", tenant,
             Jsonb({"addresses": {"whatsapp": "+34600111222", "email": "a@example.com"}, "locale": "es-ES", "timezone": "Europe/Madrid"}))
    assert r["addresses"] == {"whatsapp": "+34600111222", "email": "a@example.com"} and r["locale"] == "es-ES"
    r = call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', %s)", tenant, Jsonb({"addresses": {"email": None}}))
    assert r["addresses"] == {"whatsapp": "+34600111222"} and r["timezone"] == "Europe/Madrid"


def test_the_address_check_is_also_a_table_constraint(db, tenant):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', '{}')", tenant)
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute("insert into notify.recipient_addresses (tenant_id, recipient_id, channel, address) "
                   "select tenant_id, id, 'sms', '12345' from notify.recipients")


def test_get_recipient_of_another_tenant_is_not_found(db, tenant):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-1', '{}')", tenant)
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.get_recipient_v1(%s, 'runner-1')", other)
    assert info.value.sqlstate == "ND404"


def test_the_latest_ledger_entry_decides(db, tenant):
    consent(db, tenant, channel="whatsapp", status="granted", source="form", evidence={"form_id": "f1"})
    assert allowed(db, tenant, "whatsapp")
    consent(db, tenant, channel="whatsapp", status="revoked", source="reply_stop")
    assert not allowed(db, tenant, "whatsapp")
    consent(db, tenant, channel="whatsapp", status="granted", source="form")
    assert allowed(db, tenant, "whatsapp")


def test_a_category_revoke_only_stops_that_category(db, tenant):
    consent(db, tenant, channel="email", status="revoked", source="preferences", category="marketing")
    assert not allowed(db, tenant, "email", "marketing")
    assert allowed(db, tenant, "email", "reminders")
    assert allowed(db, tenant, "email")


def test_a_channel_wide_revoke_stops_every_category(db, tenant):
    consent(db, tenant, channel="email", status="granted", source="form", category="reminders")
    consent(db, tenant, channel="email", status="revoked", source="complaint")
    assert not allowed(db, tenant, "email", "reminders")


def test_the_ledger_is_listed_with_the_state_in_force(db, tenant):
    consent(db, tenant, channel="whatsapp", status="granted", source="form", evidence={"ip": "203.0.113.7"})
    out = call(db, "notify_api.list_consents_v1(%s, 'runner-1')", tenant)
    assert [(c["channel"], c["allowed"], c["policy"]) for c in out["current"]] == [
        ("whatsapp", True, "opt_in"), ("email", True, "opt_out"), ("sms", False, "opt_in")]
    assert out["history"][0]["evidence"] == {"ip": "203.0.113.7"} and out["history"][0]["recorded_by"] == "tests"


def test_the_state_in_force_shows_a_category_revoke_as_submit_decides_it(db, ready):
    """A category-level revoke shows as revoked for that category; the channel-wide state stays as it is, and
    both agree with what a submission of that category (and of none) actually gets."""
    def state(ref="runner-42"):
        out = call(db, "notify_api.list_consents_v1(%s, %s)", ready, ref)
        return {c["channel"]: (c["allowed"], {k["category"]: k["allowed"] for k in c["categories"]}) for c in out["current"]}

    call(db, "notify_api.record_consent_v1(%s, 'runner-42', %s)", ready,
         Jsonb({"channel": "email", "status": "revoked", "source": "preferences", "category": "marketing"}))
    assert state()["email"] == (True, {"marketing": False})
    assert state()["whatsapp"] == (True, {})  # the ready fixture's channel-wide grant, no category named
    marketing = submit(db, ready, intent(channels=["email"], category="marketing"), key="k-marketing")[0]
    reminders = submit(db, ready, intent(channels=["email"], category="reminders"), key="k-reminders")[0]
    assert [(d["status"], d.get("reason")) for d in marketing["deliveries"]] == [("suppressed", "no_consent")]
    assert [d["status"] for d in reminders["deliveries"]] == ["queued"]
    # a later channel-wide grant re-allows every category, as the check decides it (the latest applicable entry)
    call(db, "notify_api.record_consent_v1(%s, 'runner-42', %s)", ready,
         Jsonb({"channel": "email", "status": "granted", "source": "form"}))
    assert state()["email"] == (True, {"marketing": True})
    assert [d["status"] for d in submit(db, ready, intent(channels=["email"], category="marketing"), key="k-2")[0]["deliveries"]] == ["queued"]
    # and a channel-wide revoke stops the channel and every category named
    call(db, "notify_api.record_consent_v1(%s, 'runner-42', %s)", ready,
         Jsonb({"channel": "email", "status": "revoked", "source": "complaint"}))
    assert state()["email"] == (False, {"marketing": False})


@pytest.mark.parametrize(("body", "field"), [
    ({"channel": "fax", "status": "granted", "source": "x"}, "channel"),
    ({"channel": "email", "status": "maybe", "source": "x"}, "status"),
    ({"channel": "email", "status": "granted"}, "source"),
    ({"channel": "email", "status": "granted", "source": "x", "extra": 1}, "extra"),
])
def test_bad_consent_entries_are_refused(db, tenant, body, field):
    with pytest.raises(psycopg.Error) as info:
        consent(db, tenant, **body)
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == field
    assert db.execute("select count(*) from notify.recipient_consents").fetchone()[0] == 0


def test_templates_derive_their_variables_and_version_on_change(db, tenant):
    body = {"channels": {"email": {"subject": "Hi {{ name }}", "text": "{{event}} at {{time}}"},
                         "whatsapp": {"name": "reminder", "language": "es", "parameters": ["name", "club"]}}}
    out = call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert {t["channel"]: t["required_variables"] for t in out} == {"email": ["event", "name", "time"], "whatsapp": ["club", "name"]}
    assert {t["version"] for t in out} == {1}
    body["channels"]["email"]["text"] = "changed {{event}}"
    out = call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert {t["channel"]: t["version"] for t in out} == {"email": 2, "whatsapp": 1}


@pytest.mark.parametrize(("body", "field"), [
    ({}, "channels"),
    ({"channels": {"email": {"subject": "s"}}}, "channels.email.text"),
    ({"channels": {"email": {"subject": "s", "text": "t", "cc": "x"}}}, "channels.email.cc"),
    ({"channels": {"whatsapp": {"language": "es"}}}, "channels.whatsapp"),
    ({"channels": {"whatsapp": {"name": "n", "parameters": ["ok", "not ok"]}}}, "channels.whatsapp.parameters"),
    ({"channels": {"pigeon": {"text": "t"}}}, "channels.pigeon"),
    ({"locale": "??", "channels": {"sms": {"text": "t"}}}, "locale"),
])
def test_bad_templates_are_refused(db, tenant, body, field):
    with pytest.raises(psycopg.Error) as info:
        call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb(body))
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == field


def test_templates_are_listed_per_tenant(db, tenant):
    call(db, "notify_api.upsert_template_v1(%s, 'a', %s)", tenant, Jsonb({"channels": {"sms": {"text": "t"}}}))
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    assert [t["key"] for t in call(db, "notify_api.list_templates_v1(%s)", tenant)] == ["a"]
    assert call(db, "notify_api.list_templates_v1(%s)", other) == []


def test_channel_policies_list_defaults_and_changes(db, tenant):
    call(db, "notify_api.set_channel_policy_v1(%s, 'sms', 'opt_out')", tenant)
    policies = {p["channel"]: (p["policy"], p["default"]) for p in call(db, "notify_api.list_channel_policies_v1(%s)", tenant)}
    assert policies == {"whatsapp": ("opt_in", True), "email": ("opt_out", True), "sms": ("opt_out", False)}


def test_recipient_locale_from_the_intent_updates_the_stored_one(db, ready):
    submit(db, ready, intent(recipient={"ref": "runner-42", "locale": "pt-BR"}))
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["locale"] == "pt-BR"
