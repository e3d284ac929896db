"""One place per channel and per provider kind (migration 0045): notify._channel_rules holds what differs by channel and
every rule reads it there (inlined and folded, so the hot paths pay nothing); notify.provider_kinds holds which channel a
provider serves and what a tenant may configure of it, so a new provider kind is a row, not a change to a function."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import app_url, call, claim, intent, record, result, submit
from tests.sql.test_ingest_webhook_v1__sms import INGEST, PHONE, sms  # noqa: F401  (fixture)
from tests.sql.test_set_channel_provider_v1 import grant

RULES = {
    "email": {
        "default_policy": "opt_out",
        "resend_after_ambiguous": True,
        "has_read": False,
        "failure_beats_delivery": True,
        "address_kind": "email",
        "unknown_deadline_seconds": 86400,
    },
    "whatsapp": {
        "default_policy": "opt_in",
        "resend_after_ambiguous": False,
        "has_read": True,
        "failure_beats_delivery": False,
        "address_kind": "e164_or_bsuid",
        "unknown_deadline_seconds": 604800,
    },
    "sms": {
        "default_policy": "opt_in",
        "resend_after_ambiguous": False,
        "has_read": False,
        "failure_beats_delivery": False,
        "address_kind": "e164",
        "unknown_deadline_seconds": 604800,
    },
}


def test_the_worker_reads_every_channels_rules_from_the_database(db, db_url):
    # Every channel of the enum has its row: a channel added to the enum without one would show here as nulls.
    channels = [r[0] for r in db.execute("select unnest(enum_range(null::notify.channel))::text").fetchall()]
    with psycopg.connect(app_url(db_url), autocommit=True) as app:  # the worker's login (notify_service)
        rules = app.execute("select notify_api.channel_rules_v1()").fetchone()[0]
    assert sorted(rules) == sorted(channels)
    assert rules == RULES


def test_the_rules_fold_into_the_queries_that_use_them(db):
    # Inlined and folded: the plan of a rank over a column holds the rules as constants, no call to a function.
    plan = "\n".join(
        r[0]
        for r in db.execute(
            "explain verbose select notify._rank(c, 'failed'), notify._transition_allowed(c, 'sent', 'read'),"
            " notify._address_valid(c, '+34600111222') from (values ('email'::notify.channel), ('sms')) v(c)"
        ).fetchall()
    )
    assert "_channel_rules" not in plan and "_rank" not in plan and "_transition_allowed" not in plan, plan


@pytest.mark.parametrize(
    ("channel", "transition", "allowed"),
    [
        ("whatsapp", ("delivered", "read"), True),
        ("sms", ("delivered", "read"), False),
        ("email", ("delivered", "read"), False),
        ("sms", ("sending", "read"), False),
        ("email", ("delivered", "bounced"), True),
        ("sms", ("delivered", "bounced"), False),
        ("sms", ("failed", "delivered"), True),
        ("email", ("failed", "delivered"), False),
    ],
)
def test_the_state_machine_follows_each_channels_rules(db, channel, transition, allowed):
    got = db.execute("select notify._transition_allowed(%s, %s, %s)", (channel, *transition)).fetchone()[0]
    assert got is allowed


def test_a_read_report_on_sms_changes_nothing(db, sms):  # noqa: F811
    # SMS reports no reads (Twilio's `read` is for WhatsApp and RCS senders): the report is stale, the delivery delivered.
    submit(db, sms, intent(channels=["sms"], recipient={"ref": "runner-42", "addresses": {"sms": PHONE}}))
    [row] = claim(db, "sms")
    record(db, result(row, "sent", provider="twilio", provider_message_id="SMread"))

    def report(status):
        event = {"tenant_id": str(row[0]), "delivery_id": str(row[1]), "provider_message_id": "SMread", "status": status}
        return db.execute(INGEST, (f"SMread:{status}", Jsonb([event]), Jsonb([]))).fetchone()[0]["outcomes"][0]["outcome"]

    assert report("delivered") == "applied"
    assert report("read") == "stale"
    assert db.execute("select status::text, read_at from notify.notification_deliveries").fetchone() == ("delivered", None)


def test_an_sms_route_step_may_not_wait_for_a_read(db, tenant):
    body = intent(route=[{"channel": "sms", "until": "read"}, {"channel": "email"}])
    body.pop("channels")
    with pytest.raises(psycopg.Error) as info:
        submit(db, tenant, body)
    assert info.value.diag.column_name == "route[0].until"
    assert "sms never reports read" in info.value.diag.message_primary


def test_a_provider_that_cannot_serve_the_channel_is_refused_naming_every_kind(db, tenant):
    grant(db, tenant)
    for channel, provider in (("sms", "smtp"), ("email", "twilio"), ("email", "sendgrid")):
        with pytest.raises(psycopg.Error) as info:
            call(db, "notify_api.set_channel_provider_v1(%s, %s, %s)", tenant, channel, Jsonb({"provider": provider}))
        assert (info.value.diag.sqlstate, info.value.diag.column_name) == ("ND422", "provider")
        assert (
            "twilio: sms" in info.value.diag.message_primary and "mock: whatsapp, email, sms" in info.value.diag.message_primary
        )
    assert db.execute("select count(*) from notify.channel_providers").fetchone()[0] == 0


def test_a_new_provider_kind_is_one_row(db, tenant):
    # What a provider kind's migration adds: its row. The settings it takes, its required fields and its defaults then
    # hold without any change to set_channel_provider_v1.
    db.execute(
        "insert into notify.provider_kinds (name, channel, settings_keys, secret_keys, required, defaults)"
        " values ('pager', 'sms', '{pager_id,colour}', '{token}', '{settings.pager_id,secrets.token}', %s)",
        (Jsonb({"colour": "blue"}),),
    )
    grant(db, tenant)
    with pytest.raises(psycopg.Error) as info:
        call(
            db,
            "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
            tenant,
            Jsonb({"provider": "pager", "settings": {"pager_id": "7"}}),
        )
    assert info.value.diag.column_name == "secrets.token"
    with pytest.raises(psycopg.Error) as info:
        call(
            db,
            "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
            tenant,
            Jsonb({"provider": "pager", "settings": {"pager_id": "7", "size": 3}, "secrets": {"token": "env:TEST_T"}}),
        )
    assert info.value.diag.column_name == "settings.size"
    out = call(
        db,
        "notify_api.set_channel_provider_v1(%s, 'sms', %s)",
        tenant,
        Jsonb({"provider": "pager", "settings": {"pager_id": "7"}, "secrets": {"token": "env:TEST_T"}}),
    )
    assert (out["provider"], out["settings"]) == ("pager", {"pager_id": "7", "colour": "blue"})
    # and a kind serves only its channel: the table's foreign key holds even against a direct write
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("update notify.channel_providers set channel = 'email' where provider = 'pager'")
