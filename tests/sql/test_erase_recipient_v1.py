"""notify_api.erase_recipient_v1 and export_recipient_v1: erasure on request reaches every copy of a recipient's
personal data (checked over every table the catalog lists, so a table added later is covered), leaves content-free
history and a receipt; an erased recipient's opt-out survives as a keyed hash; an access request exports everything."""

from __future__ import annotations

import hashlib
import hmac

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, mock_message, record, result, submit
from tests.sql.callbacks import configure
from tests.sql.test_set_channel_provider_v1 import WA, set_provider

PHONE, EMAIL = "+34600111222", "Ana.Lopez@Example.com"
NEEDLES = (PHONE, PHONE.lstrip("+"), EMAIL.lower())
STATUS = (
    "select notify_api.ingest_webhook_v1(%s, %s, %s, "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r))"
)
INBOUND = (
    "select notify_api.ingest_webhook_v1('whatsapp_cloud', %s, %s, array[]::notify.status_event[], "
    "array(select r from jsonb_populate_recordset(null::notify.inbound_message, %s) r))"
)
TABLES = """
select c.oid::regclass::text from pg_class c
 where c.relnamespace in ('notify'::regnamespace, 'public'::regnamespace) and c.relkind in ('r', 'p')
   and not c.relispartition
 order by 1
"""


def holding(db: psycopg.Connection, needles=NEEDLES) -> dict[str, int]:
    """Every table of notify and public (from pg_catalog) whose rows, cast to text, mention one of the needles."""
    found = {}
    for (table,) in db.execute(TABLES).fetchall():
        n = db.execute(
            sql.SQL("select count(*) from {} t where {}").format(
                sql.SQL(table),
                sql.SQL(" or ").join(sql.SQL("strpos(lower(t::text), {}) > 0").format(sql.Literal(n.lower())) for n in needles),
            )
        ).fetchone()[0]
        if n:
            found[table] = n
    return found


def history(db, tenant):
    """Ana (runner-42) everywhere: consent with evidence, two sent deliveries with mock messages, provider webhooks
    (statuses and an inbound opt-out), a WhatsApp window, callbacks, a pending delivery; and Bo (runner-7), not erased."""
    set_provider(db, tenant, "whatsapp", {**WA, "settings": {**WA["settings"], "opt_out_keywords": ["BAJA"]}})
    configure(db, tenant)
    addresses = {"whatsapp": PHONE, "email": EMAIL}
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", tenant, Jsonb({"addresses": addresses}))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "email", "status": "granted", "source": "form", "evidence": {"typed": EMAIL, "phone": PHONE}}),
    )
    first, _ = submit(
        db, tenant, intent(recipient={"ref": "runner-42", "addresses": addresses}, variables={"name": "Ana", "event": PHONE})
    )
    submit(db, tenant, intent(recipient={"ref": "runner-7", "addresses": {"email": "bo@example.com"}}, channels=["email"]))
    rows = claim(db, "whatsapp") + claim(db, "email")
    db.execute("select notify_api.record_mock_messages_v1(%s)", (Jsonb([mock_message(r, i) for i, r in enumerate(rows)]),))
    record(db, *[result(r, "sent", provider_message_id=f"pm-{r[1]}") for r in rows])
    ana = [r for r in rows if r[4] in (PHONE, EMAIL)]
    events = [{"status": "delivered", "tenant_id": str(r[0]), "delivery_id": str(r[1])} for r in ana]
    db.execute(STATUS, ("mock", "st-1", Jsonb({"to": PHONE.lstrip("+"), "email": EMAIL}), Jsonb(events)))
    message = {"phone_number_id": "106540352242922", "sender": PHONE.lstrip("+"), "message_id": "wamid.1", "text": "BAJA"}
    out = db.execute(INBOUND, ("in-1", Jsonb({"from": PHONE.lstrip("+"), "text": "BAJA"}), Jsonb([message]))).fetchone()[0]
    assert out["outcomes"] == [{"inbound": "wamid.1", "outcome": "opted_out"}]
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "email", "status": "revoked", "source": "link"}),
    )
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        tenant,
        Jsonb({"channel": "email", "status": "granted", "source": "form"}),
    )
    pending, _ = submit(db, tenant, intent(recipient={"ref": "runner-42"}, channels=["email"], send_at="2100-01-01T00:00:00Z"))
    # the business-scoped user id Meta mapped to the phone (WhatsApp 2026)
    db.execute(
        "insert into notify.whatsapp_users (tenant_id, user_id, wa_id) values (%s, 'US.13491208655302741918', %s)",
        (tenant, PHONE.lstrip("+")),
    )
    return first, pending


