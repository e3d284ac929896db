"""notify_api.ingest_webhook_v1 for Twilio: inbound STOP (and Twilio's synonyms, and a tenant's own words) revoke SMS
consent, START restores what a STOP took, HELP is recorded; 21610 (sync or in a report) suppresses and revokes; statuses
apply by rank; record_attempts_v1 keeps what the message cost; upsert_template_v1 warns about UCS-2 and segments."""

from __future__ import annotations

import uuid

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, call, claim, intent, record, result, submit
from tests.sql.test_set_channel_provider_v1 import grant
from tests.sql.test_set_channel_provider_v1__twilio import TWILIO

NUMBER = "+15005550006"
PHONE = "+34600111222"
INGEST = (
    "select notify_api.ingest_webhook_v1('twilio', %s, '{}', "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r), "
    "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))"
)


@pytest.fixture
def sms(db, tenant) -> str:
    grant(db, tenant)
    call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", tenant, Jsonb(TWILIO))
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", tenant, Jsonb(REMINDER))
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", tenant, Jsonb({"addresses": {"sms": PHONE}}))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "sms", "status": "granted", "source": "form"}),
    )
    return tenant


def inbound(db, text: str, to: str = NUMBER, sender: str = PHONE, service: str | None = None) -> str:
    sid = f"SM{uuid.uuid4().hex}"
    row = {"phone_number_id": to, "sender": sender, "message_id": sid, "text": text, "received_at": "2026-12-01T10:00:00Z"}
    if service:
        row["messaging_service_sid"] = service
    out = db.execute(INGEST, (f"inbound:{sid}", Jsonb([]), Jsonb([row]))).fetchone()[0]
    [outcome] = out["outcomes"]
    return outcome["outcome"]


def allowed(db, tenant) -> bool:
    current = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", tenant)["current"]
    return next(c for c in current if c["channel"] == "sms")["allowed"]


@pytest.mark.parametrize("word", ["STOP", "stop", " Stop! ", "STOPALL", "unsubscribe", "Cancel", "END", "quit"])
def test_stop_and_its_synonyms_revoke_sms_consent_with_the_message_as_evidence(db, sms, word):
    assert inbound(db, word) == "opted_out"
    assert not allowed(db, sms)
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", sms)["history"][-1]
    assert (entry["channel"], entry["status"], entry["source"], entry["category"]) == ("sms", "revoked", "inbound_keyword", None)
    assert entry["evidence"]["message_id"].startswith("SM") and entry["evidence"]["text"] == word
    assert entry["evidence"]["to"] == NUMBER
    response, _ = submit(db, sms, intent(channels=["sms"], recipient={"ref": "runner-42", "addresses": {"sms": PHONE}}))
    assert response["deliveries"][0]["reason"] == "no_consent"


def test_start_restores_what_stop_took_and_only_that(db, sms):
    assert inbound(db, "START") == "opt_in_nothing_to_restore"  # consent was never revoked: nothing recorded
    history = len(call(db, "notify_api.list_consents_v1(%s, 'runner-42')", sms)["history"])
    assert inbound(db, "STOP") == "opted_out" and inbound(db, "STOP") == "opt_out_unknown_sender"  # once
    for word in ("unstop", "Yes"):
        assert inbound(db, word) == "opted_in"
        assert allowed(db, sms)
        assert inbound(db, "end") == "opted_out"
    assert len(call(db, "notify_api.list_consents_v1(%s, 'runner-42')", sms)["history"]) == history + 5


def test_start_grants_nothing_to_someone_who_never_opted_in(db, sms):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-7', %s)", sms, Jsonb({"addresses": {"sms": "+34600999888"}}))
    assert inbound(db, "START", sender="+34600999888") == "opt_in_nothing_to_restore"
    current = call(db, "notify_api.list_consents_v1(%s, 'runner-7')", sms)["current"]
    assert not next(c for c in current if c["channel"] == "sms")["allowed"]  # opt_in policy: still no consent


def test_help_is_recorded_and_changes_nothing(db, sms):
    assert inbound(db, "help") == "help_requested" and inbound(db, "INFO") == "help_requested"
    assert allowed(db, sms)
    assert db.execute("select outcomes from notify.webhook_events order by id desc limit 1").fetchone()[0][0]["outcome"] == (
        "help_requested"
    )


def test_the_tenants_own_keywords(db, sms):
    settings = {**TWILIO["settings"], "opt_out_keywords": ["baja"], "opt_in_keywords": ["alta"]}
    call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", sms, Jsonb({**TWILIO, "settings": settings}))
    assert inbound(db, "BAJA") == "opted_out" and inbound(db, "Alta") == "opted_in"


def test_ordinary_messages_other_numbers_and_senders_change_nothing(db, sms):
    assert inbound(db, "please stop by later") == "received"
    assert inbound(db, "STOP", to="+15005550009") == "unmatched"  # not a number any tenant has
    assert inbound(db, "STOP", sender="not-a-number") == "no_sender"
    assert inbound(db, "STOP", sender="+34600000001") == "opt_out_unknown_sender"  # no recipient has that address
    assert allowed(db, sms)


