"""Attacks on the dry run (POST /internal/notifications/preview): another tenant's key, knowing tenant A's recipient refs,
template keys and consent sources, previews them and learns nothing of A (no address, locale, time zone, consent entry,
template content, provider, suppression), and a preview writes nothing A could later read; a read-only key cannot
preview; a direct SQL caller bound to one tenant cannot preview another's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.api.test_api import SECRET, make_key
from tests.conftest import app_url, call, intent
from tests.sql.test_set_channel_provider_v1 import WA, set_provider

PREVIEW = "/internal/notifications/preview"


@pytest.fixture
def two(db, db_url, ready) -> Iterator[tuple[TestClient, TestClient, str]]:
    other = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    # Mallory has a template of the same key (else every delivery would only say template_not_found)
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'event_reminder', %s)",
        other,
        Jsonb({"channels": {"email": {"subject": "s", "text": "t"}}}),
    )
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET, render_processes=1)
    key_a, _ = make_key(db, ready)
    key_b, _ = make_key(db, other)
    with TestClient(app=create_app(settings)) as a, TestClient(app=create_app(settings)) as b:
        a.headers["Authorization"] = f"Bearer {key_a}"
        b.headers["Authorization"] = f"Bearer {key_b}"
        yield a, b, other


def test_another_tenants_key_learns_nothing_of_as_recipient(two, db, ready):
    a, b, _ = two
    # Tenant A: runner-42 with both addresses, Spanish, a time zone, a WhatsApp grant and an e-mail revoke; a provider.
    assert (
        a.post(
            "/internal/notifications",
            json=intent(
                recipient={
                    "ref": "runner-42",
                    "addresses": {"whatsapp": "+34600111222", "email": "ana@example.com"},
                    "locale": "es",
                    "timezone": "Europe/Madrid",
                }
            ),
        ).status_code
        == 202
    )
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "a-secret-source"}),
    )
    set_provider(db, ready, "whatsapp", WA)
    own = a.post(
        PREVIEW,
        json={
            "recipient": {"ref": "runner-42"},
            "channels": ["whatsapp", "email"],
            "template": "event_reminder",
            "variables": {"name": "Ana", "event": "Long run"},
        },
    ).json()
    assert own["deliveries"][0]["recipient_known"] and own["deliveries"][1]["consent"]["entry"]["source"] == "a-secret-source"

    for channels in (["email"], ["whatsapp", "email"]):
        response = b.post(PREVIEW, json={"recipient": {"ref": "runner-42"}, "channels": channels, "template": "event_reminder"})
        assert response.status_code == 200, response.text
        text = response.text
        for secret in (
            "+34600111222",
            "34600111222",
            "ana@example.com",
            "a-secret-source",
            "Europe/Madrid",
            "whatsapp_cloud",
            "106540352242922",
            "Reminder",
            "Long run",
        ):
            assert secret not in text, (secret, text)
        for d in response.json()["deliveries"]:
            assert not d["recipient_known"] and d["address"] == {"present": False} and "entry" not in d["consent"]
            assert d["locale"]["wanted"] == "en" and d["timezone"] == "UTC"  # the tenant's default, not A's Europe/Madrid
    # A fan-out naming A's refs learns no more.
    fan = b.post(
        PREVIEW,
        json={"recipients": [{"ref": "runner-42"}, {"ref": "runner-43"}], "channels": ["email"], "template": "event_reminder"},
    )
    assert fan.status_code == 200 and all(not d["recipient_known"] for d in fan.json()["deliveries"])
    assert "ana@example.com" not in fan.text


def test_another_tenants_templates_are_never_rendered(two, db, ready):
    a, b, _ = two
    call(
        db,
        "notify_api.upsert_template_v1(%s, 'a_only', %s)",
        ready,
        Jsonb({"channels": {"email": {"subject": "A-secret {{x}}", "text": "t"}}}),
    )
    answer = b.post(
        PREVIEW,
        json={
            "recipient": {"ref": "m", "addresses": {"email": "m@example.com"}},
            "channels": ["email"],
            "template": "a_only",
            "variables": {"x": 1},
        },
    ).json()
    assert answer["outcome"] == "refused" and answer["refused"]["type"] == "template_not_found"
    assert "A-secret" not in json.dumps(answer) and "rendered" not in answer["deliveries"][0]


def test_a_preview_leaves_nothing_behind_for_anyone(two, db, ready):
    """Mallory previews with tenant A's recipient ref and a new address: nothing is written, so A's recipient keeps its
    address and A's lookups see no new request."""
    a, b, other = two
    a.post("/internal/notifications", json=intent())
    counts = db.execute(
        "select (select count(*) from notify.recipients), (select count(*) from notify.recipient_addresses),"
        " (select count(*) from notify.notification_requests)"
    ).fetchone()
    b.post(PREVIEW, json=intent(recipient={"ref": "runner-42", "addresses": {"email": "mallory@example.com"}}))
    a.post(PREVIEW, json=intent(recipient={"ref": "runner-42", "addresses": {"email": "changed@example.com"}}))
    assert (
        db.execute(
            "select (select count(*) from notify.recipients), (select count(*) from notify.recipient_addresses),"
            " (select count(*) from notify.notification_requests)"
        ).fetchone()
        == counts
    )
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["addresses"]["email"] == "ana@example.com"


def test_a_read_only_key_cannot_preview(two, db, ready):
    a, _, _ = two
    read_key = keys.generate()
    call(
        db,
        "notify_api.create_api_key_v1(%s, 'reader', %s, %s, '{read}')",
        ready,
        keys.display_prefix(read_key),
        keys.digest(read_key),
    )
    assert a.post(PREVIEW, json=intent(), headers={"Authorization": f"Bearer {read_key}"}).status_code == 403


def test_a_bound_sql_login_cannot_preview_another_tenant(db, db_url, ready):
    other = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    call(db, "notify.bind_login_v1('dispatcher_caller', 'mallory')")
    try:
        with psycopg.connect(app_url(db_url, "dispatcher_caller"), autocommit=True) as caller:
            with pytest.raises(psycopg.Error) as info:
                caller.execute("select notify_api.preview_notification_v1(%s, %s)", (ready, Jsonb(intent())))
            assert info.value.sqlstate == "ND403"
            assert caller.execute("select notify_api.preview_notification_v1(%s, %s)", (other, Jsonb(intent()))).fetchone()[0]
    finally:
        call(db, "notify.unbind_login_v1('dispatcher_caller', 'mallory')")
