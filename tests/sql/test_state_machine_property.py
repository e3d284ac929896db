"""A Hypothesis stateful test of the delivery state machine: random sequences of submits (fallback routes
included), claims, provider outcomes (some from stale attempts), webhooks (shuffled, duplicated, for any status),
cancels, consent revokes, route timers running out, quiet hours and frequency caps (held, suppressed) and maintenance
never reach an illegal state, never regress a provider-driven status, and keep a complete, gapless history; a route
never sends a step it made not_needed and never leaves a step waiting untimed once every earlier step is final; some
deliveries are held along the way."""

from __future__ import annotations

import itertools

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from psycopg.types.json import Jsonb

from tests.conftest import call, claim, intent, record, result, submit

STATUSES = ["sent", "delivered", "read", "failed", "bounced", "suppressed"]
ROUTES = [
    [{"channel": "whatsapp", "until": "delivered", "within": "PT15M"}, {"channel": "email"}],
    [{"channel": "email", "until": "sent", "within": "PT1H"}, {"channel": "whatsapp"}],
    [{"channel": "whatsapp", "until": "read"}, {"channel": "email"}],
]
OUTCOMES = ["sent", "retry", "failed", "unknown", "suppressed", "bounced"]
INGEST = (
    "select notify_api.ingest_webhook_v1('mock', %s, '{}', "
    "array(select r from jsonb_populate_recordset(null::notify.status_event, %s) r))"
)


