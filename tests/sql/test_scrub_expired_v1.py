"""notify_api.scrub_expired_v1: past its tenant's (and channel's) content period, a delivery that is done with loses its
personal data and content in bounded batches; its content-free history stays."""

from __future__ import annotations

from psycopg.types.json import Jsonb

from tests.conftest import REMINDER, call, claim, intent, mock_message, record, result, submit


def sent_notification(db, tenant: str, ref: str = "runner-42") -> str:
    """A notification on WhatsApp and e-mail, claimed, "sent" by the mock provider and recorded as sent."""
    body = intent(recipient={"ref": ref, "addresses": {"whatsapp": "+34600111222", "email": "ana@example.com"}, "locale": "en"})
    call(
        db,
        "notify_api.record_consent_v1(%s, %s, %s)",
        tenant,
        ref,
        Jsonb({"channel": "whatsapp", "status": "granted", "source": "t"}),
    )
    response, _ = submit(db, tenant, body)
    rows = claim(db, "whatsapp") + claim(db, "email")
    assert len(rows) == 2
    call(db, "notify_api.record_mock_messages_v1(%s)", Jsonb([mock_message(r, n) for n, r in enumerate(rows)]))
    record(db, *(result(r, "sent", provider_message_id=f"pm-{r[1]}") for r in rows))
    return response["id"]


def age(db, tenant: str, days: int) -> None:
    """Moves a tenant's deliveries and mock messages `days` into the past (as if submitted then)."""
    db.execute(
        "update notify.notification_deliveries set created_at = created_at - make_interval(days => %s) where tenant_id = %s",
        (days, tenant),
    )
    db.execute(
        "update notify.mock_messages set sent_at = sent_at - make_interval(days => %s) where tenant_id = %s", (days, tenant)
    )


def content(db, notification_id: str) -> list[tuple]:
    return db.execute(
        """select d.channel::text, d.status::text, d.address, d.variables, r.variables,
                  (select count(*) from notify.delivery_events e where e.tenant_id = d.tenant_id and e.delivery_id = d.id),
                  (select count(*) from notify.delivery_attempts a where a.tenant_id = d.tenant_id and a.delivery_id = d.id),
                  (select count(*) from notify.mock_messages m where m.tenant_id = d.tenant_id and m.delivery_id = d.id)
             from notify.notification_deliveries d
             join notify.notification_requests r on r.tenant_id = d.tenant_id and r.id = d.request_id
            where d.request_id = %s order by 1""",
        (notification_id,),
    ).fetchall()


def test_past_the_period_personal_data_goes_and_history_stays(db, ready):
    old = sent_notification(db, ready)
    age(db, ready, 31)
    fresh = sent_notification(db, ready, "runner-43")
    before = content(db, old)
    assert [r[2] for r in before] == ["ana@example.com", "+34600111222"] and before[0][4] == {"name": "Ana", "event": "Long run"}

    done = call(db, "notify_api.scrub_expired_v1(1000)")
    assert done == {
        "deliveries": 2,
        "requests": 1,
        "mock_messages": 2,
        "callback_messages": 0,
        "webhook_event_keys": 0,
        "more": False,
    }
    after = content(db, old)
    # Address, variables and the rendered mock messages are gone; status, events and attempts are untouched.
    assert [(r[0], r[1], r[2], r[3], r[4], r[7]) for r in after] == [
        ("email", "sent", None, None, {}, 0),
        ("whatsapp", "sent", None, None, {}, 0),
    ]
    assert [(r[5], r[6]) for r in after] == [(r[5], r[6]) for r in before] and all(r[5] >= 3 for r in after)
    # The notification still reads back (content-free), and the recent one keeps everything.
    assert {d["status"] for d in call(db, "notify_api.get_notification_v1(%s, %s)", ready, old)["deliveries"]} == {"sent"}
    assert [r[2] for r in content(db, fresh)] == ["ana@example.com", "+34600111222"]
    assert call(db, "notify_api.scrub_expired_v1(1000)")["deliveries"] == 0  # nothing twice


