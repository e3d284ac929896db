"""notify_api.preview_notification_v1: the dry run of a submission. One test per behaviour: it writes nothing, reads the
body as a submission does (same errors), overlays the stored recipient with the body, and names every reason a delivery
would not be sent; another tenant's rows never show."""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dispatcher import keys
from tests.conftest import app_url, call, intent, submit
from tests.sql.test_set_channel_provider_v1 import WA, set_provider


def preview(conn: psycopg.Connection, tenant: str, body: Any) -> dict[str, Any]:
    return conn.execute("select notify_api.preview_notification_v1(%s, %s)", (tenant, Jsonb(body))).fetchone()[0]


def by_channel(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["channel"]: d for d in answer["deliveries"]}


def reasons(delivery: dict[str, Any]) -> list[str]:
    return [r["reason"] for r in delivery["reasons"]]


TABLES = """
select format('%I.%I', n.nspname, c.relname)
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where n.nspname in ('notify', 'notify_api', 'public') and c.relkind in ('r', 'p') and not c.relispartition
 order by 1
"""


def snapshot(db: psycopg.Connection) -> dict[str, tuple]:
    """Every table of notify and procrastinate's public schema: its row count and a hash of its rows."""
    tables = [r[0] for r in db.execute(TABLES).fetchall()]
    return {
        name: db.execute(
            f"select count(*), md5(coalesce(string_agg(t::text, ',' order by t::text), '')) from {name} t"
        ).fetchone()
        for name in tables
    }


def catalog(db: psycopg.Connection) -> list[tuple]:
    """The catalog's objects (a temporary table or any new relation, type or function would show)."""
    return (
        db.execute("select c.oid::regclass::text, c.relkind from pg_class c order by 1").fetchall()
        + db.execute("select p.oid::regprocedure::text from pg_proc p order by 1").fetchall()
    )


def test_writes_nothing_for_a_new_recipient_a_known_one_and_a_fanout(db, ready):
    """No row of any table changes, no object is created, and the transaction never even takes a transaction id (any
    insert, update, delete or temporary table would take one); no wake-up is deferred."""
    submit(db, ready, intent())  # a known recipient with addresses, a request and deliveries
    before, objects = snapshot(db), catalog(db)
    bodies = [
        intent(
            recipient={
                "ref": "new-runner",
                "addresses": {"email": "new@example.com"},
                "locale": "es-ES",
                "timezone": "Europe/Madrid",
            }
        ),
        intent(recipient={"ref": "runner-42", "addresses": {"email": "changed@example.com", "whatsapp": None}, "locale": "es"}),
        intent(send_at="2099-01-01T09:00:00Z"),
        {
            "recipients": [
                {"ref": "runner-42"},
                {"ref": "fan-1", "addresses": {"email": "f1@example.com"}, "variables": {"name": "F"}},
            ],
            "channels": ["email", "whatsapp"],
            "template": "event_reminder",
            "variables": {"name": "Ana", "event": "Long run"},
        },
        intent(template="no_such_template"),
    ]
    with psycopg.connect(db.info.dsn) as conn:  # one transaction for all of them
        for body in bodies:
            preview(conn, ready, body)
        assert conn.execute("select pg_current_xact_id_if_assigned()").fetchone()[0] is None
        conn.rollback()
    assert snapshot(db) == before
    assert catalog(db) == objects


