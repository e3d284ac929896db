"""Quiet hours (sql/077_api_policies.sql): the window as a function of any instant (midnight, daylight saving), the
decision notify._policy_decision gives, and what claim_deliveries_v1 does with it (held until they end, expired past
expires_at, exempt categories sent at once, retries too)."""

from __future__ import annotations

import datetime as dt

import pytest
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, submit

UTC = dt.timezone.utc


def end(db, start, finish, tz, at):
    return call(db, "notify._quiet_hours_end(%s::time, %s::time, %s, %s::timestamptz)", start, finish, tz, at)


def t(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        ("2026-06-10T19:00:00Z", t("2026-06-11T06:00:00Z")),  # 21:00 CEST: the window starts, ends 08:00 tomorrow
        ("2026-06-10T21:59:00Z", t("2026-06-11T06:00:00Z")),  # 23:59 local
        ("2026-06-10T22:00:00Z", t("2026-06-11T06:00:00Z")),  # 00:00 local: past midnight, same window
        ("2026-06-11T05:59:00Z", t("2026-06-11T06:00:00Z")),  # 07:59 local
        ("2026-06-11T06:00:00Z", None),  # 08:00 local: the window has ended
        ("2026-06-10T18:59:00Z", None),  # 20:59 local
        ("2026-06-10T12:00:00Z", None),
    ],
)
def test_a_window_crossing_midnight(db, at, expected):
    assert end(db, "21:00", "08:00", "Europe/Madrid", at) == expected


def test_a_window_within_one_day(db):
    assert end(db, "12:00", "14:00", "UTC", "2026-06-10T13:00:00Z") == t("2026-06-10T14:00:00Z")
    assert end(db, "12:00", "14:00", "UTC", "2026-06-10T14:00:00Z") is None
    assert end(db, "12:00", "14:00", "UTC", "2026-06-10T11:59:59Z") is None


def test_daylight_saving_starts_inside_the_window(db):
    # Europe/Madrid, 2026-03-29: 02:00 CET becomes 03:00 CEST. 23:30 CET on the 28th; 08:00 CEST is 06:00 UTC.
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-03-28T22:30:00Z") == t("2026-03-29T06:00:00Z")
    # 01:30 CET, 02:30 does not exist; the window still ends at 08:00 local (06:00 UTC), one hour sooner than the day before.
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-03-29T00:30:00Z") == t("2026-03-29T06:00:00Z")
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-03-28T00:30:00Z") == t("2026-03-28T07:00:00Z")


def test_daylight_saving_ends_inside_the_window(db):
    # Europe/Madrid, 2026-10-25: 03:00 CEST becomes 02:00 CET. 23:30 CEST on the 24th; 08:00 CET is 07:00 UTC.
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-10-24T21:30:00Z") == t("2026-10-25T07:00:00Z")
    # Both 02:30s (00:30 UTC in CEST, 01:30 UTC in CET) are inside it and end at the same instant.
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-10-25T00:30:00Z") == t("2026-10-25T07:00:00Z")
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-10-25T01:30:00Z") == t("2026-10-25T07:00:00Z")
    # The first evening after the change: 21:00 CET is 20:00 UTC.
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-10-25T19:59:00Z") is None
    assert end(db, "21:00", "08:00", "Europe/Madrid", "2026-10-25T20:00:00Z") == t("2026-10-26T07:00:00Z")


def set_quiet(db, tenant, body):
    return call(db, "notify_api.set_quiet_hours_v1(%s, %s)", tenant, Jsonb(body))


def recipient_id(db, tenant, ref="runner-42"):
    return call(db, "notify._recipient_id(%s, %s)", tenant, ref)


def decision(db, tenant, rid, at, category=None, channel="email", provider="mock", expires=None):
    return db.execute(
        "select decision, reason, until, detail from notify._policy_decision(%s, %s, %s, %s, %s, null, %s, %s)",
        (tenant, rid, channel, category, provider, expires, at),
    ).fetchone()


def test_decision_uses_the_recipients_time_zone_else_the_tenants_else_utc(db, ready):
    submit(db, ready, intent(channels=["email"]))
    rid = recipient_id(db, ready)
    set_quiet(db, ready, {"start": "21:00", "end": "08:00"})
    # No time zone anywhere: UTC. 22:00 UTC is inside.
    assert decision(db, ready, rid, "2026-06-10T22:00:00Z")[:3] == ("hold", "quiet_hours", t("2026-06-11T08:00:00Z"))
    # The tenant's default: 22:00 UTC is 00:00 in Madrid, the window ends 08:00 Madrid (06:00 UTC).
    set_quiet(db, ready, {"timezone": "Europe/Madrid", "start": "21:00", "end": "08:00"})
    d = decision(db, ready, rid, "2026-06-10T22:00:00Z")
    assert d[:3] == ("hold", "quiet_hours", t("2026-06-11T06:00:00Z"))
    assert d[3] == {"quiet_hours": {"start": "21:00", "end": "08:00", "timezone": "Europe/Madrid", "category": None}}
    # The recipient's own wins: 22:00 UTC is 18:00 in New York (summer), outside.
    call(db, "notify_api.upsert_recipient_v1(%s, 'runner-42', %s)", ready, Jsonb({"timezone": "America/New_York"}))
    assert decision(db, ready, rid, "2026-06-10T22:00:00Z")[:2] == ("send", None)
    assert decision(db, ready, rid, "2026-06-11T02:00:00Z")[:3] == ("hold", "quiet_hours", t("2026-06-11T12:00:00Z"))


