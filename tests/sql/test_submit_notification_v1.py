"""notify_api.submit_notification_v1: one test per behaviour, negative cases included."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, intent, submit


def raises(db: psycopg.Connection, tenant: str, body: dict, key: str | None = None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as info:
        submit(db, tenant, body, key)
    return info.value


def test_accepts_one_delivery_per_channel_in_order(db, ready):
    response, replayed = submit(db, ready, intent(channels=["email", "whatsapp"]))
    assert not replayed and response["status"] == "accepted"
    assert [d["channel"] for d in response["deliveries"]] == ["email", "whatsapp"]
    assert all(d["status"] == "queued" for d in response["deliveries"])
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 2


def test_same_key_same_body_replays_the_original_response(db, ready):
    first, _ = submit(db, ready, intent(), "key-1")
    again, replayed = submit(db, ready, intent(), "key-1")
    assert replayed and again == first
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 1
    assert db.execute("select count(*) from notify.notification_deliveries").fetchone()[0] == 2


def test_a_replay_leaves_the_recipient_as_it_is_now(db, ready):
    """The same key and body again replays; it must not write the original body's addresses over a later change."""
    submit(db, ready, intent(), "key-1")
    call(
        db,
        "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"addresses": {"email": "new@example.com", "whatsapp": "+34600999888"}, "locale": "es"}),
    )
    _, replayed = submit(db, ready, intent(), "key-1")
    assert replayed
    now = call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)
    assert now["addresses"]["email"] == "new@example.com" and now["locale"] == "es"
    fanout = intent(recipients=[{"ref": "runner-43", "addresses": {"email": "a@example.com"}}], channels=["email"])
    fanout.pop("recipient")
    submit(db, ready, fanout, "key-2")
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-43', %s)", ready, Jsonb({"addresses": {"email": "b@example.com"}}))
    assert submit(db, ready, fanout, "key-2")[1]
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-43')", ready)["addresses"]["email"] == "b@example.com"


def test_same_key_different_body_is_refused_with_422(db, ready):
    submit(db, ready, intent(), "key-1")
    err = raises(db, ready, intent(variables={"name": "Bob", "event": "Long run"}), "key-1")
    assert err.sqlstate == "ND422" and err.diag.constraint_name == "idempotency_key_reused"
    assert err.diag.column_name == "Idempotency-Key"


