"""Attacks on erasure, export and the suppression list: another tenant's key can neither erase, export nor learn of
tenant A's recipient; a key without the admin scope cannot erase; an application login reads neither the HMAC key nor
the hashes, and cannot compute a hash (which would let it test phone numbers against the list)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from litestar.testing import TestClient
from psycopg.types.json import Jsonb

from api.app import create_app
from dispatcher import keys
from dispatcher.settings import Settings
from tests.api.test_api import SECRET
from tests.conftest import app_url, call, intent, submit
from tests.sql.test_erase_recipient_v1 import INBOUND
from tests.sql.test_set_channel_provider_v1 import WA, grant, set_provider


def key(db, tenant: str, scopes: list[str]) -> str:
    k = keys.generate()
    call(db, "notify_api.create_api_key_v1(%s, 'x', %s, %s, %s)", tenant, keys.display_prefix(k), keys.digest(k), scopes)
    return k


class As:
    """One API key's view of the app."""

    def __init__(self, client: TestClient, api_key: str) -> None:
        self.client, self.headers = client, {"Authorization": f"Bearer {api_key}"}

    def __getattr__(self, method: str):
        return lambda path, **kw: getattr(self.client, method)(path, headers=self.headers, **kw)


@pytest.fixture
def clients(db, db_url, ready) -> Iterator[dict[str, As]]:
    other = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    settings = Settings(database_url=app_url(db_url), mock_webhook_secret=SECRET)
    made = {
        "a": key(db, ready, ["submit", "read", "admin"]),
        "a_submit_read": key(db, ready, ["submit", "read"]),
        "b": key(db, other, ["submit", "read", "admin"]),
    }
    with TestClient(app=create_app(settings)) as c:
        yield {name: As(c, k) for name, k in made.items()}


def addresses(db, tenant):
    return db.execute(
        "select count(*) from notify.recipient_addresses a join notify.recipients r on r.id = a.recipient_id"
        " where r.tenant_id = %s and r.ref = 'runner-42'",
        (tenant,),
    ).fetchone()[0]


def test_another_tenants_key_can_neither_erase_nor_export(db, ready, clients):
    submit(db, ready, intent())
    b = clients["b"]
    assert b.delete("/internal/recipients/runner-42").status_code == 404
    assert b.get("/internal/recipients/runner-42/export").status_code == 404
    assert addresses(db, ready) == 2  # untouched
    assert db.execute("select count(*) from notify.recipient_erasures").fetchone()[0] == 0
    # B erasing its own runner-42 (same ref) changes nothing of A's
    b.put("/internal/recipients/runner-42", json={"addresses": {"email": "b@example.com"}})
    assert b.delete("/internal/recipients/runner-42").status_code == 200
    assert addresses(db, ready) == 2
    # A's own admin key can; its submit/read key cannot
    assert clients["a_submit_read"].delete("/internal/recipients/runner-42").status_code == 403
    assert clients["a"].get("/internal/recipients/runner-42/export").status_code == 200
    receipt = clients["a"].delete("/internal/recipients/runner-42")
    assert receipt.status_code == 200 and receipt.json()["rows_changed"]["recipient_addresses"] == 2
    assert addresses(db, ready) == 0