def test_reads_the_body_as_a_submission_does_same_errors(db, ready):
    """Each body a submission refuses, the preview refuses with the same status, type, field and message."""
    bad = [
        {"bogus": 1},
        {"recipient": None},
        {"recipient": {"ref": "r", "nickname": "x"}},
        {"recipient": {"ref": ""}},
        {"channels": ["email", "email"]},
        {"channels": ["pigeon"]},
        {"send_at": "tomorrow"},
        {"expires_at": "2020-01-01T00:00:00Z"},
        {"recipient": {"ref": "r", "addresses": {"whatsapp": "600111222"}}},
        {"recipient": {"ref": "r", "addresses": {"fax": "1"}}},
        {"recipient": {"ref": "r", "timezone": "Mars/Olympus"}},
        {"recipient": {"ref": "r", "locale": "spanish!"}},
        {"callback_url": "https://example.com/cb"},  # callbacks not set up
        {"recipient": None, "recipients": [{"ref": "a"}, {"ref": "a"}]},
        {"recipient": None, "recipients": [{"ref": "a", "addresses": {"email": "nope"}}]},
        {"recipient": None, "recipients": [{"ref": "a", "timezone": "Mars/Olympus"}]},
        {"recipient": None, "recipients": [{"ref": f"r{i}"} for i in range(10_001)]},
    ]
    for change in bad:
        body = {k: v for k, v in intent(**change).items() if v is not None or k != "recipient"}
        with pytest.raises(psycopg.Error) as submitted:
            submit(db, ready, body)
        with pytest.raises(psycopg.Error) as previewed:
            preview(db, ready, body)
        s, p = submitted.value, previewed.value
        assert (p.sqlstate, p.diag.constraint_name, p.diag.column_name, p.diag.message_primary) == (
            s.sqlstate,
            s.diag.constraint_name,
            s.diag.column_name,
            s.diag.message_primary,
        ), change


def test_a_known_recipient_is_overlaid_with_the_body_without_writing(db, ready):
    submit(db, ready, intent())  # stores runner-42's whatsapp and email, locale en
    answer = preview(
        db, ready, intent(recipient={"ref": "runner-42", "addresses": {"whatsapp": None}, "timezone": "Europe/Madrid"})
    )
    wa, email = by_channel(answer)["whatsapp"], by_channel(answer)["email"]
    assert wa["recipient_known"] and wa["address"] == {"present": False, "source": "request"}
    assert wa["status"] == "suppressed" and wa["reason"] == "no_address" and not wa["would_send"]
    assert reasons(wa) == ["no_address"] and "removes" in wa["reasons"][0]["detail"]
    assert email["address"] == {"present": True, "source": "stored"} and email["would_send"] and email["status"] == "queued"
    assert email["timezone"] == "Europe/Madrid"
    stored = call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)
    assert stored["addresses"]["whatsapp"] == "+34600111222" and stored["timezone"] is None


def test_names_the_consent_entry_in_force(db, ready):
    answer = preview(db, ready, intent())
    wa = by_channel(answer)["whatsapp"]
    entry = db.execute(
        "select id, status::text, source, recorded_at from notify.recipient_consents where channel = 'whatsapp'"
    ).fetchone()
    assert wa["would_send"] and wa["consent"]["allowed"]
    assert wa["consent"]["entry"]["id"] == entry[0] and wa["consent"]["entry"]["status"] == "granted"
    assert wa["consent"]["entry"]["source"] == "signup_form"
    assert dt.datetime.fromisoformat(wa["consent"]["entry"]["recorded_at"]) == entry[3]
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "revoked", "source": "stop_keyword", "category": "reminders"}),
    )
    answer = preview(db, ready, intent(category="reminders"))
    wa = by_channel(answer)["whatsapp"]
    assert not wa["would_send"] and wa["status"] == "suppressed" and wa["reason"] == "no_consent"
    assert wa["consent"]["entry"]["status"] == "revoked" and wa["consent"]["entry"]["source"] == "stop_keyword"
    assert wa["consent"]["entry"]["category"] == "reminders" and reasons(wa) == ["no_consent"]
    # another category: the category-specific revoke does not apply, the grant for every category does
    assert by_channel(preview(db, ready, intent(category="news")))["whatsapp"]["consent"]["entry"]["status"] == "granted"