def test_keys_are_scoped_per_tenant(db, ready):
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        other,
        Jsonb({"channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    submit(db, ready, intent(), "shared-key")
    response, replayed = submit(db, other, intent(channels=["email"], variables={}), "shared-key")
    assert not replayed and response["status"] == "accepted"


def test_without_a_key_every_submission_is_new(db, ready):
    submit(db, ready, intent())
    submit(db, ready, intent())
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 2


@pytest.mark.parametrize(
    ("body_change", "field", "code"),
    [
        ({"bogus": 1}, "bogus", "unknown_field"),
        ({"recipient": None}, "recipient", "missing_field"),
        ({"recipient": {"ref": "r", "nickname": "x"}}, "recipient.nickname", "unknown_field"),
        ({"recipient": {"ref": ""}}, "recipient.ref", "invalid_length"),
        ({"channels": []}, "channels", "missing_field"),
        ({"channels": ["pigeon"]}, "channels[0]", "invalid_channel"),
        ({"channels": ["email", "email"]}, "channels", "duplicate_channel"),
        ({"template": 5}, "template", "invalid_type"),
        ({"variables": [1]}, "variables", "invalid_type"),
        ({"send_at": "tomorrow"}, "send_at", "invalid_format"),
        ({"send_at": "2026-01-01T09:00:00"}, "send_at", "invalid_format"),
        ({"metadata": "x"}, "metadata", "invalid_type"),
        ({"recipient": {"ref": "r", "addresses": {"whatsapp": "600111222"}}}, "recipient.addresses.whatsapp", "invalid_address"),
        ({"recipient": {"ref": "r", "addresses": {"email": "ana@"}}}, "recipient.addresses.email", "invalid_address"),
        ({"recipient": {"ref": "r", "addresses": {"fax": "1"}}}, "recipient.addresses.fax", "unknown_field"),
        ({"recipient": {"ref": "r", "timezone": "Mars/Olympus"}}, "recipient.timezone", "invalid_timezone"),
        ({"recipient": {"ref": "r", "locale": "spanish!"}}, "recipient.locale", "invalid_format"),
        # the edges of the usual body's one-predicate check (notify._parse_submission): each is refused as before
        ({"channels": [["email"]]}, "channels[0]", "invalid_channel"),
        ({"channels": "email"}, "channels", "missing_field"),
        ({"recipient": [{"ref": "r"}]}, "recipient", "missing_field"),
        ({"template": ["event_reminder"]}, "template", "invalid_type"),
        ({"template": "t" * 101}, "template", "invalid_length"),
        ({"category": ["a"]}, "category", "invalid_type"),
        ({"category": "c" * 101}, "category", "invalid_length"),
        ({"variables": "x"}, "variables", "invalid_type"),
        ({"metadata": [{}]}, "metadata", "invalid_type"),
    ],
)
def test_bad_input_names_the_field_and_writes_nothing(db, ready, body_change, field, code):
    err = raises(db, ready, intent(**body_change))
    assert err.sqlstate == "ND400"
    assert (err.diag.column_name, err.diag.constraint_name) == (field, code)
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_a_malformed_idempotency_key_is_refused(db, ready):
    err = raises(db, ready, intent(), "has space")
    assert err.sqlstate == "ND400" and err.diag.column_name == "Idempotency-Key"


def test_expiry_must_be_in_the_future_and_after_send_at(db, ready):
    err = raises(db, ready, intent(expires_at="2020-01-01T00:00:00Z"))
    assert err.sqlstate == "ND422" and err.diag.column_name == "expires_at"
    err = raises(db, ready, intent(send_at="2099-01-02T00:00:00Z", expires_at="2099-01-01T00:00:00Z"))
    assert err.sqlstate == "ND422" and err.diag.column_name == "expires_at"


def test_a_missing_template_is_refused_at_submit_time(db, ready):
    err = raises(db, ready, intent(template="no_such_template"))
    assert err.sqlstate == "ND422" and err.diag.constraint_name == "template_not_found"
    assert db.execute("select count(*) from notify.notification_requests").fetchone()[0] == 0


def test_a_template_without_content_for_a_channel_is_refused(db, ready):
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'email_only', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    err = raises(db, ready, intent(template="email_only"))
    assert err.diag.constraint_name == "template_not_found" and "whatsapp" in err.diag.message_primary


def test_missing_variables_are_refused_naming_the_first(db, ready):
    err = raises(db, ready, intent(variables={"name": "Ana"}))
    assert err.sqlstate == "ND422" and err.diag.constraint_name == "missing_variables"
    assert err.diag.column_name == "variables.event"
    assert db.execute("select count(*) from notify.recipients").fetchone()[0] == 1  # only the consent fixture's


def test_locale_falls_back_from_region_to_language_to_tenant_default(db, ready):
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        ready,
        Jsonb({"locale": "es", "channels": {"email": {"subject": "Recordatorio {{event}}", "text": "Hola {{name}}"}}}),
    )
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        ready,
        Jsonb({"locale": "es-MX", "channels": {"email": {"subject": "Recordatorio MX {{event}}", "text": "Hola {{name}}"}}}),
    )

    def locale_for(ref: str, locale: str) -> str:
        response, _ = submit(
            db,
            ready,
            intent(channels=["email"], recipient={"ref": ref, "addresses": {"email": "a@example.com"}, "locale": locale}),
        )
        return db.execute(
            "select template_locale from notify.notification_deliveries where id = %s", (response["deliveries"][0]["id"],)
        ).fetchone()[0]

    assert locale_for("r1", "es-MX") == "es-MX"
    assert locale_for("r2", "es-ES") == "es"
    assert locale_for("r3", "fr-FR") == "en"


def test_whatsapp_without_consent_is_suppressed_with_a_reason(db, ready):
    response, _ = submit(
        db, ready, intent(recipient={"ref": "new-runner", "addresses": {"whatsapp": "+34600999888", "email": "b@example.com"}})
    )
    by_channel = {d["channel"]: d for d in response["deliveries"]}
    assert by_channel["whatsapp"]["status"] == "suppressed" and by_channel["whatsapp"]["reason"] == "no_consent"
    assert by_channel["email"]["status"] == "queued" and "reason" not in by_channel["email"]


def test_email_is_opt_out_by_default_and_a_revoke_suppresses_it(db, ready):
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "unsubscribe_link"}),
    )
    response, _ = submit(db, ready, intent(channels=["email"]))
    assert response["status"] == "suppressed"
    assert response["deliveries"][0] == {**response["deliveries"][0], "status": "suppressed", "reason": "no_consent"}


def test_a_tenant_can_make_email_opt_in_and_whatsapp_opt_out(db, ready):
    call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_in')", ready)
    call(db, "notify_api.set_channel_policy_v1(%s, 'whatsapp', 'opt_out')", ready)
    response, _ = submit(
        db, ready, intent(recipient={"ref": "fresh", "addresses": {"whatsapp": "+34600999888", "email": "b@example.com"}})
    )
    assert {d["channel"]: d["status"] for d in response["deliveries"]} == {"whatsapp": "queued", "email": "suppressed"}