def test_a_stop_to_one_tenants_number_leaves_another_tenants_recipient_alone(db, sms):
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", other, Jsonb({"addresses": {"sms": PHONE}}))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        other,
        Jsonb({"channel": "sms", "status": "granted", "source": "form"}),
    )
    assert inbound(db, "STOP") == "opted_out"
    current = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", other)["current"]
    assert next(c for c in current if c["channel"] == "sms")["allowed"]


def sent_delivery(db, tenant) -> tuple:
    submit(db, tenant, intent(channels=["sms"], recipient={"ref": "runner-42", "addresses": {"sms": PHONE}}))
    [row] = claim(db, "sms")
    assert row[11] == "twilio"  # the claim hands the worker the tenant's provider
    return row


def test_a_send_refused_with_21610_suppresses_and_revokes_sms_consent(db, sms):
    row = sent_delivery(db, sms)
    [(_, status, applied)] = record(
        db, result(row, "suppressed", provider="twilio", error_code="twilio_21610", error_message="unsubscribed recipient")
    )
    assert (status, applied) == ("suppressed", True)
    assert not allowed(db, sms)
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", sms)["history"][-1]
    assert (entry["source"], entry["evidence"]["error_code"], entry["evidence"]["delivery_id"]) == (
        "provider_opt_out",
        "twilio_21610",
        str(row[1]),
    )


def test_reports_apply_by_rank_and_21610_in_a_report_revokes(db, sms):
    row = sent_delivery(db, sms)
    pricing = {"encoding": "UCS-2", "segments": 2, "units": 90}
    record(db, result(row, "sent", provider="twilio", provider_message_id="SM1", pricing=pricing))

    def report(status, code=None):
        event = {"tenant_id": str(row[0]), "delivery_id": str(row[1]), "provider_message_id": "SM1", "status": status}
        if code:
            event.update(error_code=code, error_message="x")
        out = db.execute(INGEST, (f"SM1:{status}:{code}", Jsonb([event]), Jsonb([]))).fetchone()[0]
        return out["outcomes"][0]["outcome"]

    assert report("sending") == "stale"  # Twilio's queued, after we recorded sent
    assert report("delivered") == "applied"
    assert report("failed", "twilio_30003") == "stale"  # SMS: delivered beats a racing failed
    assert report("sent") == "stale"
    status = db.execute("select status, last_error_code, pricing from notify.notification_deliveries").fetchone()
    assert status == ("delivered", None, pricing)


def test_a_21610_report_is_suppressed_and_revokes(db, sms):
    row = sent_delivery(db, sms)
    record(db, result(row, "sent", provider="twilio", provider_message_id="SM2"))
    event = {"tenant_id": str(row[0]), "delivery_id": str(row[1]), "provider_message_id": "SM2", "status": "suppressed"}
    event.update(error_code="twilio_21610", error_message="Attempt to send to unsubscribed recipient")
    assert (
        db.execute(INGEST, ("SM2:failed:21610", Jsonb([event]), Jsonb([]))).fetchone()[0]["outcomes"][0]["outcome"] == "applied"
    )
    assert db.execute("select status from notify.notification_deliveries").fetchone()[0] == "suppressed"
    assert not allowed(db, sms)


def test_what_an_sms_cost_is_kept_and_shown(db, sms):
    row = sent_delivery(db, sms)
    pricing = {"encoding": "GSM-7", "segments": 1, "units": 20, "twilio_segments": 1}
    record(db, result(row, "sent", provider="twilio", provider_message_id="SM3", pricing=pricing))
    request_id = db.execute("select request_id from notify.notification_deliveries").fetchone()[0]
    [delivery] = call(db, "notify_api.get_notification_v1(%s, %s)", sms, request_id)["deliveries"]
    assert delivery["pricing"] == pricing


def test_an_sms_template_that_needs_ucs2_or_segments_is_saved_with_warnings(db, tenant):
    def save(text: str) -> dict:
        [t] = call(db, "notify_api.upsert_template_v1(%s, 'k', %s)", tenant, Jsonb({"channels": {"sms": {"text": text}}}))
        return t

    plain = save("Hi {{ name }}: see you at {{event}}.")
    assert plain["warnings"] == [] and plain["sms"] == {"encoding": "GSM-7", "segments": 1, "units": len("Hi : see you at .")}
    emoji = save("Hola {{name}} 🏃")
    assert [w["code"] for w in emoji["warnings"]] == ["sms_ucs2"] and emoji["sms"]["encoding"] == "UCS-2"
    long = save("{% if vip %}VIP {% endif %}" + "x" * 150 + "{{ name }}€€€€€€")  # 150 + 12 septets: two segments
    assert [w["code"] for w in long["warnings"]] == ["sms_segments"] and long["sms"]["segments"] == 2
    assert "2 segments" in long["warnings"][0]["message"]
    both = save("ñ" * 10 + "中" * 71)
    assert [w["code"] for w in both["warnings"]] == ["sms_ucs2", "sms_segments"]
    [wa] = call(db, "notify_api.upsert_template_v1(%s, 'w', %s)", tenant, Jsonb({"channels": {"whatsapp": {"text": "中"}}}))
    assert "warnings" not in wa


