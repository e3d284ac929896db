"""Frequency caps and WhatsApp's pair rate limit (sql/077_api_policies.sql), applied by claim_deliveries_v1: over a cap
a delivery is suppressed (or held until the cap frees); caps hold across concurrent claims (two scripted connections);
whatsapp_cloud deliveries to one user are 6 seconds apart; the ledger is written only where something counts it."""

from __future__ import annotations

import threading
import time

from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, record, result, submit
from tests.sql.test_set_channel_provider_v1 import WA, set_provider


def set_caps(db, tenant, *caps):
    return call(db, "notify_api.set_frequency_caps_v1(%s, %s)", tenant, Jsonb({"caps": list(caps)}))


def delivery(db, delivery_id):
    return db.execute(
        "select status::text, reason, due_at, attempt from notify.notification_deliveries where id = %s", (delivery_id,)
    ).fetchone()


def move_sends_back(db, by):
    """The clock moved on: every recorded send is `by` older."""
    db.execute(
        "update notify.policy_sends set first_sent_at = first_sent_at - %s::interval, last_sent_at = last_sent_at - %s::interval",
        (by, by),
    )


def send_email(db, tenant, n=1, **extra):
    ids = []
    for _ in range(n):
        response, _ = submit(db, tenant, intent(channels=["email"], **extra))
        ids.append(response["deliveries"][0]["id"])
    return ids


def test_over_a_cap_is_suppressed_with_reason_frequency_cap(db, ready):
    set_caps(db, ready, {"max": 3, "period": "P1D"})
    ids = send_email(db, ready, 5)
    rows = claim(db, "email")
    assert sorted(str(r[1]) for r in rows) == sorted(ids[:3])
    assert [delivery(db, d)[:2] for d in ids[3:]] == [("suppressed", "frequency_cap")] * 2
    event = db.execute(
        "select to_status::text, reason from notify.delivery_events where delivery_id = %s order by seq desc limit 1", (ids[4],)
    ).fetchone()
    assert event == ("suppressed", "frequency_cap")


def test_sends_in_earlier_claims_count(db, ready):
    set_caps(db, ready, {"max": 2, "period": "PT1H"})
    send_email(db, ready, 2)
    assert len(claim(db, "email")) == 2
    [third] = send_email(db, ready)
    assert claim(db, "email") == []
    assert delivery(db, third)[:2] == ("suppressed", "frequency_cap")
    # Out of the period (the sends moved back two hours), the cap is free again.
    move_sends_back(db, "2 hours")
    [fourth] = send_email(db, ready)
    assert [str(r[1]) for r in claim(db, "email")] == [fourth]


def test_a_cap_per_channel_and_category_counts_only_those(db, ready):
    set_caps(db, ready, {"max": 1, "period": "P1D", "channel": "email", "category": "reminder"})
    reminders = send_email(db, ready, 2, category="reminder")
    others = send_email(db, ready, 2, category="news")
    rows = claim(db, "email")
    sent = {str(r[1]) for r in rows}
    assert sent == {reminders[0], *others}
    assert delivery(db, reminders[1])[:2] == ("suppressed", "frequency_cap")
    # WhatsApp is not counted by an e-mail cap.
    submit(db, ready, intent(channels=["whatsapp"], category="reminder"))
    assert len(claim(db, "whatsapp")) == 1


def test_a_holding_cap_holds_until_the_cap_frees(db, ready):
    set_caps(db, ready, {"max": 1, "period": "PT1H", "action": "hold"})
    first, second = send_email(db, ready, 2)
    assert [str(r[1]) for r in claim(db, "email")] == [first]
    status, reason, due_at, _ = delivery(db, second)
    frees = call(db, "(select first_sent_at + interval '1 hour' from notify.policy_sends where delivery_id = %s)", first)
    assert (status, reason, due_at) == ("held", "frequency_cap", frees)
    # Past its expiry the hold would end too late: expired instead.
    [third] = send_email(db, ready)
    db.execute("update notify.notification_deliveries set expires_at = now() + interval '10 minutes' where id = %s", (third,))
    assert claim(db, "email") == []
    assert delivery(db, third)[:2] == ("expired", "frequency_cap_past_expiry")
    # When the first send leaves the period, the held one is sent.
    move_sends_back(db, "2 hours")
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (second,))
    assert [str(r[1]) for r in claim(db, "email")] == [second]


def test_a_retry_is_not_counted_again(db, ready):
    set_caps(db, ready, {"max": 1, "period": "P1D"})
    [d] = send_email(db, ready)
    [row] = claim(db, "email")
    record(db, result(row, "retry"))
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (d,))
    [again] = claim(db, "email")
    assert str(again[1]) == d and again[2] == 2
    assert call(db, "(select count(*) from notify.policy_sends)") == 1