def test_a_channel_without_address_is_suppressed_not_dropped(db, ready):
    response, _ = submit(db, ready, intent(recipient={"ref": "runner-42", "addresses": {"whatsapp": None}}))
    wa = next(d for d in response["deliveries"] if d["channel"] == "whatsapp")
    assert (wa["status"], wa["reason"]) == ("suppressed", "no_address")


def test_send_at_in_the_future_schedules_and_defers_a_wakeup_for_then(db, ready):
    response, _ = submit(db, ready, intent(send_at="2099-01-01T09:00:00.4Z"))
    assert {d["status"] for d in response["deliveries"]} == {"scheduled"}
    jobs = db.execute("select queueing_lock, scheduled_at from procrastinate_jobs order by id").fetchall()
    assert [j[1].isoformat() for j in jobs] == ["2099-01-01T09:00:01+00:00"] * 2
    bucket = int(dt.datetime(2099, 1, 1, 9, 0, 1, tzinfo=dt.UTC).timestamp())
    assert {j[0] for j in jobs} == {f"dispatch:whatsapp:{bucket}", f"dispatch:email:{bucket}"}


def test_a_burst_of_submissions_makes_one_wakeup_per_channel(db, ready):
    for _ in range(50):
        submit(db, ready, intent())
    rows = db.execute("select queueing_lock, args->>'channel', task_name from procrastinate_jobs order by 1").fetchall()
    assert rows == [("dispatch:email", "email", "dispatch"), ("dispatch:whatsapp", "whatsapp", "dispatch")]


def test_suppressed_only_requests_wake_nobody(db, ready):
    submit(db, ready, intent(channels=["whatsapp"], recipient={"ref": "no-consent", "addresses": {"whatsapp": "+34600999888"}}))
    assert db.execute("select count(*) from procrastinate_jobs").fetchone()[0] == 0


def test_the_recipient_is_upserted_with_its_addresses(db, ready):
    submit(
        db, ready, intent(recipient={"ref": "runner-42", "addresses": {"email": "new@example.com"}, "timezone": "Europe/Madrid"})
    )
    recipient = call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)
    assert (
        recipient["addresses"] == {"whatsapp": "+34600111222", "email": "new@example.com"}
        or recipient["addresses"]["email"] == "new@example.com"
    )
    assert recipient["timezone"] == "Europe/Madrid"


def test_every_delivery_starts_its_history(db, ready):
    response, _ = submit(db, ready, intent())
    rows = db.execute("select seq, from_status, to_status, source from notify.delivery_events order by delivery_id").fetchall()
    assert sorted(rows) == [(1, None, "queued", "submit")] * 2


def test_recipient_locale_from_the_intent_updates_the_stored_one(db, ready):
    submit(db, ready, intent(recipient={"ref": "runner-42", "locale": "pt-BR"}))
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["locale"] == "pt-BR"


def test_the_usual_body_is_read_as_the_field_by_field_checks_read_it(db, ready):
    """The same body with null send_at, expires_at and callback_url takes the field-by-field path; both must store and
    answer alike (the one-predicate path reads the usual body without the checks)."""
    usual = intent(
        channels=["whatsapp", "email"], category="reminders", metadata={"run": 7}, variables={"name": "Ana", "event": "Run"}
    )
    slow = {**usual, "send_at": None, "expires_at": None, "callback_url": None}
    first, _ = submit(db, ready, usual, "usual")
    second, _ = submit(db, ready, slow, "slow")
    columns = "template_key, variables, category, channels::text, metadata, recipient_id, send_at, expires_at, callback_url"
    rows = db.execute(f"select {columns} from notify.notification_requests order by idempotency_key desc").fetchall()
    assert rows[0] == rows[1]
    assert [(d["channel"], d["status"], d.get("reason")) for d in first["deliveries"]] == [
        (d["channel"], d["status"], d.get("reason")) for d in second["deliveries"]
    ]


def test_a_known_recipient_with_a_new_address_is_updated(db, ready):
    submit(db, ready, intent())
    changed = intent(recipient={"ref": "runner-42", "addresses": {"email": "other@example.com"}})
    response, _ = submit(db, ready, changed)
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["addresses"]["email"] == "other@example.com"
    delivery = db.execute(
        "select address from notify.notification_deliveries where request_id = %s and channel = %s", (response["id"], "email")
    ).fetchone()
    assert delivery[0] == "other@example.com"