def test_after_an_erasure_no_table_holds_the_address_or_the_phone(db, ready):
    first, pending = history(db, ready)
    before = holding(db)
    # the scan sees them: the tables the issue names, before
    for table in (
        "notify.recipient_addresses",
        "notify.notification_deliveries",
        "notify.notification_requests",
        "notify.recipient_consents",
        "notify.mock_messages",
        "notify.webhook_events",
        "notify.whatsapp_windows",
        "notify.whatsapp_users",
    ):
        assert table in before, (table, before)
    receipt = call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', 'api_key:k1')", ready)
    assert holding(db) == {}, holding(db)
    assert holding(db, ["bo@example.com"])  # another recipient's data stays
    assert receipt["ref"] == "runner-42" and receipt["erased_by"] == "api_key:k1" and receipt["in_flight"] == 0
    counts = receipt["rows_changed"]
    assert counts["cancelled_deliveries"] == 1 and counts["recipient_addresses"] == 2 and counts["mock_messages"] == 2
    assert counts["webhook_events"] == 2 and counts["whatsapp_windows"] == 1 and counts["notification_deliveries"] == 3
    assert receipt["suppressed"] == [{"channel": "whatsapp"}]  # the opt-out in force; e-mail was granted again
    # content-free history stays: the statuses, the cancellation recorded with its source, the erasure record
    shown = call(db, "notify_api.get_notification_v2(%s, %s)", ready, pending["id"])
    [d] = shown["deliveries"]
    assert d["status"] == "cancelled" and d["reason"] == "recipient_erased" and d["events"][-1]["source"] == "erasure"
    assert [x["status"] for x in call(db, "notify_api.get_notification_v2(%s, %s)", ready, first["id"])["deliveries"]] == [
        "delivered",
        "delivered",
    ]
    [(by, changed)] = db.execute("select erased_by, rows_changed from notify.recipient_erasures").fetchall()
    assert by == "api_key:k1" and changed == counts
    assert call(db, "notify_api.get_recipient_v1(%s, 'runner-42')", ready)["addresses"] == {}
    export = call(db, "notify_api.export_recipient_v1(%s, 'runner-42')", ready)
    assert len(export["erasures"]) == 1 and all("address" not in d for n in export["notifications"] for d in n["deliveries"])


def consent(db, tenant, ref, **entry):
    call(db, f"notify_api.record_consent_v1(%s, '{ref}', %s)", tenant, Jsonb({"source": "test", **entry}))


