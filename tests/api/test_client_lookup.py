"""dispatcher_client's find, deliveries pages, erase and export, through the app in process (its test transport)."""

from __future__ import annotations

from dispatcher_client import Client, Intent, Recipient
from tests.api.test_api import client, make_key  # noqa: F401  (fixture)


def test_the_client_finds_pages_erases_and_exports(client, db, ready):  # noqa: F811
    key, _ = make_key(db, ready)
    nd = Client("http://testserver", key, transport=client._transport)  # not closed: the test client owns the transport
    recipient = Recipient(ref="runner-42", addresses={"email": "ana@example.com", "whatsapp": "+34600111222"})
    made = [
        nd.submit(
            Intent(recipient=recipient, channels=["email"], template="event_reminder", variables={"name": "A", "event": "B"})
        ).id
        for _ in range(3)
    ]
    page = nd.find_notifications(recipient="runner-42", limit=2)
    rest = nd.find_notifications(recipient="runner-42", limit=2, cursor=page.next_cursor)
    assert [n.id for n in page.items + rest.items] == made[::-1] and rest.next_cursor is None
    shown = nd.get_notification(made[0])
    assert shown.summary[0].count == 1 and shown.deliveries[0].recipient == "runner-42"
    assert [d.id for d in nd.list_deliveries(made[0]).items] == [shown.deliveries[0].id]
    assert nd.export_recipient("runner-42")["recipient"]["addresses"]["email"] == "ana@example.com"
    receipt = nd.erase_recipient("runner-42")
    assert receipt.ref == "runner-42" and receipt.rows_changed["recipient_addresses"] == 2
    assert receipt.rows_changed["cancelled_deliveries"] == 3
    assert nd.get_recipient("runner-42").addresses == {}
    assert nd.set_unknown_deadline("whatsapp", 3600) == {"channel": "whatsapp", "after_seconds": 3600, "default": False}


def test_the_client_shows_a_templates_sms_cost_and_warnings(client, db, ready):  # noqa: F811
    """The API's answer to a template save carries, on its sms template, what the fixed text costs and warnings; the
    client's Template model keeps them (it dropped them before)."""
    key, _ = make_key(db, ready)
    nd = Client("http://testserver", key, transport=client._transport)
    saved = nd.upsert_template("sms_cost", {"sms": {"text": "Hola {{name}}, tu dorsal está listo ☕" + " más texto" * 10}})
    [sms] = [t for t in saved if t.channel == "sms"]
    assert sms.sms is not None and sms.sms["encoding"] == "UCS-2" and sms.sms["segments"] == 2
    assert {w["code"] for w in sms.warnings or []} == {"sms_ucs2", "sms_segments"}
    assert all(w["message"] for w in sms.warnings or [])
    plain = nd.upsert_template("sms_plain", {"sms": {"text": "Hola {{name}}"}})
    assert [(t.sms["segments"] if t.sms else None, t.warnings) for t in plain] == [(1, [])]