def test_without_an_entry_the_tenant_policy_decides_and_says_so(db, ready):
    answer = preview(
        db, ready, intent(recipient={"ref": "stranger", "addresses": {"whatsapp": "+34600999888", "email": "s@example.com"}})
    )
    wa, email = by_channel(answer)["whatsapp"], by_channel(answer)["email"]
    assert not wa["recipient_known"] and "entry" not in wa["consent"]
    assert (wa["consent"]["policy"], wa["consent"]["policy_source"], wa["reason"]) == ("opt_in", "default", "no_consent")
    assert email["consent"]["policy"] == "opt_out" and email["would_send"]
    call(db, "notify_api.set_channel_policy_v1(%s, 'email', 'opt_in')", ready)
    email = by_channel(preview(db, ready, intent(recipient={"ref": "stranger", "addresses": {"email": "s@example.com"}})))[
        "email"
    ]
    assert (email["consent"]["policy_source"], email["reason"]) == ("tenant", "no_consent")


def test_every_reason_at_once_and_the_submissions_own_error(db, ready):
    """A template locale missing on one channel, a variable missing, no address and no consent: all of them are listed
    per delivery, and the answer says the submission would be refused with the error it would give."""
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'email_only', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "{{a}}", "text": "{{b}}"}}}),
    )
    body = intent(template="email_only", variables={"a": 1}, recipient={"ref": "nobody"})
    answer = preview(db, ready, body)
    wa, email = by_channel(answer)["whatsapp"], by_channel(answer)["email"]
    assert reasons(wa) == ["no_address", "no_consent", "template_not_found"]
    assert wa["locale"] == {"wanted": "en", "tried": ["en"]} and "content" not in wa["template"]
    assert reasons(email) == ["no_address", "missing_variables"] and email["missing_variables"] == ["b"]
    assert answer["outcome"] == "refused"
    with pytest.raises(psycopg.Error) as submitted:
        submit(db, ready, body)
    refused = answer["refused"]
    assert (refused["status"], refused["type"], refused["field"], refused["detail"]) == (
        422,
        submitted.value.diag.constraint_name,
        submitted.value.diag.column_name,
        submitted.value.diag.message_primary,
    )
    body = intent(variables={"name": "Ana"})
    with pytest.raises(psycopg.Error) as submitted:
        submit(db, ready, body)
    refused = preview(db, ready, body)["refused"]
    assert (refused["type"], refused["field"], refused["detail"]) == (
        "missing_variables",
        submitted.value.diag.column_name,
        submitted.value.diag.message_primary,
    )


def test_locale_fallback_and_the_content_and_variables_to_render(db, ready):
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        ready,
        Jsonb({"locale": "es", "channels": {"email": {"subject": "Recordatorio: {{event}}", "text": "Hola {{name}}"}}}),
    )
    email = by_channel(
        preview(db, ready, intent(recipient={"ref": "x", "addresses": {"email": "x@example.com"}, "locale": "es-MX"}))
    )["email"]
    assert email["locale"] == {"wanted": "es-MX", "tried": ["es-MX", "es", "en"], "template_locale": "es"}
    assert email["template"]["content"] == {"subject": "Recordatorio: {{event}}", "text": "Hola {{name}}"}
    assert email["variables"] == {"name": "Ana", "event": "Long run"}


def test_the_provider_the_delivery_would_go_through(db, ready):
    answer = preview(db, ready, intent())
    assert by_channel(answer)["whatsapp"]["provider"] == {"name": "mock", "source": "default_mock"}
    set_provider(db, ready, "whatsapp", WA)
    answer = preview(db, ready, intent())
    assert by_channel(answer)["whatsapp"]["provider"] == {"name": "whatsapp_cloud", "source": "channel_provider"}
    assert by_channel(answer)["email"]["provider"]["source"] == "default_mock"
    # a test key's preview (the HTTP statement reads the key): the mock, whatever the tenant configured
    key = keys.generate()
    info = call(
        db, "notify_api.create_api_key_v1(%s, 't', %s, %s, '{submit}', true)", ready, keys.display_prefix(key), keys.digest(key)
    )
    test = db.execute(
        "select notify_api.preview_notification_http_v1(%s, %s, %s)", (ready, Jsonb(intent()), info["id"])
    ).fetchone()[0]
    assert test["test"] is True and by_channel(test)["whatsapp"]["provider"] == {"name": "mock", "source": "test_key"}