def test_an_application_login_cannot_read_or_compute_the_keyed_hashes(db, db_url, ready):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"addresses": {"email": "a@example.com"}}))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "email", "status": "revoked", "source": "x"}),
    )
    call(db, "notify_api.erase_recipient_v1(%s, 'runner-42')", ready)
    for role in ("dispatcher_app", "dispatcher_caller"):
        with psycopg.connect(app_url(db_url, role), autocommit=True) as conn:
            for attack in (
                "select * from notify.address_hash_key",
                "select * from notify.address_suppressions",
                "select * from notify.recipient_erasures",
                "select notify._address_hash('email', 'a@example.com')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(attack)


def test_an_erasure_leaves_no_copy_of_the_business_scoped_user_id_meta_mapped_to_the_phone(db, ready):
    """WhatsApp 2026: an inbound message naming both the phone and the BSUID opens the window under both and maps them
    (notify.whatsapp_users); a later BSUID-only status payload names the BSUID alone. Erasing the recipient (known to us
    by its phone) must remove the BSUID's window and the payload too, not only what names the phone's digits."""
    bsuid, phone = "ES.73491208655302741918", "+34600111999"
    set_provider(db, ready, "whatsapp", WA)
    call(db, "notify_api.upsert_recipient_v1(%s, 'bsuid-user', %s)", ready, Jsonb({"addresses": {"whatsapp": phone}}))
    message = {
        "phone_number_id": WA["settings"]["phone_number_id"],
        "sender": phone.lstrip("+"),
        "user_id": bsuid,
        "message_id": "wamid.b1",
        "text": "hola",
    }
    number = WA["settings"]["phone_number_id"]
    db.execute(
        INBOUND, ("in-b1", Jsonb({"phone_number_id": number, "from": phone.lstrip("+"), "user_id": bsuid}), Jsonb([message]))
    )
    # a second inbound message, BSUID only (the user hid the number): its payload names the BSUID, not the phone
    message = {**message, "sender": None, "message_id": "wamid.b2"}
    db.execute(INBOUND, ("in-b2", Jsonb({"phone_number_id": number, "user_id": bsuid, "text": "hola"}), Jsonb([message])))
    windows = "select count(*) from notify.whatsapp_windows where wa_id = %s"
    assert db.execute(windows, (bsuid,)).fetchone()[0] == 1  # the setup holds the BSUID's window
    call(db, "notify_api.erase_recipient_v1(%s, 'bsuid-user')", ready)
    left = {
        "whatsapp_windows": db.execute(windows, (bsuid,)).fetchone()[0],
        "whatsapp_users": db.execute("select count(*) from notify.whatsapp_users where user_id = %s", (bsuid,)).fetchone()[0],
        "webhook_events": db.execute(
            "select count(*) from notify.webhook_events where strpos(payload::text, %s) > 0", (bsuid,)
        ).fetchone()[0],
    }
    assert left == {"whatsapp_windows": 0, "whatsapp_users": 0, "webhook_events": 0}


def test_another_tenant_cannot_wipe_a_webhook_payload_of_a_by_erasing_its_own_recipient(db, ready):
    """Tenant B knows a phone number A's customers use. B gives its own recipient that phone and takes a business number
    whose digits occur in it (phone_number_id is any 5-20 digits not taken): erasing B's recipient must not touch A's raw
    webhooks (notify.webhook_events is no tenant's table: only the erasing tenant's own payloads may be rewritten)."""
    phone = "+34600111999"
    set_provider(db, ready, "whatsapp", WA)
    message = {
        "phone_number_id": WA["settings"]["phone_number_id"],
        "sender": phone.lstrip("+"),
        "message_id": "wamid.a1",
        "text": "hola",
    }
    payload = {"phone_number_id": WA["settings"]["phone_number_id"], "from": phone.lstrip("+"), "text": "hola"}
    db.execute(INBOUND, ("in-a1", Jsonb(payload), Jsonb([message])))
    mallory = str(call(db, "notify_api.create_tenant_v1('mallory', 'Mallory', 'en')")["id"])
    grant(db, mallory, env_prefix="MALLORY_")
    set_provider(
        db,
        mallory,
        "whatsapp",
        {**WA, "settings": {"phone_number_id": phone[3:8]}, "secrets": {"access_token": "env:MALLORY_WA_TOKEN"}},  # "60011"
        granted=False,
    )
    call(db, "notify_api.upsert_recipient_v1(%s, 'victim', %s)", mallory, Jsonb({"addresses": {"whatsapp": phone}}))
    call(db, "notify_api.erase_recipient_v1(%s, 'victim')", mallory)
    [(kept,)] = db.execute("select payload from notify.webhook_events where event_key = 'in-a1'").fetchall()
    assert kept == payload


def _wait_for_lock(db, conn) -> None:
    for _ in range(500):
        if db.execute(
            "select count(*) from pg_stat_activity where pid = %s and wait_event_type = 'Lock'", (conn.info.backend_pid,)
        ).fetchone()[0]:
            return
        time.sleep(0.01)
    raise AssertionError("the submission never waited for the erasure")


@pytest.mark.parametrize("how", ["one", "batch"])
def test_a_submission_racing_an_erasure_does_not_keep_the_erased_address(db, connect, ready, how):
    """A known recipient's submission reads its addresses without a lock; an erasure that commits after that read but
    before the submission writes must not leave a delivery holding (and then sending to) the erased address."""
    email = "racer@example.com"
    call(db, "notify_api.upsert_recipient_v1(%s, 'racer', %s)", ready, Jsonb({"addresses": {"email": email}}))
    body = intent(recipient={"ref": "racer"}, channels=["email"])
    eraser = connect()
    eraser.execute("select notify_api.erase_recipient_v1(%s, 'racer')", (ready,))  # not committed yet
    submitter = connect(autocommit=True)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            if how == "one":
                outcome["out"] = submitter.execute(
                    "select response from notify_api.submit_notification_v1(%s, %s, 'race-1')", (ready, Jsonb(body))
                ).fetchone()[0]
            else:
                outcome["out"] = submitter.execute(
                    "select notify_api.submit_notifications_v1(%s, %s)",
                    (ready, Jsonb([{"idempotency_key": "race-1", "notification": body}])),
                ).fetchone()[0]
        except Exception as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_lock(db, submitter)
    eraser.commit()
    thread.join()
    assert "error" not in outcome, outcome
    held = db.execute(
        "select d.status, d.address from notify.notification_deliveries d join notify.recipients r on r.id = d.recipient_id"
        " where r.ref = 'racer'"
    ).fetchall()
    assert held == [("suppressed", None)], held


def test_an_erased_whatsapp_opt_out_stays_out_under_the_bsuid_meta_mapped_to_the_phone(db, ready):
    """The erased recipient had revoked WhatsApp and Meta had mapped its phone to a business-scoped user id. The same
    person addressed by that BSUID under another ref (a grant from before the erasure does not count) stays out."""
    bsuid, phone = "ES.83491208655302741918", "+34600111888"
    call(db, "notify_api.upsert_recipient_v1(%s, 'gone', %s)", ready, Jsonb({"addresses": {"whatsapp": phone}}))
    for ref, status in (("gone", "revoked"), ("again", "granted")):
        call(
            db,
            f"notify_api.record_consent_v1(%s, '{ref}', %s)",
            ready,
            Jsonb({"channel": "whatsapp", "status": status, "source": "form"}),
        )
    db.execute(
        "insert into notify.whatsapp_users (tenant_id, user_id, wa_id) values (%s, %s, %s)", (ready, bsuid, phone.lstrip("+"))
    )
    call(db, "notify_api.erase_recipient_v1(%s, 'gone')", ready)
    back, _ = submit(db, ready, intent(recipient={"ref": "again", "addresses": {"whatsapp": bsuid}}, channels=["whatsapp"]))
    assert [(d["status"], d.get("reason")) for d in back["deliveries"]] == [("suppressed", "no_consent")]