def test_an_erased_opt_out_stays_out_when_the_address_comes_back(db, ready):
    addresses = {"email": EMAIL, "whatsapp": PHONE, "sms": PHONE}
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"addresses": addresses}))
    consent(db, ready, "runner-42", channel="email", status="revoked")
    consent(db, ready, "runner-42", channel="whatsapp", status="revoked")  # after ready's grant
    consent(db, ready, "runner-42", channel="sms", status="granted")
    consent(db, ready, "runner-42", channel="sms", status="revoked", category="promo")
    consent(db, ready, "runner-99", channel="whatsapp", status="granted")  # runner-99's grant, from before the erasure
    receipt = call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', null)", ready)
    assert sorted(receipt["suppressed"], key=str) == sorted(
        [{"channel": "email"}, {"channel": "whatsapp"}, {"channel": "sms", "category": "promo"}], key=str
    )
    stored = db.execute("select octet_length(address_hash) from notify.address_suppressions").fetchall()
    assert stored == [(32,)] * 3 and not holding(db)  # keyed hashes only, no address in clear

    # The same addresses (the e-mail in another case) under another ref in a later submission: suppressed.
    back, _ = submit(db, ready, intent(recipient={"ref": "runner-99", "addresses": {"email": EMAIL.upper(), "whatsapp": PHONE}}))
    other, _ = submit(
        db, ready, intent(recipient={"ref": "runner-98", "addresses": {"email": "new@example.com"}}, channels=["email"])
    )
    assert [(d["channel"], d["status"], d.get("reason")) for d in back["deliveries"]] == [
        ("whatsapp", "suppressed", "no_consent"),
        ("email", "suppressed", "no_consent"),
    ]
    assert [d["status"] for d in other["deliveries"]] == ["queued"]
    # SMS: only the category it had revoked.
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-99', %s)", ready, Jsonb({"addresses": {"sms": PHONE}}))
    consent(db, ready, "runner-99", channel="sms", status="granted")
    promo, _ = submit(db, ready, intent(recipient={"ref": "runner-99"}, channels=["sms"], category="promo"))
    plain, _ = submit(db, ready, intent(recipient={"ref": "runner-99"}, channels=["sms"]))
    assert promo["deliveries"][0]["status"] == "queued"  # granted after the erasure: lifted for the promo category too
    assert plain["deliveries"][0]["status"] == "queued"
    # A grant recorded after the erasure by the person now using the address lifts it.
    consent(db, ready, "runner-99", channel="email", status="granted")
    again, _ = submit(db, ready, intent(recipient={"ref": "runner-99"}, channels=["email", "whatsapp"]))
    assert [d["status"] for d in again["deliveries"]] == ["queued", "suppressed"]
    assert call(db, "notify_api.list_consents_v1(%s, 'runner-99')", ready)["current"][0]["allowed"] is False  # whatsapp


def test_a_category_suppression_leaves_the_other_categories(db, ready):
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"addresses": {"email": EMAIL}}))
    consent(db, ready, "runner-42", channel="email", status="revoked", category="promo")
    call(db, "notify_api.erase_recipient_v1(%s, 'runner-42', null)", ready)
    promo, _ = submit(
        db, ready, intent(recipient={"ref": "runner-5", "addresses": {"email": EMAIL}}, channels=["email"], category="promo")
    )
    news, _ = submit(db, ready, intent(recipient={"ref": "runner-5"}, channels=["email"], category="news"))
    assert (promo["deliveries"][0]["status"], news["deliveries"][0]["status"]) == ("suppressed", "queued")


def test_the_keyed_hash_is_hmac_sha256_with_the_servers_key(db):
    inner, outer = db.execute("select inner_pad, outer_pad from notify.address_hash_key").fetchone()
    key = bytes(b ^ 0x36 for b in inner)
    assert bytes(b ^ 0x5C for b in key) == outer
    expected = hmac.new(key, b"email:ana.lopez@example.com", hashlib.sha256).digest()
    assert db.execute("select notify._address_hash('email', %s)", (EMAIL,)).fetchone()[0] == expected


def test_an_unknown_ref_is_404(db, ready):
    for fn in ("erase_recipient_v1(%s, 'nobody')", "export_recipient_v1(%s, 'nobody')"):
        with pytest.raises(psycopg.Error) as err:
            call(db, f"notify_api.{fn}", ready)
        assert err.value.sqlstate == "ND404"


def test_the_export_holds_everything(db, ready):
    first, _ = history(db, ready)
    export = call(db, "notify_api.export_recipient_v1(%s, 'runner-42')", ready)
    assert export["recipient"]["addresses"] == {"whatsapp": PHONE, "email": EMAIL}
    assert [e["evidence"] for e in export["consents"]["history"]][1] == {"typed": EMAIL, "phone": PHONE}
    assert any(e["source"] == "inbound_keyword" and e["evidence"] for e in export["consents"]["history"])
    ids = [n["id"] for n in export["notifications"]]
    assert first["id"] in ids and len(ids) == 2
    n = next(n for n in export["notifications"] if n["id"] == first["id"])
    assert n["variables"]["event"] == PHONE and {d["address"] for d in n["deliveries"]} == {PHONE, EMAIL}
    assert all(d["events"] for d in n["deliveries"]) and len(export["mock_messages"]) == 2