def test_free_form_whatsapp_text_outside_the_window_is_named(db, ready):
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_template_v1(%s, 'chat', %s)", ready, Jsonb({"channels": {"whatsapp": {"text": "Hi {{name}}"}}}))
    wa = by_channel(preview(db, ready, intent(template="chat", channels=["whatsapp"])))["whatsapp"]
    assert wa["status"] == "queued" and not wa["would_send"]
    assert [(r["reason"], r.get("at")) for r in wa["reasons"]] == [("outside_customer_service_window", "claim")]


def test_when_it_would_be_sent(db, ready):
    answer = preview(db, ready, intent(send_at="2099-01-01T09:00:00Z", expires_at="2099-01-02T09:00:00Z"))
    wa = by_channel(answer)["whatsapp"]
    assert wa["status"] == "scheduled" and dt.datetime.fromisoformat(wa["due_at"]) == dt.datetime(2099, 1, 1, 9, tzinfo=dt.UTC)
    assert dt.datetime.fromisoformat(wa["expires_at"]) == dt.datetime(2099, 1, 2, 9, tzinfo=dt.UTC)
    now = db.execute("select now()").fetchone()[0]
    assert dt.datetime.fromisoformat(by_channel(preview(db, ready, intent()))["email"]["due_at"]) >= now


def test_a_fanout_answers_per_recipient_and_channel(db, ready):
    submit(db, ready, intent())
    body = {
        "recipients": [
            {"ref": "runner-42"},
            {"ref": "fan-1", "addresses": {"email": "f1@example.com"}, "variables": {"name": "Fan"}},
            {"ref": "fan-2"},
        ],
        "channels": ["whatsapp", "email"],
        "template": "event_reminder",
        "variables": {"name": "Ana", "event": "Long run"},
    }
    answer = preview(db, ready, body)
    assert answer["recipient_count"] == 3 and answer["outcome"] == "accepted"
    got = [(d["index"], d["recipient"], d["channel"], d["would_send"], d.get("reason")) for d in answer["deliveries"]]
    assert got == [
        (0, "runner-42", "whatsapp", True, None),
        (0, "runner-42", "email", True, None),
        (1, "fan-1", "whatsapp", False, "no_address"),
        (1, "fan-1", "email", True, None),
        (2, "fan-2", "whatsapp", False, "no_address"),
        (2, "fan-2", "email", False, "no_address"),
    ]
    assert answer["deliveries"][3]["variables"] == {"name": "Fan", "event": "Long run"}


def test_an_erased_recipients_opt_out_of_the_address_is_named(db, ready):
    submit(db, ready, intent())
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "unsubscribe"}),
    )
    call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', 'test')", ready)
    email = by_channel(preview(db, ready, intent(recipient={"ref": "new-owner", "addresses": {"email": "ana@example.com"}})))[
        "email"
    ]
    assert email["reason"] == "no_consent" and "suppressed_address" in email["consent"]
    assert "suppression list" in email["reasons"][0]["detail"]


