"""Recipients, the consent ledger, templates and channel policies."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call


def consent(db, tenant, **body):
    return call(db, "notify_api.record_consent_v1(%s, 'runner-1', %s, 'tests')", tenant, Jsonb(body))


def allowed(db, tenant, channel, category=None) -> bool:
    return db.execute(
        "select notify._consent_allows(%s, (select id from notify.recipients where ref = 'runner-1'), %s, %s)",
        (tenant, channel, category),
    ).fetchone()[0]


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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"channel": "fax", "status": "granted", "source": "x"}, "channel"),
        ({"channel": "email", "status": "maybe", "source": "x"}, "status"),
        ({"channel": "email", "status": "granted"}, "source"),
        ({"channel": "email", "status": "granted", "source": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_consent_entries_are_refused(db, tenant, body, field):
    with pytest.raises(psycopg.Error) as info:
        consent(db, tenant, **body)
    assert info.value.sqlstate == "ND400" and info.value.diag.column_name == field
    assert db.execute("select count(*) from notify.recipient_consents").fetchone()[0] == 0