def test_category_windows_and_exempt_categories(db, ready):
    submit(db, ready, intent(channels=["email"]))
    rid = recipient_id(db, ready)
    set_quiet(
        db,
        ready,
        {
            "start": "21:00",
            "end": "08:00",
            "categories": {"reminder": {"start": "20:00", "end": "10:00"}, "password_reset": {"exempt": True}},
        },
    )
    at = "2026-06-10T08:30:00Z"  # 08:30 UTC: after the default window, inside the reminders'
    assert decision(db, ready, rid, at)[:2] == ("send", None)
    assert decision(db, ready, rid, at, category="other")[:2] == ("send", None)
    held = decision(db, ready, rid, at, category="reminder")
    assert held[:3] == ("hold", "quiet_hours", t("2026-06-10T10:00:00Z")) and held[3]["quiet_hours"]["category"] == "reminder"
    night = "2026-06-10T23:00:00Z"
    assert decision(db, ready, rid, night, category="other")[:2] == ("hold", "quiet_hours")
    assert decision(db, ready, rid, night, category="password_reset")[:2] == ("send", None)


def test_decision_expires_when_the_window_ends_after_expires_at(db, ready):
    submit(db, ready, intent(channels=["email"]))
    rid = recipient_id(db, ready)
    set_quiet(db, ready, {"start": "21:00", "end": "08:00"})
    d = decision(db, ready, rid, "2026-06-10T22:00:00Z", expires="2026-06-11T07:00:00Z")
    assert d[:3] == ("expire", "quiet_hours_past_expiry", t("2026-06-11T08:00:00Z"))
    assert decision(db, ready, rid, "2026-06-10T22:00:00Z", expires="2026-06-11T08:00:00Z")[0] == "hold"


def test_decision_writes_nothing_and_without_policies_says_send(db, ready):
    submit(db, ready, intent(channels=["email"]))
    rid = recipient_id(db, ready)
    assert decision(db, ready, rid, "2026-06-10T22:00:00Z") == ("send", None, None, {})
    volatility = call(db, "(select provolatile from pg_proc where oid = 'notify._policy_decision'::regproc)")
    assert volatility == "s"


def window_around_now(db, before="1 hour", after="1 hour"):
    """Quiet hours in UTC that contain now() (HH:MM), and when they end."""
    start, finish = db.execute(
        f"select to_char(now() at time zone 'UTC' - interval '{before}', 'HH24:MI'),"
        f" to_char(now() at time zone 'UTC' + interval '{after}', 'HH24:MI')"
    ).fetchone()
    return start, finish, call(db, "notify._quiet_hours_end(%s::time, %s::time, 'UTC', now())", start, finish)


def delivery(db, delivery_id):
    return db.execute(
        "select status::text, reason, due_at, attempt from notify.notification_deliveries where id = %s", (delivery_id,)
    ).fetchone()


def test_claim_holds_a_delivery_due_in_quiet_hours_until_they_end(db, ready):
    start, finish, ends = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish})
    response, _ = submit(db, ready, intent(channels=["email"]))
    d = response["deliveries"][0]["id"]
    assert claim(db, "email") == []
    status, reason, due_at, attempt = delivery(db, d)
    assert (status, reason, due_at, attempt) == ("held", "quiet_hours", ends, 0)
    # The history says so.
    event = db.execute(
        "select to_status::text, reason, source from notify.delivery_events where delivery_id = %s order by seq desc limit 1",
        (d,),
    ).fetchone()
    assert event == ("held", "quiet_hours", "claim")
    # The worker is woken when they end (a dispatch job at that second).
    lock = "dispatch:email:%d" % call(db, "ceil(extract(epoch from %s::timestamptz))::bigint", ends)
    assert call(db, "(select count(*) from procrastinate_jobs where queueing_lock = %s and status = 'todo')", lock) == 1
    # Not due again before the window ends; when it has (due_at moved to the past, the window with it), it is sent.
    assert claim(db, "email") == []
    call(db, "notify_api.delete_quiet_hours_v1(%s)", ready)
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (d,))
    rows = claim(db, "email")
    assert [str(r[1]) for r in rows] == [d] and delivery(db, d)[0] == "sending"


def test_claim_expires_a_delivery_whose_quiet_hours_end_after_its_deadline(db, ready):
    start, finish, ends = window_around_now(db, after="2 hours")
    set_quiet(db, ready, {"start": start, "end": finish})
    response, _ = submit(db, ready, intent(channels=["email"]))
    d = response["deliveries"][0]["id"]
    db.execute("update notify.notification_deliveries set expires_at = now() + interval '30 minutes' where id = %s", (d,))
    assert claim(db, "email") == []
    assert delivery(db, d)[:2] == ("expired", "quiet_hours_past_expiry")