def test_decision_reports_the_cap_and_its_count(db, ready):
    set_caps(db, ready, {"max": 2, "period": "P1D", "channel": "email"})
    send_email(db, ready, 2)
    claim(db, "email")
    rid = call(db, "notify._recipient_id(%s, 'runner-42')", ready)
    row = db.execute(
        "select decision, reason, until, detail from notify._policy_decision(%s, %s, 'email', null, 'mock', null, null, now())",
        (ready, rid),
    ).fetchone()
    assert row[:3] == ("suppress", "frequency_cap", None)
    assert row[3] == {"cap": {"max": 2, "period": "P1D", "count": 2, "channel": "email", "category": None, "action": "suppress"}}


def test_no_ledger_without_caps(db, ready):
    send_email(db, ready, 3)
    assert len(claim(db, "email")) == 3
    assert call(db, "(select count(*) from notify.policy_sends)") == 0


def test_two_workers_claiming_the_fourth_and_fifth_send_at_most_one(db, ready, connect):
    """Worker A claims the 4th reminder and keeps its transaction open; worker B claims the 5th meanwhile: B waits for
    A's per-recipient lock, then counts A's send and suppresses the 5th."""
    set_caps(db, ready, {"max": 4, "period": "P1D"})
    send_email(db, ready, 3)
    assert len(claim(db, "email")) == 3
    fourth, fifth = send_email(db, ready, 2)
    a, b = connect(), connect()
    rows_a = claim(a, "email", limit=1)  # A: the 4th, sending; transaction open (its advisory lock held)
    assert [str(r[1]) for r in rows_a] == [fourth]
    b_pid = b.info.backend_pid
    out: dict[str, object] = {}

    def worker_b() -> None:
        try:
            out["rows"] = claim(b, "email", limit=10)  # skips A's locked row, takes the 5th
            b.commit()
        except Exception as exc:  # pragma: no cover - reported below
            out["error"] = exc

    thread = threading.Thread(target=worker_b)
    thread.start()
    # B is waiting for A's lock (not done, and Postgres says it waits on a lock).
    deadline = time.monotonic() + 10
    while call(db, "(select wait_event_type from pg_stat_activity where pid = %s)", b_pid) != "Lock":
        assert time.monotonic() < deadline, "B did not wait for A's lock"
        time.sleep(0.02)
    assert thread.is_alive()
    a.commit()
    thread.join(10)
    assert "error" not in out
    assert out["rows"] == []
    assert delivery(db, fourth)[0] == "sending"
    assert delivery(db, fifth)[:2] == ("suppressed", "frequency_cap")


def test_the_race_the_other_way_round_also_sends_one(db, ready, connect):
    """A claims both the 4th and the 5th in one batch: only the 4th is sent (the ledger row of the first counts)."""
    set_caps(db, ready, {"max": 4, "period": "P1D"})
    send_email(db, ready, 3)
    claim(db, "email")
    fourth, fifth = send_email(db, ready, 2)
    rows = claim(db, "email")
    assert [str(r[1]) for r in rows] == [fourth]
    assert delivery(db, fifth)[:2] == ("suppressed", "frequency_cap")


def whatsapp_ready(db, tenant):
    set_provider(db, tenant, "whatsapp", WA)


def test_whatsapp_pair_rate_limit_holds_the_next_message_six_seconds(db, ready):
    whatsapp_ready(db, ready)
    ids = []
    for _ in range(2):
        response, _ = submit(db, ready, intent(channels=["whatsapp"]))
        ids.append(response["deliveries"][0]["id"])
    rows = claim(db, "whatsapp")
    assert [str(r[1]) for r in rows] == [ids[0]] and rows[0][11] == "whatsapp_cloud"
    status, reason, due_at, _ = delivery(db, ids[1])
    last = call(db, "(select last_sent_at from notify.policy_sends where delivery_id = %s)", ids[0])
    assert (status, reason) == ("held", "pair_rate_limit")
    assert (due_at - last).total_seconds() == 6
    # Six seconds later (the first send moved back), the held one goes.
    move_sends_back(db, "7 seconds")
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (ids[1],))
    assert [str(r[1]) for r in claim(db, "whatsapp")] == [ids[1]]


def test_the_pair_rate_limit_is_for_whatsapp_cloud_only(db, ready):
    # The mock provider has no such limit: both are sent, and nothing is written.
    for _ in range(2):
        submit(db, ready, intent(channels=["whatsapp"]))
    assert len(claim(db, "whatsapp")) == 2
    assert call(db, "(select count(*) from notify.policy_sends)") == 0


def test_maintenance_prunes_the_ledger_past_the_longest_period(db, ready):
    set_caps(db, ready, {"max": 10, "period": "PT1H"}, {"max": 20, "period": "P1D"})
    send_email(db, ready, 2)
    claim(db, "email")
    db.execute(
        "update notify.policy_sends set first_sent_at = now() - interval '2 hours', last_sent_at = now() - interval '2 hours'"
    )
    assert call(db, "notify_api.run_maintenance_v1()")["policy_sends_pruned"] == 0
    db.execute(
        "update notify.policy_sends set first_sent_at = now() - interval '25 hours', last_sent_at = now() - interval '25 hours'"
    )
    assert call(db, "notify_api.run_maintenance_v1()")["policy_sends_pruned"] == 2
    assert call(db, "(select count(*) from notify.policy_sends)") == 0