def test_another_tenants_recipient_and_consent_never_show(db, ready):
    """Tenant B's runner-42 has addresses and a grant; tenant A previewing runner-42 sees a recipient it does not know."""
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        other,
        Jsonb({"channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    submit(db, ready, intent())
    answer = preview(db, other, {"recipient": {"ref": "runner-42"}, "channels": ["email"], "template": "event_reminder"})
    email = answer["deliveries"][0]
    assert not email["recipient_known"] and email["address"] == {"present": False} and email["reason"] == "no_address"
    assert "entry" not in email["consent"]


def test_a_trusted_sql_caller_may_preview_and_is_bound_to_its_transactions_tenant(db, db_url, ready):
    with psycopg.connect(app_url(db_url, "dispatcher_caller"), autocommit=True) as caller:
        assert preview(caller, ready, intent())["outcome"] == "accepted"
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    with psycopg.connect(app_url(db_url, "dispatcher_caller")) as caller:
        preview(caller, ready, intent())
        with pytest.raises(psycopg.Error) as info:
            preview(caller, other, intent())
        assert info.value.sqlstate == "ND404"


# -- after the route and policy helpers' checkpoints (ROUTE-CORE, POLICY-CORE) -----------------------------------------
ROUTE = [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}]


def routed(**overrides: Any) -> dict[str, Any]:
    body = {k: v for k, v in intent(**overrides).items() if k != "channels"}
    body.setdefault("route", ROUTE)
    return body


@pytest.mark.parametrize(
    "recipient",
    [
        {"ref": "runner-42", "addresses": {"whatsapp": "+34600111222", "email": "ana@example.com"}},  # step 1 due
        {"ref": "stranger", "addresses": {"whatsapp": "+34600999888", "email": "s@example.com"}},  # step 1 without consent
        {"ref": "nowhere"},  # neither step has an address
    ],
)
def test_a_routes_steps_as_the_submission_records_them(db, ready, recipient):
    answer = preview(db, ready, routed(recipient=recipient))
    submitted, _ = submit(db, ready, routed(recipient=recipient))
    assert [(d["step"], d["channel"], d["status"], d.get("reason")) for d in answer["deliveries"]] == [
        (d["step"], d["channel"], d["status"], d.get("reason")) for d in submitted["deliveries"]
    ]
    steps = {d["step"]: d for d in answer["deliveries"]}
    if recipient["ref"] == "runner-42":
        assert steps[1]["would_send"] and not steps[2]["would_send"] and "due_at" not in steps[2]
        assert steps[2]["condition"].startswith("only if step 1 does not reach delivered within PT15M")
        assert steps[2]["reasons"] == [{"reason": "route_step_waiting", "step": 1, "detail": steps[2]["condition"]}]
    elif recipient["ref"] == "stranger":
        assert not steps[1]["would_send"] and steps[1]["reason"] == "no_consent"
        assert steps[2]["would_send"] and steps[2]["reason"] == "step_1_suppressed" and steps[2]["reasons"] == []


def window_around_now(db: psycopg.Connection, tenant: str, **extra: Any) -> dt.datetime:
    """Quiet hours (tenant time zone UTC) from an hour ago to two hours from now; returns when they end."""
    now = db.execute("select date_trunc('minute', now() at time zone 'UTC')").fetchone()[0]
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(hours=2)
    call(
        db,
        "notify_api.set_quiet_hours_v1(%s, %s)",
        tenant,
        Jsonb({"timezone": "UTC", "start": start.strftime("%H:%M"), "end": end.strftime("%H:%M"), **extra}),
    )
    return end.replace(tzinfo=dt.UTC)


def test_quiet_hours_hold_it_until_they_end_in_the_recipients_time_zone(db, ready):
    ends = window_around_now(db, ready, categories={"password_reset": {"exempt": True}})
    email = by_channel(preview(db, ready, intent()))["email"]
    assert email["would_send"] and email["status"] == "queued"
    assert email["policy"]["decision"] == "hold" and email["policy"]["holds"][0]["reason"] == "quiet_hours"
    assert email["policy"]["holds"][0]["detail"]["quiet_hours"]["timezone"] == "UTC"
    assert dt.datetime.fromisoformat(email["sends_at"]) == ends
    # an exempt category is sent at once
    assert by_channel(preview(db, ready, intent(category="password_reset")))["email"]["policy"]["decision"] == "send"
    # a body whose time zone puts now outside the window (Auckland: 12 or 13 hours ahead of UTC) is not held
    email = by_channel(
        preview(
            db, ready, intent(recipient={"ref": "kiwi", "addresses": {"email": "k@example.com"}, "timezone": "Pacific/Auckland"})
        )
    )["email"]
    assert email["policy"]["decision"] == "send" and email["timezone"] == "Pacific/Auckland"
    # quiet hours that end after expires_at: it would expire, with that reason
    email = by_channel(preview(db, ready, intent(expires_at=(ends - dt.timedelta(minutes=30)).isoformat())))["email"]
    assert not email["would_send"] and email["policy"]["decision"] == "expire"
    assert [r["reason"] for r in email["reasons"]] == ["quiet_hours_past_expiry"] and email["reasons"][0]["at"] == "claim"


def test_a_frequency_cap_names_itself_and_its_current_count(db, ready):
    from tests.conftest import claim

    call(
        db, "notify_api.set_frequency_caps_v1(%s, %s)", ready, Jsonb({"caps": [{"max": 1, "period": "P1D", "channel": "email"}]})
    )
    submit(db, ready, intent(channels=["email"]))
    assert len(claim(db, "email")) == 1  # the first reminder is sent (counted by the claim)
    email = by_channel(preview(db, ready, intent()))["email"]
    assert not email["would_send"] and email["status"] == "queued"  # submitted queued, suppressed when claimed
    [why] = email["reasons"]
    assert (why["reason"], why["at"], why["cap"]["max"], why["cap"]["count"], why["cap"]["period"]) == (
        "frequency_cap",
        "claim",
        1,
        1,
        "P1D",
    )
    # a new recipient has nothing to count, and the preview says so
    new = by_channel(preview(db, ready, intent(recipient={"ref": "new", "addresses": {"email": "n@example.com"}})))["email"]
    assert new["would_send"] and new["policy"]["counts"].startswith("none yet")


def test_a_fanout_with_policies_asks_for_one_decision_per_time_zone_not_per_recipient(db, ready):
    """A 10,000-recipient fan-out with quiet hours set took 13 s (a policy decision per delivery, held then sent: two
    evaluations each); recipients without counted sends share one decision per time zone and channel. Counted as
    calls of notify._preview_policy in this transaction, not timed; a recipient with sends still gets its own."""
    from tests.conftest import claim

    call(
        db, "notify_api.set_frequency_caps_v1(%s, %s)", ready, Jsonb({"caps": [{"max": 1, "period": "P1D", "channel": "email"}]})
    )
    submit(db, ready, intent(channels=["email"]))
    call(db, "notify_api.delete_quiet_hours_v1(%s)", ready)  # off for the claim
    assert len(claim(db, "email")) == 1  # runner-42 has a counted e-mail
    ends = window_around_now(db, ready)
    db.execute("set track_functions = 'pl'")
    body = intent()
    body.pop("recipient")
    body["recipients"] = [{"ref": "runner-42"}] + [
        {"ref": f"r{i}", "addresses": {"email": f"r{i}@example.com"}, **({"timezone": "Pacific/Auckland"} if i % 2 else {})}
        for i in range(40)
    ]
    signature = "notify._preview_policy(uuid, uuid, notify.channel, text, text, text, timestamptz, timestamptz, text)"
    calls = f"select coalesce(pg_stat_get_xact_function_calls('{signature}'::regprocedure), 0)"
    before = db.execute(calls).fetchone()[0]
    answer = preview(db, ready, body)
    # (whatsapp: no address for the new ones, and runner-42's; e-mail: runner-42, UTC and Auckland)
    assert db.execute(calls).fetchone()[0] - before <= 4
    email = {d["recipient"]: d for d in answer["deliveries"] if d["channel"] == "email"}
    assert email["runner-42"]["policy"]["decision"] == "suppress" and email["runner-42"]["policy"]["reason"] == "frequency_cap"
    assert email["r0"]["policy"]["decision"] == "hold" and dt.datetime.fromisoformat(email["r0"]["sends_at"]) == ends
    assert email["r1"]["policy"]["decision"] == "send" and email["r1"]["timezone"] == "Pacific/Auckland"
    assert all(email[f"r{i}"]["policy"] == email[f"r{i % 2}"]["policy"] for i in range(40))
