"""Attacks on resolving unknown outcomes: another tenant's admin key cannot resolve (or learn of) tenant A's delivery,
A's key without the admin scope cannot resolve it, and another tenant's deadline never finalizes A's."""

from __future__ import annotations

from litestar.testing import TestClient

from api.app import create_app
from dispatcher.settings import Settings
from tests.api.test_api import SECRET
from tests.conftest import app_url, call, claim, intent, submit
from tests.security.test_erasure import As, key


def test_another_tenant_or_a_non_admin_key_cannot_resolve(db, db_url, ready):
    submit(db, ready, intent(channels=["whatsapp"]))
    row = claim(db, "whatsapp", lease=1)[0]
    db.execute("update notify.notification_deliveries set lease_expires_at = now() - interval '1 s'")
    call(db, "notify_api.run_maintenance_v1()")
    other = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET)
    with TestClient(app=create_app(settings)) as c:
        b = As(c, key(db, other, ["submit", "read", "admin"]))
        a_plain = As(c, key(db, ready, ["submit", "read"]))
        a = As(c, key(db, ready, ["admin"]))
        body = {"status": "sent", "note": "trust me"}
        assert b.post(f"/internal/deliveries/{row[1]}/resolve", json=body).status_code == 404
        assert a_plain.post(f"/internal/deliveries/{row[1]}/resolve", json=body).status_code == 403
        assert b.put("/internal/channels/whatsapp/unknown-deadline", json={"after_seconds": 60}).status_code == 200
        db.execute("update notify.notification_deliveries set updated_at = now() - interval '1 hour'")
        call(db, "notify_api.run_maintenance_v1()")
        state = db.execute("select status::text from notify.notification_deliveries where id = %s", (row[1],)).fetchone()[0]
        assert state == "unknown"
        assert a.post(f"/internal/deliveries/{row[1]}/resolve", json=body).status_code == 200