def test_a_cap_is_checked_again_for_other_statuses_untouched(db, ready):
    """Consent still wins first: a revoked recipient is suppressed for no_consent, not counted."""
    set_caps(db, ready, {"max": 1, "period": "P1D"})
    response, _ = submit(db, ready, intent(channels=["whatsapp"]))
    call(
        db,
        "notify_api.record_consent_v1(%s, 'runner-42', %s)",
        ready,
        Jsonb({"channel": "whatsapp", "status": "revoked", "source": "reply_stop"}),
    )
    assert claim(db, "whatsapp") == []
    assert delivery(db, response["deliveries"][0]["id"])[:2] == ("suppressed", "no_consent")
    assert call(db, "(select count(*) from notify.policy_sends)") == 0


def test_a_route_step_is_not_capped_by_its_own_earlier_step(db, ready):
    """A route is one message to the person ("WhatsApp, else e-mail"): its failed first step must not use up the cap
    that its fallback is then suppressed by (1 reminder a day: the WhatsApp fails, the e-mail must still go out)."""
    from tests.sql.test_route_progress import routed, steps

    set_caps(db, ready, {"max": 1, "period": "P1D"})
    routed_request = routed(db, ready)
    [step_1] = claim(db, "whatsapp")
    record(db, result(step_1, "failed", error_code="131026"))
    [step_2] = claim(db, "email")
    assert [s[:2] for s in steps(db, routed_request["id"])] == [(1, "failed"), (2, "sending")]
    # ... and the route counts: the next reminder that day is over the cap.
    record(db, result(step_2, "sent"))
    [other] = send_email(db, ready)
    assert claim(db, "email") == []
    assert delivery(db, other)[:2] == ("suppressed", "frequency_cap")


def test_many_caps_read_a_recipients_sends_once(db, ready):
    """The claim serves every tenant's rows in one statement: a tenant's 20 caps over a recipient's sends must not
    read them 40 times per delivery (20 caps over 10,000 sends made a claim of 100 deliveries take seconds, holding up
    other tenants' rows in the same batch). Counted as index scans of the ledger in this transaction, not timed."""
    set_caps(db, ready, *({"max": 10000, "period": f"PT{i + 1}H", "action": "hold" if i % 2 else "suppress"} for i in range(20)))
    [delivery_id] = send_email(db, ready)
    recipient = db.execute("select recipient_id from notify.notification_deliveries where id = %s", (delivery_id,)).fetchone()[0]
    db.execute(
        "insert into notify.policy_sends select %s, gen_random_uuid(), %s, 'email', null, now() - i * interval '1 second',"
        " now() - i * interval '1 second' from generate_series(1, 50) i",
        (ready, recipient),
    )
    scans = "select pg_stat_get_xact_numscans('notify.policy_sends_pkey'::regclass)"
    before = db.execute(scans).fetchone()[0]
    decision = db.execute(
        "select decision, detail from notify._policy_decision(%s, %s, 'email', null, 'mock', null, null, now())",
        (ready, recipient),
    ).fetchone()
    assert decision == ("send", {})
    assert db.execute(scans).fetchone()[0] - before <= 1


def test_a_claim_whose_transaction_began_first_still_counts_a_send_committed_meanwhile(db, ready, connect):
    """Worker B's transaction began (its now()) before worker A's; A claims the 4th reminder and commits first, then B
    claims the 5th. B must count A's send although A's claim time is later than B's now(): the 5th is suppressed
    (it was sent: the cap counted only sends up to B's transaction start)."""
    set_caps(db, ready, {"max": 4, "period": "P1D"})
    send_email(db, ready, 3)
    assert len(claim(db, "email")) == 3
    fourth, fifth = send_email(db, ready, 2)
    db.commit()
    a, b = connect(), connect()
    b.execute("select now()")  # B's transaction (and its now()) begins first
    time.sleep(0.01)
    assert [str(r[1]) for r in claim(a, "email", limit=1)] == [fourth]
    a.commit()
    assert claim(b, "email", limit=10) == []
    b.commit()
    assert delivery(db, fifth)[:2] == ("suppressed", "frequency_cap")


def test_the_pair_rate_limit_counts_a_send_committed_after_the_claims_transaction_began(db, ready, connect):
    """The same for WhatsApp's pair limit: B, whose transaction began first, must not send a second message to the
    user right after A's (error 131056): it is held for 6 seconds after A's send."""
    whatsapp_ready(db, ready)
    first, second = (submit(db, ready, intent(channels=["whatsapp"]))[0]["deliveries"][0]["id"] for _ in range(2))
    db.commit()
    a, b = connect(), connect()
    b.execute("select now()")
    time.sleep(0.01)
    assert [str(r[1]) for r in claim(a, "whatsapp", limit=1)] == [first]
    a.commit()
    assert claim(b, "whatsapp", limit=10) == []
    b.commit()
    assert delivery(db, second)[:2] == ("held", "pair_rate_limit")