def test_each_tenant_and_channel_has_its_own_period(db, ready):
    call(
        db,
        "notify_api.set_retention_v1(%s, %s)",
        ready,
        Jsonb({"content_days": 60, "channels": {"whatsapp": {"content_days": 7}}}),
    )
    mine = sent_notification(db, ready)
    other = str(call(db, "notify_api.create_tenant_v1('other')")["id"])
    call(db, "notify_api.upsert_template_v1(%s, 'event_reminder', %s)", other, Jsonb(REMINDER))
    theirs = sent_notification(db, other)
    age(db, ready, 10)
    age(db, other, 10)
    call(db, "notify_api.scrub_expired_v1(1000)")
    # acme: whatsapp (7 days) scrubbed, e-mail (60 days) kept; other (default 30 days): everything kept.
    assert [(r[0], r[2]) for r in content(db, mine)] == [("email", "ana@example.com"), ("whatsapp", None)]
    assert content(db, mine)[0][4] != {}  # the request's variables stay while a delivery still holds content
    assert [r[2] for r in content(db, theirs)] == ["ana@example.com", "+34600111222"]


def test_waiting_deliveries_are_never_scrubbed_and_batches_are_bounded(db, ready):
    for i in range(3):
        submit(db, ready, intent(recipient={"ref": f"r-{i}", "addresses": {"email": f"r{i}@example.com"}}, channels=["email"]))
    rows = claim(db, "email", limit=2)
    record(db, *(result(r, "sent") for r in rows))
    age(db, ready, 40)
    first = call(db, "notify_api.scrub_expired_v1(1)")
    assert (first["deliveries"], first["more"]) == (1, True)
    assert call(db, "notify_api.scrub_expired_v1(10)")["deliveries"] == 1
    left = db.execute(
        "select status::text, address from notify.notification_deliveries where tenant_id = %s and address is not null", (ready,)
    ).fetchall()
    assert left == [("queued", left[0][1])]  # the one still waiting keeps its address


def test_old_webhook_keys_and_finished_callback_messages_are_deleted(db, ready):
    """Webhook payloads go by whole days (run_retention_v1); their deduplication keys are deleted here, past the
    shortest content period of any tenant."""
    db.execute(
        "insert into notify.webhook_event_keys (provider, event_key, received_at) values "
        "('mock', 'old', now() - interval '31 days'), ('mock', 'new', now())"
    )
    nid = sent_notification(db, ready)
    db.execute(
        """insert into notify.callback_messages (tenant_id, notification_id, delivery_id, seq, url, payload, status, created_at)
           select d.tenant_id, d.request_id, d.id, 9, 'https://example.com/cb', '{}', v.s, now() - interval '31 days'
             from notify.notification_deliveries d
             join (values ('email', 'delivered'), ('whatsapp', 'pending')) v(c, s) on v.c = d.channel::text
            where d.request_id = %s""",
        (nid,),
    )
    done = call(db, "notify_api.scrub_expired_v1(1000)")
    assert (done["webhook_event_keys"], done["callback_messages"]) == (1, 1)
    assert [r[0] for r in db.execute("select event_key from notify.webhook_event_keys")] == ["new"]
    assert [r[0] for r in db.execute("select status from notify.callback_messages where seq = 9")] == ["pending"]


def test_a_request_that_sends_nothing_keeps_no_variables(db, ready):
    """Every delivery suppressed at submit (no address, no consent): nothing will ever be sent, so neither the request
    nor its deliveries keep the variables (retention finds content only where it is held: these would have stayed)."""
    lone = {"ref": "runner-9", "addresses": {}}
    single, _ = submit(db, ready, intent(recipient=lone, variables={"name": "Zoe", "event": "Night run"}))
    fanout, _ = submit(
        db,
        ready,
        {
            "recipients": [{"ref": "runner-9", "variables": {"name": "Zoe"}}, {"ref": "runner-10", "variables": {"name": "Yan"}}],
            "channels": ["whatsapp"],
            "template": "event_reminder",
            "variables": {"event": "Night run"},
        },
    )
    batch = call(
        db,
        "notify_api.submit_notifications_v1(%s, %s)",
        ready,
        Jsonb([{"notification": intent(recipient=lone, channels=["email"], variables={"name": "Zoe", "event": "Night run"})}]),
    )
    ids = [single["id"], fanout["id"], batch["items"][0]["body"]["id"]]
    assert [single["status"], fanout["status"], batch["items"][0]["body"]["status"]] == ["suppressed"] * 3
    rows = db.execute(
        "select r.variables, array_agg(d.variables is null) from notify.notification_requests r"
        " join notify.notification_deliveries d on d.request_id = r.id where r.id = any(%s::uuid[]) group by r.id, r.variables",
        (ids,),
    ).fetchall()
    assert rows and all(v == {} and all(nulls) for v, nulls in rows), rows
    # One delivery that will be sent keeps them, as before.
    sent, _ = submit(db, ready, intent(channels=["email"], variables={"name": "Ana", "event": "Long run"}))
    assert db.execute("select variables from notify.notification_requests where id = %s", (sent["id"],)).fetchone()[0] != {}