def test_claim_sends_an_exempt_category_at_once(db, ready):
    start, finish, _ = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish, "categories": {"password_reset": {"exempt": True}}})
    exempt, _ = submit(db, ready, intent(channels=["email"], category="password_reset"))
    other, _ = submit(db, ready, intent(channels=["email"], category="reminder"))
    rows = claim(db, "email")
    assert [str(r[1]) for r in rows] == [exempt["deliveries"][0]["id"]]
    assert delivery(db, other["deliveries"][0]["id"])[:2] == ("held", "quiet_hours")


def test_a_retry_falling_due_in_quiet_hours_is_held(db, ready):
    response, _ = submit(db, ready, intent(channels=["email"]))
    d = response["deliveries"][0]["id"]
    [row] = claim(db, "email")
    from tests.conftest import record, result

    record(db, result(row, "retry"))
    assert delivery(db, d)[0] == "queued"
    start, finish, ends = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish})
    db.execute("update notify.notification_deliveries set due_at = now() where id = %s", (d,))
    assert claim(db, "email") == []
    assert delivery(db, d) == ("held", "quiet_hours", ends, 1)


def test_another_tenants_quiet_hours_change_nothing(db, ready):
    other = call(db, "notify_api.create_tenant_v1('other')")["id"]
    start, finish, _ = window_around_now(db)
    set_quiet(db, other, {"start": start, "end": finish})
    submit(db, ready, intent(channels=["email"]))
    assert len(claim(db, "email")) == 1


def test_a_route_step_held_by_quiet_hours_is_not_needed_when_the_earlier_one_succeeds(db, ready):
    """Step 1 (WhatsApp) went out just before quiet hours; its 15-minute timer ran out inside them, so step 2 (e-mail)
    was held until they end; step 1's late `delivered` then makes the held step not_needed: never sent, and said so."""
    from tests.sql.test_route_progress import history, make_due, report, routed, send_step_1, step_id, steps

    r = routed(db, ready)
    send_step_1(db)
    start, finish, ends = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish})
    make_due(db, r["id"], 2)
    assert claim(db, "email") == []
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "sent", None), (2, "held", "quiet_hours")]
    step_1 = step_id(db, r["id"], 1)
    report(db, ready, step_1, "delivered", "late-delivered")
    assert [s[:3] for s in steps(db, r["id"])] == [(1, "delivered", None), (2, "not_needed", "step_1_delivered")]
    assert history(db, step_id(db, r["id"], 2))[-2:] == [
        ("waiting", "held", "claim", "quiet_hours"),
        ("held", "not_needed", "route", "step_1_delivered"),
    ]
    db.execute("update notify.notification_deliveries set due_at = now() - interval '1 second' where request_id = %s", (r["id"],))
    assert claim(db, "email") == []


def test_a_route_step_held_by_quiet_hours_starts_no_timer(db, ready):
    """Step 1 held by quiet hours is not sent: the next step's within timer does not start (it stays waiting, untimed),
    so the fallback is not sent in the quiet hours instead of the held first choice."""
    from tests.sql.test_route_progress import routed, steps

    start, finish, ends = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish})
    r = routed(db, ready)
    assert claim(db, "whatsapp") == []
    assert steps(db, r["id"]) == [(1, "held", "quiet_hours", "later"), (2, "waiting", None, "never")]


def test_changing_or_removing_the_quiet_hours_releases_what_they_held(db, ready):
    """A tenant that set the wrong window (every daytime message held until the evening) and corrects it, or removes
    its quiet hours, must not still wait for the old window's end: what they held is due at once and the claim decides
    again under the new settings (held again if the new window still covers it)."""
    start, finish, ends = window_around_now(db)
    set_quiet(db, ready, {"start": start, "end": finish})
    held = [submit(db, ready, intent(channels=["email"]))[0]["deliveries"][0]["id"] for _ in range(2)]
    assert claim(db, "email") == []
    assert {delivery(db, d)[:2] for d in held} == {("held", "quiet_hours")}
    # Still inside the new window: held again, until the new end.
    start2, finish2, ends2 = window_around_now(db, before="2 hours", after="30 minutes")
    set_quiet(db, ready, {"start": start2, "end": finish2})
    assert claim(db, "email") == []
    assert {delivery(db, d)[:3] for d in held} == {("held", "quiet_hours", ends2)}
    # Removed: sent now.
    call(db, "notify_api.delete_quiet_hours_v1(%s)", ready)
    assert sorted(str(r[1]) for r in claim(db, "email")) == sorted(held)


def test_changing_the_caps_releases_what_a_holding_cap_held(db, ready):
    from tests.sql.test_frequency_caps import send_email, set_caps

    set_caps(db, ready, {"max": 1, "period": "P1D", "action": "hold"})
    send_email(db, ready)
    assert len(claim(db, "email")) == 1
    [second] = send_email(db, ready)
    assert claim(db, "email") == []
    assert delivery(db, second)[:2] == ("held", "frequency_cap")
    set_caps(db, ready, {"max": 2, "period": "P1D", "action": "hold"})
    assert [str(r[1]) for r in claim(db, "email")] == [second]