def test_random_histories_stay_legal(db: psycopg.Connection, ready: str) -> None:
    counter = itertools.count()
    reached: set[str] = set()  # statuses the claim produced, over every example
    call(db, "notify_api.set_retry_policy_v1(%s, 3, 1, 1)", ready)

    class Deliveries(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            # Every example starts from the same state, so what it draws depends only on its own steps.
            db.execute(
                "truncate notify.notification_deliveries, notify.delivery_events, notify.delivery_attempts, "
                "notify.webhook_events, notify.webhook_event_keys, notify.recipient_consents, notify.notification_requests"
            )
            db.execute("truncate notify.policy_sends")
            call(db, "notify_api.delete_quiet_hours_v1(%s)", ready)
            call(db, "notify_api.delete_frequency_caps_v1(%s)", ready)
            self.claimed: list[tuple] = []  # every claim ever made (stale ones included)
            self.requests: list[str] = []

        @rule(channels=st.sampled_from([["email"], ["whatsapp"], ["whatsapp", "email"]]), scheduled=st.booleans())
        def submit(self, channels: list[str], scheduled: bool) -> None:
            extra = {"send_at": "2099-01-01T00:00:00Z"} if scheduled else {}
            response, _ = submit(db, ready, intent(channels=channels, **extra))
            self.requests.append(response["id"])

        @rule(route=st.sampled_from(ROUTES), scheduled=st.booleans())
        def submit_route(self, route: list[dict], scheduled: bool) -> None:
            body = intent(route=route, **({"send_at": "2099-01-01T00:00:00Z"} if scheduled else {}))
            body.pop("channels")
            response, _ = submit(db, ready, body)
            self.requests.append(response["id"])

        @rule(quiet=st.booleans(), cap=st.sampled_from([None, "suppress", "hold"]))
        def policies(self, quiet: bool, cap: str | None) -> None:
            """Quiet hours around now (held until they end) and a cap of 2 a day (suppressed, or held until it frees)."""
            if quiet:
                start, end = db.execute(
                    "select to_char(now() at time zone 'UTC' - interval '1 hour', 'HH24:MI'),"
                    " to_char(now() at time zone 'UTC' + interval '1 hour', 'HH24:MI')"
                ).fetchone()
                call(db, "notify_api.set_quiet_hours_v1(%s, %s)", ready, Jsonb({"timezone": "UTC", "start": start, "end": end}))
            else:
                call(db, "notify_api.delete_quiet_hours_v1(%s)", ready)
            caps = [{"max": 2, "period": "P1D", "action": cap}] if cap else []
            call(db, "notify_api.set_frequency_caps_v1(%s, %s)", ready, Jsonb({"caps": caps}))

        @rule()
        def route_timers_run_out(self) -> None:
            db.execute(
                "update notify.notification_deliveries set due_at = now() where status = 'waiting' and due_at < 'infinity'"
            )

        @rule(channel=st.sampled_from(["email", "whatsapp"]), due=st.booleans())
        def claim(self, channel: str, due: bool) -> None:
            if due:
                db.execute(
                    "update notify.notification_deliveries set due_at = now() where status in ('queued', 'scheduled', 'held')"
                )
            self.claimed.extend(claim(db, channel, limit=3))
            reached.update(
                r[0] for r in db.execute("select distinct to_status::text from notify.delivery_events where source = 'claim'")
            )

        @rule(data=st.data(), outcome=st.sampled_from(OUTCOMES))
        def record(self, data: st.DataObject, outcome: str) -> None:
            if self.claimed:
                row = data.draw(st.sampled_from(self.claimed))  # may be a stale attempt: must be fenced
                record(db, result(row, outcome, provider_message_id=f"pm-{row[1]}-{row[2]}"))

        @rule(data=st.data(), status=st.sampled_from(STATUSES), duplicate=st.booleans())
        def webhook(self, data: st.DataObject, status: str, duplicate: bool) -> None:
            if self.claimed:
                row = data.draw(st.sampled_from(self.claimed))
                key = f"k{next(counter)}"
                event = [{"status": status, "tenant_id": str(row[0]), "delivery_id": str(row[1])}]
                for _ in range(2 if duplicate else 1):
                    db.execute(INGEST, (key, Jsonb(event)))

        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            if self.requests:
                call(db, "notify_api.cancel_notification_v1(%s, %s)", ready, data.draw(st.sampled_from(self.requests)))

        @rule(channel=st.sampled_from(["email", "whatsapp"]), status=st.sampled_from(["granted", "revoked"]))
        def consent(self, channel: str, status: str) -> None:
            call(
                db,
                "notify_api.record_consent_v1(%s, 'runner-42', %s)",
                ready,
                Jsonb({"channel": channel, "status": status, "source": "t"}),
            )

        @rule()
        def maintenance(self) -> None:
            db.execute(
                "update notify.notification_deliveries set lease_expires_at = now() - interval '1 second' where status = "
                "'sending'"
            )
            call(db, "notify_api.run_maintenance_v1()")

        @invariant()
        def history_is_a_legal_gapless_chain(self) -> None:
            broken = db.execute("""
                with h as (
                    select e.delivery_id, e.seq, e.from_status, e.to_status, e.source, d.channel,
                           lag(e.to_status) over (partition by e.delivery_id order by e.seq) as previous,
                           lag(e.seq) over (partition by e.delivery_id order by e.seq) as previous_seq
                      from notify.delivery_events e join notify.notification_deliveries d on d.id = e.delivery_id
                     where not (e.source = 'route' and e.from_status = e.to_status))
                select delivery_id, seq, from_status, to_status, source from h
                 where (seq > 1 and (previous is distinct from from_status or previous_seq <> seq - 1))
                   -- a route's note (from = to, source route, the seq of the change it explains) is not a change
                   and not (source = 'route' and from_status = to_status)
                    or (from_status is not null and not notify._transition_allowed(channel, from_status, to_status))
                    or (source = 'webhook' and notify._rank(channel, to_status) <= notify._rank(channel, from_status))
                 limit 1""").fetchall()
            assert broken == []
            current = db.execute("""
                select count(*) from notify.notification_deliveries d
                 where d.seq <> (select max(e.seq) from notify.delivery_events e where e.delivery_id = d.id)
                    or d.status <> (select e.to_status from notify.delivery_events e where e.delivery_id = d.id order by
                      e.seq desc limit 1)
            """).fetchone()[0]
            assert current == 0

        @invariant()
        def routes_send_only_what_is_needed_and_never_stall(self) -> None:
            # a step made not_needed was never claimed, and an earlier step of its route reached its goal
            unexplained = db.execute("""
                select count(*) from notify.notification_deliveries m
                 where m.status = 'not_needed'
                   and (m.attempt > 0
                        or not exists (select from notify.notification_deliveries e
                                         join notify.delivery_events x on x.delivery_id = e.id
                                        where e.request_id = m.request_id and e.recipient_id = m.recipient_id
                                          and e.route_step < m.route_step
                                          and notify._route_level(x.to_status) >= notify._route_level(e.route_until)))
            """).fetchone()[0]
            assert unexplained == 0
            # a step still waiting untimed has an earlier step that is not final yet (else it would be due)
            stalled = db.execute("""
                select count(*) from notify.notification_deliveries m
                 where m.status = 'waiting' and m.due_at = 'infinity'
                   and not exists (select from notify.notification_deliveries e
                                    where e.request_id = m.request_id and e.recipient_id = m.recipient_id
                                      and e.route_step < m.route_step and not notify._is_final(e.status))
            """).fetchone()[0]
            assert stalled == 0
            # waiting steps were never claimed
            assert (
                db.execute(
                    "select count(*) from notify.notification_deliveries where status = 'waiting' and attempt > 0"
                ).fetchone()[0]
                == 0
            )

    run_state_machine_as_test(
        Deliveries,
        settings=settings(max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)),
    )
    # The policies were in play: the claim held and suppressed deliveries, besides sending them.
    assert {"sending", "held", "suppressed"} <= reached, reached