def test_erasure_reaches_an_ordinary_inbound_sms_and_only_the_tenants_own(db, sms):
    """An inbound SMS that is no keyword cites no consent entry; its stored payload (Twilio's form: From, To, Body)
    still holds the recipient's phone and words, so erasure wipes it, as it does for WhatsApp, by the tenant's number.
    Another tenant's message from the same phone to its own number stays."""
    ingest = (
        "select notify_api.ingest_webhook_v1('twilio', %s, %s, '{}',"
        " array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))"
    )

    def receive(to: str, body: str) -> None:
        sid = f"SM{uuid.uuid4().hex}"
        row = {"phone_number_id": to, "sender": PHONE, "message_id": sid, "text": body, "received_at": "2026-12-01T10:00:00Z"}
        form = {"MessageSid": sid, "From": PHONE, "To": to, "Body": body}
        db.execute(ingest, (f"inbound:{sid}", Jsonb(form), Jsonb([row])))

    receive(NUMBER, "running late, save me a spot")
    receive("+15005550009", "a message to another club")  # no tenant has this number: unmatched, not ours
    call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', 'test')", sms)
    payloads = [r[0] for r in db.execute("select payload from notify.webhook_events where provider = 'twilio' order by id")]
    assert payloads[0] == {"erased": True}
    assert payloads[1]["Body"] == "a message to another club"


SERVICE = "MG" + "2" * 32
POOL = "+15005550010"  # a number of the tenant's Messaging Service pool, not its from_number


@pytest.fixture
def pooled(db, sms) -> str:
    """The tenant sends through a Messaging Service too: replies come to any number of its pool."""
    body = {**TWILIO, "settings": {**TWILIO["settings"], "messaging_service_sid": SERVICE}}
    call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", sms, Jsonb(body))
    return sms


def test_a_stop_to_a_number_of_the_tenants_messaging_service_revokes_with_evidence(db, pooled):
    """A STOP to a pool number names the tenant's Messaging Service: the tenant's. A message to a tenant's from_number
    is that tenant's whatever service it names (another tenant's number with our service touches only that tenant)."""
    other = str(call(db, "notify_api.create_tenant_v1('globex', 'Globex', 'en')")["id"])
    grant(db, other, env_prefix="GLOBEX_")
    theirs = {
        **TWILIO,
        "settings": {**TWILIO["settings"], "from_number": "+15005550007"},
        "secrets": {"auth_token": "env:GLOBEX_TW"},
    }
    call(db, "notify_api.set_channel_provider_v1(%s, 'sms', %s)", other, Jsonb(theirs))
    assert inbound(db, "STOP", to="+15005550007", service=SERVICE) == "opt_out_unknown_sender"
    assert allowed(db, pooled)
    assert inbound(db, "STOP", to=POOL, service=SERVICE) == "opted_out"
    assert not allowed(db, pooled)
    entry = call(db, "notify_api.list_consents_v1(%s, 'runner-42')", pooled)["history"][-1]
    assert (entry["status"], entry["source"]) == ("revoked", "inbound_keyword")
    assert (entry["evidence"]["to"], entry["evidence"]["messaging_service_sid"]) == (POOL, SERVICE)
    assert inbound(db, "start", to=POOL, service=SERVICE) == "opted_in"
    assert allowed(db, pooled)
    assert inbound(db, "HELP", to=POOL, service=SERVICE) == "help_requested"
    # Another service, or a pool number without the service: no tenant.
    assert inbound(db, "STOP", to=POOL, service="MG" + "3" * 32) == "unmatched"
    assert inbound(db, "STOP", to=POOL) == "unmatched"
    assert allowed(db, pooled)


def test_erasure_reaches_an_inbound_sms_to_a_number_of_the_tenants_messaging_service(db, pooled):
    ingest = (
        "select notify_api.ingest_webhook_v1('twilio', %s, %s, '{}',"
        " array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))"
    )

    def receive(service: str, body: str) -> None:
        sid = f"SM{uuid.uuid4().hex}"
        row = {"phone_number_id": POOL, "sender": PHONE, "message_id": sid, "text": body, "messaging_service_sid": service}
        form = {"MessageSid": sid, "From": PHONE, "To": POOL, "Body": body, "MessagingServiceSid": service}
        db.execute(ingest, (f"inbound:{sid}", Jsonb(form), Jsonb([row])))

    receive(SERVICE, "running late, save me a spot")
    receive("MG" + "3" * 32, "a message to another club's service")  # not the tenant's service: not ours
    call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', 'test')", pooled)
    payloads = [r[0] for r in db.execute("select payload from notify.webhook_events where provider = 'twilio' order by id")]
    assert payloads[0] == {"erased": True}
    assert payloads[1]["Body"] == "a message to another club's service"
